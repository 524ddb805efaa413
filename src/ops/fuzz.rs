//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`): production paths that a command
//! reaches only with a whole state root, callable on one input. The other is
//! `apply::read_delta_head`.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::Result;

use crate::core::codec;
use crate::core::delta::Source;
use crate::core::object::{Hash, Meta};
use crate::store::pool::Pool;

/// Decodes `blob` as `apply` does for a content of `source` (`codec::stream`, given
/// `reference` only if it is a patch; `codec::bsdiff_apply` for bsdiff) and stores what it
/// gives with `Pool::store` as an object of `size` bytes, sha256 `sha256` and metadata `meta`
/// in the pool of `root` (a directory that holds `pool/` and `tmp/`). Returns whether the
/// object was new; `Source::Base` has nothing to decode and stores nothing.
pub fn decode_into_pool(
    root: &Path,
    source: &Source,
    blob: &[u8],
    reference: &[u8],
    size: u64,
    sha256: &Hash,
    meta: &Meta,
) -> Result<bool> {
    let dir = crate::fs::sys::open_dir(root)?;
    let pool = Pool::open(dir.as_fd())?;
    match source {
        Source::Base => Ok(false),
        Source::Zstd | Source::ZstdPatch { .. } => {
            let reference = source.base().map(|_| reference);
            let mut dec = codec::stream(source, blob, reference, size)?;
            pool.store(&mut dec, meta, size, sha256)
        }
        Source::Bsdiff { .. } => {
            let out = codec::bsdiff_apply(reference, blob, size)?;
            pool.store(&mut &out[..], meta, size, sha256)
        }
    }
}
