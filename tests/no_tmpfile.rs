//! A state root on a file system without `O_TMPFILE` (issue 15, item 11): pool objects are
//! then written to named temporary files in `tmp/` (`fs::file::TmpFile`'s fallback) and given
//! their name when complete. The file system here is ext4 served by FUSE (`fuse2fs`, Debian
//! package `fuse2fs`, which `scripts/test.sh` installs): a real file system with hardlinks but
//! neither `O_TMPFILE` nor `RENAME_NOREPLACE`, as FUSE file systems whose daemon does not
//! implement them are. Import and apply work there, leave no temporary name after success,
//! and after a kill while a temporary file is being written the next command removes what
//! was left; every object left in the pool is complete.
//!
//! Root-only: mounting.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The failpoint in `TmpFile::publish`: a temporary object is complete and not yet named.
const POINT: &str = "tmpfile-before-publish";

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// An ext4 image of 256 MiB in the scratch directory, served by `fuse2fs` at `mnt-fuse`.
fn fuse2fs(env: &Env) -> Mount {
    let image = env.path("fuse.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .expect("run mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 failed");
    let path = env.path("mnt-fuse");
    fs::create_dir(&path).unwrap();
    let st = Command::new("fuse2fs")
        .arg(&image)
        .arg(&path)
        .status()
        .expect("run fuse2fs (Debian package fuse2fs)");
    assert!(st.success(), "fuse2fs failed");
    Mount { path }
}

/// The prefix of the names FUSE's high-level library gives a removed file that is still open
/// (`hard_remove` off, the default): the name goes at the file's release, which the kernel
/// sends after `close` returns. A temporary object's name is removed while it is open (it
/// stays open to be protected), so such names show in `tmp/` for a moment, and where the
/// library loses the race between the release and the hiding rename (seen once in a few
/// runs) one stays, until the next writer empties `tmp/` at its lock as it does for every
/// leftover.
const FUSE_HIDDEN: &str = ".fuse_hidden";

/// The names in `root/tmp`, waiting (at most 5 s) for FUSE's hidden names to go.
fn tmp_names(root: &Path) -> Vec<String> {
    let start = std::time::Instant::now();
    loop {
        let v: Vec<String> = names(&root.join("tmp")).iter().map(|n| show(n)).collect();
        if !v.iter().any(|n| n.starts_with(FUSE_HIDDEN))
            || start.elapsed() > std::time::Duration::from_secs(5)
        {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The names in `root/tmp` that treeswap made ([`tmp_names`] but FUSE's hidden ones).
fn made_names(root: &Path) -> Vec<String> {
    let mut v = tmp_names(root);
    v.retain(|n| !n.starts_with(FUSE_HIDDEN));
    v
}

/// `count` files of distinct content (some large enough for several writes) in a new tree
/// `name`, with `tag` in each.
fn tree(env: &Env, name: &str, count: usize, tag: &str) -> PathBuf {
    let mut spec = TreeSpec::new().file("etc/version", format!("{tag}\n"));
    for i in 0..count {
        let len = if i % 4 == 0 { 300 << 10 } else { 100 };
        let mut data = noise(len, i as u64);
        data.extend_from_slice(format!("{tag} {i}\n").as_bytes());
        spec = spec.file(format!("usr/lib/f{i}"), data);
    }
    env.tree(name, &spec)
}

/// `treeswap --root ROOT ARGS` with `TREESWAP_FAILPOINT=point` (none if empty).
fn ts_fail(root: &Path, point: &str, args: &[&str]) -> Run {
    let mut c = ts_cmd();
    if !point.is_empty() {
        c.env("TREESWAP_FAILPOINT", point);
    }
    c.arg("--root").arg(root).args(args);
    run(&mut c)
}

/// Regression (issue 15, item 11): the named-temporary-file fallback for file systems without
/// `O_TMPFILE` was never exercised, and did not work: it gave a temporary object its name
/// with `renameat2(RENAME_NOREPLACE)`, which such a file system (FUSE) refuses with `EINVAL`,
/// so the first object of every import and apply failed ("cannot publish object"). Now a
/// name is given with a hardlink where there is no `RENAME_NOREPLACE` (a link never replaces
/// either), and the temporary name removed.
#[test]
fn import_and_apply_work_without_o_tmpfile_and_leave_no_temporary_names() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let mnt = fuse2fs(&env);
    // The file system lacks O_TMPFILE (else this would test nothing).
    let e = rustix::fs::open(
        &mnt.path,
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::TMPFILE,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .expect_err("fuse2fs should have no O_TMPFILE");
    assert_eq!(e, rustix::io::Errno::OPNOTSUPP);
    let root = mnt.path.join("root");
    let ts = |point: &str, args: &[&str]| ts_fail(&root, point, args);
    let v: Vec<PathBuf> = (1..=6)
        .map(|n| tree(&env, &format!("v{n}"), 12 + 4 * n, &format!("v{n}")))
        .collect();

    // Success: nothing left in tmp/.
    ts("", &["init"]).success();
    ts("", &["import", s(&v[0]), "--version", "1", "--activate"]).success();
    assert_eq!(made_names(&root), Vec::<String>::new(), "after an import");
    let delta = env.path("1-2.delta");
    diff_from_dirs(&v[0], &v[1], "1", "2", &delta).success();
    ts("", &["apply", s(&delta), "--no-restart"]).success();
    assert_eq!(made_names(&root), Vec::<String>::new(), "after an apply");
    assert_same_dirs(&v[1], &fs::canonicalize(root.join("current")).unwrap());
    assert_pool_complete(&root);
    ts("", &["verify", "--full"]).success();

    // Killed while a temporary file is written (at the first and at a later one): a named
    // temporary file is left in tmp/, nothing else; the pool holds only complete objects; the
    // next command removes the leftover, and the operation run again succeeds.
    let check_killed = |what: &str, killed: &Run| {
        assert_eq!(
            killed.out.status.signal(),
            Some(9),
            "{what} should be killed: {}",
            killed.stderr()
        );
        let left = made_names(&root);
        assert!(
            !left.is_empty() && left.iter().all(|n| n.starts_with("obj-")),
            "{what}: tmp/ should hold the named temporary file being written, has {left:?}"
        );
        assert_pool_complete(&root);
        ts("", &["gc"]).success();
        assert_eq!(tmp_names(&root), Vec::<String>::new(), "{what}, then gc");
    };
    let mut current = 2;
    for (n, hit) in [(3, 1), (5, 5)] {
        let point = &format!("{POINT}@{hit}");
        let version = n.to_string();
        let import = ["import", s(&v[n - 1]), "--version", &version];
        check_killed(&format!("import at {point}"), &ts(point, &import));
        ts("", &import).success();
        assert_eq!(made_names(&root), Vec::<String>::new());
        let (from, to) = (current.to_string(), (n + 1).to_string());
        let delta = env.path(&format!("{from}-{to}.delta"));
        diff_from_dirs(&v[current - 1], &v[n], &from, &to, &delta).success();
        let apply = ["apply", s(&delta), "--no-restart"];
        check_killed(&format!("apply at {point}"), &ts(point, &apply));
        ts("", &apply).success();
        assert_eq!(made_names(&root), Vec::<String>::new());
        assert_same_dirs(&v[n], &fs::canonicalize(root.join("current")).unwrap());
        current = n + 1;
    }
    ts("", &["boot"]).success();
    assert_eq!(tmp_names(&root), Vec::<String>::new(), "after boot");
    assert_pool_complete(&root);
    ts("", &["verify", "--full"]).success();
    drop(mnt);
}
