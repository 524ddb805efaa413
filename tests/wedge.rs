//! Guests and leftovers that must not wedge a state root (issue 15, item 4): whatever an
//! unprivileged guest makes in its tree, removing the tree later works with a bounded number
//! of descriptors, and a leftover that cannot be removed is set aside with a warning instead
//! of failing every later command.
//!
//! Every test here is root-only: loop mounts, `setpriv` to uid 65534, `chattr`, bind mounts.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `treeswap --root ROOT ARGS...` with at most 1024 open descriptors (the default soft limit
/// a boot unit that sets none runs under) and the protection mode `protect`.
fn ts_limited(root: &Path, protect: &str, args: &[&str]) -> Run {
    ts_nofile(root, protect, 1024, args)
}

/// [`ts_limited`] with at most `nofile` open descriptors.
fn ts_nofile(root: &Path, protect: &str, nofile: u32, args: &[&str]) -> Run {
    let mut c = Command::new("prlimit");
    c.arg(format!("--nofile={nofile}:{nofile}"))
        .args(["--", BIN])
        .env_remove("TREESWAP_ROOT")
        .env("TREESWAP_PROTECT", protect)
        .arg("--root")
        .arg(root)
        .args(args);
    run(&mut c)
}

/// A guest's tree: a world-writable sticky `tmp/` (as `/tmp` is) and a file naming `n`.
fn guest_tree(env: &Env, n: u32) -> PathBuf {
    env.tree(
        &format!("src{n}"),
        &TreeSpec::new()
            .dir("etc")
            .file("etc/version", format!("{n}\n"))
            .dir("tmp")
            .mode(0o1777),
    )
}

/// Runs `script` with `sh` as uid and gid 65534 with no groups, in the directory `dir` (entered
/// as root, so that the scratch directory's own permissions do not matter).
fn as_nobody(dir: &Path, script: &str) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
        ])
        .current_dir(dir)
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "the unprivileged guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a guest makes in its `/tmp`: an 1100-deep chain of directories, with a file and a
/// FIFO at the bottom (on btrfs the test adds a subvolume of the guest's own).
const DEEP_CHAIN: &str = r#"
set -e
i=0
while [ $i -lt 1100 ]; do mkdir d; cd d; i=$((i+1)); done
echo x > f
mkfifo p
"#;

/// Regression (issue 15, item 4): an unprivileged guest's 1100-deep chain of directories in
/// its tree's `/tmp` made removing the tree fail with EMFILE under `ulimit -n 1024`, left
/// `staging/.gc-1`, and from then on every `gc`, `boot`, `apply` and `import` failed. On
/// btrfs a subvolume the guest made inside a tree that is itself a subvolume made the
/// subvolume deletion fail (ENOTEMPTY) the same way, and a subvolume inside one the guest
/// made read-only could not be deleted at all (EROFS).
#[test]
fn a_guests_deep_tree_does_not_wedge_the_root() {
    if skip_unless_root() {
        return;
    }
    for (kind, protect) in [
        ("ext4", "hardlink"),
        ("xfs", "hardlink"),
        ("btrfs", "hardlink"),
        ("btrfs", "reflink"),
    ] {
        let env = Env::new();
        let mnt = loop_fs(&env, kind);
        let root = mnt.path.join("root");
        let ts = |args: &[&str]| ts_limited(&root, protect, args);
        let what = format!("{kind}, {protect}");
        let src: Vec<PathBuf> = (1..=4).map(|n| guest_tree(&env, n)).collect();
        ts(&["init"]).success();
        ts(&["import", s(&src[0]), "--version", "1", "--activate"]).success();

        // The guest, running on tree 1, fills its /tmp.
        let tmp = root.join("trees/1/tmp");
        let mut script = DEEP_CHAIN.to_owned();
        if kind == "btrfs" {
            script.push_str("btrfs subvolume create ../../sv >/dev/null\necho y > ../../sv/g\n");
            script.push_str("mkdir ../../sv/deep\n");
            // A subvolume in it, and then the outer one made read-only (its owner may).
            script.push_str("btrfs subvolume create ../../sv/inner >/dev/null\n");
            script.push_str("echo z > ../../sv/inner/f\n");
            script.push_str("btrfs property set -ts ../../sv ro true\n");
        }
        as_nobody(&tmp, &script);
        assert!(
            tmp.join("d/d/d").is_dir(),
            "{what}: the guest made no chain"
        );

        for (n, dir) in [(2, &src[1]), (3, &src[2])] {
            let v = n.to_string();
            ts(&["import", s(dir), "--version", &v, "--activate"]).success();
        }
        // Tree 1 is neither current nor previous now: gc removes it, and with far fewer
        // descriptors than the chain is deep (the walk keeps a fixed number open).
        let r = ts_nofile(&root, protect, 64, &["gc"]);
        r.success().stderr_lacks("warning");
        assert!(
            !root.join("trash").exists(),
            "{what}: something was set aside"
        );
        assert!(
            r.stdout().contains("(1)"),
            "{what}: gc should have removed tree 1: {}",
            r.stdout()
        );
        assert!(
            !root.join("trees/1").exists(),
            "{what}: trees/1 is still there"
        );
        assert!(
            names(&root.join("staging")).is_empty(),
            "{what}: staging/ should be empty, has {:?}",
            names(&root.join("staging"))
        );
        ts(&["gc"]).success();
        ts(&["boot"]).success();
        let delta = env.path("3-4.tar");
        run(ts_cmd().args([
            "diff",
            "--uncompressed",
            "--from-dir",
            s(&src[2]),
            "--to-dir",
            s(&src[3]),
            "--from-version",
            "3",
            "--to-version",
            "4",
            "-o",
            s(&delta),
        ]))
        .success();
        ts(&["apply", s(&delta), "--no-restart"]).success();
        assert_eq!(
            fs::read_to_string(root.join("current/etc/version")).unwrap(),
            "4\n",
            "{what}"
        );
        ts(&["verify", "--full"]).success();
        drop(mnt);
    }
}

/// Whether `lsattr` shows the immutable flag on `p`.
fn is_immutable(p: &Path) -> bool {
    let out = Command::new("lsattr").arg("-d").arg(p).output().unwrap();
    assert!(out.status.success(), "lsattr {} failed", p.display());
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().unwrap_or("").contains('i')
}

/// `chattr +i` or `-i` on `p`.
fn chattr(flag: &str, p: &Path) {
    let st = Command::new("chattr").arg(flag).arg(p).status().unwrap();
    assert!(st.success(), "chattr {flag} {} failed", p.display());
}

/// Regression (issue 15, item 4): a leftover in `staging/` that cannot be removed (here a
/// directory holding an immutable directory with a file in it) made every writer fail at
/// its lock. It is set aside in `trash/` with one warning; `apply`, `gc` and `boot` go on;
/// gc and boot say what `trash/` still holds, and a later run removes it once it can.
/// On ext4, XFS and btrfs (tmpfs does not take the immutable flag).
#[test]
fn an_unremovable_leftover_is_set_aside_and_commands_go_on() {
    if skip_unless_root() {
        return;
    }
    for kind in ["ext4", "xfs", "btrfs"] {
        unremovable_leftover_on(kind);
    }
}

fn unremovable_leftover_on(kind: &str) {
    let env = Env::new();
    let mnt = loop_fs(&env, kind);
    let root = mnt.path.join("root");
    let ts = |args: &[&str]| ts_limited(&root, "hardlink", args);
    let src: Vec<PathBuf> = (1..=2).map(|n| guest_tree(&env, n)).collect();
    ts(&["init"]).success();
    ts(&["import", s(&src[0]), "--version", "1", "--activate"]).success();

    let locked = root.join("staging/.gc-9/locked");
    fs::create_dir_all(&locked).unwrap();
    fs::write(locked.join("f"), "x").unwrap();
    chattr("+i", &locked);
    let guard = scopeguard(&locked);

    let r = ts(&["import", s(&src[1]), "--version", "2", "--activate"]);
    r.success()
        .stderr_has("cannot remove `staging/.gc-9`")
        .stderr_has("trash/");
    assert_eq!(
        r.stderr().lines().count(),
        1,
        "one warning line: {}",
        r.stderr()
    );
    assert!(names(&root.join("staging")).is_empty());
    drop(guard);
    assert_eq!(names(&root.join("trash")), [b"1".to_vec()]);
    // The guard follows the directory to where it was set aside.
    let unlock = scopeguard(&root.join("trash/1/locked"));
    // The file it could not unlink was not made immutable on the way.
    assert!(
        !is_immutable(&root.join("trash/1/locked/f")),
        "removal made `locked/f` immutable"
    );
    // Other writers retry quietly.
    let delta = env.path("2-1.tar");
    run(ts_cmd().args([
        "diff",
        "--uncompressed",
        "--from-dir",
        s(&src[1]),
        "--to-dir",
        s(&src[0]),
        "--from-version",
        "2",
        "--to-version",
        "3",
        "-o",
        s(&delta),
    ]))
    .success();
    let r = ts(&["apply", s(&delta), "--no-restart"]);
    r.success().stderr_lacks("trash");
    // gc and boot keep saying it.
    ts(&["gc"]).success().stderr_has("trash/");
    ts(&["boot"]).success().stderr_has("trash/");
    ts(&["verify", "--full"]).success();

    // Once it can be removed, the next writer removes it.
    drop(unlock);
    ts(&["gc"]).success().stderr_lacks("trash");
    assert!(names(&root.join("trash")).is_empty());
    drop(mnt);
}

/// Clears the immutable flag of a directory when dropped (so that the scratch directory can
/// be removed even when the test fails).
struct Unlock(PathBuf);

impl Drop for Unlock {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn scopeguard(p: &Path) -> Unlock {
    Unlock(p.to_owned())
}

/// Regression (issue 15, item 4): a mount point left in `staging/` (here a bind mount) was
/// walked into: the files of the mounted directory were deleted, then the removal failed
/// (EBUSY) and so did every later writer. Removal never descends into another mount; the
/// mount point, which cannot be renamed either, stays with a warning, and commands go on.
#[test]
fn a_mount_point_in_staging_is_left_alone_and_commands_go_on() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let root = env.root.clone();
    let ts = |args: &[&str]| ts_limited(&root, "hardlink", args);
    let src: Vec<PathBuf> = (1..=2).map(|n| guest_tree(&env, n)).collect();
    ts(&["init"]).success();
    ts(&["import", s(&src[0]), "--version", "1", "--activate"]).success();
    let outside = env.path("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), "keep me").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = Mount::new(&["--bind", s(&outside)], &root.join("staging/m"));

    let r = ts(&["import", s(&src[1]), "--version", "2", "--activate"]);
    r.success().stderr_has("staging/m");
    assert_eq!(
        fs::read_to_string(outside.join("precious")).unwrap(),
        "keep me",
        "removal went into the bind mount"
    );
    ts(&["gc"]).success();
    ts(&["boot"]).success();
    assert_eq!(
        fs::read_to_string(outside.join("precious")).unwrap(),
        "keep me"
    );
    drop(mnt);
    // Unmounted, the leftover goes.
    ts(&["gc"]).success();
    let left: Vec<_> = names(&root.join("staging"))
        .into_iter()
        .chain(names(&root.join("trash")))
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}

/// What else a guest can make in its `/tmp`: wide directories of deep branches (more than the
/// walk keeps open, so it climbs back by `..` many times), thousands of names in one
/// directory, names of 255 bytes, symlinks to outside the root, FIFOs, sockets, hardlinks,
/// and directories with no permissions at all.
const ODD_FILES: &str = r#"
set -e
for b in 0 1 2 3 4 5 6 7 8 9 10 11; do
  (mkdir -p w/$b; cd w/$b
   i=0; while [ $i -lt 20 ]; do mkdir d; echo $i > f$i; cd d; i=$((i+1)); done)
done
mkdir many; cd many
i=0; while [ $i -lt 3000 ]; do : > $i; i=$((i+1)); done
cd ..
long=$(printf 'n%.0s' $(seq 255))
mkdir $long; mkdir $long/$long; echo x > $long/$long/$long
ln -s "$OUTSIDE" out
ln -s "$OUTSIDE/precious" out-file
mkdir -p locked/inner; echo x > locked/inner/f; ln locked/inner/f hard
chmod 000 locked/inner locked
mkfifo fifo
python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind("sock")' 2>/dev/null || true
"#;

/// Removing a tree that holds everything [`ODD_FILES`] makes works under `ulimit -n 1024`,
/// follows none of the symlinks, and leaves nothing behind, on ext4, XFS and btrfs (loop
/// mounts); then `boot`, the next `apply` and `gc` succeed.
#[test]
fn a_guests_odd_files_are_removed_and_nothing_outside() {
    if skip_unless_root() {
        return;
    }
    for kind in ["ext4", "xfs", "btrfs"] {
        let env = Env::new();
        let mnt = loop_fs(&env, kind);
        let root = mnt.path.join("root");
        let ts = |args: &[&str]| ts_limited(&root, "hardlink", args);
        let src: Vec<PathBuf> = (1..=4).map(|n| guest_tree(&env, n)).collect();
        ts(&["init"]).success();
        ts(&["import", s(&src[0]), "--version", "1", "--activate"]).success();
        let outside = env.path("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), "keep me").unwrap();
        let script = format!("OUTSIDE='{}'\n{ODD_FILES}", s(&outside));
        as_nobody(&root.join("trees/1/tmp"), &script);
        assert!(root.join("trees/1/tmp/many/2999").exists(), "{kind}");
        assert!(
            root.join("trees/1/tmp/w/11/d/d/d/d/d/d/d/d/d/d/f10")
                .exists()
        );
        ts(&["import", s(&src[1]), "--version", "2", "--activate"]).success();
        ts(&["import", s(&src[2]), "--version", "3", "--activate"]).success();
        let r = ts(&["gc"]);
        r.success().stderr_lacks("warning");
        assert!(r.stdout().contains("(1)"), "{kind}: {}", r.stdout());
        assert!(!root.join("trees/1").exists(), "{kind}");
        assert!(names(&root.join("staging")).is_empty(), "{kind}");
        assert!(!root.join("trash").exists(), "{kind}");
        assert_eq!(names(&outside), [b"precious".to_vec()], "{kind}");
        assert_eq!(
            fs::read_to_string(outside.join("precious")).unwrap(),
            "keep me",
            "{kind}"
        );
        ts(&["boot"]).success();
        let delta = env.path("3-4.tar");
        diff_from_dirs(&src[2], &src[3], "3", "4", &delta).success();
        ts(&["apply", s(&delta), "--no-restart"]).success();
        assert_eq!(
            fs::read_to_string(root.join("current/etc/version")).unwrap(),
            "4\n",
            "{kind}"
        );
        ts(&["gc"]).success();
        ts(&["verify", "--full"]).success();
        drop(mnt);
    }
}
