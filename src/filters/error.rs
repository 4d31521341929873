//! `error` (registered as `error-inject`): make requests fail at random,
//! at a chosen rate, with a chosen errno, optionally only while a trigger
//! file exists. For testing how clients cope with a failing disk.
//!
//! Settings are kept per operation (pread, pwrite, trim, zero, extents,
//! cache); `error`, `error-rate` and `error-file` set all six, and the
//! per-operation keys one, so a later key overrides an earlier one.
//! Flush, open and negotiation are never affected.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::{Extents, Filter, FilterEntry, FilterHandle, Flags, Handle, Next, Param};
use crate::error::{Error, ErrorKind, Result};
use crate::util::parse::parse_probability;

/// The operations errors can be injected into, in settings order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Pread,
    Pwrite,
    Trim,
    Zero,
    Extents,
    Cache,
}

impl Op {
    const ALL: [Op; 6] = [Op::Pread, Op::Pwrite, Op::Trim, Op::Zero, Op::Extents, Op::Cache];

    fn name(self) -> &'static str {
        match self {
            Op::Pread => "pread",
            Op::Pwrite => "pwrite",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::Extents => "extents",
            Op::Cache => "cache",
        }
    }
}

/// What one operation injects, and when.
#[derive(Debug, Clone)]
struct Settings {
    /// The error returned (default EIO).
    kind: ErrorKind,
    /// Probability of an error, 0 (never, the default) to 1 (always).
    rate: f64,
    /// Inject only while this file exists.
    file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { kind: ErrorKind::Io, rate: 0.0, file: None }
    }
}

/// The part of a key after `error[-OP]`.
enum Field {
    Errno,
    Rate,
    File,
}

/// `error[-OP][-rate|-file]` → which operation (`None`: all) and field.
fn parse_key(key: &str) -> Option<(Option<Op>, Field)> {
    let rest = key.strip_prefix("error")?;
    let (op, rest) = Op::ALL
        .iter()
        .find_map(|&op| Some((Some(op), rest.strip_prefix('-')?.strip_prefix(op.name())?)))
        .unwrap_or((None, rest));
    let field = match rest {
        "" => Field::Errno,
        "-rate" => Field::Rate,
        "-file" => Field::File,
        _ => return None,
    };
    Some((op, field))
}

/// The errno names `error=` accepts (exact, case-sensitive).
fn parse_errno(key: &str, value: &str) -> Result<ErrorKind> {
    Ok(match value {
        "EPERM" => ErrorKind::Perm,
        "EIO" => ErrorKind::Io,
        "ENOMEM" => ErrorKind::NoMem,
        "EINVAL" => ErrorKind::Invalid,
        "ENOSPC" => ErrorKind::NoSpace,
        "ESHUTDOWN" => ErrorKind::Shutdown,
        _ => return Err(Error::invalid(format!("{key}: unknown error name '{value}'"))),
    })
}

/// `nbdkit_absolute_path`: the trigger file probably does not exist yet.
fn absolute_path(value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(Error::invalid("cannot convert null or empty path to an absolute path"));
    }
    std::path::absolute(value).map_err(|e| Error::os(format!("absolute path: {value}"), e))
}

/// splitmix64 over an atomic counter: lock-free and good enough to decide
/// whether to fail a request.
struct Rng(AtomicU64);

impl Rng {
    fn from_time() -> Rng {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Rng(AtomicU64::new(t))
    }
    fn next(&self) -> u64 {
        const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = self.0.fetch_add(GAMMA, Ordering::Relaxed).wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

struct ErrorInject {
    ops: [Settings; 6],
    rng: Arc<Rng>,
}

impl Default for ErrorInject {
    fn default() -> ErrorInject {
        ErrorInject { ops: Default::default(), rng: Arc::new(Rng::from_time()) }
    }
}

impl Filter for ErrorInject {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        let Some((op, field)) = parse_key(key) else { return Ok(Param::NotMine) };
        let targets: &mut [Settings] = match op {
            Some(op) => std::slice::from_mut(&mut self.ops[op as usize]),
            None => &mut self.ops,
        };
        match field {
            Field::Errno => {
                let kind = parse_errno(key, value)?;
                for s in targets {
                    s.kind = kind;
                }
            }
            Field::Rate => {
                let rate = parse_probability(key, value)?;
                for s in targets {
                    s.rate = rate;
                }
            }
            Field::File => {
                let file = absolute_path(value)?;
                for s in targets {
                    s.file = Some(file.clone());
                }
            }
        }
        Ok(Param::Used)
    }

    fn open(&self, next: &dyn Next, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let next = next.open(readonly, export, is_tls)?;
        Ok(Box::new(ErrorHandle { next, ops: self.ops.clone(), rng: self.rng.clone() }))
    }
}

struct ErrorHandle {
    next: Box<dyn Handle>,
    ops: [Settings; 6],
    rng: Arc<Rng>,
}

impl ErrorHandle {
    /// nbdkit's `random_error`: Err if an error is to be injected into `op`.
    fn inject(&self, op: Op) -> Result<()> {
        let s = &self.ops[op as usize];
        if !should_inject(s, &self.rng) {
            return Ok(());
        }
        // The server logs the message of every failed call, as nbdkit_error would.
        Err(Error::new(s.kind, format!("injecting {} error into {}", s.kind.name(), op.name())))
    }
}

/// The decision of nbdkit's `random_error`, in its order.
fn should_inject(s: &Settings, rng: &Rng) -> bool {
    if s.rate <= 0.0 {
        return false;
    }
    if s.file.as_ref().is_some_and(|f| !f.exists()) {
        return false;
    }
    // Upstream keeps the low 32 bits of a 64-bit draw (truncation intended).
    s.rate >= 1.0 || f64::from(rng.next() as u32) < s.rate * f64::from(u32::MAX)
}

/// Each data call but flush may fail before reaching the layer below.
impl FilterHandle for ErrorHandle {
    fn next(&self) -> &dyn Handle {
        &*self.next
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Pread)?;
        self.next.pread(buf, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Pwrite)?;
        self.next.pwrite(buf, offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Trim)?;
        self.next.trim(count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Zero)?;
        self.next.zero(count, offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        self.inject(Op::Extents)?;
        self.next.extents(count, offset, flags, ext)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Cache)?;
        self.next.cache(count, offset, flags)
    }
}

inventory::submit! {
    FilterEntry {
        name: "error-inject",
        alias: Some("error"),
        longname: "nbdkit error injection filter",
        description: "nbdkit error injection filter: make requests fail at random, for testing clients",
        help: "error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN\n\
               \x20                              The error indication to return.\n\
               error-rate=0%..100%|0..1       Rate of errors to generate.\n\
               error-file=TRIGGER             Set trigger filename.\n\
               error-pread*, error-pwrite*, error-trim*, error-zero*, error-extents*\n\
               \x20                              Apply settings only to read/write/etc",
        new: || Box::<ErrorInject>::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testutil::MemNext;

    fn configured(args: &[(&str, &str)]) -> ErrorInject {
        let mut f = ErrorInject::default();
        for (k, v) in args {
            assert_eq!(f.config(k, v).unwrap(), Param::Used, "{k}");
        }
        f
    }

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nbdkit-error-test-{}-{tag}", std::process::id()))
    }

    /// Runs every data call but flush once; the kinds of the failures, in Op order.
    fn try_all(h: &dyn Handle) -> Vec<Option<ErrorKind>> {
        let mut buf = [0; 512];
        let mut ext = Extents::new(0, 512);
        [
            h.pread(&mut buf, 0, Flags::NONE),
            h.pwrite(&buf, 0, Flags::NONE),
            h.trim(512, 0, Flags::NONE),
            h.zero(512, 0, Flags::NONE),
            h.extents(512, 0, Flags::NONE, &mut ext),
            h.cache(512, 0, Flags::NONE),
        ]
        .into_iter()
        .map(|r| r.err().map(|e| e.kind()))
        .collect()
    }

    #[test]
    fn rate_one_fails_every_request_but_flush() {
        let next = MemNext::new(4096);
        let h = configured(&[("error", "ENOSPC"), ("error-rate", "100%")]).open(&next, false, "", false).unwrap();
        for _ in 0..20 {
            let mut buf = [0; 512];
            let e = h.pread(&mut buf, 0, Flags::NONE).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NoSpace);
            assert_eq!(e.message(), "injecting ENOSPC error into pread");
            h.flush(Flags::NONE).unwrap();
        }
        assert_eq!(try_all(&*h), [Some(ErrorKind::NoSpace); 6]);
        assert!(next.calls().iter().all(|&c| c == "flush"));
    }

    #[test]
    fn rate_zero_never_fails() {
        let next = MemNext::new(4096);
        for args in [&[][..], &[("error-rate", "0")], &[("error-rate", "1"), ("error-rate", "0%")]] {
            let h = configured(args).open(&next, false, "", false).unwrap();
            for _ in 0..20 {
                assert_eq!(try_all(&*h), [None; 6]);
            }
        }
    }

    #[test]
    fn a_fractional_rate_fails_some_requests() {
        // The decision alone, so 10000 draws do not log 1000 errors.
        let f = configured(&[("error-pread-rate", "1:10")]);
        let fails = (0..10_000).filter(|_| should_inject(&f.ops[Op::Pread as usize], &f.rng)).count();
        assert!((500..1500).contains(&fails), "{fails} failures of 10000 at 10%");
        let next = MemNext::new(4096);
        let h = configured(&[("error-pread-rate", "50%")]).open(&next, false, "", false).unwrap();
        let mut buf = [0; 512];
        let fails = (0..40).filter(|_| h.pread(&mut buf, 0, Flags::NONE).is_err()).count();
        assert!((1..40).contains(&fails), "{fails} failures of 40 at 50%");
    }

    #[test]
    fn the_error_file_switches_injection_on_and_off() {
        let path = temp_path("trigger");
        let _ = std::fs::remove_file(&path);
        let next = MemNext::new(4096);
        let f = configured(&[("error-rate", "1"), ("error-file", path.to_str().unwrap())]);
        let h = f.open(&next, false, "", false).unwrap();
        assert_eq!(try_all(&*h), [None; 6]);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(try_all(&*h), [Some(ErrorKind::Io); 6]);
        h.flush(Flags::NONE).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(try_all(&*h), [None; 6]);
    }

    #[test]
    fn per_operation_keys_and_later_keys_override_earlier_ones() {
        let next = MemNext::new(4096);
        let io = Some(ErrorKind::Io);
        let f = configured(&[("error-pwrite-rate", "1"), ("error-pwrite", "EPERM"), ("error-cache-rate", "1")]);
        let h = f.open(&next, false, "", false).unwrap();
        assert_eq!(try_all(&*h), [None, Some(ErrorKind::Perm), None, None, None, io]);

        // error-rate after error-pread-rate resets it; error after error-zero too.
        let f = configured(&[("error-pread-rate", "0"), ("error-zero", "EINVAL"), ("error-rate", "1"),
                             ("error", "ENOMEM"), ("error-trim-rate", "0"), ("error-extents", "ESHUTDOWN")]);
        let h = f.open(&next, false, "", false).unwrap();
        let nomem = Some(ErrorKind::NoMem);
        assert_eq!(try_all(&*h), [nomem, nomem, None, nomem, Some(ErrorKind::Shutdown), nomem]);

        // A per-operation file only gates that operation.
        let f = configured(&[("error-rate", "1"), ("error-trim-file", "/nonexistent/error-test")]);
        let h = f.open(&next, false, "", false).unwrap();
        assert_eq!(try_all(&*h), [io, io, None, io, io, io]);
    }

    #[test]
    fn registered_as_error_inject_and_used_as_error() {
        let e = crate::backend::registry::filter("error").unwrap();
        assert_eq!((e.name, e.longname), ("error-inject", "nbdkit error injection filter"));
        assert!(std::ptr::eq(e, crate::backend::registry::filter("error-inject").unwrap()));
        assert_eq!(e.help.lines().nth(1).unwrap(), format!("{:31}The error indication to return.", ""));
    }

    #[test]
    fn bad_values_are_refused() {
        let mut f = ErrorInject::default();
        for (k, v) in [("error", "eio"), ("error", "EROFS"), ("error", ""), ("error-pread", "EIO ")] {
            let e = f.config(k, v).unwrap_err();
            assert_eq!(e.message(), format!("{k}: unknown error name '{v}'"));
        }
        for (k, v) in [("error-rate", "2"), ("error-rate", "-0.5"), ("error-zero-rate", "x"), ("error-rate", "150%")] {
            assert!(f.config(k, v).is_err(), "{k}={v}");
        }
        assert!(f.config("error-file", "").is_err());
        for key in ["errors", "error-flush", "error-pread-x", "error-rate-pread", "rate"] {
            assert_eq!(f.config(key, "1").unwrap(), Param::NotMine, "{key}");
        }
        assert_eq!(f.config("error-extents-file", "rel").unwrap(), Param::Used);
        assert!(f.ops[Op::Extents as usize].file.as_ref().unwrap().is_absolute());
    }
}
