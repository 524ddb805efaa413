//! Copy-on-write protection of the pool on real file systems: after two trees share objects, a
//! write into a file of the running tree either fails (immutable) or stays in that tree
//! (reflink, private paths), and the other tree's file is unchanged. Hardlink mode offers no
//! protection, and `verify` reports the tampering.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Two versions that share `usr/bin/tool` and `etc/conf`.
fn two_versions(
    env: &Env,
    root: &Path,
    protect: &str,
    config: Option<&Path>,
) -> (PathBuf, PathBuf) {
    two_versions_with(env, root, protect, config, b"tool v1\n")
}

/// [`two_versions`] with `tool` as the content of `usr/bin/tool`.
fn two_versions_with(
    env: &Env,
    root: &Path,
    protect: &str,
    config: Option<&Path>,
    tool: &[u8],
) -> (PathBuf, PathBuf) {
    let v1 = env.tree(
        "v1",
        &TreeSpec::new()
            .dir("usr")
            .dir("usr/bin")
            .file("usr/bin/tool", tool)
            .mode(0o755)
            .dir("etc")
            .file("etc/conf", "setting = 1\n")
            .file("usr/bin/only1", "one"),
    );
    let v2 = env.tree(
        "v2",
        &TreeSpec::new()
            .dir("usr")
            .dir("usr/bin")
            .file("usr/bin/tool", tool)
            .mode(0o755)
            .dir("etc")
            .file("etc/conf", "setting = 1\n")
            .file("usr/bin/only2", "two"),
    );
    for (dir, v) in [(&v1, "1"), (&v2, "2")] {
        let mut c = ts_cmd();
        c.env("TREESWAP_PROTECT", protect).arg("--root").arg(root);
        if let Some(cfg) = config {
            c.arg("--config").arg(cfg);
        }
        c.args([
            "import",
            dir.to_str().unwrap(),
            "--version",
            v,
            "--activate",
            "--no-restart",
        ]);
        run(&mut c).success();
    }
    (root.join("trees/1"), root.join("trees/2"))
}

fn try_write(path: &Path) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(b"written through the running tree\n")
}

fn verify(root: &Path, v: &str) -> Run {
    let mut c = ts_cmd();
    c.arg("--root").arg(root).args(["verify", v, "--full"]);
    run(&mut c)
}

/// Clears immutable flags so that the scratch directory can be removed.
fn unprotect(root: &Path) {
    let _ = Command::new("chattr")
        .arg("-R")
        .arg("-i")
        .arg(root.join("pool"))
        .stderr(std::process::Stdio::null())
        .status();
}

fn mode_of(root: &Path) -> String {
    let mut c = ts_cmd();
    c.env("TREESWAP_PROTECT", "auto")
        .arg("--root")
        .arg(root)
        .args(["status", "--json"]);
    let r = run(&mut c);
    let v: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    v["protect"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn immutable_on_ext4_refuses_writes_through_a_tree() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let mnt = loop_fs(&env, "ext4");
    let root = mnt.path.join("root");
    init_root(&root);
    let (t1, t2) = two_versions(&env, &root, "auto", None);
    assert_eq!(mode_of(&root), "immutable");
    assert_eq!(
        inode(&t1.join("usr/bin/tool")),
        inode(&t2.join("usr/bin/tool"))
    );
    let err = try_write(&root.join("current/usr/bin/tool")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(fs::read(t1.join("usr/bin/tool")).unwrap(), b"tool v1\n");
    verify(&root, "1").success();
    verify(&root, "2").success();
    // gc can still remove a tree whose objects are immutable.
    let mut c = ts_cmd();
    c.env("TREESWAP_PROTECT", "auto")
        .arg("--root")
        .arg(&root)
        .args(["gc"]);
    run(&mut c).success();
    let mut c = ts_cmd();
    c.env("TREESWAP_PROTECT", "auto")
        .arg("--root")
        .arg(&root)
        .args(["revert", "--no-restart"]);
    run(&mut c).success();
    verify(&root, "1").success();
    unprotect(&root);
}

#[test]
fn many_names_of_one_immutable_object_are_linked_at_once() {
    if skip_unless_root() {
        return;
    }
    // 2 000 files with the same content (as Debian's `*.triggers` files are): staging threads
    // link the one object at the same time, each clearing and setting its immutable flag.
    let env = Env::new();
    let mnt = loop_fs(&env, "ext4");
    let root = mnt.path.join("root");
    init_root(&root);
    let mut spec = TreeSpec::new();
    for d in 0..40 {
        spec = spec.dir(format!("d{d}"));
        for f in 0..50 {
            spec = spec.file(format!("d{d}/f{f}.triggers"), "activate-noawait ldconfig\n");
        }
    }
    let dir = env.tree("same", &spec);
    let mut c = ts_cmd();
    c.env("TREESWAP_PROTECT", "immutable")
        .arg("--root")
        .arg(&root)
        .args(["import", dir.to_str().unwrap(), "--version", "1"]);
    run(&mut c).success();
    verify(&root, "1").success();
    let one = inode(&root.join("trees/1/d0/f0.triggers"));
    assert_eq!(inode(&root.join("trees/1/d39/f49.triggers")), one);
    let err = try_write(&root.join("trees/1/d7/f7.triggers")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    unprotect(&root);
}

/// The pool objects that can be opened for writing, which in immutable mode none can.
fn unprotected_objects(root: &Path) -> Vec<PathBuf> {
    pool_files(root)
        .into_iter()
        .filter(|f| {
            fs::OpenOptions::new()
                .append(true)
                .open(root.join("pool").join(f))
                .is_ok()
        })
        .collect()
}

#[test]
fn a_kill_while_an_object_is_unprotected_is_repaired_by_boot() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let mnt = loop_fs(&env, "ext4");
    let root = mnt.path.join("root");
    init_root(&root);
    two_versions(&env, &root, "immutable", None);
    assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new());
    let v3 = env.tree(
        "v3",
        &TreeSpec::new()
            .dir("etc")
            .file("etc/conf", "setting = 1\n")
            .file("new", "three"),
    );
    let ts = |failpoint: Option<&str>, args: &[&str]| {
        let mut c = ts_cmd();
        c.env("TREESWAP_PROTECT", "immutable")
            .arg("--root")
            .arg(&root)
            .args(args);
        if let Some(f) = failpoint {
            c.env("TREESWAP_FAILPOINT", f);
        }
        run(&mut c)
    };
    // Killed with an object's immutable flag cleared, while linking it: by `checkout` and by
    // `import` (which `apply` shares).
    let dest = env.path("checkout");
    let dest2 = env.path("checkout2");
    let cases: [(&str, Vec<&str>); 2] = [
        ("checkout", vec!["checkout", "1", dest.to_str().unwrap()]),
        (
            "import",
            vec!["import", v3.to_str().unwrap(), "--version", "3"],
        ),
    ];
    for (what, args) in cases {
        let r = ts(Some("pool-link-unprotected"), &args);
        assert_eq!(
            r.code(),
            None,
            "{what} should have been killed: {}",
            r.stderr()
        );
        assert!(
            !unprotected_objects(&root).is_empty(),
            "{what}: the kill should have left an object unprotected"
        );
        ts(None, &["boot"])
            .success()
            .stderr_has("re-protected 1 pool object(s)");
        assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new(), "{what}");
    }
    // Regression (issue 15, 6b): killed again, and the next command is a writer, not `boot`.
    // It used to clear the record and leave the object writable for good; whoever sees the
    // record re-protects first.
    let r = ts(
        Some("pool-link-unprotected"),
        &["checkout", "1", dest2.to_str().unwrap()],
    );
    assert_eq!(
        r.code(),
        None,
        "checkout should have been killed: {}",
        r.stderr()
    );
    assert!(!unprotected_objects(&root).is_empty());
    // On the root's file system: a checkout is a farm of hardlinks.
    let dest3 = root.parent().unwrap().join("checkout3");
    ts(None, &["checkout", "1", dest3.to_str().unwrap()])
        .success()
        .stderr_has("re-protected 1 pool object(s)");
    assert_eq!(
        unprotected_objects(&root),
        Vec::<PathBuf>::new(),
        "after a writer"
    );
    let err = try_write(&root.join("current/usr/bin/tool")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    unprotect(&root);
}

/// One extent of a file, as FIEMAP reports it (`filefrag -v`), in file system blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extent {
    logical: u64,
    physical: u64,
    len: u64,
    /// `FIEMAP_EXTENT_SHARED`: other files use these blocks too.
    shared: bool,
}

/// The extents of `path` after an fsync (`filefrag -s -v`).
fn extents(path: &Path) -> Vec<Extent> {
    let out = Command::new("filefrag")
        .args(["-s", "-v"])
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "filefrag {}: {text}", path.display());
    // ` ext: logical_offset: physical_offset: length: expected: flags:`, e.g.
    // `   0:        0..      63:      33024..     33087:     64:             last,shared,eof`
    let start = |range: &str| -> u64 {
        let a = range.split("..").next().unwrap().trim();
        a.parse().unwrap_or_else(|_| panic!("filefrag: `{range}`"))
    };
    let mut found = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 5 || f[0].trim().parse::<u64>().is_err() {
            continue;
        }
        found.push(Extent {
            logical: start(f[1]),
            physical: start(f[2]),
            len: f[3].trim().parse().unwrap(),
            shared: f[f.len() - 1].split(',').any(|x| x.trim() == "shared"),
        });
    }
    assert!(!found.is_empty(), "filefrag found no extent:\n{text}");
    found
}

/// `a` and `b` are the same blocks: every extent is at the same place and marked shared.
#[track_caller]
fn assert_same_blocks(a: &Path, b: &Path, what: &str) {
    let (ea, eb) = (extents(a), extents(b));
    assert!(
        ea == eb && ea.iter().all(|e| e.shared),
        "{what}: {} and {} do not share their blocks:\n{ea:?}\n{eb:?}",
        a.display(),
        b.display()
    );
}

/// The extent of `path` that holds block `block`.
fn extent_at(path: &Path, block: u64) -> Extent {
    extents(path)
        .into_iter()
        .find(|e| e.logical <= block && block < e.logical + e.len)
        .unwrap_or_else(|| panic!("{}: no extent at block {block}", path.display()))
}

/// Regression (issue 15, item 12): with 8-byte files, which btrfs keeps inline in the
/// metadata, a plain copy passed this test as well as a reflink. With 256 KiB of data, FIEMAP
/// shows the trees' files share the pool object's blocks, and a write keeps its blocks private.
#[test]
fn reflink_on_xfs_and_btrfs_keeps_writes_private() {
    if skip_unless_root() {
        return;
    }
    let tool = noise(256 << 10, 7);
    for kind in ["xfs", "btrfs"] {
        let env = Env::new();
        let mnt = loop_fs(&env, kind);
        let root = mnt.path.join("root");
        init_root(&root);
        let (t1, t2) = two_versions_with(&env, &root, "auto", None, &tool);
        assert_eq!(mode_of(&root), "reflink", "{kind}");
        // Separate inodes, sharing blocks.
        assert_ne!(
            inode(&t1.join("usr/bin/tool")),
            inode(&t2.join("usr/bin/tool"))
        );
        let object = root.join("pool").join(
            pool_files(&root)
                .into_iter()
                .find(|p| fs::read(root.join("pool").join(p)).is_ok_and(|b| b == tool))
                .expect("the pool object of usr/bin/tool"),
        );
        for t in [&t1, &t2] {
            assert_same_blocks(&object, &t.join("usr/bin/tool"), kind);
        }
        // The check tells a reflink from a plain copy (bytes read and written).
        let plain = mnt.path.join("plain-copy");
        fs::write(&plain, fs::read(&object).unwrap()).unwrap();
        let (p0, o0) = (extent_at(&plain, 0), extent_at(&object, 0));
        assert!(
            !p0.shared && p0.physical != o0.physical,
            "{kind}: a plain copy looks shared: {p0:?}, the object {o0:?}"
        );

        // An append, and a write over the first 64 KiB.
        try_write(&root.join("current/usr/bin/tool")).unwrap();
        overwrite_in_place(&root.join("current/usr/bin/tool"), &[0x5a; 64 << 10]);
        assert_eq!(fs::read(t1.join("usr/bin/tool")).unwrap(), tool, "{kind}");
        let pool_copy = pool_files(&root)
            .into_iter()
            .filter(|p| fs::read(root.join("pool").join(p)).is_ok_and(|b| b == tool))
            .count();
        assert_eq!(pool_copy, 1, "{kind}: the pool object is unchanged");
        // The written blocks are the tree's own; the other tree still shares the object's.
        let (w0, o0) = (
            extent_at(&t2.join("usr/bin/tool"), 0),
            extent_at(&object, 0),
        );
        assert!(
            !w0.shared && w0.physical != o0.physical,
            "{kind}: the written blocks are still the object's: {w0:?}, the object {o0:?}"
        );
        assert!(
            o0.shared,
            "{kind}: the object no longer shares its blocks: {o0:?}"
        );
        assert_same_blocks(&object, &t1.join("usr/bin/tool"), kind);
        verify(&root, "1").success();
        verify(&root, "2")
            .exit(3)
            .stdout_has("modified: usr/bin/tool (content)");
        drop(mnt);
    }
}

#[test]
fn private_paths_get_writable_copies() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let mnt = loop_fs(&env, "ext4");
    let root = mnt.path.join("root");
    init_root(&root);
    let cfg = env.path("treeswap.toml");
    fs::write(&cfg, "private = [\"/etc/**\"]\n").unwrap();
    let (t1, t2) = two_versions(&env, &root, "immutable", Some(&cfg));
    // /etc is a private copy: writable, and the other tree's file is unchanged.
    try_write(&root.join("current/etc/conf")).unwrap();
    assert_eq!(fs::read(t1.join("etc/conf")).unwrap(), b"setting = 1\n");
    assert!(
        fs::read(t2.join("etc/conf"))
            .unwrap()
            .ends_with(b"running tree\n")
    );
    // Elsewhere the objects stay immutable.
    assert!(try_write(&root.join("current/usr/bin/tool")).is_err());
    verify(&root, "1").success();
    verify(&root, "2")
        .exit(3)
        .stdout_has("modified: etc/conf (content)");
    unprotect(&root);
}

#[test]
fn hardlink_mode_offers_no_protection_and_verify_reports_it() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let root = env.root.clone();
    let (t1, _) = two_versions(&env, &root, "hardlink", None);
    try_write(&root.join("current/usr/bin/tool")).unwrap();
    assert!(
        fs::read(t1.join("usr/bin/tool"))
            .unwrap()
            .ends_with(b"running tree\n")
    );
    verify(&root, "1").exit(3).stdout_has("is corrupt");
}

/// `gc_before_apply = true`: an apply that does not fit runs gc first (keeping current,
/// previous and the delta's base), says so, and then fits.
#[test]
fn gc_before_apply_makes_room() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    // Three 10 MiB trees fill it to 31 MiB free: the fourth (a 10 MiB object, its 10 MiB
    // blob spooled while it is decoded, and the margin) needs about 37 MiB; gc frees 10.
    let mnt = Mount::tmpfs(&env.path("small"), "62m");
    let root = mnt.path.join("root");
    init_root(&root);
    let random = |n: usize, seed: u64| -> Vec<u8> {
        let mut x = seed * 2 + 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut trees = Vec::new();
    for v in 1..=4u64 {
        trees.push(env.tree(
            &format!("t{v}"),
            &TreeSpec::new().file("big", random(10 << 20, v)),
        ));
    }
    for v in 1..=3 {
        ts(
            &root,
            [
                "import",
                trees[v - 1].to_str().unwrap(),
                "--version",
                &v.to_string(),
                "--no-restart",
            ],
        )
        .success();
    }
    ts(&root, ["switch", "2", "--no-restart"]).success();
    ts(&root, ["switch", "3", "--no-restart"]).success();
    let delta = env.path("3-4.delta");
    let mut c = ts_cmd();
    c.arg("diff")
        .arg("--from-dir")
        .arg(&trees[2])
        .arg("--to-dir")
        .arg(&trees[3])
        .args([
            "--from-version",
            "3",
            "--to-version",
            "4",
            "--level",
            "1",
            "-o",
        ])
        .arg(&delta);
    run(&mut c).success();
    // Without gc_before_apply: refused for space.
    ts(&root, ["apply", delta.to_str().unwrap(), "--no-restart"])
        .exit(9)
        .stderr_has("missing");
    let cfg = env.path("gc.toml");
    fs::write(&cfg, "gc_before_apply = true\n").unwrap();
    let mut c = ts_cmd();
    c.arg("--root").arg(&root).arg("--config").arg(&cfg).args([
        "apply",
        delta.to_str().unwrap(),
        "--no-restart",
    ]);
    run(&mut c).success().stderr_has("running gc first");
    assert!(
        !root.join("trees/1").exists(),
        "gc removed the unprotected tree"
    );
    assert!(root.join("trees/3").exists(), "the delta's base stays");
    verify(&root, "4").success();
}

/// A root on a loop-mounted ext4 with versions 1 and 2 imported in immutable mode, and its
/// pool's objects (every one immutable).
fn immutable_root_on_ext4(env: &Env) -> (Mount, PathBuf, Vec<PathBuf>) {
    let mnt = loop_fs(env, "ext4");
    let root = mnt.path.join("root");
    init_root(&root);
    two_versions(env, &root, "immutable", None);
    let all = pool_files(&root);
    assert!(!all.is_empty());
    assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new());
    (mnt, root, all)
}

/// treeswap on `root` in protection mode `protect`, killed at `failpoint` if one is given.
fn ts_in(root: &Path, protect: &str, failpoint: Option<&str>, args: &[&str]) -> Run {
    let mut c = ts_cmd();
    c.env("TREESWAP_PROTECT", protect)
        .arg("--root")
        .arg(root)
        .args(args);
    if let Some(f) = failpoint {
        c.env("TREESWAP_FAILPOINT", f);
    }
    run(&mut c)
}

/// Regression (issue 16, review 8): a pool made in immutable mode keeps its flags when the
/// root is written in another mode (overlay guests came, or `hardlink` was chosen): the
/// kernel refused to link those objects, so the first checkout failed. The first writer in
/// the new mode clears every flag, once; a writer in immutable mode sets them all again.
#[test]
fn a_pool_made_immutable_follows_a_change_of_mode() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let (_mnt, root, all) = immutable_root_on_ext4(&env);
    let ts = |protect: &str, args: &[&str]| ts_in(&root, protect, None, args);
    let dest = |name: &str| root.parent().unwrap().join(name);
    let d1 = dest("checkout1");
    ts("hardlink", &["checkout", "1", d1.to_str().unwrap()])
        .success()
        .stderr_has(&format!(
            "cleared the immutable flag of {} pool object(s)",
            all.len()
        ));
    assert_eq!(unprotected_objects(&root), all);
    try_write(&d1.join("etc/conf")).expect("a hardlink-mode tree is writable");
    // Once: the next writer finds the record and sweeps nothing.
    let d2 = dest("checkout2");
    let r = ts("hardlink", &["checkout", "2", d2.to_str().unwrap()]);
    r.success();
    assert!(
        !r.stderr().contains("cleared the immutable"),
        "{}",
        r.stderr()
    );
    // Back to immutable: every object gets its flag again before anything is linked.
    let d3 = dest("checkout3");
    ts("immutable", &["checkout", "2", d3.to_str().unwrap()])
        .success()
        .stderr_has(&format!(
            "set the immutable flag on {} pool object(s)",
            all.len()
        ));
    assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new());
    // A boot in hardlink mode clears them again only when a writer or a guest needs it;
    // one in immutable mode after a sweep re-protects.
    ts(
        "hardlink",
        &["checkout", "1", dest("checkout4").to_str().unwrap()],
    )
    .success();
    assert_eq!(unprotected_objects(&root), all);
    ts("immutable", &["boot"])
        .success()
        .stderr_has("set the immutable flag on");
    assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new());
    unprotect(&root);
}

/// Review of the change of mode above: killed midway through either sweep, the next writer
/// in either mode does the whole pool (the record is written before the sweep).
#[test]
fn a_kill_midway_through_a_change_of_mode_is_finished_by_the_next_writer() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let (_mnt, root, all) = immutable_root_on_ext4(&env);
    assert!(all.len() >= 3, "{all:?}");
    let ts = |protect: &str, failpoint: Option<&str>, args: &[&str]| {
        ts_in(&root, protect, failpoint, args)
    };
    let dest = |name: &str| root.parent().unwrap().join(name);
    let d = |name: &str| dest(name).to_str().unwrap().to_owned();
    // Killed clearing the flags: one object without it, the others still immutable.
    let r = ts(
        "hardlink",
        Some("pool-flags-midway"),
        &["checkout", "1", &d("c1")],
    );
    assert_eq!(
        r.code(),
        None,
        "checkout should have been killed: {}",
        r.stderr()
    );
    assert_eq!(unprotected_objects(&root).len(), 1);
    // An immutable writer next: every object protected again.
    ts("immutable", None, &["checkout", "1", &d("c2")]).success();
    assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new());
    // Killed again midway, then a hardlink writer: every flag cleared.
    let r = ts(
        "hardlink",
        Some("pool-flags-midway"),
        &["checkout", "1", &d("c3")],
    );
    assert_eq!(r.code(), None, "{}", r.stderr());
    ts("hardlink", None, &["checkout", "1", &d("c4")]).success();
    assert_eq!(unprotected_objects(&root), all);
    // Killed setting the flags after that sweep; `boot` in hardlink mode clears them again,
    // and one in immutable mode sets them all.
    let r = ts(
        "immutable",
        Some("pool-flags-midway"),
        &["checkout", "1", &d("c5")],
    );
    assert_eq!(r.code(), None, "{}", r.stderr());
    assert_eq!(unprotected_objects(&root).len(), all.len() - 1);
    ts("hardlink", None, &["boot"]).success();
    assert_eq!(unprotected_objects(&root), all);
    ts("immutable", None, &["boot"]).success();
    assert_eq!(unprotected_objects(&root), Vec::<PathBuf>::new());
    unprotect(&root);
}
