//! Built-in plugins: one module each, registered with `inventory::submit!`.

pub(crate) mod allocator;
mod data;
mod file;
mod floppy;
mod memory;
mod null;
mod sh;
mod curl;
mod ssh;
