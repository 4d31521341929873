//! The plugin's parameters: `key=value` versus bare values, the magic
//! config key, and the rule that lets a shebang script be the first bare
//! argument (`#!/usr/sbin/nbdkit sh` runs `nbdkit sh /path/script …`).

/// nbdkit's `is_config_key`: an ASCII letter, then letters, digits, `.`,
/// `_` or `-`. So `./x=y`, `/a=b`, `=x` and `1=2` are bare values.
pub(super) fn is_config_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `key=value` split at the first `=`, if the text before it is a key.
pub(super) fn split_key_value(arg: &str) -> Option<(&str, &str)> {
    arg.split_once('=').filter(|(k, _)| is_config_key(k))
}

/// Turns the parameters into (key, value) pairs, in order. With a magic
/// key every bare value is given to it; without one only a bare *first*
/// parameter becomes `script=…` and any other bare value is an error
/// (nbdkit's message, for stderr).
pub(super) fn resolve(args: &[String], magic: Option<&str>) -> Result<Vec<(String, String)>, String> {
    args.iter()
        .enumerate()
        .map(|(i, arg)| match (split_key_value(arg), magic) {
            (Some((k, v)), _) => Ok((k.to_string(), v.to_string())),
            (None, Some(key)) => Ok((key.to_string(), arg.clone())),
            (None, None) if i == 0 => Ok(("script".to_string(), arg.clone())),
            (None, None) => Err(format!("nbdkit: expecting key=value on the command line but got: {arg}\n")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn config_keys() {
        for k in ["a", "size", "A.b_c-d9", "error-pread-rate"] {
            assert!(is_config_key(k), "{k}");
        }
        for k in ["", "1", "1a", ".x", "_x", "-x", "a b", "a/b", "a:b", "é"] {
            assert!(!is_config_key(k), "{k}");
        }
    }

    #[test]
    fn key_value_or_bare() {
        assert_eq!(split_key_value("size=1M"), Some(("size", "1M")));
        assert_eq!(split_key_value("k="), Some(("k", "")));
        assert_eq!(split_key_value("k=a=b"), Some(("k", "a=b")));
        for bare in ["./x=y", "/a=b", "=x", "1=2", "disk.img", "a b=c"] {
            assert_eq!(split_key_value(bare), None, "{bare}");
        }
    }

    #[test]
    fn every_bare_value_goes_to_the_magic_key() {
        let got = resolve(&strings(&["1M", "x=y", "./a=b", "=z"]), Some("size")).unwrap();
        assert_eq!(got, pairs(&[("size", "1M"), ("x", "y"), ("size", "./a=b"), ("size", "=z")]));
    }

    #[test]
    fn without_magic_key_only_a_first_bare_value_is_the_script() {
        assert_eq!(
            resolve(&strings(&["/path/script", "a=1"]), None).unwrap(),
            pairs(&[("script", "/path/script"), ("a", "1")])
        );
        assert_eq!(
            resolve(&strings(&["script", "b"]), None).unwrap_err(),
            "nbdkit: expecting key=value on the command line but got: b\n"
        );
        // Index 0 of all parameters, not the first bare one.
        assert!(resolve(&strings(&["a=1", "script"]), None).is_err());
        assert_eq!(resolve(&[], None).unwrap(), []);
    }
}
