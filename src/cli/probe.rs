//! What the probing options print, in nbdkit 1.44's formats: `--help`,
//! `--version`, `--dump-config`, `--dump-plugin`, `--short-options` and
//! `--long-options`. Scripts and test suites parse these, so every key,
//! order and blank line matters.

use std::io::{self, Write};

use super::options::{self, Opt};
use crate::backend::chain::Chain;
use crate::backend::registry::{FilterEntry, PluginEntry};

/// The version we claim to be (the crate's version is nbdkit's).
pub(super) const VERSION: &str = env!("CARGO_PKG_VERSION");

const SYNOPSIS: &str = include_str!("synopsis.txt");

/// nbdkit(1)'s DESCRIPTION, which 1.44's usage prints after the synopsis.
const DESCRIPTION: &str = "\
Network Block Device (NBD) is a network protocol for accessing block
devices over the network.  Block devices are hard disks and things that
behave like hard disks such as disk images and virtual machines.

nbdkit is both a toolkit for creating NBD servers from \"unconventional\"
sources, and the name of an NBD server.  nbdkit ships with many plugins
for performing common tasks like serving local files.
";

/// Debian's directories (what its nbdkit prints), for scripts that look
/// for plugins or man pages there.
const BINDIR: &str = "/usr/bin";
const SBINDIR: &str = "/usr/bin";
const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";
const PLUGINDIR: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins";
const FILTERDIR: &str = "/usr/lib/x86_64-linux-gnu/nbdkit/filters";
const MANDIR: &str = "/usr/share/man";
const SYSCONFDIR: &str = "/etc";

/// `usage ()`: the synopsis, the description, the pointer to the manual.
/// One binary has no plugin directory: usage also lists what is built in.
pub(super) fn usage(out: &mut dyn Write) -> io::Result<()> {
    let plugins: Vec<&str> = crate::backend::registry::plugins().keys().copied().collect();
    let filters: Vec<&str> = crate::backend::registry::filters().keys().copied().collect();
    write!(
        out,
        "{SYNOPSIS}\n{DESCRIPTION}\nBuilt-in plugins: {}\nBuilt-in filters: {}\n\n\
         Please read the nbdkit(1) manual page for full usage.\n",
        plugins.join(" "),
        filters.join(" ")
    )
}

/// `--help` with a plugin: usage, then each backend from the outermost
/// filter to the plugin. Nothing has been configured.
pub(super) fn help(out: &mut dyn Write, plugin: &PluginEntry, filters: &[&FilterEntry]) -> io::Result<()> {
    usage(out)?;
    for f in filters {
        backend_usage(out, "filter", f.name, f.longname, f.description, f.help)?;
    }
    backend_usage(out, "plugin", plugin.name, plugin.longname, plugin.description, plugin.help)
}

/// `plugin_usage` / `filter_usage`; `(built in)` stands where nbdkit
/// prints the `.so` file name.
fn backend_usage(
    out: &mut dyn Write,
    kind: &str,
    name: &str,
    longname: &str,
    description: &str,
    help: &str,
) -> io::Result<()> {
    write!(out, "\n{kind}: {name}")?;
    if !longname.is_empty() {
        write!(out, " ({longname})")?;
    }
    writeln!(out, "\n(built in)")?;
    for text in [description, help] {
        if !text.is_empty() {
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

/// `-V`: nbdkit's version line.
pub(super) fn version(out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "nbdkit {VERSION}")
}

/// `-V` alone: nbdkit's version line, then what is built in (one
/// `key: values` line each; `--dump-config` stays the parsable form).
pub(super) fn version_details(out: &mut dyn Write) -> io::Result<()> {
    version(out)?;
    let plugins: Vec<&str> = crate::backend::registry::plugins().keys().copied().collect();
    let filters: Vec<&str> = crate::backend::registry::filters().keys().copied().collect();
    writeln!(out, "plugins: {}", plugins.join(" "))?;
    writeln!(out, "filters: {}", filters.join(" "))?;
    let tls = config_keys().into_iter().any(|(k, v)| k == "tls" && v == "yes");
    let lib = crate::man::TLS_LIBRARY;
    match (tls, lib) {
        (true, _) => writeln!(out, "tls: {lib}")?,
        (false, "none") => writeln!(out, "tls: none")?,
        (false, _) => writeln!(out, "tls: none ({lib} linked for clients only)")?,
    }
    let mut features = vec![crate::man::BUILD_TARGET, crate::man::BUILD_PROFILE];
    features.push(if cfg!(target_feature = "crt-static") { "static" } else { "dynamic" });
    features.extend(["socket-activation", "exit-with-parent", "vsock", "manuals"]);
    writeln!(out, "features: {}", features.join(" "))
}

/// `-V` with a plugin: the version line, then `NAME VERSION` for each
/// backend from the outermost filter to the plugin. Built-in plugins and
/// filters carry the server's version, as nbdkit's in-tree ones do.
pub(super) fn versions(out: &mut dyn Write, plugin: &PluginEntry, filters: &[&FilterEntry]) -> io::Result<()> {
    version(out)?;
    for f in filters {
        writeln!(out, "{} {VERSION}", f.name)?;
    }
    writeln!(out, "{} {VERSION}", plugin.name)
}

/// The real path of this binary (`binary=` and `--dump-plugin`'s `path=`).
fn binary() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(std::fs::canonicalize(&exe).unwrap_or(exe).display().to_string())
}

/// `--dump-config`'s keys and values, in nbdkit 1.44's order.
pub(super) fn config_keys() -> Vec<(&'static str, String)> {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let (major, minor) = {
        let mut parts = VERSION.split('.');
        (parts.next().unwrap_or("1").to_string(), parts.next().unwrap_or("0").to_string())
    };
    let mut keys = Vec::new();
    if let Some(b) = binary() {
        keys.push(("binary", b));
    }
    keys.extend([
        ("bindir", BINDIR.to_string()),
        ("exit_with_parent", yes_no(cfg!(target_os = "linux"))),
        ("filterdir", FILTERDIR.to_string()),
        ("host_cpu", std::env::consts::ARCH.to_string()),
        ("host_os", if cfg!(target_os = "linux") { "linux-gnu" } else { std::env::consts::OS }.to_string()),
        ("libdir", LIBDIR.to_string()),
        ("mandir", MANDIR.to_string()),
        ("max_api_version", "2".to_string()),
        ("name", "nbdkit".to_string()),
        ("plugindir", PLUGINDIR.to_string()),
        ("root_tls_certificates_dir", format!("{SYSCONFDIR}/pki/nbdkit")),
        ("run_default_socket", "Unix".to_string()),
        ("sbindir", SBINDIR.to_string()),
        ("selinux", yes_no(true)),
        ("soext", "so".to_string()),
        ("sysconfdir", SYSCONFDIR.to_string()),
        ("timeout_option", yes_no(true)),
        ("tls", yes_no(true)),
        ("version", VERSION.to_string()),
        ("version_major", major),
        ("version_minor", minor),
        ("vsock_option", yes_no(true)),
        ("zstd", yes_no(false)),
    ]);
    keys
}

/// `--dump-config`.
pub(super) fn dump_config(out: &mut dyn Write) -> io::Result<()> {
    for (k, v) in config_keys() {
        writeln!(out, "{k}={v}")?;
    }
    Ok(())
}

/// `--dump-plugin`, after `config` (not `config_complete`) of every
/// parameter: the plugin's fields, its own lines, then each filter from
/// the innermost out.
pub(super) fn dump_plugin(out: &mut dyn Write, chain: &Chain) -> io::Result<()> {
    let p = chain.plugin_entry;
    let path = binary().unwrap_or_default();
    writeln!(out, "path={path}")?;
    writeln!(out, "name={}", p.name)?;
    writeln!(out, "version={VERSION}")?;
    writeln!(out, "api_version={}", p.api_version)?;
    // sizeof (struct nbdkit_plugin) of nbdkit 1.44 on 64-bit hosts.
    writeln!(out, "struct_size=384")?;
    writeln!(out, "max_thread_model={}", p.max_thread_model.name())?;
    writeln!(out, "thread_model={}", chain.thread_model().name())?;
    writeln!(out, "errno_is_preserved={}", u8::from(p.errno_is_preserved))?;
    if let Some(k) = p.magic_key {
        writeln!(out, "magic_config_key={k}")?;
    }
    for h in p.has {
        writeln!(out, "has_{h}=1")?;
    }
    for line in chain.dump_plugin() {
        writeln!(out, "{line}")?;
    }
    for f in chain.filter_entries.iter().rev() {
        writeln!(out, "{}_path={path}", f.name)?;
        writeln!(out, "{}_name={}", f.name, f.name)?;
    }
    Ok(())
}

/// `--short-options`: each letter of getopt's string.
pub(super) fn short_options(out: &mut dyn Write) -> io::Result<()> {
    for c in options::SHORT_OPTIONS.chars().filter(|&c| c != ':') {
        writeln!(out, "-{c}")?;
    }
    Ok(())
}

/// `--long-options`: the table, without the two hidden options.
pub(super) fn long_options(out: &mut dyn Write) -> io::Result<()> {
    let hidden = |o: Opt| matches!(o, Opt::LongOptions | Opt::ShortOptions);
    for (name, _) in options::LONG_OPTIONS.iter().filter(|(_, o)| !hidden(*o)) {
        writeln!(out, "--{name}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut v = Vec::new();
        f(&mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn dump_config_key_order() {
        let keys: Vec<_> = config_keys().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "binary", "bindir", "exit_with_parent", "filterdir", "host_cpu", "host_os", "libdir",
                "mandir", "max_api_version", "name", "plugindir", "root_tls_certificates_dir",
                "run_default_socket", "sbindir", "selinux", "soext", "sysconfdir", "timeout_option",
                "tls", "version", "version_major", "version_minor", "vsock_option", "zstd",
            ]
        );
        let t = text(dump_config);
        assert!(t.contains("\nversion=1.44.1\nversion_major=1\nversion_minor=44\n"), "{t}");
        assert!(t.contains("\ntls=yes\n") && t.contains("\nname=nbdkit\n"), "{t}");
    }

    #[test]
    fn long_options_in_nbdkit_order() {
        let want = "--ipv4-only --ipv6-only --debug --dump-config --dump-plugin --exit-with-parent --export \
                    --export-name --exportname --filter --foreground --no-fork --group --help --ip-addr --ipaddr \
                    --keepalive --keep-alive --log --mask-handshake --new-style --newstyle --no-mc \
                    --no-meta-contexts --no-sr --no-structured-replies --old-style --oldstyle --pid-file \
                    --pidfile --print-uri --print-url --port --read-only --readonly --run --selinux-label \
                    --show-uri --show-url --single --stdin --swap --threads --timeout --time-out --tls \
                    --tls-certificates --tls-psk --tls-verify-peer --unix --user --verbose --version --vsock";
        assert_eq!(text(long_options).split_whitespace().collect::<Vec<_>>().join(" "), want);
    }

    #[test]
    fn short_options_in_getopt_order() {
        assert_eq!(
            text(short_options).split_whitespace().collect::<Vec<_>>().join(" "),
            "-4 -6 -D -e -f -g -i -n -o -p -P -r -s -t -u -U -v -V"
        );
    }

    #[test]
    fn usage_is_synopsis_description_and_pointer() {
        let t = text(usage);
        assert!(t.starts_with("nbdkit [-4|--ipv4-only] [-6|--ipv6-only]\n"));
        assert!(t.contains("nbdkit [-V|--version]\n\nNetwork Block Device (NBD)"));
        assert!(t.contains("local files.\n\nBuilt-in plugins: "));
        assert!(t.contains("memory") && t.contains("readonly"));
        assert!(t.ends_with("\n\nPlease read the nbdkit(1) manual page for full usage.\n"));
        // test-synopsis.sh: every long option but the aliases is in the synopsis.
        let aliases = ["export", "export-name", "no-fork", "ip-addr", "keep-alive", "new-style", "old-style",
                       "pid-file", "print-url", "show-uri", "show-url", "read-only", "stdin", "time-out"];
        for (name, _) in options::LONG_OPTIONS {
            if !aliases.contains(name) && !name.ends_with("-options") {
                assert!(SYNOPSIS.contains(&format!("--{name}")), "--{name} missing from synopsis");
            }
        }
    }
}
