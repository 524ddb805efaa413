//! treeswap: atomic tree-swap updates from a content-addressed pool. See ARCHITECTURE.md.

pub mod apply;
pub mod boot;
pub mod codec;
pub mod config;
pub mod delta;
pub mod diff;
pub mod error;
pub mod failpoint;
pub mod flip;
pub mod guests;
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
pub mod state;
pub mod status;
pub mod sys;
pub mod trust;
pub mod verify;
pub mod version;
