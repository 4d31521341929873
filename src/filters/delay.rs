//! `delay`: sleep before requests, to imitate a slow disk or network.
//!
//! Every sleep but the close delay is interruptible: it ends early with
//! ESHUTDOWN when the server shuts down or the client hangs up (nbdkit's
//! `nbdkit_nanosleep`). The close delay is a plain sleep when the handle is
//! dropped, as upstream's is in `.close`; unlike upstream it also runs when
//! the connection ends abruptly.

use std::time::Duration;

use crate::backend::{Caps, Extents, Filter, FilterEntry, FilterHandle, Flags, Handle, Next, Param};
use crate::error::{Error, ErrorKind, Result};
use crate::util::parse::{parse_bool, parse_delay};
use crate::util::shutdown;

#[derive(Debug, Clone, Copy)]
struct Delays {
    read: Duration,
    write: Duration,
    zero: Duration,
    trim: Duration,
    extents: Duration,
    cache: Duration,
    open: Duration,
    close: Duration,
    /// False: fail `FAST_ZERO` requests at once instead of delaying them.
    fast_zero: bool,
}

impl Default for Delays {
    fn default() -> Delays {
        let z = Duration::ZERO;
        Delays { read: z, write: z, zero: z, trim: z, extents: z, cache: z, open: z, close: z, fast_zero: true }
    }
}

impl Delays {
    /// True if any request may sleep.
    fn any(&self) -> bool {
        [self.read, self.write, self.zero, self.trim, self.extents, self.cache, self.open, self.close]
            .iter()
            .any(|d| !d.is_zero())
    }
    /// `FAST_ZERO` requests fail at once, and fast zero is advertised.
    fn refuse_fast_zero(&self) -> bool {
        !self.zero.is_zero() && !self.fast_zero
    }
}

impl Filter for Delays {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        let d = || parse_delay(key, value);
        match key {
            "rdelay" | "delay-read" | "delay-reads" => self.read = d()?,
            "delay-write" | "delay-writes" => self.write = d()?,
            // Historically wdelay sets every write-like delay; a later
            // specific key still overrides it.
            "wdelay" => {
                self.write = d()?;
                self.zero = self.write;
                self.trim = self.write;
            }
            "delay-zero" | "delay-zeroes" => self.zero = d()?,
            "delay-trim" | "delay-trims" | "delay-discard" | "delay-discards" => self.trim = d()?,
            "delay-extent" | "delay-extents" => self.extents = d()?,
            "delay-cache" => self.cache = d()?,
            "delay-open" => self.open = d()?,
            "delay-close" => self.close = d()?,
            "delay-fast-zero" => self.fast_zero = parse_bool(value)?,
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn open(&self, next: &dyn Next, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        sleep(self.open).map_err(|e| Error::new(e.kind(), format!("delay: {}", e.message())))?;
        let next = next.open(readonly, export, is_tls)?;
        Ok(Box::new(DelayHandle { next, delays: *self }))
    }
}

/// `nbdkit_nanosleep`, skipped when there is nothing to wait for.
fn sleep(d: Duration) -> Result<()> {
    if d.is_zero() {
        return Ok(());
    }
    shutdown::sleep(d)
}

struct DelayHandle {
    next: Box<dyn Handle>,
    delays: Delays,
}

/// Each data call sleeps, then forwards; size, flush and the rest forward.
impl FilterHandle for DelayHandle {
    fn next(&self) -> &dyn Handle {
        &*self.next
    }
    fn blocks(&self) -> bool {
        self.delays.any() || self.next.blocks()
    }
    fn brief(&self) -> bool {
        !self.delays.any() && self.next.brief()
    }
    fn caps(&self) -> Result<Caps> {
        let caps = self.next.caps()?;
        if self.delays.refuse_fast_zero() {
            // Advertised because this layer answers FAST_ZERO itself.
            return Ok(Caps { fast_zero: true, ..caps });
        }
        Ok(caps)
    }
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.read)?;
        self.next.pread(buf, offset, flags)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.write)?;
        self.next.pwrite(buf, offset, flags)
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.trim)?;
        self.next.trim(count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FAST_ZERO) && self.delays.refuse_fast_zero() {
            return Err(Error::new(ErrorKind::NotSupported, "delay: fast zero refused: zero requests are delayed"));
        }
        sleep(self.delays.zero)?;
        self.next.zero(count, offset, flags)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        sleep(self.delays.extents)?;
        self.next.extents(count, offset, flags, ext)
    }
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        sleep(self.delays.cache)?;
        self.next.cache(count, offset, flags)
    }
}

impl Drop for DelayHandle {
    fn drop(&mut self) {
        // Not interruptible, as upstream: it delays server shutdown too.
        if !self.delays.close.is_zero() {
            std::thread::sleep(self.delays.close);
        }
    }
}

inventory::submit! {
    FilterEntry {
        name: "delay",
        alias: None,
        longname: "nbdkit delay filter",
        description: "nbdkit delay filter: inject delays before requests, to imitate a slow disk",
        // As upstream's --help, which still shows the pre-1.40 value syntax;
        // values are parsed by parse_delay (`1.5`, `100ms`, `3us`, `1000ns`, `2s`).
        help: "rdelay=<NN>[ms]                Read delay in seconds/milliseconds.\n\
               delay-read=<NN>[ms]            Read delay in seconds/milliseconds.\n\
               delay-write=<NN>[ms]           Write delay in seconds/milliseconds.\n\
               delay-zero=<NN>[ms]            Zero delay in seconds/milliseconds.\n\
               delay-trim=<NN>[ms]            Trim delay in seconds/milliseconds.\n\
               delay-extents=<NN>[ms]         Extents delay in seconds/milliseconds.\n\
               delay-cache=<NN>[ms]           Cache delay in seconds/milliseconds.\n\
               wdelay=<NN>[ms]                Write, zero and trim delay in secs/msecs.\n\
               delay-fast-zero=<BOOL>         Delay fast zero requests (default true).\n\
               delay-open=<NN>[ms]            Open delay in seconds/milliseconds.\n\
               delay-close=<NN>[ms]           Close delay in seconds/milliseconds.",
        new: || Box::<Delays>::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::filters::testutil::MemNext;

    fn configured(args: &[(&str, &str)]) -> Delays {
        let mut f = Delays::default();
        for (k, v) in args {
            assert_eq!(f.config(k, v).unwrap(), Param::Used, "{k}");
        }
        f
    }

    #[test]
    fn every_key_and_alias_is_taken() {
        let ms = Duration::from_millis;
        let f = configured(&[("rdelay", "1ms"), ("delay-reads", "2ms"), ("delay-writes", "3ms"),
                             ("delay-zeroes", "4ms"), ("delay-discards", "5ms"), ("delay-extent", "6ms"),
                             ("delay-cache", "7ms"), ("delay-open", "8ms"), ("delay-close", "9ms")]);
        assert_eq!([f.read, f.write, f.zero, f.trim, f.extents, f.cache, f.open, f.close],
                   [ms(2), ms(3), ms(4), ms(5), ms(6), ms(7), ms(8), ms(9)]);
        for key in ["delay-read", "delay-write", "delay-zero", "delay-trim", "delay-trims",
                    "delay-discard", "delay-extents"] {
            configured(&[(key, "1.5")]);
        }
        assert!(!configured(&[("delay-fast-zero", "off")]).fast_zero);
        assert_eq!(Delays::default().config("rate", "1").unwrap(), Param::NotMine);
        assert!(Delays::default().config("rdelay", "10x").is_err());
        assert!(Delays::default().config("delay-fast-zero", "maybe").is_err());
    }

    #[test]
    fn wdelay_sets_write_zero_and_trim_in_order() {
        let f = configured(&[("delay-trim", "1s"), ("wdelay", "2s"), ("delay-zero", "3s")]);
        assert_eq!((f.write, f.trim, f.zero), (Duration::from_secs(2), Duration::from_secs(2), Duration::from_secs(3)));
        assert!(f.read.is_zero());
    }

    #[test]
    fn reads_are_delayed_by_at_least_the_configured_time() {
        let next = MemNext::new(4096);
        let h = configured(&[("rdelay", "50ms")]).open(&next, false, "", false).unwrap();
        assert!(h.blocks() && !h.brief(), "a delay is never brief");
        let mut buf = [0; 512];
        let t = Instant::now();
        h.pread(&mut buf, 0, Flags::NONE).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50), "{:?}", t.elapsed());
        let t = Instant::now();
        h.pwrite(&buf, 0, Flags::NONE).unwrap();
        assert!(t.elapsed() < Duration::from_millis(50));
        assert_eq!(next.calls(), ["pread", "pwrite"]);
    }

    #[test]
    fn without_delays_the_handle_does_not_block() {
        let next = MemNext::new(512);
        let h = Delays::default().open(&next, false, "", false).unwrap();
        assert!(!h.blocks() && h.brief());
    }

    #[test]
    fn a_delay_ends_early_when_the_client_hangs_up() {
        let next = MemNext::new(4096);
        let h = configured(&[("rdelay", "30")]).open(&next, false, "", false).unwrap();
        let gone = Arc::new(AtomicBool::new(false));
        let g2 = gone.clone();
        let t = Instant::now();
        let worker = std::thread::spawn(move || {
            let mut buf = [0; 512];
            shutdown::with_connection(&g2, || h.pread(&mut buf, 0, Flags::NONE))
        });
        std::thread::sleep(Duration::from_millis(50));
        gone.store(true, Ordering::Release);
        shutdown::wake_sleepers();
        let e = worker.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Shutdown);
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(next.calls().is_empty());
    }

    #[test]
    fn fast_zero_refused_at_once_when_delay_fast_zero_is_false() {
        let next = MemNext::new(4096);
        let f = configured(&[("delay-zero", "50ms"), ("delay-fast-zero", "false")]);
        let h = f.open(&next, false, "", false).unwrap();
        assert!(h.caps().unwrap().fast_zero);
        let t = Instant::now();
        let e = h.zero(512, 0, Flags::FAST_ZERO).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert!(t.elapsed() < Duration::from_millis(50));
        h.zero(512, 0, Flags::NONE).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(next.calls(), ["zero"]);

        // The default (true) delays fast zeroes and leaves the caps alone.
        let h = configured(&[("delay-zero", "1ms")]).open(&next, false, "", false).unwrap();
        assert!(!h.caps().unwrap().fast_zero);
        h.zero(512, 0, Flags::FAST_ZERO).unwrap();
        // And false without a zero delay changes nothing.
        let h = configured(&[("delay-fast-zero", "0")]).open(&next, false, "", false).unwrap();
        assert!(!h.caps().unwrap().fast_zero);
        h.zero(512, 0, Flags::FAST_ZERO).unwrap();
    }

    #[test]
    fn open_and_close_delays() {
        let next = MemNext::new(512);
        let f = configured(&[("delay-open", "30ms"), ("delay-close", "30ms")]);
        let t = Instant::now();
        let h = f.open(&next, false, "", false).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
        let t = Instant::now();
        drop(h);
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
