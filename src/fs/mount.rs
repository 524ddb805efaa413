//! Mounts for overlay guests: [mount(2)] of an overlay, [umount2(2)], and what
//! `/proc/self/mountinfo` says is mounted at a path. Paths here are absolute, by name: the
//! kernel takes mount points and overlay layers by path.
//!
//! [mount(2)]: https://man7.org/linux/man-pages/man2/mount.2.html
//! [umount2(2)]: https://man7.org/linux/man-pages/man2/umount2.2.html

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::core::path::display;

/// `path` made absolute and free of symlinks ([realpath(3)]): overlay options and mount
/// points are names, and what `mountinfo` shows must match them.
///
/// [realpath(3)]: https://man7.org/linux/man-pages/man3/realpath.3.html
pub(crate) fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve `{}`", display(path.as_os_str().as_bytes())))
}

/// A path that can go into overlay mount options as it is: the options are separated by `,`,
/// lower layers by `:`, and `\` escapes; such names are refused rather than escaped.
fn option_path(p: &Path) -> Result<&str> {
    let s = p.to_str().filter(|s| {
        !s.bytes()
            .any(|b| matches!(b, b',' | b':' | b'\\' | b'\n' | b'=' | 0) || b < 0x20)
    });
    match s {
        Some(s) => Ok(s),
        None => bail!(
            "`{}` cannot be an overlay layer: its path holds `,`, `:`, `=`, `\\` or a control \
             character",
            display(p.as_os_str().as_bytes())
        ),
    }
}

/// The most bytes of mount data the kernel reads (a page, with its NUL).
const MAX_DATA: usize = 4095;

/// Mounts an overlay at `target` ([mount(2)]): `lower` read-only below, `upper` and `work`
/// (empty, on the same file system as `upper`) for the writes.
///
/// [mount(2)]: https://man7.org/linux/man-pages/man2/mount.2.html
pub(crate) fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<()> {
    // The fixed options first: the kernel keeps only the first 4095 bytes of the data, and
    // the layers' paths come from the root's path. `redirect_dir=nofollow`: with the kernel's
    // default REDIRECT_ALWAYS_FOLLOW, `off` still follows redirects a layer holds.
    let data = format!(
        // The lower layer changes under the upper one at every flip, which overlayfs allows
        // only without these features (overlayfs.rst, "Changes to underlying filesystems").
        "index=off,metacopy=off,redirect_dir=nofollow,xino=off,uuid=off,\
         lowerdir={},upperdir={},workdir={}",
        option_path(lower)?,
        option_path(upper)?,
        option_path(work)?
    );
    if data.len() > MAX_DATA {
        bail!(
            "cannot mount an overlay at `{}`: its options are {} bytes, more than the kernel's \
             {MAX_DATA} (a shorter root path would do)",
            display(target.as_os_str().as_bytes()),
            data.len()
        );
    }
    let data = CString::new(data).expect("no NUL: checked");
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        Some(data.as_c_str()),
    )
    .with_context(|| {
        format!(
            "cannot mount an overlay of `{}` at `{}`",
            display(lower.as_os_str().as_bytes()),
            display(target.as_os_str().as_bytes())
        )
    })
}

/// Unmounts what is mounted at `target` ([umount2(2)], `UMOUNT_NOFOLLOW`); `false` if nothing
/// is (`EINVAL`).
///
/// [umount2(2)]: https://man7.org/linux/man-pages/man2/umount2.2.html
pub(crate) fn unmount(target: &Path) -> Result<bool> {
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(true),
        Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot unmount `{}` (is the guest still running on it?)",
                display(target.as_os_str().as_bytes())
            )
        }),
    }
}

/// What is mounted at a mount point, from one line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mounted {
    pub fs_type: String,
    /// The super block options (`lowerdir=…,upperdir=…` for an overlay).
    pub options: String,
}

impl Mounted {
    /// The value of the super block option `key` (`lowerdir`, …).
    pub(crate) fn option(&self, key: &str) -> Option<&str> {
        self.options
            .split(',')
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The mount on top at `target` (the last line of `/proc/self/mountinfo` whose mount point is
/// `target`), if any. `target` must be absolute and free of symlinks ([`absolute`]).
pub(crate) fn mounted_at(target: &Path) -> Result<Option<Mounted>> {
    let text = std::fs::read("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text, target.as_os_str().as_bytes()))
}

/// Whether an overlay still uses `work` as its work directory, as the kernel knows it: a
/// probe overlay is mounted with `index=on` on `work` (and an empty upper and lower layer
/// made afresh in `scratch`, on the same file system), which overlayfs refuses (`EBUSY`)
/// while any other overlay on `work` lives: in another mount namespace, or detached
/// (`umount -l`) but still held open. The probe is unmounted at once and `scratch` removed;
/// the `index` directory it makes in `work` too. `None` if the probe cannot tell (the file
/// system has no file handles, so the kernel fell back to `index=off`, or refused the probe
/// for another reason, logged).
pub(crate) fn work_in_use(work: &Path, scratch: &Path) -> Result<Option<bool>> {
    let _ = std::fs::remove_dir_all(scratch);
    let (upper, lower, mnt) = (scratch.join("u"), scratch.join("l"), scratch.join("m"));
    for d in [scratch, &upper, &lower, &mnt] {
        std::fs::create_dir(d).with_context(|| format!("cannot make `{}`", d.display()))?;
    }
    let data = format!(
        "index=on,lowerdir={},upperdir={},workdir={}",
        option_path(&lower)?,
        option_path(&upper)?,
        option_path(work)?
    );
    let data = CString::new(data).expect("no NUL: checked");
    let r = rustix::mount::mount(
        "overlay",
        &mnt,
        "overlay",
        MountFlags::empty(),
        Some(data.as_c_str()),
    );
    let answer = match r {
        Err(Errno::BUSY) => Some(true),
        Err(e) => {
            log::debug!("cannot probe `{}` (overlay, index=on): {e}", work.display());
            None
        }
        Ok(()) => {
            // Unmounted first, whatever mountinfo says: no probe is left mounted.
            let on = mounted_at(&mnt);
            rustix::mount::unmount(&mnt, UnmountFlags::NOFOLLOW)
                .with_context(|| format!("cannot unmount the probe `{}`", mnt.display()))?;
            on?.is_some_and(|m| m.option("index") == Some("on"))
                .then_some(false)
        }
    };
    let _ = std::fs::remove_dir(work.join("index"));
    std::fs::remove_dir_all(scratch)
        .with_context(|| format!("cannot remove `{}`", scratch.display()))?;
    Ok(answer)
}

/// A process whose mount namespace still has an overlay on a given work directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub pid: u32,
    /// The process's name (`/proc/PID/comm`), for the message.
    pub comm: String,
    /// Where, in that namespace, the overlay is mounted.
    pub point: String,
}

/// The first process found whose mount namespace has an overlay mounted with
/// `workdir=<work>` (`work` absolute, as it was given to [`mount_overlay`]); with
/// `others_only`, namespaces other than this process's own. A guest that runs in a mount
/// namespace of its own (a container) keeps its overlay there after the host unmounts it:
/// this is how a guest that did not stop is seen. One `mountinfo` per namespace is read;
/// processes that end meanwhile are skipped.
pub(crate) fn overlay_holder(work: &Path, others_only: bool) -> Result<Option<Holder>> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let own = ns("self").context("cannot read /proc/self/ns/mnt")?;
    let want = work.as_os_str().as_bytes();
    let mut seen = std::collections::HashSet::new();
    for e in std::fs::read_dir("/proc").context("cannot read /proc")? {
        let e = e.context("cannot read /proc")?;
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(mnt) = ns(&pid.to_string()) else {
            continue;
        };
        if (others_only && mnt == own) || seen.contains(&mnt) {
            continue;
        }
        let Some(text) = overlay_lines(pid) else {
            continue;
        };
        // Only once it was read: a process that ended first does not hide its namespace.
        seen.insert(mnt);
        if let Some(point) = overlay_on_work(&text, want) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            return Ok(Some(Holder {
                pid,
                comm: comm.trim_end().to_owned(),
                point: String::from_utf8_lossy(&point).into_owned(),
            }));
        }
    }
    Ok(None)
}

/// The overlay lines of `/proc/PID/mountinfo`, read line by line (a namespace may hold a
/// hundred thousand mounts of a guest's making): lines longer than 64 KiB are skipped, and
/// at most 16 MiB of overlay lines kept. `None` if it cannot be read.
fn overlay_lines(pid: u32) -> Option<Vec<u8>> {
    use std::io::BufRead;
    const LINE: usize = 64 << 10;
    const KEPT: usize = 16 << 20;
    let f = std::fs::File::open(format!("/proc/{pid}/mountinfo")).ok()?;
    let mut r = std::io::BufReader::new(f);
    let (mut out, mut line) = (Vec::new(), Vec::new());
    loop {
        line.clear();
        let n = std::io::Read::take(&mut r, LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .ok()?;
        if n == 0 {
            return Some(out);
        }
        if line.last() != Some(&b'\n') {
            if n <= LINE {
                // The last line, without its newline.
                line.push(b'\n');
            } else {
                // Too long: skip to its end.
                let mut rest = Vec::new();
                while std::io::Read::take(&mut r, LINE as u64)
                    .read_until(b'\n', &mut rest)
                    .ok()?
                    > 0
                    && rest.last() != Some(&b'\n')
                {
                    rest.clear();
                }
                continue;
            }
        }
        if out.len() < KEPT && line.windows(11).any(|w| w == b" - overlay ") {
            out.extend_from_slice(&line);
        }
    }
}

/// The mount point of the first overlay in `text` (a `mountinfo`) whose `workdir` is `work`.
fn overlay_on_work(text: &[u8], work: &[u8]) -> Option<Vec<u8>> {
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let (Some(ty), Some(opts), Some(point)) =
            (fields.get(dash + 1), fields.get(dash + 3), fields.get(4))
        else {
            continue;
        };
        if *ty != b"overlay" {
            continue;
        }
        // Split first: an escaped `,` (`\054`) inside another option is not a separator.
        let on_work = opts
            .split(|&b| b == b',')
            .any(|o| unescape(o).strip_prefix(b"workdir=") == Some(work));
        if on_work {
            return Some(unescape(point));
        }
    }
    None
}

/// proc(5): `ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - TYPE SOURCE SUPER_OPTS`, with
/// space, tab, newline and `\` in names escaped as `\ooo`.
fn parse_mountinfo(text: &[u8], target: &[u8]) -> Option<Mounted> {
    let mut found = None;
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 10 || unescape(fields[4]) != target {
            continue;
        }
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let (Some(ty), Some(opts)) = (fields.get(dash + 1), fields.get(dash + 3)) else {
            continue;
        };
        found = Some(Mounted {
            fs_type: String::from_utf8_lossy(ty).into_owned(),
            options: String::from_utf8_lossy(&unescape(opts)).into_owned(),
        });
    }
    found
}

fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = b"22 1 0:21 / /proc rw - proc proc rw\n\
            90 22 0:50 / /v/guests/a\\040b/rootfs rw,nosuid - overlay overlay rw,lowerdir=/v/trees/1,upperdir=/v/guests/a/layer-1,workdir=/v/guests/a/work\n\
            91 22 0:51 / /v/guests/a\\040b/rootfs rw - overlay overlay rw,lowerdir=/v/trees/2,upperdir=/u,workdir=/w\n";
        let m = parse_mountinfo(text, b"/v/guests/a b/rootfs").unwrap();
        assert_eq!(m.fs_type, "overlay");
        assert_eq!(m.option("lowerdir"), Some("/v/trees/2"));
        assert_eq!(m.option("upperdir"), Some("/u"));
        assert_eq!(parse_mountinfo(text, b"/v/guests"), None);
        assert_eq!(
            overlay_on_work(text, b"/v/guests/a/work"),
            Some(b"/v/guests/a b/rootfs".to_vec())
        );
        assert_eq!(overlay_on_work(text, b"/v/guests/a"), None);
        let forged = b"9 1 0:9 / /x rw - overlay overlay rw,lowerdir=/l\\054workdir=/w,upperdir=/u,workdir=/z\n";
        assert_eq!(overlay_on_work(forged, b"/w"), None);
        assert_eq!(overlay_on_work(forged, b"/z"), Some(b"/x".to_vec()));
        assert_eq!(
            overlay_on_work(b"22 1 0:21 / /w rw - proc proc workdir=/w\n", b"/w"),
            None
        );
        assert!(option_path(Path::new("/a,b")).is_err());
        assert!(option_path(Path::new("/a:b")).is_err());
        assert_eq!(option_path(Path::new("/a/b c")).unwrap(), "/a/b c");
    }
}
