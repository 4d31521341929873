//! Walking the host directory into a [`Tree`]: directories and regular
//! files only (lstat: symbolic links, sockets, devices and FIFOs are left
//! out, as nbdkit does), each directory's entries in byte order of their
//! names (nbdkit uses readdir order, which makes its images differ from
//! one copy of a directory to another).
//!
//! Start-up with many files is this walk: one `getdents64` pass per
//! directory into a big buffer (musl's `readdir` takes 2 KiB at a time),
//! then one `fstatat` per entry relative to the open directory (std's
//! `DirEntry::metadata` on musl does `lstat` of the whole path, a path
//! walk per file), and nothing allocated per entry but its name.

use std::ffi::CStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::layout::{DirNode, FileNode, Tree, MAX_FILE};
use super::records::{Clock, DosTimes};
use super::sys::{self, Stat};

/// What the read path needs to know about a host file (file `i` of the
/// tree): its directory (an index into the directory paths), its size
/// and identity at the scan.
#[derive(Debug, Clone)]
pub struct HostFile {
    pub dir: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
}

/// The scanned tree, the host files in the tree's file order, and the
/// host path of each directory of the tree.
pub struct Scanned {
    pub tree: Tree,
    pub hosts: Vec<HostFile>,
    pub dir_paths: Vec<PathBuf>,
}

/// A path for a one-line message: very deep paths are shortened.
pub fn show(p: &Path) -> String {
    let s = p.display().to_string();
    let n = s.chars().count();
    if n <= 240 {
        return s;
    }
    let head: String = s.chars().take(120).collect();
    let tail: String = s.chars().skip(n - 100).collect();
    format!("{head}…{tail} ({} components)", p.components().count())
}

/// An OS error without Rust's " (os error N)" suffix, as nbdkit prints it.
fn os(what: &str, p: &Path, e: io::Error) -> String {
    let msg = e.to_string();
    let msg = msg.rfind(" (os error ").map_or(msg.as_str(), |i| &msg[..i]);
    format!("{what}: {}: {msg}", show(p))
}

fn times(clock: &mut Clock, st: &Stat) -> DosTimes {
    clock.times(st.atime, st.mtime, st.ctime)
}

/// Scans `root` (an absolute path to a directory).
pub fn scan(root: &Path) -> Result<Scanned, String> {
    let meta = std::fs::metadata(root).map(|m| Stat::from(&m)).map_err(|e| os("stat", root, e))?;
    if !meta.is_dir() {
        return Err(format!("{}: not a directory", show(root)));
    }
    let mut w = Walk {
        tree: Tree::default(),
        hosts: Vec::new(),
        dir_paths: vec![root.to_path_buf()],
        ancestors: Vec::new(),
        clock: Clock::default(),
        buf: vec![0u8; 64 * 1024],
    };
    w.tree.dirs.push(DirNode { times: times(&mut w.clock, &meta), ..DirNode::default() });
    w.visit(0, &meta)?;
    Ok(Scanned { tree: w.tree, hosts: w.hosts, dir_paths: w.dir_paths })
}

struct Walk {
    tree: Tree,
    hosts: Vec<HostFile>,
    dir_paths: Vec<PathBuf>,
    /// (dev, ino) of the directories being walked, to refuse a loop (a
    /// bind mount of a directory inside itself).
    ancestors: Vec<(u64, u64)>,
    clock: Clock,
    /// getdents64's buffer, for every directory.
    buf: Vec<u8>,
}

fn utf8_name(dir: &Path, name: Vec<u8>) -> Result<String, String> {
    String::from_utf8(name).map_err(|e| {
        format!("{}: file name is not valid UTF-8, which FAT long names need",
                show(&dir.join(std::ffi::OsStr::from_bytes(e.as_bytes()))))
    })
}

/// One entry of a directory, stat'ed.
struct Ent {
    name: Vec<u8>,
    st: Stat,
}

impl Walk {
    fn visit(&mut self, di: usize, meta: &Stat) -> Result<(), String> {
        let id = (meta.dev, meta.ino);
        let path = self.dir_paths[di].clone();
        if self.ancestors.contains(&id) {
            return Err(format!("{}: directory loop (the directory contains itself)", show(&path)));
        }
        self.ancestors.push(id);
        let mut ents = self.read(&path)?;
        ents.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        // Files are opened by their whole path later: a path the kernel
        // would refuse is refused now, as lstat of it did.
        let room = (libc::PATH_MAX as usize - 2).saturating_sub(path.as_os_str().len());
        for Ent { name, st } in ents {
            if name.len() > room && (st.is_dir() || st.is_file()) {
                return Err(os("lstat", &path.join(std::ffi::OsStr::from_bytes(&name)),
                              io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
            }
            if st.is_dir() {
                let name = utf8_name(&path, name)?;
                let sdi = self.tree.dirs.len();
                self.dir_paths.push(path.join(&name));
                self.tree.dirs.push(DirNode { name, times: times(&mut self.clock, &st), parent: di, ..DirNode::default() });
                self.tree.dirs[di].subdirs.push(sdi);
                self.visit(sdi, &st)?;
            } else if st.is_file() {
                let name = utf8_name(&path, name)?;
                if st.size > MAX_FILE {
                    return Err(format!("{}: file is larger than maximum supported by VFAT ({} bytes; the limit is {MAX_FILE})",
                                       show(&path.join(&name)), st.size));
                }
                let fi = self.tree.files.len();
                self.tree.files.push(FileNode { name, times: times(&mut self.clock, &st), size: st.size });
                self.tree.dirs[di].files.push(fi);
                self.hosts.push(HostFile { dir: di as u32, size: st.size, dev: st.dev, ino: st.ino });
            } else {
                crate::debug!("floppy: skipping {} (not a regular file or directory)",
                              path.join(std::ffi::OsStr::from_bytes(&name)).display());
            }
        }
        self.ancestors.pop();
        Ok(())
    }

    /// The entries of directory `path` (without `.` and `..`), each with
    /// its lstat; the directory is closed before its subdirectories are
    /// walked (deep trees do not hold a descriptor per level).
    fn read(&mut self, path: &Path) -> Result<Vec<Ent>, String> {
        let dir = sys::open_dir(path).map_err(|e| os("opendir", path, e))?;
        let mut ents = Vec::new();
        loop {
            let n = sys::getdents(&dir, &mut self.buf).map_err(|e| os("readdir", path, e))?;
            if n == 0 {
                break;
            }
            for name in sys::dirent_names(&self.buf[..n]) {
                let bytes = name.to_bytes();
                if bytes == b"." || bytes == b".." {
                    continue;
                }
                let st = Self::stat_at(&dir, name, path)?;
                ents.push(Ent { name: bytes.to_vec(), st });
            }
        }
        Ok(ents)
    }

    fn stat_at(dir: &std::os::fd::OwnedFd, name: &CStr, path: &Path) -> Result<Stat, String> {
        sys::lstat_at(dir, name).map_err(|e| os("lstat", &path.join(std::ffi::OsStr::from_bytes(name.to_bytes())), e))
    }
}
