//! The command line: nbdkit's options, aliases, conflicts and messages
//! (lexopt, which speaks getopt_long: `--filter=x`, `-fv`, `-p10809`),
//! the key=value and magic-key rules, and the probing outputs
//! (`--help`, `--version`, `--dump-config`, `--dump-plugin`,
//! `--short-options`, `--long-options`).

mod config;

pub use config::{Config, Family, LogDest, TlsMode, Unix};
