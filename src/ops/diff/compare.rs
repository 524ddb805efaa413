//! Comparing two trees: a merge-join of their sorted manifests, and what of the base the
//! changed files may use as references.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use anyhow::Result;

use crate::core::manifest::{Entry, Kind};
use crate::core::object::Hash;
use crate::store::root::Root;

/// The keys under which a path finds similar files of other paths, best first: the whole path
/// with digits removed (so that `usr/lib/python3.11/os.py` finds `python3.13/os.py` and
/// `perl/5.36/…` finds `perl/5.40/…`), the name without its directories, and that name with
/// digits removed (so that `libfoo.so.1.2` finds `libfoo.so.1.3`). A name never holds `/`,
/// a path below the top always does, so the kinds of key never meet.
pub(super) fn names(path: &[u8]) -> [Vec<u8>; 3] {
    let strip =
        |s: &[u8]| -> Vec<u8> { s.iter().copied().filter(|b| !b.is_ascii_digit()).collect() };
    let base = crate::core::path::split_parent(path).1.to_vec();
    let stem = strip(&base);
    [strip(path), base, stem]
}

/// How the new tree differs from the base: its changed entries (new paths included), the
/// removed paths, and the new tree's digest and entry count.
pub(crate) struct Changes {
    pub changed: Vec<Entry>,
    pub removed: Vec<Box<[u8]>>,
    pub to_digest: Hash,
    pub to_count: u64,
}

/// A merge-join of the base's sorted entries (an iterator, which may be reading them as it
/// goes, of owned or borrowed entries) with the new tree's, fed block by block: neither tree
/// need be in memory as a whole.
pub(super) struct Compare<I: Iterator<Item = T>, T: Borrow<Entry>> {
    base: std::iter::Peekable<I>,
    changed: Vec<Entry>,
    removed: Vec<Box<[u8]>>,
}

impl<I: Iterator<Item = T>, T: Borrow<Entry>> Compare<I, T> {
    pub(super) fn new(base: I) -> Self {
        Compare {
            base: base.peekable(),
            changed: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// The next entries of the new tree, in order.
    pub(super) fn feed(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for y in entries {
            while let Some(x) = self.base.next_if(|x| x.borrow().path < y.path) {
                self.removed.push(x.borrow().path.clone());
            }
            match self.base.next_if(|x| x.borrow().path == y.path) {
                Some(x) if *x.borrow() == y => {}
                _ => self.changed.push(y),
            }
        }
    }

    pub(super) fn finish(mut self, to_digest: Hash, to_count: u64) -> Changes {
        for x in self.base.by_ref() {
            self.removed.push(x.borrow().path.clone());
        }
        Changes {
            changed: self.changed,
            removed: self.removed,
            to_digest,
            to_count,
        }
    }
}

/// A reader of a base tree's sorted entries as a stream (it may be called more than once): it
/// hands them to the sink a block at a time and returns the tree's digest and entry count.
pub(super) type Stream<'a> =
    dyn Fn(&mut dyn FnMut(Vec<Entry>) -> Result<()>) -> Result<(Hash, u64)> + Sync + 'a;

/// The changes between two installed versions and what the diff needs of the base, read from
/// their stored manifests as streams. Memory depends on the change, not on the trees.
pub(super) fn installed(root: &Root, v1: &str, v2: &str) -> Result<(Base, Changes)> {
    let base = |sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>| root.stream_manifest(v1, sink);
    let new = |sink: &mut dyn FnMut(Vec<Entry>) -> Result<()>| root.stream_manifest(v2, sink);
    streamed(Some(v1.to_owned()), &base, new)
}

/// The changes from the base to the new tree, both read as streams (the new tree's entries
/// in order, in blocks): the base's on a second thread, block by block, while the new one's
/// is merged with it; then the base's once more, keeping only what the changed files need.
/// Neither tree need be held whole.
pub(super) fn streamed(
    version: Option<String>,
    base: &Stream,
    new: impl FnOnce(&mut dyn FnMut(Vec<Entry>) -> Result<()>) -> Result<(Hash, u64)>,
) -> Result<(Base, Changes)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Entry>>(2);
    let (changes, base_head) = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(move || {
            base(&mut |block| {
                tx.send(block)
                    .map_err(|_| anyhow::anyhow!("the comparison stopped"))
            })
        });
        let mut cmp = Compare::new(rx.iter().flatten());
        let to = new(&mut |block| {
            cmp.feed(block);
            Ok(())
        });
        // Draining the base (for its removed paths), or dropping the receiver after an
        // error, lets the reader finish.
        let changes = match to {
            Ok((digest, count)) => Ok(cmp.finish(digest, count)),
            Err(e) => {
                drop(cmp);
                Err(e)
            }
        };
        let base_head = reader
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the manifest reader panicked")));
        Ok((changes?, base_head?))
    })?;
    let mut kept = Base::new(version, base_head.0, &changes);
    base(&mut |block| {
        for e in &block {
            kept.keep(e);
        }
        Ok(())
    })?;
    Ok((kept, changes))
}

/// What a diff needs of the base tree, kept from its entries as they go by: its entries at
/// the changed paths, its files at the removed paths, and those that may serve the changed files (the same content, or the
/// same name or name without digits). Nothing else: a map of a whole base would take
/// hundreds of MB at a million entries.
pub(crate) struct Base {
    pub version: Option<String>,
    pub digest: Hash,
    want_path: HashSet<Box<[u8]>>,
    want_sha: HashSet<Hash>,
    want_name: HashSet<Vec<u8>>,
    want_removed: HashSet<Box<[u8]>>,
    kept: Vec<Entry>,
    removed_files: Vec<usize>,
    at_path: HashMap<Box<[u8]>, usize>,
    by_sha: HashMap<Hash, Vec<usize>>,
    by_name: HashMap<Vec<u8>, Vec<usize>>,
}

impl Base {
    pub(crate) fn new(version: Option<String>, digest: Hash, changes: &Changes) -> Base {
        let mut b = Base {
            version,
            digest,
            want_path: HashSet::new(),
            want_sha: HashSet::new(),
            want_name: HashSet::new(),
            want_removed: changes.removed.iter().cloned().collect(),
            kept: Vec::new(),
            removed_files: Vec::new(),
            at_path: HashMap::new(),
            by_sha: HashMap::new(),
            by_name: HashMap::new(),
        };
        for e in &changes.changed {
            if let Kind::File { sha256, .. } = &e.kind {
                b.want_path.insert(e.path.clone());
                b.want_sha.insert(*sha256);
                for k in names(&e.path) {
                    b.want_name.insert(k);
                }
            }
        }
        b
    }

    /// Looks at the base's next entry (in order).
    pub(crate) fn keep(&mut self, e: &Entry) {
        let Kind::File { sha256, .. } = &e.kind else {
            return;
        };
        let by_path = self.want_path.contains(&e.path);
        // A removed file serves by its content only (`sketch`): not one too small to sketch or
        // too large to be a reference.
        let sketchable =
            (super::sketch::MIN_SIZE..=crate::core::codec::MAX_REFERENCE).contains(&match e.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            });
        let gone = sketchable && self.want_removed.contains(&e.path);
        let by_sha = self.want_sha.contains(sha256);
        let mut names: Vec<Vec<u8>> = names(&e.path)
            .into_iter()
            .filter(|k| self.want_name.contains(k))
            .collect();
        // A top-level file's path and name without digits are the same key: once.
        names.sort_unstable();
        names.dedup();
        if !by_path && !gone && !by_sha && names.is_empty() {
            return;
        }
        let i = self.kept.len();
        self.kept.push(e.clone());
        if gone {
            self.removed_files.push(i);
        }
        if by_path {
            self.at_path.insert(e.path.clone(), i);
        }
        if by_sha {
            self.by_sha.entry(*sha256).or_default().push(i);
        }
        for k in names {
            self.by_name.entry(k).or_default().push(i);
        }
    }

    /// The base's files at the paths the new tree lacks: where a renamed or moved file that
    /// was also edited comes from.
    pub(super) fn removed_files(&self) -> impl Iterator<Item = &Entry> {
        self.removed_files.iter().map(|&i| &self.kept[i])
    }
    pub(super) fn at_path(&self, path: &[u8]) -> Option<&Entry> {
        self.at_path.get(path).map(|&i| &self.kept[i])
    }
    pub(super) fn with_sha(&self, sha: &Hash) -> impl Iterator<Item = &Entry> {
        self.by_sha
            .get(sha)
            .into_iter()
            .flatten()
            .map(|&i| &self.kept[i])
    }
    pub(super) fn named(&self, key: &[u8]) -> Option<Vec<&Entry>> {
        self.by_name
            .get(key)
            .map(|v| v.iter().map(|&i| &self.kept[i]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Manifest;

    /// The changes from `from` to `to`, both in memory.
    fn compare(from: &Manifest, to: Manifest) -> Changes {
        let (digest, count) = (to.digest(), to.entries.len() as u64);
        let mut c = Compare::new(from.entries.iter());
        c.feed(to.entries);
        c.finish(digest, count)
    }
    use crate::core::object::Meta;

    fn file(path: &str, content: u8) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            meta: Meta {
                mode: 0o644,
                ..Default::default()
            },
            kind: Kind::File {
                size: 1,
                sha256: [content; 32],
            },
        }
    }

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            meta: Meta {
                mode: 0o755,
                ..Default::default()
            },
            kind: Kind::Dir,
        }
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            version: None,
            entries,
        }
    }

    fn paths(v: &[Entry]) -> Vec<&str> {
        v.iter()
            .map(|e| std::str::from_utf8(&e.path).unwrap())
            .collect()
    }

    fn removed(v: &[Box<[u8]>]) -> Vec<&str> {
        v.iter().map(|p| std::str::from_utf8(p).unwrap()).collect()
    }

    /// The merge-join, case by case: (base, new, changed paths, removed paths).
    #[test]
    fn merge_join_finds_changed_added_and_removed_entries() {
        type Case = (Vec<Entry>, Vec<Entry>, Vec<&'static str>, Vec<&'static str>);
        let cases: Vec<(&str, Case)> = vec![
            (
                "same",
                (
                    vec![dir("."), file("a", 1)],
                    vec![dir("."), file("a", 1)],
                    vec![],
                    vec![],
                ),
            ),
            (
                "content",
                (
                    vec![dir("."), file("a", 1)],
                    vec![dir("."), file("a", 2)],
                    vec!["a"],
                    vec![],
                ),
            ),
            (
                "added first",
                (
                    vec![dir("."), file("b", 1)],
                    vec![dir("."), file("a", 1), file("b", 1)],
                    vec!["a"],
                    vec![],
                ),
            ),
            (
                "added last",
                (
                    vec![dir("."), file("a", 1)],
                    vec![dir("."), file("a", 1), file("z", 1)],
                    vec!["z"],
                    vec![],
                ),
            ),
            (
                "removed middle",
                (
                    vec![dir("."), file("a", 1), file("m", 1), file("z", 1)],
                    vec![dir("."), file("a", 1), file("z", 1)],
                    vec![],
                    vec!["m"],
                ),
            ),
            (
                "removed tail",
                (
                    vec![dir("."), file("a", 1), file("y", 1), file("z", 1)],
                    vec![dir("."), file("a", 1)],
                    vec![],
                    vec!["y", "z"],
                ),
            ),
            (
                "kind",
                (
                    vec![dir("."), file("d", 1)],
                    vec![dir("."), dir("d")],
                    vec!["d"],
                    vec![],
                ),
            ),
            (
                "everything new",
                (vec![], vec![dir("."), file("a", 1)], vec![".", "a"], vec![]),
            ),
            (
                "everything gone",
                (vec![dir("."), file("a", 1)], vec![], vec![], vec![".", "a"]),
            ),
            (
                "interleaved",
                (
                    vec![dir("."), file("b", 1), file("d", 1)],
                    vec![dir("."), file("a", 1), file("c", 1), file("d", 2)],
                    vec!["a", "c", "d"],
                    vec!["b"],
                ),
            ),
        ];
        for (name, (base, new, want_changed, want_removed)) in cases {
            let base = manifest(base);
            let c = compare(&base, manifest(new.clone()));
            assert_eq!(paths(&c.changed), want_changed, "{name}: changed");
            assert_eq!(removed(&c.removed), want_removed, "{name}: removed");
            assert_eq!(c.to_count, new.len() as u64, "{name}: count");
            assert_eq!(
                c.to_digest,
                manifest(new.clone()).digest(),
                "{name}: digest"
            );
            // Fed in blocks of one entry, as the stream readers do: the same result.
            let mut cmp = Compare::new(base.entries.iter());
            for e in new {
                cmp.feed([e]);
            }
            let streamed = cmp.finish(c.to_digest, c.to_count);
            assert_eq!(streamed.changed, c.changed, "{name}: streamed changed");
            assert_eq!(streamed.removed, c.removed, "{name}: streamed removed");
        }
    }

    #[test]
    fn base_keeps_only_what_the_changed_files_can_use() {
        let new = vec![dir("."), file("lib/libx.so.2", 9), file("etc/conf", 8)];
        let base = vec![
            dir("."),
            file("etc/conf", 1),
            file("lib/libx.so.1", 2),
            file("other", 8),
            file("unrelated", 3),
        ];
        let changes = compare(&manifest(base.clone()), manifest(new));
        let mut b = Base::new(None, [0; 32], &changes);
        for e in &base {
            b.keep(e);
        }
        assert_eq!(b.at_path(b"etc/conf"), Some(&base[1]), "same path");
        assert!(b.at_path(b"other").is_none());
        let named = b.named(b"libx.so.").expect("same name without digits");
        assert_eq!(named, vec![&base[2]]);
        assert_eq!(
            b.with_sha(&[8; 32]).collect::<Vec<_>>(),
            vec![&base[3]],
            "same content"
        );
        assert_eq!(b.with_sha(&[3; 32]).count(), 0, "nothing wants `unrelated`");
        assert_eq!(b.kept.len(), 3);
        assert_eq!(
            b.removed_files().count(),
            0,
            "removed, but too small to sketch"
        );
        // A removed file large enough to sketch is kept: a renamed and edited file's source.
        let mut big = file("gone/big.dat", 4);
        big.kind = Kind::File {
            size: 1 << 20,
            sha256: [4; 32],
        };
        let changes = compare(
            &manifest(vec![dir("."), big.clone()]),
            manifest(vec![dir(".")]),
        );
        let mut b = Base::new(None, [0; 32], &changes);
        b.keep(&big);
        assert_eq!(b.removed_files().collect::<Vec<_>>(), vec![&big]);
    }
}
