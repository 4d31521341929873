//! `data`: a disk described on the command line (`data='…'`, `base64=`,
//! `raw=`), writable, shared by every connection, lost at exit.
//!
//! The data string goes parser → AST → optimizer → evaluator, which makes
//! a lazy [`image::Image`]: repeats, fills and slices are computed when
//! read, never materialized, so `( 0x55 0xAA )*536870912` starts at once.
//! Writes go to an overlay: the first write, trim or zero to a 32 KiB page
//! copies that page of the pattern into the allocator (the memory
//! plugin's), which then holds it; the page is "overridden" from then on.

mod ast;
mod eval;
mod image;
mod optimize;
mod parser;
mod ranges;

use std::sync::{Arc, Mutex, RwLock};

use super::allocator::{self, Allocator};
use crate::backend::extents::{HOLE, ZERO};
use crate::backend::{BlockSize, Caps, Extents, Flags, Handle, Param, Plugin, PluginEntry, ThreadModel};
use crate::error::{Error, Result};
use crate::util::parse::parse_size;
use eval::{Evaluated, PAGE};
use ranges::RangeSet;

/// Which parameter gave the data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Data(String),
    Base64(String),
    Raw(String),
}

struct Data {
    source: Option<Source>,
    size: Option<u64>,
    allocator: String,
    /// Extra `key=value` parameters, for `$key`.
    vars: Vec<(String, String)>,
    disk: Option<Arc<Disk>>,
}

impl Default for Data {
    fn default() -> Data {
        Data { source: None, size: None, allocator: "sparse".to_string(), vars: Vec::new(), disk: None }
    }
}

impl Plugin for Data {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        let source = match key {
            "data" => Source::Data(value.to_string()),
            "base64" => Source::Base64(value.to_string()),
            "raw" => Source::Raw(value.to_string()),
            "size" => {
                self.size = Some(parse_size(value)?);
                return Ok(Param::Used);
            }
            "allocator" => {
                self.allocator = value.to_string();
                return Ok(Param::Used);
            }
            _ => {
                self.vars.push((key.to_string(), value.to_string()));
                return Ok(Param::Used);
            }
        };
        if self.source.is_some() {
            return Err(Error::invalid("raw|base64|data parameter must be specified exactly once"));
        }
        self.source = Some(source);
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        match &self.source {
            None => Err(Error::invalid("raw|base64|data parameter was not specified")),
            Some(Source::Data(_)) => Ok(()),
            Some(_) if !self.vars.is_empty() => Err(Error::invalid("extra parameters passed and not using data='...'")),
            Some(_) => Ok(()),
        }
    }

    fn dump_plugin(&self) -> Vec<String> {
        vec!["data_base64=yes".to_string(), "mlock=yes".to_string(), "zstd=no".to_string()]
    }

    fn get_ready(&mut self) -> Result<()> {
        let ev = match self.source.clone() {
            Some(Source::Data(s)) => evaluate_data(s, self.vars.clone())?,
            Some(Source::Base64(s)) => eval::from_bytes(base64_decode(&s)?),
            Some(Source::Raw(s)) => eval::from_bytes(s.into_bytes()),
            None => return Err(Error::invalid("raw|base64|data parameter was not specified")),
        };
        let implicit = ev.image.len();
        crate::debug!("implicit data size: {implicit}");
        let size = self.size.unwrap_or(implicit);
        crate::debug!("final size: {size}");
        let alloc = allocator::create("data", &self.allocator, size)?;
        alloc.set_size_hint(size)?;
        // malloc has no holes: every extent is data, as in nbdkit.
        let sparse = self.allocator_is_sparse();
        self.disk = Some(Arc::new(Disk { base: ev, size, sparse, alloc, over: RwLock::new(RangeSet::default()),
                                          materialize: Mutex::new(()) }));
        Ok(())
    }

    fn open(&self, _readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        let disk = self.disk.clone().ok_or_else(|| Error::io("data: open before get_ready"))?;
        Ok(Box::new(DataHandle { disk }))
    }
}

impl Data {
    fn allocator_is_sparse(&self) -> bool {
        let ty = self.allocator.split(',').next().unwrap_or("");
        !ty.is_empty() && "sparse".starts_with(ty)
    }
}

/// Parses, optimizes and evaluates a data string on a thread with a big
/// stack (the parser allows 1000 levels of nesting).
fn evaluate_data(s: String, vars: Vec<(String, String)>) -> Result<Evaluated> {
    let work = move || -> Result<Evaluated> {
        let lookup = |name: &str| {
            vars.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).or_else(|| std::env::var(name).ok())
        };
        let tree = parser::parse(&s, &lookup)?;
        let tree = optimize::optimize(tree)?;
        if crate::util::log::debug_flag("data", "AST") != 0 {
            crate::debug!("BEGIN AST (-D data.AST=1)");
            for line in ast::print(&tree) {
                crate::debug!("{line}");
            }
            crate::debug!("END AST");
        }
        eval::evaluate(&tree)
    };
    let ctx = crate::util::log::context();
    std::thread::Builder::new()
        .name("data-eval".into())
        .stack_size(256 << 20)
        .spawn(move || {
            crate::util::log::set_context(ctx);
            work()
        })
        .map_err(|e| Error::io(format!("data: cannot start the evaluator: {e}")))?
        .join()
        .unwrap_or_else(|_| Err(Error::io("data: the evaluator failed")))
}

/// Standard base64 (line breaks ignored), with GnuTLS's message.
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let bad = || Error::invalid("base64: Base64 decoding error.");
    let digits: Vec<u8> = s.bytes().filter(|c| !matches!(c, b'\n' | b'\r')).collect();
    let body = digits.strip_suffix(b"==").or_else(|| digits.strip_suffix(b"=")).unwrap_or(&digits);
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in body {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(bad()),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if !digits.len().is_multiple_of(4) || bits >= 6 {
        return Err(bad());
    }
    Ok(out)
}

/// The one disk: the evaluated pattern, and the allocator holding the
/// pages that were written since (`over`).
struct Disk {
    base: Evaluated,
    size: u64,
    /// allocator=sparse: block status tells holes from data.
    sparse: bool,
    alloc: Box<dyn Allocator>,
    /// Overridden pages (offset / PAGE): their bytes are in `alloc`.
    over: RwLock<RangeSet>,
    /// Held while pages are copied into `alloc`.
    materialize: Mutex<()>,
}

/// Pages an extents call looks at before it returns what it has.
const EXTENTS_BUDGET: u32 = 65536;

impl Disk {
    fn over(&self) -> std::sync::RwLockReadGuard<'_, RangeSet> {
        self.over.read().unwrap_or_else(|e| e.into_inner())
    }

    fn page_end(&self, page: u64) -> u64 {
        (page.saturating_add(1)).saturating_mul(PAGE).min(self.size)
    }

    /// Splits `[offset, offset+len)` into runs that are overridden or not.
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let over = self.over();
        let end = offset + len;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (inside, to) = over.run_at(pos / PAGE);
            let stop = to.saturating_mul(PAGE).min(end);
            runs.push((pos, stop - pos, inside));
            pos = stop;
        }
        runs
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for (pos, n, over) in self.runs(offset, buf.len() as u64) {
            let part = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            if over {
                self.alloc.read(part, pos)?;
            } else {
                self.base.image.read(part, pos);
            }
        }
        Ok(())
    }

    /// Makes every page of `[offset, offset+len)` overridden, copying the
    /// pattern into the allocator for the pages only partly covered (the
    /// others are about to be wholly written or zeroed).
    fn override_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        if self.over().covers(first, last + 1) {
            return Ok(());
        }
        let _g = self.materialize.lock().unwrap_or_else(|e| e.into_inner());
        for page in [first, last] {
            let start = page * PAGE;
            let partial = offset > start || end < self.page_end(page);
            if partial && !self.over().contains(page) {
                self.copy_page(page)?;
                self.over.write().unwrap_or_else(|e| e.into_inner()).insert(page, page + 1);
            }
        }
        self.over.write().unwrap_or_else(|e| e.into_inner()).insert(first, last + 1);
        Ok(())
    }

    /// Copies one page of the pattern into the allocator, allocated as
    /// nbdkit's would be.
    fn copy_page(&self, page: u64) -> Result<()> {
        let start = page * PAGE;
        let mut buf = vec![0; (self.page_end(page) - start) as usize];
        self.base.image.read(&mut buf, start);
        if buf.iter().any(|&b| b != 0) || self.base.allocated.contains(page) {
            self.alloc.write(&buf, start)?;
        }
        Ok(())
    }

    /// Block status of the pattern for `[offset, end)` (not overridden).
    fn base_extents(&self, offset: u64, end: u64, req_one: bool, budget: &mut u32, ext: &mut Extents) -> Result<()> {
        if !self.sparse {
            return ext.add(offset, end - offset, 0);
        }
        let img = &self.base.image;
        let mut pos = offset;
        while pos < end && *budget > 0 {
            *budget -= 1;
            let page = pos / PAGE;
            let (pstart, pend) = (page * PAGE, self.page_end(page));
            let (data, mut run_end) = match img.next_piece(pstart) {
                None => (false, end),
                Some((s, _)) if s >= pend => (false, s / PAGE * PAGE),
                Some(_) => match img.dense_until(pstart, pend - pstart) {
                    Some(d) if d >= pend => (true, (d / PAGE * PAGE).max(pend)),
                    _ => (img.any_nonzero(pstart, pend - pstart), pend),
                },
            };
            let typ = if data {
                0
            } else {
                let (alloc, to) = self.base.allocated.run_at(page);
                run_end = run_end.min(to.saturating_mul(PAGE));
                if alloc { ZERO } else { HOLE | ZERO }
            };
            let stop = run_end.min(end).max(pend.min(end));
            ext.add(pos, stop - pos, typ)?;
            pos = stop;
            if req_one {
                break;
            }
        }
        Ok(())
    }

    fn extents(&self, count: u64, offset: u64, req_one: bool, ext: &mut Extents) -> Result<()> {
        let mut budget = EXTENTS_BUDGET;
        for (pos, n, over) in self.runs(offset, count) {
            if over {
                self.alloc.extents(n, pos, req_one, ext)?;
            } else {
                self.base_extents(pos, pos + n, req_one, &mut budget, ext)?;
            }
            if (req_one && ext.count() > 0) || budget == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// A connection's view of the one disk.
struct DataHandle {
    disk: Arc<Disk>,
}

impl Handle for DataHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.disk.size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps::RAM_DISK)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(self.disk.alloc.block_size()))
    }
    fn blocks(&self) -> bool {
        false
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk.read(buf, offset)
    }
    fn pread_lend(&self, count: usize, offset: u64, sink: &mut dyn FnMut(&[&[u8]])) -> Option<Result<()>> {
        let pages = (offset / PAGE, (offset + count as u64).div_ceil(PAGE));
        if count == 0 || !self.disk.over().covers(pages.0, pages.1) {
            return None;
        }
        self.disk.alloc.lend(count, offset, sink)
    }
    fn pwrite_fill(&self, count: usize, offset: u64, _flags: Flags,
                   fill: &mut dyn FnMut(&mut [&mut [u8]]) -> bool) -> Option<Result<()>> {
        if let Err(e) = self.disk.override_range(offset, count as u64) {
            return Some(Err(e));
        }
        self.disk.alloc.write_fill(count, offset, fill)
    }
    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk.override_range(offset, buf.len() as u64)?;
        self.disk.alloc.write(buf, offset)
    }
    fn flush(&self, _flags: Flags) -> Result<()> {
        Ok(())
    }
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.zero(count, offset, flags)
    }
    fn zero(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        self.disk.override_range(offset, count)?;
        self.disk.alloc.zero(count, offset)
    }
    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        self.disk.extents(count, offset, flags.contains(Flags::REQ_ONE), ext)
    }
    fn cache(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Ok(())
    }
}

// -D flags nbdkit's data plugin reads (`dir`: the sparse allocator's directory).
inventory::submit! {
    crate::backend::registry::DebugFlags { backend: "data", flags: &["AST", "dir"] }
}

inventory::submit! {
    PluginEntry {
        name: "data",
        longname: "",
        description: "",
        help: "data|raw|base64=...     Specify disk data on the command line\n\
               size=<SIZE>             Size of the backing disk",
        magic_key: Some("data"),
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: &["unload", "dump_plugin", "config", "config_complete", "config_help", "get_ready",
               "open", "get_size", "block_size", "can_fast_zero", "can_fua", "can_multi_conn",
               "can_cache", "pread", "pwrite", "flush", "trim", "zero", "extents"],
        new: || Box::<Data>::default(),
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
