//! Built-in plugins: one module each, registered with `inventory::submit!`.

pub(crate) mod allocator;
mod file;
mod memory;
mod null;
mod ssh;
