//! Finding similar contents by what is in them, whatever their names: a sketch of each
//! content (the smallest hashes of its content-defined anchors, a MinHash over the content's
//! chunks) and an index from sketch values to the contents that have them. Two contents that
//! share many chunks share many of their smallest anchor hashes (apt's `pkgcache.bin` and
//! `srcpkgcache.bin`, a file copied and edited, a library under a new name).

use std::collections::HashMap;

/// Contents smaller than this are not sketched: a patch saves little on them, and their few
/// anchors say little.
pub(super) const MIN_SIZE: u64 = 4096;
/// Values kept per sketch.
const K: usize = 32;
/// An anchor is where the rolling hash has these low bits zero: one every 256 bytes on
/// average, so a 4 KiB content has about 16.
const ANCHOR_MASK: u64 = 0xff;
/// A value shared by more contents than this is a run every file has (zeros, padding): it
/// says nothing about similarity and is not indexed further.
const MAX_POSTING: usize = 32;
/// Two contents are similar when they share at least this many of their sketch values...
const MIN_SHARED: usize = 3;
/// ...and at least 1/this of the smaller sketch.
const MIN_SHARED_FRACTION: usize = 4;

const fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The gear table of the rolling hash: one pseudo-random word per byte value.
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = splitmix(i as u64);
        i += 1;
    }
    t
};

/// The sketch of `data`: the [`K`] smallest distinct hashes of its anchors. A gear hash
/// (`h = 2h + GEAR[byte]`) depends on the last 64 bytes only, so an anchor and its value are
/// the same wherever the same 64 bytes occur.
pub(super) fn sketch(data: &[u8]) -> Vec<u64> {
    let mut h = 0u64;
    let mut values = Vec::with_capacity(data.len() / 200 + 1);
    for &b in data {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if h & ANCHOR_MASK == 0 {
            values.push(splitmix(h));
        }
    }
    values.sort_unstable();
    values.dedup();
    values.truncate(K);
    values
}

/// An index of the sketches of contents `0, 1, 2, …`, added in order.
#[derive(Default)]
pub(super) struct Index {
    posting: HashMap<u64, Vec<u32>>,
    lens: Vec<usize>,
}

impl Index {
    /// The contents added so far that are similar to `sketch`, most similar first (ties: the
    /// latest first), at most `max`.
    pub(super) fn similar(&self, sketch: &[u64], max: usize) -> Vec<usize> {
        let mut shared: HashMap<u32, usize> = HashMap::new();
        for v in sketch {
            for &k in self.posting.get(v).into_iter().flatten() {
                *shared.entry(k).or_default() += 1;
            }
        }
        let mut hits: Vec<(usize, u32)> = shared
            .into_iter()
            .filter(|&(k, n)| {
                let smaller = sketch.len().min(self.lens[k as usize]);
                n >= MIN_SHARED && n * MIN_SHARED_FRACTION >= smaller
            })
            .map(|(k, n)| (n, k))
            .collect();
        hits.sort_unstable_by(|a, b| b.cmp(a));
        hits.into_iter()
            .take(max)
            .map(|(_, k)| k as usize)
            .collect()
    }

    /// Adds the next content's sketch (empty for a content not sketched).
    pub(super) fn add(&mut self, sketch: &[u64]) {
        let k = self.lens.len() as u32;
        self.lens.push(sketch.len());
        for v in sketch {
            let p = self.posting.entry(*v).or_default();
            if p.len() < MAX_POSTING {
                p.push(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        (0..n as u64)
            .map(|i| splitmix(i ^ seed.rotate_left(32)) as u8)
            .collect()
    }

    #[test]
    fn similar_contents_are_found_and_others_are_not() {
        let a = noise(200_000, 1);
        let mut b = a.clone();
        // Edits everywhere, and a shift: most chunks stay.
        for i in (0..b.len()).step_by(10_000) {
            b[i] ^= 0x55;
        }
        b.splice(1000..1000, noise(333, 9));
        let c = noise(200_000, 2);
        let (sa, sb, sc) = (sketch(&a), sketch(&b), sketch(&c));
        assert_eq!(sa.len(), K);
        let mut idx = Index::default();
        idx.add(&sa);
        idx.add(&sketch(b"too small"));
        idx.add(&sc);
        assert_eq!(idx.similar(&sb, 2), vec![0], "b is like a, not like c");
        assert_eq!(
            idx.similar(&sketch(&noise(200_000, 3)), 2),
            Vec::<usize>::new()
        );
        // A run of zeros has no anchors to share with anything.
        assert!(sketch(&vec![0u8; 100_000]).len() <= 1);
    }
}
