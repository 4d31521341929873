//! Built-in filters: one module each, registered with `inventory::submit!`.

mod cow;
mod delay;
mod error;
mod partition;
mod protect;
mod readonly;
#[cfg(test)]
pub(crate) mod testutil;
mod xz;
