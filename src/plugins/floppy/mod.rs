//! `floppy`: a FAT32 disk synthesized from a host directory (nbdkit's
//! floppy plugin), read-only.
//!
//! The layout (`layout.rs`, `records.rs`, `names.rs`) is computed once at
//! get_ready from the scanned tree (`scan.rs`); reads map each offset to
//! a region: fixed sectors and directory tables kept in memory (a few
//! bytes per entry), the FAT computed entry by entry, or a host file's
//! bytes. The image itself is never built. Host files are opened by a
//! background thread after start-up (or by the first read that needs
//! them) and kept open, within the process's descriptor limit; each
//! read checks that the file still has the size it had at the scan: a
//! file that shrank or grew gives EIO, not the bytes of whatever follows.

mod layout;
mod names;
mod records;
mod scan;
mod sys;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::Arc;

use self::layout::{Kind, Layout};
use self::scan::HostFile;
use crate::backend::{extents, BlockSize, Caps, Extents, Flags, Handle, Param, Plugin, PluginEntry, Support,
                     ThreadModel};
use crate::error::{Error, Result};
use crate::util::parse::parse_size;

#[derive(Default)]
struct Floppy {
    dir: Option<PathBuf>,
    label: Option<String>,
    size: Option<u64>,
    disk: Option<Arc<Disk>>,
}

/// The most bytes read past a piece of a host file, to its end, to check
/// its size in the same system call instead of an `fstat` (copying 4 KiB
/// costs less than the `fstat`).
const TAIL_MAX: u64 = 4096;

/// The served disk, shared by all connections.
struct Disk {
    layout: Layout,
    hosts: Vec<HostFile>,
    /// Each host file's name, and the host path of each directory.
    names: Vec<String>,
    dir_paths: Vec<PathBuf>,
    /// The descriptor of each host file kept open, -1 until then: set
    /// once (compare and swap, no lock a reader could wait on), closed
    /// when the disk goes.
    fds: Vec<AtomicI32>,
    /// How many more files may be kept open.
    fd_budget: AtomicI64,
}

impl Plugin for Floppy {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "dir" => {
                if self.dir.is_some() {
                    return Err(Error::invalid("dir=<DIRECTORY> must only be set once"));
                }
                let p = std::fs::canonicalize(value).map_err(|e| Error::os(format_args!("realpath: {value}"), e))?;
                self.dir = Some(p);
            }
            "label" => self.label = Some(value.to_string()),
            "size" => self.size = Some(parse_size(value)?),
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Err(Error::invalid(
                "you must supply the dir=<DIRECTORY> parameter after the plugin name on the command line",
            ));
        };
        if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
            return Err(Error::invalid(format!("chdir: {}: Not a directory", dir.display())));
        }
        Ok(())
    }

    fn get_ready(&mut self) -> Result<()> {
        let dir = self.dir.as_ref().ok_or_else(|| Error::invalid("floppy: no dir="))?;
        let scan::Scanned { tree, hosts, dir_paths } = scan::scan(dir).map_err(Error::invalid)?;
        let label = self.label.as_deref().unwrap_or("NBDKITFLOPY");
        let layout = layout::build(&tree, label, self.size).map_err(Error::invalid)?;
        crate::debug!("floppy: {} directories and {} files, {} clusters used, disk size {}",
                      tree.dirs.len(), tree.files.len(), layout.geometry.used, layout.geometry.disk_size);
        let fd_budget = AtomicI64::new(fd_budget(hosts.len()));
        let fds = (0..hosts.len()).map(|_| AtomicI32::new(-1)).collect();
        let names = tree.files.into_iter().map(|f| f.name).collect();
        self.disk = Some(Arc::new(Disk { layout, hosts, names, dir_paths, fds, fd_budget }));
        Ok(())
    }

    /// Opens the host files in the background (as many as the budget
    /// allows), so the first read of each does not pay for it and start-up
    /// does not wait for it. The thread runs at SCHED_IDLE priority: only
    /// when the server has nothing else to do, so it delays neither the
    /// first accept nor a request. A read that comes first opens the file
    /// itself; a file that fails to open here is retried, and reported,
    /// by the read that needs it.
    fn after_fork(&self) -> Result<()> {
        let Some(disk) = self.disk.clone() else { return Ok(()) };
        let spawned = std::thread::Builder::new().name("floppy-open".into()).spawn(move || {
            sys::idle_priority();
            for i in 0..disk.hosts.len() {
                if disk.hosts[i].size == 0 || disk.kept(i).is_some() {
                    continue;
                }
                if disk.fd_budget.fetch_sub(1, Ordering::Relaxed) <= 0 {
                    disk.fd_budget.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let kept = disk.open_host(i).is_ok_and(|f| disk.keep(i, f));
                if !kept {
                    disk.fd_budget.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        if let Err(e) = spawned {
            crate::debug!("floppy: cannot start the thread that opens files: {e}");
        }
        Ok(())
    }

    fn open(&self, _readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        let disk = self.disk.clone().ok_or_else(|| Error::invalid("floppy: not ready"))?;
        Ok(Box::new(FloppyHandle { disk }))
    }
}

/// How many host files may stay open: raises the soft descriptor limit
/// toward the hard one if there are many files, and leaves room for
/// connections and everything else.
#[allow(unsafe_code)]
fn fd_budget(files: usize) -> i64 {
    const RESERVE: u64 = 1024;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let want = (files as u64).saturating_add(RESERVE);
    if lim.rlim_cur < want && lim.rlim_cur < lim.rlim_max {
        let new = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            lim.rlim_cur = new.rlim_cur;
        }
    }
    lim.rlim_cur.saturating_sub(RESERVE).min(i64::MAX as u64) as i64
}

impl Drop for Disk {
    fn drop(&mut self) {
        for fd in &self.fds {
            let fd = fd.load(Ordering::Acquire);
            if fd >= 0 {
                // SAFETY: a descriptor this disk owns (`keep`), closed once.
                drop(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
}

/// A host file's descriptor for one read: the one kept open, or one
/// opened for this read only (past the descriptor budget).
enum HostFd<'a> {
    Kept(BorrowedFd<'a>),
    Once(File),
}

impl HostFd<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            HostFd::Kept(fd) => *fd,
            HostFd::Once(f) => f.as_fd(),
        }
    }
}

impl Disk {
    /// Host file `i`'s path.
    fn path(&self, i: usize) -> PathBuf {
        self.dir_paths[self.hosts[i].dir as usize].join(&self.names[i])
    }

    /// Host file `i`'s descriptor if it is kept open.
    #[allow(unsafe_code)]
    fn kept(&self, i: usize) -> Option<BorrowedFd<'_>> {
        let fd = self.fds[i].load(Ordering::Acquire);
        // SAFETY: a kept descriptor stays open until the disk is dropped,
        // which cannot happen while `self` is borrowed.
        (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// Keeps `f` open as host file `i`'s descriptor; false (and `f` is
    /// closed) if another thread was first.
    fn keep(&self, i: usize, f: File) -> bool {
        let fd = f.into_raw_fd();
        if self.fds[i].compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return true;
        }
        #[allow(unsafe_code)]
        // SAFETY: `fd` came from `f` just above and nobody else has it.
        drop(unsafe { File::from_raw_fd(fd) });
        false
    }

    /// Host file `i`, opened if it is not kept yet (and kept if the
    /// budget allows).
    fn host_fd(&self, i: usize) -> Result<HostFd<'_>> {
        if let Some(fd) = self.kept(i) {
            return Ok(HostFd::Kept(fd));
        }
        let f = self.open_host(i)?;
        if self.fd_budget.fetch_sub(1, Ordering::Relaxed) > 0 {
            if !self.keep(i, f) {
                self.fd_budget.fetch_add(1, Ordering::Relaxed); // another thread was first
            }
            return Ok(HostFd::Kept(self.kept(i).expect("kept above")));
        }
        self.fd_budget.fetch_add(1, Ordering::Relaxed);
        Ok(HostFd::Once(f))
    }

    /// Opens host file `i`, checking it is still the file that was scanned.
    fn open_host(&self, i: usize) -> Result<File> {
        let h = &self.hosts[i];
        let path = self.path(i);
        // O_NONBLOCK: a FIFO swapped in since the scan must not hang the
        // open. O_NOATIME: reads do not update (nor check, 2-4 % of the
        // CPU of a read) the access time; only the file's owner may ask
        // for it, others open without.
        let open = |noatime: libc::c_int| {
            File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | noatime)
                .open(&path)
        };
        let f = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            r => r,
        }
        // EIO whatever the cause: the disk is there, this part of it is not.
        .map_err(|e| Error::io(Error::os(format_args!("open: {}", path.display()), e).message().to_string()))?;
        let m = f.metadata().map_err(|e| Error::os(format_args!("fstat: {}", path.display()), e))?;
        if (m.dev(), m.ino()) != (h.dev, h.ino) || !m.is_file() {
            return Err(Error::io(format!("{}: file was replaced since the floppy was made", path.display())));
        }
        Ok(f)
    }

    fn changed(&self, i: usize, now: u64) -> Error {
        let h = &self.hosts[i];
        Error::io(format!("{}: file changed size while served (was {} bytes, now {now}): \
                           the floppy cannot follow, restart the server", self.path(i).display(), h.size))
    }

    /// EIO unless host file `i` (open as `fd`) still has its scanned size.
    fn check_size(&self, i: usize, fd: BorrowedFd<'_>) -> Result<()> {
        let now = sys::size(fd).map_err(|e| Error::os(format_args!("fstat: {}", self.path(i).display()), e))?;
        if now != self.hosts[i].size {
            return Err(self.changed(i, now));
        }
        Ok(())
    }

    /// Reads `buf` from host file `i` at `offset` (within its size).
    fn read_host(&self, i: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let f = self.host_fd(i)?;
        self.read_piece(i, f.fd(), buf, offset, false).unwrap_or_else(|| Err(Error::io("would block")))
    }

    /// Reads `buf` from host file `i` (open as `fd`) at `offset`, and
    /// checks that the file still has its scanned size (EIO and a log line
    /// if not). A piece that ends at most [`TAIL_MAX`] bytes before the
    /// file's scanned end does it without an `fstat`, in the same system
    /// call: it asks for the rest of the file and one byte more (into a
    /// scratch buffer); getting exactly that means the file still ends
    /// where it did, more that it grew, less that it shrank (or, without
    /// blocking, that some of it is not in the cache: `fstat` tells). Other
    /// pieces `fstat` first. With `nowait` (`RWF_NOWAIT`), `None` means
    /// "not all in the page cache".
    fn read_piece(&self, i: usize, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64, nowait: bool) -> Option<Result<()>> {
        let size = self.hosts[i].size;
        let tail = size - (offset + buf.len() as u64);
        if tail > TAIL_MAX {
            if let Err(e) = self.check_size(i, fd) {
                return Some(Err(e));
            }
            if nowait {
                return sys::pread_nowait(fd, buf, offset).ok()?.then_some(Ok(()));
            }
            return Some(self.pread_all(i, fd, buf, offset));
        }
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); TAIL_MAX as usize + 1];
        let want = buf.len() + tail as usize;
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        match sys::pread_extra(fd, buf, &mut scratch[..tail as usize + 1], offset, flags) {
            Ok(n) if n == want => {
                // Without blocking, a read that stops at a page boundary
                // may also be a next page not in the cache: ask fstat.
                if nowait && size.is_multiple_of(4096) {
                    if let Err(e) = self.check_size(i, fd) {
                        return Some(Err(e));
                    }
                }
                Some(Ok(()))
            }
            Ok(n) if n > want => Some(Err(self.changed(i, sys::size(fd).unwrap_or(0)))),
            // Short: the file shrank, or (without blocking) the rest is not
            // in the cache, or the read was cut short.
            Ok(n) => {
                if let Err(e) = self.check_size(i, fd) {
                    return Some(Err(e));
                }
                if n >= buf.len() {
                    Some(Ok(()))
                } else if nowait {
                    None
                } else {
                    Some(self.pread_all(i, fd, &mut buf[n..], offset + n as u64))
                }
            }
            Err(_) if nowait => match self.check_size(i, fd) {
                Err(e) => Some(Err(e)),
                Ok(()) => None,
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                Some(self.check_size(i, fd).and_then(|()| self.pread_all(i, fd, buf, offset)))
            }
            Err(e) => Some(Err(self.pread_error(i, e, offset, buf.len()))),
        }
    }

    /// `pread` of all of `buf`; the end of the file before that is a change
    /// of size.
    fn pread_all(&self, i: usize, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match sys::pread(fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    let now = sys::size(fd).unwrap_or(0);
                    return Err(self.changed(i, now));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.pread_error(i, e, offset, buf.len())),
            }
        }
        Ok(())
    }

    fn pread_error(&self, i: usize, e: std::io::Error, offset: u64, count: usize) -> Error {
        Error::os(format_args!("pread: {}: offset={offset}, count={count}", self.path(i).display()), e)
    }

    /// Fills `buf` from disk offset `offset` (the range is inside the disk).
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_with(buf, offset, &mut |i, data, o| self.read_host(i, data, o)).map(|_| ())
    }

    /// `read`, but a host file's bytes only if they are in the page cache
    /// of a file already open: `None` means "would block" (nothing is
    /// wrong, the caller reads again the usual way).
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        let mut blocked = false;
        let r = self.read_with(buf, offset, &mut |i, data, o| {
            let Some(fd) = self.kept(i) else {
                blocked = true;
                return Err(Error::io("would block"));
            };
            match self.read_piece(i, fd, data, o, true) {
                Some(r) => r,
                None => {
                    blocked = true;
                    Err(Error::io("would block"))
                }
            }
        });
        if blocked { None } else { Some(r) }
    }

    /// The kept descriptor and file offset of `[offset, offset+count)` if
    /// the range is all inside one host file's bytes (not its padding),
    /// the file still has its scanned size and, with `cached_only`, the
    /// range is in the page cache: for the server's `sendfile`.
    fn file_range(&self, count: usize, offset: u64, cached_only: bool) -> Option<(RawFd, u64)> {
        let l = &self.layout;
        let region = l.regions.get(l.region_at(offset))?;
        let Kind::File(i, _) = region.kind else { return None };
        let i = i as usize;
        let o = offset - region.start;
        if o.checked_add(count as u64)? > self.hosts[i].size {
            return None;
        }
        let fd = match self.kept(i) {
            Some(fd) => fd,
            None if cached_only => return None,
            None => match self.host_fd(i).ok()? {
                HostFd::Kept(fd) => fd,
                HostFd::Once(_) => return None,
            },
        };
        // A changed file: `pread` gives the EIO.
        self.check_size(i, fd).ok()?;
        if cached_only && !sys::cached(fd, o, count as u64) {
            return None;
        }
        Some((fd.as_raw_fd(), o))
    }

    /// The walk over regions; `host(i, buf, offset)` reads host file `i`.
    fn read_with(&self, buf: &mut [u8], offset: u64,
                 host: &mut HostRead<'_>) -> Result<()> {
        let l = &self.layout;
        let mut r = l.region_at(offset);
        let mut pos = 0usize;
        while pos < buf.len() {
            let region = l.regions.get(r).ok_or_else(|| Error::io("floppy: read past the end of the disk"))?;
            let o = offset + pos as u64 - region.start; // offset inside the region
            let n = ((region.len - o) as usize).min(buf.len() - pos);
            let out = &mut buf[pos..pos + n];
            match region.kind {
                Kind::Zero => out.fill(0),
                Kind::Blob(b) => copy_padded(out, &l.blobs[b], o),
                Kind::Fat => l.read_fat(out, o),
                Kind::File(i, size) => {
                    let (i, size) = (i as usize, u64::from(size));
                    let k = (size.saturating_sub(o) as usize).min(n);
                    let (data, pad) = out.split_at_mut(k);
                    if k > 0 {
                        host(i, data, o)?;
                    }
                    pad.fill(0);
                }
            }
            pos += n;
            r += 1;
        }
        Ok(())
    }
}

/// Reads `buf` from host file `i` at an offset inside the file.
type HostRead<'a> = dyn FnMut(usize, &mut [u8], u64) -> Result<()> + 'a;

/// Copies `src[o..]` into `out`, zeroes past the end of `src`.
fn copy_padded(out: &mut [u8], src: &[u8], o: u64) {
    let start = (o as usize).min(src.len());
    let k = (src.len() - start).min(out.len());
    out[..k].copy_from_slice(&src[start..start + k]);
    out[k..].fill(0);
}

struct FloppyHandle {
    disk: Arc<Disk>,
}

impl Handle for FloppyHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.disk.layout.geometry.disk_size)
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps { multi_conn: true, cache: Support::Emulate, extents: true, ..Caps::default() })
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(BlockSize { min: 1, preferred: 512, max: u32::MAX }))
    }
    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.disk.read(buf, offset)
    }
    /// Metadata always, file bytes from the page cache: the server then
    /// answers on the thread that read the request.
    fn pread_nowait(&self, buf: &mut [u8], offset: u64) -> Option<Result<()>> {
        self.disk.read_nowait(buf, offset)
    }
    /// Big reads inside one host file's bytes go out with `sendfile`.
    fn pread_fd(&self, count: usize, offset: u64, cached_only: bool) -> Option<(RawFd, u64)> {
        self.disk.file_range(count, offset, cached_only)
    }
    /// Zero regions (the gap before the partition, the free space of
    /// `size=`) are holes; the rest is data.
    fn extents(&self, count: u64, offset: u64, _flags: Flags, ext: &mut Extents) -> Result<()> {
        let l = &self.disk.layout;
        let end = offset.saturating_add(count);
        for region in &l.regions[l.region_at(offset)..] {
            if region.start >= end {
                break;
            }
            let typ = if region.kind == Kind::Zero { extents::HOLE | extents::ZERO } else { 0 };
            ext.add(region.start, region.len, typ)?;
        }
        Ok(())
    }
}

inventory::submit! {
    PluginEntry {
        name: "floppy",
        longname: "nbdkit floppy plugin",
        description: "nbdkit floppy plugin: a FAT32 disk made from the files of a directory",
        help: "dir=<DIRECTORY>     (required) The directory to serve.\n\
               label=<LABEL>                  The volume label.\n\
               size=<SIZE>                    Total size of filesystem.",
        magic_key: Some("dir"),
        api_version: 1,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: &["longname", "load", "unload", "config", "config_complete", "config_help", "get_ready",
               "after_fork", "open", "get_size", "block_size", "can_multi_conn", "can_extents", "can_cache",
               "_pread_v1", "extents"],
        new: || Box::<Floppy>::default(),
    }
}

#[cfg(test)]
mod tests;
