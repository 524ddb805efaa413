//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`): production paths that a command
//! reaches only with a whole state root, callable on one input. The other is
//! `apply::read_delta_head`.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::Result;

use crate::core::codec;
use crate::core::delta::{Codec, Content, Source};
use crate::core::object::{Hash, Meta};
use crate::store::pool::Pool;

/// Decodes `blob` as `apply` does for a content of `source` and `codec` (`codec::decoder_of`,
/// given `reference` only if it is a patch) and stores what it gives with
/// `Pool::store_bounded`, as `apply`'s `write_content` does, as an object of `size` bytes,
/// sha256 `sha256` and metadata `meta` in the pool of `root` (a directory that holds `pool/`
/// and `tmp/`). Returns whether the object was new; `Source::Base` has nothing to decode and
/// stores nothing.
#[allow(clippy::too_many_arguments)]
pub fn decode_into_pool(
    root: &Path,
    source: &Source,
    codec: Codec,
    blob: &[u8],
    reference: &[u8],
    size: u64,
    sha256: &Hash,
    meta: &Meta,
) -> Result<bool> {
    let dir = crate::fs::sys::open_dir(root)?;
    let pool = Pool::open(dir.as_fd())?;
    if *source == Source::Base {
        return Ok(false);
    }
    let c = Content {
        sha256: *sha256,
        size,
        data: None,
        source: source.clone(),
        codec,
        blob: None,
    };
    let reference = source.base().map(|_| reference);
    let mut dec = codec::decoder_of(&c, Box::new(blob), reference)?;
    pool.store_bounded(&mut dec, meta, size, sha256, c.data)
}
