//! A small SFTP version 3 client (draft-ietf-secsh-filexfer-02) over an SSH
//! channel: just what the plugin needs (open, fstat, setstat, read, write,
//! fsync@openssh.com, remove, close), with any number of requests in flight.
//!
//! The codec ([`encode_*`], [`Reply::decode`], [`Framer`]) is pure and
//! unit-tested; [`Sftp`] runs on the plugin's tokio runtime: one reader
//! task dispatches replies by request id to the waiting callers, writes go
//! out whole under a lock (russh splits a message into channel packets, and
//! two messages must not interleave).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
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
/// Bytes per READ or WRITE request: well under OpenSSH's 255 KiB read limit
/// and 256 KiB message limit.
pub const CHUNK: usize = 128 * 1024;
/// Requests in flight per call.
pub const MAX_IN_FLIGHT: usize = 32;

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

/// A request the plugin sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Open { path: &'a [u8], pflags: u32, attrs: Attrs },
    Close { handle: &'a [u8] },
    Read { handle: &'a [u8], offset: u64, len: u32 },
    Write { handle: &'a [u8], offset: u64, data: &'a [u8] },
    Fstat { handle: &'a [u8] },
    Setstat { path: &'a [u8], attrs: Attrs },
    Remove { path: &'a [u8] },
    Fsync { handle: &'a [u8] },
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
        Request::Write { handle, offset, data } => {
            let mut v = start(FXP_WRITE, Some(id), handle.len() + data.len());
            put_str(&mut v, handle);
            put_u64(&mut v, offset);
            put_str(&mut v, data);
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
    Extended { id: u32 },
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
            FXP_EXTENDED_REPLY => Reply::Extended { id },
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
            | Reply::Extended { id } => Some(id),
        }
    }
}

/// Cuts a byte stream into SFTP messages.
#[derive(Default)]
pub struct Framer {
    buf: BytesMut,
}

impl Framer {
    /// Adds bytes from the channel.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message body, `Ok(None)` if more bytes are needed,
    /// an error if the length is out of bounds.
    pub fn next(&mut self) -> Result<Option<Bytes>, SftpError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(SftpError::Lost(format!("SFTP message of {len} bytes from the server")));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let mut body = self.buf.split_to(4 + len);
        body.advance(4);
        Ok(Some(body.freeze()))
    }
}

type Waiters = HashMap<u32, oneshot::Sender<Reply>>;

/// One SFTP session; every method may be called concurrently.
pub struct Sftp {
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
        let mut framer = Framer::default();
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

    /// Sends a request and returns the receiver of its reply.
    async fn send(&self, req: &Request<'_>) -> Result<oneshot::Receiver<Reply>, SftpError> {
        if self.is_broken() {
            return Err(SftpError::Lost("the SSH session was lost".into()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.waiters.lock().unwrap().as_mut() {
            Some(w) => w.insert(id, tx),
            None => return Err(SftpError::Lost("the SSH session was lost".into())),
        };
        let msg = encode(id, req);
        let w = self.writer.lock().await;
        if let Err(e) = w.data_bytes(msg).await {
            self.broken.store(true, Ordering::Release);
            return Err(SftpError::Lost(format!("the SSH session was lost: {e}")));
        }
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

    /// Reads `buf.len()` bytes at `offset`, with up to [`MAX_IN_FLIGHT`]
    /// requests of [`CHUNK`] bytes in flight. A short answer is followed by
    /// a request for the rest; end of file before the end is an error.
    pub async fn pread(&self, handle: &[u8], buf: &mut [u8], offset: u64) -> Result<(), SftpError> {
        let mut queue: std::collections::VecDeque<(usize, usize, oneshot::Receiver<Reply>)> = Default::default();
        let mut next = 0; // first byte of buf not yet requested
        let mut redo: Vec<(usize, usize)> = Vec::new(); // holes left by short reads
        loop {
            while queue.len() < MAX_IN_FLIGHT {
                let (start, len) = if let Some(r) = redo.pop() {
                    r
                } else if next < buf.len() {
                    let len = CHUNK.min(buf.len() - next);
                    next += len;
                    (next - len, len)
                } else {
                    break;
                };
                let req = Request::Read { handle, offset: offset + start as u64, len: len as u32 };
                queue.push_back((start, len, self.send(&req).await?));
            }
            let Some((start, len, rx)) = queue.pop_front() else { return Ok(()) };
            match self.wait(rx).await? {
                Reply::Data { data, .. } if !data.is_empty() && data.len() <= len => {
                    buf[start..start + data.len()].copy_from_slice(&data);
                    if data.len() < len {
                        redo.push((start + data.len(), len - data.len()));
                    }
                }
                Reply::Data { data, .. } if data.is_empty() => {
                    return Err(SftpError::Lost("the SFTP server answered a read with no data".into()))
                }
                Reply::Data { data, .. } => {
                    return Err(SftpError::Lost(format!(
                        "the SFTP server answered a read of {len} bytes with {}",
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

    /// Writes `buf` at `offset` in [`CHUNK`]-byte requests, several in flight.
    pub async fn pwrite(&self, handle: &[u8], buf: &[u8], offset: u64) -> Result<(), SftpError> {
        let mut queue = std::collections::VecDeque::new();
        let mut chunks = buf.chunks(CHUNK).enumerate();
        loop {
            while queue.len() < MAX_IN_FLIGHT {
                let Some((i, data)) = chunks.next() else { break };
                let req = Request::Write { handle, offset: offset + (i * CHUNK) as u64, data };
                queue.push_back(self.send(&req).await?);
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
        let mut f = Framer::default();
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
        // Truncated messages and unknown types are refused, not a panic.
        assert_eq!(Reply::decode(&[FXP_DATA, 0, 0, 0, 1, 0, 0, 1, 0, 1]), None);
        assert_eq!(Reply::decode(&[77, 0, 0, 0, 1]), None);
        assert_eq!(Reply::decode(&[]), None);
    }

    #[test]
    fn framer_splits_and_joins() {
        let mut f = Framer::default();
        let a = encode(1, &Request::Close { handle: b"abc" });
        let b = encode(2, &Request::Remove { path: b"/p" });
        let all = [a.clone(), b.clone()].concat();
        f.push(&all[..3]);
        assert_eq!(f.next().unwrap(), None);
        f.push(&all[3..10]);
        assert_eq!(f.next().unwrap(), None);
        f.push(&all[10..]);
        assert_eq!(f.next().unwrap().unwrap(), a[4..]);
        assert_eq!(f.next().unwrap().unwrap(), b[4..]);
        assert_eq!(f.next().unwrap(), None);
        let mut f = Framer::default();
        f.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(f.next().is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = Reply::decode(&v);
            let _ = Reply::decode_bytes(Bytes::from(v.clone()));
            let mut f = Framer::default();
            f.push(&v);
            while let Ok(Some(b)) = f.next() { let _ = Reply::decode(&b); }
        }
    }
}
