//! After the getopt loop, in nbdkit's order: the missing-plugin cases,
//! `--run`'s default socket, conflicting options, finding the plugin and
//! filters, unused `-D` flags, `--help`/`--version`, the parameters,
//! `--dump-plugin`, and what this build cannot do yet.

use std::io::Write;

use super::config::{Config, TlsMode, Unix};
use super::parse::{fail, fail_plain, utf8, Low, Stop};
use super::{load, params, probe, Action};
use crate::backend::chain::Chain;

/// Debug flags the server itself has (`-D nbdkit.FLAG=N`), with `.` as `_`.
const SERVER_DEBUG_FLAGS: &[&str] = &["backend_controlpath", "backend_datapath", "environ", "tls_log", "tls_session"];

impl From<String> for Stop {
    fn from(msg: String) -> Stop {
        Stop::Fail(msg)
    }
}

/// Turns the raw arguments into what to do. Probing output goes to `out`,
/// warnings to `err`; a fatal message comes back as `Stop`.
pub(super) fn finish(low: Low, out: &mut dyn Write, err: &mut dyn Write) -> Result<Action, Stop> {
    let Low { mut cfg, filters, args, help, version, dump_plugin } = low;
    let Some((plugin_name, rest)) = args.split_first() else {
        return no_plugin(help, version, dump_plugin, out);
    };

    // nbdkit ≥ 1.36: --run without a socket of its own gets a private one.
    if cfg.run.is_some() && cfg.port.is_none() && cfg.unix.is_none() && !cfg.vsock {
        cfg.unix = Some(Unix::Private);
    }
    check_conflicts(&cfg, dump_plugin)?;

    let plugin = load::plugin(plugin_name)?;
    // nbdkit opens the filters innermost first, so the last bad one is reported.
    let mut entries = filters.iter().rev().map(|f| load::filter(f)).collect::<Result<Vec<_>, _>>()?;
    entries.reverse();
    cfg.plugin = plugin.name.to_string();
    cfg.filters = entries.iter().map(|f| f.name.to_string()).collect();

    let mut backends = vec![plugin.name];
    backends.extend(entries.iter().map(|f| f.name));
    warn_unused_debug_flags(err, &cfg.debug_flags, &backends);

    // Output errors (a closed pipe) are ignored: there is nobody to tell.
    if help {
        let _ = probe::help(out, plugin, &entries);
        return Ok(Action::Exit(0));
    }
    if version {
        let _ = probe::versions(out, plugin, &entries);
        return Ok(Action::Exit(0));
    }

    let rest = rest.iter().map(utf8).collect::<Result<Vec<_>, _>>()?;
    cfg.params = params::resolve(&rest, plugin.magic_key)?;

    if dump_plugin {
        let mut chain = Chain::new(&cfg.plugin, &cfg.filters).map_err(|m| fail(&m))?;
        for (k, v) in &cfg.params {
            chain.config(k, v).map_err(|e| fail(e.message()))?;
        }
        let _ = probe::dump_plugin(out, &chain);
        return Ok(Action::Exit(0));
    }

    Ok(Action::Serve(Box::new(cfg)))
}

/// No plugin on the command line: only `--help` and `--version` make sense.
fn no_plugin(help: bool, version: bool, dump_plugin: bool, out: &mut dyn Write) -> Result<Action, Stop> {
    if help {
        let _ = probe::usage(out);
        Ok(Action::Exit(0))
    } else if version {
        let _ = probe::version_details(out);
        Ok(Action::Exit(0))
    } else if dump_plugin {
        Err(Stop::Fail(
            "nbdkit: use 'nbdkit plugin --dump-plugin' or\n\
             'nbdkit /path/to/plugin.so --dump-plugin' or\n\
             if you want to find out about the server use --dump-config\n"
                .into(),
        ))
    } else {
        Err(Stop::Fail(
            "nbdkit: no plugins given on the command line.\n\
             Use 'nbdkit --help' or read the nbdkit(1) manual page for documentation.\n"
                .into(),
        ))
    }
}

/// Options that choose different ways to serve, and `-o` with required TLS.
fn check_conflicts(cfg: &Config, dump_plugin: bool) -> Result<(), Stop> {
    let (port, unix, stdin, run, vsock) =
        (cfg.port.is_some(), cfg.unix.is_some(), cfg.single, cfg.run.is_some(), cfg.vsock);
    // -p, -U and -s are three ways to listen; --vsock cannot go with -U
    // or -s; -s serves stdin, so no --run or --dump-plugin with it.
    let listening = [port, unix, stdin].into_iter().filter(|&b| b).count();
    if listening > 1 || (vsock && (unix || stdin)) || (stdin && (run || dump_plugin)) {
        return Err(fail_plain("--dump-plugin, -p, --run, -s, -U or --vsock options cannot be used in this combination"));
    }
    if cfg.oldstyle && cfg.tls == TlsMode::Require {
        return Err(fail_plain("cannot use oldstyle protocol (-o) and require TLS"));
    }
    Ok(())
}

/// nbdkit's warnings, most recent `-D` first as nbdkit keeps them: flags
/// a backend does not declare (see `registry::DebugFlags`; nbdkit warns
/// when it loads the plugin), server flags it does not have, then flags
/// naming no backend.
fn warn_unused_debug_flags(err: &mut dyn Write, flags: &[(String, String, i64)], backends: &[&str]) {
    for (name, flag, _) in flags.iter().rev() {
        let declared = crate::backend::registry::debug_flags(name);
        if backends.contains(&name.as_str()) && declared.is_some_and(|d| !d.contains(&flag.as_str())) {
            let var = flag.replace('.', "_");
            let _ = writeln!(err, "nbdkit: warning: -D {name}.{flag}: {name} does not contain a global variable called {name}_debug_{var}");
        }
    }
    for (name, flag, _) in flags.iter().rev() {
        let var = flag.replace('.', "_");
        if name == "nbdkit" && !SERVER_DEBUG_FLAGS.contains(&var.as_str()) {
            let _ = writeln!(
                err,
                "nbdkit: warning: -D nbdkit.{flag}: nbdkit does not contain a global variable called nbdkit_debug_{var}"
            );
        }
    }
    for (name, flag, _) in flags.iter().rev() {
        if name != "nbdkit" && !backends.contains(&name.as_str()) {
            let _ = writeln!(err, "nbdkit: warning: debug flag -D {name}.{flag} was not used");
        }
    }
}
