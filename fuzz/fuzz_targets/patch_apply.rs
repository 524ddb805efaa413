//! The decoding `apply` does, on an arbitrary blob, reference and declared size (at most
//! 1 MiB): `codec::stream` for `zstd` and `zstd-patch` blobs, read the way `Pool::store` reads
//! it (in pieces, refused as soon as it gives more than the declared size), and
//! `codec::bsdiff_apply` for `bsdiff` blobs, `codec::xz_decoder` (read the same way) for
//! `xz` blobs. It must never panic, `bsdiff_apply` must never
//! return other than `size` bytes, and nothing may allocate absurdly (libFuzzer's
//! `-malloc_limit_mb` and `-rss_limit_mb` catch that; `scripts/fuzz.sh` sets them).
//!
//! Input layout: byte 0 picks the source (0xf0 and above: `xz`, whose blob is everything
//! from byte 6 on; else modulo 4), bytes 1..4 the size (little-endian, modulo 1 MiB + 1),
//! bytes 4..6 the reference length, then the reference, then the blob. As in `apply`, a source
//! gets the reference only if it is a patch.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use treeswap::core::codec;
use treeswap::core::delta::Source;

const MAX_SIZE: u64 = 1 << 20;

/// How `Pool::store` reads a decoder (src/store/pool.rs; a copy, since that loop writes to
/// the pool): pieces of its I/O buffer, refused as soon as the total passes `size`, then
/// unless it is exactly `size` (and has the content's sha256, which is not checked here: an
/// arbitrary input cannot have it). Returns the bytes read, if accepted.
fn read_like_pool_store(src: &mut dyn Read, size: u64) -> Option<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut written = 0u64;
    loop {
        let n = src.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > size {
            return None;
        }
    }
    (written == size).then_some(written)
}

/// The declared size: bytes 1..4, modulo `MAX_SIZE + 1`.
fn size_of(data: &[u8]) -> u64 {
    u64::from(u32::from_le_bytes([data[1], data[2], data[3], 0])) % (MAX_SIZE + 1)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    if data[0] >= 0xf0 {
        // An `xz` blob: a whole content, no reference.
        if let Ok(mut dec) = codec::xz_decoder(Box::new(&data[6..]), size_of(data)) {
            let _ = read_like_pool_store(&mut dec, size_of(data));
        }
        return;
    }
    let source = match data[0] % 4 {
        0 => Source::Base,
        1 => Source::Zstd,
        2 => Source::ZstdPatch { base: [0; 32] },
        _ => Source::Bsdiff { base: [0; 32] },
    };
    let size = size_of(data);
    let ref_len = usize::from(u16::from_le_bytes([data[4], data[5]]));
    let rest = &data[6..];
    let (reference, blob) = rest.split_at(ref_len.min(rest.len()));
    match &source {
        // `apply` copies a `base` content from the base tree or the pool: nothing to decode.
        Source::Base => {}
        Source::Zstd | Source::ZstdPatch { .. } => {
            let reference = source.base().map(|_| reference);
            if let Ok(mut dec) = codec::stream(&source, blob, reference, size) {
                let _ = read_like_pool_store(&mut dec, size);
            }
        }
        Source::Bsdiff { .. } => {
            if let Ok(out) = codec::bsdiff_apply(reference, blob, size) {
                assert_eq!(out.len() as u64, size, "bsdiff_apply returned the wrong length");
            }
        }
    }
});
