//! The data language's parser: text to [`Expr`], with nbdkit's messages.
//!
//! Recursive descent over groups and `$VAR` values, bounded by
//! [`MAX_DEPTH`] so hostile nesting ends in an error, not a stack overflow.

use super::ast::{Expr, Move};
use crate::error::{Error, Result};
use crate::util::parse::{parse_size, parse_unsigned};

/// Deepest nesting of groups, `$VAR` values and scripts' parentheses
/// accepted.
pub const MAX_DEPTH: usize = 1000;

/// Looks up `$VAR`: extra parameters first, then the environment.
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parses a whole data string into its top-level list.
pub fn parse(src: &str, vars: Vars<'_>) -> Result<Expr> {
    let mut p = Parser { s: src.as_bytes(), pos: 0, vars, depth: 0 };
    p.list(false).map(Expr::List)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    vars: Vars<'a>,
    depth: usize,
}

fn invalid(msg: impl Into<String>) -> Error {
    let msg: String = msg.into();
    Error::invalid(msg)
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn parse_error(&self, at: usize) -> Error {
        invalid(format!("data parameter: parsing error at offset {at}"))
    }

    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(invalid(format!("data parameter: nested too deeply (more than {MAX_DEPTH} levels)")));
        }
        Ok(())
    }

    /// Parses expressions up to the end (top level) or to the `)` that
    /// closes a group (`nested`), which it consumes.
    fn list(&mut self, nested: bool) -> Result<Vec<Expr>> {
        let mut v: Vec<Expr> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                if nested {
                    return Err(invalid("unmatched '(' in data string"));
                }
                return Ok(v);
            };
            let start = self.pos;
            match c {
                c if is_space(c) => self.pos += 1,
                b'#' => {
                    while let Some(c) = self.peek() {
                        self.pos += 1;
                        if c == b'\n' {
                            break;
                        }
                    }
                }
                b'(' => {
                    self.pos += 1;
                    self.enter()?;
                    let inner = self.list(true)?;
                    self.depth -= 1;
                    v.push(Expr::List(inner));
                }
                b')' => {
                    if !nested {
                        return Err(invalid("unmatched ')' in data string"));
                    }
                    self.pos += 1;
                    return Ok(v);
                }
                b'0'..=b'9' => {
                    let n = self.c_number()?;
                    if n > 255 {
                        return Err(invalid("data parameter BYTE must be in the range 0..255"));
                    }
                    v.push(Expr::Byte(n as u8));
                }
                b'l' | b'b' => v.push(self.word()?),
                b'"' => v.push(Expr::Str(self.string()?)),
                b'@' => v.push(self.offset()?),
                b'<' => v.push(self.file_or_script()?),
                b'*' => {
                    self.pos += 1;
                    let prev = match v.pop() {
                        None => return Err(invalid("*N must follow an expression")),
                        Some(Expr::Offset(..)) => return Err(invalid("*N cannot be applied to this type of expression")),
                        Some(e) => e,
                    };
                    self.skip_space();
                    match self.peek() {
                        Some(b'0'..=b'9') => {}
                        Some(b'-') => return Err(invalid("data parameter @OFFSET must not be negative")),
                        _ => return Err(invalid("*N not numeric")),
                    }
                    let n = self.c_number()?;
                    v.push(Expr::Repeat(Box::new(prev), n));
                }
                b'[' => {
                    self.pos += 1;
                    let prev = match v.pop() {
                        None => return Err(invalid("[N:M] must follow an expression")),
                        Some(Expr::Offset(..)) => return Err(invalid("[N:M] cannot be applied to this type of expression")),
                        Some(e) => e,
                    };
                    let (n, m) = self.slice()?;
                    v.push(Expr::Slice(Box::new(prev), n, m));
                }
                b'-' => {
                    if self.s.get(self.pos + 1) != Some(&b'>') {
                        return Err(self.parse_error(self.pos + 1));
                    }
                    self.pos += 2;
                    let arrow_end = self.pos;
                    let prev = match v.pop() {
                        None => return Err(invalid("-> must follow an expression")),
                        Some(Expr::Offset(..)) => return Err(invalid("-> cannot be applied to this type of expression")),
                        Some(e) => e,
                    };
                    self.skip_space();
                    if self.peek() != Some(b'\\') {
                        return Err(self.parse_error(arrow_end));
                    }
                    self.pos += 1;
                    let name = self.name().map_err(|_| self.parse_error(arrow_end))?;
                    v.push(Expr::Assign(name, Box::new(prev)));
                }
                b'\\' => {
                    self.pos += 1;
                    v.push(Expr::Name(self.name()?));
                }
                b'$' => {
                    self.pos += 1;
                    let len = self.s[self.pos..]
                        .iter()
                        .enumerate()
                        .take_while(|&(i, &c)| c == b'_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
                        .count();
                    if len == 0 {
                        return Err(self.parse_error(self.pos));
                    }
                    let var = String::from_utf8_lossy(&self.s[self.pos..self.pos + len]).into_owned();
                    self.pos += len;
                    let value = (self.vars)(&var).ok_or_else(|| invalid(format!("${var}: variable not found")))?;
                    self.enter()?;
                    let mut sub = Parser { s: value.as_bytes(), pos: 0, vars: self.vars, depth: self.depth };
                    let inner = sub.list(false)?;
                    self.depth -= 1;
                    v.push(Expr::List(inner));
                }
                _ => return Err(self.parse_error(start)),
            }
        }
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    /// A C `%i` number (`0x` hex, leading `0` octal, else decimal) at the
    /// cursor, as an unsigned 64-bit value; stops at the first character
    /// that is not a digit of its base.
    fn c_number(&mut self) -> Result<u64> {
        let rest = &self.s[self.pos..];
        let (radix, skip) = if rest.len() > 2 && rest[0] == b'0' && matches!(rest[1], b'x' | b'X') && rest[2].is_ascii_hexdigit() {
            (16, 2)
        } else if rest.len() > 1 && rest[0] == b'0' {
            (8, 1)
        } else {
            (10, 0)
        };
        let digits = rest[skip..].iter().take_while(|c| (**c as char).is_digit(radix)).count();
        let text = &rest[skip..skip + digits];
        self.pos += skip + digits;
        if digits == 0 {
            return Ok(0); // a lone "0"
        }
        let text = std::str::from_utf8(text).unwrap_or_default();
        u64::from_str_radix(text, radix).map_err(|_| {
            invalid(format!("data: could not parse number: \"{}\": Numerical result out of range",
                            String::from_utf8_lossy(&rest[..skip + digits])))
        })
    }

    /// The token from the cursor to the next whitespace.
    fn token(&mut self) -> &[u8] {
        let start = self.pos;
        while self.peek().is_some_and(|c| !is_space(c)) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    /// `le16:W` … `be64:W`.
    fn word(&mut self) -> Result<Expr> {
        let tok = self.token().to_vec();
        let end = self.pos;
        let (le, bits, w) = match tok.get(..5) {
            Some(p) if matches!(&p[..2], b"le" | b"be") && p[4] == b':' => {
                let bits = match &p[2..4] {
                    b"16" => 16,
                    b"32" => 32,
                    b"64" => 64,
                    _ => 0,
                };
                (p[0] == b'l', bits, &tok[5..])
            }
            _ => (false, 0, &tok[..0]),
        };
        if bits == 0 {
            return Err(invalid(format!("data parameter: expected \"le16/32/64:\" or \"be16/32/64:\" at offset {end}")));
        }
        let w = String::from_utf8_lossy(w);
        let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let n = parse_unsigned("data", &w, max)?;
        let bytes = match (le, bits) {
            (true, 16) => (n as u16).to_le_bytes().to_vec(),
            (false, 16) => (n as u16).to_be_bytes().to_vec(),
            (true, 32) => (n as u32).to_le_bytes().to_vec(),
            (false, 32) => (n as u32).to_be_bytes().to_vec(),
            (true, _) => n.to_le_bytes().to_vec(),
            (false, _) => n.to_be_bytes().to_vec(),
        };
        Ok(Expr::Str(bytes))
    }

    /// A `"…"` string with C escapes; the cursor is on the opening quote.
    fn string(&mut self) -> Result<Vec<u8>> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(invalid("data parameter: unterminated string"));
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err(invalid("data parameter: unterminated string"));
                    };
                    self.pos += 1;
                    out.push(match e {
                        b'a' => 7,
                        b'b' => 8,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'v' => 0x0b,
                        b'x' => {
                            let hex = self.s.get(self.pos..self.pos + 2).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                            let Some(hex) = hex else {
                                return Err(invalid("data: \\xNN must be followed by exactly two hexadecimal characters"));
                            };
                            self.pos += 2;
                            u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("0"), 16).unwrap_or(0)
                        }
                        b'0'..=b'9' | b'u' => {
                            return Err(invalid("data: string numeric and unicode sequences are not yet implemented"));
                        }
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
    }

    /// `@N`, `@+N`, `@-N`, `@^N` (nbdkit 1.44: a number starting with 1-9
    /// takes a size suffix; one starting with 0 is C `%i`).
    fn offset(&mut self) -> Result<Expr> {
        self.pos += 1;
        let how = match self.peek() {
            Some(b'+') => Move::Fwd,
            Some(b'-') => Move::Back,
            Some(b'^') => Move::Align,
            _ => Move::Abs,
        };
        if how != Move::Abs {
            self.pos += 1;
        }
        let n = match self.peek() {
            Some(b'0') => self.c_number()?,
            Some(b'1'..=b'9') => {
                let start = self.pos;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                if self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
                    self.pos += 1;
                }
                let text = String::from_utf8_lossy(&self.s[start..self.pos]);
                parse_size(&text).map_err(|e| invalid(format!("data parameter: {}", e.message())))?
            }
            Some(b'-') => return Err(invalid("data parameter after @ must not be negative")),
            _ => return Err(self.parse_error(self.pos)),
        };
        match self.peek() {
            None | Some(b')') => {}
            Some(c) if is_space(c) => {}
            _ => return Err(self.parse_error(self.pos)),
        }
        if how == Move::Align && !n.is_power_of_two() {
            return Err(invalid(format!("data parameter @^{n} must be a power of 2")));
        }
        Ok(Expr::Offset(how, n))
    }

    /// `<FILE` or `<(SCRIPT)`.
    fn file_or_script(&mut self) -> Result<Expr> {
        self.pos += 1;
        if self.peek() == Some(b'(') {
            self.pos += 1;
            let start = self.pos;
            let mut level = 1usize;
            loop {
                match self.peek() {
                    None => return Err(invalid("unmatched '(' in data string")),
                    Some(b'(') => level += 1,
                    Some(b')') => {
                        level -= 1;
                        if level == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                self.pos += 1;
            }
            let script = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
            self.pos += 1;
            return Ok(Expr::Script(script));
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'*' | b'[' | b')')) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(invalid("data parameter <FILE not a filename"));
        }
        Ok(Expr::File(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()))
    }

    /// `N:M]` after `[`, either number optional.
    fn slice(&mut self) -> Result<(u64, Option<u64>)> {
        let bad = || invalid("enclosed pattern (...)[N:M] not numeric");
        let num = |p: &mut Self| -> Result<Option<u64>> {
            match p.peek() {
                Some(b'0'..=b'9') => p.c_number().map(Some),
                _ => Ok(None),
            }
        };
        let n = num(self)?;
        if self.peek() != Some(b':') {
            return Err(bad());
        }
        self.pos += 1;
        let m = num(self)?;
        if self.peek() != Some(b']') {
            return Err(bad());
        }
        self.pos += 1;
        Ok((n.unwrap_or(0), m))
    }

    /// `NAME` after `\`: one or more of `[A-Za-z0-9_-]`.
    fn name(&mut self) -> Result<String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.parse_error(start));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Expr::*;

    fn p(s: &str) -> Result<Vec<Expr>> {
        let vars = |k: &str| match k {
            "pat" => Some("0x55 0xAA".to_string()),
            "self" => Some("$self".to_string()),
            _ => None,
        };
        match parse(s, &vars)? {
            List(v) => Ok(v),
            _ => unreachable!(),
        }
    }

    fn err(s: &str) -> String {
        p(s).unwrap_err().message().to_string()
    }

    #[test]
    fn bytes_words_and_strings() {
        assert_eq!(p("0 1 0x1f 0377 255 # x\n 7").unwrap(), [Byte(0), Byte(1), Byte(31), Byte(255), Byte(255), Byte(7)]);
        assert_eq!(p("le16:0x1234 be16:1 le32:1 be32:0x01020304 le64:1 be64:2").unwrap(), [
            Str(vec![0x34, 0x12]), Str(vec![0, 1]), Str(vec![1, 0, 0, 0]), Str(vec![1, 2, 3, 4]),
            Str(vec![1, 0, 0, 0, 0, 0, 0, 0]), Str(vec![0, 0, 0, 0, 0, 0, 0, 2])]);
        assert_eq!(p(r#""a\"\\\a\b\f\n\r\t\v\x41\xfF\q""#).unwrap(),
                   [Str(b"a\"\\\x07\x08\x0c\n\r\t\x0bA\xffq".to_vec())]);
        assert_eq!(p("09").unwrap(), [Byte(0), Byte(9)]);
    }

    #[test]
    fn offsets_with_suffixes() {
        assert_eq!(p("@1k @0x400 @02000 @+2s @-3 @^4k @1M").unwrap(), [
            Offset(Move::Abs, 1024), Offset(Move::Abs, 1024), Offset(Move::Abs, 1024), Offset(Move::Fwd, 1024),
            Offset(Move::Back, 3), Offset(Move::Align, 4096), Offset(Move::Abs, 1 << 20)]);
        assert_eq!(p("(@1)").unwrap(), [List(vec![Offset(Move::Abs, 1)])]);
    }

    #[test]
    fn postfix_operators() {
        assert_eq!(p("1*2*3").unwrap(), [Repeat(Box::new(Repeat(Box::new(Byte(1)), 2)), 3)]);
        assert_eq!(p("1 * 18446744073709551615").unwrap(), [Repeat(Box::new(Byte(1)), u64::MAX)]);
        assert_eq!(p("(1)[:] 2[1:] 3[:4] 4[5:6]").unwrap(), [
            Slice(Box::new(List(vec![Byte(1)])), 0, None), Slice(Box::new(Byte(2)), 1, None),
            Slice(Box::new(Byte(3)), 0, Some(4)), Slice(Box::new(Byte(4)), 5, Some(6))]);
        assert_eq!(p("1 -> \\a-b_1 \\a-b_1").unwrap(), [Assign("a-b_1".into(), Box::new(Byte(1))), Name("a-b_1".into())]);
        assert_eq!(p("</dev/zero[:2]*3 <(echo (hi))").unwrap(), [
            Repeat(Box::new(Slice(Box::new(File("/dev/zero".into())), 0, Some(2))), 3), Script("echo (hi)".into())]);
        assert_eq!(p("$pat*2").unwrap(), [Repeat(Box::new(List(vec![Byte(0x55), Byte(0xaa)])), 2)]);
    }

    #[test]
    fn errors_are_nbdkits() {
        for (s, msg) in [
            ("(", "unmatched '(' in data string"),
            (")", "unmatched ')' in data string"),
            ("1 2 (3", "unmatched '(' in data string"),
            ("256", "data parameter BYTE must be in the range 0..255"),
            ("0x1ff", "data parameter BYTE must be in the range 0..255"),
            ("le16:70000", "data: could not parse number: \"70000\": Numerical result out of range"),
            ("le64:18446744073709551616", "data: could not parse number: \"18446744073709551616\": Numerical result out of range"),
            ("le16:-1", "data: negative numbers are not allowed"),
            ("lx:1", "data parameter: expected \"le16/32/64:\" or \"be16/32/64:\" at offset 4"),
            ("bx", "data parameter: expected \"le16/32/64:\" or \"be16/32/64:\" at offset 2"),
            ("\"abc", "data parameter: unterminated string"),
            ("\"\\0\"", "data: string numeric and unicode sequences are not yet implemented"),
            ("\"\\u1234\"", "data: string numeric and unicode sequences are not yet implemented"),
            ("\"\\x4g\"", "data: \\xNN must be followed by exactly two hexadecimal characters"),
            ("@^3", "data parameter @^3 must be a power of 2"),
            ("@^0", "data parameter @^0 must be a power of 2"),
            ("*2", "*N must follow an expression"),
            ("1*", "*N not numeric"),
            ("1*-1", "data parameter @OFFSET must not be negative"),
            ("@1*2", "data parameter: parsing error at offset 2"),
            ("@1 *2", "*N cannot be applied to this type of expression"),
            ("@1 [:]", "[N:M] cannot be applied to this type of expression"),
            ("<", "data parameter <FILE not a filename"),
            ("1[", "enclosed pattern (...)[N:M] not numeric"),
            ("1[a:]", "enclosed pattern (...)[N:M] not numeric"),
            ("1[5]", "enclosed pattern (...)[N:M] not numeric"),
            ("$nope", "$nope: variable not found"),
            ("x", "data parameter: parsing error at offset 0"),
            ("1 2 x", "data parameter: parsing error at offset 4"),
            ("-1", "data parameter: parsing error at offset 1"),
            ("-> \\a", "-> must follow an expression"),
            ("1 -> \\", "data parameter: parsing error at offset 4"),
            ("1 -> x", "data parameter: parsing error at offset 4"),
            ("@10\"x\"", "data parameter: parsing error at offset 3"),
            ("@1q", "data parameter: could not parse size: unknown suffix 'q'"),
            ("@x", "data parameter: parsing error at offset 1"),
            ("$self", "data parameter: nested too deeply (more than 1000 levels)"),
        ] {
            assert_eq!(err(s), msg, "{s}");
        }
        let deep = "(".repeat(100_000) + &")".repeat(100_000);
        assert_eq!(err(&deep), "data parameter: nested too deeply (more than 1000 levels)");
        let ok = "(".repeat(MAX_DEPTH) + "1" + &")".repeat(MAX_DEPTH);
        assert!(p(&ok).is_ok());
    }

    proptest::proptest! {
        /// Hostile input: any string parses or fails cleanly, and so does
        /// optimizing what it parses to (no evaluation: it could run
        /// scripts).
        #[test]
        fn never_panics(s in "[ -~\t\n]{0,60}", t in proptest::collection::vec(proptest::sample::select(vec![
            "(", ")", "0", "1", "0x", "255", "@", "@+", "@-", "@^", "8", "*", "[", ":", "]", "\"", "\\", "le16:", "be64:",
            "-> \\a", "\\a", "$v", "<", "#", "\n", " ", "k", "4294967296", "18446744073709551615"]), 0..30)) {
            let vars = |k: &str| (k == "v").then(|| "1 (2)".to_string());
            for src in [s, t.concat()] {
                if let Ok(e) = parse(&src, &vars) {
                    let _ = super::super::optimize::optimize(e);
                }
            }
        }
    }
}
