//! Plugin and filter names: nbdkit 1.44's short-name rule, and its
//! load-failure message for anything that is not built in (there is no
//! run-time loading: a path always fails).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::backend::registry::{self, FilterEntry, PluginEntry};

/// A short name (`file`, `xz`) names a plugin or filter; anything with
/// one of `/ \ : ; space . , =` or a control byte is a path.
pub(super) fn is_short_name(name: &[u8]) -> bool {
    !name.iter().any(|&b| b"/\\:;., =".contains(&b) || b <= 31 || b == 127)
}

/// Names that get the "which package" hint: `[A-Za-z0-9._-]+`.
fn gets_package_hint(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// nbdkit's `c_string_quote` body.
pub(super) fn c_quote(s: &[u8]) -> String {
    crate::util::log::c_escape(s, true, false)
}

/// The built-in plugin called `name`, or nbdkit's message for stderr.
pub(super) fn plugin(name: &OsStr) -> Result<&'static PluginEntry, String> {
    let found = name.to_str().filter(|n| is_short_name(n.as_bytes())).and_then(registry::plugin);
    found.ok_or_else(|| failure("plugin", name.as_bytes(), registry::plugins().keys().copied()))
}

/// The built-in filter called `name` (`error` is `error-inject`), or
/// nbdkit's message for stderr.
pub(super) fn filter(name: &OsStr) -> Result<&'static FilterEntry, String> {
    let found = name.to_str().filter(|n| is_short_name(n.as_bytes())).and_then(registry::filter);
    found.ok_or_else(|| failure("filter", name.as_bytes(), registry::filters().keys().copied()))
}

/// nbdkit 1.44's `failed_to_load_error`: what failed (C-quoted), why, a
/// package hint for plain short names, and where to read more.
fn failure<'a>(what: &str, name: &[u8], built_in: impl Iterator<Item = &'a str>) -> String {
    let list = built_in.collect::<Vec<_>>().join(", ");
    let why = if is_short_name(name) {
        format!("not built in (built-in {what}s: {list})")
    } else {
        format!("this nbdkit cannot load {what}s from files; every {what} is built in ({list})")
    };
    let mut msg = format!("nbdkit: error: cannot open {what} \"{}\": {}\n", c_quote(name), c_quote(why.as_bytes()));
    if is_short_name(name) && gets_package_hint(name) {
        let n = String::from_utf8_lossy(name);
        msg.push_str(&format!(
            "\nThe {n} {what} is not built into this nbdkit.  Other builds of nbdkit\n\
             ship it as a separate package: nbdkit-{n}-{what} (Fedora, RHEL),\n\
             nbdkit-{what}-{n} (Debian, Ubuntu).\n"
        ));
    }
    msg.push_str("\nUse 'nbdkit --help' or read the nbdkit(1) manual page for documentation.\n");
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn short_names_and_paths() {
        for s in ["file", "null", "plugin@name", "a-b", "x_y"] {
            assert!(is_short_name(s.as_bytes()), "{s}");
        }
        for p in ["./x.so", "/usr/lib/x.so", "a b", "x=y", "bad\r", "a,b", "a;b", "a:b", "a\\b", "x.so", "\x7f"] {
            assert!(!is_short_name(p.as_bytes()), "{p:?}");
        }
    }

    #[test]
    fn built_ins_resolve() {
        assert_eq!(plugin(OsStr::new("null")).unwrap().name, "null");
        assert_eq!(filter(OsStr::new("error")).unwrap().name, "error-inject");
        assert_eq!(filter(OsStr::new("readonly")).unwrap().name, "readonly");
    }

    #[test]
    fn unknown_short_name_gets_the_hint() {
        let m = plugin(OsStr::new("nosuchname")).err().unwrap();
        assert!(m.starts_with("nbdkit: error: cannot open plugin \"nosuchname\": not built in (built-in plugins: "), "{m}");
        assert!(m.contains("nbdkit-nosuchname-plugin") && m.contains("nbdkit-plugin-nosuchname"), "{m}");
        assert!(m.ends_with("\n\nUse 'nbdkit --help' or read the nbdkit(1) manual page for documentation.\n"), "{m}");
        let m = filter(OsStr::new("nosuch")).err().unwrap();
        assert!(m.contains("cannot open filter \"nosuch\"") && m.contains("nbdkit-filter-nosuch"), "{m}");
    }

    #[test]
    fn odd_names_get_no_hint_and_are_quoted() {
        let m = plugin(OsStr::new("plugin@name")).err().unwrap();
        assert!(!m.contains("nbdkit-plugin@name-plugin"), "{m}");
        let m = plugin(OsStr::new("bad\r")).err().unwrap();
        assert!(m.contains("\"bad\\r\""), "{m}");
        assert!(!m.contains("nbdkit-bad"), "{m}");
        // A path, even to something that exists, is not loaded.
        let m = plugin(OsStr::new("./null")).err().unwrap();
        assert!(m.contains("cannot open plugin \"./null\""), "{m}");
        let m = plugin(&OsString::from_vec(b"\xff".to_vec())).err().unwrap();
        assert!(m.contains("\"\\xff\""), "{m}");
    }

    #[test]
    fn c_quoting() {
        assert_eq!(c_quote(b"a\"b\\c\n\x01\xc3\xa9"), "a\\\"b\\\\c\\n\\x01\\xc3\\xa9");
    }
}
