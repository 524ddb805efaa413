pub mod scan;
pub mod snapshot;
pub mod stage;
pub mod verify;
