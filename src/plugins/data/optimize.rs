//! The optimizer: rewrites the tree into one that makes the same bytes and
//! the same allocation (block status) with less work, as nbdkit's does.
//!
//! What decides block status is whether an expression *writes* (every page
//! it touches is allocated, even with zeroes) or is *copied in* from a
//! scope of its own (a page left all zero is a hole). So the rules follow
//! nbdkit's: groups without `@` or `->` are spliced into their parent
//! (their bytes become writes), adjacent bytes and strings merge into one
//! string, a string of one repeated byte becomes a fill (a zero fill is a
//! hole), and small repeats of strings are expanded.

use super::ast::Expr;
use crate::error::{Error, Result};

/// Repeats of strings are expanded when the result is at most this long
/// (nbdkit 1.36 and later).
const EXPAND_MAX: u64 = 4096;

/// Optimizes a whole tree. The parser bounds the depth, so recursion is safe.
pub fn optimize(e: Expr) -> Result<Expr> {
    Ok(match e {
        Expr::List(v) => {
            let v = list(v)?;
            // One expression that needs no scope of its own stands for the list.
            if v.len() == 1 && splices(&v) {
                v.into_iter().next().unwrap_or(Expr::List(Vec::new()))
            } else {
                Expr::List(v)
            }
        }
        Expr::Str(s) => string(s),
        Expr::Repeat(inner, n) => repeat(optimize(*inner)?, n)?,
        Expr::Slice(inner, n, m) => slice(optimize(*inner)?, n, m)?,
        Expr::Assign(name, inner) => Expr::Assign(name, Box::new(optimize(*inner)?)),
        other => other,
    })
}

/// True if a group's expressions can be spliced into the parent: no `@`
/// (offsets are relative to the group) and no `->` (bindings end with it).
fn splices(v: &[Expr]) -> bool {
    !v.iter().any(|e| matches!(e, Expr::Offset(..) | Expr::Assign(..)))
}

fn list(v: Vec<Expr>) -> Result<Vec<Expr>> {
    let mut out: Vec<Expr> = Vec::with_capacity(v.len());
    for e in v {
        let e = optimize(e)?;
        let items = match e {
            Expr::List(inner) if splices(&inner) => inner,
            e => vec![e],
        };
        for e in items {
            push_merged(&mut out, e);
        }
    }
    Ok(out)
}

/// Appends `e`, merging it with the previous expression where the bytes
/// are written the same way.
fn push_merged(out: &mut Vec<Expr>, e: Expr) {
    // Nothing written: gone before it can keep neighbours apart.
    if matches!(&e, Expr::Str(s) if s.is_empty()) || matches!(e, Expr::Fill(_, 0)) {
        return;
    }
    let same = |s: &[u8], b: u8| s.iter().all(|&c| c == b);
    let last = out.pop();
    let merged = match (last, e) {
        // Two equal bytes make a fill, any other merge a string (nbdkit:
        // `0 0` is a hole, `"\x00" 0 0` is written).
        (Some(Expr::Byte(a)), Expr::Byte(b)) if a == b => Ok(Expr::Fill(a, 2)),
        (Some(Expr::Byte(a)), Expr::Byte(b)) => Ok(Expr::Str(vec![a, b])),
        (Some(Expr::Byte(a)), Expr::Str(s)) => Ok(Expr::Str([&[a][..], &s].concat())),
        (Some(Expr::Str(mut s)), Expr::Byte(b)) => {
            s.push(b);
            Ok(Expr::Str(s))
        }
        (Some(Expr::Str(mut s)), Expr::Str(t)) => {
            s.extend_from_slice(&t);
            Ok(Expr::Str(s))
        }
        (Some(Expr::Fill(a, n)), Expr::Fill(b, m)) if a == b && n.checked_add(m).is_some() => Ok(Expr::Fill(a, n + m)),
        (Some(Expr::Fill(a, n)), Expr::Byte(b)) if a == b && n < u64::MAX => Ok(Expr::Fill(a, n + 1)),
        (Some(Expr::Byte(a)), Expr::Fill(b, m)) if a == b && m < u64::MAX => Ok(Expr::Fill(a, m + 1)),
        // A string of the fill's byte joins the fill.
        (Some(Expr::Fill(a, n)), Expr::Str(s)) if same(&s, a) && n.checked_add(s.len() as u64).is_some() => {
            Ok(Expr::Fill(a, n + s.len() as u64))
        }
        (Some(Expr::Str(s)), Expr::Fill(b, m)) if same(&s, b) && m.checked_add(s.len() as u64).is_some() => {
            Ok(Expr::Fill(b, m + s.len() as u64))
        }
        (last, e) => Err((last, e)),
    };
    match merged {
        Ok(m) => out.push(m),
        Err((last, e)) => {
            out.extend(last);
            out.push(e);
        }
    }
}

/// A string of one repeated byte (two or more) is a fill.
fn string(s: Vec<u8>) -> Expr {
    match s.split_first() {
        Some((&b, rest)) if !rest.is_empty() && rest.iter().all(|&c| c == b) => Expr::Fill(b, s.len() as u64),
        _ => Expr::Str(s),
    }
}

fn mul(a: u64, b: u64) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| Error::invalid(format!("multiplication overflow: {a}*{b}")))
}

fn repeat(inner: Expr, n: u64) -> Result<Expr> {
    Ok(match (inner, n) {
        (_, 0) => Expr::List(Vec::new()),
        // A binding made inside the repeat must not leak into the parent.
        (e @ Expr::Assign(..), 1) => Expr::List(vec![e]),
        (e, 1) => e,
        (Expr::Byte(b), n) => Expr::Fill(b, n),
        (Expr::Fill(b, m), n) => Expr::Fill(b, mul(m, n)?),
        (Expr::Str(s), n) if (s.len() as u64).saturating_mul(n) <= EXPAND_MAX => string(s.repeat(n as usize)),
        (Expr::Repeat(e, m), n) => Expr::Repeat(e, mul(m, n)?),
        (e, n) => Expr::Repeat(Box::new(e), n),
    })
}

/// Slices of strings and fills are cut at once; a slice out of range is
/// left for the evaluator, which reports it only if the expression is
/// used (an unused binding may hold one, as in nbdkit).
fn slice(inner: Expr, n: u64, m: Option<u64>) -> Result<Expr> {
    Ok(match inner {
        Expr::Byte(b) => slice(Expr::Str(vec![b]), n, m)?,
        Expr::Str(s) if n <= m.unwrap_or(s.len() as u64) && m.unwrap_or(0) <= s.len() as u64 => {
            let m = m.unwrap_or(s.len() as u64);
            // A slice is copied in like a group: keep what allocates alike.
            Expr::Str(s[n as usize..m as usize].to_vec())
        }
        // One byte of a fill is a byte (written, as nbdkit does).
        Expr::Fill(b, len) if n <= m.unwrap_or(len) && m.unwrap_or(0) <= len => match m.unwrap_or(len) - n {
            1 => Expr::Byte(b),
            k => Expr::Fill(b, k),
        },
        e => Expr::Slice(Box::new(e), n, m),
    })
}

#[cfg(test)]
mod tests {
    use super::super::ast::{print, Move};
    use super::super::parser::parse;
    use super::*;

    fn opt(s: &str) -> String {
        let e = parse(s, &|_: &str| Some("0".to_string())).unwrap();
        print(&optimize(e).unwrap()).join(" ").split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn matches_nbdkits_rewrites() {
        assert_eq!(opt("0 0"), "fill(0*2)");
        assert_eq!(opt("\"\\x00\\x00\""), "fill(0*2)");
        assert_eq!(opt("\"\\x00\""), "\"\\x00\"");
        assert_eq!(opt("le16:0"), "fill(0*2)");
        assert_eq!(opt("( 0 )"), "0");
        assert_eq!(opt("$v"), "0");
        assert_eq!(opt("\"aa\""), "fill(97*2)");
        assert_eq!(opt("@32767 1 0 0"), "( @32767 \"\\x01\\x00\\x00\" )");
        assert_eq!(opt("@32767 1 \"\\x00\\x00\\x00\""), "( @32767 1 fill(0*3) )");
        assert_eq!(opt("0 \"\\x00\\x00\""), "fill(0*3)");
        assert_eq!(opt("( 0 0 ) 0"), "fill(0*3)");
        assert_eq!(opt("0 0 \"\\x00\\x01\""), "( fill(0*2) \"\\x00\\x01\" )");
        assert_eq!(opt("0 0 0 1"), "( fill(0*3) 1 )");
        assert_eq!(opt("( ( 0 0 ) )[0:1]"), "0");
        assert_eq!(opt("\"\\x00\" 0 0"), "\"\\x00\\x00\\x00\"");
        assert_eq!(opt("( le16:0 ) 0 0 ( \"\\x00\\x01a\" )[0:1]"), "fill(0*5)");
        assert_eq!(opt("1 0 0"), "\"\\x01\\x00\\x00\"");
        assert_eq!(opt("\"ab\"*3"), "\"ababab\"");
        assert_eq!(opt("\"ab\"*3000"), "( \"ab\" ) *3000");
        assert_eq!(opt("0*5*6"), "fill(0*30)");
        assert_eq!(opt("0*1"), "0");
        assert_eq!(opt("(0)*2"), "fill(0*2)");
        assert_eq!(opt("(1 2 3)*2*3"), "\"\\x01\\x02\\x03\\x01\\x02\\x03\\x01\\x02\\x03\\x01\\x02\\x03\\x01\\x02\\x03\\x01\\x02\\x03\"");
        assert_eq!(opt("(0 1)[0:1]"), "\"\\x00\"");
        assert_eq!(opt("( 1 @100000 ) * 2"), "( ( 1 @100000 ) ) *2");
        assert_eq!(opt("1*0 \"\""), "( )");
        assert_eq!(opt("(1 @2)*3*5"), "( ( 1 @2 ) ) *15");
    }

    #[test]
    fn overflow_and_bad_slices() {
        let e = |s: &str| optimize(parse(s, &|_: &str| None).unwrap()).unwrap_err().message().to_string();
        assert_eq!(e("1*4294967296*4294967296"), "multiplication overflow: 4294967296*4294967296");
        // Bad slices are left for the evaluator (an unused binding may hold one).
        let keep = |s: &str| optimize(parse(s, &|_: &str| None).unwrap()).unwrap();
        assert!(matches!(keep("\"abc\"[2:1]"), Expr::Slice(..)));
        assert!(matches!(keep("0*2[0:3]"), Expr::Slice(..)));
        assert_eq!(optimize(Expr::Slice(Box::new(Expr::Fill(1, 10)), 2, None)).unwrap(), Expr::Fill(1, 8));
        assert_eq!(optimize(Expr::Offset(Move::Abs, 3)).unwrap(), Expr::Offset(Move::Abs, 3));
    }
}
