pub(crate) mod restage;
pub(crate) mod scan;
pub(crate) mod stage;
pub(crate) mod verify;
