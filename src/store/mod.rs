pub(crate) mod layout;
pub(crate) mod pool;
pub(crate) mod protect;
pub(crate) mod root;
pub(crate) mod state;
