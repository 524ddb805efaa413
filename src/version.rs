//! Version names: which strings may name an installed tree.

use anyhow::{Result, bail};

/// A version names a directory under `trees/`, so it is a safe file name: 1 to 128 characters
/// from `A-Z a-z 0-9 . _ + ~ -`, not starting with `.` or `-`.
pub fn validate(v: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+~-".contains(c);
    if v.is_empty() || v.len() > 128 || !v.chars().all(ok_char) || v.starts_with(['.', '-']) {
        bail!(
            "invalid version `{}`: use 1 to 128 of A-Z a-z 0-9 . _ + ~ -, not starting with . or -",
            v.escape_debug()
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
