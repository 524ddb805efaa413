//! The encodings of delta blobs: whole zstd, whole xz, zstd with a reference prefix
//! ("patch-from"), and zstd-compressed bsdiff. Pure functions over byte slices, shared by `diff` (encoding),
//! `apply` (decoding: [`stream`] and [`bsdiff_apply`]) and the `patch_apply` fuzz target.

use std::io::{BufRead, Read, Write};

use anyhow::{Result, bail};

use crate::core::delta::{Codec, Content, Source};
use crate::core::error::Fail;

/// zstd level of the blobs a delta ships. Measured on a Debian point release: level 12 makes
/// a delta 2% larger than level 19 in a third of the time; both decode equally fast.
pub const LEVEL: i32 = 12;
/// zstd level used to compare candidate references before the final encoding: ~50x faster
/// than [`LEVEL`] and ranks references the same way in practice.
pub(crate) const SCOUT_LEVEL: i32 = 3;

/// The largest zstd window a blob may use, as a log: 64 MiB. A decoder holds at most this
/// much of the content it produces, whatever the blob's frame header or the manifest
/// declares (FORMAT.md, "Limits").
pub const WINDOW_LOG_MAX: u32 = 26;
/// The largest reference a patch may name (FORMAT.md): `apply` holds it whole while it
/// decodes, and a patch cannot reach further back than the window anyway.
pub const MAX_REFERENCE: u64 = 1 << WINDOW_LOG_MAX;

/// zstd window log that covers `n` bytes of reference plus `m` of content, at most
/// [`WINDOW_LOG_MAX`].
pub(crate) fn window_log(n: u64, m: u64) -> u32 {
    let total = n.saturating_add(m).clamp(1 << 10, 1 << 31);
    (64 - (total - 1).leading_zeros()).clamp(10, WINDOW_LOG_MAX)
}

pub(crate) fn zstd_whole(data: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    // Levels 20 to 22 use windows beyond the format's limit; the others stay below it.
    if level > 19 {
        c.set_parameter(zstd::stream::raw::CParameter::WindowLog(WINDOW_LOG_MAX))?;
    }
    Ok(c.compress(data)?)
}

/// A streaming encoder of a whole `zstd` blob of a content of `size` bytes into `out`, with
/// the same window limit as [`zstd_whole`] and the size in the frame header.
pub(crate) fn whole_encoder<W: Write>(
    out: W,
    level: i32,
    size: u64,
) -> Result<zstd::stream::write::Encoder<'static, W>> {
    let mut enc = zstd::stream::write::Encoder::new(out, level)?;
    if level > 19 {
        enc.window_log(WINDOW_LOG_MAX)?;
    }
    enc.set_pledged_src_size(Some(size))?;
    Ok(enc)
}

/// A `zstd-patch` blob: `data` compressed with `base` (at most [`MAX_REFERENCE`] bytes) as
/// reference prefix.
pub(crate) fn zstd_patch(base: &[u8], data: &[u8], level: i32) -> Result<Vec<u8>> {
    anyhow::ensure!(
        base.len() as u64 <= MAX_REFERENCE,
        "a patch reference is larger than {MAX_REFERENCE} bytes"
    );
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, base)?;
    // The content's size in the frame header: a decoder's window buffer is then no larger
    // than the content (issue 17: 40 MB instead of 64 MiB for apt's srcpkgcache.bin).
    enc.set_pledged_src_size(Some(data.len() as u64))?;
    enc.window_log(window_log(base.len() as u64, data.len() as u64))?;
    // Long-distance matching finds the reference's long runs even at low levels, whose
    // small hash tables would otherwise lose most of a big reference.
    enc.long_distance_matching(level < 10 || base.len() > 8 << 20)?;
    enc.include_checksum(false)?;
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

pub(crate) fn bsdiff_patch(base: &[u8], data: &[u8]) -> Result<Vec<u8>> {
    let mut patch = Vec::new();
    crate::core::bsdiff::diff(base, data, &mut patch);
    Ok(zstd::bulk::compress(&patch, LEVEL)?)
}

fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    Fail::BadDelta(format!("invalid delta: cannot decode a blob: {e}")).into()
}

/// A streaming decoder of the blob `blob` (any source but `base`) of a content of `size`
/// bytes, against `reference` for a patch. Its read errors carry [`Fail::BadDelta`], so they
/// say the delta is malformed rather than that I/O failed. Memory is bounded by the format,
/// not by the input: the window by [`WINDOW_LOG_MAX`] and by what the encoder could have used
/// for this reference and size; a bsdiff patch streams record by record (`core::bsdiff`).
/// The decoder yields the content's bytes; the caller stops after `size` of them.
pub fn decoder<'a>(
    source: &Source,
    blob: Box<dyn BufRead + 'a>,
    reference: Option<&'a [u8]>,
    size: u64,
) -> Result<Box<dyn Read + 'a>> {
    let ref_len = reference.map_or(0, |r| r.len() as u64);
    if ref_len > MAX_REFERENCE {
        return Err(bad(format!(
            "its reference is larger than {MAX_REFERENCE} bytes"
        )));
    }
    match (source, reference) {
        (Source::Zstd, _) => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(blob).map_err(bad)?;
            dec.window_log_max(window_log(0, size)).map_err(bad)?;
            Ok(Box::new(Tagged(dec)))
        }
        (Source::ZstdPatch { .. }, Some(r)) => {
            let mut dec = zstd::stream::read::Decoder::with_ref_prefix(blob, r).map_err(bad)?;
            dec.window_log_max(window_log(ref_len, size)).map_err(bad)?;
            Ok(Box::new(Tagged(dec)))
        }
        (Source::Bsdiff { .. }, Some(r)) => {
            // The patch is about as long as the result plus what it adds: a compression bomb
            // stops once it has given three times the declared size.
            let limit = size.saturating_mul(3).saturating_add(1 << 20);
            let mut dec = zstd::stream::read::Decoder::with_buffer(blob).map_err(bad)?;
            dec.window_log_max(window_log(0, limit)).map_err(bad)?;
            let patch = Tagged(dec).take(limit);
            Ok(Box::new(Tagged(crate::core::bsdiff::Patcher::new(
                r, patch,
            ))))
        }
        _ => bail!("no decoder for a `{}` blob", source.name()),
    }
}

/// The largest memory an xz blob's decoder may use beyond its dictionary (liblzma's own
/// state: well under 1 MiB for the LZMA2 filter).
const XZ_OVERHEAD: u64 = 1 << 20;

/// The dictionary an xz encoder uses for `size` bytes of content: what covers the content, a
/// power of two from 4 KiB on, at most `2^WINDOW_LOG_MAX` (FORMAT.md). A decoder allows
/// no more than this plus [`XZ_OVERHEAD`].
pub fn xz_dict(size: u64) -> u32 {
    1u32 << window_log(0, size).max(12)
}

/// liblzma's memory limit for decoding an xz blob (or one of its blocks,
/// `core::xz::decode_parallel`) of a content of `size` bytes: [`xz_dict`] of it plus
/// [`XZ_OVERHEAD`].
pub fn xz_memlimit(size: u64) -> u64 {
    u64::from(xz_dict(size)) + XZ_OVERHEAD
}

/// A streaming decoder of an `xz` blob (one .xz stream, FORMAT.md) of a content of `size`
/// bytes. Its memory is limited by liblzma to [`xz_dict`] of the size plus [`XZ_OVERHEAD`],
/// whatever the stream's headers declare: a stream that needs more fails, as malformed.
pub fn xz_decoder<'a>(blob: Box<dyn BufRead + 'a>, size: u64) -> Result<Box<dyn Read + 'a>> {
    let stream = xz2::stream::Stream::new_stream_decoder(xz_memlimit(size), 0).map_err(bad)?;
    Ok(Box::new(Tagged(xz2::bufread::XzDecoder::new_stream(
        blob, stream,
    ))))
}

/// The decoder of content `c`'s blob: [`decoder`], or [`xz_decoder`] for an `xz` blob.
pub fn decoder_of<'a>(
    c: &Content,
    blob: Box<dyn BufRead + 'a>,
    reference: Option<&'a [u8]>,
) -> Result<Box<dyn Read + 'a>> {
    match (&c.source, c.codec) {
        (Source::Zstd, Codec::Xz) => xz_decoder(blob, c.size),
        (_, Codec::Xz) => bail!("no decoder for an xz `{}` blob", c.source.name()),
        (source, Codec::Zstd) => decoder(source, blob, reference, c.size),
    }
}

/// Decodes an `xz` blob whole, as [`decode_all`] does.
pub fn xz_decode_all(blob: &[u8], size: u64) -> Result<Vec<u8>> {
    read_exactly(xz_decoder(Box::new(blob), size)?, size)
}

/// What `dec` gives, read to at most `size + 1` bytes (the pool refuses more than `size`),
/// which must be exactly `size`.
fn read_exactly(dec: Box<dyn Read + '_>, size: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    dec.take(size.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 != size {
        return Err(bad(format!(
            "it decodes to {}{} bytes, the manifest says {size}",
            out.len(),
            if out.len() as u64 > size { "+" } else { "" }
        )));
    }
    Ok(out)
}

/// [`decoder`] of a blob held in memory.
pub fn stream<'a>(
    source: &Source,
    blob: &'a [u8],
    reference: Option<&'a [u8]>,
    size: u64,
) -> Result<Box<dyn Read + 'a>> {
    decoder(source, Box::new(blob), reference, size)
}

/// Decodes a blob whole, as the fuzz target and tests check it: [`stream`] read to at most
/// `size + 1` bytes (the pool refuses more than `size`), which must be exactly `size`.
pub fn decode_all(
    source: &Source,
    blob: &[u8],
    reference: Option<&[u8]>,
    size: u64,
) -> Result<Vec<u8>> {
    read_exactly(stream(source, blob, reference, size)?, size)
}

/// Applies a zstd-compressed bsdiff patch whole ([`decode_all`] of a `bsdiff` blob).
pub fn bsdiff_apply(reference: &[u8], blob: &[u8], size: u64) -> Result<Vec<u8>> {
    decode_all(
        &Source::Bsdiff { base: [0; 32] },
        blob,
        Some(reference),
        size,
    )
}

struct Tagged<R: Read>(R);

impl<R: Read> Read for Tagged<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|inner| inner.is::<Fail>()) {
                // Tagged already, by an inner decoder.
                return e;
            }
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                Fail::BadDelta(format!("invalid delta: cannot decode a blob: {e}")),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::codec::decode_all as decode;

    #[test]
    fn encodings_round_trip_and_bombs_stop() {
        let base: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut new = base.clone();
        new[5000..5010].copy_from_slice(b"0123456789");
        let z = zstd_whole(&new, LEVEL).unwrap();
        assert_eq!(
            decode(&Source::Zstd, &z, None, new.len() as u64).unwrap(),
            new
        );
        let p = zstd_patch(&base, &new, LEVEL).unwrap();
        let src = Source::ZstdPatch { base: [0; 32] };
        assert!(p.len() < z.len());
        assert_eq!(
            decode(&src, &p, Some(&base), new.len() as u64).unwrap(),
            new
        );
        let b = bsdiff_patch(&base, &new).unwrap();
        let src = Source::Bsdiff { base: [0; 32] };
        assert_eq!(
            decode(&src, &b, Some(&base), new.len() as u64).unwrap(),
            new
        );
        // A declared size smaller than the output: refused, not expanded.
        let bomb = zstd_whole(&vec![0u8; 64 << 20], LEVEL).unwrap();
        assert!(decode(&Source::Zstd, &bomb, None, 10).is_err());
        assert!(decode(&Source::Zstd, b"garbage", None, 10).is_err());
    }
}
