//! The evaluator: an optimized tree to a lazy [`Image`], following
//! nbdkit's scope and size rules.
//!
//! A scope (a group, a repeat's or slice's operand, a `\NAME`, the whole
//! string) starts at offset 0; its length is its high-water mark; it is
//! copied into its parent like nbdkit's `blit`. At the top level the
//! evaluator also records which pages nbdkit's sparse allocator would
//! have allocated: a write (bytes, strings, a non-zero fill, a file or a
//! script) allocates every page it touches, even with zeroes; a zero fill
//! or a copied-in scope leaves a page that ends up all zero unallocated.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;

use super::ast::{Expr, Move};
use super::image::{Image, Piece, Src};
use super::ranges::RangeSet;
use crate::error::{Error, Result};

/// The allocator page whose allocation block status reports.
pub const PAGE: u64 = 32768;

/// The most bytes one `<FILE` or `<(SCRIPT)` may insert (use a slice to
/// take part of something bigger).
pub const MAX_INSERT: u64 = 1 << 30;

/// The largest disk nbdkit can serve.
const MAX_SIZE: u64 = i64::MAX as u64;

/// An evaluated data string: the bytes, and the pages a sparse
/// allocator would hold (all-zero pages among them read as allocated).
#[derive(Debug, Default)]
pub struct Evaluated {
    pub image: Image,
    /// Page numbers (offset / [`PAGE`]) a write touched last.
    pub allocated: RangeSet,
}

/// A binding: `expr` evaluated with the bindings `env` that existed when
/// it was bound (lexical capture), chained to the earlier bindings.
struct Binding {
    name: String,
    expr: Rc<Expr>,
    env: Env,
}

type Env = Option<Rc<Binding>>;

fn lookup(env: &Env, name: &str) -> Option<(Rc<Expr>, Env)> {
    let mut cur = env.as_ref();
    while let Some(b) = cur {
        if b.name == name {
            return Some((b.expr.clone(), b.env.clone()));
        }
        cur = b.env.as_ref();
    }
    None
}

/// Evaluates the top-level expression.
pub fn evaluate(e: &Expr) -> Result<Evaluated> {
    let mut allocated = RangeSet::default();
    let mut out = Out { img: Image::default(), offset: 0, hwm: 0, log: Some(&mut allocated) };
    let mut env = None;
    match e {
        Expr::List(v) => {
            for x in v {
                eval(x, &mut env, &mut out)?;
            }
        }
        e => eval(e, &mut env, &mut out)?,
    }
    let hwm = out.hwm;
    let mut image = out.img;
    image.set_len(hwm);
    image.refresh();
    Ok(Evaluated { image, allocated })
}

/// Bytes that are written at offset 0 (`raw=`, `base64=`).
pub fn from_bytes(b: Vec<u8>) -> Evaluated {
    let mut ev = Evaluated::default();
    let len = b.len() as u64;
    if len > 0 {
        ev.image.put(0, Piece { len, src: Src::Bytes(Arc::from(b)), off: 0 });
        ev.allocated.insert(0, (len - 1) / PAGE + 1);
    }
    ev.image.refresh();
    ev
}

/// Where a scope is being evaluated to.
struct Out<'a> {
    img: Image,
    offset: u64,
    hwm: u64,
    /// The top level's page log.
    log: Option<&'a mut RangeSet>,
}

fn too_big() -> Error {
    Error::invalid("data parameter: the disk would be larger than 2^63-1 bytes")
}

impl Out<'_> {
    /// The end of `len` bytes at the offset, if within the largest disk.
    fn end(&self, len: u64) -> Result<u64> {
        self.offset.checked_add(len).filter(|&e| e <= MAX_SIZE).ok_or_else(too_big)
    }

    fn advance(&mut self, end: u64) {
        self.offset = end;
        self.hwm = self.hwm.max(end);
    }

    fn pages(start: u64, len: u64) -> (u64, u64) {
        (start / PAGE, (start + len - 1) / PAGE + 1)
    }

    /// A write: allocates the pages it touches.
    fn write(&mut self, src: Src, len: u64) -> Result<()> {
        let end = self.end(len)?;
        if len > 0 {
            if let Some(log) = self.log.as_deref_mut() {
                let (a, b) = Self::pages(self.offset, len);
                log.insert(a, b);
            }
            self.img.put(self.offset, Piece { len, src, off: 0 });
        }
        self.advance(end);
        Ok(())
    }

    /// Zeroes or a copy: pages left all zero are not allocated.
    fn normalized(&mut self, len: u64) {
        if len > 0 {
            if let Some(log) = self.log.as_deref_mut() {
                let (a, b) = Self::pages(self.offset, len);
                log.remove(a, b);
            }
        }
    }

    fn zero(&mut self, len: u64) -> Result<()> {
        let end = self.end(len)?;
        self.normalized(len);
        self.img.clear(self.offset, len);
        self.advance(end);
        Ok(())
    }

    fn blit(&mut self, sub: &Arc<Image>, off: u64, len: u64) -> Result<()> {
        let end = self.end(len)?;
        self.normalized(len);
        self.img.blit(self.offset, sub, off, len);
        self.advance(end);
        Ok(())
    }

    fn repeat(&mut self, unit: &Arc<Image>, count: u64) -> Result<()> {
        let total = unit.len().checked_mul(count).ok_or_else(too_big)?;
        let end = self.end(total)?;
        self.normalized(total);
        self.img.repeat(self.offset, unit, count, total);
        self.advance(end);
        Ok(())
    }
}

/// Evaluates `e` as a scope of its own with the bindings `env`.
fn scope(e: &Expr, env: Env) -> Result<Arc<Image>> {
    let mut out = Out { img: Image::default(), offset: 0, hwm: 0, log: None };
    let mut env = env;
    match e {
        Expr::List(v) => {
            for x in v {
                eval(x, &mut env, &mut out)?;
            }
        }
        e => eval(e, &mut env, &mut out)?,
    }
    let hwm = out.hwm;
    let mut img = out.img;
    img.set_len(hwm);
    img.refresh();
    Ok(Arc::new(img))
}

fn eval(e: &Expr, env: &mut Env, out: &mut Out<'_>) -> Result<()> {
    match e {
        Expr::List(_) => {
            let sub = scope(e, env.clone())?;
            out.blit(&sub, 0, sub.len())
        }
        Expr::Byte(b) => out.write(Src::Bytes(Arc::from(&[*b][..])), 1),
        Expr::Str(s) => out.write(Src::Bytes(Arc::from(&s[..])), s.len() as u64),
        Expr::Fill(0, n) => out.zero(*n),
        Expr::Fill(b, n) => out.write(Src::Fill(*b), *n),
        Expr::Offset(how, n) => {
            let n = *n;
            let to = match how {
                Move::Abs => Some(n),
                Move::Fwd => out.offset.checked_add(n),
                Move::Back => {
                    if n > out.offset {
                        return Err(Error::invalid(format!(
                            "data parameter @-{n} must not be larger than the current offset {}", out.offset)));
                    }
                    Some(out.offset - n)
                }
                Move::Align => match out.offset % n {
                    0 => Some(out.offset),
                    r => out.offset.checked_add(n - r),
                },
            };
            let to = to.filter(|&t| t <= MAX_SIZE).ok_or_else(too_big)?;
            out.offset = to;
            out.hwm = out.hwm.max(to);
            Ok(())
        }
        Expr::File(f) => {
            let b = read_file(f, 0, None)?;
            let len = b.len() as u64;
            out.write(Src::Bytes(Arc::from(b)), len)
        }
        Expr::Script(s) => {
            let b = run_script(s, 0, None)?;
            let len = b.len() as u64;
            out.write(Src::Bytes(Arc::from(b)), len)
        }
        Expr::Name(n) => {
            let (expr, captured) = lookup(env, n).ok_or_else(|| Error::invalid(format!("\\{n} not defined")))?;
            let sub = scope(&expr, captured)?;
            out.blit(&sub, 0, sub.len())
        }
        Expr::Assign(n, x) => {
            *env = Some(Rc::new(Binding { name: n.clone(), expr: Rc::new((**x).clone()), env: env.clone() }));
            Ok(())
        }
        Expr::Repeat(x, count) => {
            if *count == 0 {
                return Ok(());
            }
            let unit = scope(x, env.clone())?;
            out.repeat(&unit, *count)
        }
        // An empty slice is not evaluated at all (nbdkit does not either).
        Expr::Slice(_, n, Some(m)) if n == m => Ok(()),
        Expr::Slice(x, n, m) => {
            let inner = match &**x {
                Expr::List(v) if v.len() == 1 => &v[0],
                x => x,
            };
            match inner {
                Expr::File(f) => {
                    let b = read_file(f, *n, *m)?;
                    let len = b.len() as u64;
                    out.write(Src::Bytes(Arc::from(b)), len)
                }
                Expr::Script(s) => {
                    let b = run_script(s, *n, *m)?;
                    let len = b.len() as u64;
                    out.write(Src::Bytes(Arc::from(b)), len)
                }
                _ => {
                    let sub = scope(x, env.clone())?;
                    let m = m.unwrap_or(sub.len());
                    if *n > m || m > sub.len() {
                        return Err(bad_slice());
                    }
                    out.blit(&sub, *n, m - n)
                }
            }
        }
    }
}

fn bad_slice() -> Error {
    Error::invalid("[N:M] does not describe a valid slice")
}

/// An OS error as C's `strerror` words it.
fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Reads up to `limit` bytes (failing if there are more).
fn read_capped(r: &mut dyn Read, limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(limit + 1)
        .read_to_end(&mut v)
        .map_err(|e| Error::io(format!("{what}: {}", os_message(&e))))?;
    if v.len() as u64 > limit {
        return Err(Error::invalid(format!(
            "{what}: more than {limit} bytes; take a part of it with a slice [N:M]")));
    }
    Ok(v)
}

/// The bytes `[n, m)` of a file (`m` absent: to its end).
fn read_file(path: &str, n: u64, m: Option<u64>) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(format!("{path}: {}", os_message(&e))))?;
    crate::debug!("data: reading file {path}");
    if n > 0 && f.seek(SeekFrom::Start(n)).is_err() {
        // Not seekable: read and drop.
        std::io::copy(&mut (&mut f).take(n), &mut std::io::sink()).map_err(|e| Error::io(format!("{path}: {}", os_message(&e))))?;
    }
    take_range(&mut f, n, m, path)
}

fn take_range(r: &mut dyn Read, n: u64, m: Option<u64>, what: &str) -> Result<Vec<u8>> {
    match m {
        Some(m) => {
            if n > m {
                return Err(bad_slice());
            }
            if m - n > MAX_INSERT {
                return Err(Error::invalid(format!("{what}: slice of more than {MAX_INSERT} bytes")));
            }
            let v = read_capped(&mut r.take(m - n), m - n, what)?;
            if (v.len() as u64) < m - n {
                return Err(bad_slice());
            }
            Ok(v)
        }
        None => read_capped(r, MAX_INSERT, what),
    }
}

/// The output of `/bin/sh -c SCRIPT`, bytes `[n, m)`. Without `m` the
/// script must succeed; with it only `m` bytes are read and the exit
/// status is ignored (infinite generators), the script then killed.
fn run_script(script: &str, n: u64, m: Option<u64>) -> Result<Vec<u8>> {
    crate::debug!("data: running script: {script}");
    // In a process group of its own, so that what the script started can
    // be killed with it once a slice has its bytes.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io(format!("popen: {}", os_message(&e))))?;
    let mut stdout = child.stdout.take().ok_or_else(|| Error::io("popen: no pipe"))?;
    let result = (|| {
        if n > 0 {
            let skipped = std::io::copy(&mut (&mut stdout).take(n), &mut std::io::sink())
                .map_err(|e| Error::io(format!("script: {}", os_message(&e))))?;
            if skipped < n {
                return Err(bad_slice());
            }
        }
        take_range(&mut stdout, n, m, "script")
    })();
    drop(stdout);
    if m.is_some() || result.is_err() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on the group this function created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = child.wait();
        return result;
    }
    let status = child.wait().map_err(|e| Error::io(format!("pclose: {}", os_message(&e))))?;
    if !status.success() {
        return Err(Error::io("pclose: external command failed"));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::super::optimize::optimize;
    use super::super::parser::parse;
    use super::*;

    fn run(s: &str) -> Result<Evaluated> {
        let vars = |k: &str| (k == "v").then(|| "9 8".to_string());
        let e = parse(s, &vars)?;
        evaluate(&optimize(e.clone())?).and_then(|opt| {
            // The unoptimized tree makes the same bytes.
            let raw = evaluate(&e)?;
            if opt.image.len() <= 1 << 20 {
                assert_eq!(bytes(&raw), bytes(&opt), "{s}");
            }
            Ok(opt)
        })
    }

    fn bytes(ev: &Evaluated) -> Vec<u8> {
        let mut v = vec![0xee; ev.image.len() as usize];
        ev.image.read(&mut v, 0);
        v
    }

    fn b(s: &str) -> Vec<u8> {
        bytes(&run(s).unwrap_or_else(|e| panic!("{s}: {e}")))
    }

    fn err(s: &str) -> String {
        run(s).err().unwrap_or_else(|| panic!("{s} accepted")).message().to_string()
    }

    #[test]
    fn the_language() {
        assert_eq!(b("0 1 2 3 @6 0x55 0xaa"), [0, 1, 2, 3, 0, 0, 0x55, 0xaa]);
        assert_eq!(b("0 1 2 3 @^8 @-2 le16:0xaa55"), [0, 1, 2, 3, 0, 0, 0x55, 0xaa]);
        assert_eq!(b("1 @5"), [1, 0, 0, 0, 0]);
        assert_eq!(b("1 @5 @1"), [1, 0, 0, 0, 0]);
        assert_eq!(b("\"XXXXXXXXXX\" @0 ( \"a\" @5 )"), b"a\0\0\0\0XXXXX");
        assert_eq!(b("( 0x55 0xAA ) * 3"), [0x55, 0xaa, 0x55, 0xaa, 0x55, 0xaa]);
        assert_eq!(b("\"ab\"*2 \"c\"*0 1*2*2"), b"abab\x01\x01\x01\x01");
        assert_eq!(b("(1 @3)*2"), [1, 0, 0, 1, 0, 0]);
        assert_eq!(b("(1 2 3 4 5)[1:3] (1 2 3)[:] (1 2 3)[2:] \"abc\"[:1]"), [2, 3, 1, 2, 3, 3, b'a']);
        assert_eq!(b("(1 @4)[2:4]"), [0, 0]);
        assert_eq!(b("( 0x55 0xAA ) -> \\s ( @4 \\s ) -> \\t \\t \\t"), [0, 0, 0, 0, 0x55, 0xaa, 0, 0, 0, 0, 0x55, 0xaa]);
        assert_eq!(b("$v*2 $v"), [9, 8, 9, 8, 9, 8]);
        // Lexical capture: \b uses the \a that existed when it was bound.
        assert_eq!(b("1 -> \\a \\a -> \\b 2 -> \\a \\b \\a ( 3 -> \\a \\a \\b ) \\a"), [1, 2, 3, 1, 2]);
        assert_eq!(b("@^4"), [] as [u8; 0]);
        assert_eq!(b("1 @^4"), [1, 0, 0, 0]);
        assert_eq!(b("1 @^1"), [1]);
        assert_eq!(b("( @2 ) 1"), [0, 0, 1]);
        assert_eq!(b("<(printf 'a\\0b')"), b"a\0b");
        assert_eq!(b("<(yes)[2:5]"), b"y\ny");
        assert_eq!(b("</dev/zero[3:5] 1"), [0, 0, 1]);
    }

    #[test]
    fn scopes_end_with_their_group() {
        assert_eq!(err("( 1 -> \\a ) \\a"), "\\a not defined");
        assert_eq!(err("\\x"), "\\x not defined");
        assert_eq!(err("@1 @-2"), "data parameter @-2 must not be larger than the current offset 1");
        assert_eq!(err("(1 2)[0:5]"), "[N:M] does not describe a valid slice");
        assert_eq!(err("(1 2)[2:1]"), "[N:M] does not describe a valid slice");
        assert_eq!(err("<(exit 3)"), "pclose: external command failed");
        assert_eq!(err("<(kill -9 $$)"), "pclose: external command failed");
        assert_eq!(err("</nonexistent/x"), "/nonexistent/x: No such file or directory");
        assert_eq!(err("</dev/null[0:1]"), "[N:M] does not describe a valid slice");
        assert_eq!(err("1 @9223372036854775807 1"), "data parameter: the disk would be larger than 2^63-1 bytes");
        assert_eq!(err("(1 2 3)*4611686018427387904"), "data parameter: the disk would be larger than 2^63-1 bytes");
    }

    #[test]
    fn huge_repeats_stay_lazy() {
        let ev = run("( 0x55 0xAA )*536870912").unwrap();
        assert_eq!(ev.image.len(), 1 << 30);
        assert_eq!(ev.image.piece_count(), 1);
        let ev = run("\"hello\" * 2147483648").unwrap();
        assert_eq!(ev.image.len(), 5 << 31);
        let mut buf = [0; 10];
        ev.image.read(&mut buf, (5 << 31) - 7);
        assert_eq!(&buf, b"lohello\0\0\0");
        let ev = run("(1 2 3)*1000000000000 @^4096").unwrap();
        assert_eq!(ev.image.len(), 3_000_000_000_000);
        let ev = run("((1 @100000)*1000 2)*1000000 @7E").unwrap();
        assert_eq!(ev.image.len(), 7 << 60);
    }

    #[test]
    fn pages_allocated_like_nbdkits_sparse_allocator() {
        let pages = |s: &str| {
            let ev = run(s).unwrap();
            (0..8).filter(|p| ev.allocated.contains(*p)).collect::<Vec<u64>>()
        };
        assert_eq!(pages("0"), [0]);
        assert_eq!(pages("0 0"), [] as [u64; 0]);
        assert_eq!(pages("1 @0 0*10"), [] as [u64; 0]);
        assert_eq!(pages("0*10 @0 0"), [0]);
        assert_eq!(pages("@32767 1 0 0"), [0, 1]);
        assert_eq!(pages("@32767 1 \"\\x00\\x00\\x00\""), [0]);
        assert_eq!(pages("( 0 @100000 ) * 2"), [] as [u64; 0]);
        assert_eq!(pages("0 -> \\a \\a"), [] as [u64; 0]);
        assert_eq!(pages("1 </dev/zero[:100000]"), [0, 1, 2, 3]);
        assert_eq!(pages("(0 @100000 1)[0:50000]"), [] as [u64; 0]);
    }
}
