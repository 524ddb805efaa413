//! Staging by btrfs snapshot (src/store/root.rs, src/tree/restage.rs): on a loop-mounted btrfs in reflink mode, trees are
//! subvolumes with read-only snapshots, and an apply starts from the base's snapshot and makes
//! only what the delta changes. The result must be exactly the new tree, whatever was written
//! into the running tree, and crashes, reverts and gc must leave no subvolume behind.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// `treeswap --root ROOT ARGS...` in reflink mode (snapshots on), with extra environment.
fn tsr<I, S>(root: &Path, env: &[(&str, &str)], args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = ts_cmd();
    c.env("TREESWAP_PROTECT", "reflink").arg("--root").arg(root);
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args);
    run(&mut c)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A base tree and a new one that differ in every way a delta can: content, mode only,
/// owner only, a directory's mode and xattrs, types (file to directory, directory to
/// symlink), a removed directory with children, new nested directories, a device node, and
/// files replaced in place that shrink and lose an xattr, or grow and gain one and setuid.
fn common(t: TreeSpec) -> TreeSpec {
    t.dir("usr")
        .dir("usr/bin")
        .file("usr/bin/same", "unchanged\n")
        .mode(0o755)
        .dir("usr/share")
        .file("usr/share/big", vec![7u8; 200_000])
}

fn trees(env: &Env) -> (PathBuf, PathBuf) {
    let v1 = env.tree(
        "v1",
        &common(TreeSpec::new())
            .dir("etc")
            .xattr("user.note", "old")
            .file("etc/hostname", "one\n")
            .file("etc/mode", "m\n")
            .mode(0o644)
            .file("etc/owner", "o\n")
            .file("etc/becomes-dir", "f\n")
            .file("etc/shrinks", vec![1u8; 100_000])
            .xattr("user.gone", "1")
            .file("etc/grows", "g\n")
            .dir("etc/becomes-link")
            .file("etc/becomes-link/x", "x\n")
            .dir("var/old")
            .dir("var/old/deep")
            .file("var/old/deep/f", "gone\n"),
    );
    let v2 = env.tree(
        "v2",
        &common(TreeSpec::new())
            .dir("etc")
            .mode(0o750)
            .file("etc/hostname", "two\n")
            .file("etc/mode", "m\n")
            .mode(0o600)
            .file("etc/owner", "o\n")
            .owner(1000, 1000)
            .dir("etc/becomes-dir")
            .file("etc/becomes-dir/inside", "i\n")
            .file("etc/shrinks", "small\n")
            .file("etc/grows", vec![2u8; 150_000])
            .mode(0o4755)
            .xattr("user.new", "2")
            .symlink("etc/becomes-link", "../usr")
            .dir("var")
            .dir("var/new")
            .dir("var/new/deeper")
            .file("var/new/deeper/f", "new\n")
            .char_dev("var/new/null", 1, 3),
    );
    (v1, v2)
}

/// Fields drop in order: the file system is unmounted before its scratch directory goes.
struct Lab {
    _mnt: Mount,
    _env: Env,
    root: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    delta: PathBuf,
}

/// Writes the delta from version 1 (the tree `v1`) to version 2 (`v2`) to `out`.
fn diff(v1: &Path, v2: &Path, out: &Path, extra: &[&str]) {
    run(ts_cmd()
        .arg("diff")
        .args(extra)
        .args(["--from-dir", p(v1), "--to-dir", p(v2)])
        .args(["--from-version", "1", "--to-version", "2", "-o", p(out)]))
    .success();
}

/// `current` of `root` is exactly the tree `want`.
#[track_caller]
fn assert_current_is(root: &Path, want: &Path) {
    assert_same_tree(
        &snapshot(want),
        &snapshot(&fs::canonicalize(root.join("current")).unwrap()),
    );
}

/// After a failed apply of version 2: the lab's root is as it was before, version 1 current
/// with its snapshot, nothing of version 2 left, and the pool holding `pool_before`.
#[track_caller]
fn assert_as_before(root: &Path, pool_before: &[PathBuf]) {
    assert_clean(root, "2");
    assert_eq!(subvolumes(root), ["snapshots/1", "trees/1"]);
    assert_eq!(pool_files(root), pool_before);
    assert_eq!(
        fs::read_link(root.join("current")).unwrap(),
        Path::new("trees/1")
    );
}

fn lab() -> Lab {
    let env = Env::new();
    let mnt = Mount::btrfs_loop(&env.path("btrfs.img"), 320, &env.path("mnt"));
    let root = mnt.path.join("root");
    init_root(&root);
    let (v1, v2) = trees(&env);
    let delta = env.path("d.delta");
    diff(&v1, &v2, &delta, &[]);
    tsr(
        &root,
        &[],
        ["import", p(&v1), "--version", "1", "--activate"],
    )
    .success();
    Lab {
        _mnt: mnt,
        _env: env,
        root,
        v1,
        v2,
        delta,
    }
}

fn is_subvolume(path: &Path) -> bool {
    inode(path).1 == 256
}

fn subvolumes(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in ["trees", "snapshots", "staging"] {
        for n in names(&root.join(d)) {
            let path = root.join(d).join(bpath(&n));
            if is_subvolume(&path) {
                out.push(format!("{d}/{}", show(&n)));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn apply_starts_from_the_base_snapshot_and_makes_exactly_the_new_tree() {
    if skip_unless_root() {
        return;
    }
    let l = lab();
    let root = &l.root;
    assert_eq!(subvolumes(root), ["snapshots/1", "trees/1"]);
    // The snapshot is read-only.
    let err = fs::write(root.join("snapshots/1/etc/hostname"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // A guest writes into the running tree: none of it may reach the new tree.
    fs::write(root.join("current/etc/hostname"), "written by a guest\n").unwrap();
    fs::write(root.join("current/usr/bin/same"), "tampered\n").unwrap();
    fs::write(root.join("current/usr/extra"), "extra\n").unwrap();

    tsr(root, &[], ["-vv", "apply", p(&l.delta), "--no-restart"])
        .success()
        .stderr_has("from the snapshot of `1`");
    assert_current_is(root, &l.v2);
    assert_eq!(
        subvolumes(root),
        ["snapshots/1", "snapshots/2", "trees/1", "trees/2"]
    );
    tsr(root, &[], ["verify", "2", "--full"]).success();
    // The running tree kept its writes; its snapshot did not get them.
    assert_eq!(
        fs::read(root.join("trees/1/usr/extra")).unwrap(),
        b"extra\n"
    );
    assert_same_tree(&snapshot(&l.v1), &snapshot(&root.join("snapshots/1")));

    // Revert, then remove version 2 with gc: its tree and snapshot go.
    tsr(root, &[], ["revert", "--no-restart"]).success();
    tsr(root, &[], ["unpin", "2"]);
    run(ts_cmd()
        .env("TREESWAP_PROTECT", "reflink")
        .arg("--root")
        .arg(root)
        .args(["gc"]))
    .success();
    // `previous` is 2 after the revert, so gc keeps it; flip it away with a third import.
    assert!(root.join("trees/2").exists());
    tsr(
        root,
        &[],
        ["import", p(&l.v2), "--version", "3", "--activate"],
    )
    .success();
    tsr(root, &[], ["switch", "1", "--no-restart"]).success();
    tsr(root, &[], ["gc"]).success();
    assert_eq!(
        subvolumes(root),
        ["snapshots/1", "snapshots/3", "trees/1", "trees/3"]
    );
}

#[test]
fn without_snapshots_the_whole_tree_is_staged_with_the_same_result() {
    if skip_unless_root() {
        return;
    }
    let l = lab();
    tsr(
        &l.root,
        &[("TREESWAP_SNAPSHOTS", "0")],
        ["-vv", "apply", p(&l.delta), "--no-restart"],
    )
    .success()
    .stderr_lacks("from the snapshot");
    assert_current_is(&l.root, &l.v2);
}

#[test]
fn a_kill_while_staging_by_snapshot_leaves_nothing_and_the_next_apply_succeeds() {
    if skip_unless_root() {
        return;
    }
    for fp in [
        "stage-after-build",
        "stage-after-syncfs",
        "stage-before-commit",
        "stage-after-commit",
    ] {
        let l = lab();
        let root = &l.root;
        let r = tsr(
            root,
            &[("TREESWAP_FAILPOINT", fp)],
            ["apply", p(&l.delta), "--no-restart"],
        );
        assert_eq!(r.code(), None, "{fp}: the apply should have been killed");
        tsr(root, &[], ["boot"]);
        if fp == "stage-after-commit" {
            // Installed but not current: applying again just switches.
            assert_eq!(
                subvolumes(root),
                ["snapshots/1", "snapshots/2", "trees/1", "trees/2"]
            );
        } else {
            assert_clean(root, "2");
            assert_eq!(subvolumes(root), ["snapshots/1", "trees/1"], "{fp}");
        }
        assert_eq!(
            fs::read_link(root.join("current")).unwrap(),
            Path::new("trees/1")
        );
        tsr(root, &[], ["apply", p(&l.delta), "--no-restart"]).success();
        assert_current_is(root, &l.v2);
    }
}

#[test]
fn an_error_late_in_the_commit_leaves_the_root_as_it_was() {
    if skip_unless_root() {
        return;
    }
    let l = lab();
    let root = &l.root;
    let pool_before = pool_files(root);
    // After the manifest is named: before and after `syncfs`, and after the new tree's
    // read-only snapshot is taken; staged from the snapshot and staged whole.
    for snapshots in ["1", "0"] {
        for fp in [
            "stage-before-syncfs",
            "stage-after-syncfs",
            "stage-before-commit",
        ] {
            eprintln!("failing at {fp}, TREESWAP_SNAPSHOTS={snapshots}");
            let armed = format!("{fp}:error");
            let env = [
                ("TREESWAP_FAILPOINT", armed.as_str()),
                ("TREESWAP_SNAPSHOTS", snapshots),
            ];
            let r = tsr(root, &env, ["apply", p(&l.delta), "--no-restart"]);
            let r = r
                .exit(1)
                .stderr_has(&format!("an error injected at failpoint `{fp}`"));
            assert_eq!(
                r.stderr().lines().filter(|l| l.contains("error")).count(),
                1,
                "{fp}: {}",
                r.stderr()
            );
            assert_as_before(root, &pool_before);
        }
    }
    tsr(root, &[], ["verify", "1", "--full"]).success();
    tsr(root, &[], ["apply", p(&l.delta), "--no-restart"]).success();
    assert_current_is(root, &l.v2);
}

#[test]
fn a_delta_cut_short_while_staging_by_snapshot_leaves_the_root_as_it_was() {
    if skip_unless_root() {
        return;
    }
    let l = lab();
    let root = &l.root;
    // A plain tar, cut inside its last blob: the apply fails after the snapshot is taken and
    // while the manifest is being written.
    let plain = l.delta.with_extension("tar");
    diff(&l.v1, &l.v2, &plain, &["--uncompressed"]);
    let last = tar::Archive::new(fs::File::open(&plain).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().raw_header_position())
        .last()
        .unwrap();
    let cut = l.delta.with_extension("cut");
    fs::write(&cut, &fs::read(&plain).unwrap()[..last as usize + 512 + 4]).unwrap();
    let pool_before = pool_files(root);

    tsr(root, &[], ["-vv", "apply", p(&cut), "--no-restart"])
        .exit(8)
        .stderr_has("snapshot of `1` taken");
    assert_as_before(root, &pool_before);
    tsr(root, &[], ["verify", "1", "--full"]).success();

    tsr(root, &[], ["apply", p(&l.delta), "--no-restart"]).success();
    assert_current_is(root, &l.v2);
}

#[test]
fn patch_references_come_from_the_base_snapshot_and_from_the_pool_if_it_differs() {
    if skip_unless_root() {
        return;
    }
    // A patch against a base file, and a file whose mode alone changes: both need a content
    // of the base, which staging from the snapshot reads from the snapshot's own file.
    let env = Env::new();
    let mnt = Mount::btrfs_loop(&env.path("btrfs.img"), 320, &env.path("mnt"));
    let big = noise(300_000, 1);
    let mut edited = big.clone();
    edited[1000..1010].copy_from_slice(b"0123456789");
    let v1 = env.tree(
        "v1",
        &TreeSpec::new()
            .file("lib/big", big)
            .file("etc/mode", "same bytes\n")
            .mode(0o644),
    );
    let v2 = env.tree(
        "v2",
        &TreeSpec::new()
            .file("lib/big", edited)
            .file("etc/mode", "same bytes\n")
            .mode(0o600),
    );
    let delta = env.path("d.delta");
    diff(&v1, &v2, &delta, &[]);
    assert!(
        fs::metadata(&delta).unwrap().len() < 100_000,
        "the delta should carry a patch, not the whole file"
    );
    for tamper in [false, true] {
        let root = mnt.path.join(format!("root-{tamper}"));
        init_root(&root);
        tsr(
            &root,
            &[],
            ["import", p(&v1), "--version", "1", "--activate"],
        )
        .success();
        if tamper {
            // The snapshot's files no longer have the contents their pool objects have.
            let snap = root.join("snapshots/1");
            let prop = |ro: &str| {
                let st = std::process::Command::new("btrfs")
                    .args(["property", "set", "-ts", p(&snap), "ro", ro])
                    .status()
                    .unwrap();
                assert!(st.success());
            };
            prop("false");
            overwrite_in_place(&snap.join("lib/big"), &noise(300_000, 2));
            fs::write(snap.join("etc/mode"), "other bytes\n").unwrap();
            prop("true");
        }
        let r = tsr(&root, &[], ["-vv", "apply", p(&delta), "--no-restart"]);
        r.success().stderr_has("from the snapshot of `1`");
        let used = if tamper { 0 } else { 2 };
        r.stderr_has(&format!(
            "read {used} of the base's contents from its snapshot"
        ));
        assert_current_is(&root, &v2);
        tsr(&root, &[], ["verify", "2", "--full"]).success();
    }
}
