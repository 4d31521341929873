//! The command line: nbdkit's options, aliases, conflicts and messages
//! (lexopt, which speaks getopt_long: `--filter=x`, `-fv`, `-p10809`),
//! the key=value and magic-key rules, and the probing outputs
//! (`--help`, `--version`, `--dump-config`, `--dump-plugin`,
//! `--short-options`, `--long-options`).
//!
//! Two stages, as in ripgrep's lowargs/hiargs: [`parse::lex`] is the
//! getopt loop, checking each value where it appears; [`check::finish`]
//! needs the whole command line (conflicts, plugin, parameters).

mod activation;
mod check;
mod config;
mod load;
mod options;
mod params;
mod parse;
mod probe;

use std::ffi::OsString;
use std::io::{self, Write};

pub use config::{Config, Family, LogDest, TlsMode, Unix};
use parse::Stop;
use crate::util::parse::parse_unsigned;

/// What to do after parsing.
#[derive(Debug)]
pub enum Action {
    /// Serve with this configuration.
    Serve(Box<Config>),
    /// Exit with this code: everything there was to say has been printed.
    Exit(i32),
}

/// Parses a command line as nbdkit 1.44 does. `args` starts with argv[0]
/// (`std::env::args_os()`), which getopt's complaints begin with, as
/// nbdkit's do. Probing output goes to stdout, messages to stderr, before
/// `Exit` comes back.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Action {
    let (stdout, stderr) = (io::stdout(), io::stderr());
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (activation, note) = socket_activation(pid.as_deref(), fds.as_deref(), std::process::id());
    if let Some(note) = note {
        let _ = err.write_all(note.as_bytes());
    }
    let mut nr_fds = 0;
    if activation {
        match activation::take(fds.as_deref().unwrap_or_default()) {
            Ok(n) => nr_fds = n,
            Err(msg) => {
                let _ = err.write_all(msg.as_bytes());
                return Action::Exit(1);
            }
        }
    }
    let mut action = parse_with(args, activation, &mut out, &mut err);
    if let Action::Serve(cfg) = &mut action {
        cfg.socket_activation = nr_fds;
        // Never forks.
        cfg.foreground |= nr_fds > 0;
    }
    let _ = out.flush();
    let _ = err.flush();
    action
}

/// [`parse`] with the socket-activation state and both streams given.
fn parse_with(
    args: impl IntoIterator<Item = OsString>,
    activation: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Action {
    let mut args = args.into_iter();
    let prog = args.next().map_or_else(|| "nbdkit".to_string(), |a| a.to_string_lossy().into_owned());
    let result = parse::lex(args, &prog, activation).and_then(|low| check::finish(low, out, err));
    // Output errors (a closed pipe) are ignored: there is nobody to tell.
    match result {
        Ok(action) => action,
        Err(Stop::DumpConfig) => {
            let _ = probe::dump_config(out);
            Action::Exit(0)
        }
        Err(Stop::ShortOptions) => {
            let _ = probe::short_options(out);
            Action::Exit(0)
        }
        Err(Stop::LongOptions) => {
            let _ = probe::long_options(out);
            Action::Exit(0)
        }
        Err(Stop::Usage(msg)) => {
            let _ = err.write_all(msg.as_bytes());
            let _ = probe::usage(out);
            Action::Exit(1)
        }
        Err(Stop::Fail(msg)) => {
            let _ = err.write_all(msg.as_bytes());
            Action::Exit(1)
        }
    }
}

/// systemd socket activation is on when `LISTEN_PID` is our pid and
/// `LISTEN_FDS` is a number. Also returns what nbdkit prints about
/// variables it ignores.
fn socket_activation(listen_pid: Option<&str>, listen_fds: Option<&str>, pid: u32) -> (bool, Option<String>) {
    let Some(listen_pid) = listen_pid else { return (false, None) };
    match parse_unsigned("LISTEN_PID", listen_pid, u32::MAX.into()) {
        Err(e) => return (false, Some(format!("nbdkit: error: {}\n", e.message()))),
        Ok(p) if p != u64::from(pid) => return (false, Some("nbdkit: LISTEN_PID was not for us (ignored)\n".into())),
        Ok(_) => {}
    }
    let Some(listen_fds) = listen_fds else { return (false, None) };
    match parse_unsigned("LISTEN_FDS", listen_fds, u32::MAX.into()) {
        Ok(_) => (true, None),
        Err(e) => (false, Some(format!("nbdkit: error: {}\n", e.message()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Run {
        action: Action,
        out: String,
        err: String,
    }

    impl Run {
        fn code(&self) -> Option<i32> {
            match self.action {
                Action::Exit(c) => Some(c),
                Action::Serve(_) => None,
            }
        }
        fn config(self) -> Config {
            self.config_ref().clone()
        }
        fn config_ref(&self) -> &Config {
            match &self.action {
                Action::Serve(c) => c,
                Action::Exit(c) => panic!("exit {c}: {}", self.err),
            }
        }
    }

    fn run_with(args: &[&str], activation: bool) -> Run {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let argv = std::iter::once("nbdkit").chain(args.iter().copied()).map(OsString::from);
        let action = parse_with(argv, activation, &mut out, &mut err);
        Run { action, out: String::from_utf8(out).unwrap(), err: String::from_utf8(err).unwrap() }
    }

    fn run(args: &[&str]) -> Run {
        run_with(args, false)
    }

    fn failure(args: &[&str]) -> String {
        let r = run(args);
        assert_eq!(r.code(), Some(1), "{args:?}: out={} err={}", r.out, r.err);
        r.err
    }

    const COMBINATION: &str = "nbdkit: --dump-plugin, -p, --run, -s, -U or --vsock options cannot be used in this combination\n";

    #[test]
    fn serves_with_plugin_filters_and_params() {
        let c = run(&["-fv", "--filter=error", "--filter", "readonly", "null", "1M", "-p10809", "-t10"]).config();
        assert_eq!(c.plugin, "null");
        assert_eq!(c.filters, ["error-inject", "readonly"]);
        assert_eq!(c.params, [("size".to_string(), "1M".to_string())]);
        assert!(c.foreground && c.verbose);
        assert_eq!(c.port.as_deref(), Some("10809"));
        assert_eq!(c.threads, 10);
        assert_eq!(c.mask_handshake, u32::MAX);
        assert_eq!(c.unix, None);
    }

    #[test]
    fn magic_key_takes_every_bare_value() {
        let c = run(&["null", "./x=y", "=x", "size=2", "1=2"]).config();
        let want: Vec<(String, String)> = [("size", "./x=y"), ("size", "=x"), ("size", "2"), ("size", "1=2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(c.params, want);
    }

    #[test]
    fn run_implies_a_private_unix_socket() {
        let c = run(&["--run", "true", "null"]).config();
        assert_eq!(c.unix, Some(Unix::Private));
        assert!(c.foreground);
        // -i alone does not stop it.
        assert_eq!(run(&["--run", "true", "-i", "::1", "null"]).config().unix, Some(Unix::Private));
        assert_eq!(run(&["--run", "true", "-p", "1", "null"]).config().unix, None);
        assert_eq!(run(&["--run", "x", "-U", "/s", "null"]).config().unix, Some(Unix::Path(PathBuf::from("/s"))));
        // --vsock is a choice of its own.
        assert_eq!(run(&["--run", "x", "--vsock", "null"]).config().unix, None);
    }

    #[test]
    fn conflicts_exit_1_with_nbdkits_message() {
        for args in [
            &["-p", "1", "-U", "x", "null"][..],
            &["-p", "1", "-s", "null"],
            &["-U", "x", "-s", "null"],
            &["-s", "--run", "x", "null"],
            &["-s", "--dump-plugin", "null"],
            &["--vsock", "-U", "x", "null"],
            &["--vsock", "-s", "null"],
        ] {
            assert_eq!(failure(args), COMBINATION, "{args:?}");
        }
        // Allowed: --dump-plugin with -p or --run.
        assert_eq!(run(&["-p", "1", "--dump-plugin", "null"]).code(), Some(0));
        assert_eq!(run(&["--run", "x", "--dump-plugin", "null"]).code(), Some(0));
        assert_eq!(
            failure(&["-o", "--tls=require", "null"]),
            "nbdkit: cannot use oldstyle protocol (-o) and require TLS\n"
        );
    }

    #[test]
    fn no_plugin() {
        assert_eq!(
            failure(&[]),
            "nbdkit: no plugins given on the command line.\n\
             Use 'nbdkit --help' or read the nbdkit(1) manual page for documentation.\n"
        );
        // Checked before conflicts, as nbdkit does.
        assert!(failure(&["-p", "1", "-U", "x"]).starts_with("nbdkit: no plugins given"));
        assert!(failure(&["--dump-plugin"]).starts_with("nbdkit: use 'nbdkit plugin --dump-plugin' or\n"));
        let r = run(&["-p", "1", "-U", "x", "--help"]);
        assert_eq!(r.code(), Some(0));
        assert!(r.out.ends_with("Please read the nbdkit(1) manual page for full usage.\n"));
        let r = run(&["-V"]);
        assert_eq!(r.code(), Some(0));
        assert!(r.out.starts_with("nbdkit 1.44.1\nplugins: "), "{}", r.out);
        assert!(r.out.contains("\nfilters: ") && r.out.contains("\ntls: ") && r.out.contains("\nfeatures: "));
    }

    #[test]
    fn unknown_options_print_usage_and_exit_1() {
        let r = run(&["--bogus", "null"]);
        assert_eq!(r.code(), Some(1));
        assert_eq!(r.err, "nbdkit: unrecognized option '--bogus'\n");
        assert!(r.out.starts_with("nbdkit [-4|--ipv4-only]"));
        let r = run(&["-t", "x", "null"]);
        assert_eq!(r.code(), Some(1));
        assert!(r.out.is_empty());
    }

    #[test]
    fn unknown_plugin_or_filter() {
        let e = failure(&["nosuchname"]);
        assert!(e.starts_with("nbdkit: error: cannot open plugin \"nosuchname\": "), "{e}");
        let e = failure(&["--filter=nosuch", "null"]);
        assert!(e.starts_with("nbdkit: error: cannot open filter \"nosuch\": "), "{e}");
        // Innermost first: the last --filter is looked at first.
        assert!(failure(&["--filter=bad1", "--filter=bad2", "null"]).contains("\"bad2\""));
        // The plugin before any filter, and even for --help.
        assert!(failure(&["--filter=bad1", "--help", "nosuch"]).contains("plugin \"nosuch\""));
    }

    #[test]
    fn help_lists_each_backend_outermost_first() {
        let r = run(&["--filter=readonly", "--filter=error", "null", "--help", "bare", "more"]);
        assert_eq!(r.code(), Some(0));
        let i = r.out.find("\nfilter: readonly (nbdkit readonly filter)\n(built in)\n").expect(&r.out);
        let j = r.out.find("\nfilter: error-inject (").expect(&r.out);
        let k = r.out.find("\nplugin: null\n(built in)\n").expect(&r.out);
        assert!(i < j && j < k, "{}", r.out);
        assert!(r.out.ends_with('\n'));
    }

    #[test]
    fn version_lists_each_backend() {
        let r = run(&["--version", "--filter=delay", "--filter=error", "null"]);
        assert_eq!(r.out, "nbdkit 1.44.1\ndelay 1.44.1\nerror-inject 1.44.1\nnull 1.44.1\n");
    }

    #[test]
    fn dump_plugin_configures_but_does_not_complete() {
        let r = run(&["--filter=readonly", "--filter=delay", "null", "--dump-plugin", "size=1M", "rdelay=1"]);
        assert_eq!(r.code(), Some(0), "{}", r.err);
        let keys: Vec<&str> = r.out.lines().map(|l| l.split('=').next().unwrap()).collect();
        assert_eq!(&keys[..9], ["path", "name", "version", "api_version", "struct_size", "max_thread_model",
                                "thread_model", "errno_is_preserved", "magic_config_key"]);
        assert!(r.out.contains("\nname=null\n"));
        // Filters innermost first.
        assert!(r.out.contains("\ndelay_name=delay\nreadonly_path="), "{}", r.out);
        assert!(r.out.ends_with("\nreadonly_name=readonly\n"), "{}", r.out);
        // A parameter no layer takes fails, as it does when serving.
        assert_eq!(run(&["null", "--dump-plugin", "bogus=1"]).code(), Some(1));
        // A bad value for the magic key fails in config.
        assert_eq!(run(&["null", "--dump-plugin", "1Q"]).code(), Some(1));
    }

    #[test]
    fn debug_flag_warnings() {
        let r = run(&["-D", "a.x=1", "-D", "null.y=2", "-D", "nbdkit.backend.datapath=0", "-D", "nbdkit.no.such=1",
                      "-D", "b.c.d=3", "null"]);
        assert_eq!(r.config_ref().debug_flags.len(), 5);
        assert_eq!(
            r.err,
            "nbdkit: warning: -D null.y: null does not contain a global variable called null_debug_y\n\
             nbdkit: warning: -D nbdkit.no.such: nbdkit does not contain a global variable called nbdkit_debug_no_such\n\
             nbdkit: warning: debug flag -D b.c.d was not used\n\
             nbdkit: warning: debug flag -D a.x was not used\n"
        );
        // Filters match by their registered name.
        let r = run(&["-D", "error-inject.x=1", "--filter=error", "null"]);
        assert_eq!(r.err, "");
        assert_eq!(failure(&["-D", "foo", "null"]), "nbdkit: -D (Debug Flag) must have the format NAME.FLAG=N\n");
    }

    #[test]
    fn service_and_tls_options_serve() {
        assert_eq!(run(&["--tls=off", "null"]).config().tls, TlsMode::Off);
        assert_eq!(run_with(&["null"], true).code(), None);
        for args in [&["-u", "nobody", "-g", "nogroup", "null"][..], &["--vsock", "null"], &["--swap", "null"],
                     &["--selinux-label=x", "null"], &["--tls=require", "null"], &["--tls-psk=/x", "null"]] {
            assert!(run(args).code().is_none(), "{args:?}");
        }
        assert_eq!(run_with(&["-p", "1", "null"], true).err, "nbdkit: cannot use socket activation with -p flag\n");
    }

    #[test]
    fn socket_activation_detection() {
        assert_eq!(socket_activation(None, Some("1"), 7), (false, None));
        assert_eq!(socket_activation(Some("7"), Some("1"), 7), (true, None));
        assert_eq!(socket_activation(Some("7"), None, 7), (false, None));
        assert_eq!(
            socket_activation(Some("8"), Some("1"), 7),
            (false, Some("nbdkit: LISTEN_PID was not for us (ignored)\n".into()))
        );
        let (on, note) = socket_activation(Some("x"), Some("1"), 7);
        assert!(!on && note.unwrap().starts_with("nbdkit: error: LISTEN_PID: "));
    }

    #[test]
    fn getopt_complaints_start_with_argv0() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let argv = ["/usr/sbin/nbdkit", "-Z"].map(OsString::from);
        assert!(matches!(parse_with(argv, false, &mut out, &mut err), Action::Exit(1)));
        assert_eq!(String::from_utf8(err).unwrap(), "/usr/sbin/nbdkit: invalid option -- 'Z'\n");
        assert!(String::from_utf8(out).unwrap().starts_with("nbdkit [-4|--ipv4-only]"));
    }

    #[test]
    fn probes_that_exit_at_once() {
        let r = run(&["--dump-config", "--bogus"]);
        assert_eq!(r.code(), Some(0));
        assert!(r.out.contains("\nversion=1.44.1\n"));
        let r = run(&["--short-options"]);
        assert!(r.out.starts_with("-4\n-6\n-D\n"));
        let r = run(&["--long-options"]);
        assert!(r.out.starts_with("--ipv4-only\n") && r.out.ends_with("--vsock\n"));
    }
}
