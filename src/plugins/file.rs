//! `file`: serve a local file or block device (`file=`), the files of a
//! directory chosen by export name (`dir=`, `dirfd=`), or an inherited file
//! descriptor (`fd=`), as nbdkit 1.44's file plugin does on Linux.

mod evict;
mod handle;
pub(crate) mod sys;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use self::evict::Windows;
use self::handle::FileHandle;
use crate::backend::{Export, Handle, Param, Plugin, PluginEntry, ThreadModel};
use crate::error::{Error, ErrorKind, Result};
use crate::util::parse::parse_int;

/// What the plugin serves: exactly one of these.
#[derive(Debug)]
enum Source {
    /// `file=`: absolute path (made so at config time: the server may chdir).
    File(PathBuf),
    /// `dir=`: absolute path; opened by config_complete.
    Dir(PathBuf),
    /// `dirfd=N`: an inherited directory fd.
    DirFd(RawFd),
    /// `fd=N`: an inherited fd, dup'd for each connection.
    Fd(RawFd),
}

#[derive(Default)]
struct FilePlugin {
    source: Option<Source>,
    /// The directory of `dir=`, open from config_complete on.
    dir: Option<OwnedFd>,
    /// `fadvise=`: applied to each newly opened file.
    fadvise: Option<libc::c_int>,
    /// `cache=none`.
    cache_none: bool,
    /// cache=none write windows, shared by all connections.
    windows: Arc<Windows>,
}

impl FilePlugin {
    /// Sets the source, which may be given only once.
    fn set_source(&mut self, s: impl FnOnce() -> Result<Source>) -> Result<()> {
        if self.source.is_some() {
            return Err(Error::invalid("file|dir|fd|dirfd parameter can only appear once"));
        }
        self.source = Some(s()?);
        Ok(())
    }

    /// The directory fd in dir= / dirfd= mode.
    fn dir_fd(&self) -> Option<RawFd> {
        match self.source {
            Some(Source::Dir(_)) => self.dir.as_ref().map(|d| d.as_raw_fd()),
            Some(Source::DirFd(n)) => Some(n),
            _ => None,
        }
    }

    /// Opens the handle (the concrete type, so tests can reach its memo).
    fn open_handle(&self, readonly: bool, export: &str) -> Result<FileHandle> {
        let (file, name, can_write) = match &self.source {
            Some(Source::File(path)) => {
                let name = path.display().to_string();
                let (f, w) = open_by_name(libc::AT_FDCWD, path.as_os_str().as_encoded_bytes(), &name, readonly)?;
                (f, name, w)
            }
            Some(Source::Dir(_) | Source::DirFd(_)) => {
                if export.contains('/') {
                    return Err(Error::invalid(format!("{export}: exportname cannot contain /")));
                }
                let dfd = self.dir_fd().ok_or_else(|| Error::invalid("file: directory is not open"))?;
                let (f, w) = open_by_name(dfd, export.as_bytes(), export, readonly)?;
                (f, export.to_string(), w)
            }
            Some(Source::Fd(n)) => {
                let name = format!("fd={n}");
                let f = std::fs::File::from(sys::dup(*n).map_err(|e| Error::os(format_args!("dup: {name}"), e))?);
                let mode = sys::access_mode(&f).map_err(|e| Error::os(format_args!("fcntl: {name}: F_GETFL"), e))?;
                if mode == libc::O_WRONLY {
                    crate::debug!("file descriptor is write-only (ie. not readable): \
                                   NBD protocol does not support this, but continuing anyway!");
                }
                (f, name, !readonly && mode != libc::O_RDONLY)
            }
            None => return Err(Error::invalid("file: no file, dir, fd or dirfd configured")),
        };
        let windows = self.cache_none.then(|| Arc::clone(&self.windows));
        FileHandle::new(file, name, can_write, self.fadvise, windows)
    }
}

/// Opens `name` (relative to `dir`) read-write, falling back silently to
/// read-only; returns the file and whether it may be written.
fn open_by_name(dir: RawFd, name: &[u8], display: &str, readonly: bool) -> Result<(std::fs::File, bool)> {
    if name.is_empty() {
        return Err(Error::new(ErrorKind::NotFound, "open: cannot use empty file name or export name (\"\")"));
    }
    let cname = CString::new(name)
        .map_err(|_| Error::invalid(format!("open: {display}: file name contains a NUL byte")))?;
    if !readonly {
        match sys::openat(dir, &cname, libc::O_RDWR) {
            Ok(f) => return Ok((f, true)),
            Err(e) => crate::debug!("open O_RDWR failed, falling back to read-only: {display}: {}", Error::from(e)),
        }
    }
    let f = sys::openat(dir, &cname, libc::O_RDONLY).map_err(|e| Error::os(format_args!("open: {display}"), e))?;
    Ok((f, false))
}

/// nbdkit_realpath: the path must exist.
fn realpath(value: &str) -> Result<PathBuf> {
    std::fs::canonicalize(value).map_err(|e| Error::os(format_args!("realpath: {value}"), e))
}

/// An fd= / dirfd= number: not one of stdin, stdout, stderr.
fn parse_fd(key: &str, value: &str, what: &str) -> Result<RawFd> {
    let n = parse_int(key, value, i64::from(i32::MIN), i64::from(i32::MAX))? as RawFd;
    if n <= libc::STDERR_FILENO {
        return Err(Error::invalid(format!(
            "{what} must be > {} because stdin, stdout and stderr are reserved for nbdkit",
            libc::STDERR_FILENO
        )));
    }
    Ok(n)
}

impl Plugin for FilePlugin {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "file" => self.set_source(|| Ok(Source::File(realpath(value)?)))?,
            "dir" | "directory" => self.set_source(|| Ok(Source::Dir(realpath(value)?)))?,
            "fd" => self.set_source(|| Ok(Source::Fd(parse_fd(key, value, "file descriptor")?)))?,
            "dirfd" => self.set_source(|| Ok(Source::DirFd(parse_fd(key, value, "directory descriptor")?)))?,
            "fadvise" => {
                self.fadvise = Some(match value {
                    "normal" => libc::POSIX_FADV_NORMAL,
                    "random" => libc::POSIX_FADV_RANDOM,
                    "sequential" => libc::POSIX_FADV_SEQUENTIAL,
                    _ => return Err(Error::invalid(format!("unknown fadvise mode: {value}"))),
                });
            }
            "cache" => {
                self.cache_none = match value {
                    "default" => false,
                    "none" => true,
                    _ => return Err(Error::invalid(format!("unknown cache mode: {value}"))),
                };
            }
            "rdelay" | "wdelay" => return Err(Error::invalid("add --filter=delay on the command line")),
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        match &self.source {
            None => Err(Error::invalid(
                "you must supply either [file=]<FILENAME>, dir=<DIRNAME>, fd=<FD> or dirfd=<FD> \
                 parameter after the plugin name on the command line",
            )),
            Some(Source::File(path)) => match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => Err(Error::invalid(format!("use dir= to serve files within {}", path.display()))),
                Ok(m) if m.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => Ok(()),
                _ => Err(Error::invalid(format!("file is not regular or block device: {}", path.display()))),
            },
            Some(Source::Dir(path)) => {
                if !std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                    return Err(Error::invalid(format!("expecting a directory: {}", path.display())));
                }
                let cpath = CString::new(path.as_os_str().as_encoded_bytes())
                    .map_err(|_| Error::invalid("dir: path contains a NUL byte"))?;
                let dir = sys::openat(libc::AT_FDCWD, &cpath, libc::O_RDONLY | libc::O_DIRECTORY)
                    .map_err(|e| Error::os(format_args!("open: {}", path.display()), e))?;
                self.dir = Some(dir.into());
                Ok(())
            }
            Some(Source::DirFd(_) | Source::Fd(_)) => Ok(()),
        }
    }

    fn dump_plugin(&self) -> Vec<String> {
        ["file_block_size", "file_blkrotational", "file_blksszget", "file_blkdiscard", "file_blkzeroout",
         "file_extents", "file_falloc_fl_punch_hole", "file_falloc_fl_zero_range"]
            .iter()
            .map(|k| format!("{k}=yes"))
            .collect()
    }

    /// dir= / dirfd=: the regular files and block devices in the directory;
    /// otherwise the single default export.
    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        let Some(dfd) = self.dir_fd() else {
            return Ok(vec![Export::new(self.default_export(readonly, is_tls).unwrap_or_default())]);
        };
        let what = match &self.source {
            Some(Source::Dir(p)) => p.display().to_string(),
            _ => format!("dirfd={dfd}"),
        };
        let names = sys::list_files(dfd).map_err(|e| Error::os(format_args!("readdir: {what}"), e))?;
        Ok(names
            .into_iter()
            .filter_map(|n| match n.into_string() {
                Ok(s) => Some(Export::new(s)),
                Err(n) => {
                    // Export names travel as UTF-8 on the wire.
                    crate::debug!("{what}: skipping non-UTF-8 file name {}", n.to_string_lossy());
                    None
                }
            })
            .collect())
    }

    fn open(&self, readonly: bool, export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        Ok(Box::new(self.open_handle(readonly, export)?))
    }
}

// -D flags nbdkit's file plugin reads.
inventory::submit! {
    crate::backend::registry::DebugFlags { backend: "file", flags: &["zero"] }
}

inventory::submit! {
    PluginEntry {
        name: "file",
        longname: "nbdkit file plugin",
        description: "nbdkit file plugin: serve a local file or block device, the files of a directory \
                      (chosen by export name), or an inherited file descriptor",
        help: "[file=]<FILENAME>     The filename to serve.\n\
               dir=<DIRNAME>         A directory containing files to serve.\n\
               fd=<FD>               Serve the file descriptor FD.\n\
               dirfd=<FD>            Serve the files of directory descriptor FD.\n\
               cache=<MODE>          Set use of caching (default, none).\n\
               fadvise=<LEVEL>       Set fadvise hint (normal, random, sequential).",
        magic_key: Some("file"),
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: &["longname", "unload", "dump_plugin", "config", "config_complete", "config_help",
               "list_exports", "open", "close", "get_size", "block_size", "can_write", "is_rotational",
               "can_trim", "can_extents", "can_fua", "can_multi_conn", "can_cache", "pread", "pwrite",
               "flush", "trim", "zero", "extents", "cache"],
        new: || Box::<FilePlugin>::default(),
    }
}

#[cfg(test)]
mod tests;
