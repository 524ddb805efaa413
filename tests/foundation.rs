//! End-to-end tests of the foundation: `init`, `import`, `manifest`, `verify`, `status`,
//! `list` and `checkout`, run through the real binary the way a boot script would.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::os::unix::process::CommandExt;
use std::path::Path;

use common::*;

/// A tree with one of everything: each entry kind, special mode bits, owners, extended
/// attributes, hardlink groups and names that are not UTF-8 or contain a newline.
fn every_kind() -> TreeSpec {
    TreeSpec::new()
        .top()
        .mode(0o751)
        .xattr("user.top", "of the tree")
        .dir("etc")
        .file("etc/hostname", "host\n")
        .file("etc/shadow", "root:*:1::::::\n")
        .mode(0o640)
        .owner(0, 42)
        .dir("etc/sticky")
        .mode(0o1777)
        .dir("srv")
        .mode(0o2750)
        .owner(1000, 1000)
        .xattr("user.dir", "d")
        .dir("srv/child")
        .file("srv/child/data", "under a setgid directory")
        .file("usr/bin/su", "#!/bin/sh\necho su\n")
        .mode(0o4755)
        .file("usr/bin/wall", "wall binary")
        .mode(0o2755)
        .owner(0, 5)
        .file("usr/bin/ping", "ping binary")
        .mode(0o755)
        .capability()
        .file("usr/share/doc", "documentation\n")
        .xattr("user.mime", "text/plain")
        .xattr("user.bin", [0u8, 1, 0xff])
        .empty("var/empty")
        .empty("var/empty-owned")
        .owner(1234, 5678)
        .mode(0o600)
        .symlink("bin", "usr/bin")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .symlink("dangling", "does/not/exist")
        .symlink("usr/bin/owned-link", "su")
        .owner(7, 8)
        .file("usr/lib/libx.so.1", "lib x")
        .mode(0o755)
        .hardlink("usr/lib/libx.so", "usr/lib/libx.so.1")
        .hardlink("usr/libx-elsewhere", "usr/lib/libx.so.1")
        .file("opt/a", "second hardlink group")
        .hardlink("opt/b", "opt/a")
        .char_dev("dev/null", 1, 3)
        .mode(0o666)
        .char_dev("dev/tty5", 4, 5)
        .mode(0o620)
        .owner(0, 5)
        .block_dev("dev/sda1", 8, 1)
        .mode(0o660)
        .owner(0, 6)
        .block_dev("dev/big-minor", 259, 70000)
        .fifo("run/initctl")
        .mode(0o600)
        .file(b"names/bad\xff\xfe", "name not UTF-8")
        .file("names/new\nline", "newline in the name")
        .dir(b"names/dir\xc3")
        .file(b"names/dir\xc3/inner", "inside a non-UTF-8 directory")
        .file("names/100% \"quoted\" \\ back\ttab", "specials")
        .file("names/caf\u{e9}", "UTF-8 name")
        .symlink(b"names/link\xff", b"target\xff\xfe\nx")
        .file("big", vec![0xab_u8; 3 << 20])
        .file("xattrs/odd", "odd extended attributes")
        .xattr("user.empty", "")
        .xattr(b"user.not-utf8-\xff", "name")
        .xattr("user.large", vec![b'x'; 3000])
        .symlink("xattrs/link", "odd")
        .xattr("trusted.on-a-symlink", "v")
        .fifo("xattrs/fifo")
        .xattr("trusted.on-a-fifo", [0u8; 4])
        .file("x".repeat(255), "longest name")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The helpers must see every kind of difference, or every comparison would pass.
#[test]
fn tree_helpers_see_differences() {
    let env = Env::new();
    let spec = TreeSpec::new()
        .file("f", "content")
        .xattr("user.k", "v")
        .hardlink("g", "f")
        .symlink("l", "f")
        .dir("d");
    let a = env.tree("a", &spec);
    let b = env.tree("b", &spec);
    assert!(diff_trees(&snapshot(&a), &snapshot(&b), Links::Exact).is_empty());
    assert_eq!(snapshot(&a)[&b"g"[..]].links.len(), 2);

    type Damage = Box<dyn Fn(&Path)>;
    let damage: Vec<(&str, Damage)> = vec![
        (
            "content",
            Box::new(|t| overwrite_in_place(&t.join("f"), b"C")),
        ),
        (
            "mode",
            Box::new(|t| {
                fs::set_permissions(t.join("d"), fs::Permissions::from_mode(0o700)).unwrap()
            }),
        ),
        (
            "xattr",
            Box::new(|t| {
                rustix::fs::lsetxattr(t.join("f"), "user.k", b"w", rustix::fs::XattrFlags::empty())
                    .unwrap()
            }),
        ),
        (
            "target",
            Box::new(|t| {
                fs::remove_file(t.join("l")).unwrap();
                std::os::unix::fs::symlink("g", t.join("l")).unwrap();
            }),
        ),
        (
            "hardlink",
            Box::new(|t| {
                fs::remove_file(t.join("g")).unwrap();
                fs::copy(t.join("f"), t.join("g")).unwrap();
            }),
        ),
        ("extra", Box::new(|t| fs::write(t.join("new"), "").unwrap())),
        (
            "missing",
            Box::new(|t| fs::remove_dir(t.join("d")).unwrap()),
        ),
    ];
    for (i, (what, f)) in damage.iter().enumerate() {
        let c = env.tree(&format!("c{i}"), &spec);
        f(&c);
        let d = diff_trees(&snapshot(&a), &snapshot(&c), Links::Subset);
        assert!(!d.is_empty(), "{what} went unnoticed");
    }
    // Joining more names is allowed under the subset rule, not under the exact one.
    let joined = env.tree("joined", &TreeSpec::new().file("x", "1").hardlink("y", "x"));
    let apart = env.tree("apart", &TreeSpec::new().file("x", "1").file("y", "1"));
    assert!(diff_trees(&snapshot(&apart), &snapshot(&joined), Links::Subset).is_empty());
    assert!(!diff_trees(&snapshot(&apart), &snapshot(&joined), Links::Exact).is_empty());
    assert!(!diff_trees(&snapshot(&joined), &snapshot(&apart), Links::Subset).is_empty());
}

fn status_json(env: &Env) -> serde_json::Value {
    let r = env.ts(["status", "--json"]);
    r.success();
    serde_json::from_str(&r.stdout())
        .unwrap_or_else(|e| panic!("status --json: {e}\n{}", r.stdout()))
}

#[test]
fn import_every_kind_and_activate() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let src = env.tree("src", &every_kind());
    let before = snapshot(&src);
    // The helper built what the spec says (a broken helper would make every test pass).
    assert_eq!(before[&b"usr/bin/su"[..]].mode, 0o4755);
    assert_eq!(before[&b"usr/lib/libx.so"[..]].links.len(), 3);
    assert_eq!(before[&b"dev/big-minor"[..]].rdev, Some((259, 70000)));
    assert!(
        before[&b"xattrs/link"[..]]
            .xattrs
            .contains_key(&b"trusted.on-a-symlink"[..])
    );
    // Without it the test would pass while not testing capabilities: fail, or with the opt-in
    // record a skip (and return, so that a recorded skip is always a test that returned).
    if !before[&b"usr/bin/ping"[..]]
        .xattrs
        .contains_key(&b"security.capability"[..])
        && skip("security.capability cannot be set here")
    {
        return;
    }

    let r = env.ts(["import", s(&src), "--version", "1", "--activate"]);
    r.success().stderr_lacks("warning");

    assert_same_tree(&before, &snapshot(&env.tree_dir("1")));
    assert_trees(&before, &snapshot(&src), Links::Exact);

    let cur = fs::read_link(env.root.join("current")).unwrap();
    assert_eq!(
        cur,
        Path::new("trees/1"),
        "current must be a relative symlink"
    );
    assert_eq!(
        fs::canonicalize(env.root.join("current")).unwrap(),
        fs::canonicalize(env.tree_dir("1")).unwrap()
    );

    env.ts(["verify"]).success();
    env.ts(["verify", "--full"]).success();
    env.ts(["verify", "1", "--full"]).success();

    let st = status_json(&env);
    assert_eq!(st["current"], "1", "{st}");
    assert!(st["previous"].is_null(), "{st}");
    assert_eq!(st["versions"], serde_json::json!(["1"]), "{st}");
    env.ts(["status"]).success().stdout_has("1");
    assert_eq!(env.ts(["list"]).success().stdout(), "* 1\n");

    // The installed tree gives the same manifest as its source.
    let m_src = env.ts(["manifest", s(&src)]);
    let m_tree = env.ts(["manifest", s(&env.tree_dir("1"))]);
    assert_eq!(m_src.success().out.stdout, m_tree.success().out.stdout);

    // The same tree again as version 2: no new pool objects, `previous` follows.
    let objects = pool_files(&env.root);
    env.ts(["import", s(&src), "--version", "2", "--activate"])
        .success();
    assert_eq!(
        pool_files(&env.root),
        objects,
        "an identical tree adds no objects"
    );
    assert_eq!(
        fs::read_link(env.root.join("previous")).unwrap(),
        Path::new("trees/1")
    );
    let st = status_json(&env);
    assert_eq!(st["current"], "2", "{st}");
    assert_eq!(st["previous"], "1", "{st}");
    assert_eq!(env.ts(["list"]).success().stdout(), "- 1\n* 2\n");
    assert_same_tree(&before, &snapshot(&env.tree_dir("2")));
    env.ts(["verify", "--full"]).success();
}

#[test]
fn socket_is_skipped_with_a_warning() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let spec = TreeSpec::new()
        .file("a", "a")
        .socket("run/control.sock")
        .file("run/pid", "1");
    let src = env.tree("src", &spec);
    let mut expected = snapshot(&src);
    assert_eq!(expected[&b"run/control.sock"[..]].kind, Type::Socket);
    expected.remove(&b"run/control.sock"[..]);

    env.ts(["import", s(&src), "--version", "1"])
        .success()
        .stderr_has("warning")
        .stderr_has("run/control.sock");
    assert_same_tree(&expected, &snapshot(&env.tree_dir("1")));
    env.ts(["verify", "1", "--full"]).success();

    let m = env.ts(["manifest", s(&src)]);
    m.success().stderr_has("run/control.sock");
    assert!(!m.stdout().contains("control.sock"), "{}", m.stdout());
}

#[test]
fn identical_files_share_one_pool_object() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let same = "the same bytes everywhere\n";
    let a = env.tree(
        "a",
        &TreeSpec::new()
            .file("shared", same)
            .file("lib/libfoo.so", "libfoo")
            .mode(0o755)
            .file("only-in-a", "a"),
    );
    let b = env.tree(
        "b",
        &TreeSpec::new()
            .file("shared", same)
            .file("lib/libfoo.so", "libfoo")
            .mode(0o755)
            .file("other/copy-of-shared", same)
            .file("mode-differs", same)
            .mode(0o600)
            .file("owner-differs", same)
            .owner(1000, 1000)
            .file("group-differs", same)
            .owner(0, 1000)
            .file("xattr-differs", same)
            .xattr("user.tag", "x")
            .file("setuid-differs", same)
            .mode(0o4644),
    );
    env.import(&a, "1");
    env.import(&b, "2");
    assert_same_dirs(&a, &env.tree_dir("1"));
    assert_same_dirs(&b, &env.tree_dir("2"));

    let t1 = env.tree_dir("1");
    let t2 = env.tree_dir("2");
    let shared = inode(&t1.join("shared"));
    assert_eq!(inode(&t2.join("shared")), shared);
    assert_eq!(inode(&t2.join("other/copy-of-shared")), shared);
    assert_eq!(
        inode(&t1.join("lib/libfoo.so")),
        inode(&t2.join("lib/libfoo.so"))
    );
    // One pool object: its own name plus three names in the trees.
    let md = fs::metadata(t1.join("shared")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&md), 4);

    let differ = [
        "mode-differs",
        "owner-differs",
        "group-differs",
        "xattr-differs",
        "setuid-differs",
    ];
    let mut seen = vec![shared];
    for name in differ {
        let ino = inode(&t2.join(name));
        assert!(
            !seen.contains(&ino),
            "`{name}` shares an inode with a file of other metadata"
        );
        seen.push(ino);
    }
    // shared, libfoo, only-in-a, and the five variants.
    assert_eq!(
        pool_files(&env.root).len(),
        8,
        "{:?}",
        pool_files(&env.root)
    );
    assert_eq!(status_json(&env)["pool_objects"], 8);
    env.ts(["verify", "1", "--full"]).success();
    env.ts(["verify", "2", "--full"]).success();
}

/// Sets every entry's atime and mtime under `dir` to `secs`, symlinks included.
fn set_all_times(dir: &Path, secs: i64) {
    let ts = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    for rel in snapshot(dir).keys() {
        let p = join(dir, rel);
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &p,
            &times,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
    }
}

#[test]
fn manifest_is_deterministic_and_loads() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let src = env.tree("src", &every_kind());
    let first = env.ts(["manifest", s(&src)]);
    first.success();
    let text = first.out.stdout.clone();
    assert!(!text.is_empty());
    assert_eq!(env.ts(["manifest", s(&src)]).success().out.stdout, text);

    // A copy with other timestamps has the same manifest.
    let copy = env.path("copy");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    set_all_times(&copy, 1_000_000_000);
    assert_trees(&snapshot(&src), &snapshot(&copy), Links::Exact);
    let copied = env.ts(["manifest", s(&copy)]);
    assert!(
        copied.success().out.stdout == text,
        "manifest of the copy differs:\n{}\n---\n{}",
        String::from_utf8_lossy(&text),
        copied.stdout()
    );

    // The text loads, and its digest is the one it declares.
    let file = env.path("m.toml");
    fs::write(&file, &text).unwrap();
    let text = String::from_utf8(text).expect("manifests are UTF-8");
    let digest = text
        .lines()
        .find_map(|l| l.strip_prefix("digest = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a digest line");
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("count = "))
        .expect("a count line");
    assert_eq!(count, snapshot(&src).len().to_string());
    env.ts(["manifest", "--load", s(&file)])
        .success()
        .stdout_has(digest)
        .stdout_has(&format!("{count} entries"));

    // Tampering with one size is caught.
    let line = text
        .lines()
        .find(|l| l.contains("\"etc/hostname\""))
        .expect("etc/hostname line");
    assert!(line.contains("size = 5,"), "{line}");
    let bad = text.replacen(line, &line.replace("size = 5,", "size = 6,"), 1);
    fs::write(&file, &bad).unwrap();
    env.ts(["manifest", "--load", s(&file)])
        .failure()
        .one_line_error();

    // So is a truncated one.
    let cut: String = text.lines().take(8).map(|l| format!("{l}\n")).collect();
    fs::write(&file, cut).unwrap();
    env.ts(["manifest", "--load", s(&file)])
        .failure()
        .one_line_error();
}

/// A tree with one file per kind of damage, each with its own content so that damage to one
/// pool object touches no other file.
fn damage_spec() -> TreeSpec {
    TreeSpec::new()
        .file("replaced", "replaced content")
        .file("removed", "removed content")
        .file("chmodded", "chmodded content")
        .file("chowned", "chowned content")
        .file("intact", "intact content")
        .dir("dir")
        .symlink("retargeted", "intact")
        .file("sub/deep", "deep content")
}

#[test]
fn verify_names_every_damaged_path() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let src = env.tree("src", &damage_spec());
    env.import(&src, "1");
    env.ts(["verify", "1"]).success();
    let t = env.tree_dir("1");

    // A new file of the same size and metadata in place of the link.
    fs::remove_file(t.join("replaced")).unwrap();
    fs::write(t.join("replaced"), "REPLACED content").unwrap();
    fs::set_permissions(t.join("replaced"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(t.join("removed")).unwrap();
    fs::write(t.join("sub/extra"), "extra").unwrap();
    fs::set_permissions(t.join("chmodded"), fs::Permissions::from_mode(0o600)).unwrap();
    lchown(t.join("chowned"), Some(1000), Some(1000)).unwrap();
    rustix::fs::lsetxattr(
        t.join("dir"),
        "user.new",
        b"x",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::remove_file(t.join("retargeted")).unwrap();
    std::os::unix::fs::symlink("elsewhere", t.join("retargeted")).unwrap();

    let r = env.ts(["verify", "1"]);
    r.exit(3);
    for (path, word) in [
        ("replaced", "modified"),
        ("removed", "missing"),
        ("sub/extra", "extra"),
        ("chmodded", "mode"),
        ("chowned", "owner"),
        ("dir", "xattr"),
        ("retargeted", ""),
    ] {
        let lines: Vec<String> = r
            .stdout()
            .lines()
            .filter(|l| l.split([' ', ':', '(']).any(|w| w == path))
            .map(str::to_owned)
            .collect();
        assert!(
            lines.iter().any(|l| l.contains(word)),
            "`{path}` should be reported ({word}) on stdout:\n{}",
            r.stdout()
        );
    }
    for intact in ["intact", "sub/deep", "sub"] {
        assert!(
            !r.stdout()
                .lines()
                .any(|l| l.split([' ', ':', '(']).any(|w| w == intact)),
            "the intact `{intact}` is reported:\n{}",
            r.stdout()
        );
    }
    r.one_line_error();
    // `current` is not set: verify without a version is an error, not a pass.
    env.ts(["verify"]).failure().one_line_error();
}

#[test]
fn verify_full_detects_a_corrupt_pool_object() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let src = env.tree(
        "src",
        &TreeSpec::new()
            .file("a", "precious bytes")
            .file("b", "other bytes"),
    );
    env.import(&src, "1");
    env.ts(["verify", "1", "--full"]).success();
    let obj = pool_object_of(&env.root, &env.tree_dir("1").join("a"));
    assert!(obj.parent().unwrap().ends_with("pool"), "{}", obj.display());
    overwrite_in_place(&obj, b"PRECIOUS");
    // Same inode, size and metadata: only re-hashing sees it.
    env.ts(["verify", "1"]).success();
    let r = env.ts(["verify", "1", "--full"]);
    r.exit(3).one_line_error();
    let name = obj.file_name().unwrap().to_str().unwrap();
    assert!(
        r.stdout().contains(&name[..16]),
        "the corrupt object `{name}` should be named:\n{}",
        r.stdout()
    );
    assert!(
        !r.stdout().contains(
            &pool_object_of(&env.root, &env.tree_dir("1").join("b"))
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()[..16]
        ),
        "an intact object is reported:\n{}",
        r.stdout()
    );
}

// ---- bad input: a one-line error, nothing half-written, and a correct run still works

fn small_tree(env: &Env, name: &str) -> std::path::PathBuf {
    env.tree(
        name,
        &TreeSpec::new()
            .file("etc/os-release", "NAME=test\n")
            .symlink("bin", "usr/bin")
            .file("usr/bin/sh", "shell")
            .mode(0o755),
    )
}

#[test]
fn import_of_a_missing_dir_fails_cleanly() {
    let env = Env::new();
    env.ts(["init"]).success();
    let missing = env.path("no-such-dir");
    env.ts(["import", s(&missing), "--version", "1"])
        .exit(1)
        .one_line_error()
        .stderr_has("no-such-dir");
    assert_clean(&env.root, "1");
    let src = small_tree(&env, "no-such-dir");
    env.import(&src, "1");
    assert_same_dirs(&src, &env.tree_dir("1"));
}

#[test]
fn import_of_a_file_fails_cleanly() {
    let env = Env::new();
    env.ts(["init"]).success();
    let file = env.path("a-file");
    fs::write(&file, "not a tree").unwrap();
    env.ts(["import", s(&file), "--version", "1"])
        .exit(1)
        .one_line_error()
        .stderr_has("a-file");
    assert_clean(&env.root, "1");
    let src = small_tree(&env, "src");
    env.import(&src, "1");
}

#[test]
fn import_of_an_unreadable_file_fails_cleanly() {
    if skip_unless_root() {
        return;
    }
    // Root reads everything; an unprivileged user does not.
    const NOBODY: u32 = 65534;
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = env.tree(
        "src",
        &TreeSpec::new()
            .top()
            .owner(NOBODY, NOBODY)
            .file("readable", "fine")
            .owner(NOBODY, NOBODY)
            .dir("sub")
            .owner(NOBODY, NOBODY)
            .file("sub/secret", "cannot be read")
            .mode(0o000)
            .owner(NOBODY, NOBODY)
            .file("sub/other", "fine too")
            .owner(NOBODY, NOBODY),
    );
    // A root of nobody's own, which nobody makes with `init`.
    let root = env.path("nobody-root");
    fs::create_dir(&root).unwrap();
    lchown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut c = ts_cmd();
        c.uid(NOBODY)
            .gid(NOBODY)
            .arg("--root")
            .arg(&root)
            .args(args);
        run(&mut c)
    };
    as_nobody(&["init"]).success();
    as_nobody(&["import", s(&src), "--version", "1"])
        .exit(1)
        .one_line_error()
        .stderr_has("sub/secret");
    assert_clean(&root, "1");

    fs::set_permissions(src.join("sub/secret"), fs::Permissions::from_mode(0o400)).unwrap();
    as_nobody(&["import", s(&src), "--version", "1"]).success();
    assert_same_dirs(&src, &root.join("trees/1"));
    as_nobody(&["verify", "1", "--full"]).success();
}

#[test]
fn import_onto_a_read_only_root_fails_cleanly() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let src = small_tree(&env, "src");
    let mnt = Mount::tmpfs(&env.path("ro"), "16m");
    let root = mnt.path.join("root");
    init_root(&root);
    ts(&root, ["init"]).success();
    mnt.remount("ro");
    ts(&root, ["import", s(&src), "--version", "1"])
        .exit(1)
        .one_line_error()
        .stderr_has("Read-only");
    assert_clean(&root, "1");
    // Readers still work on a read-only root.
    ts(&root, ["status"]).success();
    mnt.remount("rw");
    ts(&root, ["import", s(&src), "--version", "1"]).success();
    assert_same_dirs(&src, &root.join("trees/1"));
}

#[test]
fn import_without_space_for_objects_fails_cleanly() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let src = env.tree(
        "src",
        &TreeSpec::new().file("small", "small").file("big", big),
    );
    let mnt = Mount::tmpfs(&env.path("small-fs"), "1m");
    let root = mnt.path.join("root");
    init_root(&root);
    ts(&root, ["init"]).success();
    ts(&root, ["import", s(&src), "--version", "1"])
        .exit(9)
        .one_line_error();
    assert_clean(&root, "1");
    mnt.remount("size=32m");
    ts(&root, ["import", s(&src), "--version", "1"]).success();
    assert_same_dirs(&src, &root.join("trees/1"));
    ts(&root, ["verify", "1", "--full"]).success();
}

#[test]
fn import_without_inodes_for_staging_fails_cleanly() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    // Many directories and one object: the pool fits, the staged tree does not.
    let mut spec = TreeSpec::new();
    for i in 0..100 {
        spec = spec.file(format!("d{i:03}/f"), "same");
    }
    let src = env.tree("src", &spec);
    let mnt = Mount::new(
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=16m,nr_inodes=64,mode=0755",
            "tmpfs",
        ],
        &env.path("few-inodes"),
    );
    let root = mnt.path.join("root");
    init_root(&root);
    ts(&root, ["init"]).success();
    ts(&root, ["import", s(&src), "--version", "1"])
        .exit(9)
        .one_line_error();
    assert_clean(&root, "1");
    mnt.remount("nr_inodes=1000");
    ts(&root, ["import", s(&src), "--version", "1"]).success();
    assert_same_dirs(&src, &root.join("trees/1"));
}

#[test]
fn import_of_an_installed_version_fails() {
    let env = Env::new();
    let a = small_tree(&env, "a");
    let b = env.tree("b", &TreeSpec::new().file("other", "other tree"));
    env.import(&a, "1");
    let before = snapshot(&env.tree_dir("1"));
    env.ts(["import", s(&b), "--version", "1"])
        .exit(1)
        .one_line_error()
        .stderr_has("`1`");
    for d in ["tmp", "staging"] {
        assert!(names(&env.root.join(d)).is_empty(), "{d}/ not empty");
    }
    assert_trees(&before, &snapshot(&env.tree_dir("1")), Links::Exact);
    env.ts(["verify", "1", "--full"]).success();
    env.import(&b, "2");
    assert_same_dirs(&b, &env.tree_dir("2"));
}

#[test]
fn import_with_an_invalid_version_fails() {
    let env = Env::new();
    let src = small_tree(&env, "src");
    env.ts(["init"]).success();
    for bad in [
        "../x",
        "a/b",
        "",
        ".hidden",
        "-x",
        "a b",
        "x\ny",
        "é",
        &"9".repeat(129),
    ] {
        let r = env.ts(["import", s(&src), &format!("--version={bad}")]);
        r.failure().one_line_error();
        assert_ne!(r.code(), Some(0));
        assert!(names(&env.root.join("trees")).is_empty(), "{bad:?}");
        assert!(names(&env.root.join("manifests")).is_empty(), "{bad:?}");
        assert!(names(&env.root.join("staging")).is_empty(), "{bad:?}");
        assert!(!env.root.join("x").exists() && !env.path("x").exists());
        assert!(!env.root.join("trees/a").exists());
    }
    env.import(&src, "1");
    assert_same_dirs(&src, &env.tree_dir("1"));
}

#[test]
fn unknown_versions_are_errors() {
    let env = Env::new();
    let src = small_tree(&env, "src");
    env.import(&src, "1");
    env.ts(["verify"]).failure().one_line_error();
    env.ts(["verify", "2"])
        .failure()
        .one_line_error()
        .stderr_has("2");
    env.ts(["checkout", "2", s(&env.path("out"))])
        .failure()
        .one_line_error();
    assert!(!env.path("out").exists());
    env.ts(["switch", "2"]).failure().one_line_error();
    env.ts(["verify", "../1"]).failure().one_line_error();
    // A root that does not exist is not created by a reader.
    let nowhere = env.path("nowhere");
    ts(&nowhere, ["status"]).failure().one_line_error();
    assert!(!nowhere.exists());
}

#[test]
fn global_options_go_anywhere_and_come_from_the_environment() {
    let env = Env::new();
    let src = small_tree(&env, "src");
    env.import(&src, "1");
    let root = s(&env.root);

    let before = run(ts_cmd().args(["--root", root, "list"]));
    before.success();
    assert_eq!(before.stdout(), "  1\n");
    let after = run(ts_cmd().args(["list", "--root", root]));
    assert_eq!(after.success().stdout(), "  1\n");
    let eq = run(ts_cmd().args(["status", &format!("--root={root}")]));
    eq.success().stdout_has("1");
    let from_env = run(ts_cmd().env("TREESWAP_ROOT", root).arg("list"));
    assert_eq!(from_env.success().stdout(), "  1\n");
    let verbose_after = run(ts_cmd()
        .env("TREESWAP_ROOT", root)
        .args(["verify", "1", "-v"]));
    verbose_after.success().stdout_has("verified");
    // `-q` after the command silences its summary line.
    let quiet_after = run(ts_cmd()
        .env("TREESWAP_ROOT", root)
        .args(["verify", "1", "-q"]));
    assert_eq!(quiet_after.success().stdout(), "");
    // --root beats the environment.
    let both = run(ts_cmd()
        .env("TREESWAP_ROOT", env.path("nowhere"))
        .args(["list", "--root", root]));
    assert_eq!(both.success().stdout(), "  1\n");
    // And the environment is really used: a wrong one fails.
    run(ts_cmd()
        .env("TREESWAP_ROOT", env.path("nowhere"))
        .arg("list"))
    .failure()
    .one_line_error()
    .stderr_has("nowhere");
    // Writers take it from the environment too.
    run(ts_cmd()
        .env("TREESWAP_ROOT", root)
        .args(["import", s(&src), "--version", "2"]))
    .success();
    assert_eq!(env.ts(["list"]).success().stdout(), "  1\n  2\n");
}

#[test]
fn init_is_idempotent() {
    let env = Env::new();
    env.ts(["init"]).success();
    let layout = names(&env.root);
    for d in ["manifests", "pool", "staging", "tmp", "trees"] {
        assert!(
            layout.contains(&d.as_bytes().to_vec()),
            "no {d}/ in {layout:?}"
        );
    }
    // The pool is one flat directory, empty until the first import.
    assert_eq!(names(&env.root.join("pool")), Vec::<Vec<u8>>::new());
    env.ts(["init"]).success();
    assert_eq!(names(&env.root), layout);
    let st = status_json(&env);
    assert!(st["current"].is_null() && st["previous"].is_null(), "{st}");
    assert_eq!(st["versions"], serde_json::json!([]));
    assert_eq!(env.ts(["list"]).success().stdout(), "");

    let src = small_tree(&env, "src");
    env.ts(["import", s(&src), "--version", "1", "--activate"])
        .success();
    let tree = snapshot(&env.tree_dir("1"));
    env.ts(["init"]).success();
    assert_trees(&tree, &snapshot(&env.tree_dir("1")), Links::Exact);
    assert_eq!(
        fs::read_link(env.root.join("current")).unwrap(),
        Path::new("trees/1")
    );
    env.ts(["verify", "--full"]).success();
}

/// Regression (issue 19): a mistyped `--root` made `import` (and even a failed `apply`)
/// create a new state root. Every command but `init` refuses a directory that is not a state
/// root, naming it and saying to run `init`, and makes nothing; `init` makes one, at any
/// depth.
#[test]
fn only_init_makes_a_root() {
    let env = Env::new();
    let src = small_tree(&env, "src");
    let root = env.path("deep/er/root");
    for args in [
        vec!["import", s(&src), "--version", "1"],
        vec!["apply", s(&src)],
        vec!["switch", "1"],
        vec!["gc"],
        vec!["status"],
    ] {
        let r = ts(&root, &args);
        r.failure()
            .one_line_error()
            .stderr_has("no treeswap state root at")
            .stderr_has("init`");
        assert!(!env.path("deep").exists(), "{args:?} made a directory");
    }
    // A directory that exists but is no state root is refused the same way, and left alone.
    let plain = env.path("plain");
    fs::create_dir(&plain).unwrap();
    ts(&plain, ["import", s(&src), "--version", "1"])
        .failure()
        .one_line_error()
        .stderr_has("is not a treeswap state root");
    assert!(names(&plain).is_empty());
    ts(&root, ["init"]).success();
    ts(&root, ["import", s(&src), "--version", "1"]).success();
    assert_same_dirs(&src, &root.join("trees/1"));
    ts(&root, ["verify", "1", "--full"]).success();
    assert_eq!(ts(&root, ["list"]).success().stdout(), "  1\n");
}

#[test]
fn a_locked_root_is_busy() {
    let env = Env::new();
    let src = small_tree(&env, "src");
    env.import(&src, "1");
    let lock = fs::File::open(env.root.join("lock")).expect("the root has a lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    env.ts(["import", s(&src), "--version", "2"])
        .exit(6)
        .one_line_error()
        .stderr_has("--wait");
    assert_clean(&env.root, "2");
    // Readers take no lock (issue 19): they answer while a writer holds it.
    env.ts(["verify", "1"]).success();
    env.ts(["status"]).success();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::Unlock).unwrap();

    // A shared lock (an older treeswap reading) stops writers; with --wait they wait.
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared).unwrap();
    env.ts(["verify", "1"]).success();
    env.ts(["status"]).success();
    env.ts(["import", s(&src), "--version", "2"]).exit(6);
    let mut waiting = ts_cmd();
    waiting
        .args([
            "--root",
            s(&env.root),
            "--wait",
            "import",
            s(&src),
            "--version",
            "2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = waiting.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!env.tree_dir("2").exists(), "the writer did not wait");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::Unlock).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_dirs(&src, &env.tree_dir("2"));
}

#[test]
fn checkout_builds_the_installed_tree() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let src = env.tree("src", &every_kind());
    env.import(&src, "1");
    let installed = snapshot(&env.tree_dir("1"));

    let dest = env.path("out");
    env.ts(["checkout", "1", s(&dest)]).success();
    assert_trees(&installed, &snapshot(&dest), Links::Exact);
    assert_same_tree(&snapshot(&src), &snapshot(&dest));
    // A farm of links to the same pool objects.
    assert_eq!(
        inode(&dest.join("big")),
        inode(&env.tree_dir("1").join("big"))
    );

    // A relative DEST is relative to the working directory.
    let r = run(ts_cmd().current_dir(env.dir.path()).args([
        "--root",
        s(&env.root),
        "checkout",
        "1",
        "rel-out",
    ]));
    r.success();
    assert_trees(&installed, &snapshot(&env.path("rel-out")), Links::Exact);

    // An existing DEST is refused and left alone.
    let before = snapshot(&dest);
    env.ts(["checkout", "1", s(&dest)])
        .failure()
        .one_line_error();
    assert_trees(&before, &snapshot(&dest), Links::Exact);
    env.ts(["verify", "1", "--full"]).success();
}

/// ext4 allows 65 000 links per inode: 70 000 identical empty files need a second copy of
/// their pool object, and a second import of the same tree a third.
#[test]
fn link_limit_makes_extra_copies() {
    if skip_unless_root() {
        return;
    }
    const FILES: usize = 70_000;
    let t0 = std::time::Instant::now();
    let env = Env::new();
    // Everything in memory: the disk may be busy, and 70 000 creates and two syncfs calls
    // would then take minutes. The image is sparse; tmpfs holds only what is written.
    let mem = Mount::tmpfs(&env.path("mem"), "1g");
    let src = mem.path.join("src");
    many_empty_files(&src, 7, FILES);
    // 64 MiB would do for the inodes; the two 10 MB manifests and the directories of three
    // trees want room too.
    let mnt = Mount::ext4_loop(&mem.path.join("ext4.img"), 128, 100_000, &env.path("ext4"));
    let root = mnt.path.join("root");
    init_root(&root);
    eprintln!(
        "made {FILES} files and the file system in {:?}",
        t0.elapsed()
    );

    ts(&root, ["import", s(&src), "--version", "1"]).success();
    eprintln!("import 1 done at {:?}", t0.elapsed());
    ts(&root, ["verify", "1", "--full"]).success();
    let copies = |root: &Path| -> Vec<String> {
        pool_files(root)
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect()
    };
    let objs = copies(&root);
    assert!(
        objs.iter().any(|n| n.ends_with(".1")),
        "no extra copy in the pool: {objs:?}"
    );
    assert_eq!(
        objs.iter().filter(|n| !n.contains('.')).count(),
        1,
        "{objs:?}"
    );
    let t1 = root.join("trees/1");
    // Files are linked in parallel, so which file gets which copy varies; together they use
    // the object and its extra copy.
    let inodes: std::collections::HashSet<(u64, u64)> = (0..FILES)
        .map(|i| inode(&t1.join(format!("d{}/f{i}", i / 10_000))))
        .collect();
    assert_eq!(
        inodes.len(),
        2,
        "70 000 files should use the object and one extra copy"
    );

    ts(&root, ["import", s(&src), "--version", "2"]).success();
    eprintln!("import 2 done at {:?}", t0.elapsed());
    ts(&root, ["verify", "2", "--full"]).success();
    ts(&root, ["verify", "1"]).success();
    let objs = copies(&root);
    assert!(
        objs.iter().any(|n| n.ends_with(".2")),
        "140 000 links need three copies: {objs:?}"
    );
    eprintln!("link-limit test took {:?}", t0.elapsed());
}
