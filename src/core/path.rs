//! Paths inside a tree: validation, and the text encoding manifests use for them.
//!
//! Names are bytes on Linux. Manifests are TOML, whose strings are UTF-8, so a path is written
//! with `%XX` for `%`, `"`, `\`, control bytes and bytes that are not part of valid UTF-8
//! (FORMAT.md, "Paths"). Every other character is written as itself.

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
                bail!("bad `%` escape in `{s}`");
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

/// A path for messages: lossless for UTF-8, `%XX` for the rest.
pub(crate) fn display(p: &[u8]) -> String {
    encode_path(p)
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
}
