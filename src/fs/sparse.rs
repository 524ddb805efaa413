//! Sparse files. A file's holes are found with [lseek(2)] (`SEEK_DATA`, `SEEK_HOLE`) and
//! never read: readers get their length and use [`ZEROS`] for them. Files are written with a
//! hole wherever the data has a whole aligned block of zeros ([`Writer`]), and copied hole for
//! hole ([`copy`]). A 10 GiB `/var/log/lastlog` with 16 KiB of data is thus read, stored and
//! copied as 16 KiB; its sha256 (of all 10 GiB) is unchanged.
//!
//! [lseek(2)]: https://man7.org/linux/man-pages/man2/lseek.2.html

use std::os::fd::BorrowedFd;

use anyhow::{Context, Result, bail};
use rustix::io::Errno;

use super::sys;

/// The unit of holes written: an aligned block of this many zero bytes is not written. The
/// block size of ext4, XFS and btrfs on x86-64; where a file system's block is larger, a
/// skipped block is allocated (as zeros) with its neighbours, and where it is smaller some
/// holes are written as zeros: only space, never content, depends on it.
pub(crate) const BLOCK: u64 = 4096;

/// Zeros to hash or compress in place of a hole.
pub(crate) static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A piece of a file's content, in order.
pub(crate) enum Run<'a> {
    /// Bytes read from the file.
    Data(&'a [u8]),
    /// This many zero bytes: a hole, not read.
    Hole(u64),
}

/// Whether every byte of `b` is zero.
#[inline]
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    // Or-ing a chunk's bytes vectorizes; data that is not zero fails in its first chunk.
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// The next run of data of the open file `fd` at or after `off`, before `end`: its start and
/// end (a hole or `end` follows it); `None` if only holes follow. Where the file system cannot
/// tell holes (`EINVAL`, `EOPNOTSUPP`), everything from `off` is data.
pub(crate) fn next_data(fd: BorrowedFd, off: u64, end: u64) -> Result<Option<(u64, u64)>> {
    if off >= end {
        return Ok(None);
    }
    let start = match sys::seek_data(fd, off) {
        Ok(Some(d)) if d < end => d,
        Ok(_) => return Ok(None),
        Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(Some((off, end))),
        Err(e) => return Err(e).context("cannot find the data of a file (SEEK_DATA)"),
    };
    let stop = sys::seek_hole(fd, start).context("cannot find the holes of a file (SEEK_HOLE)")?;
    Ok(Some((start, stop.clamp(start + 1, end))))
}

/// How many bytes of the first `size` of the open file `fd` are data, not holes.
pub(crate) fn data_bytes(fd: BorrowedFd, size: u64) -> Result<u64> {
    let (mut off, mut n) = (0, 0);
    while let Some((start, stop)) = next_data(fd, off, size)? {
        n += stop - start;
        off = stop;
    }
    Ok(n)
}

/// Reads the open file `fd` from its start to its end, but no further than `limit` bytes,
/// handing `f` its content in order: data as read (`pread`, in pieces of at most `buf`'s
/// size, each starting at a multiple of it from the start of its run of data), holes as
/// their length, never read. Returns the number of bytes handed on. A file whose blocks cover
/// its size, the common case, costs no `lseek`; whatever a file grows by meanwhile is read
/// too, so that a caller comparing the count with a size it expects sees the change. `st` is
/// the file's `fstat`, which callers have at hand.
pub(crate) fn read_runs(
    fd: BorrowedFd,
    st: &rustix::fs::Stat,
    limit: u64,
    buf: &mut [u8],
    f: &mut dyn FnMut(Run) -> Result<()>,
) -> Result<u64> {
    let size = (st.st_size as u64).min(limit);
    let mut off = 0;
    if (st.st_blocks as u64).saturating_mul(512) < size {
        while off < size {
            let Some((start, stop)) = next_data(fd, off, size)? else {
                f(Run::Hole(size - off))?;
                off = size;
                break;
            };
            if start > off {
                f(Run::Hole(start - off))?;
            }
            let (to, end) = read_plain(fd, start, stop, buf, f)?;
            off = to;
            if end {
                return Ok(off);
            }
        }
    }
    Ok(read_plain(fd, off, limit, buf, f)?.0)
}

/// Reads `fd` from `off` to `end` or its end, whichever comes first, handing on the data;
/// returns where it stopped and whether that was the end of the file.
fn read_plain(
    fd: BorrowedFd,
    mut off: u64,
    end: u64,
    buf: &mut [u8],
    f: &mut dyn FnMut(Run) -> Result<()>,
) -> Result<(u64, bool)> {
    while off < end {
        let want = usize::try_from(end - off).map_or(buf.len(), |n| n.min(buf.len()));
        let n = rustix::io::pread(fd, &mut buf[..want], off)?;
        if n == 0 {
            return Ok((off, true));
        }
        f(Run::Data(&buf[..n]))?;
        off += n as u64;
    }
    Ok((off, false))
}

/// Writes a new, empty file from its start, leaving holes: wherever the data has an aligned
/// block of [`BLOCK`] zero bytes, and where the caller [`skip`](Writer::skip)s. [`finish`]
/// then gives the file its size (a hole at the end is not written either). Errors are the
/// bare `Errno` of [`sys::pwrite_all`] (`ENOSPC` is told apart by the exit code).
///
/// [`finish`]: Writer::finish
pub(crate) struct Writer<'a> {
    fd: BorrowedFd<'a>,
    /// The offset the next byte goes to.
    off: u64,
    /// The size the file has now.
    len: u64,
    /// The bytes written (not left as holes).
    data: u64,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(fd: BorrowedFd<'a>) -> Self {
        Writer {
            fd,
            off: 0,
            len: 0,
            data: 0,
        }
    }

    /// The bytes written so far, holes not counted.
    pub(crate) fn data(&self) -> u64 {
        self.data
    }

    /// Appends `data`; of its blocks, those that are whole, aligned and zero are skipped. A
    /// block cut by the start or end of `data` is written as it is: callers hand over pieces
    /// that start at a block boundary and end at one, except the last.
    pub(crate) fn write(&mut self, data: &[u8]) -> rustix::io::Result<()> {
        let mut pending: Option<usize> = None;
        let mut i = 0;
        while i < data.len() {
            let at = self.off + i as u64;
            let n = ((BLOCK - at % BLOCK) as usize).min(data.len() - i);
            let hole = n as u64 == BLOCK && is_zero(&data[i..i + n]);
            match (hole, pending) {
                (true, Some(from)) => {
                    self.put(&data[from..i], from)?;
                    pending = None;
                }
                (false, None) => pending = Some(i),
                _ => {}
            }
            i += n;
        }
        if let Some(from) = pending {
            self.put(&data[from..], from)?;
        }
        self.off += data.len() as u64;
        Ok(())
    }

    /// Writes `bytes`, which are at `from` in the data being appended.
    fn put(&mut self, bytes: &[u8], from: usize) -> rustix::io::Result<()> {
        let at = self.off + from as u64;
        sys::pwrite_all(self.fd, bytes, at)?;
        self.len = self.len.max(at + bytes.len() as u64);
        self.data += bytes.len() as u64;
        Ok(())
    }

    /// Appends `n` zero bytes as a hole.
    pub(crate) fn skip(&mut self, n: u64) {
        self.off += n;
    }

    /// Gives the file its size: all that was appended, holes at the end included.
    pub(crate) fn finish(self) -> Result<()> {
        if self.len < self.off {
            sys::ftruncate(self.fd, self.off)?;
        }
        Ok(())
    }
}

/// Copies the first `size` bytes of `src` into the empty file `dst`, hole for hole: each run
/// of data with [`sys::copy_range_at`] at its own offset (with `pread` and [`Writer`] where
/// the kernel cannot copy between the two files, as across file systems), then the size is
/// set, so that `dst` has holes where `src` has them.
pub(crate) fn copy(src: BorrowedFd, dst: BorrowedFd, size: u64) -> Result<()> {
    let mut off = 0;
    let mut in_kernel = true;
    while let Some((start, stop)) = next_data(src, off, size)? {
        if in_kernel {
            match sys::copy_range_at(src, dst, start, stop - start) {
                Ok(true) => {
                    off = stop;
                    continue;
                }
                Ok(false) => bail!("the source is shorter than {size} bytes"),
                Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => {
                    in_kernel = false;
                }
                Err(e) => return Err(e).context("copy_file_range failed"),
            }
        }
        // What copy_file_range copied of this run before it failed is written again.
        let mut w = Writer {
            fd: dst,
            off: start,
            len: 0,
            data: 0,
        };
        let (to, end) = super::hash::with_io_buffer(|buf| {
            read_plain(src, start, stop, buf, &mut |run| {
                if let Run::Data(d) = run {
                    w.write(d).context("cannot write the copy")?;
                }
                Ok(())
            })
        })?;
        if end && to < stop {
            bail!("the source is shorter than {size} bytes");
        }
        off = stop;
    }
    sys::ftruncate(dst, size)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    /// A sparse temporary file of `size` bytes with `data` at each offset.
    fn sparse(size: u64, data: &[(u64, &[u8])]) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        for (off, d) in data {
            f.write_all_at(d, *off).unwrap();
        }
        f
    }

    fn content(f: &std::fs::File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn is_zero_sees_every_byte() {
        let mut b = vec![0u8; 4096 + 7];
        assert!(is_zero(&b));
        for i in [0, 63, 64, 4095, 4096, 4102] {
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn read_runs_gives_the_content_and_skips_holes() {
        let size = 64 << 20;
        let f = sparse(
            size,
            &[(0, b"head"), (8 << 20, &[7u8; 10_000]), (size - 3, b"end")],
        );
        let want = content(&f);
        let mut buf = vec![0u8; 256 << 10];
        for limit in [u64::MAX, size, size - 2, 5 << 20, 3, 0] {
            let (mut got, mut data) = (Vec::new(), 0u64);
            let st = sys::fstat(f.as_fd()).unwrap();
            let n = read_runs(f.as_fd(), &st, limit, &mut buf, &mut |run| {
                match run {
                    Run::Data(d) => {
                        data += d.len() as u64;
                        got.extend_from_slice(d);
                    }
                    Run::Hole(n) => got.resize(got.len() + n as usize, 0),
                }
                Ok(())
            })
            .unwrap();
            let end = want.len().min(limit as usize);
            assert_eq!(n as usize, end, "{limit}");
            assert!(got == want[..end], "{limit}");
            // Only the blocks with data are read (tmpfs or a disk: pages or blocks of them).
            assert!(data <= 3 << 20, "{limit}: read {data} bytes");
        }
    }

    #[test]
    fn writer_and_copy_keep_holes() {
        let size = (64 << 20) + 5;
        let mut data = vec![0u8; size as usize];
        data[5000] = 1;
        data[(32 << 20) + 1] = 2;
        data[size as usize - 1] = 3;
        let f = tempfile::tempfile().unwrap();
        let mut w = Writer::new(f.as_fd());
        for piece in data.chunks(256 << 10) {
            w.write(piece).unwrap();
        }
        w.finish().unwrap();
        assert!(content(&f) == data);
        assert!(f.metadata().unwrap().blocks() * 512 <= 1 << 20);
        assert!(data_bytes(f.as_fd(), size).unwrap() <= 1 << 20);

        // A hole at the end, and a skipped one.
        let g = tempfile::tempfile().unwrap();
        let mut w = Writer::new(g.as_fd());
        w.write(b"abc").unwrap();
        w.skip(10 << 20);
        w.finish().unwrap();
        assert_eq!(g.metadata().unwrap().len(), (10 << 20) + 3);
        assert_eq!(&content(&g)[..4], b"abc\0");

        let c = tempfile::tempfile().unwrap();
        copy(f.as_fd(), c.as_fd(), size).unwrap();
        assert!(content(&c) == data);
        assert!(c.metadata().unwrap().blocks() * 512 <= 1 << 20);
    }
}
