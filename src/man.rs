//! Manual pages compiled into the binary (`nbdkit --man [NAME]`) and the
//! rules that tie them to what each plugin and filter accepts.
//!
//! The sources are docs/man/*.md, collected by build.rs: `nbdkit.md` for
//! the server, `nbdkit-NAME-plugin.md` and `nbdkit-NAME-filter.md` for the
//! layers (NAME as typed on the command line, so the error filter's page
//! is `nbdkit-error-filter`). scripts/man renders the same files to roff.
//!
//! How a layer declares its keys: the `help` text of its
//! `PluginEntry`/`FilterEntry` (nbdkit's `config_help`). Each line that
//! starts in column 0 declares the keys of its first word: the text
//! before `=`, without `[ ]`, split on `|` (`[file=]<FILENAME>` declares
//! `file`, `data|raw|base64=...` three keys), or a comma-separated list of
//! `prefix*` words (`error-pread*, error-pwrite*`). Indented lines are
//! continuations. A page documents a key with a `### KEY=VALUE` heading
//! under `## PARAMETERS`, the key read by the same rule. The test below
//! checks, for every registered layer, that both sets are equal and that
//! the layer's `config` takes every documented key.

use std::io::{self, Write};

use crate::backend::registry;

mod pages {
    include!(concat!(env!("OUT_DIR"), "/man_pages.rs"));
}

/// The TLS library linked in (from Cargo.lock at build time).
pub const TLS_LIBRARY: &str = env!("NBDKIT_TLS_LIBRARY");
/// The target triple the binary was built for.
pub const BUILD_TARGET: &str = env!("NBDKIT_BUILD_TARGET");
/// `debug` or `release`.
pub const BUILD_PROFILE: &str = env!("NBDKIT_BUILD_PROFILE");

/// Every embedded page: (name, markdown source), sorted by name.
pub fn all_pages() -> &'static [(&'static str, &'static str)] {
    pages::PAGES
}

fn by_name(name: &str) -> Option<&'static str> {
    pages::PAGES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The page name for what the user typed: nothing or `nbdkit` is the
/// server's page, a registered plugin or filter is its page, and a full
/// page name (`nbdkit-memory-plugin`) is itself. Layers that are not
/// registered in this binary have no page, even if one was embedded.
pub fn page_name(what: Option<&str>) -> Option<String> {
    let Some(what) = what else { return Some("nbdkit".into()) };
    if what == "nbdkit" {
        return Some("nbdkit".into());
    }
    let registered_plugin = |n: &str| registry::plugin(n).is_some();
    let registered_filter = |n: &str| registry::filters().contains_key(n);
    if registered_plugin(what) {
        return Some(format!("nbdkit-{what}-plugin"));
    }
    if let Some(f) = registry::filter(what) {
        return Some(format!("nbdkit-{}-filter", f.alias.unwrap_or(f.name)));
    }
    let stem = what.strip_prefix("nbdkit-")?;
    if let Some(p) = stem.strip_suffix("-plugin") {
        return registered_plugin(p).then(|| what.to_string());
    }
    if let Some(f) = stem.strip_suffix("-filter") {
        return registered_filter(f).then(|| what.to_string());
    }
    None
}

/// The markdown source of a page, by what the user typed (see [`page_name`]).
pub fn page(what: Option<&str>) -> Option<&'static str> {
    by_name(&page_name(what)?)
}

/// `nbdkit --man [NAME]`: prints the page, or the list of pages and exit
/// code 1 when there is none. Returns the exit code.
pub fn print(what: Option<&str>, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match page(what) {
        Some(text) => {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            0
        }
        None => {
            let _ = writeln!(err, "nbdkit: no manual page for \"{}\"", what.unwrap_or_default());
            let mut names = vec!["nbdkit".to_string()];
            names.extend(registry::plugins().keys().map(|p| p.to_string()));
            names.extend(registry::filters().keys().map(|f| f.to_string()));
            let _ = writeln!(err, "Manual pages: {}", names.join(" "));
            1
        }
    }
}

/// Handles `nbdkit --man [NAME]` when it is the whole command line's
/// start; `None` lets the ordinary parser run. (Not in getopt's table, so
/// abbreviations such as `--ma` keep meaning `--mask-handshake`.)
pub fn from_args(args: &[std::ffi::OsString]) -> Option<i32> {
    if args.get(1).map(|a| a.as_os_str()) != Some("--man".as_ref()) {
        return None;
    }
    let (stdout, stderr) = (io::stdout(), io::stderr());
    if args.len() > 3 {
        let _ = writeln!(stderr.lock(), "nbdkit: usage: nbdkit --man [PLUGIN|FILTER]");
        return Some(1);
    }
    let what = args.get(2).map(|a| a.to_string_lossy().into_owned());
    Some(print(what.as_deref(), &mut stdout.lock(), &mut stderr.lock()))
}

/// The keys a heading or help word declares (see the module docs).
fn word_keys(word: &str) -> Vec<String> {
    if let Some((k, _)) = word.split_once('=') {
        let k = k.trim_matches(|c| c == '[' || c == ']' || c == '`');
        return k.split('|').filter(|s| is_key(s)).map(str::to_string).collect();
    }
    Vec::new()
}

fn is_key(s: &str) -> bool {
    let mut cs = s.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
}

/// The keys a layer's help text declares.
pub fn help_keys(help: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for line in help.lines() {
        if line.starts_with(char::is_whitespace) || line.is_empty() {
            continue;
        }
        if line.contains("*,") || line.split_whitespace().next().is_some_and(|w| w.ends_with('*')) {
            let list = line.split("  ").next().unwrap_or_default();
            keys.extend(list.split(',').map(str::trim).filter(|w| is_key(w)).map(str::to_string));
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        keys.extend(word_keys(first));
    }
    dedup(keys)
}

/// The keys a page documents: `### ` headings under `## PARAMETERS`.
pub fn documented_keys(md: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut in_params = false;
    for line in md.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            in_params = h.trim() == "PARAMETERS";
        } else if let (true, Some(h)) = (in_params, line.strip_prefix("### ")) {
            for part in h.split(", ") {
                let part = part.trim().trim_matches('`');
                if part.ends_with('*') && is_key(part) {
                    keys.push(part.to_string());
                } else {
                    keys.extend(word_keys(part));
                }
            }
        }
    }
    dedup(keys)
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Param;

    #[test]
    fn help_key_rule() {
        assert_eq!(help_keys("[file=]<FILENAME>     The file.\ndir=<D>  x\n  cont=inued"), ["dir", "file"]);
        assert_eq!(help_keys("data|raw|base64=...     Specify\nsize=<SIZE>  S"), ["base64", "data", "raw", "size"]);
        assert_eq!(
            help_keys("error=EPERM|EIO\n\x20  The error.\nerror-pread*, error-pwrite*\n\x20   Apply"),
            ["error", "error-pread*", "error-pwrite*"]
        );
        assert_eq!(help_keys("script=<F>  x\n[other arguments may be used]"), ["script"]);
        assert_eq!(help_keys("get_size=' SCRIPT '\npread=' SCRIPT '\n[etc]"), ["get_size", "pread"]);
    }

    #[test]
    fn documented_key_rule() {
        let md = "# X\n## DESCRIPTION\n### notakey=1\n## PARAMETERS\n### [size=]SIZE\n\ntext\n\n\
                  ### data=DATA, raw=BYTES\n### error-pread*, error-pwrite*\n## EXAMPLES\n### no=1\n";
        assert_eq!(documented_keys(md), ["data", "error-pread*", "error-pwrite*", "raw", "size"]);
    }

    /// A documented key is accepted if `config` does not hand it on.
    fn accepted(r: crate::error::Result<Param>) -> bool {
        match r {
            Ok(p) => p == Param::Used,
            Err(e) => !e.message().contains("unknown parameter"),
        }
    }

    fn probe_key(key: &str) -> String {
        key.trim_end_matches('*').to_string()
    }

    #[test]
    fn every_registered_layer_has_a_page_matching_its_keys() {
        let mut problems = Vec::new();
        assert!(page(None).is_some(), "docs/man/nbdkit.md is missing");
        // Layers only the unit tests register are named test-*.
        for (name, e) in registry::plugins().iter().filter(|(n, _)| !n.starts_with("test-")) {
            let Some(md) = page(Some(name)) else {
                problems.push(format!("plugin {name}: no docs/man/nbdkit-{name}-plugin.md"));
                continue;
            };
            let (declared, documented) = (help_keys(e.help), documented_keys(md));
            if declared != documented {
                problems.push(format!("plugin {name}: help declares {declared:?}, page documents {documented:?}"));
            }
            for k in &documented {
                // sh takes its script first; then keys go to the script.
                if *name == "sh" && k != "script" {
                    continue;
                }
                if !accepted((e.new)().config(&probe_key(k), "1")) {
                    problems.push(format!("plugin {name}: documented key {k} is not accepted"));
                }
            }
        }
        for (cmd, e) in registry::filters().iter().filter(|(n, _)| !n.starts_with("test-")) {
            let Some(md) = page(Some(cmd)) else {
                problems.push(format!("filter {cmd}: no docs/man/nbdkit-{cmd}-filter.md"));
                continue;
            };
            let (declared, documented) = (help_keys(e.help), documented_keys(md));
            if declared != documented {
                problems.push(format!("filter {cmd}: help declares {declared:?}, page documents {documented:?}"));
            }
            for k in &documented {
                if !accepted((e.new)().config(&probe_key(k), "1")) {
                    problems.push(format!("filter {cmd}: documented key {k} is not accepted"));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn page_names() {
        assert_eq!(page_name(None).as_deref(), Some("nbdkit"));
        assert_eq!(page_name(Some("memory")).as_deref(), Some("nbdkit-memory-plugin"));
        assert_eq!(page_name(Some("error")).as_deref(), Some("nbdkit-error-filter"));
        assert_eq!(page_name(Some("error-inject")).as_deref(), Some("nbdkit-error-filter"));
        assert_eq!(page_name(Some("nbdkit-null-plugin")).as_deref(), Some("nbdkit-null-plugin"));
        assert_eq!(page_name(Some("nbdkit-nosuch-plugin")), None);
        assert_eq!(page_name(Some("nosuch")), None);
    }
}
