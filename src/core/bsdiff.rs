//! A bsdiff encoder (Colin Percival's algorithm) that writes the patch format the `bsdiff`
//! crate applies, built on a suffix array from `divsufsort`, which sorts a 2 MiB executable
//! several times faster than the crate's own `qsufsort`.
//!
//! The patch is a sequence of records, each a 24-byte header (the number of bytes to add to
//! the old file, the number of new bytes to copy, and how far to move in the old file; the
//! first two are little-endian, the third sign-and-magnitude little-endian) followed by the
//! added differences and the copied bytes.

/// Writes the patch that turns `old` into `new`. Inputs must be below 2 GiB (the suffix array
/// holds `i32`s); callers only encode small files.
pub(crate) fn diff(old: &[u8], new: &[u8], out: &mut Vec<u8>) {
    assert!(old.len() < i32::MAX as usize && new.len() < i32::MAX as usize);
    // Kept as `i32`s (4 bytes per byte of `old`): widened to `usize` it took 12 at once,
    // 480 MB for apt's 40 MB `pkgcache.bin`.
    let mut sa = vec![0i32; old.len()];
    divsufsort::sort_in_place(old, &mut sa);

    let (oldn, newn) = (old.len(), new.len());
    let (mut scan, mut len, mut pos) = (0usize, 0usize, 0usize);
    let (mut last_scan, mut last_pos, mut last_offset) = (0usize, 0usize, 0isize);
    let at_old = |i: isize| -> Option<u8> {
        if i >= 0 {
            old.get(i as usize).copied()
        } else {
            None
        }
    };
    while scan < newn {
        let mut old_score = 0usize;
        scan += len;
        let mut scsc = scan;
        while scan < newn {
            (pos, len) = longest_match(&sa, old, &new[scan..]);
            // How many bytes of the new match the old at the previous offset already.
            while scsc < scan + len {
                if at_old(scsc as isize + last_offset) == Some(new[scsc]) {
                    old_score += 1;
                }
                scsc += 1;
            }
            if (len == old_score && len != 0) || len > old_score + 8 {
                break;
            }
            if at_old(scan as isize + last_offset) == Some(new[scan]) {
                old_score = old_score.saturating_sub(1);
            }
            scan += 1;
        }
        if len == old_score && scan != newn {
            continue;
        }
        // Extend the previous match forwards while it matches more than half.
        let (mut s, mut best, mut len_f) = (0isize, 0isize, 0usize);
        let mut i = 0;
        while last_scan + i < scan && last_pos + i < oldn {
            if old[last_pos + i] == new[last_scan + i] {
                s += 1;
            }
            i += 1;
            if s * 2 - i as isize > best * 2 - len_f as isize {
                best = s;
                len_f = i;
            }
        }
        // And the new match backwards.
        let mut len_b = 0usize;
        if scan < newn {
            let (mut s, mut best) = (0isize, 0isize);
            let mut i = 1;
            while scan >= last_scan + i && pos >= i {
                if old[pos - i] == new[scan - i] {
                    s += 1;
                }
                if s * 2 - i as isize > best * 2 - len_b as isize {
                    best = s;
                    len_b = i;
                }
                i += 1;
            }
        }
        // Where the two extensions overlap, split them where the most bytes match.
        if last_scan + len_f > scan - len_b {
            let overlap = (last_scan + len_f) - (scan - len_b);
            let (mut s, mut best, mut len_s) = (0isize, 0isize, 0usize);
            for i in 0..overlap {
                if new[last_scan + len_f - overlap + i] == old[last_pos + len_f - overlap + i] {
                    s += 1;
                }
                if new[scan - len_b + i] == old[pos - len_b + i] {
                    s -= 1;
                }
                if s > best {
                    best = s;
                    len_s = i + 1;
                }
            }
            len_f = len_f + len_s - overlap;
            len_b -= len_s;
        }
        let copy = (scan - len_b) - (last_scan + len_f);
        let seek = (pos - len_b) as i64 - (last_pos + len_f) as i64;
        out.extend_from_slice(&(len_f as u64).to_le_bytes());
        out.extend_from_slice(&(copy as u64).to_le_bytes());
        out.extend_from_slice(&signed(seek));
        out.extend(
            new[last_scan..last_scan + len_f]
                .iter()
                .zip(&old[last_pos..last_pos + len_f])
                .map(|(n, o)| n.wrapping_sub(*o)),
        );
        out.extend_from_slice(&new[last_scan + len_f..scan - len_b]);
        last_scan = scan - len_b;
        last_pos = pos - len_b;
        last_offset = pos as isize - scan as isize;
    }
}

/// Applies a patch as it streams: reads the patch from `patch` and yields the new file's bytes,
/// holding nothing but the old file and one record's header, so memory does not depend on any
/// length a record declares. It accepts exactly what the `bsdiff` crate's `patch` accepts
/// (the unit tests compare the two on arbitrary patches).
pub(crate) struct Patcher<'a, R> {
    old: &'a [u8],
    patch: R,
    /// Where the next added bytes are read in `old`.
    pos: usize,
    /// Bytes of the current record still to add to `old`, then to copy as they are.
    add: u64,
    copy: u64,
    /// The move in `old` after the current record.
    seek: i64,
    /// The record is done and the patch may end here.
    at_record: bool,
}

impl<'a, R: std::io::Read> Patcher<'a, R> {
    pub(crate) fn new(old: &'a [u8], patch: R) -> Self {
        Patcher {
            old,
            patch,
            pos: 0,
            add: 0,
            copy: 0,
            seek: 0,
            at_record: true,
        }
    }

    /// Reads the next record's header; `false` at the end of the patch.
    fn next_record(&mut self) -> std::io::Result<bool> {
        use std::io::ErrorKind::{InvalidData, UnexpectedEof};
        if !self.at_record {
            self.pos = i64::try_from(self.pos)
                .ok()
                .and_then(|p| p.checked_add(self.seek))
                .and_then(|p| usize::try_from(p).ok())
                .ok_or(InvalidData)?;
        }
        let mut h = [0u8; 24];
        match crate::core::tar::read_full(&mut self.patch, &mut h)? {
            0 => return Ok(false),
            24 => {}
            _ => return Err(UnexpectedEof.into()),
        }
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let (add, copy, seek) = (word(0), word(8), word(16));
        let seek = if seek >> 63 == 0 {
            seek as i64
        } else {
            -((seek & !(1 << 63)) as i64)
        };
        // The lengths must fit the platform, as the crate requires, and the added bytes must
        // lie within the old file.
        let add_len = usize::try_from(add).map_err(|_| InvalidData)?;
        usize::try_from(copy).map_err(|_| InvalidData)?;
        add_len.checked_add(copy as usize).ok_or(InvalidData)?;
        let end = self.pos.checked_add(add_len).ok_or(InvalidData)?;
        // `end` is at least `pos`: both lie within the old file.
        if end > self.old.len() {
            return Err(UnexpectedEof.into());
        }
        (self.add, self.copy, self.seek, self.at_record) = (add, copy, seek, false);
        Ok(true)
    }
}

impl<R: std::io::Read> std::io::Read for Patcher<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.add == 0 && self.copy == 0 {
            if !self.next_record()? {
                return Ok(0);
            }
        }
        let adding = self.add > 0;
        let left = if adding { self.add } else { self.copy };
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.patch.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if adding {
            let old = &self.old[self.pos..self.pos + n];
            for (b, o) in buf[..n].iter_mut().zip(old) {
                *b = b.wrapping_add(*o);
            }
            self.pos += n;
            self.add -= n as u64;
        } else {
            self.copy -= n as u64;
        }
        Ok(n)
    }
}

/// Sign-and-magnitude little-endian, as bsdiff writes offsets.
fn signed(x: i64) -> [u8; 8] {
    let mut b = x.unsigned_abs().to_le_bytes();
    if x < 0 {
        b[7] |= 0x80;
    }
    b
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The position in `old` and length of the longest prefix of `new` that `old` holds, found
/// by binary search over the suffix array.
fn longest_match(sa: &[i32], old: &[u8], new: &[u8]) -> (usize, usize) {
    if sa.is_empty() {
        return (0, 0);
    }
    // `divsufsort` gives offsets in `0..old.len()`.
    let at = |i: usize| sa[i] as usize;
    let (mut lo, mut hi) = (0, sa.len() - 1);
    while hi - lo >= 2 {
        let mid = lo + (hi - lo) / 2;
        let suffix = &old[at(mid)..];
        let n = suffix.len().min(new.len());
        if suffix[..n] < new[..n] {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (a, b) = (
        common_prefix(&old[at(lo)..], new),
        common_prefix(&old[at(hi)..], new),
    );
    if a >= b { (at(lo), a) } else { (at(hi), b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut p = Vec::new();
        diff(old, new, &mut p);
        let mut got = Vec::new();
        bsdiff::patch(old, &mut &p[..], &mut got).unwrap();
        assert_eq!(got, new);
        assert_eq!(stream_patch(old, &p).as_deref(), Some(new));
        p.len()
    }

    #[test]
    fn patches_apply_with_the_bsdiff_crate() {
        round_trip(b"", b"");
        round_trip(b"", b"new");
        round_trip(b"old", b"");
        round_trip(b"abc", b"abc");
        // Pseudo-random bytes with edits, moves and insertions, of several sizes.
        let mut x = 0x2545f491u32;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for n in [1, 7, 100, 5000, 70_000] {
            let old: Vec<u8> = (0..n).map(|_| (rnd() % 7) as u8).collect();
            let mut new = old.clone();
            for _ in 0..n / 50 + 1 {
                let i = rnd() as usize % new.len();
                new[i] = new[i].wrapping_add(3);
            }
            let cut = rnd() as usize % new.len();
            new.rotate_left(cut);
            new.extend_from_slice(&old[..n / 3]);
            round_trip(&old, &new);
        }
        // Code that moved by a few bytes: the patch is far smaller than the file.
        let old: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i * 8).to_le_bytes())
            .collect();
        let new: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i * 8 + 16).to_le_bytes())
            .collect();
        let n = round_trip(&old, &new);
        assert!(
            zstd::bulk::compress(
                &{
                    let mut p = Vec::new();
                    diff(&old, &new, &mut p);
                    p
                },
                3
            )
            .unwrap()
            .len()
                < new.len() / 20,
            "patch of {n} bytes"
        );
    }

    /// Applies `patch` to `old` with [`Patcher`]; `None` when it fails.
    fn stream_patch(old: &[u8], patch: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut Patcher::new(old, patch), &mut out).ok()?;
        Some(out)
    }

    /// A record header: bytes to add, bytes to copy, the move (sign and magnitude).
    fn record(add: u64, copy: u64, seek: i64) -> Vec<u8> {
        let mut h = add.to_le_bytes().to_vec();
        h.extend_from_slice(&copy.to_le_bytes());
        h.extend_from_slice(&signed(seek));
        h
    }

    #[test]
    fn the_streaming_patcher_agrees_with_the_crate() {
        let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"hello".to_vec(), vec![]),
            (
                b"hello".to_vec(),
                [record(5, 1, 0), vec![0; 5], b"!".to_vec()].concat(),
            ),
            // Added bytes beyond the old file; a move before its start; a move past its end
            // with nothing more to add; a truncated header and a truncated record.
            (b"hi".to_vec(), [record(3, 0, 0), vec![0; 3]].concat()),
            (b"hi".to_vec(), [record(1, 0, -5), vec![1]].concat()),
            (
                b"hi".to_vec(),
                [record(0, 0, 9), record(0, 1, 0), b"x".to_vec()].concat(),
            ),
            (b"hi".to_vec(), record(0, 0, 9)),
            (b"hi".to_vec(), record(1, 0, 0)[..10].to_vec()),
            (b"hi".to_vec(), [record(2, 4, 0), vec![1, 1, 7]].concat()),
            // Lengths that do not fit memory: refused, not allocated.
            (b"hi".to_vec(), record(u64::MAX, 1, 0)),
            (b"hi".to_vec(), record(1, u64::MAX, 0)),
            (b"hi".to_vec(), [record(1, 1 << 40, 0), vec![1, 2]].concat()),
        ];
        for (old, patch) in &cases {
            let mut want = Vec::new();
            let crate_ok = bsdiff::patch(old, &mut &patch[..], &mut want).is_ok();
            assert_eq!(
                stream_patch(old, patch),
                crate_ok.then_some(want),
                "patch {patch:?}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_pair_round_trips(
            old in proptest::collection::vec(0u8..4, 0..3000),
            edits in proptest::collection::vec((0usize..3000, 0u8..4), 0..40),
            cut in 0usize..3000,
        ) {
            let mut new = old.clone();
            for (i, b) in edits {
                if !new.is_empty() {
                    let i = i % new.len();
                    new[i] = b;
                }
            }
            let cut = cut.min(new.len());
            new.splice(cut..cut, old.iter().rev().copied().take(100));
            round_trip(&old, &new);
        }

        #[test]
        fn any_patch_streams_as_the_crate_applies_it(
            old in proptest::collection::vec(0u8..4, 0..200),
            records in proptest::collection::vec((0u64..300, 0u64..300, -300i64..300), 0..6),
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
            cut in 0usize..4000,
        ) {
            let mut patch = Vec::new();
            let mut rest = &data[..];
            for (add, copy, seek) in records {
                patch.extend(record(add, copy, seek));
                let n = ((add + copy) as usize).min(rest.len());
                patch.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            patch.truncate(cut.max(patch.len() / 2));
            let mut want = Vec::new();
            let crate_ok = bsdiff::patch(&old, &mut &patch[..], &mut want).is_ok();
            proptest::prop_assert_eq!(stream_patch(&old, &patch), crate_ok.then_some(want));
        }
    }
}
