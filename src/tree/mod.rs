pub mod restage;
pub mod scan;
pub mod stage;
pub mod verify;
