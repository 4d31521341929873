//! nbdkit's option table as data: every long name and alias in nbdkit
//! 1.44's table order (the order `--long-options` prints and getopt's
//! "ambiguous" message follows), the short option string, and
//! getopt_long's rule for abbreviated long options.

/// One option, whatever name it was given by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opt {
    Ipv4,
    Ipv6,
    Debug,
    DumpConfig,
    DumpPlugin,
    ExitWithParent,
    Export,
    Filter,
    Foreground,
    Group,
    Help,
    Ipaddr,
    Keepalive,
    Log,
    LongOptions,
    MaskHandshake,
    Newstyle,
    NoMc,
    NoSr,
    Oldstyle,
    Pidfile,
    PrintUri,
    Port,
    Readonly,
    Run,
    SelinuxLabel,
    ShortOptions,
    Single,
    Swap,
    Threads,
    Timeout,
    Tls,
    TlsCertificates,
    TlsPsk,
    TlsVerifyPeer,
    Unix,
    User,
    Verbose,
    Version,
    Vsock,
}

impl Opt {
    /// True if the option takes an argument (getopt's `required_argument`).
    pub(super) fn takes_value(self) -> bool {
        use Opt::*;
        matches!(
            self,
            Debug | Export | Filter | Group | Ipaddr | Log | MaskHandshake | Pidfile | Port | Run
                | SelinuxLabel | Threads | Timeout | Tls | TlsCertificates | TlsPsk | Unix | User
        )
    }
}

/// getopt's short option string, unchanged since nbdkit 1.0.
pub(super) const SHORT_OPTIONS: &str = "46D:e:fg:i:nop:P:rst:u:U:vV";

/// The option a short letter stands for.
pub(super) fn short(c: char) -> Option<Opt> {
    use Opt::*;
    Some(match c {
        '4' => Ipv4,
        '6' => Ipv6,
        'D' => Debug,
        'e' => Export,
        'f' => Foreground,
        'g' => Group,
        'i' => Ipaddr,
        'n' => Newstyle,
        'o' => Oldstyle,
        'p' => Port,
        'P' => Pidfile,
        'r' => Readonly,
        's' => Single,
        't' => Threads,
        'u' => User,
        'U' => Unix,
        'v' => Verbose,
        'V' => Version,
        _ => return None,
    })
}

/// nbdkit 1.44's `long_options[]`, in table order. `--long-options` and
/// `--short-options` are in the table (getopt matches them, and lists
/// them when a prefix is ambiguous) but `--long-options` does not print them.
pub(super) const LONG_OPTIONS: &[(&str, Opt)] = {
    use Opt::*;
    &[
        ("ipv4-only", Ipv4),
        ("ipv6-only", Ipv6),
        ("debug", Debug),
        ("dump-config", DumpConfig),
        ("dump-plugin", DumpPlugin),
        ("exit-with-parent", ExitWithParent),
        ("export", Export),
        ("export-name", Export),
        ("exportname", Export),
        ("filter", Filter),
        ("foreground", Foreground),
        ("no-fork", Foreground),
        ("group", Group),
        ("help", Help),
        ("ip-addr", Ipaddr),
        ("ipaddr", Ipaddr),
        ("keepalive", Keepalive),
        ("keep-alive", Keepalive),
        ("log", Log),
        ("long-options", LongOptions),
        ("mask-handshake", MaskHandshake),
        ("new-style", Newstyle),
        ("newstyle", Newstyle),
        ("no-mc", NoMc),
        ("no-meta-contexts", NoMc),
        ("no-sr", NoSr),
        ("no-structured-replies", NoSr),
        ("old-style", Oldstyle),
        ("oldstyle", Oldstyle),
        ("pid-file", Pidfile),
        ("pidfile", Pidfile),
        ("print-uri", PrintUri),
        ("print-url", PrintUri),
        ("port", Port),
        ("read-only", Readonly),
        ("readonly", Readonly),
        ("run", Run),
        ("selinux-label", SelinuxLabel),
        ("short-options", ShortOptions),
        ("show-uri", PrintUri),
        ("show-url", PrintUri),
        ("single", Single),
        ("stdin", Single),
        ("swap", Swap),
        ("threads", Threads),
        ("timeout", Timeout),
        ("time-out", Timeout),
        ("tls", Tls),
        ("tls-certificates", TlsCertificates),
        ("tls-psk", TlsPsk),
        ("tls-verify-peer", TlsVerifyPeer),
        ("unix", Unix),
        ("user", User),
        ("verbose", Verbose),
        ("version", Version),
        ("vsock", Vsock),
    ]
};

/// Why a long option name did not resolve.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LongError {
    /// No option starts with it.
    Unrecognized,
    /// Several different options start with it: these, in table order.
    Ambiguous(Vec<&'static str>),
}

/// Resolves `--NAME` as glibc's getopt_long does: an exact name wins,
/// otherwise a prefix must select one option (aliases of the same option
/// do not make it ambiguous). Returns the full name and the option.
pub(super) fn long(name: &str) -> Result<(&'static str, Opt), LongError> {
    if let Some(&(n, o)) = LONG_OPTIONS.iter().find(|(n, _)| *n == name) {
        return Ok((n, o));
    }
    let mut found: Option<(&'static str, Opt)> = None;
    // glibc lists the first match plus every later match that differs
    // from it (so aliases of the first match are left out).
    let mut ambiguous = Vec::new();
    for &(n, o) in LONG_OPTIONS.iter().filter(|(n, _)| n.starts_with(name)) {
        match found {
            None => found = Some((n, o)),
            Some((first, first_opt)) if first_opt != o => {
                if ambiguous.is_empty() {
                    ambiguous.push(first);
                }
                ambiguous.push(n);
            }
            Some(_) => {}
        }
    }
    match found {
        _ if !ambiguous.is_empty() => Err(LongError::Ambiguous(ambiguous)),
        Some(f) => Ok(f),
        None => Err(LongError::Unrecognized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_string_agrees_with_the_table() {
        let mut chars = SHORT_OPTIONS.chars().peekable();
        while let Some(c) = chars.next() {
            let takes = chars.next_if_eq(&':').is_some();
            let opt = short(c).unwrap_or_else(|| panic!("-{c} missing"));
            assert_eq!(opt.takes_value(), takes, "-{c}");
        }
        assert_eq!(short('x'), None);
    }

    #[test]
    fn every_alias_maps_to_its_option() {
        let same = |a: &str, b: &str| assert_eq!(long(a).unwrap().1, long(b).unwrap().1, "{a} {b}");
        same("export", "exportname");
        same("export", "export-name");
        same("foreground", "no-fork");
        same("ipaddr", "ip-addr");
        same("keepalive", "keep-alive");
        same("newstyle", "new-style");
        same("no-mc", "no-meta-contexts");
        same("no-sr", "no-structured-replies");
        same("oldstyle", "old-style");
        same("pidfile", "pid-file");
        same("print-uri", "print-url");
        same("print-uri", "show-uri");
        same("print-uri", "show-url");
        same("readonly", "read-only");
        same("single", "stdin");
        same("timeout", "time-out");
    }

    #[test]
    fn abbreviations_follow_getopt() {
        assert_eq!(long("fore"), Ok(("foreground", Opt::Foreground)));
        // Aliases of one option are not ambiguous.
        assert_eq!(long("read").unwrap().1, Opt::Readonly);
        assert_eq!(long("exp").unwrap().1, Opt::Export);
        // An exact name beats longer names it is a prefix of.
        assert_eq!(long("tls"), Ok(("tls", Opt::Tls)));
        assert_eq!(long("export"), Ok(("export", Opt::Export)));
        assert_eq!(
            long("ex"),
            Err(LongError::Ambiguous(vec!["exit-with-parent", "export", "export-name", "exportname"]))
        );
        assert_eq!(long("lo"), Err(LongError::Ambiguous(vec!["log", "long-options"])));
        assert_eq!(long("ver"), Err(LongError::Ambiguous(vec!["verbose", "version"])));
        assert_eq!(long("bogus"), Err(LongError::Unrecognized));
    }
}
