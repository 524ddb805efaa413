//! Crash safety (issue "Crash safety"): an interrupted treeswap leaves the old tree or the new
//! one, never a mix, and `treeswap boot` puts the root back in order.
//!
//! 1. The failpoint matrix: every failpoint of `treeswap::core::failpoint::ALL`, armed in each
//!    operation that reaches it, SIGKILLs the process; `boot` then leaves `current` exactly
//!    the old tree or the new one, every installed tree verifies in full, `tmp/` and `staging/`
//!    are empty, every file left in the pool is a complete object, and the operation run
//!    again ends in the new tree. A point the operation passes several times is also killed
//!    at its second and its last hit (`<name>@<N>`, [`LATER`]).
//! 2. Durability: the same after dropping the caches and remounting an ext4 file system.
//! 3. A full disk: refused up front when it cannot fit, a clean failure when it fills up
//!    during the apply, and the space given back.
//! 4. Concurrency: two writers at once serialise on the lock or say "busy".

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use treeswap::core::failpoint::ALL;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// Text with numbered lines, so that a small edit makes a good patch.
fn lines(n: usize, tag: &str) -> String {
    (0..n).map(|i| format!("line {i} of {tag}\n")).collect()
}

// ---------------------------------------------------------------------------------------------
// The trees: version 0 (only for gc), 1 (old) and 2 (new)

/// Version 0: a tree nobody uses once 1 is current, with objects of its own.
fn spare_spec() -> TreeSpec {
    TreeSpec::new()
        .file("only-in-0/a", noise(3000, 90))
        .file("only-in-0/b", noise(5000, 91))
        .file("etc/hostname", "zero\n")
}

fn old_spec() -> TreeSpec {
    TreeSpec::new()
        .top()
        .mode(0o755)
        .file("etc/hostname", "old\n")
        .file("etc/config", lines(400, "config"))
        .file("usr/bin/tool", "#!/bin/sh\necho old\n")
        .mode(0o755)
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .symlink("usr/bin/link", "tool")
        .file("var/lib/gone/data", "removed by the update")
        .file("share/same", "the same content, new metadata later")
        .file("share/keep", noise(2000, 1))
        .fifo("run/fifo")
}

/// Version 2: several new objects (whole files, a patch, a content the base has under other
/// metadata), a removed directory, a changed symlink and a new directory.
fn new_spec() -> TreeSpec {
    let mut config = lines(400, "config");
    config.push_str("one more line\n");
    TreeSpec::new()
        .top()
        .mode(0o755)
        .file("etc/hostname", "new\n")
        .file("etc/config", config)
        .file("usr/bin/tool", "#!/bin/sh\necho new\n")
        .mode(0o755)
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .symlink("usr/bin/link", "tool-alias")
        .file("usr/bin/su", noise(4000, 2))
        .mode(0o4755)
        .file("share/same", "the same content, new metadata later")
        .mode(0o600)
        .file("share/keep", noise(2000, 1))
        .file("opt/new/a", noise(1500, 3))
        .file("opt/new/b", noise(2500, 4))
        .file("opt/new/c", noise(3500, 5))
        .dir("opt/new/empty")
        .fifo("run/fifo")
}

/// Two guests whose restart always succeeds.
fn config_text(tries: u32) -> String {
    format!(
        "[boot]\ntries = {tries}\n\n\
         [[guest]]\nname = \"web\"\nrestart = [\"true\"]\ntimeout = 20\n\n\
         [[guest]]\nname = \"db\"\nrestart = [\"true\"]\ntimeout = 20\n"
    )
}

/// The source trees, their snapshots, the delta 1 -> 2 and the config files, made once per
/// test; each case gets its own state root with [`Lab::rig`].
struct Lab {
    env: Env,
    trees: [PathBuf; 3],
    snaps: [Snapshot; 3],
    delta: PathBuf,
    config: PathBuf,
    config_tries1: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        Lab::with([spare_spec(), old_spec(), new_spec()])
    }

    /// The trees of versions 0, 1 and 2.
    fn with(specs: [TreeSpec; 3]) -> Lab {
        let env = Env::new();
        let trees = [
            env.tree("src0", &specs[0]),
            env.tree("src1", &specs[1]),
            env.tree("src2", &specs[2]),
        ];
        let snaps = [
            snapshot(&trees[0]),
            snapshot(&trees[1]),
            snapshot(&trees[2]),
        ];
        let delta = env.path("1-2.delta");
        make_delta(&trees[1], &trees[2], "1", "2", &delta);
        let config = env.path("treeswap.toml");
        fs::write(&config, config_text(3)).unwrap();
        let config_tries1 = env.path("treeswap-tries1.toml");
        fs::write(&config_tries1, config_text(1)).unwrap();
        Lab {
            env,
            trees,
            snaps,
            delta,
            config,
            config_tries1,
        }
    }

    /// A fresh state root at `root` (not yet created).
    /// A rig on a new state root at `root` (made with `init`).
    fn rig(&self, root: PathBuf) -> Rig<'_> {
        let rig = Rig {
            lab: self,
            root,
            config: self.config.clone(),
        };
        rig.ts(["init"]).success();
        rig
    }

    fn src(&self, version: &str) -> &Path {
        &self.trees[version_index(version)]
    }

    fn snap(&self, version: &str) -> &Snapshot {
        &self.snaps[version_index(version)]
    }
}

/// The source tree of a version; version 3, used where two different updates of 1 are
/// needed, has the content of the spare tree 0.
fn version_index(version: &str) -> usize {
    match version {
        "0" | "3" => 0,
        "1" => 1,
        "2" => 2,
        v => panic!("no source tree for version {v}"),
    }
}

fn make_delta(from: &Path, to: &Path, v1: &str, v2: &str, out: &Path) {
    run(ts_cmd().args([
        "diff",
        "--uncompressed",
        "--from-dir",
        s(from),
        "--to-dir",
        s(to),
        "--from-version",
        v1,
        "--to-version",
        v2,
        "-o",
        s(out),
    ]))
    .success();
}

/// One state root and the config its commands use.
struct Rig<'a> {
    lab: &'a Lab,
    root: PathBuf,
    config: PathBuf,
}

impl Rig<'_> {
    fn cmd(&self) -> Command {
        let mut c = ts_cmd();
        c.env_remove("TREESWAP_CONFIG")
            .env_remove("TREESWAP_FAILPOINT")
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config);
        c
    }

    fn ts<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.cmd().args(args))
    }

    fn ts_fp<I, S>(&self, failpoint: &str, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.cmd().env("TREESWAP_FAILPOINT", failpoint).args(args))
    }

    fn import(&self, version: &str, activate: bool) {
        let src = s(self.lab.src(version));
        let mut args = vec!["import", src, "--version", version];
        if activate {
            args.push("--activate");
        }
        self.ts(args).success();
    }

    fn apply(&self) -> Run {
        self.ts(["apply", s(&self.lab.delta)])
    }

    fn link(&self, name: &str) -> Option<String> {
        let t = fs::read_link(self.root.join(name)).ok()?;
        let t = t.to_str().expect("UTF-8 link").to_owned();
        Some(t.strip_prefix("trees/").unwrap_or(&t).to_owned())
    }

    fn status(&self) -> Value {
        let r = self.ts(["status", "--json"]);
        r.success();
        serde_json::from_str(&r.stdout())
            .unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{}", r.stdout()))
    }

    /// Which of `candidates` the tree `current` resolves to is, compared entry by entry with
    /// the source trees (not by the name the link carries). Panics with both diffs if neither.
    #[track_caller]
    fn current_is_one_of(&self, candidates: &[&str]) -> String {
        let cur = fs::canonicalize(self.root.join("current"))
            .unwrap_or_else(|e| panic!("`current` does not resolve: {e}"));
        let snap = snapshot(&cur);
        let mut report = String::new();
        for v in candidates {
            let d = diff_trees(self.lab.snap(v), &snap, Links::Subset);
            if d.is_empty() {
                assert_eq!(
                    self.link("current").as_deref(),
                    Some(*v),
                    "`current` has the content of version {v} but another name"
                );
                return v.to_string();
            }
            report.push_str(&format!(
                "\nagainst version {v} ({} differences):\n  {}",
                d.len(),
                d.join("\n  ")
            ));
        }
        panic!(
            "`current` ({}) is none of the versions {candidates:?}:{report}",
            cur.display()
        );
    }

    /// `verify --full` of every installed version.
    #[track_caller]
    fn verify_all(&self) {
        let versions = names(&self.root.join("trees"));
        assert!(!versions.is_empty(), "no installed version");
        for v in versions {
            let v = String::from_utf8(v).unwrap();
            self.ts(["verify", v.as_str(), "--full"]).success();
        }
    }

    /// The root is consistent: links, leftovers, manifests, every tree in full, no guest
    /// restart left, and a pending mark only on the current tree.
    #[track_caller]
    fn assert_sound(&self) {
        assert_no_dangling(&self.root);
        self.verify_all();
        let st = self.status();
        assert_eq!(
            st["guests_pending"],
            Value::Array(vec![]),
            "guest restarts left over: {st}"
        );
        if let Some(p) = st["boot"]["pending"].as_str() {
            assert_eq!(
                Some(p),
                st["current"].as_str(),
                "a pending mark on a tree that is not current: {st}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The failpoint matrix

/// The operations the matrix interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// 1 current; `import src2 --version 2 --activate`.
    Import,
    /// 1 current; `apply 1-2.delta` (restarting two guests).
    Apply,
    /// 1 current, 2 staged; `switch 2`.
    Switch,
    /// 2 current, 1 previous; `revert`.
    Revert,
    /// 2 current and pending (3 tries); `boot` counts a boot.
    Boot,
    /// 2 current and pending with its one try used; `boot` reverts to 1.
    BootRevert,
    /// 1 current, 0 installed and unused; `gc` removes 0 and its objects.
    Gc,
}

/// Failpoints that the matrix (which runs in hardlink mode) never meets, with the test file
/// that interrupts at them instead.
const ELSEWHERE: &[(&str, &str)] = &[
    ("pool-link-unprotected", "tests/protect.rs"),
    ("pool-flags-midway", "tests/protect.rs"),
    ("tmpfile-before-publish", "tests/no_tmpfile.rs"),
    // Overlay guests' moves (issue 16): killed there, then `boot`.
    ("guest-before-remount", "tests/guest_overlay.rs"),
    ("guest-merge-midway", "tests/guest_overlay.rs"),
    ("guest-before-start", "tests/guest_overlay.rs"),
];

/// Every failpoint, with the operations that are interrupted at it.
const MATRIX: &[(Op, &[&str])] = &[
    (
        Op::Import,
        &[
            "import-after-objects",
            "stage-after-build",
            "stage-before-syncfs",
            "stage-after-syncfs",
            "stage-before-commit",
        ],
    ),
    (
        Op::Apply,
        &[
            "stage-after-build",
            "stage-before-syncfs",
            "stage-after-syncfs",
            "stage-before-commit",
            "stage-after-commit",
            "apply-after-object",
            "apply-after-objects",
            "flip-before-rename",
            "flip-after-rename",
            "flip-after-previous",
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (
        Op::Switch,
        &[
            "flip-before-rename",
            "flip-after-rename",
            "flip-after-previous",
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (
        Op::Revert,
        &[
            "flip-before-rename",
            "flip-after-rename",
            "flip-after-previous",
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (
        Op::Boot,
        &[
            "state-before-write",
            "state-after-write",
            "boot-before-count",
            "boot-after-count",
        ],
    ),
    (
        Op::BootRevert,
        &[
            "boot-before-count",
            "flip-before-rename",
            "flip-after-rename",
            "flip-after-previous",
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
            "boot-after-count",
        ],
    ),
    (Op::Gc, &["gc-after-uninstall", "gc-before-object"]),
];

/// Up to this many hits of a point, every one is a crash case.
const MAX_LATER: u64 = 10;

/// The points of [`MATRIX`] that an operation passes more than once (after each content, for
/// each guest, at each write of the state file, for each object gc removes): besides the
/// first hit, each is killed at every later hit, `<name>@<N>` (at most [`MAX_LATER`] of them;
/// beyond, the second, a middle one and the last), the number of hits found by counting them
/// in one uninterrupted run ([`hit_counts`]). `run_matrix` checks that the list is exactly
/// the points the count finds several times.
const LATER: &[(Op, &[&str])] = &[
    (
        Op::Apply,
        &[
            "apply-after-object",
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (
        Op::Switch,
        &[
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (
        Op::Revert,
        &[
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (Op::Boot, &["state-before-write", "state-after-write"]),
    (
        Op::BootRevert,
        &[
            "guest-before-restart",
            "guest-after-restart",
            "state-before-write",
            "state-after-write",
        ],
    ),
    (Op::Gc, &["gc-before-object"]),
];

impl Op {
    /// (the version current before, the version current after).
    fn versions(self) -> (&'static str, &'static str) {
        match self {
            Op::Import | Op::Apply | Op::Switch => ("1", "2"),
            Op::Revert | Op::BootRevert => ("2", "1"),
            Op::Boot => ("2", "2"),
            Op::Gc => ("1", "1"),
        }
    }

    fn config(self, lab: &Lab) -> PathBuf {
        match self {
            Op::BootRevert => lab.config_tries1.clone(),
            _ => lab.config.clone(),
        }
    }

    /// Brings a fresh root to the state the operation starts from.
    fn prepare(self, r: &Rig) {
        match self {
            Op::Gc => {
                r.import("0", false);
                r.import("1", true);
            }
            _ => r.import("1", true),
        }
        match self {
            Op::Import | Op::Apply | Op::Gc => {}
            Op::Switch => {
                r.ts(["apply", s(&r.lab.delta), "--stage-only"]).success();
            }
            Op::Revert | Op::Boot => {
                r.apply().success();
            }
            Op::BootRevert => {
                r.apply().success();
                r.ts(["boot"]).success();
            }
        }
    }

    fn args(self, lab: &Lab) -> Vec<String> {
        let v: Vec<&str> = match self {
            Op::Import => vec!["import", s(lab.src("2")), "--version", "2", "--activate"],
            Op::Apply => vec!["apply", s(&lab.delta)],
            Op::Switch => vec!["switch", "2"],
            Op::Revert => vec!["revert"],
            Op::Boot | Op::BootRevert => vec!["boot"],
            Op::Gc => vec!["gc"],
        };
        v.into_iter().map(str::to_owned).collect()
    }
}

/// How many times one uninterrupted run of `op` passes each failpoint
/// (`TREESWAP_FAILPOINT_COUNT=1` writes every hit to stderr).
fn hit_counts(lab: &Lab, op: Op) -> BTreeMap<String, u64> {
    let mut r = lab.rig(lab.env.path(&format!("root-{op:?}-count")));
    r.config = op.config(lab);
    op.prepare(&r);
    let done = run(r
        .cmd()
        .env("TREESWAP_FAILPOINT_COUNT", "1")
        .args(op.args(lab)));
    assert!(
        matches!(done.code(), Some(0) | Some(5)),
        "{op:?} with the hits counted: exit {:?}\n{}",
        done.code(),
        done.stderr()
    );
    let mut counts = BTreeMap::new();
    for line in done.stderr().lines() {
        let Some(rest) = line.strip_prefix("treeswap: failpoint `") else {
            continue;
        };
        let (name, n) = rest.split_once("` hit ").expect("a count line");
        let n: u64 = n.parse().expect("a hit number");
        let c = counts.entry(name.to_owned()).or_insert(0);
        *c = (*c).max(n);
    }
    eprintln!("{op:?} passes the failpoints {counts:?}");
    counts
}

/// Runs `op` killed at `fp`, then `boot`, then the checks, then `op` again.
fn crash_case(lab: &Lab, op: Op, fp: &str, n: usize) {
    let mut r = lab.rig(lab.env.path(&format!("root-{op:?}-{n}")));
    r.config = op.config(lab);
    op.prepare(&r);
    let (old, new) = op.versions();
    assert_eq!(r.link("current").as_deref(), Some(old), "prepare {op:?}");

    let killed = r.ts_fp(fp, op.args(lab));
    assert_eq!(
        killed.out.status.signal(),
        Some(libc::SIGKILL),
        "{op:?} did not reach failpoint `{fp}` (it must die there by SIGKILL)\ncommand: {}\nstatus: {}\nstderr:\n{}",
        killed.cmdline,
        killed.out.status,
        killed.stderr()
    );
    let (name, at) = fp.split_once('@').unwrap_or((fp, "1"));
    killed.stderr_has(&format!("failpoint `{name}` reached at hit {at}:"));
    // Whatever the kill left in the pool is a whole object (an object no tree uses yet is
    // not read by `verify --full`).
    assert_pool_complete(&r.root);

    let boot = r.ts(["boot"]);
    // Exit 5 is the revert itself when the interrupted boot had not yet flipped back.
    if !(op == Op::BootRevert && boot.code() == Some(5)) {
        boot.success();
    }
    let at = r.current_is_one_of(&[old, new]);
    r.assert_sound();
    // A flip that happened is complete: the tree it left is `previous`, so that `revert`
    // and a boot that runs out of tries can go back to it, and gc keeps it.
    if at == new && old != new {
        assert_eq!(
            r.link("previous").as_deref(),
            Some(old),
            "{op:?} killed at `{fp}` flipped to {new}, but `previous` does not name {old}"
        );
    }

    // Run it again: it ends in the new tree.
    if at == old || op == Op::Boot || op == Op::Gc {
        r.ts(op.args(lab)).success();
    } else if matches!(op, Op::Apply | Op::Switch) {
        // Already done: "nothing to do" is a success too.
        let again = r.ts(op.args(lab));
        assert!(
            matches!(again.code(), Some(0) | Some(4)),
            "{op:?} again after `{fp}`: exit {:?}\n{}",
            again.code(),
            again.stderr()
        );
    }
    assert_eq!(
        r.current_is_one_of(&[new]),
        new,
        "{op:?} after `{fp}` does not end in {new}"
    );
    r.assert_sound();
    assert_pool_complete(&r.root);
    if op == Op::Gc {
        assert_eq!(names(&r.root.join("trees")), vec![b"1".to_vec()]);
        r.ts(["gc"])
            .success()
            .stdout_has("removed 0 tree(s), 0 object(s)");
    }
}

fn run_matrix(op: Op) {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let fps = MATRIX
        .iter()
        .find(|(o, _)| *o == op)
        .map(|(_, f)| *f)
        .expect("op in the matrix");
    let mut cases: Vec<String> = fps.iter().map(|f| f.to_string()).collect();
    // The points of `fps` the operation passes more than once are exactly those LATER names.
    let counts = hit_counts(&lab, op);
    let several: BTreeSet<&str> = fps
        .iter()
        .copied()
        .filter(|fp| counts.get(*fp).is_some_and(|&c| c >= 2))
        .collect();
    let later: BTreeSet<&str> = LATER
        .iter()
        .filter(|(o, _)| *o == op)
        .flat_map(|(_, f)| f.iter().copied())
        .collect();
    assert_eq!(
        several, later,
        "{op:?} passes these failpoints several times (hits: {counts:?}), LATER lists those"
    );
    for fp in &later {
        let last = counts[*fp];
        let hits: Vec<u64> = if last <= MAX_LATER {
            (2..=last).collect()
        } else {
            vec![2, last / 2, last]
        };
        cases.extend(hits.iter().map(|n| format!("{fp}@{n}")));
    }
    eprintln!("{op:?}: {} crash cases: {cases:?}", cases.len());
    // Every case runs, and the failures are listed together at the end.
    let mut failed = Vec::new();
    for (n, fp) in cases.iter().enumerate() {
        let case = std::panic::AssertUnwindSafe(|| crash_case(&lab, op, fp, n));
        if let Err(e) = std::panic::catch_unwind(case) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!(
                "{op:?} at `{fp}`: {}",
                msg.lines().next().unwrap_or("")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} crash cases failed (details above):\n  {}",
        failed.len(),
        cases.len(),
        failed.join("\n  ")
    );
}

#[test]
fn crash_matrix_import() {
    run_matrix(Op::Import);
}
#[test]
fn crash_matrix_apply() {
    run_matrix(Op::Apply);
}
#[test]
fn crash_matrix_switch() {
    run_matrix(Op::Switch);
}
#[test]
fn crash_matrix_revert() {
    run_matrix(Op::Revert);
}
#[test]
fn crash_matrix_boot() {
    run_matrix(Op::Boot);
}
#[test]
fn crash_matrix_boot_revert() {
    run_matrix(Op::BootRevert);
}
#[test]
fn crash_matrix_gc() {
    run_matrix(Op::Gc);
}

/// Regression (issue 15, 6a): a kill between replacing `current` and `previous`, then `gc`
/// before `boot`, removed the tree the flip left, the only one known to be good, because gc
/// ignored the flip recorded in the state file.
#[test]
fn gc_before_boot_keeps_the_tree_an_interrupted_flip_left() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let r = lab.rig(lab.env.path("root"));
    r.import("1", true);
    let killed = r.ts_fp("flip-after-rename", ["apply", s(&lab.delta)]);
    assert_eq!(
        killed.out.status.signal(),
        Some(libc::SIGKILL),
        "apply did not reach the failpoint\n{}",
        killed.stderr()
    );
    assert_eq!(r.link("current").as_deref(), Some("2"));
    assert_eq!(r.link("previous"), None);
    r.ts(["gc"]).success();
    assert!(
        r.root.join("trees/1").is_dir(),
        "gc removed `trees/1`, which the interrupted flip left"
    );
    r.ts(["boot"]).success();
    assert_eq!(
        r.link("previous").as_deref(),
        Some("1"),
        "boot finishes the flip"
    );
    r.ts(["revert"]).success();
    assert_eq!(r.current_is_one_of(&["1"]), "1");
    r.assert_sound();
}

/// The pool check of the matrix finds, among objects no tree uses, one whose content does not
/// match its name, one whose mode alone was changed, and one cut short.
#[test]
fn the_pool_check_finds_an_incomplete_object() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let r = lab.rig(lab.env.path("root"));
    r.import("1", true);
    assert_pool_complete(&r.root);
    let pool = r.root.join("pool");
    // Objects of version 0, which is not installed, made by hand.
    let (a, b) = (
        lab.src("0").join("only-in-0/a"),
        lab.src("0").join("only-in-0/b"),
    );
    let complete = pool.join(object_id_of_file(&b));
    fs::copy(&b, &complete).unwrap();
    let md = fs::metadata(&b).unwrap();
    std::os::unix::fs::chown(&complete, Some(md.uid()), Some(md.gid())).unwrap();
    fs::set_permissions(&complete, fs::Permissions::from_mode(md.mode() & 0o7777)).unwrap();
    assert_pool_complete(&r.root);

    fs::set_permissions(&complete, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(pool.join("ab".repeat(32)), "not the bytes it is named for").unwrap();
    let short = pool.join(object_id_of_file(&a));
    fs::write(&short, &fs::read(&a).unwrap()[..1000]).unwrap();
    let found = std::panic::catch_unwind(|| assert_pool_complete(&r.root))
        .expect_err("the pool check passed");
    let msg = found.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.starts_with("3 incomplete pool object(s)"), "{msg}");
}

/// The `failpoint::hit("...")` and `failpoint::check("...")` names in the sources under
/// `dir`.
fn failpoints_in_code(dir: &Path, out: &mut BTreeSet<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            failpoints_in_code(&p, out);
        } else if p.extension() == Some(OsStr::new("rs")) {
            let text = fs::read_to_string(&p).unwrap();
            for call in ["failpoint::hit(", "failpoint::check("] {
                for (i, _) in text.match_indices(call) {
                    let rest = text[i + call.len()..].trim_start();
                    let Some(lit) = rest.strip_prefix('"') else {
                        // The definitions (`pub fn hit(name: &str)`) have no literal.
                        continue;
                    };
                    let end = lit.find('"').expect("closing quote");
                    out.insert(lit[..end].to_owned());
                }
            }
        }
    }
}

#[test]
fn the_failpoint_list_matches_the_code_and_the_matrix() {
    let all: BTreeSet<String> = ALL.iter().map(|s| s.to_string()).collect();
    assert_eq!(all.len(), ALL.len(), "ALL has a name twice");
    let mut in_code = BTreeSet::new();
    failpoints_in_code(&Path::new(REPO).join("src"), &mut in_code);
    assert_eq!(
        all,
        in_code,
        "failpoint::ALL and the failpoint::hit(\"...\") calls in src/ differ: only in ALL {:?}, only in the code {:?}",
        all.difference(&in_code).collect::<Vec<_>>(),
        in_code.difference(&all).collect::<Vec<_>>()
    );
    let mut covered: BTreeSet<String> = MATRIX
        .iter()
        .flat_map(|(_, f)| f.iter().map(|s| s.to_string()))
        .collect();
    for (op, later) in LATER {
        let (_, first) = MATRIX.iter().find(|(o, _)| o == op).expect("op in MATRIX");
        for fp in *later {
            assert!(
                first.contains(fp),
                "LATER has `{fp}` for {op:?}, whose first hit MATRIX does not test"
            );
        }
    }
    for (name, file) in ELSEWHERE {
        let text = fs::read_to_string(Path::new(REPO).join(file)).unwrap();
        assert!(
            text.contains(&format!("\"{name}\"")),
            "{file} should test failpoint `{name}`"
        );
        covered.insert(name.to_string());
    }
    assert_eq!(
        all,
        covered,
        "the crash matrix does not cover every failpoint: missing {:?}, unknown {:?}",
        all.difference(&covered).collect::<Vec<_>>(),
        covered.difference(&all).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Durability

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches");
}

#[test]
fn an_interrupted_apply_survives_dropped_caches_and_a_remount() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let image = lab.env.path("ext4.img");
    let mnt = lab.env.path("mnt");
    let mut mount = Some(Mount::ext4_loop(&image, 64, 4096, &mnt));
    for fp in [
        "stage-before-syncfs",
        "stage-after-commit",
        "flip-before-rename",
        "flip-after-rename",
    ] {
        let r = lab.rig(mnt.join(format!("root-{fp}")));
        r.import("1", true);
        let killed = r.ts_fp(fp, ["apply", s(&lab.delta)]);
        assert_eq!(
            killed.out.status.signal(),
            Some(libc::SIGKILL),
            "apply did not reach failpoint `{fp}`\n{}",
            killed.stderr()
        );
        assert_pool_complete(&r.root);
        // No sync first: the caches go, then the file system is unmounted and mounted again.
        // `umount` itself writes back whatever was still dirty, so this is not a power cut: it
        // cannot show that an fsync is missing. What it does prove is that the state on the
        // disk, read back cold through a fresh mount, is self-consistent and that `boot`
        // recovers from it without help from the page cache of the killed process.
        drop_caches();
        drop(mount.take());
        mount = Some(Mount::new(&["-o", "loop", s(&image)], &mnt));
        r.ts(["boot"]).success();
        r.current_is_one_of(&["1", "2"]);
        r.assert_sound();
        assert_pool_complete(&r.root);
        let again = r.apply();
        assert!(
            matches!(again.code(), Some(0) | Some(4)),
            "apply again after `{fp}` and a remount: {}",
            again.stderr()
        );
        r.current_is_one_of(&["2"]);
        r.assert_sound();
    }
    drop(mount);
}

// ---------------------------------------------------------------------------------------------
// 3. A full disk

/// Free bytes for root (ext4 keeps a reserve for root that `f_bavail` leaves out).
fn free_bytes(p: &Path) -> u64 {
    let st = rustix::fs::statvfs(p).unwrap();
    st.f_bfree * st.f_frsize
}

/// What a state root holds, as far as a refused apply must leave it alone.
#[derive(Debug, PartialEq, Eq)]
struct Listing {
    pool: Vec<PathBuf>,
    trees: Vec<Vec<u8>>,
    manifests: Vec<Vec<u8>>,
    current: Option<PathBuf>,
}

fn root_listing(root: &Path) -> Listing {
    Listing {
        pool: pool_files(root),
        trees: names(&root.join("trees")),
        manifests: names(&root.join("manifests")),
        current: fs::read_link(root.join("current")).ok(),
    }
}

#[test]
fn an_update_larger_than_the_free_space_is_refused_before_anything_is_written() {
    if skip_unless_root() {
        return;
    }
    // 12 MiB of zeros make a tiny blob but need 12 MiB in the pool: more than the whole
    // file system.
    let big = new_spec().file("opt/big", vec![0u8; 12 << 20]);
    let lab = Lab::with([spare_spec(), old_spec(), big]);
    let mnt = lab.env.path("mnt");
    let _m = Mount::tmpfs(&mnt, "8m");
    let r = lab.rig(mnt.join("root"));
    r.import("1", true);
    let before = root_listing(&r.root);
    let free = free_bytes(&mnt);

    let refused = r.apply();
    refused.exit(9);
    let last = refused
        .stderr()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last.starts_with("treeswap: error: ") && last.contains("MiB missing"),
        "the error should say how much is missing: {last}"
    );
    assert_eq!(
        root_listing(&r.root),
        before,
        "the refused apply changed the root"
    );
    assert_clean(&r.root, "2");
    // The one thing a refused apply writes is its outcome, for `status`.
    let record = fs::metadata(r.root.join("last-apply.toml"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .expect("the refused apply's outcome is recorded");
    assert_eq!(
        free_bytes(&mnt) + record,
        free,
        "the refused apply used space"
    );
    r.current_is_one_of(&["1"]);
    r.assert_sound();
}

/// Fills the file system of `path` to the last block, as root; returns the filler's path.
fn fill_up(path: &Path) -> PathBuf {
    let p = path.join("filler");
    let mut f = fs::File::create(&p).unwrap();
    for chunk in [1 << 20, 4096] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match f.write_all(&buf) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", p.display()),
            }
        }
    }
    p
}

/// The byte offsets in a delta where each member's header starts, and the total length.
fn member_offsets(delta: &Path) -> (Vec<u64>, u64) {
    let mut a = tar::Archive::new(fs::File::open(delta).unwrap());
    let heads = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().raw_header_position())
        .collect();
    (heads, fs::metadata(delta).unwrap().len())
}

/// Waits (at most 30 s) until the pool holds `n` files and `child` still runs.
fn wait_for_pool(root: &Path, n: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = pool_files(root).len();
        if have >= n {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the apply ended ({st}) before writing its objects ({have} of {n})");
        }
        assert!(
            Instant::now() < deadline,
            "the pool has {have} of {n} files"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The disk fills up while the apply runs: after `blobs_first` blobs (the apply is then
/// waiting for the next one), or, with `None`, after the last one (the apply is then waiting
/// for the end of the archive, just before staging). The delta is piped in, so the apply
/// stops where the test wants it and the filler runs at that exact point.
fn disk_fills_during_apply(blobs_first: Option<usize>) {
    // Names with nothing in common, so that diff tries no patch between them (bsdiff of
    // 256 KiB of noise is slow in a debug build).
    let mut new = old_spec();
    let fill = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"];
    for (i, name) in fill.iter().enumerate() {
        new = new.file(format!("fill/{name}"), noise(256 << 10, 100 + i as u64));
    }
    let lab = Lab::with([spare_spec(), old_spec(), new]);
    let image = lab.env.path("ext4.img");
    let mnt = lab.env.path("mnt");
    let _m = Mount::ext4_loop(&image, 48, 2048, &mnt);
    let r = lab.rig(mnt.join("root"));
    r.import("1", true);
    let pool_before = pool_files(&r.root).len();
    let free_before = free_bytes(&mnt);

    let delta = fs::read(&lab.delta).unwrap();
    let (heads, total) = member_offsets(&lab.delta);
    // Members: delta.toml, delta.toml.minisig, then one blob per new object.
    let blobs = heads.len() - 2;
    assert_eq!(blobs, 8, "expected one blob per new file");
    let (cut, objects) = match blobs_first {
        Some(k) => (heads[2 + k] as usize, k),
        None => {
            // The archive ends with two zero blocks; hold them back.
            let cut = total as usize - 1024;
            assert!(delta[cut..].iter().all(|&b| b == 0), "no tar trailer");
            (cut, blobs)
        }
    };
    let log = fs::File::create(lab.env.path("apply.log")).unwrap();
    let mut child = r
        .cmd()
        .args(["apply", "-", "--no-restart"])
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&delta[..cut]).unwrap();
    wait_for_pool(&r.root, pool_before + objects, &mut child);
    let filler = fill_up(&mnt);
    // The apply may already have given up; then the rest of the delta has no reader.
    let _ = stdin.write_all(&delta[cut..]);
    drop(stdin);
    let status = child.wait().unwrap();
    let mut out = String::new();
    fs::File::open(lab.env.path("apply.log"))
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        status.code(),
        Some(9),
        "a full disk should fail the apply with exit 9 ({status})\n{out}"
    );
    assert!(
        out.contains("No space left on device"),
        "the error should name the cause:\n{out}"
    );

    // The running tree is untouched, and everything still verifies while the disk is full.
    r.current_is_one_of(&["1"]);
    r.verify_all();
    assert_pool_complete(&r.root);
    fs::remove_file(&filler).unwrap();
    r.ts(["boot"]).success();
    r.current_is_one_of(&["1"]);
    r.assert_sound();
    assert_clean(&r.root, "2");
    // Objects written before the disk filled up stay in the pool (complete, and reused by
    // the next try); everything else is given back at once, and gc gives back the rest.
    let slack = 256 << 10;
    let after_boot = free_bytes(&mnt);
    assert!(
        after_boot + (objects as u64) * (260 << 10) + slack >= free_before,
        "the failed apply holds {} KiB after boot",
        (free_before.saturating_sub(after_boot)) >> 10
    );
    r.ts(["gc"]).success();
    let after_gc = free_bytes(&mnt);
    assert!(
        after_gc + slack >= free_before,
        "the failed apply still holds {} KiB after gc",
        (free_before.saturating_sub(after_gc)) >> 10
    );
    // And with room again, the update goes through.
    r.apply().success();
    r.current_is_one_of(&["2"]);
    r.assert_sound();
}

#[test]
fn a_disk_that_fills_up_while_objects_are_written_fails_cleanly() {
    if skip_unless_root() {
        return;
    }
    disk_fills_during_apply(Some(3));
}

#[test]
fn a_disk_that_fills_up_before_staging_fails_cleanly() {
    if skip_unless_root() {
        return;
    }
    disk_fills_during_apply(None);
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrency

/// Starts two commands at once and waits for both.
fn race(r: &Rig, a: &[&str], b: &[&str], wait: bool) -> (Run, Run) {
    let start = |args: &[&str]| {
        let mut c = r.cmd();
        if wait {
            c.arg("--wait");
        }
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let cmdline = format!("{c:?}");
        (cmdline, c.spawn().expect("spawn treeswap"))
    };
    let (ca, pa) = start(a);
    let (cb, pb) = start(b);
    let oa = pa.wait_with_output().unwrap();
    let ob = pb.wait_with_output().unwrap();
    (
        Run {
            cmdline: ca,
            out: oa,
        },
        Run {
            cmdline: cb,
            out: ob,
        },
    )
}

/// Without --wait each side succeeds or says "busy" (and at least one succeeds); with it both
/// succeed, one after the other. Either way the root stays sound.
#[track_caller]
fn check_race(a: &Run, b: &Run, wait: bool) -> (bool, bool) {
    let ok = |r: &Run| match r.code() {
        Some(0) => true,
        Some(6) if !wait => {
            r.stderr_has("busy");
            false
        }
        _ => panic!(
            "expected success{}\ncommand: {}\nstatus: {}\nstderr:\n{}",
            if wait { "" } else { " or busy (6)" },
            r.cmdline,
            r.out.status,
            r.stderr()
        ),
    };
    let (x, y) = (ok(a), ok(b));
    assert!(x || y, "both sides were busy");
    (x, y)
}

#[test]
fn two_applies_at_once() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let d13 = lab.env.path("1-3.delta");
    make_delta(lab.src("1"), lab.src("3"), "1", "3", &d13);
    let mut n = 0;
    for wait in [false, true] {
        for swap in [false, true] {
            n += 1;
            let r = lab.rig(lab.env.path(&format!("root-{n}")));
            r.import("1", true);
            let a = ["apply", s(&lab.delta), "--allow-downgrade"];
            let b = ["apply", s(&d13), "--allow-downgrade"];
            let (ra, rb) = if swap {
                let (y, x) = race(&r, &b, &a, wait);
                (x, y)
            } else {
                race(&r, &a, &b, wait)
            };
            let (x, y) = check_race(&ra, &rb, wait);
            let cur = r.current_is_one_of(&["2", "3"]);
            if x && y {
                // Both ran, one after the other: the later is current, the earlier previous.
                let other = if cur == "2" { "3" } else { "2" };
                assert_eq!(r.link("previous").as_deref(), Some(other));
            } else {
                assert_eq!(cur, if x { "2" } else { "3" });
            }
            r.assert_sound();
        }
    }
}

#[test]
fn apply_and_gc_at_once() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let mut n = 0;
    for wait in [false, true] {
        for swap in [false, true] {
            n += 1;
            let r = lab.rig(lab.env.path(&format!("root-{n}")));
            r.import("0", false);
            r.import("1", true);
            let a = ["apply", s(&lab.delta), "--no-restart"];
            let g = ["gc"];
            let (ra, rg) = if swap {
                let (y, x) = race(&r, &g, &a, wait);
                (x, y)
            } else {
                race(&r, &a, &g, wait)
            };
            let (applied, collected) = check_race(&ra, &rg, wait);
            r.current_is_one_of(&[if applied { "2" } else { "1" }]);
            if collected {
                assert!(
                    !r.root.join("trees/0").exists(),
                    "gc succeeded but left version 0"
                );
            }
            r.assert_sound();
        }
    }
}

#[test]
fn boot_and_apply_at_once() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::new();
    let mut n = 0;
    for wait in [false, true] {
        for swap in [false, true] {
            n += 1;
            let r = lab.rig(lab.env.path(&format!("root-{n}")));
            r.import("1", true);
            let a = ["apply", s(&lab.delta)];
            let b = ["boot"];
            let (ra, rb) = if swap {
                let (y, x) = race(&r, &b, &a, wait);
                (x, y)
            } else {
                race(&r, &a, &b, wait)
            };
            let (applied, _) = check_race(&ra, &rb, wait);
            r.current_is_one_of(&[if applied { "2" } else { "1" }]);
            r.assert_sound();
        }
    }
}
