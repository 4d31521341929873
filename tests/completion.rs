//! contrib/bash-completion/nbdkit, driven by bash itself: the completion
//! function runs as bash runs it for <TAB> (COMP_LINE and COMP_POINT set),
//! its answers come from bash's compgen over what the binary under test
//! reports (options, built-in plugins and filters, each layer's keys).

mod common;

use common::*;

/// What completing `line` (the binary's path is prepended) offers.
fn complete(line: &str) -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/bash-completion/nbdkit");
    let full = format!("{} {line}", nbdkit_bin().display());
    let out = std::process::Command::new("bash")
        .args([
            "--norc",
            "-c",
            "source \"$1\" && complete -p nbdkit >/dev/null && COMP_LINE=$2 && COMP_POINT=${#2} && _nbdkit \
             && printf '%s\\n' \"${COMPREPLY[@]}\"",
            "bash",
            script,
            &full,
        ])
        .output()
        .expect("bash");
    assert!(out.status.success(), "{line:?}: {}", String::from_utf8_lossy(&out.stderr));
    let mut v: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().filter(|l| !l.is_empty()).map(String::from).collect();
    v.sort();
    v
}

fn builtin(kind: &str) -> Vec<String> {
    let help = run_ok(nbdkit_bin().to_str().unwrap(), &["--help"]);
    let line = help.lines().find_map(|l| l.strip_prefix(&format!("Built-in {kind}: "))).unwrap().to_string();
    let mut v: Vec<String> = line.split_whitespace().map(String::from).collect();
    v.sort();
    v
}

#[test]
fn plugin_and_filter_names() {
    require!("bash", "--version");
    let plugins = builtin("plugins");
    assert!(plugins.contains(&"memory".to_string()));
    assert_eq!(complete(""), plugins);
    assert_eq!(complete("-f -p 10809 mem"), ["memory"]);
    assert_eq!(complete("-U /tmp/x --filter=readonly nu"), ["null"]);
    let filters = builtin("filters");
    assert_eq!(complete("--filter="), filters);
    assert_eq!(complete("--filter "), filters);
    assert_eq!(complete("--filter=read"), ["readonly"]);
    let mut both = [plugins, filters].concat();
    both.sort();
    assert_eq!(complete("--man "), both);
}

#[test]
fn options() {
    require!("bash", "--version");
    assert_eq!(complete("--read"), ["--read-only", "--readonly"]);
    assert_eq!(complete("--tls="), ["off", "on", "require"]);
    assert!(complete("-").contains(&"--exit-with-parent".to_string()));
    assert!(complete("-").contains(&"-U".to_string()));
    assert_eq!(complete("--ma"), ["--man", "--mask-handshake"]);
}

#[test]
fn each_layers_keys() {
    require!("bash", "--version");
    assert_eq!(complete("memory "), ["allocator=", "size="]);
    assert_eq!(complete("memory si"), ["size="]);
    assert_eq!(complete("-r file fa"), ["fadvise="]);
    // Filters' keys come with the plugin's, whatever the option spelling.
    let keys = complete("--filter delay --filter=readonly null ");
    for k in ["rdelay=", "delay-write=", "readonly-file=", "size="] {
        assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
    }
    assert!(!keys.contains(&"allocator=".to_string()));
    // Every registered plugin offers the keys its --help declares.
    for p in builtin("plugins") {
        let help = run_ok(nbdkit_bin().to_str().unwrap(), &[&p, "--help"]);
        let offered = complete(&format!("{p} "));
        let block = help.split(&format!("plugin: {p}")).nth(1).unwrap();
        for line in block.lines().filter(|l| !l.starts_with(char::is_whitespace)) {
            let Some(w) = line.split_whitespace().next() else { continue };
            let Some((k, _)) = w.split_once('=') else { continue };
            for k in k.trim_matches(|c| c == '[' || c == ']').split('|') {
                assert!(offered.contains(&format!("{k}=")), "{p}: {k}= not offered: {offered:?}");
            }
        }
    }
}
