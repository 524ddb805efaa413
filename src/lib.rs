//! treeswap: atomic tree-swap updates from a content-addressed pool. See ARCHITECTURE.md.

pub mod apply;
pub mod delta;
pub mod diff;
pub mod error;
pub mod flip;
pub mod import;
pub mod logging;
pub mod manifest;
pub mod object;
pub mod path;
pub mod pool;
pub mod progress;
pub mod root;
pub mod scan;
pub mod stage;
pub mod status;
pub mod sys;
pub mod verify;
pub mod version;
