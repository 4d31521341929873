//! What the command line asks for, after parsing and checking.

use std::path::PathBuf;
use std::time::Duration;

/// `-U`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unix {
    /// A path (made absolute).
    Path(PathBuf),
    /// `-U -`: a private socket in a fresh temporary directory.
    Private,
}

/// `-4` / `-6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// Both.
    #[default]
    Any,
    /// `-4`.
    V4,
    /// `-6`.
    V6,
}

/// `--log`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LogDest {
    /// `default`: stderr in the foreground, syslog once forked.
    #[default]
    Default,
    /// `stderr`.
    Stderr,
    /// `syslog`.
    Syslog,
    /// `null`.
    Null,
    /// An absolute path, appended to.
    File(PathBuf),
}

/// `--tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// off.
    #[default]
    Off,
    /// on: clients may upgrade.
    On,
    /// require.
    Require,
}

/// Everything needed to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Plugin name.
    pub plugin: String,
    /// Filter names, outermost first.
    pub filters: Vec<String>,
    /// key=value parameters in command-line order, magic keys resolved.
    pub params: Vec<(String, String)>,
    /// `-f`.
    pub foreground: bool,
    /// `-P`, absolute.
    pub pidfile: Option<PathBuf>,
    /// `-U`.
    pub unix: Option<Unix>,
    /// `-p`, verbatim.
    pub port: Option<String>,
    /// `-i`.
    pub ipaddr: Option<String>,
    /// `-4` / `-6`.
    pub family: Family,
    /// `-s`.
    pub single: bool,
    /// `--run`.
    pub run: Option<String>,
    /// `--print-uri`.
    pub print_uri: bool,
    /// `-e`.
    pub export_name: Option<String>,
    /// `--exit-with-parent`.
    pub exit_with_parent: bool,
    /// `-r`.
    pub readonly: bool,
    /// `-t` (0 = default 16).
    pub threads: u32,
    /// `-v`.
    pub verbose: bool,
    /// `-D NAME.FLAG=N` as (NAME, FLAG, N), in command-line order. FLAG is
    /// as typed; nbdkit treats every `.` in it as `_` (`-D a.b.c=1` is
    /// `-D a.b_c=1`), so compare with `flag.replace('.', "_")`.
    pub debug_flags: Vec<(String, String, i64)>,
    /// `--log`.
    pub log: LogDest,
    /// `--no-sr`.
    pub no_sr: bool,
    /// `--no-mc`.
    pub no_mc: bool,
    /// `--mask-handshake` (default all bits).
    pub mask_handshake: u32,
    /// `-o`.
    pub oldstyle: bool,
    /// `--keepalive`.
    pub keepalive: bool,
    /// `--timeout` (None = default; Some(ZERO) = disabled).
    pub timeout: Option<Duration>,
    /// `--tls`.
    pub tls: TlsMode,
    /// `--tls-certificates`.
    pub tls_certificates: Option<PathBuf>,
    /// `--tls-psk`.
    pub tls_psk: Option<PathBuf>,
    /// `--tls-verify-peer`.
    pub tls_verify_peer: bool,
    /// True if `--tls` was given: a failure to load certificates is then
    /// a warning (`on`) or an error (`require`) instead of silent.
    pub tls_on_cli: bool,
    /// `--vsock`.
    pub vsock: bool,
    /// `-u`.
    pub user: Option<String>,
    /// `-g`.
    pub group: Option<String>,
    /// `--swap`.
    pub swap: bool,
    /// `--selinux-label`.
    pub selinux_label: Option<String>,
    /// systemd socket activation: the number of listening descriptors
    /// handed over from fd 3 on (`LISTEN_FDS`); 0 when not activated.
    pub socket_activation: u32,
}

impl Default for Config {
    /// What nbdkit does with no options (`--mask-handshake` has all bits).
    fn default() -> Config {
        Config {
            plugin: String::new(),
            filters: Vec::new(),
            params: Vec::new(),
            foreground: false,
            pidfile: None,
            unix: None,
            port: None,
            ipaddr: None,
            family: Family::Any,
            single: false,
            run: None,
            print_uri: false,
            export_name: None,
            exit_with_parent: false,
            readonly: false,
            threads: 0,
            verbose: false,
            debug_flags: Vec::new(),
            log: LogDest::Default,
            no_sr: false,
            no_mc: false,
            mask_handshake: u32::MAX,
            oldstyle: false,
            keepalive: false,
            timeout: None,
            tls: TlsMode::Off,
            tls_certificates: None,
            tls_psk: None,
            tls_verify_peer: false,
            tls_on_cli: false,
            vsock: false,
            user: None,
            group: None,
            swap: false,
            selinux_label: None,
            socket_activation: 0,
        }
    }
}
