//! The per-tree copy policy, recorded as `layouts/<V>.toml`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::store::protect::Protection;

/// Which files of a tree are copies rather than links: all of them in reflink mode, and those
/// matching a `private` glob. Recorded as `layouts/<V>.toml` so that `verify` knows what to
/// expect.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub copies: bool,
    #[serde(default)]
    pub private: Vec<String>,
    #[serde(skip)]
    patterns: Vec<glob::Pattern>,
}

impl Layout {
    pub fn new(mode: Protection, private: &[String]) -> Result<Layout> {
        let mut l = Layout {
            copies: mode == Protection::Reflink,
            private: private.to_vec(),
            patterns: Vec::new(),
        };
        l.compile()?;
        Ok(l)
    }

    fn compile(&mut self) -> Result<()> {
        self.patterns = self
            .private
            .iter()
            .map(|p| {
                glob::Pattern::new(p.trim_start_matches('/'))
                    .with_context(|| format!("invalid private glob `{p}`"))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    pub fn parse(text: &str) -> Result<Layout> {
        let mut l: Layout = toml::from_str(text).context("invalid layout file")?;
        l.compile()?;
        Ok(l)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Whether the file at `path` is a copy of its object rather than a link.
    pub fn is_copy(&self, path: &[u8]) -> bool {
        if self.copies {
            return true;
        }
        if self.patterns.is_empty() {
            return false;
        }
        let p = String::from_utf8_lossy(path);
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.patterns.iter().any(|g| g.matches_with(&p, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_globs() {
        let l = Layout::new(Protection::Hardlink, &["/etc/**".into(), "/var/**".into()]).unwrap();
        assert!(l.is_copy(b"etc/passwd"));
        assert!(l.is_copy(b"var/lib/dpkg/status"));
        assert!(!l.is_copy(b"usr/bin/ls"));
        assert!(!l.is_copy(b"etcetera"));
        let back = Layout::parse(&l.to_toml()).unwrap();
        assert!(back.is_copy(b"etc/x"));
        assert!(
            Layout::new(Protection::Reflink, &[])
                .unwrap()
                .is_copy(b"usr/bin/ls")
        );
    }
}
