//! What an operator sees (issue 19): `show` and `apply --dry-run` look into a delta without
//! changing anything; every command that changes something says so in one line; the command
//! line documents every argument and offers flip options only where a flip happens; the
//! small surprises (a directory as the delta, `checkout` of a missing version, a closed pipe)
//! are plain errors or none.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use clap::CommandFactory;
use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two versions of a small tree: in B one file changes content, one only its mode, one is
/// added and one removed.
struct Pair {
    env: Env,
    a: PathBuf,
    b: PathBuf,
}

fn pair() -> Pair {
    let env = Env::new();
    let a = env.tree(
        "a",
        &TreeSpec::new()
            .file("etc/conf", "a=1\n")
            .file("bin/tool", noise(200_000, 1))
            .mode(0o755)
            .file("etc/motd", "hello\n")
            .file("etc/old", "old\n"),
    );
    let mut big = noise(300_000, 1);
    big[1000] ^= 1;
    let b = env.tree(
        "b",
        &TreeSpec::new()
            .file("etc/conf", "a=2\n")
            .file("bin/tool", big)
            .mode(0o755)
            .file("etc/motd", "hello\n")
            .mode(0o600)
            .file("etc/new", "new\n"),
    );
    Pair { env, a, b }
}

impl Pair {
    fn delta(&self, name: &str, sign: Option<&Path>) -> PathBuf {
        let out = self.env.path(name);
        let mut c = ts_cmd();
        c.args(["diff", "--from-dir", s(&self.a), "--to-dir", s(&self.b)])
            .args(["--from-version", "1", "--to-version", "2", "-o", s(&out)]);
        if let Some(k) = sign {
            c.arg("--sign").arg(k);
        }
        run(&mut c).success();
        out
    }

    fn config(&self, name: &str, keys: &[&Path]) -> PathBuf {
        let p = self.env.path(name);
        let list: Vec<String> = keys.iter().map(|k| format!("\"{}\"", s(k))).collect();
        fs::write(
            &p,
            format!("[trust]\npublic_keys = [{}]\n", list.join(", ")),
        )
        .unwrap();
        p
    }

    fn ts_cfg(&self, config: Option<&Path>, args: &[&str]) -> Run {
        let mut c = ts_cmd();
        c.arg("--root").arg(&self.env.root);
        if let Some(cfg) = config {
            c.arg("--config").arg(cfg);
        }
        run(c.args(args))
    }
}

fn json(r: &Run) -> Value {
    serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()))
}

/// `show` says what a delta holds and whether its signature verifies, with and without the
/// base installed, and refuses what `apply` refuses, in one line, reading nothing more.
#[test]
fn show_describes_a_delta_and_its_signature() {
    let p = pair();
    let (public, secret) = minisign_keypair(&p.env, "release");
    let (other_public, _) = minisign_keypair(&p.env, "other");
    let signed = p.delta("signed.delta", Some(&secret));
    let unsigned = p.delta("unsigned.delta", None);
    let trusting = p.config("trusting.toml", &[&public]);
    let distrusting = p.config("distrusting.toml", &[&other_public]);

    // No state root: no base information.
    let r = p.ts_cfg(Some(&trusting), &["show", s(&signed), "--json"]);
    let j = json(r.success());
    assert_eq!(j["schema"], 1);
    assert_eq!(j["from_version"], "1");
    assert_eq!(j["to_version"], "2");
    assert_eq!(j["signature"]["state"], "verified");
    assert_eq!(j["signature"]["key"], s(&public));
    assert_eq!(j["base_installed"], Value::Null);
    assert_eq!(j["entries"]["removed"], 1);
    assert_eq!(j["entries"]["changed"], 4, "{j}");
    assert_eq!(j["entries"]["added"], Value::Null);
    assert_eq!(j["largest"][0]["path"], "bin/tool");
    assert_eq!(j["largest"][0]["size"], 300_000);
    let blobs = j["blob_bytes"].as_u64().unwrap();
    assert!(blobs > 0 && blobs < fs::metadata(&signed).unwrap().len());

    let r = p.ts_cfg(Some(&distrusting), &["show", s(&signed), "--json"]);
    let j = json(r.success());
    assert_eq!(j["signature"]["state"], "not-verified");
    assert!(
        j["signature"]["error"]
            .as_str()
            .unwrap()
            .contains("does not verify")
    );
    let j = json(p.ts_cfg(None, &["show", s(&unsigned), "--json"]).success());
    assert_eq!(j["signature"]["state"], "unsigned");
    let j = json(p.ts_cfg(None, &["show", s(&signed), "--json"]).success());
    assert_eq!(j["signature"]["state"], "not-checked");

    // With the base installed: added, changed and metadata-only entries told apart.
    p.env.import(&p.a, "1");
    let j = json(p.ts_cfg(None, &["show", s(&unsigned), "--json"]).success());
    assert_eq!(j["base_installed"], "1");
    // etc/new added; etc/conf, bin/tool changed; etc/motd metadata only.
    assert_eq!(j["entries"]["added"], 1, "{j}");
    assert_eq!(j["entries"]["modified"], 2, "{j}");
    assert_eq!(j["entries"]["metadata_only"], 1, "{j}");
    let text = p.ts_cfg(None, &["show", s(&unsigned)]);
    text.success()
        .stdout_has("`1` is installed here")
        .stdout_has("1 added, 2 changed, 1 metadata only")
        .stdout_has("bin/tool");
    // From standard input too.
    let r = run(ts_cmd()
        .args(["--root", s(&p.env.root), "show", "-"])
        .stdin(fs::File::open(&unsigned).unwrap()));
    r.success().stdout_has("to:        `2`");

    // What apply refuses, show refuses: a truncated delta, a directory.
    let bytes = fs::read(&unsigned).unwrap();
    let cut = p.env.path("cut.delta");
    // Within the manifest: show reads the head only, so a cut among the blobs shows.
    fs::write(&cut, &bytes[..100]).unwrap();
    let r = p.ts_cfg(None, &["show", s(&cut)]);
    r.exit(8).one_line_error();
    let r = p.ts_cfg(None, &["show", s(&p.a)]);
    r.exit(1).one_line_error().stderr_has("is a directory");
    let r = p.ts_cfg(None, &["apply", s(&p.a)]);
    r.exit(1).one_line_error().stderr_has("is a directory");
}

/// `apply --dry-run` checks the signature, the base, the result and the space, says what it
/// would do, exits as `apply` would, and writes nothing.
#[test]
fn apply_dry_run_checks_everything_and_writes_nothing() {
    let p = pair();
    let delta = p.delta("d.delta", None);
    p.env.import(&p.a, "1");
    p.ts_cfg(None, &["switch", "1", "--no-restart"]);
    let listing = |root: &Path| -> Vec<(PathBuf, u64)> {
        let mut v = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let md = fs::symlink_metadata(e.path()).unwrap();
                if md.is_dir() {
                    stack.push(e.path());
                }
                v.push((e.path(), std::os::unix::fs::MetadataExt::ino(&md)));
            }
        }
        v.sort();
        v
    };
    let before = listing(&p.env.root);
    let r = p.ts_cfg(None, &["apply", s(&delta), "--dry-run"]);
    r.success()
        .stdout_has("would apply: `1` -> `2`")
        .stdout_has("new objects: ")
        .stdout_has("MiB are free");
    assert_eq!(listing(&p.env.root), before, "a dry run changed the root");
    assert!(!p.env.root.join("last-apply.toml").exists());

    // Refusals exit as apply would: untrusted, wrong base, no space.
    let (public, _) = minisign_keypair(&p.env, "k");
    let strict = p.config("strict.toml", &[&public]);
    p.ts_cfg(Some(&strict), &["apply", s(&delta), "--dry-run"])
        .exit(10)
        .one_line_error();
    let env2 = Env::new();
    env2.import(&p.b, "9");
    let r = run(ts_cmd().args([
        "-q",
        "--root",
        s(&env2.root),
        "apply",
        s(&delta),
        "--dry-run",
    ]));
    r.exit(7).one_line_error();
    if !skip_unless_root() {
        let mnt = Mount::tmpfs(&p.env.path("small"), "2m");
        let root = mnt.path.join("root");
        init_root(&root);
        ts(
            &root,
            [
                OsStr::new("import"),
                p.a.as_os_str(),
                "--version".as_ref(),
                "1".as_ref(),
            ],
        )
        .success();
        let r = ts(&root, ["-q", "apply", s(&delta), "--dry-run"]);
        r.exit(9).one_line_error().stderr_has("MiB missing");
    }
    // The result installed already: it would only switch.
    p.ts_cfg(None, &["apply", s(&delta), "--no-restart"])
        .success();
    p.ts_cfg(None, &["switch", "1", "--no-restart"]).success();
    p.ts_cfg(None, &["apply", s(&delta), "--dry-run"])
        .success()
        .stdout_has("would switch: `2`");
}

/// Every command that changes something prints one line saying what it did (`-q` silences
/// it); a flip says whether guests were restarted and whether the tree is pending.
#[test]
fn each_change_says_what_it_did_in_one_line() {
    let p = pair();
    let delta = p.delta("d.delta", None);
    let cfg = p.env.path("guests.toml");
    fs::write(
        &cfg,
        "[boot]\ntries = 2\n[[guest]]\nname = \"web\"\nrestart = [\"true\"]\n",
    )
    .unwrap();
    let one = |args: &[&str], want: &str| {
        let r = p.ts_cfg(Some(&cfg), args);
        r.success();
        assert_eq!(r.stdout().lines().count(), 1, "{args:?}: {}", r.stdout());
        assert!(r.stdout().contains(want), "{args:?}: {}", r.stdout());
    };
    one(&["init"], "is ready");
    one(
        &["import", s(&p.a), "--version", "1", "--activate"],
        "imported `1`; current is `1`",
    );
    one(&["apply", s(&delta)], "applied `1` -> `2`; current is `2`");
    let r = p.ts_cfg(Some(&cfg), &["revert"]);
    assert_eq!(
        r.success().stdout(),
        "reverted: current is `1` (was `2`); 1 guest(s) restarted\n"
    );
    one(
        &["switch", "2"],
        "1 guest(s) restarted; pending until marked good (2 boot tries)",
    );
    one(
        &["switch", "1", "--no-restart"],
        "guests not restarted (--no-restart)",
    );
    one(&["switch", "2", "--no-restart"], "current is `2` (was `1`)");
    one(&["mark-good"], "`2` is marked good");
    one(&["pin", "1"], "pinned `1`");
    one(&["unpin", "1"], "unpinned `1`");
    one(&["verify", "--full"], "`2` verified in full");
    one(&["checkout", "1", s(&p.env.path("co"))], "checked out `1`");
    one(&["gc"], "removed");
    let r = p.ts_cfg(Some(&cfg), &["-q", "switch", "1"]);
    r.success();
    assert_eq!(r.stdout(), "");
}

/// Small surprises: `checkout` of a missing version names it as `switch` does; output into a
/// closed pipe ends quietly; flip options are offered only by commands that flip.
#[test]
fn missing_versions_closed_pipes_and_misplaced_options() {
    let p = pair();
    p.env.import(&p.a, "1");
    let r = p.ts_cfg(None, &["checkout", "9", s(&p.env.path("co"))]);
    r.failure()
        .one_line_error()
        .stderr_has("version `9` is not installed");
    let r = p.ts_cfg(None, &["switch", "9"]);
    r.failure().stderr_has("version `9` is not installed");

    for args in [
        vec!["manifest", s(&p.a)],
        vec!["--root", s(&p.env.root), "status"],
        vec!["--root", s(&p.env.root), "list", "--json"],
    ] {
        let mut c = ts_cmd();
        c.args(&args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // The reader goes away before reading a byte.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    for cmd in ["init", "list", "status", "gc", "verify"] {
        p.ts_cfg(None, &[cmd, "--no-restart"])
            .exit(2)
            .stderr_has("unexpected argument");
    }
    let help = run(ts_cmd().args(["switch", "--help"]));
    help.success().stdout_has("--no-restart");
    let help = run(ts_cmd().args(["status", "--help"]));
    assert!(!help.success().stdout().contains("--no-restart"));
}

/// Every argument of every command has a description (the man page and `--help` show it).
#[test]
fn every_argument_is_described() {
    let cli = treeswap::cli::Cli::command();
    let mut missing = Vec::new();
    let mut check = |cmd: &clap::Command, path: &str| {
        if cmd.get_about().is_none() {
            missing.push(format!("{path}: no about"));
        }
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id != "help" && id != "version" && a.get_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
    };
    check(&cli, "treeswap");
    for sub in cli.get_subcommands() {
        check(sub, sub.get_name());
    }
    assert!(missing.is_empty(), "without a description: {missing:?}");
}
