//! On-disk names: every legal version name has files of its own, whatever else is installed;
//! and a root of the older root format is read as it is and migrated by the first writer.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// A state root whose config makes `/etc` private copies, so that a tree's layout matters to
/// `verify --full`.
struct Scratch {
    env: Env,
    cfg: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let env = Env::new();
        let cfg = env.path("treeswap.toml");
        fs::write(&cfg, "private = [\"/etc/**\"]\n").unwrap();
        let s = Scratch { env, cfg };
        s.ts(["init"]).success();
        s
    }

    fn root(&self) -> &Path {
        &self.env.root
    }

    /// `treeswap --root ROOT --config CFG ARGS...`
    fn ts<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = ts_cmd();
        c.arg("--root")
            .arg(self.root())
            .arg("--config")
            .arg(&self.cfg)
            .args(args);
        run(&mut c)
    }

    /// A tree with a private file and a linked one, both depending on `n`.
    fn tree(&self, name: &str, n: u32) -> PathBuf {
        self.env.tree(
            name,
            &TreeSpec::new()
                .file("etc/conf", format!("setting = {n}\n"))
                .file("usr/bin/tool", format!("tool {n}\n"))
                .mode(0o755),
        )
    }

    fn import(&self, dir: &Path, version: &str) {
        self.ts([
            OsStr::new("import"),
            dir.as_os_str(),
            OsStr::new("--version"),
            OsStr::new(version),
        ])
        .success();
    }

    /// `diff --from-dir A --to-dir B --from-version FROM --to-version TO`, then `apply`.
    fn apply(&self, a: &Path, b: &Path, from: &str, to: &str) {
        let delta = self.env.path(&format!("{to}.tsd"));
        diff_from_dirs(a, b, from, to, &delta).success();
        self.ts([
            OsStr::new("apply"),
            delta.as_os_str(),
            OsStr::new("--no-restart"),
        ])
        .success();
    }

    /// `gc` removes `1`; `1.layout` stays whole, with its manifest and its layout only.
    #[track_caller]
    fn gc_removes_1_and_keeps_1_layout(&self) {
        self.ts(["gc"])
            .success()
            .stdout_has("removed 1 tree(s) (1)");
        self.verify("1.layout");
        assert_eq!(self.listing("manifests"), ["1.layout.toml"]);
        assert_eq!(self.listing("layouts"), ["1.layout.toml"]);
    }

    #[track_caller]
    fn verify(&self, version: &str) {
        self.ts(["verify", version, "--full"]).success();
    }

    /// The names in a directory of the root, sorted.
    fn listing(&self, dir: &str) -> Vec<String> {
        names(&self.root().join(dir))
            .iter()
            .map(|n| show(n))
            .collect()
    }

    fn format(&self) -> Option<String> {
        fs::read_to_string(self.root().join("format")).ok()
    }
}

/// Regression (issue 15, item 5): with `1` installed, a version named `1.layout` made
/// `manifests/1.layout.toml` both its manifest and the layout of `1`: the apply succeeded,
/// `verify 1` then failed, and a `gc` of `1` deleted the manifest of `1.layout`.
#[test]
fn regression_issue15_item5_a_version_named_like_a_layout_file_has_its_own_files() {
    let s = Scratch::new();
    let (a, b) = (s.tree("a", 1), s.tree("b", 2));
    s.import(&a, "1");
    s.apply(&a, &b, "1", "1.layout");
    s.verify("1");
    s.verify("1.layout");
    s.gc_removes_1_and_keeps_1_layout();
}

/// Regression (issue 15, item 5), the other ways round: with only `1.layout` installed, the
/// next writer took `manifests/1.layout.toml` for a leftover layout of the absent `1` and
/// removed it; and installing `1` after `1.layout` wrote the layout of `1` over the manifest
/// of `1.layout`.
#[test]
fn regression_issue15_item5_a_layout_file_never_takes_a_manifest_s_name() {
    let s = Scratch::new();
    s.import(&s.tree("a", 1), "1.layout");
    // Any writer clears leftovers under its lock.
    s.ts(["pin", "1.layout"]).success();
    s.verify("1.layout");
    s.import(&s.tree("b", 2), "1");
    s.verify("1");
    s.verify("1.layout");
    s.gc_removes_1_and_keeps_1_layout();
}

/// Makes the root look as a treeswap of root format 1 left it: every layout beside its
/// manifest as `manifests/<V>.layout.toml`, no `format`. The versions in `moved` keep theirs in
/// `layouts/`, as a migration cut short leaves them; with none, there is no `layouts/`.
fn to_format_1(root: &Path, moved: &[&str]) {
    for n in names(&root.join("layouts")) {
        let v = show(&n).strip_suffix(".toml").unwrap().to_owned();
        if !moved.contains(&v.as_str()) {
            fs::rename(
                root.join("layouts").join(bpath(&n)),
                root.join("manifests").join(format!("{v}.layout.toml")),
            )
            .unwrap();
        }
    }
    if moved.is_empty() {
        fs::remove_dir(root.join("layouts")).unwrap();
    }
    fs::remove_file(root.join("format")).unwrap();
}

/// A root of root format 1 (no `format` file, layouts beside the manifests): readers use it as
/// it is and change nothing; the first writer moves each layout to `layouts/` and records
/// format 2; verify, apply and gc work after.
#[test]
fn a_format_1_root_is_read_as_it_is_and_migrated_by_the_first_writer() {
    let s = Scratch::new();
    assert_eq!(s.format().as_deref(), Some("2\n"), "a new root is format 2");
    let (a, b, c) = (s.tree("a", 1), s.tree("b", 2), s.tree("c", 3));
    s.import(&a, "1");
    s.import(&b, "2");
    s.ts(["switch", "2", "--no-restart"]).success();
    to_format_1(s.root(), &[]);
    let layout_1 = fs::read(s.root().join("manifests/1.layout.toml")).unwrap();
    assert!(String::from_utf8_lossy(&layout_1).contains("/etc/**"));

    // Readers (shared lock) read it as it is, and change nothing.
    s.verify("1");
    s.verify("2");
    s.ts(["status"]).success();
    s.ts(["list"]).success().stdout_has("2");
    assert_eq!(s.format(), None);
    assert!(!s.root().join("layouts").exists());
    assert_eq!(
        s.listing("manifests"),
        ["1.layout.toml", "1.toml", "2.layout.toml", "2.toml"]
    );

    // The first writer migrates it: each layout moved as it was, the format recorded.
    s.ts(["pin", "1"]).success();
    assert_eq!(s.format().as_deref(), Some("2\n"));
    assert_eq!(s.listing("manifests"), ["1.toml", "2.toml"]);
    assert_eq!(s.listing("layouts"), ["1.toml", "2.toml"]);
    assert_eq!(fs::read(s.root().join("layouts/1.toml")).unwrap(), layout_1);
    s.verify("1");
    s.verify("2");

    // Everything works after: apply, gc, verify.
    s.apply(&b, &c, "2", "3");
    s.verify("3");
    s.ts(["unpin", "1"]).success();
    s.ts(["gc"]).success().stdout_has("removed 1 tree(s) (1)");
    assert_eq!(s.listing("manifests"), ["2.toml", "3.toml"]);
    assert_eq!(s.listing("layouts"), ["2.toml", "3.toml"]);
    s.verify("2");
    s.verify("3");
}

/// A migration cut short (some layouts in `layouts/` already, no `format` yet) is finished by
/// the next writer, and readers find every layout in between. A format-1 file
/// `manifests/<V>.layout.toml` that is not a layout is the manifest of `<V>.layout` and stays.
#[test]
fn a_migration_cut_short_is_finished_and_a_manifest_named_like_a_layout_stays() {
    let s = Scratch::new();
    s.import(&s.tree("a", 1), "1");
    s.import(&s.tree("b", 2), "1.layout");
    to_format_1(s.root(), &["1"]);
    assert_eq!(
        s.listing("manifests"),
        ["1.layout.layout.toml", "1.layout.toml", "1.toml"]
    );
    assert_eq!(s.listing("layouts"), ["1.toml"]);
    s.verify("1");
    s.verify("1.layout");
    assert_eq!(s.format(), None, "readers do not migrate");

    s.ts(["pin", "1"]).success();
    assert_eq!(s.format().as_deref(), Some("2\n"));
    assert_eq!(s.listing("manifests"), ["1.layout.toml", "1.toml"]);
    assert_eq!(s.listing("layouts"), ["1.layout.toml", "1.toml"]);
    s.verify("1");
    s.verify("1.layout");
    s.ts(["gc"])
        .success()
        .stdout_has("removed 1 tree(s) (1.layout)");
    assert_eq!(s.listing("manifests"), ["1.toml"]);
    assert_eq!(s.listing("layouts"), ["1.toml"]);
    s.verify("1");
}

/// A root of a root format this treeswap does not know is refused by readers and writers
/// alike, with one line, and left as it is.
#[test]
fn a_root_of_an_unknown_format_is_refused() {
    let s = Scratch::new();
    s.import(&s.tree("a", 1), "1");
    fs::write(s.root().join("format"), "3\n").unwrap();
    for args in [&["list"][..], &["verify", "1"], &["gc"], &["init"]] {
        let r = s.ts(args);
        r.exit(1).stderr_has("root format `3`");
        assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
    }
    assert_eq!(s.format().as_deref(), Some("3\n"));
    assert_eq!(s.listing("trees"), ["1"]);
    assert_eq!(s.listing("manifests"), ["1.toml"]);
    assert_eq!(s.listing("layouts"), ["1.toml"]);
}
