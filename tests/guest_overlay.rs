//! Overlay guests (issue 16) with a plain process as the guest: `fixtures/guest-overlay.sh`
//! starts a python3 process chrooted into `TREESWAP_ROOTFS` (the guest's overlay) and stops
//! it. Writes into `guests/<name>/rootfs` are what the guest's own writes are: they go
//! through its overlay. The nspawn suite (`tests/guest_containers.rs`) does the same with a real
//! container on a real Debian tree.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn v1_spec() -> TreeSpec {
    TreeSpec::new()
        .file("etc/hello.conf", "greeting = hello\n")
        .file("etc/motd", "welcome\n")
        .file("usr/bin/hello", "#!/bin/sh\necho hello\n")
        .mode(0o755)
        .file("usr/share/doc/hello/copyright", "public domain\n")
        .file("usr/share/doc/hello/changelog", "1.0: first\n")
        .dir("var/lib/hello")
        .file("var/log/dpkg.log", "installed hello 1.0\n")
}

fn v2_spec() -> TreeSpec {
    TreeSpec::new()
        .file("etc/hello.conf", "greeting = hello, world\n")
        .file("etc/motd", "welcome\n")
        .file("usr/bin/hello", "#!/bin/sh\necho hello, world\n")
        .mode(0o755)
        .file("usr/share/doc/hello/copyright", "public domain\n")
        .file("usr/share/doc/hello/changelog", "2.0: second\n1.0: first\n")
        .dir("var/lib/hello")
        .file(
            "var/log/dpkg.log",
            "installed hello 1.0\nupgraded hello 2.0\n",
        )
}

/// A scratch directory with trees v1 and v2, a delta from 1 to 2, a run directory and a
/// config with one overlay guest `web`. Guest processes and the overlay are cleaned up on
/// drop.
struct Setup {
    env: Env,
    v1: PathBuf,
    delta: PathBuf,
    rundir: PathBuf,
    config: PathBuf,
    /// Shared with the other tests of this file, or held alone by one whose process copies
    /// every mount into a namespace of its own ([`Leak`]): that would keep the other tests'
    /// overlays alive and refuse their flips.
    _turn: Turn,
}

/// The tests of this file that run a [`Leak`] run alone.
static TURNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum Turn {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl Turn {
    fn shared() -> Turn {
        Turn::Shared(TURNS.read().unwrap_or_else(|e| e.into_inner()))
    }
    fn alone() -> Turn {
        Turn::Alone(TURNS.write().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Setup {
    fn new(extra: &str) -> Setup {
        Setup::in_dir(Env::new(), extra)
    }

    fn in_dir(env: Env, extra: &str) -> Setup {
        Setup::with_turn(env, extra, Turn::shared())
    }

    /// A setup for a test that runs a [`Leak`]: no other test of this file runs meanwhile.
    fn alone(env: Env, extra: &str) -> Setup {
        Setup::with_turn(env, extra, Turn::alone())
    }

    fn with_turn(env: Env, extra: &str, turn: Turn) -> Setup {
        let v1 = env.tree("v1", &v1_spec());
        let v2 = env.tree("v2", &v2_spec());
        let delta = env.path("1-2.delta");
        diff_from_dirs(&v1, &v2, "1", "2", &delta).success();
        let rundir = env.path("run");
        fs::create_dir_all(&rundir).unwrap();
        let config = env.path("treeswap.toml");
        let t = Setup {
            env,
            v1,
            delta,
            rundir,
            config,
            _turn: turn,
        };
        t.set_config(&t.guest("web", extra));
        t
    }

    fn root(&self) -> &Path {
        &self.env.root
    }

    /// A `[[guest]]` table for an overlay guest run by `fixtures/guest-overlay.sh`.
    fn guest(&self, name: &str, extra: &str) -> String {
        let hook = |action: &str| {
            format!(
                "[\"{REPO}/fixtures/guest-overlay.sh\", \"{action}\", \"{}\"]",
                s(&self.rundir)
            )
        };
        format!(
            "[[guest]]\nname = \"{name}\"\nstop = {}\nstart = {}\ntimeout = 20\n{extra}",
            hook("stop"),
            hook("start")
        )
    }

    fn set_config(&self, text: &str) {
        fs::write(&self.config, text).unwrap();
    }

    fn cmd(&self) -> Command {
        let mut c = ts_cmd();
        c.env_remove("TREESWAP_CONFIG")
            .env_remove("TREESWAP_FAILPOINT")
            .arg("--root")
            .arg(self.root())
            .arg("--config")
            .arg(&self.config);
        c
    }

    fn ts<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run(self.cmd().args(args))
    }

    fn ts_failpoint(&self, failpoint: &str, args: &[&str]) -> Run {
        run(self.cmd().env("TREESWAP_FAILPOINT", failpoint).args(args))
    }

    fn import_v1_active(&self) {
        self.ts(["import", s(&self.v1), "--version", "1", "--activate"])
            .success();
    }

    fn rootfs(&self, name: &str) -> PathBuf {
        self.root().join("guests").join(name).join("rootfs")
    }

    fn status(&self) -> Value {
        let r = self.ts(["status", "--json"]);
        r.success();
        serde_json::from_str(&r.stdout()).unwrap()
    }

    fn guest_json(&self, name: &str) -> Value {
        let st = self.status();
        st["guests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("no guest {name} in {st}"))
            .clone()
    }

    /// The guest's current layer directory, from `status --json`.
    fn layer(&self, name: &str) -> PathBuf {
        let n = self.guest_json(name)["layer"].as_u64().expect("a layer");
        self.root()
            .join("guests")
            .join(name)
            .join(format!("layer-{n}"))
    }

    /// Waits (at most 10 s) until guest `name` runs chrooted into its overlay, and that
    /// overlay (as the guest's own mountinfo shows it) has `trees/<version>` below; returns
    /// its pid.
    #[track_caller]
    fn assert_guest_on(&self, name: &str, version: &str) -> i32 {
        let rootfs = fs::canonicalize(self.rootfs(name)).unwrap();
        let lower = fs::canonicalize(self.env.tree_dir(version)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = String::from("no pid file");
        loop {
            if let Some(pid) = fs::read_to_string(self.rundir.join(format!("{name}.pid")))
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                let root = fs::read_link(format!("/proc/{pid}/root"));
                let lowers = overlay_lowers(pid);
                match root {
                    Ok(r) if r == rootfs && lowers == [s(&lower)] => return pid,
                    Ok(r) => {
                        seen = format!("pid {pid} with root {}, lower {lowers:?}", r.display())
                    }
                    Err(e) => seen = format!("pid {pid}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "guest `{name}` should run on its overlay over {}; found {seen}",
                    lower.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `lowerdir` of each overlay mounted at the root of process `pid`, as the process sees
/// its mounts (mount points relative to its root: `/`).
fn overlay_lowers(pid: i32) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            (f.get(4) == Some(&"/") && f.get(dash + 1) == Some(&"overlay")).then(|| {
                f[dash + 3]
                    .split(',')
                    .find_map(|o| o.strip_prefix("lowerdir="))
                    .unwrap_or("")
                    .to_owned()
            })
        })
        .collect()
}

impl Drop for Setup {
    fn drop(&mut self) {
        kill_processes_rooted_in(self.env.dir.path());
        for name in names(&self.root().join("guests")) {
            let rootfs = self.root().join("guests").join(bpath(&name)).join("rootfs");
            for _ in 0..4 {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&rootfs)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// SIGKILLs every process whose root directory lies under `dir`: the guests of a test.
fn kill_processes_rooted_in(dir: &Path) {
    let Ok(dir) = fs::canonicalize(dir) else {
        return;
    };
    for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if fs::read_link(p.path().join("root")).is_ok_and(|r| r.starts_with(&dir)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What the guest does to its root while it runs on `1`: a new file, an edit of a file the
/// release leaves alone, an edit of one the release changes, an append, a deletion.
fn live_a_little(t: &Setup) {
    let r = t.rootfs("web");
    fs::write(r.join("var/lib/hello/counter"), "41\n").unwrap();
    fs::write(r.join("usr/share/doc/hello/copyright"), "mine\n").unwrap();
    fs::write(r.join("etc/hello.conf"), "greeting = kiosk-17\n").unwrap();
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(r.join("var/log/dpkg.log"))
        .unwrap();
    std::io::Write::write_all(&mut log, b"local line\n").unwrap();
    fs::remove_file(r.join("etc/motd")).unwrap();
}

#[test]
fn an_overlay_guest_keeps_its_changes_across_an_update_and_a_revert() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("state = [\"/var/log/**\"]\n");
    t.import_v1_active();
    let pid1 = t.assert_guest_on("web", "1");
    live_a_little(&t);
    // The trees and the pool are as installed, whatever the guest did.
    t.ts(["verify", "--full", "1"]).success();

    let r = t.ts(["apply", s(&t.delta)]);
    r.success();
    // The conflict is in the log (a warning) and in status.
    r.stderr_has("etc/hello.conf");
    let pid2 = t.assert_guest_on("web", "2");
    assert_ne!(pid1, pid2, "the guest was not restarted");
    let root = t.rootfs("web");
    assert_eq!(read(&root.join("var/lib/hello/counter")), "41\n");
    assert_eq!(read(&root.join("usr/share/doc/hello/copyright")), "mine\n");
    // A conflict, kept (the default policy).
    assert_eq!(read(&root.join("etc/hello.conf")), "greeting = kiosk-17\n");
    // A state path: the guest's, whatever the release did.
    assert_eq!(
        read(&root.join("var/log/dpkg.log")),
        "installed hello 1.0\nlocal line\n"
    );
    assert!(!root.join("etc/motd").exists(), "the deletion is kept");
    // What the release changed and the guest did not shows the new release.
    assert_eq!(
        read(&root.join("usr/bin/hello")),
        "#!/bin/sh\necho hello, world\n"
    );
    assert_eq!(
        read(&root.join("usr/share/doc/hello/changelog")),
        "2.0: second\n1.0: first\n"
    );
    let g = t.guest_json("web");
    assert_eq!(g["root"], "overlay", "{g}");
    assert_eq!(g["mounted_on"], "2", "{g}");
    assert_eq!(g["base"], "2", "{g}");
    assert_eq!(g["conflicts"], serde_json::json!(["etc/hello.conf"]), "{g}");
    t.ts(["status"]).success().stdout_has("1 conflict(s)");
    t.ts(["guest", "status", "web"])
        .success()
        .stdout_has("merged for: `2`")
        .stdout_has("conflict: etc/hello.conf");
    // The hook's environment.
    let env = read(&t.rundir.join("web.env"));
    for want in [
        "TREESWAP_GUEST=web".to_owned(),
        "TREESWAP_VERSION=2".to_owned(),
        "TREESWAP_PREVIOUS=1".to_owned(),
        format!(
            "TREESWAP_ROOTFS={}",
            s(&fs::canonicalize(t.rootfs("web")).unwrap())
        ),
        format!(
            "TREESWAP_STATE_ROOT={}",
            s(&fs::canonicalize(t.root()).unwrap())
        ),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in\n{env}");
    }
    // `guest diff` lists what the guest changed against its tree.
    let d = t.ts(["guest", "diff", "web"]);
    d.success();
    for want in [
        "A /var/lib/hello/counter",
        "M /usr/share/doc/hello/copyright",
        "M /etc/hello.conf",
        "D /etc/motd",
    ] {
        d.stdout_has(want);
    }
    assert!(!d.stdout().contains("/usr/bin/hello"), "{}", d.stdout());

    t.ts(["--revert"]).success();
    t.assert_guest_on("web", "1");
    assert_eq!(read(&root.join("var/lib/hello/counter")), "41\n");
    assert_eq!(read(&root.join("usr/share/doc/hello/copyright")), "mine\n");
    assert_eq!(read(&root.join("etc/hello.conf")), "greeting = kiosk-17\n");
    assert_eq!(read(&root.join("usr/bin/hello")), "#!/bin/sh\necho hello\n");
    assert!(read(&t.rundir.join("web.env")).contains("TREESWAP_PREVIOUS=2\n"));
    for v in ["1", "2"] {
        t.ts(["verify", "--full", v]).success();
    }

    // `guest reset` drops the local changes.
    t.ts(["guest", "reset", "web"]).success();
    t.assert_guest_on("web", "1");
    assert!(!root.join("var/lib/hello/counter").exists());
    assert_eq!(read(&root.join("etc/hello.conf")), "greeting = hello\n");
    assert_eq!(read(&root.join("etc/motd")), "welcome\n");
    assert!(t.ts(["guest", "diff", "web"]).success().stdout().is_empty());
    t.ts(["guest", "list"])
        .success()
        .stdout_has("web: overlay, layer");
}

#[test]
fn take_shows_the_release_and_saves_the_local_copy_beside_it() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("take = [\"/etc/**\"]\nkeep = [\"/var/log/**\"]\n");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    live_a_little(&t);
    t.ts(["apply", s(&t.delta)]).success();
    t.assert_guest_on("web", "2");
    let root = t.rootfs("web");
    assert_eq!(
        read(&root.join("etc/hello.conf")),
        "greeting = hello, world\n"
    );
    assert_eq!(
        read(&root.join("etc/hello.conf.treeswap-local")),
        "greeting = kiosk-17\n"
    );
    // `keep` wins for the log; the deletion of motd stays (the release left motd alone).
    assert_eq!(
        read(&root.join("var/log/dpkg.log")),
        "installed hello 1.0\nlocal line\n"
    );
    assert!(!root.join("etc/motd").exists());
    let g = t.guest_json("web");
    assert_eq!(
        g["conflicts"],
        serde_json::json!(["etc/hello.conf", "var/log/dpkg.log"]),
        "{g}"
    );
}

/// A guest whose `start` fails on the new tree: treeswap flips back, remounts the overlay on
/// the old tree, starts it there, exits 5, and the guest's layer is exactly what it was. The
/// error is one line, with the hook's last output, even with `-q`.
#[test]
fn a_failed_start_flips_back_onto_the_old_tree_with_the_layer_unchanged() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("take = [\"/etc/**\"]\n");
    t.import_v1_active();
    let pid1 = t.assert_guest_on("web", "1");
    live_a_little(&t);
    let layer = t.layer("web");
    let before = snapshot(&layer);
    // Fails on 2 only.
    fs::write(t.rundir.join("web.fail-start"), "2").unwrap();
    let r = t.ts(["-q", "apply", s(&t.delta)]);
    r.exit(5).one_line_error();
    r.stderr_has("told to fail")
        .stderr_has("flipped back to `1`");
    assert_eq!(
        fs::read_link(t.root().join("current")).unwrap(),
        Path::new("trees/1")
    );
    let pid = t.assert_guest_on("web", "1");
    assert_ne!(pid, pid1, "the guest was started again on the old tree");
    assert_eq!(t.layer("web"), layer, "the guest is back on its own layer");
    assert_same_tree(&before, &snapshot(&layer));
    assert_eq!(
        read(&t.rootfs("web").join("etc/hello.conf")),
        "greeting = kiosk-17\n"
    );
    // Only its layer is left.
    let left: Vec<String> = names(&t.root().join("guests/web"))
        .iter()
        .map(|n| show(n))
        .filter(|n| n.starts_with("layer-"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// Kill -9 at each step of a guest's move (before the remount, midway through the merge,
/// before `start`), then `boot`: the guest ends mounted on `current` with its layer intact.
#[test]
fn a_kill_at_each_step_of_a_move_is_finished_by_boot() {
    if skip_unless_root() {
        return;
    }
    for point in [
        "guest-before-remount",
        "guest-merge-midway",
        "guest-before-start",
    ] {
        let t = Setup::new("take = [\"/etc/**\"]\n");
        t.import_v1_active();
        t.assert_guest_on("web", "1");
        live_a_little(&t);
        let r = t.ts_failpoint(point, &["apply", s(&t.delta)]);
        assert_eq!(r.out.status.signal(), Some(9), "{point}: {}", r.stderr());
        t.ts(["boot"]).success();
        t.assert_guest_on("web", "2");
        let root = t.rootfs("web");
        assert_eq!(read(&root.join("var/lib/hello/counter")), "41\n", "{point}");
        assert_eq!(
            read(&root.join("etc/hello.conf.treeswap-local")),
            "greeting = kiosk-17\n",
            "{point}"
        );
        assert_eq!(
            read(&root.join("etc/hello.conf")),
            "greeting = hello, world\n"
        );
        assert!(!root.join("etc/motd").exists(), "{point}");
        let g = t.guest_json("web");
        assert_eq!(g["mounted_on"], "2", "{point}: {g}");
        assert!(t.status()["guests_pending"].as_array().unwrap().is_empty());
        t.ts(["verify", "--full", "2"]).success();
    }
}

/// A reboot unmounts everything: `boot` mounts each overlay guest on `current` again, even
/// with the state file gone.
#[test]
fn boot_mounts_the_overlays_again() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    fs::write(t.rootfs("web").join("var/lib/hello/counter"), "7\n").unwrap();
    stop_and_unmount_by_hand(&t, "web");
    assert!(!t.rootfs("web").join("var").exists());
    // The state file lost (replaced by hand): the layer on disk is still the guest's.
    fs::remove_file(t.root().join("state.toml")).unwrap();
    t.ts(["boot"]).success();
    assert_eq!(t.guest_json("web")["mounted_on"], "1");
    assert_eq!(read(&t.rootfs("web").join("var/lib/hello/counter")), "7\n");
    // restart-guests: nothing pending, then by name.
    t.ts(["restart-guests"]).exit(4);
    t.ts(["restart-guests", "web"])
        .success()
        .stdout_has("1 guest(s) restarted");
    t.assert_guest_on("web", "1");
    t.ts(["restart-guests", "nobody"])
        .failure()
        .one_line_error()
        .stderr_has("nobody");
}

/// `auto` protection with overlay guests on ext4 (which has the immutable flag): the flag is
/// left out, because overlayfs copies it up and the guest could not write the file.
#[test]
fn auto_protection_leaves_the_immutable_flag_out_for_overlay_guests() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    let mut c = t.cmd();
    c.env("TREESWAP_PROTECT", "auto")
        .args(["import", s(&t.v1), "--version", "1", "--activate"]);
    run(&mut c).success();
    t.assert_guest_on("web", "1");
    let etc = t.rootfs("web").join("etc/hello.conf");
    // The write that failed with "Operation not permitted" in the issue.
    fs::write(&etc, "hostname=kiosk-17\n").unwrap();
    fs::remove_file(t.rootfs("web").join("etc/motd")).unwrap();
    let tree_file = t.env.tree_dir("1").join("etc/hello.conf");
    assert_eq!(read(&tree_file), "greeting = hello\n");
    let out = Command::new("lsattr").arg(&tree_file).output().unwrap();
    let attrs = String::from_utf8_lossy(&out.stdout);
    assert!(
        !attrs.split(' ').next().unwrap_or("").contains('i'),
        "{attrs}"
    );
    assert!(fs::metadata(&tree_file).unwrap().nlink() >= 2);
    // An explicit `immutable` is refused with overlay guests.
    let mut c = t.cmd();
    c.env("TREESWAP_PROTECT", "immutable").args(["status"]);
    run(&mut c)
        .exit(1)
        .one_line_error()
        .stderr_has("overlay guests");
}

#[test]
fn a_guest_without_hooks_is_refused() {
    let t = Setup::new("");
    t.set_config("[[guest]]\nname = \"web\"\n");
    t.ts(["status"])
        .exit(1)
        .one_line_error()
        .stderr_has("no hook");
    t.set_config("[[guest]]\nname = \"web\"\nroot = \"overlay\"\nrestart = [\"true\"]\n");
    t.ts(["status"])
        .exit(1)
        .one_line_error()
        .stderr_has("needs `stop` and `start`");
    t.set_config(&t.guest("../x", ""));
    t.ts(["status"])
        .exit(1)
        .one_line_error()
        .stderr_has("overlay guest's name");
}

/// `--no-restart` leaves an overlay guest on the old tree (its overlay untouched);
/// `restart-guests NAME` moves it over later, merging its layer then.
#[test]
fn no_restart_leaves_the_overlay_on_the_old_tree_until_restart_guests() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("take = [\"/etc/**\"]\n");
    t.import_v1_active();
    let pid = t.assert_guest_on("web", "1");
    live_a_little(&t);
    t.ts(["apply", s(&t.delta), "--no-restart"]).success();
    assert_eq!(t.assert_guest_on("web", "1"), pid);
    let g = t.guest_json("web");
    assert_eq!(
        (&g["mounted_on"], &g["base"]),
        (&"1".into(), &"1".into()),
        "{g}"
    );
    t.ts(["restart-guests", "web"]).success();
    t.assert_guest_on("web", "2");
    let root = t.rootfs("web");
    assert_eq!(
        read(&root.join("etc/hello.conf")),
        "greeting = hello, world\n"
    );
    assert_eq!(
        read(&root.join("etc/hello.conf.treeswap-local")),
        "greeting = kiosk-17\n"
    );
    assert_eq!(read(&root.join("var/lib/hello/counter")), "41\n");
}

/// Regression (issue 16): `gc` removed a tree an overlay guest was still mounted on when it
/// was neither `current` nor `previous` (two flips with `--no-restart`).
#[test]
fn gc_keeps_the_tree_an_overlay_guest_runs_on() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    t.ts(["apply", s(&t.delta), "--no-restart"]).success();
    let v3 = t
        .env
        .tree("v3", &v2_spec().file("etc/motd", "welcome to 3\n"));
    t.ts([
        "import",
        s(&v3),
        "--version",
        "3",
        "--activate",
        "--no-restart",
    ])
    .success();
    t.ts(["gc"]).success();
    assert!(
        t.root().join("trees/1").is_dir(),
        "gc removed the guest's tree"
    );
    t.assert_guest_on("web", "1");
    t.ts(["restart-guests", "web"]).success();
    t.assert_guest_on("web", "3");
    t.ts(["gc"]).success();
    assert!(
        !t.root().join("trees/1").exists(),
        "tree 1 is no longer used"
    );
}

// ---------------------------------------------------------------------------------------------
// Regressions of the hostile review of overlay guests (issue 16's review, findings by number).

/// `chattr FLAGS PATH` (through the guest's overlay, as root in the guest would).
fn chattr(flags: &str, p: &Path) {
    let st = Command::new("chattr").arg(flags).arg(p).status().unwrap();
    assert!(st.success(), "chattr {flags} {}", p.display());
}

/// Clears the immutable and append-only flags everywhere below `dir`, so that the test's
/// scratch directory can be removed.
fn unflag_all(dir: &Path) {
    let _ = Command::new("chattr")
        .args(["-R", "-f", "-i", "-a"])
        .arg(dir)
        .stderr(Stdio::null())
        .status();
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Finding 4: a setuid file or a device node a guest makes in its layer must not be reachable
/// by other users of the host: `guests/` and `guests/<name>/` are 0700, restored at each move.
#[test]
fn guest_directories_are_for_root_only() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    let (guests, web) = (t.root().join("guests"), t.root().join("guests/web"));
    assert_eq!(mode_of(&guests), 0o700, "guests/");
    assert_eq!(mode_of(&web), 0o700, "guests/web/");
    fs::set_permissions(&guests, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&web, fs::Permissions::from_mode(0o755)).unwrap();
    t.ts(["apply", s(&t.delta)]).success();
    assert_eq!(mode_of(&guests), 0o700, "guests/ after a flip");
    assert_eq!(mode_of(&web), 0o700, "guests/web/ after a flip");
}

/// Findings 1a and 2: inode flags on the files of a guest's layer: immutable and append-only
/// files (the new layer's hardlinks were refused) and an append-only directory (the old layer
/// could not be removed once the flip was done, which flipped back, and again at every boot)
/// block no flip, no revert and no boot, and leave no other guest down. (A guest's own
/// `chattr` through its overlay is kept by overlayfs as `trusted.overlay.protattr` on kernels
/// since 5.15, which flags nothing; the flags are set here on the layer directly, as a host
/// tool or an older kernel does.)
#[test]
fn flags_a_guest_sets_block_no_flip_and_no_boot() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.set_config(&format!("{}{}", t.guest("web", ""), t.guest("db", "")));
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    t.assert_guest_on("db", "1");
    let r = t.rootfs("web");
    fs::write(r.join("var/lib/hello/pinned"), "pinned\n").unwrap();
    fs::write(r.join("var/lib/hello/journal"), "line 1\n").unwrap();
    fs::create_dir(r.join("var/lib/hello/spool")).unwrap();
    fs::write(r.join("var/lib/hello/spool/msg"), "queued\n").unwrap();
    let l = t.layer("web");
    chattr("+i", &l.join("var/lib/hello/pinned"));
    chattr("+a", &l.join("var/lib/hello/journal"));
    chattr("+a", &l.join("var/lib/hello/spool"));
    let out = t.ts(["apply", s(&t.delta)]);
    let ok = out.out.status.success();
    let stderr = out.stderr();
    unflag_all(t.root());
    assert!(ok, "apply: {stderr}");
    t.assert_guest_on("web", "2");
    t.assert_guest_on("db", "2");
    assert_eq!(read(&r.join("var/lib/hello/pinned")), "pinned\n");
    assert_eq!(read(&r.join("var/lib/hello/journal")), "line 1\n");
    assert_eq!(read(&r.join("var/lib/hello/spool/msg")), "queued\n");
    // Set the flags again in the new layer; a revert and a reboot get through them.
    chattr("+a", &t.layer("web").join("var/lib/hello/spool"));
    let out = t.ts(["--revert"]);
    let (ok, stderr) = (out.out.status.success(), out.stderr());
    unflag_all(t.root());
    assert!(ok, "revert: {stderr}");
    t.assert_guest_on("web", "1");
    t.assert_guest_on("db", "1");
    chattr("+a", &t.layer("web").join("var/lib/hello/spool"));
    // A reboot: every guest stopped and unmounted, then `boot`.
    kill_processes_rooted_in(t.env.dir.path());
    for g in ["web", "db"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("umount")
            .arg(t.rootfs(g))
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            assert!(Instant::now() < deadline, "cannot unmount {g}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let out = t.ts(["boot"]);
    let (ok, stderr) = (out.out.status.success(), out.stderr());
    unflag_all(t.root());
    assert!(ok, "boot: {stderr}");
    assert_eq!(t.guest_json("web")["mounted_on"], "1");
    assert_eq!(t.guest_json("db")["mounted_on"], "1");
    assert_eq!(read(&r.join("var/lib/hello/spool/msg")), "queued\n");
}

/// Findings 1d and 9b: `take` sets the guest's copy aside under a free name: never over a
/// copy an earlier conflict saved, nor onto a directory the guest made under that name.
#[test]
fn take_never_overwrites_an_earlier_local_copy() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("take = [\"/etc/**\"]\n");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    let r = t.rootfs("web");
    fs::create_dir(r.join("etc/hello.conf.treeswap-local")).unwrap();
    fs::write(r.join("etc/hello.conf.treeswap-local/x"), "a dir\n").unwrap();
    fs::write(r.join("etc/hello.conf"), "greeting = first\n").unwrap();
    t.ts(["apply", s(&t.delta)]).success();
    t.assert_guest_on("web", "2");
    assert_eq!(read(&r.join("etc/hello.conf")), "greeting = hello, world\n");
    assert_eq!(read(&r.join("etc/hello.conf.treeswap-local/x")), "a dir\n");
    assert_eq!(
        read(&r.join("etc/hello.conf.treeswap-local.1")),
        "greeting = first\n"
    );
    // A second conflict on the same file, at the next release.
    fs::write(r.join("etc/hello.conf"), "greeting = second\n").unwrap();
    let v3 = t.env.tree(
        "v3",
        &v2_spec().file("etc/hello.conf", "greeting = hello, 3\n"),
    );
    t.ts(["import", s(&v3), "--version", "3", "--activate"])
        .success();
    t.assert_guest_on("web", "3");
    assert_eq!(read(&r.join("etc/hello.conf")), "greeting = hello, 3\n");
    assert_eq!(
        read(&r.join("etc/hello.conf.treeswap-local.1")),
        "greeting = first\n"
    );
    assert_eq!(
        read(&r.join("etc/hello.conf.treeswap-local.2")),
        "greeting = second\n"
    );
}

/// Finding 10: a kill between the removal of the undo layer and the save of a record without
/// it left a record naming a layer that is gone; a later flip onto the undo's tree took it,
/// mounted nothing real and deleted the guest's actual layer. (The state file as that kill
/// leaves it is made by hand: there is no failpoint between the two steps.)
#[test]
fn a_record_naming_a_missing_undo_layer_loses_no_data() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    fs::write(t.rootfs("web").join("var/lib/hello/counter"), "41\n").unwrap();
    t.ts(["apply", s(&t.delta)]).success();
    t.assert_guest_on("web", "2");
    let layer = t.layer("web");
    let n: u64 = t.guest_json("web")["layer"].as_u64().unwrap();
    assert!(
        !t.root()
            .join(format!("guests/web/layer-{}", n - 1))
            .exists()
    );
    let state = t.root().join("state.toml");
    let text = read(&state);
    let line = format!("layer = {n}\n");
    assert!(text.contains(&line), "{text}");
    let edited = text.replacen(
        &line,
        &format!("{line}undo = {{ layer = {}, base = \"1\" }}\n", n - 1),
        1,
    );
    fs::write(&state, edited).unwrap();
    // Before the fix: "cannot mount an overlay … No such file or directory", and layer 2,
    // the guest's data, deleted.
    t.ts(["--revert"]).success();
    t.assert_guest_on("web", "1");
    assert!(!layer.exists() || t.layer("web") == layer);
    assert_eq!(read(&t.rootfs("web").join("var/lib/hello/counter")), "41\n");
}

/// Finding 12: the overlay's options: `redirect_dir=nofollow` (with the kernel's default
/// REDIRECT_ALWAYS_FOLLOW, `off` still follows redirects a layer holds) and `uuid=off`.
#[test]
fn the_overlay_follows_no_redirect() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    let pid = t.assert_guest_on("web", "1");
    let info = read(Path::new(&format!("/proc/{pid}/mountinfo")));
    let line = info
        .lines()
        .find(|l| l.contains(" - overlay ") && l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no overlay at / in {info}"));
    assert!(line.contains("redirect_dir=nofollow"), "{line}");
    assert!(line.contains("uuid=off"), "{line}");
}

/// Finding 7: treeswap opened, as host root, whatever a guest put where its unlink was
/// refused (to read inode flags), device nodes included. A FIFO shows it: a writer blocked
/// in `open` is let through by any reader's open. Nothing in a layer but regular files and
/// directories is opened.
#[test]
fn removing_a_layer_opens_no_special_file() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    let r = t.rootfs("web");
    fs::create_dir(r.join("var/lib/hello/q")).unwrap();
    let fifo = r.join("var/lib/hello/q/p");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let in_layer = t.layer("web").join("var/lib/hello/q");
    // A writer waiting for a reader, on the old layer's inode.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > '{}'", s(&in_layer.join("p"))))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(writer.try_wait().unwrap().is_none(), "the writer waits");
    chattr("+a", &in_layer);
    let out = t.ts(["apply", s(&t.delta)]);
    std::thread::sleep(Duration::from_millis(200));
    let let_through = writer.try_wait().unwrap().is_some();
    let _ = writer.kill();
    let _ = writer.wait();
    unflag_all(t.root());
    assert!(!let_through, "treeswap opened the FIFO: {}", out.stderr());
    out.success();
    t.assert_guest_on("web", "2");
}

/// Finding 1c: a layer nested deeper than PATH_MAX (2100 directories) was read by paths the
/// kernel refuses (`ENAMETOOLONG`), which blocked every flip.
#[test]
fn a_layer_deeper_than_path_max_blocks_no_flip() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    // Made and read by handles, one level at a time, as a guest would.
    let deep = |script: &str| {
        let code = format!(
            "import os, sys\n\
             fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n\
             for _ in range(2100):\n\
             \x20   {script}\n\
             \x20   nfd = os.open('d', os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)\n\
             \x20   os.close(fd); fd = nfd\n\
             if sys.argv[2] == 'w':\n\
             \x20   f = os.open('bottom', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)\n\
             \x20   os.write(f, b'deep\\n')\n\
             else:\n\
             \x20   f = os.open('bottom', os.O_RDONLY, dir_fd=fd)\n\
             \x20   sys.stdout.write(os.read(f, 16).decode())\n"
        );
        code
    };
    let run_py = |code: String, mode: &str| {
        let out = Command::new("python3")
            .arg("-c")
            .arg(code)
            .arg(t.rootfs("web").join("var/lib/hello"))
            .arg(mode)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run_py(deep("os.mkdir('d', dir_fd=fd)"), "w");
    t.ts(["apply", s(&t.delta)]).success();
    t.assert_guest_on("web", "2");
    assert_eq!(run_py(deep("pass"), "r"), "deep\n");
    t.ts(["guest", "diff", "web"])
        .success()
        .stdout_has("A /var/lib/hello/d/d/");
}

/// Finding 3: the merge hashed every file of the layer, under the lock, at every flip and
/// boot: a guest's `truncate -s 4T` cost hours. Only files the trees have at that size are
/// read now.
#[test]
fn a_huge_sparse_file_in_a_guest_is_not_read_at_a_flip() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("state = [\"/var/lib/db/**\"]\n");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    let r = t.rootfs("web");
    let big = fs::File::create(r.join("var/lib/hello/big")).unwrap();
    big.set_len(4 << 40).unwrap();
    // A state file of a tree file's size: never compared, so never read.
    fs::create_dir_all(r.join("var/lib/db")).unwrap();
    let db = fs::File::create(r.join("var/lib/db/data")).unwrap();
    db.set_len(4 << 40).unwrap();
    drop((big, db));
    let start = Instant::now();
    t.ts(["apply", s(&t.delta)]).success();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "the flip took {took:?}");
    t.assert_guest_on("web", "2");
    assert_eq!(
        fs::metadata(r.join("var/lib/hello/big")).unwrap().len(),
        4 << 40
    );
}

/// Finding 11: only the first MiB of a hook's output was read, and a byte that is not UTF-8
/// lost all of it: the error line did not say why the hook failed.
#[test]
fn a_failed_hook_says_its_last_words_after_much_output() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    let script = t.env.path("noisy-start.sh");
    fs::write(
        &script,
        "#!/bin/sh\nhead -c 3000000 /dev/zero | tr '\\0' 'x' | fold -w 100\nprintf 'caf\\351\\n'\n\
         echo 'the real reason'\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = read(&t.config).replace(
        &format!("start = [\"{REPO}/fixtures/guest-overlay.sh\", \"start\""),
        &format!("start = [\"{}\", \"start\"", s(&script)),
    );
    assert!(cfg.contains("noisy-start.sh"), "{cfg}");
    t.set_config(&cfg);
    let r = t.ts(["-q", "apply", s(&t.delta)]);
    r.exit(5).one_line_error();
    r.stderr_has("the real reason");
}

/// Regression (issue 16, review 8): a root whose pool was made in immutable mode (the old
/// default on ext4) and which then gets an overlay guest: its trees' files kept the flag,
/// overlayfs copied it up and the guest's writes to existing files failed with "Operation
/// not permitted", as in the issue. Mounting the first overlay clears the pool's flags.
#[test]
fn an_overlay_guest_added_to_an_immutable_pool_can_write_its_files() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    // No guest yet: `auto` is immutable on ext4.
    t.set_config("");
    let ts_auto = |args: &[&str]| {
        let mut c = t.cmd();
        c.env("TREESWAP_PROTECT", "auto").args(args);
        run(&mut c)
    };
    ts_auto(&["import", s(&t.v1), "--version", "1", "--activate"]).success();
    ts_auto(&["apply", s(&t.delta)]).success();
    let tree_file = t.env.tree_dir("2").join("etc/hello.conf");
    let flags = |p: &Path| {
        let out = Command::new("lsattr").arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split(' ')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert!(flags(&tree_file).contains('i'), "{}", flags(&tree_file));
    // The guest comes; the machine reboots.
    t.set_config(&t.guest("web", ""));
    ts_auto(&["boot"])
        .success()
        .stderr_has("cleared the immutable flag of");
    ts_auto(&["restart-guests", "web"]).success();
    t.assert_guest_on("web", "2");
    fs::write(
        t.rootfs("web").join("etc/hello.conf"),
        "hostname=kiosk-17\n",
    )
    .unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(t.rootfs("web").join("var/log/dpkg.log"))
        .unwrap()
        .write_all(b"local line\n")
        .unwrap();
    fs::remove_file(t.rootfs("web").join("etc/motd")).unwrap();
    assert!(!flags(&tree_file).contains('i'), "{}", flags(&tree_file));
    for v in ["1", "2"] {
        ts_auto(&["verify", v, "--full"]).success();
    }
    // The flags stay off: a revert and back keep the guest writable, and no second sweep.
    let r = ts_auto(&["revert"]);
    r.success();
    assert!(
        !r.stderr().contains("cleared the immutable"),
        "{}",
        r.stderr()
    );
    t.assert_guest_on("web", "1");
    fs::write(t.rootfs("web").join("etc/motd"), "local motd\n").unwrap();
}

/// Kills the guests' processes and unmounts guest `name`'s overlay, as a reboot would
/// leave it (waiting, at most 10 s, for the killed processes to let go of it).
fn stop_and_unmount_by_hand(t: &Setup, name: &str) {
    kill_processes_rooted_in(t.env.dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Command::new("umount")
        .arg(t.rootfs(name))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "cannot unmount the guest's overlay"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process that keeps a copy of the host's mounts (the guest's overlay among them) in a
/// mount namespace of its own, as a container does that its stop hook did not stop.
struct Leak(std::process::Child);

impl Leak {
    fn start() -> Leak {
        Leak::with(&["--propagation", "private", "sleep", "600"])
    }

    /// `unshare --mount ARGS…`, once it runs `sleep` in its own mount namespace.
    fn with(args: &[&str]) -> Leak {
        let child = Command::new("unshare")
            .arg("--mount")
            .args(args)
            .spawn()
            .unwrap();
        let own = fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_link(format!("/proc/{}/ns/mnt", child.id())).ok() == Some(own.clone())
            || fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default()
                != "sleep\n"
        {
            assert!(Instant::now() < deadline, "unshare did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Leak(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Leak {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Regression (issue 16, review 5): a guest whose stop hook succeeded but which still runs in
/// its own mount namespace was not noticed; its overlay was unmounted on the host only, the
/// layer merged and a second overlay mounted on the same layer and work directory. Now the
/// flip is refused and flipped back, with the layer unchanged, and `boot` mounts nothing
/// over a guest that still runs.
#[test]
fn a_guest_that_outlives_its_stop_hook_is_refused() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::alone(Env::new(), "stop_grace = 1\n");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    live_a_little(&t);
    let layer = t.layer("web");
    let before = snapshot(&layer);
    let leak = Leak::start();
    let r = t.ts(["-q", "apply", s(&t.delta)]);
    r.exit(5).one_line_error();
    r.stderr_has("has not stopped")
        .stderr_has(&format!(
            "process {} (`sleep`) still has it mounted",
            leak.pid()
        ))
        .stderr_has("flipped back to `1`");
    assert_eq!(
        fs::read_link(t.root().join("current")).unwrap(),
        Path::new("trees/1")
    );
    assert_eq!(t.layer("web"), layer);
    assert_same_tree(&before, &snapshot(&layer));
    // The host's mount is gone (the survivor has its own); nothing else is mounted on it.
    assert_eq!(t.guest_json("web")["mounted_on"], Value::Null);
    // Once it is stopped, the guest restarts and the update goes through.
    drop(leak);
    t.ts(["restart-guests", "web"]).success();
    t.assert_guest_on("web", "1");
    t.ts(["apply", s(&t.delta)]).success();
    t.assert_guest_on("web", "2");
    assert_eq!(
        read(&t.rootfs("web").join("etc/hello.conf")),
        "greeting = kiosk-17\n"
    );
    // `boot` with nothing mounted on the host but the guest still running elsewhere.
    let leak = Leak::start();
    stop_and_unmount_by_hand(&t, "web");
    let r = t.ts(["boot"]);
    r.failure().one_line_error().stderr_has("has not stopped");
    assert_eq!(t.guest_json("web")["mounted_on"], Value::Null);
    drop(leak);
    t.ts(["boot"]).success();
    assert_eq!(t.guest_json("web")["mounted_on"], "2");
    for v in ["1", "2"] {
        t.ts(["verify", v, "--full"]).success();
    }
}

/// Regression (issue 16, review 13): gc kept the trees overlay guests run on, but not the
/// tree a tree-mode guest still runs on after `--no-restart` flips, and the record of a
/// guest removed from the config kept its tree for good.
#[test]
fn gc_keeps_the_tree_a_tree_mode_guest_runs_on_and_forgets_removed_guests() {
    if skip_unless_root() {
        return;
    }
    let t = Setup::new("");
    let svc = format!(
        "[[guest]]\nname = \"svc\"\nroot = \"tree\"\nrestart = [\"sh\", \"-c\", \
         \"echo $TREESWAP_VERSION > {}/svc.on\"]\n",
        s(&t.rundir)
    );
    t.set_config(&format!("{}\n{svc}", t.guest("web", "")));
    let svc_on = || read(&t.rundir.join("svc.on")).trim().to_owned();
    t.import_v1_active();
    assert_eq!(svc_on(), "1");
    t.ts(["apply", s(&t.delta), "--no-restart"]).success();
    let tree = |n: u32| {
        t.env.tree(
            &format!("v{n}"),
            &v2_spec().file("etc/motd", format!("welcome to {n}\n").as_str()),
        )
    };
    let import = |n: u32, restart: bool| {
        let dir = tree(n);
        let v = n.to_string();
        let mut args = vec!["import", s(&dir), "--version", &v, "--activate"];
        if !restart {
            args.push("--no-restart");
        }
        t.ts(args).success();
    };
    import(3, false);
    t.ts(["restart-guests", "web"]).success();
    t.assert_guest_on("web", "3");
    t.ts(["gc"]).success();
    assert!(
        t.root().join("trees/1").is_dir(),
        "gc removed the tree guest `svc` runs on"
    );
    t.ts(["restart-guests", "svc"]).success();
    assert_eq!(svc_on(), "3");
    t.ts(["gc"]).success();
    assert!(
        !t.root().join("trees/1").exists(),
        "tree 1 is no longer used"
    );
    // `web` stops and leaves the config: its record no longer keeps tree 3.
    stop_and_unmount_by_hand(&t, "web");
    t.set_config(&svc);
    import(4, true);
    import(5, true);
    assert_eq!(svc_on(), "5");
    t.ts(["gc"]).success();
    assert!(
        !t.root().join("trees/3").exists(),
        "a removed guest's record kept its tree"
    );
    assert!(t.root().join("trees/4").is_dir() && t.root().join("trees/5").is_dir());
}

/// A bind mount of `dir` onto itself, made shared (as systemd makes `/`), undone on drop.
struct Shared(PathBuf);

impl Shared {
    fn new(dir: &Path) -> Shared {
        let ok = |args: &[&str]| {
            assert!(
                Command::new("mount").args(args).status().unwrap().success(),
                "{args:?}"
            );
        };
        ok(&["--bind", s(dir), s(dir)]);
        ok(&["--make-shared", s(dir)]);
        Shared(dir.to_owned())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Review of the fix above: on a host whose mounts propagate (systemd), every service with
/// private mounts gets a copy of the guest's overlay, which goes with the host's unmount: it
/// must not count as the guest still running. A survivor that detached its copy
/// (`umount -l`) but keeps a directory of it open is still seen, though no mountinfo shows it.
#[test]
fn propagated_copies_do_not_count_and_detached_survivors_do() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let shared = Shared::new(env.dir.path());
    let t = Setup::alone(env, "stop_grace = 1\n");
    t.import_v1_active();
    t.assert_guest_on("web", "1");
    live_a_little(&t);
    // A service in a mount namespace of its own, receiving the host's mounts and unmounts.
    let service = Leak::with(&["--propagation", "slave", "sleep", "600"]);
    t.ts(["apply", s(&t.delta)]).success();
    t.assert_guest_on("web", "2");
    drop(service);
    // A survivor with its own copy of the overlay, detached, with its cwd in it.
    let rootfs = s(&t.rootfs("web")).to_owned();
    let script = format!("cd {rootfs}/etc && umount -l {rootfs} && exec sleep 600");
    let survivor = Leak::with(&["--propagation", "private", "sh", "-c", &script]);
    let layer = t.layer("web");
    let before = snapshot(&layer);
    let r = t.ts(["--revert"]);
    r.exit(5)
        .stderr_has("has not stopped")
        .stderr_has("a process still holds a file of it");
    assert_eq!(t.layer("web"), layer);
    assert_same_tree(&before, &snapshot(&layer));
    drop(survivor);
    t.ts(["restart-guests", "web"]).success();
    t.assert_guest_on("web", "2");
    kill_processes_rooted_in(t.env.dir.path());
    drop(t);
    drop(shared);
}
