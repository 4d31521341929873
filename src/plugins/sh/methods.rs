//! The script protocol shared by the sh and eval plugins: exit codes,
//! the errno rules for stderr, and each method's arguments, output and
//! default when the script says "missing" (exit 2).

use std::path::{Path, PathBuf};

use super::call::{self, Done, Out, Script, Status};
use crate::backend::{extents, BlockSize, Export, Extents, Flags, Support, ThreadModel};
use crate::error::{Error, ErrorKind, Result};
use crate::util::parse::parse_size;
use crate::util::shutdown;

/// What a method answered, once its exit code was understood.
#[derive(Debug)]
pub enum Answer {
    /// 0 (also 4 and 7): success, with what it printed.
    Ok(Vec<u8>),
    /// 2 (also 6): not implemented.
    Missing,
    /// 3: false.
    False,
}

/// Which script runs a method: the sh plugin has one for all, the eval
/// plugin one file per method (and `missing` for the rest).
pub trait Scripts: Send + Sync {
    /// The script that runs `method`.
    fn script(&self, method: &str) -> &Script;
}

/// The engine: the scripts and the `$tmpdir` they see.
pub struct Engine<S: Scripts> {
    /// The scripts.
    pub scripts: S,
    /// `$tmpdir`.
    pub tmpdir: PathBuf,
}

impl<S: Scripts> Engine<S> {
    /// Runs `method args…`, stdout collected.
    pub fn call(&self, method: &str, args: &[&str]) -> Result<Answer> {
        self.call_with(method, args, None, Out::Collect).map(|(a, _)| a)
    }

    /// Runs `method args…` with `stdin` and `out` as given; returns the
    /// answer and how many bytes went to stdout.
    pub fn call_with(&self, method: &str, args: &[&str], stdin: Option<&[u8]>, out: Out<'_>) -> Result<(Answer, u64)> {
        let script = self.scripts.script(method);
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(method);
        argv.extend_from_slice(args);
        let done = call::run(script, &argv, &self.tmpdir, stdin, out)?;
        let len = done.stdout_len;
        Ok((answer(script, done)?, len))
    }

    /// A method that may only succeed or be missing (3 is an error).
    pub fn call_ok(&self, method: &str, args: &[&str]) -> Result<Option<Vec<u8>>> {
        match self.call(method, args)? {
            Answer::Ok(out) => Ok(Some(out)),
            Answer::Missing => Ok(None),
            Answer::False => Err(self.unexpected_false(method)),
        }
    }

    /// A boolean method: 0 true, 3 false, missing `default`.
    pub fn call_bool(&self, method: &str, args: &[&str], default: bool) -> Result<bool> {
        Ok(match self.call(method, args)? {
            Answer::Ok(_) => true,
            Answer::False => false,
            Answer::Missing => default,
        })
    }

    /// nbdkit's error for exit 3 from a method that is not boolean.
    pub fn unexpected_false(&self, method: &str) -> Error {
        Error::io(format!("{}: {method} method returned unexpected code (3/false)", self.scripts.script(method).name()))
    }

    /// Name of the script of `method`, for messages.
    pub fn name(&self, method: &str) -> String {
        self.scripts.script(method).name()
    }

    /// thread_model: missing or unrecognised means serialize_all_requests.
    pub fn thread_model(&self) -> Result<ThreadModel> {
        let Some(out) = self.call_ok("thread_model", &[])? else {
            return Ok(ThreadModel::SerializeAllRequests);
        };
        let s = chomp(&out);
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "parallel" => ThreadModel::Parallel,
            "serialize_requests" => ThreadModel::SerializeRequests,
            "serialize_all_requests" => ThreadModel::SerializeAllRequests,
            "serialize_connections" => ThreadModel::SerializeConnections,
            _ => {
                crate::debug!("{}: ignoring unrecognized thread model: {s}", self.name("thread_model"));
                ThreadModel::SerializeAllRequests
            }
        })
    }

    /// list_exports.
    pub fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Option<Vec<Export>>> {
        let out = self.call_ok("list_exports", &[tf(readonly), tf(is_tls)])?;
        Ok(out.map(|o| parse_exports(&String::from_utf8_lossy(&o))))
    }

    /// default_export: the first name of any list format.
    pub fn default_export(&self, readonly: bool, is_tls: bool) -> Result<Option<String>> {
        let out = self.call_ok("default_export", &[tf(readonly), tf(is_tls)])?;
        Ok(out.map(|o| {
            let text = String::from_utf8_lossy(&o).into_owned();
            parse_exports(&text).into_iter().next().map(|e| e.name).unwrap_or_default()
        }))
    }

    /// can_fua / can_cache: none, emulate or native.
    pub fn call_support(&self, method: &str, h: &str) -> Result<Option<Support>> {
        let Some(out) = self.call_ok(method, &[h])? else { return Ok(None) };
        let s = chomp(&out);
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Some(Support::None)),
            "emulate" => Ok(Some(Support::Emulate)),
            "native" => Ok(Some(Support::Native)),
            _ => Err(Error::io(format!("{}: could not parse output from {method} method: {s}", self.name(method)))),
        }
    }

    /// get_size.
    pub fn get_size(&self, h: &str) -> Result<u64> {
        match self.call_ok("get_size", &[h])? {
            Some(out) => {
                let s = chomp(&out);
                parse_size(s.trim()).map_err(|_| {
                    Error::io(format!("{}: could not parse output from get_size method: {s}", self.name("get_size")))
                })
            }
            None => Err(Error::io(format!("{}: the get_size method is required", self.name("get_size")))),
        }
    }

    /// block_size: three sizes, or no information.
    pub fn block_size(&self, h: &str) -> Result<Option<BlockSize>> {
        let Some(out) = self.call_ok("block_size", &[h])? else { return Ok(None) };
        let text = String::from_utf8_lossy(&out);
        let bad = || Error::io(format!("{}: block_size method cannot be parsed", self.name("block_size")));
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.len() != 3 {
            return Err(bad());
        }
        let mut v = [0u32; 3];
        for (i, w) in words.iter().enumerate() {
            v[i] = parse_size(w).ok().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?;
        }
        if v == [0, 0, 0] {
            return Ok(None);
        }
        let bs = BlockSize { min: v[0], preferred: v[1], max: v[2] };
        if !bs.is_valid() {
            return Err(Error::io(format!(
                "{}: block_size method returned invalid sizes: {} {} {}",
                self.name("block_size"),
                v[0],
                v[1],
                v[2]
            )));
        }
        Ok(Some(bs))
    }

    /// pread: exactly `buf.len()` bytes on stdout.
    pub fn pread(&self, h: &str, buf: &mut [u8], offset: u64) -> Result<()> {
        let (count, off) = (buf.len().to_string(), offset.to_string());
        let want = buf.len() as u64;
        match self.call_with("pread", &[h, &count, &off], None, Out::Into(buf))? {
            (Answer::Ok(_), got) if got == want => Ok(()),
            (Answer::Ok(_), got) => Err(Error::io(format!(
                "{}: incorrect amount of data read: expecting {want} bytes but received {got} bytes from the script",
                self.name("pread")
            ))),
            (Answer::Missing, _) => Err(Error::io(format!("{}: the pread method is required", self.name("pread")))),
            (Answer::False, _) => Err(self.unexpected_false("pread")),
        }
    }

    /// pwrite: the data on stdin.
    pub fn pwrite(&self, h: &str, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let (count, off, fl) = (buf.len().to_string(), offset.to_string(), flags_string(flags));
        match self.call_with("pwrite", &[h, &count, &off, &fl], Some(buf), Out::Collect)?.0 {
            Answer::Ok(_) => Ok(()),
            Answer::Missing => Err(Error::new(ErrorKind::ReadOnly, "pwrite not implemented")),
            Answer::False => Err(self.unexpected_false("pwrite")),
        }
    }

    /// flush, trim, cache: missing means success.
    pub fn call_or_ignore(&self, method: &str, args: &[&str]) -> Result<()> {
        self.call_ok(method, args).map(|_| ())
    }

    /// zero: missing means "write zeroes instead" (EOPNOTSUPP).
    pub fn zero(&self, h: &str, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let (c, o, f) = (count.to_string(), offset.to_string(), flags_string(flags));
        match self.call_ok("zero", &[h, &c, &o, &f])? {
            Some(_) => Ok(()),
            None => {
                crate::debug!("zero falling back to pwrite");
                Err(Error::new(ErrorKind::NotSupported, "zero falling back to pwrite"))
            }
        }
    }

    /// extents: `offset length [type]` lines.
    pub fn extents(&self, h: &str, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        let (c, o, f) = (count.to_string(), offset.to_string(), flags_string(flags));
        let Some(out) = self.call_ok("extents", &[h, &c, &o, &f])? else {
            return Err(Error::io(format!(
                "{}: can_extents returned true, but extents method is not defined",
                self.name("extents")
            )));
        };
        let name = self.name("extents");
        for line in String::from_utf8_lossy(&out).lines() {
            let l = line.trim();
            // Blank lines and comments are allowed (nbdkit 1.46).
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (off, len, typ) =
                parse_extent(l).ok_or_else(|| Error::io(format!("{name}: extents: cannot parse {line}")))?;
            crate::debug!("{name}: adding extent {off} {len} {typ}");
            ext.add(off, len, typ)?;
        }
        Ok(())
    }
}

/// Turns a finished script's exit status into an answer or an error,
/// with the side effects of codes 4 to 8.
pub fn answer(script: &Script, done: Done) -> Result<Answer> {
    let code = match done.status {
        Status::Signal(s) => return Err(Error::io(format!("{}: script terminated by signal {s}", script.name()))),
        Status::Code(c) => c,
    };
    match code {
        0 => Ok(Answer::Ok(done.stdout)),
        2 => Ok(Answer::Missing),
        3 => Ok(Answer::False),
        4 => {
            shutdown_server();
            Ok(Answer::Ok(done.stdout))
        }
        5 => {
            shutdown_server();
            Err(script_error(script, &done.stderr, ErrorKind::Shutdown))
        }
        6 => {
            disconnect(true);
            Ok(Answer::Missing)
        }
        7 => {
            disconnect(false);
            Ok(Answer::Ok(done.stdout))
        }
        8 => {
            disconnect(false);
            Err(script_error(script, &done.stderr, ErrorKind::Shutdown))
        }
        _ => Err(script_error(script, &done.stderr, ErrorKind::Io)),
    }
}

/// `nbdkit_shutdown()`: the server's graceful shutdown, from this thread
/// (before the server serves, as in `config`, it only takes effect once
/// the server starts; `--dump-plugin` just ends).
fn shutdown_server() {
    crate::debug!("script requested server shutdown");
    shutdown::request();
}

/// `nbdkit_disconnect(force)` for the connection of the running request:
/// a hard one shuts the socket down both ways; a soft one stops reading
/// requests (those in flight are answered).
#[allow(unsafe_code)]
fn disconnect(force: bool) {
    if let Some(fd) = shutdown::connection_fd() {
        crate::debug!("script requested {} disconnect", if force { "hard" } else { "soft" });
        // In the handshake, the server stops reading once its reply is sent.
        if !force && shutdown::defer_soft_disconnect() {
            return;
        }
        let how = if force { libc::SHUT_RDWR } else { libc::SHUT_RD };
        // SAFETY: shutdown(2) of the connection's socket, open for the
        // whole request (ENOTSOCK under -s is harmless).
        unsafe { libc::shutdown(fd, how) };
    }
}

/// The errno names a script may start its stderr with, and what they mean.
const ERRNOS: &[(&str, ErrorKind)] = &[
    ("EPERM", ErrorKind::Perm),
    ("EIO", ErrorKind::Io),
    ("ENOMEM", ErrorKind::NoMem),
    ("EINVAL", ErrorKind::Invalid),
    ("ENOSPC", ErrorKind::NoSpace),
    ("EOVERFLOW", ErrorKind::Overflow),
    ("ESHUTDOWN", ErrorKind::Shutdown),
    ("ENOTSUP", ErrorKind::NotSupported),
    ("EOPNOTSUPP", ErrorKind::NotSupported),
    ("EROFS", ErrorKind::ReadOnly),
    ("EDQUOT", ErrorKind::NoSpace),
    ("EFBIG", ErrorKind::NoSpace),
];

/// nbdkit's `handle_script_error`: an errno name at the start of stderr
/// (any case, then whitespace or the end) sets the error; the message is
/// the first line after it; a multi-line text goes whole to the debug log.
pub fn script_error(script: &Script, stderr: &[u8], default: ErrorKind) -> Error {
    let text = String::from_utf8_lossy(stderr);
    let (kind, rest) = parse_errno(&text, default);
    let rest = rest.trim_end_matches('\n');
    let name = script.name();
    if text.trim_end_matches('\n').is_empty() {
        return Error::new(kind, format!("{name}: script exited with error, but did not print an error message on stderr"));
    }
    let first = match rest.find('\n') {
        Some(i) => {
            crate::debug!("{name}: {}", text.trim_end_matches('\n'));
            &rest[..i]
        }
        None => rest,
    };
    Error::new(kind, format!("{name}: {first}"))
}

/// The errno at the start of `text` and the text after it.
fn parse_errno(text: &str, default: ErrorKind) -> (ErrorKind, &str) {
    for &(name, kind) in ERRNOS {
        let Some(head) = text.get(..name.len()) else { continue };
        if !head.eq_ignore_ascii_case(name) {
            continue;
        }
        let rest = &text[name.len()..];
        return match rest.chars().next() {
            None => (kind, rest),
            Some(c) if c.is_ascii_whitespace() => (kind, rest.trim_start_matches(|c: char| c.is_ascii_whitespace())),
            // EINVALID is not EINVAL: EIO, and the whole text is the message.
            Some(_) => (ErrorKind::Io, text),
        };
    }
    (default, text)
}

/// The text minus one trailing newline.
pub fn chomp(out: &[u8]) -> String {
    let s = String::from_utf8_lossy(out);
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

/// `true` / `false` as scripts get them.
pub fn tf(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// The flags argument: `fua,may_trim,req_one,fast`, in this order.
pub fn flags_string(f: Flags) -> String {
    let mut v = Vec::new();
    for (flag, name) in [(Flags::FUA, "fua"), (Flags::MAY_TRIM, "may_trim"), (Flags::REQ_ONE, "req_one"), (Flags::FAST_ZERO, "fast")] {
        if f.contains(flag) {
            v.push(name);
        }
    }
    v.join(",")
}

/// list_exports output: `NAMES` (the default), `INTERLEAVED` or
/// `NAMES+DESCRIPTIONS`, chosen by the first line.
pub fn parse_exports(text: &str) -> Vec<Export> {
    let mut lines: Vec<&str> = text.lines().collect();
    let format = match lines.first() {
        Some(&"INTERLEAVED") | Some(&"NAMES+DESCRIPTIONS") | Some(&"NAMES") => lines.remove(0),
        _ => "NAMES",
    };
    match format {
        "INTERLEAVED" => lines
            .chunks(2)
            .map(|c| Export { name: c[0].to_string(), description: c.get(1).map(|d| d.to_string()) })
            .collect(),
        "NAMES+DESCRIPTIONS" => {
            let half = lines.len().div_ceil(2);
            (0..half)
                .map(|i| Export { name: lines[i].to_string(), description: lines.get(half + i).map(|d| d.to_string()) })
                .collect()
        }
        _ => lines.iter().map(|n| Export::new(*n)).collect(),
    }
}

/// One extents line: offset, length (parse_size syntax) and an optional
/// type: a number, or words with `hole` and/or `zero` in them.
fn parse_extent(line: &str) -> Option<(u64, u64, u32)> {
    let mut w = line.split_whitespace();
    let off = parse_size(w.next()?).ok()?;
    let len = parse_size(w.next()?).ok()?;
    let typ = match w.next() {
        None => 0,
        Some(t) if t.starts_with(|c: char| c.is_ascii_digit()) => t.parse::<u32>().ok()?,
        Some(t) => {
            let mut typ = 0;
            if t.contains("hole") {
                typ |= extents::HOLE;
            }
            if t.contains("zero") {
                typ |= extents::ZERO;
            }
            typ
        }
    };
    Some((off, len, typ))
}

/// A fresh `/tmp/nbdkitXXXXXX`, removed (with everything in it) on drop.
pub struct TmpDir(pub PathBuf);

impl TmpDir {
    /// mkdtemp.
    #[allow(unsafe_code)]
    pub fn new() -> std::io::Result<TmpDir> {
        let mut template = *b"/tmp/nbdkitXXXXXX\0";
        // SAFETY: a writable NUL-terminated template.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TmpDir(PathBuf::from(String::from_utf8_lossy(&template[..template.len() - 1]).into_owned())))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl TmpDir {
    /// rm -rf (again: harmless).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script() -> Script {
        Script::new(PathBuf::from("/s"), false)
    }

    #[test]
    fn errno_names_start_the_message() {
        let e = script_error(&script(), b"ENOSPC  disk full\n", ErrorKind::Io);
        assert_eq!((e.kind(), e.message()), (ErrorKind::NoSpace, "/s: disk full"));
        let e = script_error(&script(), b"einval", ErrorKind::Io);
        assert_eq!((e.kind(), e.message()), (ErrorKind::Invalid, "/s: "));
        let e = script_error(&script(), b"EINVALID thing", ErrorKind::Io);
        assert_eq!((e.kind(), e.message()), (ErrorKind::Io, "/s: EINVALID thing"));
        let e = script_error(&script(), b"EPERM first\nsecond\n\n", ErrorKind::Io);
        assert_eq!((e.kind(), e.message()), (ErrorKind::Perm, "/s: first"));
        let e = script_error(&script(), b"\n\n", ErrorKind::Shutdown);
        assert_eq!(e.kind(), ErrorKind::Shutdown);
        assert!(e.message().ends_with("did not print an error message on stderr"));
        let e = script_error(&script(), b"ENOTSUP x", ErrorKind::Io);
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        let e = script_error(&script(), b"EOPNOTSUPP x", ErrorKind::Io);
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        let e = script_error(&script(), b"EROFS\tx", ErrorKind::Io);
        assert_eq!((e.kind(), e.message()), (ErrorKind::ReadOnly, "/s: x"));
        let e = script_error(&script(), b"EBADF x", ErrorKind::Io);
        assert_eq!((e.kind(), e.message()), (ErrorKind::Io, "/s: EBADF x"));
    }

    #[test]
    fn flags_in_nbdkits_order() {
        assert_eq!(flags_string(Flags::NONE), "");
        assert_eq!(flags_string(Flags::FAST_ZERO.with(Flags::FUA).with(Flags::MAY_TRIM)), "fua,may_trim,fast");
        assert_eq!(flags_string(Flags::REQ_ONE), "req_one");
    }

    #[test]
    fn export_list_formats() {
        let n = |v: Vec<Export>| v.into_iter().map(|e| (e.name, e.description)).collect::<Vec<_>>();
        assert_eq!(n(parse_exports("a\nb\n")), [("a".into(), None), ("b".into(), None)]);
        assert_eq!(n(parse_exports("NAMES\na\n")), [("a".into(), None)]);
        assert_eq!(
            n(parse_exports("INTERLEAVED\na\nda\nb\ndb\n")),
            [("a".into(), Some("da".into())), ("b".into(), Some("db".into()))]
        );
        assert_eq!(
            n(parse_exports("NAMES+DESCRIPTIONS\na\nb\nda\ndb\n")),
            [("a".into(), Some("da".into())), ("b".into(), Some("db".into()))]
        );
        assert!(parse_exports("").is_empty());
    }

    #[test]
    fn extent_lines() {
        assert_eq!(parse_extent("0 1M"), Some((0, 1 << 20, 0)));
        assert_eq!(parse_extent("4096 4096 3"), Some((4096, 4096, 3)));
        assert_eq!(parse_extent("0 512 hole,zero"), Some((0, 512, 3)));
        assert_eq!(parse_extent("0 512 zero"), Some((0, 512, 2)));
        assert_eq!(parse_extent("0 512 data"), Some((0, 512, 0)));
        assert_eq!(parse_extent("0"), None);
        assert_eq!(parse_extent("x 1"), None);
    }
}
