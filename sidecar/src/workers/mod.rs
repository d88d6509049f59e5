//! Backends: local workers we supervise and remote hosts we only probe.

pub mod backend;
pub mod pool;
pub mod supervisor;
pub mod upstream;
