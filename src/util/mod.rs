//! Small shared helpers: nbdkit's value parsers, logging, shutdown.

pub mod log;
pub mod parse;
pub mod shutdown;
pub mod stdio;
