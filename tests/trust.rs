//! Trust: signed deltas (minisign keys made with the stock `minisign` tool), key rotation,
//! `--insecure`, downgrade refusal and replays, and gc with pins.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn tree(env: &Env, name: &str, text: &str) -> PathBuf {
    env.tree(
        name,
        &TreeSpec::new()
            .dir("etc")
            .file("etc/version", text)
            .file("bin/tool", "the same tool\n")
            .mode(0o755),
    )
}

fn diff(env: &Env, from: &Path, to: &Path, fv: &str, tv: &str, key: Option<&Path>) -> PathBuf {
    let signer = key.map_or("unsigned".into(), |k| {
        k.file_stem().unwrap().to_string_lossy().into_owned()
    });
    let out = env.path(&format!("{fv}-{tv}-{signer}.delta"));
    let mut c = ts_cmd();
    c.arg("diff")
        .arg("--from-dir")
        .arg(from)
        .arg("--to-dir")
        .arg(to)
        .args(["--from-version", fv, "--to-version", tv, "-o"])
        .arg(&out);
    if let Some(k) = key {
        c.arg("--sign").arg(k);
    }
    run(&mut c).success();
    out
}

fn config(env: &Env, keys: &[&Path]) -> PathBuf {
    let p = env.path("treeswap.toml");
    let list: Vec<String> = keys
        .iter()
        .map(|k| format!("{:?}", k.to_str().unwrap()))
        .collect();
    fs::write(
        &p,
        format!("[trust]\npublic_keys = [{}]\n", list.join(", ")),
    )
    .unwrap();
    p
}

fn apply(env: &Env, cfg: &Path, delta: &Path, extra: &[&str]) -> Run {
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&env.root)
        .arg("--config")
        .arg(cfg)
        .args(["-q", "apply"])
        .arg(delta)
        .arg("--no-restart")
        .args(extra);
    run(&mut c)
}

fn current(env: &Env) -> String {
    fs::read_link(env.root.join("current"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn only_deltas_signed_by_a_trusted_key_are_applied() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let (pub1, key1) = minisign_keypair(&env, "old");
    let (pub2, key2) = minisign_keypair(&env, "new");
    let (v1, v2) = (tree(&env, "v1", "1\n"), tree(&env, "v2", "2\n"));
    env.ts([
        "import",
        v1.to_str().unwrap(),
        "--version",
        "1",
        "--activate",
        "--no-restart",
    ])
    .success();
    let unsigned = diff(&env, &v1, &v2, "1", "2", None);
    let by_old = diff(&env, &v1, &v2, "1", "2", Some(&key1));
    let signed_by_new = diff(&env, &v1, &v2, "1", "2", Some(&key2));
    let before = snapshot(&env.root.join("trees/1"));

    // Only the new key is trusted: unsigned and old-key deltas are refused, nothing written.
    let cfg = config(&env, &[&pub2]);
    apply(&env, &cfg, &unsigned, &[])
        .exit(10)
        .one_line_error()
        .stderr_has("not signed");
    apply(&env, &cfg, &by_old, &[])
        .exit(10)
        .one_line_error()
        .stderr_has("does not verify");
    assert_eq!(current(&env), "trees/1");
    assert!(!env.root.join("trees/2").exists());
    assert_same_tree(&before, &snapshot(&env.root.join("trees/1")));

    // The signature is a plain minisign signature of delta.toml.
    let x = env.path("x");
    fs::create_dir(&x).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zstd -dc {} | tar -C {} -xf - delta.toml delta.toml.minisig && minisign -Vq -p {} -m {}/delta.toml",
            signed_by_new.display(),
            x.display(),
            pub2.display(),
            x.display()
        ))
        .status()
        .unwrap();
    assert!(
        st.success(),
        "minisign -V did not verify the delta's signature"
    );

    // Key rotation: both keys trusted, the old key's delta is accepted.
    let cfg = config(&env, &[&pub2, &pub1]);
    apply(&env, &cfg, &by_old, &[]).success();
    assert_eq!(current(&env), "trees/2");
    assert_same_dirs(&v2, &env.tree_dir("2"));
}

#[test]
fn insecure_and_keyless_modes() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let (pub1, _) = minisign_keypair(&env, "k");
    let (v1, v2) = (tree(&env, "v1", "1\n"), tree(&env, "v2", "2\n"));
    env.ts([
        "import",
        v1.to_str().unwrap(),
        "--version",
        "1",
        "--activate",
        "--no-restart",
    ])
    .success();
    let unsigned = diff(&env, &v1, &v2, "1", "2", None);
    // --insecure skips the check, loudly.
    let cfg = config(&env, &[&pub1]);
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&env.root)
        .arg("--config")
        .arg(&cfg)
        .arg("apply")
        .arg(&unsigned)
        .args(["--no-restart", "--insecure"]);
    run(&mut c).success().stderr_has("--insecure");
    assert_eq!(current(&env), "trees/2");
    assert_same_dirs(&v2, &env.tree_dir("2"));
    env.ts(["revert", "--no-restart"]).success();
    env.ts(["gc"]).success();
    // No keys configured: accepted with a warning.
    let none = config(&env, &[]);
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&env.root)
        .arg("--config")
        .arg(&none)
        .arg("apply")
        .arg(&unsigned)
        .arg("--no-restart");
    run(&mut c).success().stderr_has("unsigned");
    assert_eq!(current(&env), "trees/2");
    assert_same_dirs(&v2, &env.tree_dir("2"));
}

#[test]
fn downgrades_and_replays_are_refused_but_revert_is_not_a_downgrade() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let (pub1, key1) = minisign_keypair(&env, "k");
    let cfg = config(&env, &[&pub1]);
    let (v9, v10) = (tree(&env, "v9", "9\n"), tree(&env, "v10", "10\n"));
    env.ts([
        "import",
        v9.to_str().unwrap(),
        "--version",
        "9",
        "--activate",
        "--no-restart",
    ])
    .success();
    let up = diff(&env, &v9, &v10, "9", "10", Some(&key1));
    let down = diff(&env, &v10, &v9, "10", "9", Some(&key1));
    // 9 -> 10 is an upgrade (10 > 9 as versions, not as strings).
    apply(&env, &cfg, &up, &[]).success();
    assert_eq!(current(&env), "trees/10");
    assert_same_dirs(&v10, &env.tree_dir("10"));
    // A validly signed delta back to 9 is refused, and so is a replay that would switch to the
    // still-installed 9.
    apply(&env, &cfg, &down, &[])
        .exit(11)
        .one_line_error()
        .stderr_has("downgrade");
    assert_eq!(current(&env), "trees/10");
    // Revert goes back to previous: not a downgrade.
    env.ts(["revert", "--no-restart"]).success();
    assert_eq!(current(&env), "trees/9");
    // Replaying the old upgrade delta when 10 is installed just switches.
    apply(&env, &cfg, &up, &[]).success();
    assert_eq!(current(&env), "trees/10");
    assert_same_dirs(&v10, &env.tree_dir("10"));
    // Forced.
    apply(&env, &cfg, &down, &["--allow-downgrade"]).success();
    assert_eq!(current(&env), "trees/9");
    assert_same_dirs(&v9, &env.tree_dir("9"));
}

#[test]
fn gc_keeps_current_previous_pinned_and_the_newest() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    for v in 1..=5 {
        let t = tree(&env, &format!("t{v}"), &format!("{v} unique content\n"));
        env.ts([
            "import",
            t.to_str().unwrap(),
            "--version",
            &v.to_string(),
            "--no-restart",
        ])
        .success();
    }
    env.ts(["switch", "4", "--no-restart"]).success();
    env.ts(["switch", "5", "--no-restart"]).success();
    env.ts(["pin", "1"]).success();
    env.ts(["pin", "9"]).exit(1).one_line_error();
    let objects_before = pool_files(&env.root).len();
    // Current 5, previous 4, pinned 1; keep the newest other (3); 2 goes.
    env.ts(["gc", "--keep", "1"]).success().stdout_has("(2)");
    let list = env.ts(["list"]).stdout();
    assert_eq!(
        list.lines()
            .map(|l| l.trim_start_matches(['*', '-', ' ']))
            .collect::<Vec<_>>(),
        ["1", "3", "4", "5"]
    );
    assert!(
        pool_files(&env.root).len() < objects_before,
        "2's own object is gone"
    );
    for v in ["1", "3", "4", "5"] {
        env.ts(["verify", v, "--full"]).success();
    }
    env.ts(["unpin", "1"]).success();
    env.ts(["gc"]).success();
    let list = env.ts(["list"]).stdout();
    assert_eq!(list.lines().count(), 2, "{list}");
    // Nothing of a removed version stays in `manifests/` or `layouts/`: not its manifest, not
    // its layout.
    for d in ["manifests", "layouts"] {
        assert_eq!(
            names(&env.root.join(d))
                .iter()
                .map(|n| show(n))
                .collect::<Vec<_>>(),
            ["4.toml", "5.toml"],
            "{d}/"
        );
    }
}

/// Regression (issue 15, 8): a `public_keys` entry that is a FIFO hung, `/dev/zero` read until
/// out of memory. A key file must be a small regular file: anything else is refused at once,
/// with one line, and nothing is written.
#[test]
fn a_key_file_that_is_not_a_small_regular_file_is_refused() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let (public, secret) = minisign_keypair(&env, "vendor");
    let v1 = tree(&env, "v1", "1\n");
    let v2 = tree(&env, "v2", "2\n");
    env.ts([
        "import",
        v1.to_str().unwrap(),
        "--version",
        "1",
        "--activate",
    ])
    .success();
    let delta = diff(&env, &v1, &v2, "1", "2", Some(&secret));
    let fifo = env.path("key.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = env.path("big.pub");
    fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
    let cases: [(&Path, &str); 4] = [
        (&fifo, "not a regular file"),
        (Path::new("/dev/zero"), "not a regular file"),
        (&big, "more than a key file holds"),
        (env.root.as_path(), "not a regular file"),
    ];
    for (key, want) in cases {
        let cfg = config(&env, &[&public, key]);
        // `timeout`: a regression would block on the FIFO for good.
        let mut c = Command::new("timeout");
        c.arg("30")
            .arg(env!("CARGO_BIN_EXE_treeswap"))
            .env("TREESWAP_PROTECT", "hardlink")
            .arg("--root")
            .arg(&env.root)
            .arg("--config")
            .arg(&cfg)
            .args(["apply", delta.to_str().unwrap(), "--no-restart"]);
        let r = run(&mut c);
        assert_eq!(r.code(), Some(1), "{}: {}", key.display(), r.stderr());
        r.stderr_has(want).stderr_has("cannot read public key");
        assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
        assert_eq!(current(&env), "trees/1");
        assert!(!env.root.join("trees/2").exists());
    }
    // The same keys, as they should be: the delta applies.
    let cfg = config(&env, &[&public]);
    apply(&env, &cfg, &delta, &[]).success();
    assert_eq!(current(&env), "trees/2");
    assert_same_dirs(&v2, &env.tree_dir("2"));
}

/// Regression (issue 15, 8): `01` and `1` compare equal, so either could stand in for the
/// other. apply refused such a result; `import` did not.
#[test]
fn import_refuses_a_version_spelled_like_an_installed_one() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let v1 = tree(&env, "v1", "1\n");
    env.ts([
        "import",
        v1.to_str().unwrap(),
        "--version",
        "1",
        "--activate",
    ])
    .success();
    let r = env.ts(["import", v1.to_str().unwrap(), "--version", "01"]);
    assert_eq!(r.code(), Some(11), "{}", r.stderr());
    r.stderr_has("the same version as the installed `1`");
    assert!(!env.root.join("trees/01").exists());
    assert!(!env.root.join("manifests/01.toml").exists());
}
