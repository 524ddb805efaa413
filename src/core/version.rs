//! Version names: which strings may name an installed tree.

use anyhow::{Result, bail};

/// A version names a directory under `trees/`, so it is a safe file name: 1 to 128 characters
/// from `A-Z a-z 0-9 . _ + ~ -`, not starting with `.` or `-`.
pub(crate) fn validate(v: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+~-".contains(c);
    if v.is_empty() || v.len() > 128 || !v.chars().all(ok_char) || v.starts_with(['.', '-']) {
        bail!(
            "invalid version `{}`: use 1 to 128 of A-Z a-z 0-9 . _ + ~ -, not starting with . or -",
            crate::core::path::quote(v)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions() {
        for ok in ["1", "2026.11.27", "1.0~rc1", "a_b+c"] {
            super::validate(ok).unwrap();
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", "é"] {
            assert!(super::validate(bad).is_err(), "{bad}");
        }
    }
}

/// Orders versions the way dpkg orders upstream versions, so that `1 < 2 < 10`,
/// `1.9 < 1.10` and `1.0~rc1 < 1.0`: the strings are split into alternating runs of
/// non-digits and digits; digit runs compare as numbers; non-digit runs compare character by
/// character with `~` before everything (even the end), then the end, then letters, then other
/// characters.
pub(crate) fn compare(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    fn order(c: Option<u8>) -> i32 {
        match c {
            Some(b'~') => -1,
            None => 0,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // Non-digit run.
        loop {
            let ca = a.get(i).copied().filter(|c| !c.is_ascii_digit());
            let cb = b.get(j).copied().filter(|c| !c.is_ascii_digit());
            if ca.is_none() && cb.is_none() {
                break;
            }
            match order(ca).cmp(&order(cb)) {
                Ordering::Equal => {}
                o => return o,
            }
            i += ca.is_some() as usize;
            j += cb.is_some() as usize;
        }
        // Digit run, as a number (leading zeros ignored, any length).
        let sa = i;
        while i < a.len() && a[i].is_ascii_digit() {
            i += 1;
        }
        let sb = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        let na = std::str::from_utf8(&a[sa..i])
            .unwrap_or("")
            .trim_start_matches('0');
        let nb = std::str::from_utf8(&b[sb..j])
            .unwrap_or("")
            .trim_start_matches('0');
        match na.len().cmp(&nb.len()).then(na.cmp(nb)) {
            Ordering::Equal => {}
            o => return o,
        }
    }
    Ordering::Equal
}

/// Refuses a new version (a delta's result, an import) that sorts equal to an installed version spelled another way
/// (`01` and `1`): either could then stand in for the other, and installing the older one
/// again would not count as a downgrade.
pub(crate) fn check_spelling(to: &str, installed: &[String]) -> Result<()> {
    let same = installed
        .iter()
        .find(|v| v.as_str() != to && compare(v, to).is_eq());
    if let Some(v) = same {
        return Err(crate::core::error::Fail::Downgrade(format!(
            "refusing `{to}`: it is the same version as the installed `{v}`, spelled another way"
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod order_tests {
    use super::compare;
    use std::cmp::Ordering::*;

    /// Regression (issue 15, 8): `01` and `1` compare equal, so either replaced the other as
    /// "not a downgrade".
    #[test]
    fn a_version_spelled_like_an_installed_one_is_refused() {
        let installed = vec!["1".to_owned(), "2.0".to_owned()];
        for (to, refused) in [
            ("01", true),
            ("2.00", true),
            ("1", false),
            ("3", false),
            ("2", false),
        ] {
            let r = super::check_spelling(to, &installed);
            assert_eq!(r.is_err(), refused, "{to}: {r:?}");
            if let Err(e) = r {
                assert_eq!(
                    crate::core::error::exit_code(&e),
                    crate::core::error::EXIT_DOWNGRADE
                );
            }
        }
    }

    #[test]
    fn dpkg_like_order() {
        for (a, b) in [
            ("1", "2"),
            ("2", "10"),
            ("1.9", "1.10"),
            ("1.0~rc1", "1.0"),
            ("1.0", "1.0a"),
            ("1.0a", "1.0+b"),
            ("2026.01.1", "2026.11.27"),
            ("9", "10.0"),
        ] {
            assert_eq!(compare(a, b), Less, "{a} < {b}");
            assert_eq!(compare(b, a), Greater, "{b} > {a}");
        }
        assert_eq!(compare("1.01", "1.1"), Equal);
    }
}
