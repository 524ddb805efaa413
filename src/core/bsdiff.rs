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
    let mut sa = vec![0i32; old.len()];
    divsufsort::sort_in_place(old, &mut sa);
    let sa: Vec<usize> = sa.into_iter().map(|i| i as usize).collect();

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
fn longest_match(sa: &[usize], old: &[u8], new: &[u8]) -> (usize, usize) {
    if sa.is_empty() {
        return (0, 0);
    }
    let (mut lo, mut hi) = (0, sa.len() - 1);
    while hi - lo >= 2 {
        let mid = lo + (hi - lo) / 2;
        let suffix = &old[sa[mid]..];
        let n = suffix.len().min(new.len());
        if suffix[..n] < new[..n] {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (a, b) = (
        common_prefix(&old[sa[lo]..], new),
        common_prefix(&old[sa[hi]..], new),
    );
    if a >= b { (sa[lo], a) } else { (sa[hi], b) }
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
    }
}
