//! Running one request on the handle, the general way: the plugin call
//! (a panic in it becomes EIO), the error it gives turned into the NBD
//! error (and logged), and the reply built; BLOCK_STATUS turned into its
//! descriptors. READs go to the copying read of read.rs. The worker uses
//! this for every request that no faster path took.

use super::buffers::Pool;
use super::output::Reply;
use super::read::read;
use super::ALL_REQUESTS;
use crate::backend::{Extents, Flags, Handle};
use crate::error::{Error, ErrorKind};
use crate::proto::reply::{self, Mode};
use crate::proto::request::{self, Request};
use crate::proto::wire::{cmd, cmdflag, nbd_errno, BASE_ALLOCATION_ID};
use crate::util::{log, shutdown};

/// Runs one validated request on the handle and builds its reply.
pub(super) fn execute(
    h: &dyn Handle,
    req: &Request,
    payload: &[u8],
    mode: Mode,
    export: &request::Export,
    serialize_all: bool,
    pool: &Pool,
) -> Reply {
    let _all = serialize_all.then(|| ALL_REQUESTS.lock().unwrap_or_else(|e| e.into_inner()));
    let fua = if req.flags & cmdflag::FUA != 0 { Flags::FUA } else { Flags::NONE };
    match req.cmd {
        cmd::READ => return read(h, req, mode, pool),
        cmd::BLOCK_STATUS => return block_status(h, req, mode, export.size),
        _ => {}
    }
    let result = shutdown::catch_panic(cmd::name(req.cmd), || match req.cmd {
        cmd::WRITE => h.pwrite(&payload[..req.count as usize], req.offset, fua),
        cmd::FLUSH => h.flush(Flags::NONE),
        cmd::TRIM => h.trim(req.count, req.offset, fua),
        cmd::CACHE => h.cache(req.count, req.offset, Flags::NONE),
        cmd::WRITE_ZEROES => {
            let mut f = fua;
            if req.flags & cmdflag::NO_HOLE == 0 {
                f = f.with(Flags::MAY_TRIM);
            }
            if req.flags & cmdflag::FAST_ZERO != 0 {
                f = f.with(Flags::FAST_ZERO);
            }
            h.zero(req.count, req.offset, f)
        }
        _ => Err(Error::invalid("unknown command")),
    });
    let e = result.map_or_else(|e| failed(req, &e), |()| 0);
    let mut head = Vec::with_capacity(32);
    reply::no_payload(&mut head, mode, e, req.cookie, req.offset, false);
    Reply::head_only(head)
}

/// Logs a failed call and returns its NBD error number.
pub(super) fn failed(req: &Request, e: &Error) -> u32 {
    if e.kind() != ErrorKind::Shutdown {
        log::error(e.message());
    }
    let n = nbd_errno(e.kind(), req.flags);
    crate::debug!("sending error reply: {}", e.kind().name());
    n
}

fn block_status(h: &dyn Handle, req: &Request, mode: Mode, size: u64) -> Reply {
    let req_one = req.flags & cmdflag::REQ_ONE != 0;
    let flags = if req_one { Flags::REQ_ONE } else { Flags::NONE };
    let mut ext = Extents::new(req.offset, size);
    let mut head = Vec::new();
    if let Err(e) = shutdown::catch_panic("extents", || h.extents(req.count, req.offset, flags, &mut ext)) {
        let code = failed(req, &e);
        reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
        return Reply::head_only(head);
    }
    let list: Vec<(u64, u64, u32)> = ext.list().iter().map(|e| (e.offset, e.length, e.typ)).collect();
    let descs = reply::descriptors(&list, req.offset, req.count, req_one, mode == Mode::Extended);
    if descs.is_empty() {
        let code = failed(req, &Error::invalid("extents: no extent covers the request"));
        reply::no_payload(&mut head, mode, code, req.cookie, req.offset, true);
        return Reply::head_only(head);
    }
    reply::block_status(&mut head, mode, req.cookie, req.offset, BASE_ALLOCATION_ID, &descs);
    Reply::head_only(head)
}

#[cfg(test)]
mod tests {
    use super::super::test_export as export;
    use super::*;
    use crate::backend::Caps;
    use crate::proto::wire::errno;

    /// A handle with a bug: every call panics.
    struct Buggy;

    impl Handle for Buggy {
        fn size(&self) -> crate::error::Result<u64> {
            Ok(1 << 20)
        }
        fn caps(&self) -> crate::error::Result<Caps> {
            Ok(Caps { write: true, ..Caps::default() })
        }
        fn pread(&self, _: &mut [u8], _: u64, _: Flags) -> crate::error::Result<()> {
            panic!("bug in pread")
        }
        fn pwrite(&self, _: &[u8], _: u64, _: Flags) -> crate::error::Result<()> {
            panic!("bug in pwrite")
        }
    }

    #[test]
    fn a_panicking_plugin_call_becomes_eio() {
        let pool = Pool::default();
        for (c, payload) in [(cmd::READ, vec![]), (cmd::WRITE, vec![0; 512])] {
            let req = Request { flags: 0, cmd: c, cookie: 9, offset: 0, count: 512 };
            let r = execute(&Buggy, &req, &payload, Mode::Simple, &export(), false, &pool);
            assert_eq!(r.data_len, 0, "no data after an error");
            assert_eq!(&r.head[4..8], &errno::EIO.to_be_bytes(), "{}", cmd::name(c));
            assert_eq!(&r.head[8..16], &9u64.to_be_bytes());
        }
    }
}
