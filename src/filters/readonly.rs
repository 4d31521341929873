//! `readonly`: make the export read-only, for good or while a file exists.
//!
//! Without parameters the filter opens the layer below read-only and
//! answers `can_write` with false, so clients see a read-only export.
//! With `readonly-file=PATH` the export keeps its capabilities, and every
//! write, trim and zero fails with EROFS while PATH exists (checked on each
//! request, so the file can be created and removed at run time).
//!
//! Two deliberate differences from nbdkit 1.38's `filters/readonly`:
//! upstream passes `readonly=0` to the layer below in permanent mode (an
//! inverted test: the documented intent is 1, which lets e.g. the file
//! plugin open `O_RDONLY`), and it keeps `readonly-file` as given instead
//! of making it absolute before the server may change directory.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::backend::{Caps, Filter, FilterEntry, FilterHandle, Flags, Handle, Next, Param};
use crate::error::{Error, ErrorKind, Result};

#[derive(Default)]
struct Readonly {
    /// `readonly-file`, absolute; `None` means permanently read-only.
    file: Option<PathBuf>,
}

impl Filter for Readonly {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "readonly-file" => {
                if self.file.is_some() {
                    return Err(Error::invalid("readonly-file parameter appears multiple times"));
                }
                self.file = Some(absolute_path(value)?);
            }
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn open(&self, next: &dyn Next, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let next = next.open(readonly || self.file.is_none(), export, is_tls)?;
        Ok(Box::new(ReadonlyHandle { next, file: self.file.clone() }))
    }
}

struct ReadonlyHandle {
    next: Box<dyn Handle>,
    file: Option<PathBuf>,
}

impl ReadonlyHandle {
    /// Fails `op` if the export is read-only right now.
    fn check(&self, op: &str) -> Result<()> {
        let readonly = match &self.file {
            None => true,
            Some(path) => readable(path),
        };
        if readonly {
            return Err(Error::new(ErrorKind::ReadOnly, format!("{op} operation rejected by readonly filter")));
        }
        Ok(())
    }
}

/// Only writes change; pread, flush (so earlier writes can still be
/// persisted), extents and cache pass through.
impl FilterHandle for ReadonlyHandle {
    fn next(&self) -> &dyn Handle {
        &*self.next
    }
    fn caps(&self) -> Result<Caps> {
        let caps = self.next.caps()?;
        Ok(match self.file {
            None => Caps { write: false, ..caps }.normalized(),
            Some(_) => caps,
        })
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check("pwrite")?;
        self.next.pwrite(buf, offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("trim")?;
        self.next.trim(count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check("zero")?;
        self.next.zero(count, offset, flags)
    }
}

/// `access(path, R_OK) == 0`, as upstream tests it.
#[allow(unsafe_code)]
fn readable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::R_OK) == 0 }
}

/// `nbdkit_absolute_path`: relative paths are taken from the current
/// directory now, as the file may not exist yet.
fn absolute_path(value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(Error::invalid("cannot convert null or empty path to an absolute path"));
    }
    std::path::absolute(value).map_err(|e| Error::os(format!("absolute path: {value}"), e))
}

inventory::submit! {
    FilterEntry {
        name: "readonly",
        alias: None,
        longname: "nbdkit readonly filter",
        description: "nbdkit readonly filter: make the export read-only, always or while a file exists",
        help: "readonly-file=FILENAME         If FILENAME present, set to readonly",
        new: || Box::<Readonly>::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filters::testutil::MemNext;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("nbdkit-readonly-test-{}-{tag}", std::process::id()))
    }

    #[test]
    fn permanent_mode_opens_next_readonly_and_reports_no_write() {
        let next = MemNext::new(4096);
        let filter = Readonly::default();
        let h = filter.open(&next, false, "", false).unwrap();
        assert_eq!(next.opened_readonly(), [true]);
        let caps = h.caps().unwrap();
        assert!(!caps.write && !caps.trim && !caps.fast_zero);
        let e = h.pwrite(&[1; 512], 0, Flags::NONE).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(e.message(), "pwrite operation rejected by readonly filter");
        let mut buf = [0xaa; 512];
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        h.flush(Flags::NONE).unwrap();
        assert_eq!(next.calls(), ["pread", "flush"]);
    }

    #[test]
    fn readonly_file_toggles_writes_at_run_time() {
        let path = temp_path("toggle");
        let _ = std::fs::remove_file(&path);
        let mut filter = Readonly::default();
        filter.config("readonly-file", path.to_str().unwrap()).unwrap();
        let next = MemNext::new(4096);
        let h = filter.open(&next, false, "", false).unwrap();
        assert_eq!(next.opened_readonly(), [false]);
        assert!(h.caps().unwrap().write);

        h.pwrite(&[1; 512], 0, Flags::NONE).unwrap();
        std::fs::write(&path, b"").unwrap();
        for (op, e) in [
            ("pwrite", h.pwrite(&[2; 512], 0, Flags::NONE).unwrap_err()),
            ("trim", h.trim(512, 0, Flags::NONE).unwrap_err()),
            ("zero", h.zero(512, 0, Flags::NONE).unwrap_err()),
        ] {
            assert_eq!(e.kind(), ErrorKind::ReadOnly);
            assert_eq!(e.message(), format!("{op} operation rejected by readonly filter"));
        }
        let mut buf = [0; 512];
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert_eq!(buf, [1; 512]);
        h.flush(Flags::NONE).unwrap();
        std::fs::remove_file(&path).unwrap();
        h.pwrite(&[3; 512], 0, Flags::NONE).unwrap();
        assert_eq!(next.calls(), ["pwrite", "pread", "flush", "pwrite"]);
    }

    #[test]
    fn readonly_file_is_made_absolute_and_given_once() {
        let mut filter = Readonly::default();
        assert_eq!(filter.config("size", "1M").unwrap(), Param::NotMine);
        filter.config("readonly-file", "some-file").unwrap();
        assert!(filter.file.as_ref().unwrap().is_absolute());
        let e = filter.config("readonly-file", "/x").unwrap_err();
        assert_eq!(e.message(), "readonly-file parameter appears multiple times");
        assert!(Readonly::default().config("readonly-file", "").is_err());
    }

    #[test]
    fn a_readonly_open_stays_readonly_in_file_mode() {
        let mut filter = Readonly::default();
        filter.config("readonly-file", "/nonexistent/readonly-test").unwrap();
        let next = MemNext::new(512);
        filter.open(&next, true, "", false).unwrap();
        assert_eq!(next.opened_readonly(), [true]);
    }
}
