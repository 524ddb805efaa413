//! The fast path for entry lines in the canonical form [`super::write_entry`] writes.

use super::{Entry, Kind};
use crate::core::object::{Hash, Meta};
use crate::core::path::validate_path;

/// Parses an entry line written in the canonical form of [`super::write_entry`], for the entries
/// almost every tree is made of: directories, regular files and symlinks, without extended
/// attributes, whose strings need no escapes. About twice as fast as the general parser,
/// which loading a manifest is mostly made of. `None` for any other line, which the general
/// parser then reads: for every line this accepts, that gives the same entry (a property
/// test checks).
pub(super) fn canonical_entry_line(line: &[u8]) -> Option<Entry> {
    let mut s = Scan(line);
    s.lit(b"{ path = \"")?;
    let path = s.plain()?;
    s.lit(b"\", type = \"")?;
    let ty = s.plain()?;
    s.lit(b"\"")?;
    let symlink = ty == b"symlink";
    let mode = if symlink {
        0o777
    } else {
        s.lit(b", mode = 0o")?;
        let mode = s.number(8)?;
        if mode & !0o7777 != 0 {
            return None;
        }
        mode as u32
    };
    s.lit(b", uid = ")?;
    let uid = u32::try_from(s.number(10)?).ok()?;
    s.lit(b", gid = ")?;
    let gid = u32::try_from(s.number(10)?).ok()?;
    let kind = match ty {
        b"dir" => Kind::Dir,
        b"file" => {
            s.lit(b", size = ")?;
            let size = s.number(10)?;
            s.lit(b", sha256 = \"")?;
            let sha256 = s.hash()?;
            s.lit(b"\"")?;
            Kind::File { size, sha256 }
        }
        _ if symlink => {
            s.lit(b", target = \"")?;
            let target = s.plain()?;
            s.lit(b"\"")?;
            if target.is_empty() {
                return None;
            }
            Kind::Symlink {
                target: target.into(),
            }
        }
        _ => return None,
    };
    s.lit(b" },")?;
    if !s.0.is_empty() || (path != b"." && validate_path(path).is_err()) {
        return None;
    }
    Some(Entry {
        path: path.into(),
        meta: Meta {
            mode,
            uid,
            gid,
            xattrs: Vec::new(),
        },
        kind,
    })
}

/// The rest of a canonical entry line, for [`canonical_entry_line`].
struct Scan<'a>(&'a [u8]);

impl<'a> Scan<'a> {
    fn lit(&mut self, want: &[u8]) -> Option<()> {
        self.0 = self.0.strip_prefix(want)?;
        Some(())
    }
    /// A string's text up to its closing quote, if it is all printable ASCII and needs no
    /// decoding (no `\` escape, no `%` escape).
    fn plain(&mut self) -> Option<&'a [u8]> {
        let n = self
            .0
            .iter()
            .position(|&b| !(b' '..=b'~').contains(&b) || b == b'"' || b == b'\\' || b == b'%')?;
        if self.0[n] != b'"' {
            return None;
        }
        let (text, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(text)
    }
    /// A number without a leading zero (but `0`), in `radix` (8 or 10).
    fn number(&mut self, radix: u64) -> Option<u64> {
        let n = self
            .0
            .iter()
            .position(|&b| !(b'0'..b'0' + radix as u8).contains(&b))
            .unwrap_or(self.0.len());
        let digits = &self.0[..n];
        if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        let mut v: u64 = 0;
        for &d in digits {
            v = v.checked_mul(radix)?.checked_add(u64::from(d - b'0'))?;
        }
        self.0 = &self.0[n..];
        Some(v)
    }
    /// 64 lowercase hex digits.
    fn hash(&mut self) -> Option<Hash> {
        /// Each byte's value as a lowercase hex digit, or 0xff.
        const NIBBLE: [u8; 256] = {
            let mut t = [0xffu8; 256];
            let mut c = 0;
            while c < 16 {
                t[b"0123456789abcdef"[c] as usize] = c as u8;
                c += 1;
            }
            t
        };
        let digits = self.0.get(..64)?;
        let mut h = [0u8; 32];
        // No branch per digit: a bad digit sets high bits in `bad`.
        let mut bad = 0u8;
        for (out, pair) in h.iter_mut().zip(digits.chunks_exact(2)) {
            let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
            bad |= hi | lo;
            *out = hi << 4 | lo;
        }
        if bad > 0xf {
            return None;
        }
        self.0 = &self.0[64..];
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::text::general_entry_line;
    use crate::core::manifest::write_entry;

    /// Fixed cases of the property below, run every time: every kind, every escape, the
    /// largest numbers, an xattr, names that are nearly `.` and `..`; and whether the canonical
    /// fast path reads the line.
    #[test]
    fn written_lines_of_fixed_entries_parse_back() {
        let e = |path: &[u8], mode, xattrs: &[(&[u8], &[u8])], kind| Entry {
            path: path.into(),
            meta: Meta {
                mode,
                uid: u32::MAX,
                gid: 0,
                xattrs: xattrs.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
            },
            kind,
        };
        let file = Kind::File {
            size: u64::MAX,
            sha256: [0xff; 32],
        };
        let symlink = |t: &[u8]| Kind::Symlink { target: t.into() };
        let (major, minor) = (u32::MAX, 0);
        let block = Kind::Block {
            major: minor,
            minor: major,
        };
        let cases = [
            (e(b".", 0o7777, &[], Kind::Dir), true),
            (e(b"usr/bin/...", 0o4755, &[], file.clone()), true),
            (e(b".a/..b/c.", 0, &[(b"user.a", b"\0\xff")], file), false),
            (e(b" %\"\\\n\x7f\xc3\xa9\xff", 0o644, &[], Kind::Dir), false),
            (e(b"l", 0o777, &[], symlink(b"../%x\"")), false),
            (e(b"l2", 0o777, &[], symlink(b"../lib/x.so.1")), true),
            (e(b"dev/c", 0o600, &[], Kind::Char { major, minor }), false),
            (e(b"dev/b", 0, &[], block), false),
            (e(b"p", 0o644, &[], Kind::Fifo), false),
        ];
        for (entry, fast) in cases {
            let mut line = String::new();
            write_entry(&mut line, &entry);
            line.push(',');
            let general =
                general_entry_line(line.as_bytes()).unwrap_or_else(|err| panic!("{line}: {err:#}"));
            assert_eq!(general, entry, "{line}");
            let f = canonical_entry_line(line.as_bytes());
            assert_eq!(f.is_some(), fast, "fast path on {line}");
            if let Some(f) = f {
                assert_eq!(f, entry, "{line}");
            }
        }
    }

    /// Entries of every kind, with paths and targets that need escapes or not.
    fn any_entry() -> impl proptest::strategy::Strategy<Value = Entry> {
        use proptest::prelude::*;
        let name = proptest::collection::vec(
            prop_oneof![
                8 => proptest::sample::select(b"abcz.-_09".to_vec()),
                1 => proptest::sample::select(b" %\"\\\n\x7f\xc3\xa9\xff".to_vec()),
            ],
            1..6,
        );
        let path = prop_oneof![
            1 => Just(b".".to_vec()),
            9 => proptest::collection::vec(name.clone(), 1..4).prop_map(|parts| parts.join(&b'/')),
        ];
        let kind = prop_oneof![
            Just(Kind::Dir),
            Just(Kind::Fifo),
            (any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(size, sha256)| Kind::File { size, sha256 }),
            name.prop_map(|t| Kind::Symlink { target: t.into() }),
            (any::<u32>(), any::<u32>()).prop_map(|(major, minor)| Kind::Char { major, minor }),
        ];
        let xattrs = proptest::collection::vec((Just(b"user.a".to_vec()), any::<Vec<u8>>()), 0..2);
        (path, kind, 0u32..0o10000, any::<u32>(), 0u32..3, xattrs).prop_map(
            |(path, kind, mode, uid, gid, xattrs)| {
                let mode = if matches!(kind, Kind::Symlink { .. }) {
                    0o777
                } else {
                    mode
                };
                Entry {
                    path: path.into(),
                    meta: Meta {
                        mode,
                        uid,
                        gid,
                        xattrs: xattrs
                            .into_iter()
                            .map(|(k, v)| (k.into(), v.into()))
                            .collect(),
                    },
                    kind,
                }
            },
        )
    }

    proptest::proptest! {
        /// The canonical fast path reads what it accepts as the general parser does, and
        /// accepts every plain entry `write_entry` writes.
        #[test]
        fn canonical_lines_parse_as_the_general_parser_parses_them(
            e in any_entry(),
            edits in proptest::collection::vec((0usize..400, 0u8..128), 0..3),
        ) {
            let mut line = String::new();
            write_entry(&mut line, &e);
            line.push(',');
            let mut line = line.into_bytes();
            let general = general_entry_line(&line);
            // Every line `write_entry` writes parses, unless the entry's path is invalid (the
            // generator makes `.` and `..` components now and then), which must be refused.
            let valid = &*e.path == b"." || validate_path(&e.path).is_ok();
            proptest::prop_assert_eq!(general.is_ok(), valid, "{}: {:?}", String::from_utf8_lossy(&line), general);
            if general.is_ok() {
                proptest::prop_assert_eq!(general.as_ref().unwrap(), &e);
            }
            let fast = canonical_entry_line(&line);
            let plain = |b: &[u8]| b.iter().all(|&c| (b' '..=b'~').contains(&c) && !b"\"\\%".contains(&c));
            let expect_fast = general.is_ok()
                && e.meta.xattrs.is_empty()
                && plain(&e.path)
                && match &e.kind {
                    Kind::Dir | Kind::File { .. } => true,
                    Kind::Symlink { target } => plain(target),
                    _ => false,
                };
            proptest::prop_assert_eq!(fast.is_some(), expect_fast, "{}", String::from_utf8_lossy(&line));
            if let Some(f) = fast {
                proptest::prop_assert_eq!(&f, &e);
            }
            // Damaged lines: the fast path refuses them or agrees with the general parser.
            for (i, b) in edits {
                if line.is_empty() { break; }
                let i = i % line.len();
                line[i] = b;
                if let Some(f) = canonical_entry_line(&line) {
                    let g = general_entry_line(&line);
                    proptest::prop_assert!(g.is_ok(), "{}: fast {:?}, general {:?}", String::from_utf8_lossy(&line), f, g);
                    proptest::prop_assert_eq!(f, g.unwrap());
                }
            }
        }
    }
}
