//! treeswap: atomic tree-swap updates from a content-addressed pool. See ARCHITECTURE.md for
//! the layers: `cli` → `ops` → `tree` → `store` → `fs` → `core`, each using only itself and
//! the layers after it (`scripts/check-layers.sh` checks it).
//!
//! Public only what the binary (`main.rs`), the integration tests and the fuzz targets use.

pub mod cli;
pub mod core;
pub(crate) mod fs;
pub mod ops;
pub(crate) mod store;
pub(crate) mod tree;
