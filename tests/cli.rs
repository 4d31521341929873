//! The command line as a user sees it: the built binary's probing output,
//! exit codes and messages, compared with Debian's nbdkit where it is
//! installed.

use std::path::Path;
use std::process::{Command, Output};

fn nbdkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbdkit"))
        .args(args)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .output()
        .expect("cannot run the nbdkit binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects exit 0; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = nbdkit(args);
    assert_eq!(o.status.code(), Some(0), "nbdkit {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// The keys of `key=value` lines, in order.
fn keys(text: &str) -> Vec<String> {
    text.lines().map(|l| l.split_once('=').map_or(l, |(k, _)| k).to_string()).collect()
}

/// Skip loudly, or fail when NBDKIT_TEST_STRICT=1.
fn skip(why: &str) {
    if std::env::var_os("NBDKIT_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("{why} (NBDKIT_TEST_STRICT=1)");
    }
    eprintln!("SKIP: {why}");
}

#[test]
fn help_prints_synopsis_and_pointer() {
    let out = ok(&["--help"]);
    assert!(out.starts_with("nbdkit [-4|--ipv4-only] [-6|--ipv6-only]\n"), "{out}");
    assert!(out.contains("[--no-sr|--no-structured-replies]"), "{out}");
    assert!(out.contains("Network Block Device (NBD) is a network protocol"), "{out}");
    assert!(out.ends_with("\nPlease read the nbdkit(1) manual page for full usage.\n"), "{out}");
}

#[test]
fn help_with_plugin_and_filter() {
    let out = ok(&["--filter=readonly", "null", "--help"]);
    assert!(out.contains("\n\nfilter: readonly (nbdkit readonly filter)\n(built in)\n"), "{out}");
    assert!(out.contains("\n\nplugin: null\n(built in)\n"), "{out}");
}

#[test]
fn version() {
    let v = ok(&["--version"]);
    assert!(v.starts_with("nbdkit 1.44.1\nplugins: ") && v.contains("\nfilters: "), "{v}");
    assert_eq!(ok(&["-V", "--filter=error", "null"]), "nbdkit 1.44.1\nerror-inject 1.44.1\nnull 1.44.1\n");
}

#[test]
fn dump_config() {
    let out = ok(&["--dump-config"]);
    assert_eq!(
        keys(&out),
        [
            "binary", "bindir", "exit_with_parent", "filterdir", "host_cpu", "host_os", "libdir", "mandir",
            "max_api_version", "name", "plugindir", "root_tls_certificates_dir", "run_default_socket",
            "sbindir", "selinux", "soext", "sysconfdir", "timeout_option", "tls", "version",
            "version_major", "version_minor", "vsock_option", "zstd",
        ]
    );
    let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_nbdkit")).unwrap();
    assert!(out.starts_with(&format!("binary={}\n", binary.display())), "{out}");
    assert!(out.contains("\nversion_major=1\nversion_minor=44\n"), "{out}");
}

#[test]
fn dump_plugin_null() {
    let out = ok(&["null", "--dump-plugin"]);
    let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_nbdkit")).unwrap();
    assert!(out.starts_with(&format!("path={}\nname=null\nversion=1.44.1\n", binary.display())), "{out}");
    assert!(out.contains("\nthread_model=parallel\n"), "{out}");
    assert!(out.contains("\nmagic_config_key=size\n"), "{out}");
}

#[test]
fn dump_plugin_key_order_matches_debian() {
    let Some(debian) = ["/usr/sbin/nbdkit", "/usr/bin/nbdkit"].into_iter().find(|p| Path::new(p).exists()) else {
        return skip("no Debian nbdkit in /usr/sbin or /usr/bin");
    };
    let theirs = Command::new(debian).args(["null", "--dump-plugin"]).output().expect("run Debian's nbdkit");
    assert!(theirs.status.success(), "{}", stderr(&theirs));
    assert_eq!(keys(&ok(&["null", "--dump-plugin"])), keys(&stdout(&theirs)));
}

#[test]
fn dump_plugin_memory() {
    let o = nbdkit(&["memory", "size=1M", "--dump-plugin"]);
    if stderr(&o).contains("cannot open plugin") {
        return skip("the memory plugin is not built in yet");
    }
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("\nname=memory\n") && out.contains("\nmagic_config_key=size\n"), "{out}");
}

#[test]
fn dump_plugin_with_filter() {
    let out = ok(&["--filter=readonly", "null", "--dump-plugin"]);
    let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_nbdkit")).unwrap();
    assert!(out.ends_with(&format!("\nreadonly_path={}\nreadonly_name=readonly\n", binary.display())), "{out}");
}

#[test]
fn short_and_long_options() {
    assert_eq!(ok(&["--short-options"]).split_whitespace().collect::<Vec<_>>().join(" "),
               "-4 -6 -D -e -f -g -i -n -o -p -P -r -s -t -u -U -v -V");
    let want = "--ipv4-only --ipv6-only --debug --dump-config --dump-plugin --exit-with-parent --export \
                --export-name --exportname --filter --foreground --no-fork --group --help --ip-addr --ipaddr \
                --keepalive --keep-alive --log --mask-handshake --new-style --newstyle --no-mc \
                --no-meta-contexts --no-sr --no-structured-replies --old-style --oldstyle --pid-file \
                --pidfile --print-uri --print-url --port --read-only --readonly --run --selinux-label \
                --show-uri --show-url --single --stdin --swap --threads --timeout --time-out --tls \
                --tls-certificates --tls-psk --tls-verify-peer --unix --user --verbose --version --vsock";
    assert_eq!(ok(&["--long-options"]).lines().collect::<Vec<_>>().join(" "), want);
}

#[test]
fn unknown_plugin_fails_with_nbdkits_message() {
    let o = nbdkit(&["nosuchname"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("nbdkit: error: cannot open plugin \"nosuchname\": "), "{e}");
    for want in ["nbdkit-nosuchname-plugin", "nbdkit-plugin-nosuchname", "nbdkit(1)"] {
        assert!(e.contains(want), "{want} missing: {e}");
    }
    assert!(stdout(&o).is_empty());
}

#[test]
fn bad_option_prints_usage_and_fails() {
    let o = nbdkit(&["--no-such-option", "null"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unrecognized option '--no-such-option'"), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("nbdkit [-4|--ipv4-only]"), "{}", stdout(&o));
}
