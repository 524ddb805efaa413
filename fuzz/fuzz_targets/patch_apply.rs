//! The decoding and storing `apply` does, on an arbitrary blob, reference and declared size
//! (at most 1 MiB), through the production path: `treeswap::ops::fuzz::decode_into_pool`,
//! which decodes with `codec::stream` (`zstd`, `zstd-patch`) or `codec::bsdiff_apply`
//! (`bsdiff`) into `Pool::store` of a real pool in a temporary directory. It must never
//! panic; an object it publishes must be exactly `size` bytes with the declared sha256; a
//! refused one leaves nothing in the pool; no temporary file is ever left in `tmp/`; and
//! nothing may allocate absurdly (libFuzzer's `-malloc_limit_mb` and `-rss_limit_mb` catch
//! that; `scripts/fuzz.sh` sets them).
//!
//! Input layout: byte 0 picks the source (0xf0 and above: an `xz` blob of a whole content;
//! else `% 4`); if its bit 7 is set, the 32 bytes after the
//! reference length are the declared sha256 (seeds of real blobs carry theirs, so that the
//! publishing path is reached), else it is all zeros (which nothing decodes to). Bytes 1..4
//! are the size (little-endian, modulo 1 MiB + 1), then 2 bytes of reference length, [the
//! sha256,] the reference, the blob. As in `apply`, a source gets the reference only if it is
//! a patch.
#![no_main]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use treeswap::core::delta::{Codec, Source};
use treeswap::core::object::{Meta, object_id};

const MAX_SIZE: u64 = 1 << 20;

/// A directory with `pool/` and `tmp/`, made once per process: in `$TREESWAP_FUZZ_DIR`
/// (`scripts/fuzz.sh` gives one it removes afterwards; libFuzzer exits without running
/// destructors), else a new temporary directory that is kept. It holds nothing between
/// inputs.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = match std::env::var_os("TREESWAP_FUZZ_DIR") {
            Some(d) => tempfile::Builder::new()
                .prefix("patch_apply-")
                .tempdir_in(d)
                .expect("a directory in $TREESWAP_FUZZ_DIR")
                .keep(),
            None => tempfile::Builder::new()
                .prefix("treeswap-fuzz-")
                .tempdir()
                .expect("a temporary directory")
                .keep(),
        };
        for sub in ["pool", "tmp"] {
            std::fs::create_dir(dir.join(sub)).expect("mkdir");
        }
        dir
    })
}

fn names(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("readdir").file_name())
        .collect()
}

/// The declared size: bytes 1..4, modulo `MAX_SIZE + 1`.
fn size_of(data: &[u8]) -> u64 {
    u64::from(u32::from_le_bytes([data[1], data[2], data[3], 0])) % (MAX_SIZE + 1)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    // From 0xf0: an `xz` blob of a whole content.
    let codec = if data[0] >= 0xf0 { Codec::Xz } else { Codec::Zstd };
    let source = match data[0] % 4 {
        _ if codec == Codec::Xz => Source::Zstd,
        0 => Source::Base,
        1 => Source::Zstd,
        2 => Source::ZstdPatch { base: [0; 32] },
        _ => Source::Bsdiff { base: [0; 32] },
    };
    let size = size_of(data);
    let ref_len = usize::from(u16::from_le_bytes([data[4], data[5]]));
    let mut rest = &data[6..];
    let mut sha = [0u8; 32];
    if data[0] & 0x80 != 0 {
        let Some((s, r)) = rest.split_first_chunk::<32>() else {
            return;
        };
        sha = *s;
        rest = r;
    }
    let (reference, blob) = rest.split_at(ref_len.min(rest.len()));
    let meta = Meta {
        mode: 0o644,
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
        xattrs: Default::default(),
    };
    let root = root();
    let id = hex::encode(object_id(&meta, size, &sha));
    let object = root.join("pool").join(&id);
    let r = treeswap::ops::fuzz::decode_into_pool(
        root, &source, codec, blob, reference, size, &sha, &meta,
    );
    match r {
        Ok(true) => {
            // Published: exactly the declared bytes.
            let mut f = std::fs::File::open(&object).expect("the published object");
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            loop {
                let k = f.read(&mut buf).expect("read the object");
                if k == 0 {
                    break;
                }
                n += k as u64;
                h.update(&buf[..k]);
            }
            assert_eq!(n, size, "a published object has the wrong size");
            assert_eq!(
                <[u8; 32]>::from(h.finalize()),
                sha,
                "a published object has the wrong sha256"
            );
            std::fs::remove_file(&object).expect("remove the object");
        }
        Ok(false) => assert!(
            matches!(source, Source::Base),
            "nothing was published, yet no error: only `base` stores nothing"
        ),
        Err(_) => assert!(!object.exists(), "a refused object was published"),
    }
    assert!(
        names(&root.join("pool")).is_empty(),
        "the pool holds something"
    );
    let left = names(&root.join("tmp"));
    assert!(left.is_empty(), "temporary files left in tmp/: {left:?}");
});
