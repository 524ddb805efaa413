//! treeswap: atomic tree-swap updates from a content-addressed pool. See ARCHITECTURE.md.

pub mod core;
pub mod fs;
pub mod ops;
pub mod store;
pub mod tree;
