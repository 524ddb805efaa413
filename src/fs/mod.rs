pub mod btrfs;
pub mod hash;
pub mod iflags;
pub mod sys;
