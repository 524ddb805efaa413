//! treeswap: atomic tree-swap updates from a content-addressed pool. See ARCHITECTURE.md for
//! the layers: `cli` → `ops` → `tree` → `store` → `fs` → `core`, each using only itself and
//! the layers after it (`scripts/check-layers.sh` checks it).

pub mod cli;
pub mod core;
pub mod fs;
pub mod ops;
pub mod store;
pub mod tree;
