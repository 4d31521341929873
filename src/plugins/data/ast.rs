//! The data language's syntax tree, and its `-D data.AST=1` printout in
//! nbdkit's layout.

use std::fmt::Write;

/// How `@` moves the offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// `@N`: to N.
    Abs,
    /// `@+N`: forward by N.
    Fwd,
    /// `@-N`: back by N.
    Back,
    /// `@^N`: up to a multiple of N.
    Align,
}

/// One expression. A list is a scope: a group `( … )`, a `$VAR`, or the
/// whole data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// A group of expressions (nested scope).
    List(Vec<Expr>),
    /// One byte.
    Byte(u8),
    /// Bytes of a string, a word or merged bytes.
    Str(Vec<u8>),
    /// `B*N` as the optimizer makes it.
    Fill(u8, u64),
    /// `@N`, `@+N`, `@-N`, `@^N`.
    Offset(Move, u64),
    /// `<FILE`.
    File(String),
    /// `<(SCRIPT)`.
    Script(String),
    /// `\NAME`.
    Name(String),
    /// `EXPR -> \NAME`.
    Assign(String, Box<Expr>),
    /// `EXPR * N`.
    Repeat(Box<Expr>, u64),
    /// `EXPR[N:M]` (`M` absent: to the end).
    Slice(Box<Expr>, u64, Option<u64>),
}

/// A string in nbdkit's AST notation: printable ASCII as is, `"` and `\`
/// escaped, everything else `\xNN`.
pub fn quote(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for &b in s {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    out
}

/// The lines nbdkit prints between `BEGIN AST` and `END AST`.
pub fn print(e: &Expr) -> Vec<String> {
    let mut lines = Vec::new();
    print_into(e, 0, &mut lines);
    lines
}

fn print_into(e: &Expr, indent: usize, out: &mut Vec<String>) {
    let pad = " ".repeat(indent);
    let wrapped = |child: &Expr, suffix: String, out: &mut Vec<String>| {
        out.push(format!("{pad}("));
        print_into(child, indent + 4, out);
        out.push(format!("{pad}){suffix}"));
    };
    match e {
        Expr::List(v) => {
            out.push(format!("{pad}("));
            for c in v {
                print_into(c, indent + 4, out);
            }
            out.push(format!("{pad})"));
        }
        Expr::Byte(b) => out.push(format!("{pad}{b}")),
        Expr::Str(s) => out.push(format!("{pad}{}", quote(s))),
        Expr::Fill(b, n) => out.push(format!("{pad}fill({b}*{n})")),
        Expr::Offset(m, n) => {
            let sign = match m {
                Move::Abs => "",
                Move::Fwd => "+",
                Move::Back => "-",
                Move::Align => "^",
            };
            out.push(format!("{pad}@{sign}{n}"));
        }
        Expr::File(f) => out.push(format!("{pad}<{f}")),
        Expr::Script(s) => out.push(format!("{pad}<({s})")),
        Expr::Name(n) => out.push(format!("{pad}\\{n}")),
        Expr::Assign(n, c) => wrapped(c, format!(" -> \\{n}"), out),
        Expr::Repeat(c, n) => wrapped(c, format!(" *{n}"), out),
        Expr::Slice(c, n, m) => {
            let m = m.map(|m| m.to_string()).unwrap_or_default();
            wrapped(c, format!("[{n}:{m}]"), out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_nbdkit() {
        let e = Expr::List(vec![
            Expr::Repeat(Box::new(Expr::List(vec![Expr::Str(b"ab\x01\x02\x03".to_vec())])), 5),
            Expr::Fill(0, 3),
            Expr::Offset(Move::Align, 16),
            Expr::Assign("x".into(), Box::new(Expr::List(vec![Expr::Str(vec![7, 8])]))),
            Expr::Name("x".into()),
            Expr::Slice(Box::new(Expr::File("/dev/zero".into())), 0, Some(10)),
        ]);
        assert_eq!(print(&e).join("\n"), "(\n    (\n        (\n            \"ab\\x01\\x02\\x03\"\n        )\n    ) *5\n    \
            fill(0*3)\n    @^16\n    (\n        (\n            \"\\x07\\x08\"\n        )\n    ) -> \\x\n    \\x\n    \
            (\n        </dev/zero\n    )[0:10]\n)");
        assert_eq!(quote(b"a\"\\\n"), "\"a\\\"\\\\\\x0a\"");
    }
}
