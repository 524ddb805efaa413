//! `codec::decode` with each source, an arbitrary blob, an arbitrary reference and a declared
//! size of at most 1 MiB. It must never panic, never return other than exactly `size` bytes,
//! and never allocate absurdly (libFuzzer's `-malloc_limit_mb` and `-rss_limit_mb` catch that;
//! `scripts/fuzz.sh` sets them).
//!
//! Input layout: byte 0 picks the source, bytes 1..4 the size (little-endian, modulo 1 MiB + 1),
//! bytes 4..6 the reference length, then the reference, then the blob.
#![no_main]

use libfuzzer_sys::fuzz_target;
use treeswap::core::delta::Source;

const MAX_SIZE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let source = match data[0] % 4 {
        0 => Source::Base,
        1 => Source::Zstd,
        2 => Source::ZstdPatch { base: [0; 32] },
        _ => Source::Bsdiff { base: [0; 32] },
    };
    let size = u64::from(u32::from_le_bytes([data[1], data[2], data[3], 0])) % (MAX_SIZE + 1);
    let ref_len = usize::from(u16::from_le_bytes([data[4], data[5]]));
    let rest = &data[6..];
    let (reference, blob) = rest.split_at(ref_len.min(rest.len()));
    // With no reference as well, so that the "needs a reference" paths run too.
    let reference = (data[0] & 4 == 0).then_some(reference);
    if let Ok(out) = treeswap::core::codec::decode(&source, blob, reference, size) {
        assert_eq!(out.len() as u64, size, "decode returned the wrong length");
    }
});
