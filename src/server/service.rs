//! The service-mode chores around the listening sockets: descriptors
//! handed over by systemd (socket activation), `-u`/`-g` (dropping
//! privileges once the sockets are bound), `--swap` (`mlockall`),
//! `--selinux-label` and `--vsock`.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::error::strip_os_suffix;

/// The listening descriptors systemd passed: 3 … 3+n-1 (already checked
/// and made close-on-exec by the command line, `cli::activation`).
pub fn activation_sockets(n: u32) -> Vec<socket2::Socket> {
    (0..n as i32)
        .map(|i| {
            // SAFETY: the descriptor was checked open at start-up, nothing
            // else in the process owns it, and it is taken once.
            let fd = unsafe { OwnedFd::from_raw_fd(3 + i) };
            socket2::Socket::from(fd)
        })
        .collect()
}

/// A user or group looked up by name (`getpwnam`, `getgrnam`), else read
/// as a number, as nbdkit's `parseuser`/`parsegroup` do (`sscanf "%d"`).
fn lookup(what: Who, id: &str) -> Result<Ids, String> {
    let (opt, kind, func) = match what {
        Who::User => ("-u", "user name or uid", "getpwnam"),
        Who::Group => ("-g", "group name or gid", "getgrnam"),
    };
    let found = match CString::new(id) {
        Ok(c) => match what {
            Who::User => getpwnam(&c),
            Who::Group => getgrnam(&c),
        },
        Err(_) => Ok(None),
    };
    match found {
        Ok(Some(ids)) => Ok(ids),
        other => match scan_int(id) {
            Some(n) => Ok(Ids { id: n as u32, gid: None }),
            None => {
                let mut msg = format!("nbdkit: {opt} option: {id} is not a valid {kind}");
                if let Err(e) = other {
                    msg.push_str(&format!(" ({func} error: {})", strip_os_suffix(&e)));
                }
                Err(msg)
            }
        },
    }
}

/// How a start-up step failed.
#[derive(Debug)]
pub enum Fail {
    /// nbdkit prints this line as it is (`nbdkit: -u option: …`).
    Plain(String),
    /// An `error:` message.
    Error(String),
}

#[derive(Clone, Copy)]
enum Who {
    User,
    Group,
}

/// A uid (with the user's primary gid) or a gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ids {
    id: u32,
    gid: Option<u32>,
}

/// `sscanf (id, "%d", &val) == 1`: optional blanks, a sign, digits, and
/// whatever follows ignored.
fn scan_int(s: &str) -> Option<i32> {
    let t = s.trim_start();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let end = digits.bytes().take_while(u8::is_ascii_digit).count();
    if end == 0 {
        return None;
    }
    // scanf's overflow is undefined; wrap like a C int would.
    let v = digits[..end].bytes().fold(0i64, |a, d| (a * 10 + i64::from(d - b'0')) & 0xffff_ffff);
    let v = v as u32 as i32;
    Some(if neg { v.wrapping_neg() } else { v })
}

fn getpwnam(name: &CString) -> io::Result<Option<Ids>> {
    let mut buf = vec![0u8; 16384];
    // SAFETY: passwd is plain data; all zero is a valid value to overwrite.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, buf's length is given.
    let r = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    if result.is_null() {
        // 0 or ENOENT, ESRCH…: "not found".
        return match r {
            0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    Ok(Some(Ids { id: pwd.pw_uid, gid: Some(pwd.pw_gid) }))
}

fn getgrnam(name: &CString) -> io::Result<Option<Ids>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: group is plain data; all zero is a valid value to overwrite.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, buf's length is given.
    let r = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    if result.is_null() {
        return match r {
            0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    Ok(Some(Ids { id: grp.gr_gid, gid: None }))
}

/// `-u USER` / `-g GROUP`, after the sockets are bound: the supplementary
/// groups, then the group, then the user (once the uid is gone, nothing
/// else can be changed). With `-g` the group and the only supplementary
/// group become GROUP, as in nbdkit. With `-u` and no `-g`, nbdkit keeps
/// root's group and supplementary groups; we take the user's primary
/// group instead (a process running as `nobody` with group `root` and
/// root's groups is not much of a drop). Returns the `debug` lines to
/// print, or the error.
pub fn change_user(user: Option<&str>, group: Option<&str>) -> Result<Vec<String>, Fail> {
    let mut said = Vec::new();
    let uid = user.map(|u| lookup(Who::User, u)).transpose().map_err(Fail::Plain)?;
    let gid = match group {
        Some(g) => Some(lookup(Who::Group, g).map_err(Fail::Plain)?.id),
        None => uid.and_then(|u| u.gid),
    };
    if let Some(gid) = gid {
        // SAFETY: setgroups reads one gid from a valid pointer.
        if unsafe { libc::setgroups(1, &gid) } == -1 {
            return Err(Fail::Error(format!("setgroups: {}", strip_os_suffix(&io::Error::last_os_error()))));
        }
        // SAFETY: integer argument only (the C library applies it to
        // every thread).
        if unsafe { libc::setgid(gid) } == -1 {
            return Err(Fail::Error(format!("setgid: {}", strip_os_suffix(&io::Error::last_os_error()))));
        }
        said.push(format!("changed group to {}", group.map_or_else(|| gid.to_string(), str::to_string)));
    } else if uid.is_some() {
        // A numeric uid with no passwd entry: at least lose root's
        // supplementary groups.
        // SAFETY: a count of zero reads nothing.
        if unsafe { libc::setgroups(0, std::ptr::null()) } == -1 {
            return Err(Fail::Error(format!("setgroups: {}", strip_os_suffix(&io::Error::last_os_error()))));
        }
    }
    if let (Some(u), Some(name)) = (uid, user) {
        // SAFETY: integer argument only (the C library applies it to
        // every thread).
        if unsafe { libc::setuid(u.id) } == -1 {
            return Err(Fail::Error(format!("setuid: {}", strip_os_suffix(&io::Error::last_os_error()))));
        }
        said.push(format!("changed user to {name}"));
    }
    Ok(said)
}

/// `--swap`: lock every page, now and later, into RAM (the export may be
/// the machine's swap device, which a paged-out server would deadlock).
/// nbdkit's message on failure is a plain line.
pub fn lock_memory() -> Result<(), Fail> {
    // SAFETY: flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == -1 {
        return Err(Fail::Plain(format!("nbdkit: --swap: mlockall: {}", strip_os_suffix(&io::Error::last_os_error()))));
    }
    Ok(())
}

/// `--vsock`: a stream socket listening on every CID (`VMADDR_CID_ANY`)
/// at PORT (`-p`, a uint32, default 10809). Where the kernel has vsock but
/// no transport (no virtio-vsock/vmci/hyper-v guest driver, no vhost host
/// side, no `vsock_loopback`), binding works but no client can ever
/// connect: that is a start-up error too.
pub fn bind_vsock(port: Option<&str>) -> Result<socket2::Socket, String> {
    let port = match port {
        None => 10809,
        Some(p) => crate::util::parse::parse_unsigned("port", p, u32::MAX.into()).map_err(|e| e.message().to_string())?
            as u32,
    };
    let s = socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM.cloexec(), None).map_err(|e| {
        format!("--vsock: socket: {} (this kernel has no AF_VSOCK support)", strip_os_suffix(&e))
    })?;
    if let Some(why) = no_vsock_transport() {
        return Err(format!("--vsock: {why}"));
    }
    s.bind(&socket2::SockAddr::vsock(libc::VMADDR_CID_ANY, port))
        .map_err(|e| format!("--vsock: bind: port {port}: {}", strip_os_suffix(&e)))?;
    s.listen(libc::SOMAXCONN).map_err(|e| format!("--vsock: listen: {}", strip_os_suffix(&e)))?;
    crate::debug!("bound to vsock any:{port}");
    Ok(s)
}

/// Asks /dev/vsock for this machine's CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID`):
/// `VMADDR_CID_ANY` back means no transport is loaded. None when there is a
/// transport, or when /dev/vsock cannot be asked (not root: then binding
/// is the only check, as in nbdkit).
fn no_vsock_transport() -> Option<String> {
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let f = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 to a valid pointer.
    let r = unsafe {
        libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid as *mut u32)
    };
    (r == 0 && cid == libc::VMADDR_CID_ANY).then(|| {
        "no vsock transport on this machine (load vsock_loopback, or run in a VM with virtio-vsock)".to_string()
    })
}

/// Where `--selinux-label` goes: the calling thread's socket-creation
/// context (what libselinux's `setsockcreatecon_raw` writes).
const SOCKCREATE: &str = "/proc/thread-self/attr/sockcreate";

/// `--selinux-label`: runs `bind` with LABEL as this thread's context for
/// new sockets, then resets it, as nbdkit does around its listening
/// sockets. No libselinux: `set` writes the label (with its NUL, as
/// libselinux does) to the attribute, and clears it with an empty write.
pub fn with_socket_label<T>(
    label: &str,
    mut set: impl FnMut(&[u8]) -> io::Result<()>,
    bind: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let mut v = label.as_bytes().to_vec();
    v.push(0);
    if let Err(e) = set(&v) {
        let why = strip_os_suffix(&e);
        if !std::path::Path::new("/sys/fs/selinux").exists() {
            return Err(format!("--selinux-label: SELinux is not enabled on this machine ({SOCKCREATE}: {why})"));
        }
        return Err(format!("--selinux-label: setsockcreatecon_raw: {label}: {why}"));
    }
    let r = bind();
    if let Err(e) = set(&[]) {
        return Err(format!("--selinux-label: setsockcreatecon_raw: NULL: {}", strip_os_suffix(&e)));
    }
    r
}

fn write_attr(v: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(SOCKCREATE)?;
    // One write: the kernel takes the attribute from a single call.
    let n = f.write(v)?;
    if n != v.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// [`with_socket_label`] on this thread's real attribute.
pub fn labelled<T>(label: Option<&str>, bind: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match label {
        Some(l) => with_socket_label(l, write_attr, bind),
        None => bind(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_label_is_set_for_the_bind_then_cleared() {
        let writes = std::cell::RefCell::new(Vec::new());
        let set = |v: &[u8]| {
            writes.borrow_mut().push(v.to_vec());
            Ok(())
        };
        let seen = with_socket_label("system_u:object_r:svirt_socket_t:s0", set, || Ok(writes.borrow().len())).unwrap();
        assert_eq!(seen, 1, "bind runs between the two writes");
        assert_eq!(*writes.borrow(), [b"system_u:object_r:svirt_socket_t:s0\0".to_vec(), Vec::new()]);
        // Cleared even when the bind fails.
        writes.borrow_mut().clear();
        let set = |v: &[u8]| {
            writes.borrow_mut().push(v.to_vec());
            Ok(())
        };
        let r: Result<(), String> = with_socket_label("x", set, || Err("bind failed".into()));
        assert_eq!(r.unwrap_err(), "bind failed");
        assert_eq!(writes.borrow().len(), 2);
        // A refused label: nothing is bound.
        let set = |_: &[u8]| Err(io::Error::from_raw_os_error(libc::EINVAL));
        let e = with_socket_label("x", set, || -> Result<(), String> { panic!("bound") }).unwrap_err();
        assert!(e.starts_with("--selinux-label: "), "{e}");
    }

    #[test]
    fn scan_int_is_sscanf_percent_d() {
        assert_eq!(scan_int("65534"), Some(65534));
        assert_eq!(scan_int(" 12abc"), Some(12));
        assert_eq!(scan_int("-1"), Some(-1));
        assert_eq!(scan_int("+7"), Some(7));
        assert_eq!(scan_int("x1"), None);
        assert_eq!(scan_int(""), None);
        assert_eq!(scan_int("-"), None);
    }

    #[test]
    fn lookups_by_name_and_number() {
        assert_eq!(lookup(Who::User, "root").unwrap(), Ids { id: 0, gid: Some(0) });
        assert_eq!(lookup(Who::Group, "root").unwrap(), Ids { id: 0, gid: None });
        assert_eq!(lookup(Who::User, "4242").unwrap(), Ids { id: 4242, gid: None });
        assert_eq!(
            lookup(Who::User, "no-such-user-x").unwrap_err(),
            "nbdkit: -u option: no-such-user-x is not a valid user name or uid"
        );
        assert_eq!(
            lookup(Who::Group, "no-such-group-x").unwrap_err(),
            "nbdkit: -g option: no-such-group-x is not a valid group name or gid"
        );
    }
}
