pub mod layout;
pub mod pool;
pub mod protect;
pub mod root;
pub mod state;
