//! nbdkit in Rust: the Network Block Device server toolkit as one binary,
//! every plugin and filter compiled in.
//!
//! Layers, top to bottom: [`cli`] (argv → Config), [`server`] (sockets,
//! connections, handshake driver, transmission), [`proto`] (pure wire
//! codec), [`backend`] (plugin/filter traits, chain, checking layer),
//! [`plugins`] and [`filters`], and [`util`].

#![warn(rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod backend;
pub mod cli;
pub mod error;
pub mod filters;
// The fuzz targets' and property tests' entry points: not in production
// builds (feature `fuzzing`, on in `cargo test` through a dev-dependency).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod man;
pub mod plugins;
pub mod proto;
pub mod server;
pub mod util;

/// The whole program: command line, then serving. Returns the exit code.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let args: Vec<std::ffi::OsString> = args.into_iter().collect();
    if let Some(code) = man::from_args(&args) {
        return code;
    }
    match cli::parse(args) {
        cli::Action::Exit(code) => code,
        cli::Action::Serve(cfg) => server::run(*cfg),
    }
}
