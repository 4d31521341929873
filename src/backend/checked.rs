//! The checking layer between every two layers (nbdkit's `backend.c`):
//! asks size and capabilities once per connection and caches them,
//! applies the knock-on rules (`-r` turns off write, trim, zero and FUA
//! without asking the layer), range-checks every data call, and emulates
//! what the layer below lacks: zero by writing zeroes (except fast zero),
//! FUA by flush, cache by reading, block status by one data extent.

use super::{BlockSize, Caps, Extents, Flags, Handle, Support};
use crate::error::{Error, ErrorKind, Result};
use crate::util::log;

/// nbdkit's backend trace line, only built when `-v` asks for it.
macro_rules! trace {
    ($self:ident, $($arg:tt)*) => {
        if log::trace_datapath() {
            log::debug(&format!("{}: {}", $self.name, format_args!($($arg)*)));
        }
    };
}

/// Zero-write fallback chunk: a static buffer, so it costs no allocation.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// One layer's handle, with its answers cached and its calls checked.
pub struct Checked {
    name: &'static str,
    inner: Box<dyn Handle>,
    size: u64,
    caps: Caps,
    blocks: bool,
}

impl Checked {
    /// Wraps a freshly opened handle, asking its size and capabilities now
    /// (nbdkit asks them all during negotiation anyway).
    pub fn new(name: &'static str, inner: Box<dyn Handle>, readonly: bool) -> Result<Checked> {
        let control = log::trace_controlpath();
        if control {
            log::debug(&format!("{name}: prepare readonly={}", readonly as u8));
            log::debug(&format!("{name}: get_size"));
        }
        let size = inner.size()?;
        if size > i64::MAX as u64 {
            return Err(Error::invalid(format!("get_size: size {size} is larger than 2^63-1")));
        }
        let mut caps = inner.caps()?;
        if readonly {
            caps.write = false;
        }
        let caps = caps.normalized();
        if control {
            // One call asks them all; the lines are nbdkit's, in its order
            // (under -r it does not ask can_write).
            for (c, asked) in [
                ("can_write", !readonly),
                ("can_zero", true),
                ("can_fast_zero", true),
                ("can_trim", true),
                ("can_fua", true),
                ("can_flush", true),
                ("is_rotational", true),
                ("can_multi_conn", true),
                ("can_cache", true),
                ("can_extents", true),
            ] {
                if asked {
                    log::debug(&format!("{name}: {c}"));
                }
            }
        }
        let blocks = inner.blocks();
        Ok(Checked { name, inner, size, caps, blocks })
    }

    fn range(&self, count: u64, offset: u64, kind: ErrorKind) -> Result<()> {
        match offset.checked_add(count) {
            Some(end) if count > 0 && end <= self.size => Ok(()),
            _ => Err(Error::new(
                kind,
                format!("request out of range: offset={offset} count={count} size={}", self.size),
            )),
        }
    }

    fn writable(&self) -> Result<()> {
        if self.caps.write {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::ReadOnly, "write to a read-only export"))
        }
    }

    /// Runs a write-type call with FUA handled: passed down when the layer
    /// does it natively, emulated by a flush afterwards otherwise.
    fn with_fua(&self, flags: Flags, op: impl FnOnce(Flags) -> Result<()>) -> Result<()> {
        if !flags.contains(Flags::FUA) {
            return op(flags);
        }
        match self.caps.fua {
            Support::Native => op(flags),
            Support::Emulate => {
                op(flags.without(Flags::FUA))?;
                self.inner.flush(Flags::NONE)
            }
            Support::None => Err(Error::invalid("FUA not supported")),
        }
    }

    /// Zeroes by writing zero buffers, advancing through the range (nbdkit
    /// before 1.44.1 rewrote the first 64 MiB over and over).
    fn write_zeroes(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let fua = flags.contains(Flags::FUA);
        let (mut off, end) = (offset, offset + count);
        while off < end {
            let n = (end - off).min(ZERO_CHUNK as u64);
            let last = off + n == end;
            let f = if last && fua && self.caps.fua == Support::Native { Flags::FUA } else { Flags::NONE };
            self.inner.pwrite(&ZEROES[..n as usize], off, f)?;
            off += n;
        }
        if fua && self.caps.fua == Support::Emulate {
            self.inner.flush(Flags::NONE)?;
        }
        Ok(())
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        // The connection's end: nbdkit finalizes and closes each layer.
        if log::trace_controlpath() {
            log::debug(&format!("{}: finalize", self.name));
            log::debug(&format!("{}: close", self.name));
        }
    }
}

impl Handle for Checked {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn caps(&self) -> Result<Caps> {
        Ok(self.caps)
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        if log::trace_controlpath() {
            log::debug(&format!("{}: block_size", self.name));
        }
        match self.inner.block_size()? {
            Some(b) if b.min == 0 => Ok(None),
            Some(b) if !b.is_valid() => Err(Error::invalid(format!(
                "block_size: invalid minimum/preferred/maximum {}/{}/{}",
                b.min, b.preferred, b.max
            ))),
            other => Ok(other),
        }
    }

    fn export_description(&self) -> Option<String> {
        if log::trace_controlpath() {
            log::debug(&format!("{}: export_description", self.name));
        }
        self.inner.export_description().filter(|d| d.len() <= 4096)
    }

    fn blocks(&self) -> bool {
        self.blocks
    }

    fn brief(&self) -> bool {
        self.inner.brief()
    }

    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        trace!(self, "pread count={} offset={}", buf.len(), offset);
        self.range(buf.len() as u64, offset, ErrorKind::Invalid)?;
        self.inner.pread(buf, offset, flags)
    }

    fn pread_lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        if let Err(e) = self.range(count as u64, offset, ErrorKind::Invalid) {
            return Some(Err(e));
        }
        let r = self.inner.pread_lend(count, offset, sink);
        if r.is_some() {
            trace!(self, "pread count={} offset={}", count, offset);
        }
        r
    }

    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        // Out of range: the usual path reports it.
        self.range(buf.len() as u64, offset, ErrorKind::Invalid).ok()?;
        let r = self.inner.pread_nowait(buf, offset);
        if r.is_some() {
            trace!(self, "pread count={} offset={}", buf.len(), offset);
        }
        r
    }

    fn pread_fd(&self, count: usize, offset: u64, cached_only: bool) -> Option<(std::os::fd::RawFd, u64)> {
        // Out of range: the usual path reports it.
        self.range(count as u64, offset, ErrorKind::Invalid).ok()?;
        let r = self.inner.pread_fd(count, offset, cached_only);
        if r.is_some() {
            trace!(self, "pread count={} offset={}", count, offset);
        }
        r
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        trace!(self, "pwrite count={} offset={} fua={}", buf.len(), offset, flags.contains(Flags::FUA) as u8);
        self.writable()?;
        self.range(buf.len() as u64, offset, ErrorKind::NoSpace)?;
        self.with_fua(flags, |f| self.inner.pwrite(buf, offset, f))
    }

    fn pwrite_fill(&self, count: usize, offset: u64, flags: Flags,
                   fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        if let Err(e) = self.writable().and_then(|()| self.range(count as u64, offset, ErrorKind::NoSpace)) {
            return Some(Err(e));
        }
        let mut filled = true;
        let r = self.with_fua(flags, |f| match self.inner.pwrite_fill(count, offset, f, fill) {
            Some(r) => r,
            None => {
                filled = false;
                Ok(())
            }
        });
        if !filled {
            return None;
        }
        trace!(self, "pwrite count={} offset={} fua={}", count, offset, flags.contains(Flags::FUA) as u8);
        Some(r)
    }

    fn flush(&self, flags: Flags) -> Result<()> {
        if log::trace_controlpath() {
            log::debug(&format!("{}: flush", self.name));
        }
        self.inner.flush(flags)
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        trace!(self, "trim count={} offset={} fua={}", count, offset, flags.contains(Flags::FUA) as u8);
        self.writable()?;
        if !self.caps.trim {
            return Err(Error::invalid("trim not supported"));
        }
        self.range(count, offset, ErrorKind::Invalid)?;
        self.with_fua(flags, |f| self.inner.trim(count, offset, f))
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        trace!(self, "zero count={} offset={} may_trim={} fua={} fast={}", count, offset,
               flags.contains(Flags::MAY_TRIM) as u8, flags.contains(Flags::FUA) as u8, flags.contains(Flags::FAST_ZERO) as u8);
        self.writable()?;
        self.range(count, offset, ErrorKind::NoSpace)?;
        let fast = flags.contains(Flags::FAST_ZERO);
        if fast && !self.caps.fast_zero {
            return Err(Error::new(ErrorKind::NotSupported, "fast zero not supported"));
        }
        match self.caps.zero {
            Support::None => Err(Error::invalid("zero not supported")),
            Support::Emulate if fast => {
                Err(Error::new(ErrorKind::NotSupported, "fast zero requested but zero is emulated"))
            }
            Support::Emulate => self.write_zeroes(count, offset, flags),
            Support::Native => {
                let fua_native = self.caps.fua == Support::Native;
                let down = if fua_native { flags } else { flags.without(Flags::FUA) };
                match self.inner.zero(count, offset, down) {
                    Err(e) if e.kind() == ErrorKind::NotSupported && !fast => {
                        self.write_zeroes(count, offset, flags.without(Flags::MAY_TRIM))
                    }
                    Err(e) => Err(e),
                    Ok(()) if flags.contains(Flags::FUA) && !fua_native => self.inner.flush(Flags::NONE),
                    Ok(()) => Ok(()),
                }
            }
        }
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        trace!(self, "extents count={} offset={} req_one={}", count, offset, flags.contains(Flags::REQ_ONE) as u8);
        self.range(count, offset, ErrorKind::Invalid)?;
        if !self.caps.extents {
            return ext.add(offset, count, 0);
        }
        let before = ext.count();
        self.inner.extents(count, offset, flags, ext)?;
        if ext.count() == before && ext.covered_to() <= offset {
            return Err(Error::invalid("extents: plugin must add at least one extent"));
        }
        Ok(())
    }

    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        trace!(self, "cache count={} offset={}", count, offset);
        self.range(count, offset, ErrorKind::Invalid)?;
        match self.caps.cache {
            Support::None => Err(Error::invalid("cache not supported")),
            Support::Native => self.inner.cache(count, offset, flags),
            Support::Emulate => {
                let mut buf = Vec::new();
                let chunk = count.min(ZERO_CHUNK as u64) as usize;
                buf.try_reserve_exact(chunk).map_err(|_| Error::new(ErrorKind::NoMem, "cache: out of memory"))?;
                buf.resize(chunk, 0);
                let (mut off, end) = (offset, offset + count);
                while off < end {
                    let n = (end - off).min(chunk as u64) as usize;
                    self.inner.pread(&mut buf[..n], off, Flags::NONE)?;
                    off += n as u64;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A RAM disk whose caps the test chooses, counting flushes.
    struct Ram {
        data: Mutex<Vec<u8>>,
        caps: Caps,
        flushes: std::sync::Arc<Mutex<u32>>,
        zero_fails: bool,
    }

    impl Handle for Ram {
        fn size(&self) -> Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
        fn caps(&self) -> Result<Caps> {
            Ok(self.caps)
        }
        fn pread(&self, buf: &mut [u8], offset: u64, _f: Flags) -> Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn pwrite(&self, buf: &[u8], offset: u64, f: Flags) -> Result<()> {
            assert!(!f.contains(Flags::FUA) || self.caps.fua == Support::Native);
            self.data.lock().unwrap()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self, _f: Flags) -> Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
        fn zero(&self, count: u64, offset: u64, _f: Flags) -> Result<()> {
            if self.zero_fails {
                return Err(Error::new(ErrorKind::NotSupported, "no"));
            }
            self.data.lock().unwrap()[offset as usize..(offset + count) as usize].fill(0);
            Ok(())
        }
    }

    fn ram(size: usize, caps: Caps, zero_fails: bool) -> Box<Ram> {
        Box::new(Ram { data: Mutex::new(vec![0xaa; size]), caps, flushes: Default::default(), zero_fails })
    }

    const RW: Caps = Caps {
        write: true, flush: true, rotational: false, trim: false, zero: Support::Native,
        fast_zero: false, extents: false, fua: Support::Emulate, multi_conn: false, cache: Support::Emulate,
    };

    #[test]
    fn readonly_turns_off_writes_without_asking() {
        let c = Checked::new("ram", ram(4096, RW, false), true).unwrap();
        let caps = c.caps().unwrap();
        assert!(!caps.write && caps.zero == Support::None && caps.fua == Support::None);
        assert_eq!(c.pwrite(&[1; 512], 0, Flags::NONE).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(c.zero(512, 0, Flags::NONE).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        let c = Checked::new("ram", ram(4096, RW, false), false).unwrap();
        let mut b = [0; 512];
        assert_eq!(c.pread(&mut b, 4000, Flags::NONE).unwrap_err().kind(), ErrorKind::Invalid);
        assert_eq!(c.pwrite(&b, u64::MAX - 10, Flags::NONE).unwrap_err().kind(), ErrorKind::NoSpace);
        assert_eq!(c.pread(&mut [], 0, Flags::NONE).unwrap_err().kind(), ErrorKind::Invalid);
        assert_eq!(c.cache(u64::MAX, 1, Flags::NONE).unwrap_err().kind(), ErrorKind::Invalid);
        c.pread(&mut b, 4096 - 512, Flags::NONE).unwrap();
    }

    #[test]
    fn zero_falls_back_to_writes_but_not_for_fast_zero() {
        let caps = Caps { fast_zero: true, ..RW };
        let c = Checked::new("ram", ram(3 * ZERO_CHUNK, caps, true), false).unwrap();
        let e = c.zero(512, 0, Flags::FAST_ZERO).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        // More than one chunk: every chunk must be zeroed, not the first again.
        c.zero(2 * ZERO_CHUNK as u64 + 7, 100, Flags::MAY_TRIM).unwrap();
        let mut b = vec![1; 3 * ZERO_CHUNK];
        c.pread(&mut b, 0, Flags::NONE).unwrap();
        assert!(b[..100].iter().all(|&x| x == 0xaa));
        assert!(b[100..100 + 2 * ZERO_CHUNK + 7].iter().all(|&x| x == 0));
        assert!(b[100 + 2 * ZERO_CHUNK + 7..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn fua_is_emulated_by_flush() {
        let r = ram(4096, RW, false);
        let flushes = r.flushes.clone();
        let c = Checked::new("ram", r, false).unwrap();
        c.pwrite(&[1; 512], 0, Flags::FUA).unwrap();
        assert_eq!(*flushes.lock().unwrap(), 1);
        c.zero(512, 0, Flags::FUA).unwrap();
        assert_eq!(*flushes.lock().unwrap(), 2);
        c.pwrite(&[1; 512], 0, Flags::NONE).unwrap();
        assert_eq!(*flushes.lock().unwrap(), 2);
    }

    #[test]
    fn extents_are_synthesized_when_the_layer_has_none() {
        let c = Checked::new("ram", ram(4096, RW, false), false).unwrap();
        let mut e = Extents::new(512, 4096);
        c.extents(1024, 512, Flags::NONE, &mut e).unwrap();
        assert_eq!(e.list(), &[super::super::Extent { offset: 512, length: 1024, typ: 0 }]);
    }
}
