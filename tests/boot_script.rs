//! The initramfs boot logic (`scripts/initramfs-tools/treeswap-root.sh`, shared by the
//! initramfs-tools script and the dracut module) without a VM: `scripts/vm/test-root-script.sh`
//! runs it in a private mount namespace against a loop-mounted ext4 image holding a state root,
//! with a file bind-mounted on `/proc/cmdline`. The VM itself is `scripts/vm-test.sh`.

mod common;

use common::{BIN, skip_unless_root};
use std::path::Path;
use std::process::Command;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The current tree is bound read-only, `/var` comes from the device, `treeswap.tries=`
/// overrides the config, a pending tree past its tries is reverted and the console says so.
/// Regression: the revert (`treeswap boot` exits 5) stopped a caller running under `set -e`
/// before the tree was mounted.
#[test]
fn initramfs_script_boots_the_current_tree() {
    if skip_unless_root() {
        return;
    }
    let out = Command::new(Path::new(REPO).join("scripts/vm/test-root-script.sh"))
        .env("TREESWAP", BIN)
        .output()
        .expect("run scripts/vm/test-root-script.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "test-root-script.sh failed:\n{text}");
    assert!(
        text.contains("test-root-script: all checks passed"),
        "{text}"
    );
}
