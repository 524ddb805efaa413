pub(crate) mod btrfs;
pub(crate) mod file;
pub(crate) mod guestfs;
pub(crate) mod hash;
pub(crate) mod iflags;
pub(crate) mod mount;
pub(crate) mod sparse;
pub(crate) mod sys;
