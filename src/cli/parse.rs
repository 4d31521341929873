//! The getopt loop: argv → [`Low`], nbdkit's raw arguments.
//!
//! Like nbdkit's `main`, each option's value is checked where the option
//! is seen (so `--tls=x --dump-config` fails, `--dump-config --tls=x` does
//! not), and `--dump-config`, `--short-options` and `--long-options` stop
//! the loop at once. Everything that needs the whole command line
//! (conflicts, the plugin, parameters) is in [`super::check`].

use std::ffi::OsString;
use std::path::PathBuf;

use super::config::{Config, Family, LogDest, TlsMode, Unix};
use super::options::{self, LongError, Opt};
use crate::util::parse::{parse_bool, parse_delay, parse_int, parse_unsigned};

/// The command line as parsed, before cross-option checks.
#[derive(Debug, Default)]
pub(super) struct Low {
    /// Options, filled as far as they go (no plugin or parameters yet).
    pub cfg: Config,
    /// `--filter` values, in command-line order.
    pub filters: Vec<OsString>,
    /// Non-option arguments: the plugin, then its parameters.
    pub args: Vec<OsString>,
    /// `--help`.
    pub help: bool,
    /// `-V`.
    pub version: bool,
    /// `--dump-plugin`.
    pub dump_plugin: bool,
}

/// Why the loop stopped early.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// `--dump-config`.
    DumpConfig,
    /// `--short-options`.
    ShortOptions,
    /// `--long-options`.
    LongOptions,
    /// getopt's complaint (a line for stderr); usage follows on stdout.
    Usage(String),
    /// A fatal error: this text on stderr, exit 1.
    Fail(String),
}

/// Runs the getopt loop over `args` (without argv[0]; getopt's own
/// messages start with `prog`, argv[0] as given). `activation` is true
/// when systemd socket activation is in effect, which some options
/// contradict.
pub(super) fn lex(args: impl IntoIterator<Item = OsString>, prog: &str, activation: bool) -> Result<Low, Stop> {
    let mut p = lexopt::Parser::from_args(args);
    // getopt takes `-p=1` as port "=1".
    p.set_short_equals(false);
    let mut low = Low::default();
    loop {
        let arg = match p.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            // Only an unconsumed `--opt=value` gets here, and option()
            // always consumes it.
            Err(e) => return Err(Stop::Usage(format!("{prog}: {e}\n"))),
        };
        let (opt, shown) = match arg {
            lexopt::Arg::Value(v) => {
                low.args.push(v);
                continue;
            }
            lexopt::Arg::Short(c) => match options::short(c) {
                Some(o) => (o, None),
                None => return Err(Stop::Usage(format!("{prog}: invalid option -- '{c}'\n"))),
            },
            lexopt::Arg::Long(name) => match options::long(name) {
                Ok((full, o)) => (o, Some(full)),
                Err(LongError::Unrecognized) => {
                    let name = name.to_string();
                    let text = match p.optional_value() {
                        Some(v) => format!("--{name}={}", v.to_string_lossy()),
                        None => format!("--{name}"),
                    };
                    return Err(Stop::Usage(format!("{prog}: unrecognized option '{text}'\n")));
                }
                Err(LongError::Ambiguous(names)) => {
                    let list: String = names.iter().map(|n| format!(" '--{n}'")).collect();
                    return Err(Stop::Usage(format!(
                        "{prog}: option '--{name}' is ambiguous; possibilities:{list}\n"
                    )));
                }
            },
        };
        let value = if opt.takes_value() {
            match p.value() {
                Ok(v) => Some(v),
                Err(_) => {
                    return Err(Stop::Usage(match shown {
                        Some(full) => format!("{prog}: option '--{full}' requires an argument\n"),
                        None => format!("{prog}: option requires an argument -- '{}'\n", short_of(opt)),
                    }))
                }
            }
        } else {
            // Only a long option can carry `=value`; for a short one this
            // would swallow the rest of a `-fv` cluster.
            if let Some(full) = shown {
                if p.optional_value().is_some() {
                    return Err(Stop::Usage(format!("{prog}: option '--{full}' doesn't allow an argument\n")));
                }
            }
            None
        };
        option(&mut low, opt, value, activation)?;
    }
    Ok(low)
}

/// The short letter of an option that has one (for getopt's messages).
fn short_of(opt: Opt) -> char {
    options::SHORT_OPTIONS
        .chars()
        .find(|&c| options::short(c) == Some(opt))
        .unwrap_or('?')
}

/// Applies one option. `value` is `Some` exactly when the option takes one.
fn option(low: &mut Low, opt: Opt, value: Option<OsString>, activation: bool) -> Result<(), Stop> {
    let cfg = &mut low.cfg;
    let raw = value.unwrap_or_default();
    let text = || utf8(&raw);
    let no_activation = |flag: &str| {
        if activation {
            Err(Stop::Fail(format!("nbdkit: cannot use socket activation with {flag} flag\n")))
        } else {
            Ok(())
        }
    };
    match opt {
        Opt::DumpConfig => return Err(Stop::DumpConfig),
        Opt::ShortOptions => return Err(Stop::ShortOptions),
        Opt::LongOptions => return Err(Stop::LongOptions),
        Opt::Help => low.help = true,
        Opt::Version => low.version = true,
        Opt::DumpPlugin => low.dump_plugin = true,
        Opt::Ipv4 => cfg.family = Family::V4,
        Opt::Ipv6 => cfg.family = Family::V6,
        Opt::Debug => cfg.debug_flags.push(debug_flag(&text()?)?),
        Opt::ExitWithParent => {
            if !cfg!(target_os = "linux") {
                return Err(fail_plain("--exit-with-parent is not implemented for this operating system"));
            }
            cfg.exit_with_parent = true;
            cfg.foreground = true;
        }
        Opt::Export => cfg.export_name = Some(text()?),
        Opt::Filter => low.filters.push(raw),
        Opt::Foreground => cfg.foreground = true,
        Opt::Group => cfg.group = Some(text()?),
        Opt::Ipaddr => {
            no_activation("-i")?;
            cfg.ipaddr = Some(text()?);
        }
        Opt::Keepalive => cfg.keepalive = true,
        Opt::Log => cfg.log = log_dest(&text()?)?,
        Opt::MaskHandshake => {
            cfg.mask_handshake = parse_unsigned("mask-handshake", &text()?, u32::MAX.into())
                .map_err(|e| fail(e.message()))? as u32;
        }
        Opt::Newstyle => cfg.oldstyle = false,
        Opt::Oldstyle => cfg.oldstyle = true,
        Opt::NoMc => cfg.no_mc = true,
        Opt::NoSr => cfg.no_sr = true,
        Opt::Pidfile => cfg.pidfile = Some(absolute_path(raw)?),
        Opt::PrintUri => cfg.print_uri = true,
        Opt::Port => {
            no_activation("-p")?;
            cfg.port = Some(text()?);
        }
        Opt::Readonly => cfg.readonly = true,
        Opt::Run => {
            no_activation("--run")?;
            cfg.run = Some(text()?);
            cfg.foreground = true;
        }
        Opt::SelinuxLabel => cfg.selinux_label = Some(text()?),
        Opt::Single => {
            no_activation("-s")?;
            cfg.single = true;
            cfg.foreground = true;
        }
        Opt::Swap => cfg.swap = true,
        Opt::Threads => {
            cfg.threads = parse_unsigned("threads", &text()?, u32::MAX.into()).map_err(|e| fail(e.message()))? as u32;
        }
        Opt::Timeout => cfg.timeout = Some(parse_delay("timeout", &text()?).map_err(|e| fail(e.message()))?),
        Opt::Tls => {
            cfg.tls_on_cli = true;
            cfg.tls = tls_mode(&text()?)?;
        }
        Opt::TlsCertificates => cfg.tls_certificates = Some(PathBuf::from(raw)),
        Opt::TlsPsk => cfg.tls_psk = Some(PathBuf::from(raw)),
        Opt::TlsVerifyPeer => cfg.tls_verify_peer = true,
        Opt::Unix => {
            no_activation("-U")?;
            cfg.unix = Some(if raw == "-" { Unix::Private } else { Unix::Path(absolute_path(raw)?) });
        }
        Opt::User => cfg.user = Some(text()?),
        Opt::Verbose => cfg.verbose = true,
        Opt::Vsock => {
            no_activation("--vsock")?;
            cfg.vsock = true;
        }
    }
    Ok(())
}

/// `nbdkit: error: MSG`, as nbdkit_error prints it.
pub(super) fn fail(msg: &str) -> Stop {
    Stop::Fail(format!("nbdkit: error: {msg}\n"))
}

/// `nbdkit: MSG`, as nbdkit's own `fprintf (stderr, …)` messages read.
pub(super) fn fail_plain(msg: &str) -> Stop {
    Stop::Fail(format!("nbdkit: {msg}\n"))
}

/// An option value as UTF-8 (every nbdkit value we store is text).
pub(super) fn utf8(v: &OsString) -> Result<String, Stop> {
    v.clone()
        .into_string()
        .map_err(|v| fail(&format!("argument is not valid UTF-8: \"{}\"", v.to_string_lossy())))
}

/// `-D NAME.FLAG=N`: NAME before the first `.`, FLAG up to the next `=`,
/// N an `int` in C notation; anything empty is nbdkit's format error.
pub(super) fn debug_flag(arg: &str) -> Result<(String, String, i64), Stop> {
    let bad = || fail_plain("-D (Debug Flag) must have the format NAME.FLAG=N");
    let (name, rest) = arg.split_once('.').filter(|(n, _)| !n.is_empty()).ok_or_else(bad)?;
    let (flag, value) = rest.split_once('=').filter(|(f, v)| !f.is_empty() && !v.is_empty()).ok_or_else(bad)?;
    match parse_int("flag", value, i32::MIN.into(), i32::MAX.into()) {
        Ok(n) => Ok((name.to_string(), flag.to_string(), n)),
        Err(e) => {
            let Stop::Fail(format) = bad() else { unreachable!() };
            Err(Stop::Fail(format!("nbdkit: error: {}\n{format}", e.message())))
        }
    }
}

/// `--log`: nbdkit 1.44's destinations.
fn log_dest(s: &str) -> Result<LogDest, Stop> {
    Ok(match s {
        "default" => LogDest::Default,
        "stderr" => LogDest::Stderr,
        "syslog" => LogDest::Syslog,
        "null" => LogDest::Null,
        _ if s.starts_with('/') => LogDest::File(PathBuf::from(s)),
        _ => return Err(fail_plain("--log must be \"stderr\", \"syslog\", \"null\", or an absolute path")),
    })
}

/// `--tls`: `require`/`required`/`force` in any case, else a boolean.
fn tls_mode(s: &str) -> Result<TlsMode, Stop> {
    if ["require", "required", "force"].iter().any(|w| s.eq_ignore_ascii_case(w)) {
        return Ok(TlsMode::Require);
    }
    match parse_bool(s) {
        Ok(true) => Ok(TlsMode::On),
        Ok(false) => Ok(TlsMode::Off),
        Err(e) => Err(fail(e.message())),
    }
}

/// `nbdkit_absolute_path`: the current directory prepended to a relative
/// path (nothing is resolved or normalised).
pub(super) fn absolute_path(p: OsString) -> Result<PathBuf, Stop> {
    let p = PathBuf::from(p);
    if p.as_os_str().is_empty() {
        return Err(fail("cannot convert null or empty path to an absolute path"));
    }
    if p.is_absolute() {
        return Ok(p);
    }
    let cwd = std::env::current_dir().map_err(|e| fail(&format!("getcwd: {e}")))?;
    Ok(cwd.join(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lex_strs(args: &[&str]) -> Result<Low, Stop> {
        lex(args.iter().map(OsString::from), "nbdkit", false)
    }

    fn ok(args: &[&str]) -> Low {
        lex_strs(args).unwrap_or_else(|e| panic!("{args:?}: {e:?}"))
    }

    fn usage_msg(args: &[&str]) -> String {
        match lex_strs(args) {
            Err(Stop::Usage(m)) => m,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn fail_msg(args: &[&str]) -> String {
        match lex_strs(args) {
            Err(Stop::Fail(m)) => m,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn gnu_forms() {
        assert_eq!(ok(&["--filter=xz", "null"]).filters, ["xz"]);
        assert_eq!(ok(&["--filter", "xz", "null"]).filters, ["xz"]);
        let l = ok(&["-fv", "null"]);
        assert!(l.cfg.foreground && l.cfg.verbose);
        assert_eq!(ok(&["-p10809"]).cfg.port.as_deref(), Some("10809"));
        assert_eq!(ok(&["-p", "10809"]).cfg.port.as_deref(), Some("10809"));
        assert_eq!(ok(&["--port=10809"]).cfg.port.as_deref(), Some("10809"));
        assert_eq!(ok(&["-p=1"]).cfg.port.as_deref(), Some("=1"), "getopt keeps the '='");
        assert_eq!(ok(&["-U", "-"]).cfg.unix, Some(Unix::Private));
        assert_eq!(ok(&["-U-"]).cfg.unix, Some(Unix::Private));
        assert_eq!(ok(&["-t10"]).cfg.threads, 10);
        assert_eq!(ok(&["-rt", "3"]).cfg.threads, 3);
        // Options after the plugin and its parameters still count.
        let l = ok(&["null", "size=1", "-r", "--filter=delay"]);
        assert!(l.cfg.readonly);
        assert_eq!(l.args, ["null", "size=1"]);
        // `--` ends the options.
        assert_eq!(ok(&["--", "null", "-r"]).args, ["null", "-r"]);
        // A value may start with a dash.
        assert_eq!(ok(&["-e", "-r"]).cfg.export_name.as_deref(), Some("-r"));
    }

    #[test]
    fn aliases_set_the_same_field() {
        for a in ["-e", "--export", "--export-name", "--exportname", "--expo"] {
            assert_eq!(ok(&[a, "x"]).cfg.export_name.as_deref(), Some("x"), "{a}");
        }
        for a in ["-f", "--foreground", "--no-fork"] {
            assert!(ok(&[a]).cfg.foreground, "{a}");
        }
        for a in ["-i", "--ipaddr", "--ip-addr"] {
            assert_eq!(ok(&[a, "::1"]).cfg.ipaddr.as_deref(), Some("::1"), "{a}");
        }
        for a in ["--keepalive", "--keep-alive"] {
            assert!(ok(&[a]).cfg.keepalive, "{a}");
        }
        for a in ["--no-mc", "--no-meta-contexts"] {
            assert!(ok(&[a]).cfg.no_mc, "{a}");
        }
        for a in ["--no-sr", "--no-structured-replies"] {
            assert!(ok(&[a]).cfg.no_sr, "{a}");
        }
        for a in ["-o", "--oldstyle", "--old-style"] {
            assert!(ok(&[a]).cfg.oldstyle, "{a}");
            assert!(!ok(&[a, "-n"]).cfg.oldstyle, "{a} -n");
            assert!(!ok(&[a, "--new-style"]).cfg.oldstyle, "{a} --new-style");
            assert!(!ok(&[a, "--newstyle"]).cfg.oldstyle, "{a} --newstyle");
        }
        for a in ["-P", "--pidfile", "--pid-file"] {
            assert_eq!(ok(&[a, "/run/x.pid"]).cfg.pidfile, Some(PathBuf::from("/run/x.pid")), "{a}");
        }
        for a in ["--print-uri", "--print-url", "--show-uri", "--show-url"] {
            assert!(ok(&[a]).cfg.print_uri, "{a}");
        }
        for a in ["-p", "--port"] {
            assert_eq!(ok(&[a, "99"]).cfg.port.as_deref(), Some("99"), "{a}");
        }
        for a in ["-r", "--readonly", "--read-only"] {
            assert!(ok(&[a]).cfg.readonly, "{a}");
        }
        for a in ["-s", "--single", "--stdin"] {
            let l = ok(&[a]);
            assert!(l.cfg.single && l.cfg.foreground, "{a}");
        }
        for a in ["-t", "--threads"] {
            assert_eq!(ok(&[a, "0x10"]).cfg.threads, 16, "{a}");
        }
        for a in ["--timeout", "--time-out"] {
            assert_eq!(ok(&[a, "60000ms"]).cfg.timeout, Some(Duration::from_secs(60)), "{a}");
        }
        for a in ["-U", "--unix"] {
            assert_eq!(ok(&[a, "/tmp/s"]).cfg.unix, Some(Unix::Path("/tmp/s".into())), "{a}");
        }
        for a in ["-u", "--user"] {
            assert_eq!(ok(&[a, "nobody"]).cfg.user.as_deref(), Some("nobody"), "{a}");
        }
        for a in ["-g", "--group"] {
            assert_eq!(ok(&[a, "disk"]).cfg.group.as_deref(), Some("disk"), "{a}");
        }
        for a in ["-v", "--verbose"] {
            assert!(ok(&[a]).cfg.verbose, "{a}");
        }
        for a in ["-V", "--version"] {
            assert!(ok(&[a]).version, "{a}");
        }
        for a in ["-D", "--debug"] {
            assert_eq!(ok(&[a, "a.b=1"]).cfg.debug_flags, [("a".into(), "b".into(), 1)], "{a}");
        }
        assert_eq!(ok(&["-4"]).cfg.family, Family::V4);
        assert_eq!(ok(&["--ipv6-only"]).cfg.family, Family::V6);
        assert_eq!(ok(&["-6", "--ipv4-only"]).cfg.family, Family::V4, "last one wins");
        let l = ok(&["--exit-with-parent", "--swap", "--vsock", "--selinux-label=l", "--tls-verify-peer"]);
        assert!(l.cfg.exit_with_parent && l.cfg.foreground && l.cfg.swap && l.cfg.vsock && l.cfg.tls_verify_peer);
        assert_eq!(l.cfg.selinux_label.as_deref(), Some("l"));
        let l = ok(&["--run", "true"]);
        assert!(l.cfg.foreground);
        assert_eq!(l.cfg.run.as_deref(), Some("true"));
    }

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(ok(&["-P", "x.pid"]).cfg.pidfile, Some(cwd.join("x.pid")));
        assert_eq!(ok(&["-U", "sock"]).cfg.unix, Some(Unix::Path(cwd.join("sock"))));
        assert!(fail_msg(&["-P", ""]).contains("empty path"));
    }

    #[test]
    fn getopt_messages() {
        assert_eq!(usage_msg(&["--bogus"]), "nbdkit: unrecognized option '--bogus'\n");
        assert_eq!(usage_msg(&["--bogus=1"]), "nbdkit: unrecognized option '--bogus=1'\n");
        assert_eq!(usage_msg(&["-Z"]), "nbdkit: invalid option -- 'Z'\n");
        assert_eq!(usage_msg(&["-fZ"]), "nbdkit: invalid option -- 'Z'\n");
        assert_eq!(usage_msg(&["-p"]), "nbdkit: option requires an argument -- 'p'\n");
        assert_eq!(usage_msg(&["--filter"]), "nbdkit: option '--filter' requires an argument\n");
        assert_eq!(usage_msg(&["--deb"]), "nbdkit: option '--debug' requires an argument\n");
        assert_eq!(usage_msg(&["--fore=1"]), "nbdkit: option '--foreground' doesn't allow an argument\n");
        assert_eq!(
            usage_msg(&["--no"]),
            "nbdkit: option '--no' is ambiguous; possibilities: '--no-fork' '--no-mc' \
             '--no-meta-contexts' '--no-sr' '--no-structured-replies'\n"
        );
    }

    #[test]
    fn probes_stop_the_loop_where_they_are() {
        assert_eq!(lex_strs(&["--dump-config", "--tls=x"]).unwrap_err(), Stop::DumpConfig);
        assert!(matches!(lex_strs(&["--tls=x", "--dump-config"]), Err(Stop::Fail(_))));
        assert_eq!(lex_strs(&["--short-options"]).unwrap_err(), Stop::ShortOptions);
        assert_eq!(lex_strs(&["--long-options"]).unwrap_err(), Stop::LongOptions);
        assert_eq!(usage_msg(&["--short-options=1"]), "nbdkit: option '--short-options' doesn't allow an argument\n");
    }

    #[test]
    fn debug_flags() {
        assert_eq!(debug_flag("a.b=1").unwrap(), ("a".into(), "b".into(), 1));
        assert_eq!(debug_flag("a.b.c=0x10").unwrap(), ("a".into(), "b.c".into(), 16));
        assert_eq!(debug_flag("a.b=-1").unwrap(), ("a".into(), "b".into(), -1));
        assert_eq!(debug_flag("a.b= 010").unwrap(), ("a".into(), "b".into(), 8));
        let format = "nbdkit: -D (Debug Flag) must have the format NAME.FLAG=N\n";
        for bad in ["foo", ".x=1", "a.=1", "a.b=", "a.b", "ab=1"] {
            assert_eq!(debug_flag(bad), Err(Stop::Fail(format.into())), "{bad}");
        }
        match debug_flag("a.b=x") {
            Err(Stop::Fail(m)) => {
                assert!(m.starts_with("nbdkit: error: flag: "), "{m}");
                assert!(m.ends_with(format), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert!(debug_flag("a.b=99999999999").is_err(), "an int");
        // In order, repeatable.
        let l = ok(&["-D", "x.y=1", "-Dnbdkit.backend.datapath=0"]);
        assert_eq!(l.cfg.debug_flags.len(), 2);
        assert_eq!(l.cfg.debug_flags[1], ("nbdkit".into(), "backend.datapath".into(), 0));
    }

    #[test]
    fn unsigned_options_reject_junk() {
        for args in [
            ["-t", "x"],
            ["-t", "-1"],
            ["-t", "12a"],
            ["-t", "4294967296"],
            ["--mask-handshake", "junk"],
            ["--mask-handshake", "-3"],
            ["--timeout", "soon"],
        ] {
            let m = fail_msg(&args);
            assert!(m.starts_with("nbdkit: error: "), "{args:?}: {m}");
        }
        assert!(fail_msg(&["-t", "x"]).starts_with("nbdkit: error: threads: "));
        assert!(fail_msg(&["--mask-handshake=x"]).starts_with("nbdkit: error: mask-handshake: "));
        assert_eq!(
            fail_msg(&["--timeout=soon"]),
            "nbdkit: error: timeout: could not parse delay or sleep: \"soon\"\n"
        );
        assert_eq!(ok(&["--mask-handshake=0x3"]).cfg.mask_handshake, 3);
        assert_eq!(ok(&[]).cfg.mask_handshake, u32::MAX);
        assert_eq!(ok(&["--timeout=0"]).cfg.timeout, Some(Duration::ZERO));
        assert_eq!(ok(&["-t", "4294967295"]).cfg.threads, u32::MAX);
    }

    #[test]
    fn log_and_tls_values() {
        assert_eq!(ok(&["--log=default"]).cfg.log, LogDest::Default);
        assert_eq!(ok(&["--log=stderr"]).cfg.log, LogDest::Stderr);
        assert_eq!(ok(&["--log=syslog"]).cfg.log, LogDest::Syslog);
        assert_eq!(ok(&["--log", "null"]).cfg.log, LogDest::Null);
        assert_eq!(ok(&["--log=/var/log/x"]).cfg.log, LogDest::File("/var/log/x".into()));
        assert_eq!(
            fail_msg(&["--log=x.log"]),
            "nbdkit: --log must be \"stderr\", \"syslog\", \"null\", or an absolute path\n"
        );
        for (v, m) in [
            ("require", TlsMode::Require),
            ("REQUIRED", TlsMode::Require),
            ("Force", TlsMode::Require),
            ("on", TlsMode::On),
            ("yes", TlsMode::On),
            ("1", TlsMode::On),
            ("off", TlsMode::Off),
            ("FALSE", TlsMode::Off),
        ] {
            let l = ok(&["--tls", v]);
            assert_eq!(l.cfg.tls, m, "{v}");
            assert!(l.cfg.tls_on_cli);
        }
        assert_eq!(fail_msg(&["--tls=maybe"]), "nbdkit: error: could not decipher boolean (maybe)\n");
        assert!(!ok(&[]).cfg.tls_on_cli);
    }

    #[test]
    fn socket_activation_refuses_listening_flags() {
        for (args, flag) in [
            (&["-p", "1"][..], "-p"),
            (&["-i", "x"][..], "-i"),
            (&["-U", "x"][..], "-U"),
            (&["-s"][..], "-s"),
            (&["--run", "x"][..], "--run"),
        ] {
            match lex(args.iter().map(OsString::from), "nbdkit", true) {
                Err(Stop::Fail(m)) => assert_eq!(m, format!("nbdkit: cannot use socket activation with {flag} flag\n")),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        assert!(lex(["-f", "null"].map(OsString::from), "nbdkit", true).is_ok());
    }
}
