//! The blocks of an `xz` blob: one .xz stream may hold several independently compressed
//! blocks (`diff` cuts a big content into blocks of [`BLOCK`] bytes), listed with their sizes
//! in the stream's index at its end. [`index`] reads that index; [`decode_parallel`] decodes
//! the blocks on several threads and yields the content in order, each block checked by
//! liblzma as a stream of its own (block header, data and CRC, index, footer). Pure: the
//! caller reads the blob (`read_at`, `open`), threads are the only resource used.
//!
//! The .xz format: <https://tukaani.org/xz/xz-file-format.txt>.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::sync::{Condvar, Mutex};

use anyhow::Result;

use crate::core::error::Fail;

/// The content `diff` puts in one block: apt's 40 MB `pkgcache.bin` in 10 blocks costs 8 KB
/// (0.08%) more than one block at preset 0, and decodes on two cores in about half the time.
pub const BLOCK: u64 = 4 << 20;
/// The largest block [`index`] hands to [`decode_parallel`], which holds a few decoded
/// blocks at once: a stream with a larger one is decoded as one stream, in one thread.
pub const MAX_BLOCK: u64 = 16 << 20;
/// The most blocks [`index`] reads from an index (and its largest index: 18 bytes a block at
/// most): a stream with more is decoded as one stream. 4096 blocks of [`BLOCK`] are 16 GiB.
pub const MAX_BLOCKS: u64 = 4096;
const MAX_INDEX: u64 = 8 + 18 * MAX_BLOCKS + 8;

const HEADER_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
const FOOTER_MAGIC: [u8; 2] = *b"YZ";

/// The CRC32 of the .xz format (IEEE 802.3, reflected, as zlib's).
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// One block of a stream: where it starts in the blob, its unpadded size (header, data and
/// check, as the index lists it) and the bytes it decodes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub offset: u64,
    pub unpadded: u64,
    pub size: u64,
}

/// The blocks of a one-stream xz blob, as its index lists them, and the stream's header
/// (which each block's stream repeats).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocks {
    header: [u8; 12],
    pub blocks: Vec<Block>,
}

/// The size of the check field of check type `id` (the spec's table).
fn check_size(id: u8) -> u64 {
    match id {
        0 => 0,
        1..=3 => 4,
        4..=6 => 8,
        7..=9 => 16,
        10..=12 => 32,
        _ => 64,
    }
}

/// Reads a multibyte integer at `*pos`, moving past it; `None` if it is malformed (more than
/// 9 bytes, a final zero byte after others, past the end).
fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (byte != 0 || i == 0).then_some(v);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// The blocks of the xz blob of `len` bytes read by `read_at(offset, buf)` (which fills
/// `buf`), for a content of `size` bytes: `Some` when it is exactly one stream of at least
/// two blocks, each of at most [`MAX_BLOCK`] bytes, with no more than [`MAX_BLOCKS`], that
/// decode to `size` bytes in all, the stream's header, index and footer intact (their CRC32s
/// checked). `None` for anything else, which the caller decodes as one stream, in one
/// thread, as it always could: the index is only a hint of where the blocks are, and each
/// block is then checked whole by liblzma, and the content by its hash.
pub fn index(
    len: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    size: u64,
) -> std::io::Result<Option<Blocks>> {
    if len < 12 + 12 + 8 {
        return Ok(None);
    }
    let mut header = [0u8; 12];
    read_at(0, &mut header)?;
    let mut footer = [0u8; 12];
    read_at(len - 12, &mut footer)?;
    if header[..6] != HEADER_MAGIC
        || le32(&header[8..]) != crc32(&header[6..8])
        || footer[10..] != FOOTER_MAGIC
        || le32(&footer) != crc32(&footer[4..10])
        || footer[8..10] != header[6..8]
        || header[6] != 0
        || header[7] & 0xf0 != 0
    {
        return Ok(None);
    }
    let check = check_size(header[7]);
    let index_size = (u64::from(le32(&footer[4..8])) + 1) * 4;
    if index_size > MAX_INDEX || index_size + 24 > len {
        return Ok(None);
    }
    let index_at = len - 12 - index_size;
    let mut idx = vec![0u8; index_size as usize];
    read_at(index_at, &mut idx)?;
    let body = idx.len() - 4;
    if idx[0] != 0 || le32(&idx[body..]) != crc32(&idx[..body]) {
        return Ok(None);
    }
    let mut pos = 1;
    let Some(count) = varint(&idx, &mut pos) else {
        return Ok(None);
    };
    if !(2..=MAX_BLOCKS).contains(&count) {
        return Ok(None);
    }
    let mut blocks = Vec::with_capacity(count as usize);
    let (mut offset, mut total) = (12u64, 0u64);
    for _ in 0..count {
        let (Some(unpadded), Some(n)) = (varint(&idx, &mut pos), varint(&idx, &mut pos)) else {
            return Ok(None);
        };
        // The smallest block: an 8-byte header, one byte of data, the check.
        if unpadded < 9 + check || unpadded > index_at || n == 0 || n > MAX_BLOCK {
            return Ok(None);
        }
        blocks.push(Block {
            offset,
            unpadded,
            size: n,
        });
        offset = offset.saturating_add(unpadded.div_ceil(4) * 4);
        total = total.saturating_add(n);
    }
    // The index padding (zeros to a multiple of four), then its CRC32; the blocks fill the
    // stream from its header to its index exactly.
    if pos > body
        || body - pos >= 4
        || idx[pos..body].iter().any(|&b| b != 0)
        || offset != index_at
        || total != size
    {
        return Ok(None);
    }
    for b in &blocks {
        if !plain_lzma2_block(b, read_at)? {
            return Ok(None);
        }
    }
    Ok(Some(Blocks { header, blocks }))
}

/// Whether block `b`'s header (read by `read_at`) is intact (its CRC32) and names one filter,
/// LZMA2, with a dictionary of at most [`xz_dict`](crate::core::codec::xz_dict) of
/// [`MAX_BLOCK`], the memory [`decode_parallel`] allows each block, and sizes (if it gives
/// them) that agree with the index.
fn plain_lzma2_block(
    b: &Block,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    read_at(b.offset, &mut first)?;
    let len = (u64::from(first[0]) + 1) * 4;
    if first[0] == 0 || len >= b.unpadded {
        return Ok(false);
    }
    let mut h = vec![0u8; len as usize];
    read_at(b.offset, &mut h)?;
    let body = h.len() - 4;
    let flags = h[1];
    if le32(&h[body..]) != crc32(&h[..body]) || flags & 0x3f != 0 {
        // Not exactly one filter, or reserved bits set.
        return Ok(false);
    }
    let mut pos = 2;
    if flags & 0x40 != 0 && varint(&h[..body], &mut pos).is_none() {
        return Ok(false);
    }
    if flags & 0x80 != 0 && varint(&h[..body], &mut pos) != Some(b.size) {
        return Ok(false);
    }
    let (Some(0x21), Some(1)) = (varint(&h[..body], &mut pos), varint(&h[..body], &mut pos)) else {
        return Ok(false);
    };
    let Some(&prop) = h[..body].get(pos) else {
        return Ok(false);
    };
    // LZMA2's dictionary size: 2 or 3, shifted by 11 + prop / 2 (prop 40: 4 GiB - 1).
    let dict = if prop > 40 {
        return Ok(false);
    } else if prop == 40 {
        u64::from(u32::MAX)
    } else {
        (2 | u64::from(prop & 1)) << (prop / 2 + 11)
    };
    Ok(dict <= u64::from(crate::core::codec::xz_dict(MAX_BLOCK)))
}

impl Blocks {
    /// What follows block `i`'s bytes to make it a stream of its own: an index listing it
    /// alone and a footer, the two CRC32s computed.
    fn tail(&self, i: usize) -> Vec<u8> {
        let b = &self.blocks[i];
        let mut t = vec![0u8];
        put_varint(&mut t, 1);
        put_varint(&mut t, b.unpadded);
        put_varint(&mut t, b.size);
        t.resize(t.len().div_ceil(4) * 4, 0);
        let crc = crc32(&t);
        t.extend_from_slice(&crc.to_le_bytes());
        let backward = (t.len() as u32 / 4 - 1).to_le_bytes();
        let mut f = [0u8; 6];
        f[..4].copy_from_slice(&backward);
        f[4..].copy_from_slice(&self.header[6..8]);
        t.extend_from_slice(&crc32(&f).to_le_bytes());
        t.extend_from_slice(&f);
        t.extend_from_slice(&FOOTER_MAGIC);
        t
    }

    /// Decodes block `i`, whose bytes (from its start) `data` gives, as a stream of its own:
    /// the stream's header, the block, then [`Blocks::tail`]. liblzma checks all of it and
    /// needs at most `memlimit` bytes; the block must decode to exactly its size.
    /// The block goes into `out` (emptied first): a buffer of an earlier block, reused so
    /// that its pages are not faulted in and zeroed again.
    fn decode(
        &self,
        i: usize,
        data: Box<dyn BufRead + '_>,
        memlimit: u64,
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let b = &self.blocks[i];
        let stream = (&self.header[..])
            .chain(data.take(b.unpadded.div_ceil(4) * 4))
            .chain(std::io::Cursor::new(self.tail(i)));
        let dec = xz2::stream::Stream::new_stream_decoder(memlimit, 0).map_err(bad)?;
        let mut dec = xz2::bufread::XzDecoder::new_stream(std::io::BufReader::new(stream), dec);
        out.clear();
        out.reserve_exact(b.size as usize);
        (&mut dec)
            .take(b.size + 1)
            .read_to_end(&mut out)
            .map_err(bad)?;
        if out.len() as u64 != b.size {
            return Err(bad(format!(
                "block {i} decodes to {}{} bytes, its index says {}",
                out.len(),
                if out.len() as u64 > b.size { "+" } else { "" },
                b.size
            )));
        }
        Ok(out)
    }
}

fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    Fail::BadDelta(format!("invalid delta: cannot decode a blob: {e}")).into()
}

/// The blocks decoded by the helper threads and not yet read, and how far the reader is.
struct Shared {
    /// The next block a helper may take.
    next: usize,
    /// The block the reader waits for or reads.
    reading: usize,
    ready: BTreeMap<usize, Result<Vec<u8>>>,
    /// The reader is done (or gone): helpers stop.
    stop: bool,
    /// Buffers of blocks the reader is done with.
    spare: Vec<Vec<u8>>,
}

struct Queue {
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Decodes `blocks` on `threads` helper threads (none: in the calling thread) (each block read from the blob by
/// `open(offset)`, liblzma's memory limited to `memlimit` per block) and calls `consume` with
/// a reader of the whole content, in order. Helpers take no block `threads + 1` or more past
/// the one the reader is at, so that at most `threads + 1` decoded blocks (each at most
/// [`MAX_BLOCK`]) are held at once, whatever the content's size. A block that fails to decode
/// is a read error of the reader ([`Fail::BadDelta`] inside) when it reaches it, and helpers
/// take no more blocks; they stop once `consume` returns.
pub fn decode_parallel<'b, T>(
    blocks: &Blocks,
    open: &(dyn Fn(u64) -> Box<dyn BufRead + 'b> + Sync),
    memlimit: u64,
    threads: usize,
    consume: impl FnOnce(&mut dyn Read) -> Result<T>,
) -> Result<T> {
    let n = blocks.blocks.len();
    // No helpers (`threads` 0): the reader decodes each block itself.
    let threads = threads.min(n);
    let q = Queue {
        shared: Mutex::new(Shared {
            next: 0,
            reading: 0,
            ready: BTreeMap::new(),
            spare: Vec::new(),
            stop: false,
        }),
        changed: Condvar::new(),
    };
    let decode_here =
        |i: usize| blocks.decode(i, open(blocks.blocks[i].offset), memlimit, Vec::new());
    std::thread::scope(|s| {
        let mut started = 0;
        for _ in 0..threads {
            let spawned = std::thread::Builder::new()
                .name("xz-block".into())
                .spawn_scoped(s, || helper(blocks, open, memlimit, threads + 1, &q));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => log::debug!("cannot start a thread to decode blocks: {e}"),
            }
        }
        let mut reader = InOrder {
            q: &q,
            n,
            buf: Vec::new(),
            at: 0,
            loaded: false,
            failed: false,
            // No helper (no thread could start): the reader decodes each block itself.
            inline: (started == 0).then_some(&decode_here),
        };
        let result = consume(&mut reader);
        q.lock().stop = true;
        q.changed.notify_all();
        result
    })
}

/// A helper of [`decode_parallel`]: takes the next block while it is fewer than `ahead` past
/// the reader's, decodes it and hands it over, until there is none left or the reader stops.
fn helper<'b>(
    blocks: &Blocks,
    open: &(dyn Fn(u64) -> Box<dyn BufRead + 'b> + Sync),
    memlimit: u64,
    ahead: usize,
    q: &Queue,
) {
    let n = blocks.blocks.len();
    loop {
        let (i, buf) = {
            let mut g = q.lock();
            while !g.stop && g.next < n && g.next >= g.reading + ahead {
                g = q.changed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if g.stop || g.next >= n {
                return;
            }
            g.next += 1;
            (g.next - 1, g.spare.pop().unwrap_or_default())
        };
        let mut claimed = Claimed { q, i, got: None };
        claimed.got = Some(blocks.decode(i, open(blocks.blocks[i].offset), memlimit, buf));
    }
}

/// A block a helper took: handed to the reader when dropped, as an error if the helper
/// panicked before it had a result (so that the reader never waits for it forever).
struct Claimed<'q> {
    q: &'q Queue,
    i: usize,
    got: Option<Result<Vec<u8>>>,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let got = self
            .got
            .take()
            .unwrap_or_else(|| Err(anyhow::anyhow!("a decoding thread panicked")));
        let mut g = self.q.lock();
        if got.is_err() {
            // The reader stops at this block: no more are needed.
            g.next = usize::MAX;
        }
        g.ready.insert(self.i, got);
        drop(g);
        self.q.changed.notify_all();
    }
}

/// The content, block after block, as the helpers of [`decode_parallel`] decode them.
struct InOrder<'q> {
    q: &'q Queue,
    n: usize,
    buf: Vec<u8>,
    at: usize,
    /// `buf` holds block `reading`.
    loaded: bool,
    /// A block failed: every later read fails too.
    failed: bool,
    /// Decodes block `i` here, in this thread, when no helper could start.
    inline: Option<&'q dyn Fn(usize) -> Result<Vec<u8>>>,
}

impl Read for InOrder<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(decode_error(bad("a block before failed to decode")));
        }
        while self.at == self.buf.len() {
            let mut g = self.q.lock();
            if self.loaded {
                // Done with this block: helpers may take one more.
                g.reading += 1;
                g.spare.push(std::mem::take(&mut self.buf));
                self.at = 0;
                self.loaded = false;
                self.q.changed.notify_all();
            }
            let i = g.reading;
            if i >= self.n {
                return Ok(0);
            }
            let got = match self.inline {
                Some(decode) => {
                    drop(g);
                    decode(i)
                }
                None => loop {
                    if let Some(r) = g.ready.remove(&i) {
                        break r;
                    }
                    g = self.q.changed.wait(g).unwrap_or_else(|e| e.into_inner());
                },
            };
            match got {
                Ok(b) => {
                    self.buf = b;
                    self.loaded = true;
                }
                Err(e) => {
                    self.failed = true;
                    return Err(decode_error(e));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A read error carrying the [`Fail`] of `e` (a [`Fail::BadDelta`] if it has none), as the
/// decoders of `core::codec` give.
fn decode_error(e: anyhow::Error) -> std::io::Error {
    let fail = e
        .downcast::<Fail>()
        .unwrap_or_else(|e| Fail::BadDelta(format!("invalid delta: cannot decode a blob: {e:#}")));
    std::io::Error::new(std::io::ErrorKind::InvalidData, fail)
}

/// For tests: `data` as one xz stream of blocks of `block` bytes, with an LZMA2 dictionary
/// of `dict` bytes (preset 0, CRC32), as liblzma's multi-threaded encoder makes it.
#[cfg(test)]
pub(crate) fn test_stream(data: &[u8], block: u64, dict: u32) -> Vec<u8> {
    let mut opts = xz2::stream::LzmaOptions::new_preset(0).unwrap();
    opts.dict_size(dict);
    let mut filters = xz2::stream::Filters::new();
    filters.lzma2(&opts);
    let stream = xz2::stream::MtStreamBuilder::new()
        .threads(2)
        .block_size(block)
        .filters(filters)
        .check(xz2::stream::Check::Crc32)
        .encoder()
        .unwrap();
    let mut enc = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
    std::io::Write::write_all(&mut enc, data).unwrap();
    enc.finish().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Record-like bytes (a little like apt's caches), which xz compresses well.
    fn records(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut out = Vec::with_capacity(n + 16);
        let mut i = 0u32;
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&(i * 24 + (x % 8) as u32).to_le_bytes());
            out.extend_from_slice(&((x >> 8) as u16 % 300).to_le_bytes());
            out.extend_from_slice(&((x >> 24) as u32 % 4096).to_le_bytes());
            i += 1;
        }
        out.truncate(n);
        out
    }

    /// `data` as one stream of blocks of `block` bytes, as `diff` makes it.
    fn multi_block(data: &[u8], block: u64) -> Vec<u8> {
        super::test_stream(data, block, 64 << 10)
    }

    fn index_of(blob: &[u8], size: u64) -> Option<Blocks> {
        let mut read_at = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
            let off = off as usize;
            let src = blob.get(off..off + buf.len()).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")
            })?;
            buf.copy_from_slice(src);
            Ok(())
        };
        index(blob.len() as u64, &mut read_at, size).unwrap()
    }

    fn decode(blob: &[u8], blocks: &Blocks, size: u64, threads: usize) -> Result<Vec<u8>> {
        let open = |off: u64| -> Box<dyn BufRead + '_> { Box::new(&blob[off as usize..]) };
        decode_parallel(blocks, &open, 1 << 20, threads, |r| {
            let mut out = Vec::new();
            r.take(size + 1).read_to_end(&mut out)?;
            Ok(out)
        })
    }

    fn fail_of(e: &anyhow::Error) -> Option<&Fail> {
        e.chain().find_map(|c| {
            c.downcast_ref::<Fail>().or_else(|| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<Fail>())
            })
        })
    }

    #[test]
    fn crc32_and_varints_are_the_formats() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        for v in [0u64, 1, 127, 128, 300, 1 << 40, u64::MAX >> 1] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(varint(&b, &mut pos), Some(v));
            assert_eq!(pos, b.len());
        }
        // A final zero byte after others, and more than nine bytes, are malformed.
        assert_eq!(varint(&[0x80, 0x00], &mut 0), None);
        assert_eq!(varint(&[0xff; 10], &mut 0), None);
        assert_eq!(varint(&[0x80], &mut 0), None);
    }

    #[test]
    fn blocks_decode_in_parallel_to_the_content() {
        let data = records(1 << 20);
        let blob = multi_block(&data, 100_000);
        let size = data.len() as u64;
        let blocks = index_of(&blob, size).expect("a stream of blocks");
        assert_eq!(blocks.blocks.len(), 11);
        assert_eq!(blocks.blocks.iter().map(|b| b.size).sum::<u64>(), size);
        for threads in [0, 1, 2, 3, 16] {
            assert_eq!(decode(&blob, &blocks, size, threads).unwrap(), data);
        }
        // What liblzma's own decoder of the whole stream gives, too.
        assert_eq!(
            crate::core::codec::xz_decode_all(&blob, size).unwrap(),
            data
        );
        // A consumer that stops early stops the helpers.
        let open = |off: u64| -> Box<dyn BufRead + '_> { Box::new(&blob[off as usize..]) };
        let first = decode_parallel(&blocks, &open, 1 << 20, 2, |r| {
            let mut b = [0u8; 10];
            r.read_exact(&mut b)?;
            Ok(b)
        })
        .unwrap();
        assert_eq!(first, data[..10]);
    }

    #[test]
    fn other_streams_are_left_to_the_one_stream_decoder() {
        let data = records(300_000);
        let size = data.len() as u64;
        // One block.
        let one = multi_block(&data, 1 << 20);
        assert_eq!(index_of(&one, size), None);
        let blob = multi_block(&data, 100_000);
        assert!(index_of(&blob, size).is_some());
        // Another size than the content's.
        assert_eq!(index_of(&blob, size + 1), None);
        // Truncated, or with bytes after the stream, or two streams.
        assert_eq!(index_of(&blob[..blob.len() - 1], size), None);
        assert_eq!(index_of(&blob[..blob.len() / 2], size), None);
        let mut longer = blob.clone();
        longer.extend_from_slice(&[0; 4]);
        assert_eq!(index_of(&longer, size), None);
        let mut two = blob.clone();
        two.extend_from_slice(&blob);
        assert_eq!(index_of(&two, 2 * size), None);
        // A damaged index or footer (its CRC32 no longer matches).
        let blocks = index_of(&blob, size).unwrap();
        for at in [blob.len() - 14, blob.len() - 8, blob.len() - 1, 3, 7] {
            let mut bad = blob.clone();
            bad[at] ^= 0x10;
            assert_eq!(index_of(&bad, size), None, "byte {at} damaged");
        }
        // A damaged block header (its CRC32): left to liblzma's one-stream decoder.
        let mut bad = blob.clone();
        bad[blocks.blocks[1].offset as usize + 1] ^= 0x01;
        assert_eq!(index_of(&bad, size), None);
        // A block larger than the limit.
        let big = records(MAX_BLOCK as usize + 10);
        let blob = multi_block(&big, MAX_BLOCK + 10);
        assert_eq!(index_of(&blob, big.len() as u64), None);
        assert!(blocks.blocks.len() > 1);
    }

    #[test]
    fn a_damaged_or_truncated_block_is_a_malformed_blob() {
        let data = records(400_000);
        let size = data.len() as u64;
        let blob = multi_block(&data, 100_000);
        let blocks = index_of(&blob, size).unwrap();
        // A byte of block 2's data flipped (the index still right): liblzma finds it.
        let b = blocks.blocks[2];
        let mut bad = blob.clone();
        bad[(b.offset + b.unpadded / 2) as usize] ^= 0x55;
        let blocks_bad = index_of(&bad, size).expect("the index is intact");
        let e = decode(&bad, &blocks_bad, size, 2).unwrap_err();
        assert!(
            matches!(fail_of(&e), Some(Fail::BadDelta(_))),
            "not a bad delta: {e:#}"
        );
        // Block 1 cut short by 8 bytes, and an index that says so: the block ends early.
        let b = blocks.blocks[1];
        let end = (b.offset + b.unpadded.div_ceil(4) * 4) as usize;
        let mut cut = blob[..end - 12].to_vec();
        cut.extend_from_slice(&blob[end - 4..end]);
        cut.extend_from_slice(&blob[end..blob.len() - 12]);
        let index_at = (blocks
            .blocks
            .last()
            .map(|l| l.offset + l.unpadded.div_ceil(4) * 4))
        .unwrap() as usize
            - 8;
        // Rewrite the index: block 1's unpadded size 8 less.
        let mut idx = vec![0u8];
        put_varint(&mut idx, blocks.blocks.len() as u64);
        for (i, blk) in blocks.blocks.iter().enumerate() {
            put_varint(&mut idx, blk.unpadded - if i == 1 { 8 } else { 0 });
            put_varint(&mut idx, blk.size);
        }
        idx.resize(idx.len().div_ceil(4) * 4, 0);
        let crc = crc32(&idx);
        idx.extend_from_slice(&crc.to_le_bytes());
        cut.truncate(index_at);
        cut.extend_from_slice(&idx);
        let mut f = [0u8; 6];
        f[..4].copy_from_slice(&(idx.len() as u32 / 4 - 1).to_le_bytes());
        f[4..].copy_from_slice(&blob[6..8]);
        cut.extend_from_slice(&crc32(&f).to_le_bytes());
        cut.extend_from_slice(&f);
        cut.extend_from_slice(b"YZ");
        let blocks_cut = index_of(&cut, size).expect("a consistent index");
        assert_eq!(blocks_cut.blocks[1].unpadded, b.unpadded - 8);
        let e = decode(&cut, &blocks_cut, size, 2).unwrap_err();
        assert!(
            matches!(fail_of(&e), Some(Fail::BadDelta(_))),
            "not a bad delta: {e:#}"
        );
        // The one-stream decoder refuses both too.
        assert!(crate::core::codec::xz_decode_all(&bad, size).is_err());
        assert!(crate::core::codec::xz_decode_all(&cut, size).is_err());
    }
}
