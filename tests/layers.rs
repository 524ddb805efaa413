//! `scripts/check-layers.sh`, the layer rule of ARCHITECTURE.md: it passes on the sources as
//! they are, and fails, naming the file and line, on a use of a layer to the left or on an
//! import circle.

use std::path::Path;
use std::process::Command;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn check(src: &Path) -> (bool, String) {
    let out = Command::new(Path::new(REPO).join("scripts/check-layers.sh"))
        .arg(src)
        .output()
        .expect("run scripts/check-layers.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A copy of `src/` with `edit` applied to the file `rel`.
fn sources_with(rel: &str, edit: impl FnOnce(String) -> String) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(Path::new(REPO).join("src"))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    let p = tmp.path().join("src").join(rel);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, edit(text)).unwrap();
    tmp
}

#[test]
fn the_sources_keep_the_layers() {
    let (ok, text) = check(&Path::new(REPO).join("src"));
    assert!(ok, "{text}");
    assert!(text.contains("no upward use, no circle"), "{text}");
}

#[test]
fn a_use_of_a_layer_to_the_left_fails() {
    let cases = [
        (
            "core/path.rs",
            "use crate::ops::flip;\n",
            "core/path.rs:1: `crate::ops::flip`: layer core uses ops",
        ),
        (
            "fs/hash.rs",
            "use crate::store::{pool::Pool, root};\n",
            "fs/hash.rs:1: `crate::store::pool::Pool`: layer fs uses store",
        ),
        (
            "tree/scan.rs",
            "fn f() { let _ = crate::ops::gc::gc; }\n",
            "tree/scan.rs:1: `crate::ops::gc::gc`: layer tree uses ops",
        ),
    ];
    for (file, line, want) in cases {
        let tmp = sources_with(file, |t| format!("{line}{t}"));
        let (ok, text) = check(&tmp.path().join("src"));
        assert!(!ok, "{file}: passed with `{line}`: {text}");
        assert!(text.contains(want), "{file}: {text}");
    }
}

#[test]
fn comments_and_strings_do_not_count() {
    let tmp = sources_with("core/path.rs", |t| {
        format!("// crate::ops::flip\nconst _S: &str = \"crate::ops::flip\";\n{t}")
    });
    let (ok, text) = check(&tmp.path().join("src"));
    assert!(ok, "{text}");
}

#[test]
fn an_import_circle_within_a_layer_fails() {
    // Neither uses the other today: make each use the other.
    let tmp = sources_with("ops/flip.rs", |t| format!("use crate::ops::gc;\n{t}"));
    let gc = tmp.path().join("src/ops/gc.rs");
    let text = std::fs::read_to_string(&gc).unwrap();
    std::fs::write(&gc, format!("use crate::ops::flip;\n{text}")).unwrap();
    let (ok, text) = check(&tmp.path().join("src"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("import circle among ops/flip, ops/gc"),
        "{text}"
    );
}
