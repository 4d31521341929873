//! A small SFTP version 3 client (draft-ietf-secsh-filexfer-02) over an SSH
//! channel: just what the plugin needs (open, fstat, setstat, read, write,
//! fsync@openssh.com, limits@openssh.com, remove, close), with any number
//! of requests in flight.
//!
//! The codec ([`encode`], [`Reply::decode`], [`Framer`]) is pure and
//! unit-tested; [`Sftp`] runs on the connection's tokio runtime: one reader
//! task cuts the channel's data into messages without copying it (a DATA
//! payload stays in the buffers russh handed over until the caller copies
//! it where it belongs) and dispatches replies by request id to the waiting
//! callers; writes go out whole under a lock (russh splits a message into
//! channel packets, and two messages must not interleave).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::oneshot;

pub const FXP_INIT: u8 = 1;
pub const FXP_VERSION: u8 = 2;
pub const FXP_OPEN: u8 = 3;
pub const FXP_CLOSE: u8 = 4;
pub const FXP_READ: u8 = 5;
pub const FXP_WRITE: u8 = 6;
pub const FXP_FSTAT: u8 = 8;
pub const FXP_SETSTAT: u8 = 9;
pub const FXP_REMOVE: u8 = 13;
pub const FXP_EXTENDED: u8 = 200;
pub const FXP_STATUS: u8 = 101;
pub const FXP_HANDLE: u8 = 102;
pub const FXP_DATA: u8 = 103;
pub const FXP_ATTRS: u8 = 105;
pub const FXP_EXTENDED_REPLY: u8 = 201;

pub const FXF_READ: u32 = 1;
pub const FXF_WRITE: u32 = 2;
pub const FXF_CREAT: u32 = 8;
pub const FXF_TRUNC: u32 = 0x10;

pub const ATTR_SIZE: u32 = 1;
pub const ATTR_UIDGID: u32 = 2;
pub const ATTR_PERMISSIONS: u32 = 4;
pub const ATTR_ACMODTIME: u32 = 8;
pub const ATTR_EXTENDED: u32 = 0x8000_0000;

pub const FX_OK: u32 = 0;
pub const FX_EOF: u32 = 1;

/// The longest SFTP message we accept (OpenSSH's sftp-server limit is 256 KiB).
pub const MAX_PACKET: usize = 256 * 1024 + 1024;
/// The most bytes a READ or WRITE request carries: OpenSSH's read limit
/// (255 KiB), which keeps every message under its 256 KiB limit.
pub const MAX_CHUNK: usize = 255 * 1024;
/// Bytes per READ or WRITE request of a server that does not announce
/// `limits@openssh.com`: the draft's "at least 32768" every server takes.
pub const SAFE_CHUNK: usize = 32 * 1024;
/// Requests in flight per call.
pub const MAX_IN_FLIGHT: usize = 32;

/// What a request of `len` bytes is cut into: pieces of equal size (a
/// multiple of 4 KiB but the last), as few as `max` allows: a 256 KiB READ
/// with a 255 KiB limit makes two of 128 KiB, not 255 + 1 KiB.
pub fn piece_size(len: usize, max: usize) -> usize {
    let max = max.max(1);
    if len <= max {
        return len.max(1);
    }
    let n = len.div_ceil(max);
    let each = len.div_ceil(n).next_multiple_of(4096);
    if each <= max {
        each
    } else {
        max
    }
}

/// The server's `limits@openssh.com` answer (0: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_packet: u64,
    pub max_read: u64,
    pub max_write: u64,
}

impl Limits {
    /// Decodes the EXTENDED_REPLY's data.
    pub fn decode(data: &[u8]) -> Option<Limits> {
        let mut r = Reader(data);
        Some(Limits { max_packet: r.u64()?, max_read: r.u64()?, max_write: r.u64()? })
    }

    /// Bytes per READ request: the server's limit, at most [`MAX_CHUNK`].
    pub fn read_chunk(&self) -> usize {
        clamp_limit(self.max_read, MAX_CHUNK)
    }

    /// Bytes per WRITE request: the server's write limit, and room for the
    /// header within its message limit, at most [`MAX_CHUNK`].
    pub fn write_chunk(&self) -> usize {
        let w = clamp_limit(self.max_write, MAX_CHUNK);
        match self.max_packet {
            0 => w,
            p => w.min(clamp_limit(p.saturating_sub(1024), MAX_CHUNK)),
        }
    }
}

/// `v` as a chunk size: 0 means no limit; at least 1 KiB, at most `max`.
fn clamp_limit(v: u64, max: usize) -> usize {
    match v {
        0 => max,
        v => (v.min(max as u64) as usize).max(1024),
    }
}

/// An SFTP failure, as a message in libssh's words where it has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftpError {
    /// The server answered with a status other than OK.
    Status(u32, String),
    /// The connection or channel is gone, or the server broke the protocol.
    Lost(String),
    /// No answer within the timeout.
    Timeout,
}

impl std::fmt::Display for SftpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SftpError::Status(code, msg) => {
                let m = if msg.is_empty() { status_name(*code) } else { msg.as_str() };
                write!(f, "SFTP server: {m}")
            }
            SftpError::Lost(m) => write!(f, "{m}"),
            SftpError::Timeout => write!(f, "timeout waiting for the SFTP server"),
        }
    }
}

/// The status names of the draft.
pub fn status_name(code: u32) -> &'static str {
    match code {
        0 => "Success",
        1 => "End of file",
        2 => "No such file",
        3 => "Permission denied",
        4 => "Failure",
        5 => "Bad message",
        6 => "No connection",
        7 => "Connection lost",
        8 => "Operation unsupported",
        _ => "Unknown error",
    }
}

/// File attributes (only what the plugin uses is kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    pub permissions: Option<u32>,
}

impl Attrs {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.size.is_some() {
            flags |= ATTR_SIZE;
        }
        if self.permissions.is_some() {
            flags |= ATTR_PERMISSIONS;
        }
        put_u32(out, flags);
        if let Some(s) = self.size {
            put_u64(out, s);
        }
        if let Some(p) = self.permissions {
            put_u32(out, p);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Option<Attrs> {
        let flags = r.u32()?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(r.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            r.u32()?;
            r.u32()?;
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.permissions = Some(r.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            r.u32()?;
            r.u32()?;
        }
        if flags & ATTR_EXTENDED != 0 {
            let n = r.u32()?;
            for _ in 0..n {
                r.string()?;
                r.string()?;
            }
        }
        Some(a)
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s);
}

/// Starts a message of type `ty` with request id `id` (length patched by [`finish`]).
fn start(ty: u8, id: Option<u32>, extra: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + extra);
    v.extend_from_slice(&[0; 4]);
    v.push(ty);
    if let Some(id) = id {
        put_u32(&mut v, id);
    }
    v
}
fn finish(mut v: Vec<u8>) -> Vec<u8> {
    let len = (v.len() - 4) as u32;
    v[..4].copy_from_slice(&len.to_be_bytes());
    v
}

/// Encodes a WRITE with id `id` into `out` (emptied first), a buffer the
/// caller reuses.
pub fn encode_write(out: &mut Vec<u8>, id: u32, handle: &[u8], offset: u64, data: &[u8]) {
    out.clear();
    out.reserve(4 + 1 + 4 + 4 + handle.len() + 8 + 4 + data.len());
    put_u32(out, (1 + 4 + 4 + handle.len() + 8 + 4 + data.len()) as u32);
    out.push(FXP_WRITE);
    put_u32(out, id);
    put_str(out, handle);
    put_u64(out, offset);
    put_str(out, data);
}

/// Buffers for WRITE messages, reused: a message of 128 KiB or more would
/// cost musl's malloc an mmap, page faults and an munmap each time.
#[derive(Default)]
pub struct BufPool(Mutex<Vec<Vec<u8>>>);

/// The most buffers a pool keeps.
const POOL_KEEP: usize = 32;

impl BufPool {
    /// An empty buffer, with the capacity of an earlier one if any.
    pub fn get(&self) -> Vec<u8> {
        self.0.lock().unwrap().pop().unwrap_or_default()
    }

    /// `buf` as message bytes; the buffer comes back to the pool once
    /// russh has sent the last of them.
    pub fn bytes(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self.clone() })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut keep = self.pool.0.lock().unwrap();
        if keep.len() < POOL_KEEP {
            self.buf.clear();
            keep.push(std::mem::take(&mut self.buf));
        }
    }
}

/// A request the plugin sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Open { path: &'a [u8], pflags: u32, attrs: Attrs },
    Close { handle: &'a [u8] },
    Read { handle: &'a [u8], offset: u64, len: u32 },
    Fstat { handle: &'a [u8] },
    Setstat { path: &'a [u8], attrs: Attrs },
    Remove { path: &'a [u8] },
    Fsync { handle: &'a [u8] },
    Limits,
}

/// The INIT message (version 3).
pub fn encode_init() -> Vec<u8> {
    let mut v = start(FXP_INIT, None, 4);
    put_u32(&mut v, 3);
    finish(v)
}

/// Encodes a request with id `id`.
pub fn encode(id: u32, req: &Request<'_>) -> Vec<u8> {
    let v = match *req {
        Request::Open { path, pflags, attrs } => {
            let mut v = start(FXP_OPEN, Some(id), path.len());
            put_str(&mut v, path);
            put_u32(&mut v, pflags);
            attrs.encode(&mut v);
            v
        }
        Request::Close { handle } => {
            let mut v = start(FXP_CLOSE, Some(id), handle.len());
            put_str(&mut v, handle);
            v
        }
        Request::Read { handle, offset, len } => {
            let mut v = start(FXP_READ, Some(id), handle.len());
            put_str(&mut v, handle);
            put_u64(&mut v, offset);
            put_u32(&mut v, len);
            v
        }
        Request::Fstat { handle } => {
            let mut v = start(FXP_FSTAT, Some(id), handle.len());
            put_str(&mut v, handle);
            v
        }
        Request::Setstat { path, attrs } => {
            let mut v = start(FXP_SETSTAT, Some(id), path.len());
            put_str(&mut v, path);
            attrs.encode(&mut v);
            v
        }
        Request::Remove { path } => {
            let mut v = start(FXP_REMOVE, Some(id), path.len());
            put_str(&mut v, path);
            v
        }
        Request::Fsync { handle } => {
            let mut v = start(FXP_EXTENDED, Some(id), handle.len() + 20);
            put_str(&mut v, b"fsync@openssh.com");
            put_str(&mut v, handle);
            v
        }
        Request::Limits => {
            let mut v = start(FXP_EXTENDED, Some(id), 20);
            put_str(&mut v, b"limits@openssh.com");
            v
        }
    };
    finish(v)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// A reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Version { version: u32, extensions: Vec<(String, String)> },
    Status { id: u32, code: u32, msg: String },
    Handle { id: u32, handle: Vec<u8> },
    Data { id: u32, data: Bytes },
    Attrs { id: u32, attrs: Attrs },
    Extended { id: u32, data: Vec<u8> },
}

impl Reply {
    /// Decodes one message body (after the length); `None` if malformed.
    pub fn decode(body: &[u8]) -> Option<Reply> {
        let mut r = Reader(body);
        let ty = r.u8()?;
        if ty == FXP_VERSION {
            let version = r.u32()?;
            let mut extensions = Vec::new();
            while !r.0.is_empty() {
                let n = String::from_utf8_lossy(r.string()?).into_owned();
                let d = String::from_utf8_lossy(r.string()?).into_owned();
                extensions.push((n, d));
            }
            return Some(Reply::Version { version, extensions });
        }
        let id = r.u32()?;
        Some(match ty {
            FXP_STATUS => {
                let code = r.u32()?;
                // Version 3 servers may omit the message (draft-02 had none).
                let msg = r.string().map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                Reply::Status { id, code, msg }
            }
            FXP_HANDLE => Reply::Handle { id, handle: r.string()?.to_vec() },
            FXP_DATA => Reply::Data { id, data: Bytes::copy_from_slice(r.string()?) },
            FXP_ATTRS => Reply::Attrs { id, attrs: Attrs::decode(&mut r)? },
            FXP_EXTENDED_REPLY => Reply::Extended { id, data: r.0.to_vec() },
            _ => return None,
        })
    }

    /// Like [`Reply::decode`], but DATA keeps its payload in `body`'s buffer.
    pub fn decode_bytes(body: Bytes) -> Option<Reply> {
        if body.len() >= 9 && body[0] == FXP_DATA {
            let id = u32::from_be_bytes(body[1..5].try_into().ok()?);
            let n = u32::from_be_bytes(body[5..9].try_into().ok()?) as usize;
            if 9 + n > body.len() {
                return None;
            }
            return Some(Reply::Data { id, data: body.slice(9..9 + n) });
        }
        Reply::decode(&body)
    }

    /// The request id (`None` for VERSION).
    pub fn id(&self) -> Option<u32> {
        match *self {
            Reply::Version { .. } => None,
            Reply::Status { id, .. }
            | Reply::Handle { id, .. }
            | Reply::Data { id, .. }
            | Reply::Attrs { id, .. }
            | Reply::Extended { id, .. } => Some(id),
        }
    }
}

/// Cuts a byte stream into SFTP messages, each copied into a buffer of
/// its own from a [`BufPool`]: the channel's buffers are freed as soon as
/// they are read (musl's malloc maps, faults in and unmaps memory again
/// when many of them are held), and a reply's buffer is reused once the
/// caller has copied its data out.
pub struct Framer {
    pool: Arc<BufPool>,
    /// The message being filled: its length field, then its body.
    cur: Vec<u8>,
    /// Its body's length once the length field is in.
    want: Option<usize>,
    /// Whole message bodies.
    ready: std::collections::VecDeque<Bytes>,
    /// A length out of bounds: the stream is unusable.
    bad: Option<usize>,
}

impl Framer {
    pub fn new(pool: Arc<BufPool>) -> Framer {
        Framer { cur: pool.get(), pool, want: None, ready: Default::default(), bad: None }
    }

    /// Adds bytes from the channel.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.bad.is_none() {
            let end = 4 + self.want.unwrap_or(0);
            let k = (end - self.cur.len()).min(data.len());
            self.cur.extend_from_slice(&data[..k]);
            data = &data[k..];
            if self.want.is_none() && self.cur.len() == 4 {
                let len = u32::from_be_bytes(self.cur[..4].try_into().unwrap()) as usize;
                if len == 0 || len > MAX_PACKET {
                    self.bad = Some(len);
                    return;
                }
                self.cur.reserve(len);
                self.want = Some(len);
            }
            if let Some(len) = self.want {
                if self.cur.len() == 4 + len {
                    let full = std::mem::replace(&mut self.cur, self.pool.get());
                    self.ready.push_back(self.pool.bytes(full).slice(4..));
                    self.want = None;
                }
            }
        }
    }

    /// The next whole message body, `Ok(None)` if more bytes are needed,
    /// an error if a length is out of bounds.
    pub fn next(&mut self) -> Result<Option<Bytes>, SftpError> {
        if let Some(b) = self.ready.pop_front() {
            return Ok(Some(b));
        }
        match self.bad {
            Some(len) => Err(SftpError::Lost(format!("SFTP message of {len} bytes from the server"))),
            None => Ok(None),
        }
    }
}

type Waiters = HashMap<u32, oneshot::Sender<Reply>>;

/// One SFTP session; every method may be called concurrently.
pub struct Sftp {
    /// Buffers of the messages both ways.
    pub pool: Arc<BufPool>,
    writer: tokio::sync::Mutex<ChannelWriteHalf<Msg>>,
    waiters: Arc<Mutex<Option<Waiters>>>,
    next_id: AtomicU32,
    timeout: Option<Duration>,
    /// Set once the session failed: later calls fail at once.
    broken: Arc<AtomicBool>,
    pub extensions: Vec<(String, String)>,
}

impl Sftp {
    /// Runs the INIT/VERSION exchange on an open "sftp" subsystem channel
    /// and starts the reader task (needs a tokio runtime).
    pub async fn start(
        reader: ChannelReadHalf,
        writer: ChannelWriteHalf<Msg>,
        timeout: Option<Duration>,
    ) -> Result<Sftp, SftpError> {
        let mut reader = reader;
        writer
            .data_bytes(encode_init())
            .await
            .map_err(|e| SftpError::Lost(format!("failed to send SFTP init: {e}")))?;
        let pool = Arc::new(BufPool::default());
        let mut framer = Framer::new(pool.clone());
        let version = with_timeout(timeout, async {
            loop {
                if let Some(body) = framer.next()? {
                    return Ok(body);
                }
                match reader.wait().await {
                    Some(ChannelMsg::Data { data }) => framer.push(&data),
                    Some(ChannelMsg::ExtendedData { .. }) | Some(ChannelMsg::WindowAdjusted { .. }) => {}
                    Some(ChannelMsg::Success) | Some(ChannelMsg::XonXoff { .. }) => {}
                    Some(m) => return Err(SftpError::Lost(format!("sftp channel: unexpected {m:?}"))),
                    None => return Err(SftpError::Lost("sftp channel closed".into())),
                }
            }
        })
        .await?;
        let extensions = match Reply::decode(&version) {
            Some(Reply::Version { version: 3.., extensions }) => extensions,
            Some(Reply::Version { version, .. }) => {
                return Err(SftpError::Lost(format!("unsupported SFTP version {version}")))
            }
            _ => return Err(SftpError::Lost("received a bad version from the SFTP server".into())),
        };
        let waiters: Arc<Mutex<Option<Waiters>>> = Arc::new(Mutex::new(Some(HashMap::new())));
        let broken = Arc::new(AtomicBool::new(false));
        let (w2, b2) = (waiters.clone(), broken.clone());
        tokio::spawn(async move {
            let why = read_loop(reader, framer, &w2).await;
            crate::debug!("ssh: sftp session ended: {why}");
            b2.store(true, Ordering::Release);
            // Dropping the senders wakes every waiter with an error.
            w2.lock().unwrap().take();
        });
        Ok(Sftp {
            pool,
            writer: tokio::sync::Mutex::new(writer),
            waiters,
            next_id: AtomicU32::new(1),
            timeout,
            broken,
            extensions,
        })
    }

    /// True if the server announced extension `name` with data `version`.
    pub fn has_extension(&self, name: &str, version: &str) -> bool {
        self.extensions.iter().any(|(n, v)| n == name && v == version)
    }

    /// True once the session has failed.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// A new request id with the receiver of its reply.
    fn register(&self) -> Result<(u32, oneshot::Receiver<Reply>), SftpError> {
        let id = self.new_id();
        Ok((id, self.register_id(id)?))
    }

    /// The receiver of the reply to request `id`.
    fn register_id(&self, id: u32) -> Result<oneshot::Receiver<Reply>, SftpError> {
        if self.is_broken() {
            return Err(SftpError::Lost("the SSH session was lost".into()));
        }
        let (tx, rx) = oneshot::channel();
        match self.waiters.lock().unwrap().as_mut() {
            Some(w) => w.insert(id, tx),
            None => return Err(SftpError::Lost("the SSH session was lost".into())),
        };
        Ok(rx)
    }

    /// Sends whole encoded messages (one or several) on the channel.
    async fn send_bytes(&self, msgs: Bytes) -> Result<(), SftpError> {
        let w = self.writer.lock().await;
        if let Err(e) = w.data_bytes(msgs).await {
            self.broken.store(true, Ordering::Release);
            return Err(SftpError::Lost(format!("the SSH session was lost: {e}")));
        }
        Ok(())
    }

    /// Sends a request and returns the receiver of its reply.
    async fn send(&self, req: &Request<'_>) -> Result<oneshot::Receiver<Reply>, SftpError> {
        let (id, rx) = self.register()?;
        self.send_bytes(encode(id, req).into()).await?;
        Ok(rx)
    }

    async fn wait(&self, rx: oneshot::Receiver<Reply>) -> Result<Reply, SftpError> {
        let broken = &self.broken;
        with_timeout(self.timeout, async {
            rx.await.map_err(|_| SftpError::Lost("the SSH session was lost".into()))
        })
        .await
        .inspect_err(|e| {
            if *e == SftpError::Timeout {
                // A server that stalls once is not trusted again.
                broken.store(true, Ordering::Release);
            }
        })
    }

    /// One request, one reply.
    pub async fn call(&self, req: &Request<'_>) -> Result<Reply, SftpError> {
        let rx = self.send(req).await?;
        self.wait(rx).await
    }

    /// A request whose answer is a STATUS: OK or the error.
    pub async fn call_status(&self, req: &Request<'_>) -> Result<(), SftpError> {
        match self.call(req).await? {
            Reply::Status { code: FX_OK, .. } => Ok(()),
            Reply::Status { code, msg, .. } => Err(SftpError::Status(code, msg)),
            r => Err(SftpError::Lost(format!("unexpected SFTP reply {r:?}"))),
        }
    }

    /// OPEN: the handle.
    pub async fn open(&self, path: &[u8], pflags: u32, attrs: Attrs) -> Result<Vec<u8>, SftpError> {
        match self.call(&Request::Open { path, pflags, attrs }).await? {
            Reply::Handle { handle, .. } => Ok(handle),
            Reply::Status { code, msg, .. } => Err(SftpError::Status(code, msg)),
            r => Err(SftpError::Lost(format!("unexpected SFTP reply {r:?}"))),
        }
    }

    /// FSTAT.
    pub async fn fstat(&self, handle: &[u8]) -> Result<Attrs, SftpError> {
        match self.call(&Request::Fstat { handle }).await? {
            Reply::Attrs { attrs, .. } => Ok(attrs),
            Reply::Status { code, msg, .. } => Err(SftpError::Status(code, msg)),
            r => Err(SftpError::Lost(format!("unexpected SFTP reply {r:?}"))),
        }
    }

    /// The server's `limits@openssh.com`, `None` if it does not announce
    /// them.
    pub async fn limits(&self) -> Result<Option<Limits>, SftpError> {
        if !self.has_extension("limits@openssh.com", "1") {
            return Ok(None);
        }
        match self.call(&Request::Limits).await? {
            Reply::Extended { data, .. } => Ok(Limits::decode(&data)),
            Reply::Status { code, msg, .. } => Err(SftpError::Status(code, msg)),
            r => Err(SftpError::Lost(format!("unexpected SFTP reply {r:?}"))),
        }
    }

    /// Reads `len` bytes at `offset` in requests of `chunk` bytes, up to
    /// [`MAX_IN_FLIGHT`] in flight (requests sent together go out in one
    /// channel write). Returns the data as pieces `(position, bytes)` that
    /// cover `0..len` exactly, in the replies' buffers (the caller copies
    /// them once, where they belong). A short answer is followed by a
    /// request for the rest; end of file before the end is an error.
    pub async fn pread(
        &self,
        handle: &[u8],
        len: usize,
        offset: u64,
        chunk: usize,
    ) -> Result<Vec<(usize, Bytes)>, SftpError> {
        let chunk = chunk.max(1);
        let mut parts = Vec::with_capacity(len.div_ceil(chunk));
        let mut queue: std::collections::VecDeque<(usize, usize, oneshot::Receiver<Reply>)> = Default::default();
        let mut next = 0; // first byte not yet requested
        let mut redo: Vec<(usize, usize)> = Vec::new(); // holes left by short reads
        loop {
            let mut batch = Vec::new();
            while queue.len() < MAX_IN_FLIGHT {
                let (start, n) = if let Some(r) = redo.pop() {
                    r
                } else if next < len {
                    let n = chunk.min(len - next);
                    next += n;
                    (next - n, n)
                } else {
                    break;
                };
                let (id, rx) = self.register()?;
                let req = Request::Read { handle, offset: offset + start as u64, len: n as u32 };
                batch.extend_from_slice(&encode(id, &req));
                queue.push_back((start, n, rx));
            }
            if !batch.is_empty() {
                self.send_bytes(batch.into()).await?;
            }
            let Some((start, n, rx)) = queue.pop_front() else { return Ok(parts) };
            match self.wait(rx).await? {
                Reply::Data { data, .. } if !data.is_empty() && data.len() <= n => {
                    let got = data.len();
                    if got < n {
                        redo.push((start + got, n - got));
                    }
                    parts.push((start, data));
                }
                Reply::Data { data, .. } if data.is_empty() => {
                    return Err(SftpError::Lost("the SFTP server answered a read with no data".into()))
                }
                Reply::Data { data, .. } => {
                    return Err(SftpError::Lost(format!(
                        "the SFTP server answered a read of {n} bytes with {}",
                        data.len()
                    )))
                }
                Reply::Status { code: FX_EOF, .. } => {
                    return Err(SftpError::Lost(format!(
                        "unexpected end of file at offset {} (the remote file shrank?)",
                        offset + start as u64
                    )))
                }
                Reply::Status { code, msg, .. } => return Err(SftpError::Status(code, msg)),
                r => return Err(SftpError::Lost(format!("unexpected SFTP reply {r:?}"))),
            }
        }
    }

    /// A request id for a message encoded elsewhere (see [`Sftp::pwrite`]).
    pub fn new_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends WRITE requests encoded elsewhere with ids from
    /// [`Sftp::new_id`], up to [`MAX_IN_FLIGHT`] in flight, and checks
    /// every answer.
    pub async fn pwrite(&self, msgs: Vec<(u32, Bytes)>) -> Result<(), SftpError> {
        let mut queue = std::collections::VecDeque::new();
        let mut msgs = msgs.into_iter();
        loop {
            while queue.len() < MAX_IN_FLIGHT {
                let Some((id, m)) = msgs.next() else { break };
                let rx = self.register_id(id)?;
                self.send_bytes(m).await?;
                queue.push_back(rx);
            }
            let Some(rx) = queue.pop_front() else { return Ok(()) };
            match self.wait(rx).await? {
                Reply::Status { code: FX_OK, .. } => {}
                Reply::Status { code, msg, .. } => return Err(SftpError::Status(code, msg)),
                r => return Err(SftpError::Lost(format!("unexpected SFTP reply {r:?}"))),
            }
        }
    }
}

async fn with_timeout<T>(
    t: Option<Duration>,
    f: impl std::future::Future<Output = Result<T, SftpError>>,
) -> Result<T, SftpError> {
    match t {
        Some(t) => tokio::time::timeout(t, f).await.unwrap_or(Err(SftpError::Timeout)),
        None => f.await,
    }
}

async fn read_loop(mut reader: ChannelReadHalf, mut framer: Framer, waiters: &Mutex<Option<Waiters>>) -> String {
    loop {
        loop {
            let body = match framer.next() {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => return e.to_string(),
            };
            let Some(reply) = Reply::decode_bytes(body) else {
                return "malformed SFTP message from the server".into();
            };
            let Some(id) = reply.id() else { return "unexpected SFTP version message".into() };
            let tx = waiters.lock().unwrap().as_mut().and_then(|w| w.remove(&id));
            match tx {
                Some(tx) => {
                    let _ = tx.send(reply);
                }
                None => return format!("SFTP reply to unknown request {id}"),
            }
        }
        match reader.wait().await {
            Some(ChannelMsg::Data { data }) => framer.push(&data),
            Some(ChannelMsg::Eof) | Some(ChannelMsg::Close) | None => return "channel closed".into(),
            Some(ChannelMsg::ExitStatus { exit_status }) => return format!("sftp server exited with {exit_status}"),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Vec<u8>) -> Bytes {
        let mut f = Framer::new(Arc::default());
        f.push(&v);
        f.next().unwrap().unwrap()
    }

    #[test]
    fn encodes_requests() {
        let v = encode(7, &Request::Read { handle: b"h1", offset: 0x1_0000_0000, len: 65536 });
        assert_eq!(
            v,
            [&[0, 0, 0, 23, FXP_READ, 0, 0, 0, 7, 0, 0, 0, 2, b'h', b'1'][..],
             &[0, 0, 0, 1, 0, 0, 0, 0], &[0, 1, 0, 0]].concat()
        );
        let v = encode(1, &Request::Open { path: b"/x", pflags: FXF_READ | FXF_WRITE | FXF_CREAT | FXF_TRUNC,
                                           attrs: Attrs { size: None, permissions: Some(0o600) } });
        let b = body(v);
        assert_eq!(b[0], FXP_OPEN);
        assert_eq!(&b[b.len() - 12..], &[0, 0, 0, 0x1b, 0, 0, 0, 4, 0, 0, 1, 0x80]);
        let b = body(encode(2, &Request::Fsync { handle: b"H" }));
        assert_eq!(&b[9..26], b"fsync@openssh.com");
        assert_eq!(encode_init(), [0, 0, 0, 5, FXP_INIT, 0, 0, 0, 3]);
        let pool = Arc::new(BufPool::default());
        let mut out = pool.get();
        encode_write(&mut out, 9, b"hh", 1 << 33, b"data");
        assert_eq!(out, [&[0, 0, 0, 27, FXP_WRITE, 0, 0, 0, 9, 0, 0, 0, 2, b'h', b'h'][..],
                         &[0, 0, 0, 2, 0, 0, 0, 0], &[0, 0, 0, 4], b"data"].concat());
        let b = pool.bytes(out);
        let part = b.slice(5..9);
        drop(b);
        assert!(pool.0.lock().unwrap().is_empty()); // still sent from
        assert_eq!(part, &9u32.to_be_bytes()[..]);
        drop(part);
        let again = pool.get();
        assert!(again.is_empty() && again.capacity() >= 31);
    }

    #[test]
    fn decodes_replies() {
        let mut v = vec![FXP_VERSION, 0, 0, 0, 3];
        put_str(&mut v, b"fsync@openssh.com");
        put_str(&mut v, b"1");
        assert_eq!(
            Reply::decode(&v),
            Some(Reply::Version { version: 3, extensions: vec![("fsync@openssh.com".into(), "1".into())] })
        );
        let mut v = vec![FXP_STATUS, 0, 0, 0, 9, 0, 0, 0, 2];
        put_str(&mut v, b"No such file");
        put_str(&mut v, b"");
        assert_eq!(Reply::decode(&v), Some(Reply::Status { id: 9, code: 2, msg: "No such file".into() }));
        // A draft-02 status without message.
        assert_eq!(Reply::decode(&[FXP_STATUS, 0, 0, 0, 1, 0, 0, 0, 1]),
                   Some(Reply::Status { id: 1, code: 1, msg: String::new() }));
        let mut v = vec![FXP_ATTRS, 0, 0, 0, 3];
        put_u32(&mut v, ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED);
        put_u64(&mut v, 12345);
        v.extend_from_slice(&[0; 8]);
        put_u32(&mut v, 0o100644);
        v.extend_from_slice(&[0; 8]);
        put_u32(&mut v, 1);
        put_str(&mut v, b"a");
        put_str(&mut v, b"b");
        assert_eq!(Reply::decode(&v),
                   Some(Reply::Attrs { id: 3, attrs: Attrs { size: Some(12345), permissions: Some(0o100644) } }));
        assert_eq!(Reply::decode_bytes(Bytes::from_static(&[FXP_DATA, 0, 0, 0, 1, 0, 0, 0, 2, 7, 8])),
                   Some(Reply::Data { id: 1, data: Bytes::from_static(&[7, 8]) }));
        assert_eq!(Reply::decode_bytes(Bytes::from_static(&[FXP_DATA, 0, 0, 0, 1, 0, 0, 0, 3, 7, 8])), None);
        let mut v = vec![FXP_EXTENDED_REPLY, 0, 0, 0, 4];
        for n in [256 * 1024u64, 255 * 1024, 0, 1024] {
            put_u64(&mut v, n);
        }
        let Some(Reply::Extended { id: 4, data }) = Reply::decode(&v) else { panic!("no EXTENDED_REPLY") };
        let l = Limits::decode(&data).unwrap();
        assert_eq!(l, Limits { max_packet: 256 * 1024, max_read: 255 * 1024, max_write: 0 });
        assert_eq!((l.read_chunk(), l.write_chunk()), (255 * 1024, 255 * 1024));
        let l = Limits { max_packet: 64 * 1024, max_read: 1 << 40, max_write: 100 };
        assert_eq!((l.read_chunk(), l.write_chunk()), (MAX_CHUNK, 1024));
        assert_eq!(Limits::decode(&[0; 23]), None);
        // Truncated messages and unknown types are refused, not a panic.
        assert_eq!(Reply::decode(&[FXP_DATA, 0, 0, 0, 1, 0, 0, 1, 0, 1]), None);
        assert_eq!(Reply::decode(&[77, 0, 0, 0, 1]), None);
        assert_eq!(Reply::decode(&[]), None);
    }

    #[test]
    fn framer_splits_and_joins() {
        let pool = Arc::new(BufPool::default());
        let mut f = Framer::new(pool.clone());
        let a = encode(1, &Request::Close { handle: b"abc" });
        let b = encode(2, &Request::Remove { path: b"/p" });
        let all = [a.clone(), b.clone()].concat();
        f.push(&all[..3]);
        assert_eq!(f.next().unwrap(), None);
        f.push(&all[3..10]);
        assert_eq!(f.next().unwrap(), None);
        f.push(&[]);
        // The end of the first message and the start of the second.
        f.push(&all[10..a.len() + 5]);
        let first = f.next().unwrap().unwrap();
        assert_eq!(first, a[4..]);
        assert_eq!(f.next().unwrap(), None);
        f.push(&all[a.len() + 5..]);
        assert_eq!(f.next().unwrap().unwrap(), b[4..]);
        assert_eq!(f.next().unwrap(), None);
        // A message's buffer goes back to the pool once dropped.
        let n = pool.0.lock().unwrap().len();
        drop(first);
        assert_eq!(pool.0.lock().unwrap().len(), n + 1);
        // Several messages in one push.
        f.push(&[all.clone(), all.clone()].concat());
        for m in [&a, &b, &a, &b] {
            assert_eq!(f.next().unwrap().unwrap(), m[4..]);
        }
        let mut f = Framer::new(pool);
        f.push(&[0, 0, 0, 1, FXP_STATUS, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(f.next().unwrap().unwrap(), [FXP_STATUS][..]);
        assert!(f.next().is_err());
        assert!(f.next().is_err());
    }

    #[test]
    fn pieces_of_requests() {
        assert_eq!(piece_size(256 * 1024, MAX_CHUNK), 128 * 1024);
        assert_eq!(piece_size(255 * 1024, MAX_CHUNK), 255 * 1024);
        assert_eq!(piece_size(512, MAX_CHUNK), 512);
        assert_eq!(piece_size(0, MAX_CHUNK), 1);
        assert_eq!(piece_size(4 << 20, MAX_CHUNK), 244 * 1024); // 17 pieces
        assert_eq!(piece_size(64 * 1024, SAFE_CHUNK), SAFE_CHUNK);
        assert_eq!(piece_size(100 * 1024, SAFE_CHUNK), 28 * 1024); // 4 pieces
        assert_eq!(piece_size(10_000, 4097), 4096); // 3 pieces
        proptest::proptest!(|(len in 1usize..64 << 20, max in 1usize..1 << 20)| {
            let p = piece_size(len, max);
            proptest::prop_assert!(p >= 1 && p <= max.max(1));
            // As few pieces as the limit allows.
            proptest::prop_assert_eq!(len.div_ceil(p), len.div_ceil(max));
        });
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = Reply::decode(&v);
            let _ = Reply::decode_bytes(Bytes::from(v.clone()));
            let mut f = Framer::new(Arc::default());
            for c in v.chunks(5) {
                f.push(c);
            }
            while let Ok(Some(b)) = f.next() { let _ = Reply::decode_bytes(b); }
        }
    }
}
