//! Paths inside a tree: validation, and the text encoding manifests use for them.
//!
//! Names are bytes on Linux. Manifests are TOML, whose strings are UTF-8, so a path is written
//! with `%XX` for `%`, `"`, `\`, control bytes and bytes that are not part of valid UTF-8
//! (FORMAT.md, "Paths"). Every other character is written as itself. Messages quote inputs
//! through [`quote`] and paths through [`display`], which show at most a bounded part.

use anyhow::{Result, bail};

/// Checks a relative path from a manifest or a delta: components separated by single `/`,
/// none empty, `.` or `..`, no NUL, no leading `/`. The top of a tree is `.` and is handled by
/// callers.
pub(crate) fn validate_path(p: &[u8]) -> Result<()> {
    if p.is_empty() {
        bail!("empty path");
    }
    if p.contains(&0) {
        bail!("path `{}` contains a NUL byte", display(p));
    }
    if p[0] == b'/' {
        bail!("path `{}` is absolute", display(p));
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => bail!("path `{}` has an empty component", display(p)),
            b"." | b".." => bail!("path `{}` has a `{}` component", display(p), display(c)),
            _ => {}
        }
    }
    if p.len() > 4096 {
        bail!("path `{}…` is longer than 4096 bytes", display(&p[..64]));
    }
    Ok(())
}

/// The parent of a valid path (`.` for a top-level name) and its last component.
pub(crate) fn split_parent(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (b".", p),
    }
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == 0x7f || b == b'%' || b == b'"' || b == b'\\'
}

/// Encodes bytes for a manifest string (see the module doc).
pub(crate) fn encode_path(p: &[u8]) -> String {
    let mut out = String::with_capacity(p.len());
    push_path(&mut out, p);
    out
}

/// Appends the encoding of `p` (see [`encode_path`]) to `out`.
pub(crate) fn push_path(out: &mut String, p: &[u8]) {
    // Most names are printable ASCII with nothing to escape.
    if p.iter().all(|&b| b.is_ascii() && !needs_escape(b)) {
        out.push_str(std::str::from_utf8(p).expect("ASCII"));
        return;
    }
    let mut rest = p;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped(out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                push_escaped(out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len());
                for &b in &bad[..n] {
                    push_percent(out, b);
                }
                rest = &bad[n..];
            }
        }
    }
}

fn push_percent(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 15)] as char);
}

fn push_escaped(out: &mut String, s: &str) {
    for ch in s.chars() {
        if ch.is_ascii() && needs_escape(ch as u8) {
            push_percent(out, ch as u8);
        } else {
            out.push(ch);
        }
    }
}

/// Decodes a manifest string into bytes.
pub(crate) fn decode_path(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
            let Some(h) = h else {
                bail!("bad `%` escape in `{}`", quote(s));
            };
            out.push(u8::from_str_radix(std::str::from_utf8(h)?, 16)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// How many characters of an input [`quote`] shows.
pub(crate) const QUOTE_CHARS: usize = 64;

/// How many characters of a path [`display`] shows whole; a longer one keeps its first and
/// last [`QUOTE_CHARS`].
pub(crate) const PATH_CHARS: usize = 160;

/// Quoting inputs in messages: an error or a log line shows at most a short, escaped part of
/// anything that came from a delta, a manifest, a config or the state file, so that it stays
/// one short line whatever the input holds (a 32 MB version string once gave a 33 MB line).
/// The escaping is this module's `%XX` encoding, so a quote never breaks the line.
///
/// At most [`QUOTE_CHARS`] characters of `s` escaped (each `%XX` counting three), with `…`
/// when it is cut.
pub(crate) fn quote(s: impl AsRef<[u8]>) -> String {
    quote_at_most(s, QUOTE_CHARS)
}

/// At most `n` characters of `s` escaped, with `…` when it is cut: for a message made of
/// input (a parser's error message that may quote what it read).
pub(crate) fn quote_at_most(s: impl AsRef<[u8]>, n: usize) -> String {
    let (mut out, cut) = encode_prefix(s.as_ref(), n);
    if cut {
        out.push('…');
    }
    out
}

/// A path for messages: whole, escaped, up to [`PATH_CHARS`] characters; longer, its first
/// and last [`QUOTE_CHARS`] characters with `…` between (the end of a path names the file).
pub(crate) fn display(p: &[u8]) -> String {
    // Most paths are short printable ASCII with nothing to escape.
    if p.len() <= PATH_CHARS && p.iter().all(|&b| b.is_ascii() && !needs_escape(b)) {
        return std::str::from_utf8(p).expect("ASCII").to_owned();
    }
    let (whole, cut) = encode_prefix(p, PATH_CHARS);
    if !cut {
        return whole;
    }
    let (mut out, _) = encode_prefix(p, QUOTE_CHARS);
    out.push('…');
    out.push_str(&encode_suffix(p, QUOTE_CHARS));
    out
}

/// The encoding of each character of `s` in turn (a byte that is not part of valid UTF-8 is
/// one), with the number of characters it takes.
fn for_each_unit(s: &[u8], mut f: impl FnMut(&str, usize) -> bool) {
    let mut buf = String::with_capacity(4);
    for chunk in s.utf8_chunks() {
        for ch in chunk.valid().chars() {
            buf.clear();
            let n = if ch.is_ascii() && needs_escape(ch as u8) {
                push_percent(&mut buf, ch as u8);
                3
            } else {
                buf.push(ch);
                1
            };
            if !f(&buf, n) {
                return;
            }
        }
        for &b in chunk.invalid() {
            buf.clear();
            push_percent(&mut buf, b);
            if !f(&buf, 3) {
                return;
            }
        }
    }
}

/// The encoding of the longest prefix of `s` that takes at most `n` characters, and whether
/// that is less than `s`.
fn encode_prefix(s: &[u8], n: usize) -> (String, bool) {
    let mut out = String::new();
    let (mut used, mut cut) = (0, false);
    for_each_unit(s, |unit, width| {
        if used + width > n {
            cut = true;
            return false;
        }
        used += width;
        out.push_str(unit);
        true
    });
    (out, cut)
}

/// The encoding of the longest suffix of `s` that takes at most `n` characters. Only the
/// last `4 * n` bytes are looked at; the suffix starts on a character boundary.
fn encode_suffix(s: &[u8], n: usize) -> String {
    let mut start = s.len().saturating_sub(4 * n);
    // Start on a character boundary: skip continuation bytes (at most three).
    for _ in 0..3 {
        if start > 0 && start < s.len() && (s[start] & 0xc0) == 0x80 {
            start += 1;
        }
    }
    let mut units: Vec<(String, usize)> = Vec::new();
    for_each_unit(&s[start..], |unit, width| {
        units.push((unit.to_owned(), width));
        true
    });
    let mut used = 0;
    let mut keep = units.len();
    while keep > 0 && used + units[keep - 1].1 <= n {
        used += units[keep - 1].1;
        keep -= 1;
    }
    units[keep..].iter().map(|(u, _)| u.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        for p in [
            &b"plain/name"[..],
            b"caf\xc3\xa9",
            b"bad\xff\xfe",
            b"new\nline",
            b"100%\"q\"\\",
            b"\x7f\x01",
        ] {
            let e = encode_path(p);
            assert!(!e.contains('\n'));
            assert_eq!(decode_path(&e).unwrap(), p);
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for p in [
            &b""[..],
            b"/etc/passwd",
            b"a/../b",
            b"..",
            b"a//b",
            b"a/./b",
            b"a/",
            b"a\0b",
        ] {
            assert!(validate_path(p).is_err(), "{p:?}");
        }
        validate_path(b"a/b.c/..d").unwrap();
    }

    #[test]
    fn short_inputs_are_shown_whole_and_escaped() {
        assert_eq!(quote("1.0"), "1.0");
        assert_eq!(quote(b"a\nb\xff"), "a%0Ab%FF");
        assert_eq!(display(b"usr/bin/x"), "usr/bin/x");
    }

    #[test]
    fn long_inputs_are_cut() {
        let long = "é".repeat(32 << 20);
        let q = quote(&long);
        assert_eq!(q, format!("{}…", "é".repeat(QUOTE_CHARS)));
        let q = quote(vec![b'\n'; 1000]);
        assert_eq!(q, format!("{}…", "%0A".repeat(QUOTE_CHARS / 3)));
        assert_eq!(quote("x".repeat(QUOTE_CHARS)), "x".repeat(QUOTE_CHARS));
    }

    #[test]
    fn long_paths_keep_both_ends() {
        let p = format!("usr/{}/lib{}.so", "d".repeat(5000), "é".repeat(10));
        let q = display(p.as_bytes());
        assert!(q.starts_with("usr/ddd") && q.ends_with(&format!("lib{}.so", "é".repeat(10))));
        assert_eq!(q.chars().count(), 2 * QUOTE_CHARS + 1);
        let p = "x".repeat(PATH_CHARS);
        assert_eq!(display(p.as_bytes()), p);
        // Invalid UTF-8 at the cut.
        let mut p = vec![0xffu8; 1000];
        p.extend_from_slice("é".as_bytes());
        let q = display(&p);
        assert!(q.ends_with("%FFé"), "{q}");
    }
}
