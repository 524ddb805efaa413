//! Which deltas take this machine to the index's latest version, most direct first (pure).
//!
//! In order: the target is installed → switch to it; a delta from `current`'s tree; a delta
//! from another installed tree (`previous` first); a chain of listed deltas through
//! intermediate versions, from any installed tree, when its bytes are fewer than the delta
//! from the empty tree; else the delta from the empty tree (an empty root's first install).

use std::collections::{BinaryHeap, HashMap};

use anyhow::{Result, bail};

use crate::core::error::Fail;
use crate::core::index::{DeltaFile, Index};
use crate::core::object::Hash;

/// An installed tree: its version and digest.
#[derive(Clone, Debug)]
pub(crate) struct Installed {
    pub version: String,
    pub digest: Hash,
}

/// What this machine has.
pub(crate) struct Machine<'a> {
    pub current: Option<&'a str>,
    pub previous: Option<&'a str>,
    pub installed: &'a [Installed],
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Path<'a> {
    /// The target is installed already (not current): only a switch.
    Switch,
    /// Deltas to apply in order; the last one makes the target.
    Deltas(Vec<&'a DeltaFile>),
}

impl Path<'_> {
    /// The bytes it downloads.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Path::Switch => 0,
            Path::Deltas(d) => d.iter().map(|d| d.size).sum(),
        }
    }
}

/// Chooses the path to `ix.latest`. Fails with [`Fail::Nothing`] when it is current already.
pub(crate) fn choose<'a>(ix: &'a Index, m: &Machine) -> Result<Path<'a>> {
    let target = ix.version(&ix.latest).expect("checked by parse");
    let td = target.digest();
    let digest_of = |v: &str| {
        m.installed
            .iter()
            .find(|i| i.version == v)
            .map(|i| i.digest)
    };
    if m.current == Some(target.name.as_str()) {
        if digest_of(&target.name) != Some(td) {
            bail!(
                "the current version `{}` has another tree than the index's `{}` (digest {})",
                target.name,
                target.name,
                crate::core::object::short_hex(&td)
            );
        }
        return Err(Fail::Nothing(format!(
            "nothing to do: `{}` (serial {} of channel `{}`) is current already",
            target.name, ix.serial, ix.channel
        ))
        .into());
    }
    if let Some(d) = digest_of(&target.name) {
        if d == td {
            return Ok(Path::Switch);
        }
        bail!(
            "version `{}` is installed with another tree than the index's (digest {})",
            target.name,
            crate::core::object::short_hex(&td)
        );
    }
    let to_target = |from: &Hash| {
        ix.deltas
            .iter()
            .find(|d| d.to == target.name && d.base_digest() == *from)
    };
    // A delta from current, then from previous, then from any other installed tree.
    let mut bases: Vec<Hash> = Vec::new();
    for v in [m.current, m.previous].into_iter().flatten() {
        bases.extend(digest_of(v));
    }
    bases.extend(m.installed.iter().map(|i| i.digest));
    for b in &bases {
        if let Some(d) = to_target(b) {
            return Ok(Path::Deltas(vec![d]));
        }
    }
    let empty_digest = crate::core::manifest::empty_tree().digest();
    let from_empty = to_target(&empty_digest);
    if let Some(chain) = cheapest_chain(ix, &bases, &td, &empty_digest)
        && from_empty.is_none_or(|e| chain.iter().map(|d| d.size).sum::<u64>() < e.size)
    {
        return Ok(Path::Deltas(chain));
    }
    match from_empty {
        Some(d) => Ok(Path::Deltas(vec![d])),
        None => bail!(
            "the index lists no delta to `{}` from any installed tree, nor from the empty tree",
            target.name
        ),
    }
}

/// The chain of deltas with the fewest bytes from any of `bases` to the tree `target`, not
/// through the empty tree (Dijkstra over tree digests; an index has at most
/// `MAX_DELTAS` edges).
fn cheapest_chain<'a>(
    ix: &'a Index,
    bases: &[Hash],
    target: &Hash,
    empty: &Hash,
) -> Option<Vec<&'a DeltaFile>> {
    // The digest each delta makes: that of its `to` version.
    let made: HashMap<&str, Hash> = ix
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.digest()))
        .collect();
    let mut edges: HashMap<Hash, Vec<(&DeltaFile, Hash)>> = HashMap::new();
    for d in &ix.deltas {
        let from = d.base_digest();
        if from == *empty {
            continue;
        }
        edges
            .entry(from)
            .or_default()
            .push((d, made[d.to.as_str()]));
    }
    /// The cheapest cost found to each tree, and the delta (and tree) it came by.
    type Best<'a> = HashMap<Hash, (u64, Option<(&'a DeltaFile, Hash)>)>;
    let mut best: Best = HashMap::new();
    let mut heap = BinaryHeap::new();
    for b in bases {
        best.insert(*b, (0, None));
        heap.push(std::cmp::Reverse((0u64, *b)));
    }
    while let Some(std::cmp::Reverse((cost, at))) = heap.pop() {
        if best.get(&at).is_some_and(|(c, _)| *c < cost) {
            continue;
        }
        if at == *target {
            let mut chain = Vec::new();
            let mut cur = at;
            while let Some((_, Some((d, prev)))) = best.get(&cur) {
                chain.push(*d);
                cur = *prev;
            }
            chain.reverse();
            return Some(chain);
        }
        for (d, to) in edges.get(&at).into_iter().flatten() {
            let c = cost.saturating_add(d.size);
            if best.get(to).is_none_or(|(old, _)| c < *old) {
                best.insert(*to, (c, Some((d, at))));
                heap.push(std::cmp::Reverse((c, *to)));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::index::{self, Version};

    fn h(n: u8) -> Hash {
        [n; 32]
    }

    /// Versions 1..=4 (digests [n; 32]), with the given deltas (from, to, size); from 0 is
    /// the empty tree.
    fn ix(deltas: &[(u8, u8, u64)]) -> Index {
        let empty = crate::core::manifest::empty_tree().digest();
        Index {
            format: index::FORMAT,
            channel: "c".into(),
            serial: 1,
            timestamp: 1,
            expires: 2,
            latest: "4".into(),
            chunk_size: index::CHUNK_SIZE,
            versions: (1..=4)
                .map(|n| Version {
                    name: n.to_string(),
                    digest: hex::encode(h(n)),
                    entries: 1,
                    size: 1,
                })
                .collect(),
            deltas: deltas
                .iter()
                .map(|&(f, t, size)| DeltaFile {
                    to: t.to_string(),
                    from: (f > 0).then(|| f.to_string()),
                    from_digest: hex::encode(if f == 0 { empty } else { h(f) }),
                    path: format!("c/{f}-{t}"),
                    size,
                    sha256: hex::encode(h(9)),
                    chunks: vec![hex::encode(h(9)); size.div_ceil(index::CHUNK_SIZE) as usize],
                })
                .collect(),
        }
    }

    fn machine(installed: &[u8]) -> Vec<Installed> {
        installed
            .iter()
            .map(|&n| Installed {
                version: n.to_string(),
                digest: h(n),
            })
            .collect()
    }

    fn paths(p: Path) -> Vec<String> {
        match p {
            Path::Switch => vec!["switch".into()],
            Path::Deltas(d) => d.iter().map(|d| d.path.clone()).collect(),
        }
    }

    fn choose_for(
        ix: &Index,
        installed: &[u8],
        current: Option<u8>,
        prev: Option<u8>,
    ) -> Vec<String> {
        let inst = machine(installed);
        let (c, p) = (current.map(|n| n.to_string()), prev.map(|n| n.to_string()));
        let m = Machine {
            current: c.as_deref(),
            previous: p.as_deref(),
            installed: &inst,
        };
        paths(choose(ix, &m).unwrap())
    }

    #[test]
    fn chooses_in_the_documented_order() {
        let i = ix(&[(3, 4, 10), (2, 4, 20), (1, 2, 1), (2, 3, 1), (0, 4, 100)]);
        // One behind, two behind (the leapfrog delta), previous the only base.
        assert_eq!(choose_for(&i, &[3], Some(3), None), ["c/3-4"]);
        assert_eq!(choose_for(&i, &[2], Some(2), None), ["c/2-4"]);
        assert_eq!(choose_for(&i, &[1, 3], Some(1), Some(3)), ["c/3-4"]);
        // From 1: no direct delta; the chain 1-2-3-4 (12 bytes) beats 1-2-4 (21) and the
        // empty one (100).
        assert_eq!(
            choose_for(&i, &[1], Some(1), None),
            ["c/1-2", "c/2-3", "c/3-4"]
        );
        // Empty root.
        assert_eq!(choose_for(&i, &[], None, None), ["c/0-4"]);
        assert_eq!(choose_for(&i, &[1, 4], Some(1), None), ["switch"]);
        // A chain dearer than the empty delta loses.
        let i = ix(&[(1, 2, 60), (2, 4, 60), (0, 4, 100)]);
        assert_eq!(choose_for(&i, &[1], Some(1), None), ["c/0-4"]);
        // The cheapest chain, not the shortest.
        let i = ix(&[(1, 2, 1), (2, 3, 1), (3, 4, 1), (1, 3, 50), (0, 4, 100)]);
        assert_eq!(
            choose_for(&i, &[1], Some(1), None),
            ["c/1-2", "c/2-3", "c/3-4"]
        );
    }

    #[test]
    fn up_to_date_is_nothing() {
        let i = ix(&[(0, 4, 1)]);
        let inst = machine(&[4]);
        let m = Machine {
            current: Some("4"),
            previous: None,
            installed: &inst,
        };
        let e = choose(&i, &m).unwrap_err();
        assert_eq!(crate::core::error::exit_code(&e), 4);
    }
}
