//! The WRITE paths whose payload is still in the socket when the request
//! is dispatched: read straight into fresh storage the plugin hands out
//! (`Handle::pwrite_fill`, the memory plugin), else into a pooled buffer
//! for `pwrite`. In every case a payload cut
//! off by the client reaches nothing (bad-input T25). Also the payload
//! reads themselves ([`read_into`]), which over TCP wait for a big
//! payload to arrive whole with the socket's low mark.

use std::io::{BufReader, Read};
use std::os::fd::RawFd;

use super::execute::{execute, failed};
use super::incoming::discard;
use super::output::{error_reply, Reply};
use super::Conn;
use crate::backend::Flags;
use crate::error::{Error, ErrorKind};
use crate::proto::request::Request;
use crate::proto::wire::cmdflag;
use crate::server::tls::stream::Input;
use crate::util::shutdown;

/// Runs a big WRITE whose payload is still unread: the handle hands out
/// fresh storage, the payload is read straight into it, and it becomes
/// the data only once all of it has arrived (a payload cut off never
/// reaches the disk). A handle that cannot gets the usual `pwrite`.
/// `None` if the client hung up mid-payload or the socket broke.
pub(super) fn write_filled(conn: &Conn, r: &mut BufReader<Input>, req: &Request) -> Option<Reply> {
    let n = req.count as usize;
    let fua = if req.flags & cmdflag::FUA != 0 { Flags::FUA } else { Flags::NONE };
    // None: `fill` did not run; Some(false): the payload was cut off.
    let mut arrived = None;
    let result = {
        let mut fill = |bufs: &mut [&mut [u8]]| {
            let ok = read_into(conn, r, bufs);
            arrived = Some(ok);
            ok
        };
        shutdown::catch_panic("pwrite", || Ok(conn.handle.pwrite_fill(n, req.offset, fua, &mut fill)))
    };
    let code = match (arrived, result) {
        (Some(false), _) => return None,
        (Some(true), Ok(Some(Ok(())))) => 0,
        (None, Ok(None)) => {
            // Not supported after all: the payload into a buffer, as usual.
            let mut payload = match conn.pool.get(n) {
                Ok(p) => p,
                Err(e) => {
                    discard(r, n as u64).ok()?;
                    return Some(error_reply(req, conn.mode, failed(req, &e)));
                }
            };
            if !read_into(conn, r, &mut [&mut payload[..n]]) {
                return None;
            }
            let reply = execute(&*conn.handle, req, &payload, conn.mode, &conn.export, conn.serialize_all, &conn.pool);
            conn.pool.put(payload);
            return Some(reply);
        }
        (Some(true), Ok(None)) | (None, Ok(Some(Ok(())))) => {
            if arrived.is_none() {
                discard(r, n as u64).ok()?;
            }
            failed(req, &Error::new(ErrorKind::Io, "pwrite_fill: the payload was not taken"))
        }
        (arrived, Ok(Some(Err(e))) | Err(e)) => {
            if arrived.is_none() {
                discard(r, n as u64).ok()?;
            }
            failed(req, &e)
        }
    };
    Some(error_reply(req, conn.mode, code))
}

/// Fills `bufs` from the connection: what is buffered first, then straight
/// from the socket. False on EOF or a broken socket.
pub(super) fn read_into(conn: &Conn, r: &mut BufReader<Input>, bufs: &mut [&mut [u8]]) -> bool {
    let mut iov: Vec<std::io::IoSliceMut<'_>> = bufs.iter_mut().map(|b| std::io::IoSliceMut::new(b)).collect();
    let mut left = &mut iov[..];
    while !left.is_empty() {
        if conn.tcp && r.buffer().is_empty() && left.iter().map(|b| b.len()).sum::<usize>() > LOWAT_MIN {
            return read_waiting(conn.read_fd, left);
        }
        match r.read_vectored(left) {
            Ok(0) => return false,
            Ok(k) => std::io::IoSliceMut::advance_slices(&mut left, k),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads the rest of a big payload from a TCP socket, woken once it is
/// all there rather than for every segment.
///
/// The socket's low mark (`SO_RCVLOWAT`) is set to what is left, `poll`
/// waits for that much (or the end of the connection, or the kernel
/// running short of buffer), and a non-blocking read takes it. Not a
/// blocking read with the mark set: a read that has copied part of the
/// payload and then sleeps is only woken when the mark's worth of *new*
/// bytes has come, which the rest may never reach (measured: it hangs).
/// 1 MiB writes over TCP: per request 1 `poll` and 1 read instead of 4.8
/// reads, 0.95 context switches instead of 1.84, and 0.240 → 0.211 server
/// CPU-s/GiB (A/B, 5 runs each; the client, at 100 %, sets the
/// throughput: 3,162 vs 3,153 MiB/s). Not for Unix sockets: they wake the
/// reader for every message whatever the mark.
#[allow(unsafe_code)]
fn read_waiting(fd: RawFd, mut left: &mut [std::io::IoSliceMut<'_>]) -> bool {
    let mut ok = true;
    // First take what has come: often all of it (nbdcopy's 256 KiB
    // writes), and then the mark is never touched.
    let mut marked = false;
    let mut first = true;
    while !left.is_empty() {
        if !std::mem::take(&mut first) {
            let want: usize = left.iter().map(|b| b.len()).sum();
            marked = true;
            set_rcvlowat(fd, want);
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                ok = false;
                break;
            }
        }
        let n = left.len().min(IOV_MAX);
        // SAFETY: IoSliceMut is ABI compatible with iovec on Unix; the
        // first `n` entries of `left` describe writable buffers that
        // outlive the call; the msghdr names no address or control data.
        let got = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = left.as_mut_ptr().cast();
            msg.msg_iovlen = n as _;
            libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT)
        };
        match got {
            0 => {
                ok = false;
                break;
            }
            k if k > 0 => std::io::IoSliceMut::advance_slices(&mut left, k as usize),
            _ => match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => {}
                _ => {
                    ok = false;
                    break;
                }
            },
        }
    }
    if marked {
        set_rcvlowat(fd, 1);
    }
    ok
}

/// Most buffers one `recvmsg` takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Payloads up to this size are read as they come.
const LOWAT_MIN: usize = 64 * 1024;

/// Sets SO_RCVLOWAT (the kernel caps it at half the biggest receive
/// buffer); false if it could not.
#[allow(unsafe_code)]
fn set_rcvlowat(fd: RawFd, n: usize) -> bool {
    let v = n.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads the int given.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&v as *const libc::c_int).cast(),
                         std::mem::size_of::<libc::c_int>() as libc::socklen_t) == 0
    }
}
