//! The pool: one immutable file per object, named by its id (`pool/abcdef…`). A tree is a
//! farm of hardlinks to these files (or of reflinked copies of them).
//!
//! One flat directory, not 256 shards: adding an object then changes the directory's inode
//! and its index where they already are, not those of one of 256 directories, which on btrfs
//! costs a copied metadata block each. Roots made before keep their shards
//! (`pool/ab/abcdef…`, [`Shape::Sharded`]); treeswap reads and writes them as they are.
//!
//! Objects are published atomically: written to an unnamed file in `tmp/` (`O_TMPFILE`; a
//! named one where the file system has none), given their owner, mode, extended attributes
//! and a zero mtime, then linked into place (a named one renamed with `RENAME_NOREPLACE`);
//! "already exists" means another writer published the same object, which is the same bytes
//! by construction. Durability comes from one `syncfs` by the caller before
//! its commit point, not from per-object fsync.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::core::error::Fail;
use crate::core::object::Hash;
use crate::core::object::{Meta, ObjectId, object_id};
use crate::fs::file::TmpFile;
use crate::fs::hash;
use crate::fs::{iflags, sparse, sys};
use crate::store::protect::Protection;

/// The most extra copies of one object made when its links run out (ext4 allows 65 000 links
/// per inode, so 64 copies cover four million identical files).
const MAX_COPIES: u32 = 64;

/// How a pool names its objects (FORMAT.md, "State root").
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Shape {
    /// `pool/<id>`: every root made by this treeswap.
    Flat,
    /// `pool/ab/<id>`, in 256 shard directories named by the first two hex digits: roots
    /// made before. Told by its shard `pool/00`.
    Sharded,
}

pub struct Pool {
    dir: OwnedFd,
    tmp: OwnedFd,
    shape: Shape,
    /// How objects are protected (see store/protect.rs).
    mode: Protection,
    /// For objects that hit the link limit: the copy to try first.
    copy_hint: Mutex<HashMap<ObjectId, u32>>,
    /// Objects (and copies) this handle published, so that a failed apply can remove them.
    created: Mutex<Vec<String>>,
    /// In immutable mode, held around clearing an object's flag, linking it and setting the
    /// flag again, by every thread linking an object of that stripe: otherwise one thread can
    /// set the flag again between another's clearing it and linking (`EPERM`).
    link_locks: [Mutex<()>; LINK_LOCKS],
}

const LINK_LOCKS: usize = 64;

/// The prefix of a named temporary object file in `tmp/` (where there is no `O_TMPFILE`).
const TMP_PREFIX: &str = "obj";

/// The path of an object (copy 0) or of its extra copy `n`, relative to `pool/`.
fn object_rel(shape: Shape, id: &ObjectId, copy: u32) -> String {
    let h = hex::encode(id);
    let shard = match shape {
        Shape::Flat => "",
        Shape::Sharded => &h[..2],
    };
    let slash = if shard.is_empty() { "" } else { "/" };
    if copy == 0 {
        format!("{shard}{slash}{h}")
    } else {
        format!("{shard}{slash}{h}.{copy}")
    }
}

/// The error of an object's source that has more than `size` bytes.
fn too_long(id: &ObjectId, size: u64) -> anyhow::Error {
    Fail::Integrity(format!(
        "object {} has more than its declared {size} bytes",
        hex::encode(id)
    ))
    .into()
}

/// Checks that an object's source gave `written` bytes hashing to `got`, as declared.
fn check_stored(written: u64, got: Hash, size: u64, sha256: &Hash) -> Result<()> {
    if written != size || &got != sha256 {
        // No object id, digests by a prefix: the caller names the content (or the file)
        // in full, and the four full digests this named made a line of 450 characters.
        return Err(Fail::Integrity(format!(
            "got {written} bytes with sha256 {}, expected {size} bytes with sha256 {}",
            crate::core::object::short_hex(&got),
            crate::core::object::short_hex(sha256)
        ))
        .into());
    }
    Ok(())
}

/// The shape of the pool open as `dir`: sharded if it has the shard `00`.
fn shape_of(dir: BorrowedFd) -> Result<Shape> {
    Ok(match sys::lstatat(dir, b"00")? {
        Some(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() => Shape::Sharded,
        _ => Shape::Flat,
    })
}

impl Pool {
    pub fn open(root: BorrowedFd) -> Result<Pool> {
        let dir = sys::open_dir_beneath(root, b"pool")?;
        let shape = shape_of(dir.as_fd())?;
        Ok(Pool {
            dir,
            tmp: sys::open_dir_beneath(root, b"tmp")?,
            shape,
            mode: Protection::Hardlink,
            copy_hint: Mutex::new(HashMap::new()),
            created: Mutex::new(Vec::new()),
            link_locks: std::array::from_fn(|_| Mutex::new(())),
        })
    }

    /// The same pool, writing and linking objects in protection mode `mode`.
    pub fn with_mode(mut self, mode: Protection) -> Pool {
        self.mode = mode;
        self
    }

    pub fn mode(&self) -> Protection {
        self.mode
    }

    /// The path of an object (copy 0) or of its extra copy `n`, relative to `pool/`.
    pub fn rel(&self, id: &ObjectId, copy: u32) -> String {
        object_rel(self.shape, id, copy)
    }

    /// Sets the immutable flag on every object of the pool that lacks it (after a crash in
    /// immutable mode, or a return to it); returns how many.
    pub fn reprotect(&self) -> Result<u64> {
        self.flag_all(true)
    }

    /// Clears the immutable flag on every object of the pool that has it (a pool written in
    /// immutable mode, now written in another: see `store::protect`); returns how many.
    pub fn unflag_all(&self) -> Result<u64> {
        self.flag_all(false)
    }

    /// Gives every object the immutable flag (`on`) or takes it away; returns how many
    /// objects changed.
    fn flag_all(&self, on: bool) -> Result<u64> {
        let mut n = 0;
        self.for_each_dir(|dir, rel| {
            for name in sys::read_dir(dir)? {
                let fd = sys::open_file_beneath(dir, &name)?;
                if iflags::is_immutable(fd.as_fd()) != on {
                    iflags::set_immutable(fd.as_fd(), on).with_context(|| {
                        format!(
                            "cannot {} the immutable flag of `pool/{rel}{}`",
                            if on { "set" } else { "clear" },
                            crate::core::path::display(&name)
                        )
                    })?;
                    n += 1;
                    crate::core::failpoint::hit("pool-flags-midway");
                }
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// Calls `f` with each directory that holds objects and its path relative to `pool/`
    /// (`""`, or `"ab/"` for a shard); the names in it are objects and their copies.
    pub fn for_each_dir(&self, mut f: impl FnMut(BorrowedFd, &str) -> Result<()>) -> Result<()> {
        match self.shape {
            Shape::Flat => f(self.dir.as_fd(), ""),
            Shape::Sharded => {
                for shard in sys::read_dir(self.dir.as_fd())? {
                    let sfd = sys::open_dir_beneath(self.dir.as_fd(), &shard)?;
                    f(
                        sfd.as_fd(),
                        &format!("{}/", crate::core::path::display(&shard)),
                    )?;
                }
                Ok(())
            }
        }
    }

    pub fn tmp_fd(&self) -> BorrowedFd<'_> {
        self.tmp.as_fd()
    }

    /// [linkat(2)] of an object; in immutable mode the flag is cleared around the link,
    /// because the kernel refuses to link an immutable inode.
    ///
    /// [linkat(2)]: https://man7.org/linux/man-pages/man2/linkat.2.html
    fn link_object(&self, rel: &str, dir: BorrowedFd, name: &[u8]) -> rustix::io::Result<()> {
        if self.mode != Protection::Immutable {
            return sys::linkat(self.dir.as_fd(), rel.as_bytes(), dir, name);
        }
        let fd = sys::openat(
            self.dir.as_fd(),
            rel.as_bytes(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        // Objects of a stripe share a lock: the start of the object's name picks it.
        let name_start = rel.rsplit('/').next().unwrap_or(rel);
        let stripe = name_start.bytes().take(4).fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let _held = self.link_locks[stripe % LINK_LOCKS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let flags = iflags::ioctl_getflags(fd.as_fd())?;
        iflags::ioctl_setflags(fd.as_fd(), flags - rustix::fs::IFlags::IMMUTABLE)?;
        crate::core::failpoint::hit("pool-link-unprotected");
        let r = sys::linkat(self.dir.as_fd(), rel.as_bytes(), dir, name);
        iflags::ioctl_setflags(fd.as_fd(), flags | rustix::fs::IFlags::IMMUTABLE)?;
        r
    }

    /// Makes `name` in `dir` a private copy of object `id` (a reflink where the file system
    /// can clone, else a copy) with the object's metadata and zero timestamps.
    pub fn copy_to(&self, id: &ObjectId, meta: &Meta, dir: BorrowedFd, name: &[u8]) -> Result<()> {
        let src = self.open_object(id)?;
        let dst = sys::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("cannot create `{}`", crate::core::path::display(name)))?;
        if sys::ioctl_ficlone(dst.as_fd(), src.as_fd()).is_err() {
            let size = sys::fstat(src.as_fd())?.st_size as u64;
            sparse::copy(src.as_fd(), dst.as_fd(), size)
                .with_context(|| format!("cannot copy object {}", hex::encode(id)))?;
        }
        sys::apply_meta_fd(dst.as_fd(), meta)?;
        sys::zero_times(dst.as_fd())
    }

    /// Makes the regular file open (for writing) as `dst`, `dst_size` bytes long, a copy of
    /// object `id` with `meta`, in place: the object's blocks are shared (`FICLONE`) over its
    /// old content, which is first cut off if it is longer. Cheaper than removing the file and
    /// making a new one, on btrfs by far. Returns `false`, having left `dst` in some state,
    /// where the file system cannot share the blocks.
    pub fn clone_over(
        &self,
        id: &ObjectId,
        meta: &Meta,
        dst: BorrowedFd,
        dst_size: u64,
    ) -> Result<bool> {
        let src = self.open_object(id)?;
        // A whole-file clone replaces the bytes up to the object's end and leaves any beyond.
        if dst_size > sys::fstat(src.as_fd())?.st_size as u64 {
            sys::ftruncate(dst, 0)?;
        }
        if sys::ioctl_ficlone(dst, src.as_fd()).is_err() {
            return Ok(false);
        }
        sys::set_meta_exact_fd(dst, meta)?;
        sys::zero_times(dst)?;
        Ok(true)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    pub fn has(&self, id: &ObjectId) -> Result<bool> {
        Ok(sys::lstatat(self.dir.as_fd(), self.rel(id, 0).as_bytes())?.is_some())
    }

    /// Stores an object from `src`, which must yield exactly `size` bytes hashing to
    /// `sha256`; anything else is an integrity error and nothing is published. Returns whether
    /// the object was new. The object is written sparse: every aligned block of zeros is left
    /// a hole (`sparse::Writer`); its bytes, and so its id, are those `src` yields.
    pub fn store(&self, src: &mut dyn Read, meta: &Meta, size: u64, sha256: &Hash) -> Result<bool> {
        self.store_bounded(src, meta, size, sha256, None)
    }

    /// [`Pool::store`] of a content that declares `data` bytes outside its holes (a delta's
    /// `data`): writing more than that (whole 4 KiB blocks of zeros are holes) is an integrity
    /// error, so a delta cannot take more space than the free-space check counted.
    pub fn store_bounded(
        &self,
        src: &mut dyn Read,
        meta: &Meta,
        size: u64,
        sha256: &Hash,
        data: Option<u64>,
    ) -> Result<bool> {
        let id = object_id(meta, size, sha256);
        let most = data.map_or(u64::MAX, |n| {
            n.div_ceil(sparse::BLOCK).saturating_mul(sparse::BLOCK)
        });
        if self.has(&id)? {
            return Ok(false);
        }
        let tmp = TmpFile::create(self.tmp.as_fd(), TMP_PREFIX).context("in `tmp/`")?;
        let mut h = Sha256::new();
        let mut out = sparse::Writer::new(tmp.fd());
        let mut written = 0u64;
        hash::with_io_buffer(|buf| -> Result<()> {
            loop {
                // Whole buffers, so that the writer sees whole aligned blocks.
                let n = crate::core::tar::read_full(src, buf).context("cannot read object data")?;
                if n == 0 {
                    return Ok(());
                }
                written += n as u64;
                if written > size {
                    return Err(too_long(&id, size));
                }
                h.update(&buf[..n]);
                out.write(&buf[..n]).context("cannot write object")?;
                if out.data() > most {
                    return Err(Fail::Integrity(format!(
                        "it has more than the {} bytes of data it declares",
                        data.unwrap_or_default()
                    ))
                    .into());
                }
                if n < buf.len() {
                    return Ok(());
                }
            }
        })?;
        check_stored(written, h.finalize().into(), size, sha256)?;
        out.finish().context("cannot write object")?;
        self.publish(tmp, meta, &id, 0)
    }

    /// [`Pool::store`] from the open regular file `fd`, as `import` does: its holes are not
    /// read (`sparse::read_runs`) and stay holes, its aligned blocks of zeros become holes.
    /// The file must hold exactly `size` bytes hashing to `sha256`, or nothing is published
    /// (an integrity error: it changed since it was hashed).
    pub fn store_file(
        &self,
        fd: BorrowedFd,
        meta: &Meta,
        size: u64,
        sha256: &Hash,
    ) -> Result<bool> {
        let id = object_id(meta, size, sha256);
        if self.has(&id)? {
            return Ok(false);
        }
        let tmp = TmpFile::create(self.tmp.as_fd(), TMP_PREFIX).context("in `tmp/`")?;
        let mut h = Sha256::new();
        let mut out = sparse::Writer::new(tmp.fd());
        let st = sys::fstat(fd).context("cannot stat a file")?;
        let written = hash::with_io_buffer(|buf| {
            sparse::read_runs(fd, &st, size.saturating_add(1), buf, &mut |run| {
                match run {
                    sparse::Run::Data(d) => {
                        h.update(d);
                        out.write(d).context("cannot write object")?;
                    }
                    sparse::Run::Hole(n) => {
                        hash::hash_zeros(&mut h, n);
                        out.skip(n);
                    }
                }
                Ok(())
            })
        })?;
        if written > size {
            return Err(too_long(&id, size));
        }
        check_stored(written, h.finalize().into(), size, sha256)?;
        out.finish().context("cannot write object")?;
        self.publish(tmp, meta, &id, 0)
    }

    /// Gives a written temporary file its metadata and links or renames it into place.
    fn publish(&self, mut tmp: TmpFile, meta: &Meta, id: &ObjectId, copy: u32) -> Result<bool> {
        sys::apply_meta_fd(tmp.fd(), meta)?;
        sys::zero_times(tmp.fd())?;
        let rel = self.rel(id, copy);
        match tmp.publish(self.dir.as_fd(), rel.as_bytes()) {
            Ok(()) => {
                // The temporary name is gone: nothing to clean up.
                self.created.lock().expect("poisoned").push(rel.clone());
                if self.mode == Protection::Immutable {
                    iflags::set_immutable(tmp.fd(), true)
                        .with_context(|| format!("cannot protect `pool/{rel}`"))?;
                }
                Ok(true)
            }
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot publish object `pool/{rel}`")),
        }
    }

    /// Removes every object this handle published (newest first). Only for work that failed
    /// before any tree linked them; a failure to remove one is logged, and `gc` removes it
    /// later.
    pub fn discard_created(&self) {
        let created = std::mem::take(&mut *self.created.lock().expect("poisoned"));
        for rel in created.iter().rev() {
            if let Err(e) = iflags::unlink_protected(self.dir.as_fd(), rel.as_bytes()) {
                log::warn!("cannot remove `pool/{rel}` after a failure: {e:#}");
            }
        }
    }

    /// Opens an object for reading (beneath `pool/`, no symlink followed, without blocking);
    /// the pool holds only regular files treeswap wrote, so the descriptor is not checked.
    pub fn open_object(&self, id: &ObjectId) -> Result<OwnedFd> {
        let rel = self.rel(id, 0);
        sys::open_file_beneath(self.dir.as_fd(), rel.as_bytes())
            .with_context(|| format!("object `pool/{rel}` is missing or unreadable"))
    }

    /// Hardlinks object `id` as `name` in `dir`. When the object's inode has run out of links
    /// (`EMLINK`), links to an extra copy of it instead, making the copy if needed.
    pub fn link(&self, id: &ObjectId, dir: BorrowedFd, name: &[u8]) -> Result<()> {
        let start = self
            .copy_hint
            .lock()
            .expect("poisoned")
            .get(id)
            .copied()
            .unwrap_or(0);
        for copy in start..=MAX_COPIES {
            let rel = self.rel(id, copy);
            match self.link_object(&rel, dir, name) {
                Ok(()) => return Ok(()),
                Err(Errno::MLINK) => {
                    self.copy_hint
                        .lock()
                        .expect("poisoned")
                        .insert(*id, copy + 1);
                    continue;
                }
                Err(Errno::NOENT) if copy > 0 => {
                    self.make_copy(id, copy)?;
                    match self.link_object(&rel, dir, name) {
                        Ok(()) => return Ok(()),
                        Err(Errno::MLINK) => continue,
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!(
                                    "cannot link `pool/{rel}` to `{}`",
                                    crate::core::path::display(name)
                                )
                            });
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot link `pool/{rel}` to `{}`",
                            crate::core::path::display(name)
                        )
                    });
                }
            }
        }
        bail!(
            "object {} has run out of links even with {MAX_COPIES} copies",
            hex::encode(id)
        )
    }

    /// Makes extra copy `n` of an object: same bytes, same metadata, another inode.
    fn make_copy(&self, id: &ObjectId, n: u32) -> Result<()> {
        log::debug!(
            "object {} reached the link limit; making copy {n}",
            hex::encode(id)
        );
        let src = self.open_object(id)?;
        let st = sys::fstat(src.as_fd())?;
        let meta = sys::meta_of(&st, sys::fd_xattrs(src.as_fd())?);
        let tmp = TmpFile::create(self.tmp.as_fd(), TMP_PREFIX).context("in `tmp/`")?;
        sparse::copy(src.as_fd(), tmp.fd(), st.st_size as u64)
            .with_context(|| format!("cannot copy object {}", hex::encode(id)))?;
        self.publish(tmp, &meta, id, n)?;
        Ok(())
    }

    /// The pool's device, and the inode number of each object in `wanted` (sorted by id)
    /// that the pool has, without its extra copies. Reads the pool directory (each shard that
    /// holds one of them, if sharded) once: the inode numbers come with the names, which costs
    /// far less than a lookup per object. A file system whose directory entries carry other
    /// numbers than `stat` only makes callers fall back to [`Pool::inodes`].
    pub fn primary_inodes<T: Sync>(
        &self,
        wanted: &[(ObjectId, T)],
    ) -> Result<(u64, Vec<Option<u64>>)> {
        use rayon::prelude::*;
        let dev = sys::fstat(self.dir.as_fd())
            .context("cannot stat the pool")?
            .st_dev;
        let mut inodes: Vec<Option<u64>> = vec![None; wanted.len()];
        // Split both by directory: one, or one per shard (the first byte of the id).
        type Part<'a, T> = (String, &'a [(ObjectId, T)], &'a mut [Option<u64>]);
        let mut parts: Vec<Part<T>> = Vec::new();
        match self.shape {
            Shape::Flat => parts.push((".".to_owned(), wanted, &mut inodes[..])),
            Shape::Sharded => {
                let (mut rest_w, mut rest_i) = (wanted, &mut inodes[..]);
                while let Some(first) = rest_w.first() {
                    let shard = first.0[0];
                    let n = rest_w.partition_point(|(id, _)| id[0] == shard);
                    let (w, w2) = rest_w.split_at(n);
                    let (i, i2) = std::mem::take(&mut rest_i).split_at_mut(n);
                    parts.push((hex::encode([shard]), w, i));
                    (rest_w, rest_i) = (w2, i2);
                }
            }
        }
        parts
            .par_iter_mut()
            .try_for_each(|(name, w, out)| -> Result<()> {
                let fd = match sys::openat2_dir(self.dir.as_fd(), name.as_bytes()) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(e).context(format!("cannot open `pool/{name}`")),
                };
                sys::for_each_dirent(fd.as_fd(), |file_name, ino| {
                    let mut id = [0u8; 32];
                    if hex::decode_to_slice(file_name, &mut id).is_err() {
                        return;
                    }
                    let mut k = w.partition_point(|(x, _)| *x < id);
                    while k < w.len() && w[k].0 == id {
                        out[k] = Some(ino);
                        k += 1;
                    }
                })
                .context("cannot read the pool")
            })?;
        Ok((dev, inodes))
    }

    /// The (device, inode) of every copy of an object, for fast verification.
    pub fn inodes(&self, id: &ObjectId) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for copy in 0..=MAX_COPIES {
            match sys::lstatat(self.dir.as_fd(), self.rel(id, copy).as_bytes())? {
                Some(st) => out.push((st.st_dev, st.st_ino)),
                None if copy == 0 => continue,
                None => break,
            }
        }
        Ok(out)
    }

    /// Re-reads every copy of an object and checks that its bytes and metadata still give its
    /// id. Returns a description of each problem.
    pub fn check_object(&self, id: &ObjectId) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for copy in 0..=MAX_COPIES {
            let rel = self.rel(id, copy);
            let fd = match sys::open_file_beneath(self.dir.as_fd(), rel.as_bytes()) {
                Ok(fd) => fd,
                Err(_) if copy > 0 => break,
                Err(_) => {
                    problems.push(format!("object `pool/{rel}` is missing"));
                    break;
                }
            };
            let st = sys::fstat(fd.as_fd())?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
            {
                problems.push(format!("object `pool/{rel}` is not a regular file"));
                continue;
            }
            let meta = sys::meta_of(&st, sys::fd_xattrs(fd.as_fd())?);
            let (size, sha) = hash::hash_fd_upto(fd.as_fd(), &st, u64::MAX)
                .with_context(|| format!("cannot read `pool/{rel}`"))?;
            if object_id(&meta, size, &sha) != *id {
                problems.push(format!(
                    "object `pool/{rel}` is corrupt: its content or metadata no longer match its id"
                ));
            }
        }
        Ok(problems)
    }

    /// Every object id in the pool with its size (extra copies are not counted twice), for
    /// status and gc.
    pub fn list(&self) -> Result<Vec<(ObjectId, u64)>> {
        let mut out = Vec::new();
        self.for_each_dir(|dir, _| {
            for name in sys::read_dir(dir)? {
                let st = sys::lstatat(dir, &name)?;
                let Some(st) = st else { continue };
                let mut id = [0u8; 32];
                // `<id>.<n>` is an extra copy of `<id>`, not another object.
                if name.contains(&b'.') {
                    continue;
                }
                if hex::decode_to_slice(&name, &mut id).is_ok() {
                    out.push((id, st.st_size as u64));
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}
