//! Walking the host directory into a [`Tree`]: directories and regular
//! files only (lstat: symbolic links, sockets, devices and FIFOs are left
//! out, as nbdkit does), each directory's entries in byte order of their
//! names (nbdkit uses readdir order, which makes its images differ from
//! one copy of a directory to another).

use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::layout::{DirNode, FileNode, Tree, MAX_FILE};
use super::records::DosTimes;

/// What the read path needs to know about a host file.
#[derive(Debug, Clone)]
pub struct HostFile {
    pub path: PathBuf,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
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
fn os(what: &str, p: &Path, e: std::io::Error) -> String {
    let msg = e.to_string();
    let msg = msg.rfind(" (os error ").map_or(msg.as_str(), |i| &msg[..i]);
    format!("{what}: {}: {msg}", show(p))
}

fn times(m: &Metadata) -> DosTimes {
    DosTimes::from_unix(m.atime(), m.mtime(), m.ctime())
}

/// Scans `root` (an absolute path to a directory).
pub fn scan(root: &Path) -> Result<(Tree, Vec<HostFile>), String> {
    let meta = std::fs::metadata(root).map_err(|e| os("stat", root, e))?;
    if !meta.is_dir() {
        return Err(format!("{}: not a directory", show(root)));
    }
    let mut w = Walk { tree: Tree::default(), hosts: Vec::new(), ancestors: Vec::new() };
    w.tree.dirs.push(DirNode { times: times(&meta), ..DirNode::default() });
    w.visit(root, 0, &meta)?;
    Ok((w.tree, w.hosts))
}

struct Walk {
    tree: Tree,
    hosts: Vec<HostFile>,
    /// (dev, ino) of the directories being walked, to refuse a loop (a
    /// bind mount of a directory inside itself).
    ancestors: Vec<(u64, u64)>,
}

fn utf8_name(dir: &Path, name: OsString) -> Result<String, String> {
    name.into_string().map_err(|n| {
        format!("{}: file name is not valid UTF-8, which FAT long names need", show(&dir.join(n)))
    })
}

impl Walk {
    fn visit(&mut self, path: &Path, di: usize, meta: &Metadata) -> Result<(), String> {
        let id = (meta.dev(), meta.ino());
        if self.ancestors.contains(&id) {
            return Err(format!("{}: directory loop (the directory contains itself)", show(path)));
        }
        self.ancestors.push(id);
        let rd = std::fs::read_dir(path).map_err(|e| os("opendir", path, e))?;
        let mut ents = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| os("readdir", path, e))?;
            // fstatat(AT_SYMLINK_NOFOLLOW) relative to the open directory.
            let m = ent.metadata().map_err(|e| os("lstat", &ent.path(), e))?;
            ents.push((ent.file_name(), m));
        }
        ents.sort_unstable_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
        for (name, m) in ents {
            let child = path.join(&name);
            let ft = m.file_type();
            if ft.is_dir() {
                let name = utf8_name(path, name)?;
                let sdi = self.tree.dirs.len();
                self.tree.dirs.push(DirNode { name, times: times(&m), parent: di, ..DirNode::default() });
                self.tree.dirs[di].subdirs.push(sdi);
                self.visit(&child, sdi, &m)?;
            } else if ft.is_file() {
                let name = utf8_name(path, name)?;
                if m.len() > MAX_FILE {
                    return Err(format!("{}: file is larger than maximum supported by VFAT ({} bytes; the limit is {MAX_FILE})",
                                       show(&child), m.len()));
                }
                let fi = self.tree.files.len();
                self.tree.files.push(FileNode { name, times: times(&m), size: m.len() });
                self.tree.dirs[di].files.push(fi);
                self.hosts.push(HostFile { path: child, size: m.len(), dev: m.dev(), ino: m.ino() });
            } else {
                crate::debug!("floppy: skipping {} (not a regular file or directory)", child.display());
            }
        }
        self.ancestors.pop();
        Ok(())
    }
}
