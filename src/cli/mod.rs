//! The command line: nbdkit's options, aliases, conflicts and messages
//! (lexopt, which speaks getopt_long: `--filter=x`, `-fv`, `-p10809`),
//! the key=value and magic-key rules, and the probing outputs
//! (`--help`, `--version`, `--dump-config`, `--dump-plugin`,
//! `--short-options`, `--long-options`).

mod config;

pub use config::{Config, Family, LogDest, TlsMode, Unix};

/// What to do after parsing (temporary until the full parser lands).
pub enum Action {
    /// Serve with this configuration.
    Serve(Box<Config>),
    /// Exit with this code (everything has been printed).
    Exit(i32),
}

/// Minimal parser: `[-f] [-r] [-v] [-U PATH] [--filter=F] PLUGIN key=value…`.
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Action {
    let mut cfg = Config { mask_handshake: u32::MAX, ..Config::default() };
    let mut it = args.into_iter().skip(1).map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        match a.as_str() {
            "-f" | "--foreground" => cfg.foreground = true,
            "-r" => cfg.readonly = true,
            "-v" => cfg.verbose = true,
            "-o" => cfg.oldstyle = true,
            "--no-sr" => cfg.no_sr = true,
            "-U" | "--unix" => cfg.unix = Some(match it.next().as_deref() { Some("-") => Unix::Private, Some(p) => Unix::Path(p.into()), None => return Action::Exit(1) }),
            "-p" => cfg.port = it.next(),
            "--print-uri" => cfg.print_uri = true,
            "--run" => { cfg.run = it.next(); cfg.foreground = true; if cfg.unix.is_none() && cfg.port.is_none() { cfg.unix = Some(Unix::Private) } }
            _ if a.starts_with("--filter=") => cfg.filters.push(a["--filter=".len()..].to_string()),
            _ if cfg.plugin.is_empty() => cfg.plugin = a,
            _ => match a.split_once('=') {
                Some((k, v)) => cfg.params.push((k.into(), v.into())),
                None => {
                    let key = crate::backend::registry::plugin(&cfg.plugin).and_then(|e| e.magic_key).unwrap_or("script");
                    cfg.params.push((key.into(), a));
                }
            },
        }
    }
    Action::Serve(Box::new(cfg))
}
