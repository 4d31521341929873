//! The manuals: `nbdkit --man NAME` prints the page of every plugin and
//! filter built into this binary (the same text as docs/man), and
//! scripts/man renders every page to roff that `man --warnings -l`
//! formats without a single warning.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn builtin(kind: &str) -> Vec<String> {
    let help = run_ok(nbdkit_bin().to_str().unwrap(), &["--help"]);
    let line = help.lines().find_map(|l| l.strip_prefix(&format!("Built-in {kind}: "))).unwrap().to_string();
    line.split_whitespace().map(String::from).collect()
}

fn source(page: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/man").join(format!("{page}.md"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
}

#[test]
fn man_option_prints_every_builtin_page() {
    let bin = nbdkit_bin();
    let bin = bin.to_str().unwrap();
    assert_eq!(run_ok(bin, &["--man"]), source("nbdkit"));
    for p in builtin("plugins") {
        assert_eq!(run_ok(bin, &["--man", &p]), source(&format!("nbdkit-{p}-plugin")), "{p}");
    }
    for f in builtin("filters") {
        assert_eq!(run_ok(bin, &["--man", &f]), source(&format!("nbdkit-{f}-filter")), "{f}");
    }
    let out = Command::new(bin).args(["--man", "nosuch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("nbdkit: no manual page for \"nosuch\"\n"));
    // Not in getopt's table: --ma still abbreviates --mask-handshake.
    let out = Command::new(bin).args(["--ma=0", "--dump-plugin", "null"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn rendered_pages_format_without_warnings() {
    require!("man", "--version");
    require!("python3", "--version");
    let d = TempDir::new("manpages");
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/man")).arg(&d.0).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Progress on stderr, one line per page.
    let progress = String::from_utf8_lossy(&out.stderr);
    let sources = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/man")).unwrap().count();
    assert!(progress.contains(&format!("[{sources}/{sources}] ")), "{progress}");
    let mut pages = 0;
    for e in std::fs::read_dir(d.path("man1")).unwrap() {
        let path = e.unwrap().path();
        pages += 1;
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        assert!(out.status.success(), "{path:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{path:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("NAME") && text.contains("SYNOPSIS") && text.contains("SEE ALSO"), "{path:?}");
    }
    assert_eq!(pages, sources);
    // A broken page is caught: roff warns about an unknown request.
    std::fs::write(d.path("bad.1"), ".TH BAD 1\n.SH NAME\n.Zz bad\n").unwrap();
    let out = Command::new("man").args(["--warnings", "-l"]).arg(d.path("bad.1")).env("MANWIDTH", "80").output().unwrap();
    assert!(!out.stderr.is_empty(), "man --warnings does not report anything here");
}
