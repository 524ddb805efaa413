//! The three-way merge of an overlay guest's layer at a flip, as dpkg treats conffiles: for
//! every entry of the layer, the old tree (what the layer was merged for), the new tree and
//! the guest's copy are compared. Pure: it takes three manifests and gives a [`Plan`].
//!
//! - a copy the guest never changed (a copy-up of an unchanged file, metadata-only or not),
//!   or one equal to the new release's, is dropped: the new release shows through;
//! - a copy the guest changed where the release did not change the file is kept;
//! - a file both changed is a conflict: `keep` leaves the guest's copy, `take` shows the
//!   release's and saves the guest's beside it as `<name>.treeswap-local`;
//! - deletions (whiteouts) the same way: kept while the release leaves the file alone, a
//!   conflict if it changed it, dropped once the release has no such file;
//! - paths matching a `state` glob are always kept, as is all below an opaque directory (the
//!   guest replaced that directory whole);
//! - a file the guest added where neither tree has one is kept, whether or not the old tree
//!   is known;
//! - a directory of the layer where the new tree has something else (a symlink, as
//!   usr-merge's `/bin`) is reported as a conflict and kept: it hides the release's entry.
//!
//! A directory of the layer left empty by the drops, and equal to the new tree's, is removed.

use std::collections::{HashMap, HashSet};

use anyhow::Result;

use crate::core::config::{Guest, Policy};
use crate::core::manifest::{Entry, Kind, Manifest};

/// The suffix of a guest's copy set aside by `take`.
pub(crate) const LOCAL_SUFFIX: &[u8] = b".treeswap-local";

/// What happens to one entry of the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Removed from the layer: the new tree's entry shows.
    Drop,
    /// Renamed to `<path>.treeswap-local` (a conflict resolved by `take`).
    SetAside,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Entries to drop or set aside, in path order; directories last, deepest first.
    pub actions: Vec<(Box<[u8]>, Action)>,
    /// Paths both the guest and the release changed, with the policy that resolved them.
    pub conflicts: Vec<(Box<[u8]>, Policy)>,
    /// Entries the guest changed that stay (kept conflicts included).
    pub kept: usize,
}

/// A guest's globs, compiled.
pub(crate) struct Rules {
    state: Vec<glob::Pattern>,
    keep: Vec<glob::Pattern>,
    take: Vec<glob::Pattern>,
    default: Policy,
}

fn patterns(globs: &[String]) -> Result<Vec<glob::Pattern>> {
    // The config checked them: an error here is a bug, reported all the same.
    globs
        .iter()
        .map(|g| Ok(glob::Pattern::new(g.trim_start_matches('/'))?))
        .collect()
}

impl Rules {
    pub(crate) fn of(g: &Guest) -> Result<Rules> {
        Ok(Rules {
            state: patterns(&g.state)?,
            keep: patterns(&g.keep)?,
            take: patterns(&g.take)?,
            default: g.conflict,
        })
    }

    fn matches(globs: &[glob::Pattern], path: &[u8]) -> bool {
        if globs.is_empty() {
            return false;
        }
        let p = String::from_utf8_lossy(path);
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        globs.iter().any(|g| g.matches_with(&p, opts))
    }

    /// Whether `path` matches a `state` glob: always the guest's.
    pub(crate) fn is_state(&self, path: &[u8]) -> bool {
        Self::matches(&self.state, path)
    }

    fn policy(&self, path: &[u8]) -> Policy {
        if Self::matches(&self.keep, path) {
            Policy::Keep
        } else if Self::matches(&self.take, path) {
            Policy::Take
        } else {
            self.default
        }
    }
}

/// Whether an entry of the layer is a whiteout: the guest deleted what is below.
pub(crate) fn is_whiteout(e: &Entry) -> bool {
    matches!(e.kind, Kind::Char { major: 0, minor: 0 })
}

/// Whether a directory of the layer is opaque: it hides the lower directory whole. Only
/// `trusted.overlay.opaque` counts: the overlay is mounted without `userxattr`, so
/// `user.overlay.*` are the guest's own attributes.
pub(crate) fn is_opaque(e: &Entry) -> bool {
    e.is_dir()
        && e.meta
            .xattrs
            .iter()
            .any(|(k, v)| &**k == b"trusted.overlay.opaque" && &**v == b"y")
}

/// overlayfs's own attributes, which a copy-up adds and a tree never has (`trusted.` only:
/// see [`is_opaque`]).
fn is_overlay_xattr(k: &[u8]) -> bool {
    k.starts_with(b"trusted.overlay.")
}

/// The opaque directories of a layer, to ask of any path whether one is above it: one look-up
/// per `/` of the path.
pub(crate) struct Opaque<'a>(HashSet<&'a [u8]>);

impl<'a> Opaque<'a> {
    pub(crate) fn of(entries: &'a [Entry]) -> Opaque<'a> {
        Opaque(
            entries
                .iter()
                .filter(|e| is_opaque(e))
                .map(|e| &*e.path)
                .collect(),
        )
    }

    /// Whether `p` lies below an opaque directory (not whether it is one).
    pub(crate) fn covers(&self, p: &[u8]) -> bool {
        !self.0.is_empty()
            && p.iter()
                .enumerate()
                .any(|(i, &b)| b == b'/' && self.0.contains(&p[..i]))
    }
}

/// Whether the layer's entry `u` is the tree's entry `t` (kind, content, owner, mode and
/// extended attributes, overlayfs's own left out).
pub(crate) fn same(u: &Entry, t: &Entry) -> bool {
    let (um, tm) = (&u.meta, &t.meta);
    let xu = um.xattrs.iter().filter(|(k, _)| !is_overlay_xattr(k));
    let xt = tm.xattrs.iter().filter(|(k, _)| !is_overlay_xattr(k));
    u.kind == t.kind && um.mode == tm.mode && um.uid == tm.uid && um.gid == tm.gid && xu.eq(xt)
}

fn same_opt(a: Option<&Entry>, b: Option<&Entry>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => same(a, b),
        _ => false,
    }
}

fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b".",
    }
}

/// The plan for `layer` (the guest's upper directory, scanned) merged from `old` (the tree it
/// was merged for; `None` if that tree is gone, when every copy not equal to the new tree's
/// counts as the guest's) onto `new`.
pub(crate) fn plan(
    layer: &Manifest,
    old: Option<&Manifest>,
    new: &Manifest,
    rules: &Rules,
) -> Plan {
    let mut out = Plan::default();
    // Children of each directory of the layer that stay; a directory left with none may go.
    let mut left: HashMap<&[u8], usize> = HashMap::new();
    for e in &layer.entries {
        if &*e.path != b"." {
            *left.entry(parent(&e.path)).or_default() += 1;
        }
    }
    let opaque = Opaque::of(&layer.entries);
    for e in &layer.entries {
        let p: &[u8] = &e.path;
        if p == b"." || opaque.covers(p) || rules.is_state(p) {
            continue;
        }
        let o = old.and_then(|m| m.find(p));
        let n = new.find(p);
        if e.is_dir() {
            // The guest's directory hides whatever else the release has there.
            if n.is_some_and(|n| !n.is_dir()) {
                out.conflicts.push((e.path.clone(), Policy::Keep));
            }
            continue;
        }
        let action = if is_whiteout(e) {
            match n {
                // Nothing left to hide.
                None => Some(Action::Drop),
                Some(_) if old.is_some() && same_opt(o, n) => None,
                Some(_) => conflict(&mut out, rules, p, Action::Drop),
            }
        } else if n.is_some_and(|n| same(e, n)) || o.is_some_and(|o| same(e, o)) {
            // The release's copy, or the old one the guest never changed: the new shows.
            Some(Action::Drop)
        } else if n.is_none() && o.is_none() {
            // The guest's own file, which no tree has.
            None
        } else if old.is_some() && same_opt(o, n) {
            None
        } else {
            conflict(&mut out, rules, p, Action::SetAside)
        };
        match action {
            Some(Action::Drop) => {
                *left.get_mut(parent(p)).expect("counted") -= 1;
                out.actions.push((e.path.clone(), Action::Drop));
            }
            Some(a) => out.actions.push((e.path.clone(), a)),
            None => out.kept += 1,
        }
    }
    // Directories deepest first: one emptied by the drops goes if it is the new tree's.
    let mut dirs: Vec<&Entry> = layer
        .entries
        .iter()
        .filter(|e| e.is_dir() && &*e.path != b"." && !is_opaque(e) && !opaque.covers(&e.path))
        .collect();
    dirs.sort_by_key(|e| std::cmp::Reverse(e.path.iter().filter(|&&b| b == b'/').count()));
    for d in dirs {
        let empty = left.get(&*d.path).copied().unwrap_or(0) == 0;
        if empty && new.find(&d.path).is_some_and(|n| same(d, n)) {
            *left.get_mut(parent(&d.path)).expect("counted") -= 1;
            out.actions.push((d.path.clone(), Action::Drop));
        }
    }
    out
}

/// Records a conflict at `path` and says what its policy does: `take` applies `take`, `keep`
/// nothing.
fn conflict(out: &mut Plan, rules: &Rules, path: &[u8], take: Action) -> Option<Action> {
    let policy = rules.policy(path);
    out.conflicts.push((path.into(), policy));
    (policy == Policy::Take).then_some(take)
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn whiteout(path: &str) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            meta: Meta::default(),
            kind: Kind::Char { major: 0, minor: 0 },
        }
    }
    fn tree(mut entries: Vec<Entry>) -> Manifest {
        entries.push(dir("."));
        let mut m = Manifest {
            version: None,
            entries,
        };
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        m
    }
    fn rules(toml: &str) -> Rules {
        let cfg = crate::core::config::parse(
            &format!("[[guest]]\nname = \"g\"\nstart = [\"x\"]\nstop = [\"x\"]\n{toml}"),
            "t",
        )
        .unwrap();
        Rules::of(&cfg.guests[0]).unwrap()
    }
    fn paths(p: &Plan, a: Action) -> Vec<String> {
        p.actions
            .iter()
            .filter(|(_, x)| *x == a)
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    #[test]
    fn the_three_way_cases() {
        let old = tree(vec![
            dir("etc"),
            file("etc/same", 1),
            file("etc/mine", 1),
            file("etc/both", 1),
            file("etc/gone", 1),
            file("etc/rm-kept", 1),
            file("etc/rm-changed", 1),
            dir("var"),
            file("var/db", 1),
        ]);
        let mut new = old.clone();
        for e in &mut new.entries {
            if [&b"etc/both"[..], b"etc/rm-changed", b"var/db"].contains(&&*e.path) {
                e.kind = file("", 2).kind;
            }
        }
        new.entries.retain(|e| &*e.path != b"etc/gone");
        let layer = tree(vec![
            dir("etc"),
            file("etc/same", 1),
            file("etc/mine", 3),
            file("etc/both", 3),
            file("etc/gone", 1),
            whiteout("etc/rm-kept"),
            whiteout("etc/rm-changed"),
            file("etc/new-local", 3),
            dir("var"),
            file("var/db", 3),
        ]);
        let keep = plan(&layer, Some(&old), &new, &rules("state = [\"/var/**\"]\n"));
        assert_eq!(paths(&keep, Action::Drop), ["etc/gone", "etc/same"]);
        assert!(paths(&keep, Action::SetAside).is_empty());
        let conflicts: Vec<_> = keep.conflicts.iter().map(|(p, _)| &**p).collect();
        assert_eq!(conflicts, [&b"etc/both"[..], b"etc/rm-changed"]);
        // etc/mine, etc/new-local, etc/rm-kept and the two kept conflicts stay; var/db is
        // state, not even looked at.
        assert_eq!(keep.kept, 5);

        let take = plan(&layer, Some(&old), &new, &rules("take = [\"/etc/**\"]\n"));
        assert_eq!(paths(&take, Action::SetAside), ["etc/both"]);
        assert_eq!(
            paths(&take, Action::Drop),
            ["etc/gone", "etc/rm-changed", "etc/same"]
        );
        // var/db is a conflict too without `state`, kept by the default policy.
        assert_eq!(take.conflicts.len(), 3, "{:?}", take.conflicts);
        assert_eq!(take.conflicts[2].1, Policy::Keep);
        // `keep` globs win over `take` globs.
        let k = plan(
            &layer,
            Some(&old),
            &new,
            &rules("take = [\"/etc/**\"]\nkeep = [\"/etc/both\"]\n"),
        );
        assert!(paths(&k, Action::SetAside).is_empty());
    }

    #[test]
    fn emptied_directories_go_and_opaque_ones_stay() {
        let old = tree(vec![dir("a"), file("a/x", 1), dir("o"), file("o/y", 1)]);
        let mut o = dir("o");
        o.meta
            .xattrs
            .push(((*b"trusted.overlay.opaque").into(), (*b"y").into()));
        let mut copy = file("a/x", 1);
        copy.meta
            .xattrs
            .push(((*b"trusted.overlay.origin").into(), (*b"fh").into()));
        let layer = tree(vec![dir("a"), copy, o, file("o/y", 1)]);
        let p = plan(&layer, Some(&old), &old, &rules(""));
        assert_eq!(paths(&p, Action::Drop), ["a/x", "a"]);
        // Without the old tree, only copies equal to the new one go.
        let p = plan(&layer, None, &old, &rules(""));
        assert_eq!(paths(&p, Action::Drop), ["a/x", "a"]);
        let mut changed = old.clone();
        changed.entries[2].kind = file("", 9).kind;
        let p = plan(&layer, None, &changed, &rules(""));
        assert_eq!(p.conflicts.len(), 1);
    }

    /// Finding 9a: with no old tree (an adopted layer, or its tree gone), a file the guest
    /// added that the new tree does not have was a conflict, set aside under `take`.
    #[test]
    fn an_added_file_stays_without_the_old_tree() {
        let new = tree(vec![dir("etc"), file("etc/release.conf", 1)]);
        let layer = tree(vec![dir("etc"), file("etc/myapp.conf", 3)]);
        let p = plan(&layer, None, &new, &rules("take = [\"/etc/**\"]\n"));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);
        assert_eq!(p.kept, 1);
    }

    /// Finding 9c: `user.overlay.opaque` is the guest's own attribute (no `userxattr`): it
    /// froze the merge below the directory.
    #[test]
    fn only_trusted_opaque_counts() {
        let old = tree(vec![dir("usr"), file("usr/x", 1)]);
        let mut usr = dir("usr");
        usr.meta
            .xattrs
            .push(((*b"user.overlay.opaque").into(), (*b"y").into()));
        let layer = tree(vec![usr, file("usr/x", 1)]);
        let p = plan(&layer, Some(&old), &old, &rules(""));
        assert_eq!(paths(&p, Action::Drop), ["usr/x"]);
        let mut usr = dir("usr");
        usr.meta
            .xattrs
            .push(((*b"trusted.overlay.opaque").into(), (*b"y").into()));
        let layer = tree(vec![usr, file("usr/x", 1)]);
        let p = plan(&layer, Some(&old), &old, &rules(""));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        // Opaque directories nested in opaque ones, and names that only share a prefix.
        let o = Opaque::of(&layer.entries);
        assert!(o.covers(b"usr/x") && o.covers(b"usr/a/b"));
        assert!(!o.covers(b"usr") && !o.covers(b"usrx/y") && !o.covers(b"x/usr/y"));
    }

    /// Finding 9d: a directory of the layer over a symlink of the new tree (usr-merge's
    /// `bin`) hides the release's entry: reported, not silent.
    #[test]
    fn a_directory_over_a_release_symlink_is_a_conflict() {
        let old = tree(vec![dir("bin"), file("bin/sh", 1)]);
        let new = tree(vec![Entry {
            path: (*b"bin").into(),
            meta: Meta {
                mode: 0o777,
                ..Default::default()
            },
            kind: Kind::Symlink {
                target: (*b"usr/bin").into(),
            },
        }]);
        let layer = tree(vec![dir("bin"), file("bin/mine", 3)]);
        let p = plan(&layer, Some(&old), &new, &rules(""));
        let conflicts: Vec<_> = p.conflicts.iter().map(|(p, _)| &**p).collect();
        assert_eq!(conflicts, [&b"bin"[..]]);
    }
}
