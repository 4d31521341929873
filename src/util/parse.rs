//! nbdkit's parsers for command-line values (`nbdkit_parse_size`,
//! `nbdkit_parse_bool`, `nbdkit_parse_int`, `nbdkit_parse_delay`,
//! `nbdkit_parse_probability`), with nbdkit's messages.

use std::time::Duration;

use crate::error::{Error, Result};

/// `nbdkit_parse_size`: decimal with an optional one-letter suffix
/// (b, k, m, g, t, p, e in powers of 1024; s = 512-byte sectors).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.starts_with('-') {
        return Err(Error::invalid(format!("size cannot be negative: {s}")));
    }
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(Error::invalid(format!("could not parse size string ({s})")));
    }
    let n: i64 = t[..digits]
        .parse()
        .map_err(|_| Error::invalid(format!("size exceeds maximum value: {s}")))?;
    let rest = &t[digits..];
    let scale: i64 = match rest.as_bytes() {
        [] | [b'b' | b'B'] => 1,
        [b'k' | b'K'] => 1 << 10,
        [b'm' | b'M'] => 1 << 20,
        [b'g' | b'G'] => 1 << 30,
        [b't' | b'T'] => 1 << 40,
        [b'p' | b'P'] => 1 << 50,
        [b'e' | b'E'] => 1 << 60,
        [b's' | b'S'] => 512,
        _ => return Err(Error::invalid(format!("could not parse size: unknown suffix '{rest}'"))),
    };
    n.checked_mul(scale)
        .map(|v| v as u64)
        .ok_or_else(|| Error::invalid(format!("size exceeds maximum value: {s}")))
}

/// `nbdkit_parse_bool`.
pub fn parse_bool(s: &str) -> Result<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
        _ => Err(Error::invalid(format!("could not decipher boolean ({s})"))),
    }
}

/// strtoll/strtoull with base 0: `0x` hex, leading `0` octal, else decimal;
/// leading whitespace and sign allowed, trailing garbage refused.
fn parse_c_integer(what: &str, s: &str) -> Result<i128> {
    let t = s.trim_start();
    if t.is_empty() {
        return Err(Error::invalid(format!("{what}: empty string where we expected a number")));
    }
    let (neg, t) = match t.as_bytes()[0] {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    let bad = || Error::invalid(format!("{what}: could not parse number: \"{s}\": Invalid argument"));
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let v = i128::from_str_radix(digits, radix)
        .map_err(|_| Error::invalid(format!("{what}: could not parse number: \"{s}\": Numerical result out of range")))?;
    Ok(if neg { -v } else { v })
}

/// `nbdkit_parse_int64_t` and friends: a signed integer in `[min, max]`.
pub fn parse_int(what: &str, s: &str, min: i64, max: i64) -> Result<i64> {
    let v = parse_c_integer(what, s)?;
    if v < i128::from(min) || v > i128::from(max) {
        return Err(Error::invalid(format!("{what}: could not parse number: \"{s}\": Numerical result out of range")));
    }
    Ok(v as i64)
}

/// `nbdkit_parse_uint64_t` and friends: an unsigned integer up to `max`.
pub fn parse_unsigned(what: &str, s: &str, max: u64) -> Result<u64> {
    if s.trim_start().starts_with('-') {
        return Err(Error::invalid(format!("{what}: negative numbers are not allowed")));
    }
    let v = parse_c_integer(what, s)?;
    if v > i128::from(max) {
        return Err(Error::invalid(format!("{what}: could not parse number: \"{s}\": Numerical result out of range")));
    }
    Ok(v as u64)
}

/// `nbdkit_parse_delay`: seconds as a decimal number (`1.5`), or with a
/// unit suffix `s`, `ms`, `us`, `μs` or `ns`.
pub fn parse_delay(what: &str, s: &str) -> Result<Duration> {
    let bad = || Error::invalid(format!("{what}: could not parse delay or sleep: \"{s}\""));
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("μs")) {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = v * scale;
    if !secs.is_finite() || secs < 0.0 || secs > i32::MAX as f64 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `nbdkit_parse_probability`: `N%`, `N:M`, `N/M` or a plain number,
/// which must end up in `[0, 1]`.
pub fn parse_probability(what: &str, s: &str) -> Result<f64> {
    let bad = || Error::invalid(format!("{what}: could not parse '{s}' as a probability"));
    let num = |t: &str| -> Result<f64> {
        let t = t.trim();
        let v: f64 = t.parse().map_err(|_| bad())?;
        if !v.is_finite() || v < 0.0 || t.starts_with('-') {
            return Err(bad());
        }
        Ok(v)
    };
    let v = if let Some(p) = s.strip_suffix('%') {
        num(p)? / 100.0
    } else if let Some((a, b)) = s.split_once(':').or_else(|| s.split_once('/')) {
        let d = num(b)?;
        if d == 0.0 {
            return Err(bad());
        }
        num(a)? / d
    } else {
        num(s)?
    };
    if v > 1.0 {
        return Err(Error::invalid(format!("{what}: rate out of range: '{s}' parsed as {v}")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size(" +2k").unwrap(), 2048);
        assert_eq!(parse_size("4s").unwrap(), 2048);
        assert_eq!(parse_size("1b").unwrap(), 1);
        assert_eq!(parse_size("9223372036854775807").unwrap(), i64::MAX as u64);
        for bad in ["", "1MiB", "1MB", "1.5M", "0x10", "-1", "16E", "M", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bools() {
        assert!(parse_bool("YES").unwrap());
        assert!(!parse_bool("off").unwrap());
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn integers_in_c_bases() {
        assert_eq!(parse_unsigned("x", "0x10", u64::MAX).unwrap(), 16);
        assert_eq!(parse_unsigned("x", "010", u64::MAX).unwrap(), 8);
        assert_eq!(parse_unsigned("x", "0", u64::MAX).unwrap(), 0);
        assert!(parse_unsigned("x", "-1", u64::MAX).is_err());
        assert!(parse_unsigned("x", "12a", u64::MAX).is_err());
        assert!(parse_unsigned("x", "", u64::MAX).is_err());
        assert!(parse_unsigned("x", "256", 255).is_err());
        assert_eq!(parse_int("x", "-5", -10, 10).unwrap(), -5);
    }

    #[test]
    fn delays() {
        assert_eq!(parse_delay("d", "1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_delay("d", "100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_delay("d", "2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_delay("d", "1000ns").unwrap(), Duration::from_micros(1));
        assert_eq!(parse_delay("d", "3us").unwrap(), Duration::from_micros(3));
        for bad in ["", "x", "1x", "-1", "ms"] {
            assert!(parse_delay("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn probabilities() {
        assert_eq!(parse_probability("r", "10%").unwrap(), 0.1);
        assert_eq!(parse_probability("r", "1:10").unwrap(), 0.1);
        assert_eq!(parse_probability("r", "1/4").unwrap(), 0.25);
        assert_eq!(parse_probability("r", "1e-3").unwrap(), 0.001);
        assert!(parse_probability("r", "2").is_err());
        assert!(parse_probability("r", "-0.5").is_err());
        assert!(parse_probability("r", "x").is_err());
    }
}
