//! Built-in plugins: one module each, registered with `inventory::submit!`.

mod file;
mod memory;
mod null;
