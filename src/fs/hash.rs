//! Reading whole files through descriptors: hashing, a `Read` over `pread`, and the per-thread
//! I/O buffer both use.

use std::io::Read;
use std::os::fd::BorrowedFd;

use anyhow::Result;
use sha2::{Digest, Sha256};

use super::sparse::{self, Run};
use super::sys;
use crate::core::object::Hash;

/// The size of [`with_io_buffer`]'s buffer.
pub(crate) const IO_BUFFER: usize = 256 * 1024;

/// Runs `f` with this thread's I/O buffer of [`IO_BUFFER`] bytes, made once per thread:
/// reading a small file through a buffer allocated (and zeroed) for it cost more than the
/// read. A nested call gets a buffer of its own.
pub(crate) fn with_io_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.is_empty() {
                buf.resize(IO_BUFFER, 0);
            }
            f(&mut buf)
        }
        Err(_) => f(&mut vec![0u8; IO_BUFFER]),
    })
}

/// The size and sha256 of an open file, from its start to its end but at most the first
/// `limit` bytes (holes are not read: see [`sparse::read_runs`]): a file that a guest keeps
/// growing is read no further than that (a caller that expects `n` bytes passes `n + 1` and
/// compares). `st` is the file's `fstat`.
pub(crate) fn hash_fd_upto(
    fd: BorrowedFd,
    st: &rustix::fs::Stat,
    limit: u64,
) -> Result<(u64, Hash)> {
    let mut h = Sha256::new();
    let size = with_io_buffer(|buf| {
        sparse::read_runs(fd, st, limit, buf, &mut |run| {
            match run {
                Run::Data(d) => h.update(d),
                Run::Hole(n) => hash_zeros(&mut h, n),
            }
            Ok(())
        })
    })?;
    Ok((size, h.finalize().into()))
}

/// Feeds `n` zero bytes to `h` from [`sparse::ZEROS`]. sha256 has no shortcut for them: a
/// 10 GiB hole costs what hashing 10 GiB in memory does (about 5 s with SHA-NI).
pub(crate) fn hash_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(sparse::ZEROS.len() as u64) as usize;
        h.update(&sparse::ZEROS[..k]);
        n -= k as u64;
    }
}

/// Reads an open file from offset 0 with `pread`, leaving the descriptor's offset alone
/// (`lseek` moves it: see below). A hole is not read: each read first asks where the next
/// data is ([`sys::seek_data`]) and fills the buffer with zeros up to it.
pub(crate) struct FdReader<'a> {
    pub fd: BorrowedFd<'a>,
    pub off: u64,
}

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let zeros = match sys::seek_data(self.fd, self.off) {
            Ok(Some(data)) => data - self.off.min(data),
            // Only a hole follows, up to the end.
            Ok(None) => (sys::fstat(self.fd)?.st_size as u64).saturating_sub(self.off),
            // No way to tell holes here: read.
            Err(_) => 0,
        };
        if zeros > 0 {
            let n = zeros.min(buf.len() as u64) as usize;
            buf[..n].fill(0);
            self.off += n as u64;
            return Ok(n);
        }
        let n = rustix::io::pread(self.fd, buf, self.off)?;
        self.off += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    use sha2::{Digest, Sha256};

    #[test]
    fn hash_fd_upto_reads_no_further_than_its_limit() {
        let mut f = tempfile::tempfile().unwrap();
        let data = vec![7u8; 3 * super::IO_BUFFER + 5];
        f.write_all(&data).unwrap();
        for limit in [0, 1, super::IO_BUFFER as u64 + 1, data.len() as u64] {
            let st = crate::fs::sys::fstat(f.as_fd()).unwrap();
            let (n, h) = super::hash_fd_upto(f.as_fd(), &st, limit).unwrap();
            assert_eq!(n, limit);
            assert_eq!(h, <[u8; 32]>::from(Sha256::digest(&data[..limit as usize])));
        }
        let st = crate::fs::sys::fstat(f.as_fd()).unwrap();
        let whole = super::hash_fd_upto(f.as_fd(), &st, u64::MAX).unwrap();
        assert_eq!(whole.1, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(whole.0, data.len() as u64);
    }
}
