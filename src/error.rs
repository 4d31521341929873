//! Errors of plugin and filter calls: a kind that becomes an NBD error
//! number on the wire, and a message for the log.
//!
//! Protocol violations by the peer are a different type
//! ([`crate::proto::codec::DecodeError`]): they close the connection.

use std::borrow::Cow;
use std::fmt;
use std::io;

/// Why a request failed, in the terms the client will see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// EPERM: operation not permitted.
    Perm,
    /// EROFS: the export (or this layer) is read-only; sent as EPERM.
    ReadOnly,
    /// EIO.
    Io,
    /// ENOMEM.
    NoMem,
    /// EINVAL.
    Invalid,
    /// ENOSPC (also EFBIG, EDQUOT).
    NoSpace,
    /// EOVERFLOW.
    Overflow,
    /// ENOTSUP / EOPNOTSUPP.
    NotSupported,
    /// ESHUTDOWN: the server is stopping.
    Shutdown,
    /// ENOENT: no such export or file (sent as EINVAL).
    NotFound,
}

impl ErrorKind {
    /// The C errno value of this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Perm => libc::EPERM,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Io => libc::EIO,
            ErrorKind::NoMem => libc::ENOMEM,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Overflow => libc::EOVERFLOW,
            ErrorKind::NotSupported => libc::EOPNOTSUPP,
            ErrorKind::Shutdown => libc::ESHUTDOWN,
            ErrorKind::NotFound => libc::ENOENT,
        }
    }

    /// The kind for a C errno value; unknown values become `Io`, as
    /// nbdkit does for plugins that do not preserve errno.
    pub fn from_errno(e: i32) -> ErrorKind {
        match e {
            libc::EPERM => ErrorKind::Perm,
            libc::EROFS => ErrorKind::ReadOnly,
            libc::ENOMEM => ErrorKind::NoMem,
            libc::EINVAL => ErrorKind::Invalid,
            libc::ENOSPC | libc::EFBIG | libc::EDQUOT => ErrorKind::NoSpace,
            libc::EOVERFLOW => ErrorKind::Overflow,
            libc::EOPNOTSUPP => ErrorKind::NotSupported,
            libc::ESHUTDOWN => ErrorKind::Shutdown,
            libc::ENOENT => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        }
    }

    /// The errno's symbolic name, as nbdkit's error filter spells it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Perm => "EPERM",
            ErrorKind::ReadOnly => "EROFS",
            ErrorKind::Io => "EIO",
            ErrorKind::NoMem => "ENOMEM",
            ErrorKind::Invalid => "EINVAL",
            ErrorKind::NoSpace => "ENOSPC",
            ErrorKind::Overflow => "EOVERFLOW",
            ErrorKind::NotSupported => "ENOTSUP",
            ErrorKind::Shutdown => "ESHUTDOWN",
            ErrorKind::NotFound => "ENOENT",
        }
    }
}

/// A failed plugin or filter call: a kind for the wire, a message for the log.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: Cow<'static, str>,
}

/// Result of plugin and filter calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a message for the log.
    pub fn new(kind: ErrorKind, msg: impl Into<Cow<'static, str>>) -> Error {
        Error { kind, msg: msg.into() }
    }
    /// EINVAL with a message: the usual error for bad configuration.
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Error {
        Error::new(ErrorKind::Invalid, msg)
    }
    /// EIO with a message.
    pub fn io(msg: impl Into<Cow<'static, str>>) -> Error {
        Error::new(ErrorKind::Io, msg)
    }
    /// The error of an OS call, with the context nbdkit prints before it
    /// (`"pread: disk.img: offset=0, count=512"`).
    pub fn os(context: impl fmt::Display, e: io::Error) -> Error {
        let kind = e.raw_os_error().map_or(ErrorKind::Io, ErrorKind::from_errno);
        Error::new(kind, format!("{context}: {}", strip_os_suffix(&e)))
    }
    /// The error of the last failing libc call.
    pub fn last_os(context: impl fmt::Display) -> Error {
        Error::os(context, io::Error::last_os_error())
    }
    /// What the client will see.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// What the log will say.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

/// `io::Error`'s Display adds " (os error N)"; nbdkit prints strerror alone.
pub fn strip_os_suffix(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        let kind = match e.raw_os_error() {
            Some(n) => ErrorKind::from_errno(n),
            None => match e.kind() {
                io::ErrorKind::PermissionDenied => ErrorKind::Perm,
                io::ErrorKind::OutOfMemory => ErrorKind::NoMem,
                io::ErrorKind::InvalidInput => ErrorKind::Invalid,
                io::ErrorKind::Unsupported => ErrorKind::NotSupported,
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                _ => ErrorKind::Io,
            },
        };
        Error { kind, msg: Cow::Owned(strip_os_suffix(&e)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_their_errno_and_drop_rusts_suffix() {
        let e = Error::os("pread: x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.message(), "pread: x: No space left on device");
    }

    #[test]
    fn errno_round_trips() {
        for k in [ErrorKind::Perm, ErrorKind::Io, ErrorKind::NoMem, ErrorKind::Invalid,
                  ErrorKind::NoSpace, ErrorKind::Overflow, ErrorKind::NotSupported,
                  ErrorKind::Shutdown, ErrorKind::ReadOnly, ErrorKind::NotFound] {
            assert_eq!(ErrorKind::from_errno(k.errno()), k);
        }
        assert_eq!(ErrorKind::from_errno(libc::EBADF), ErrorKind::Io);
    }
}
