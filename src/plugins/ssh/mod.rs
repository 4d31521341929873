//! `ssh`: serve a remote file over SSH's SFTP subsystem, as nbdkit's ssh
//! plugin does with libssh, in pure Rust: russh for SSH (ring for its
//! crypto), our own SFTP v3 client ([`sftp`]) with several requests in
//! flight, ssh_config parsing ([`config`]) and known_hosts checking
//! ([`known_hosts`]) as libssh does them.
//!
//! russh needs tokio: each connection's SSH session runs on a thread of its
//! own with a current-thread runtime ([`Worker`], started by `open`, so
//! after the server forked). The plugin's synchronous calls hand it one
//! task per NBD request and sleep until the answer: one wake-up each way
//! per request, however many SFTP messages and SSH packets it takes, and
//! russh's tasks, the SFTP reader and the calls all meet on one thread
//! (no cross-thread wake-up per packet or reply). The server's threads
//! never run tokio code; they encode WRITEs and copy READ data.

mod auth;
mod config;
mod known_hosts;
mod sftp;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::config::{Expand, HostConfig};
use self::known_hosts::KnownState;
use self::sftp::{Attrs, Sftp, SftpError};
use crate::backend::{Caps, Flags, Handle, Param, Plugin, PluginEntry, Support, ThreadModel};
use crate::error::{strip_os_suffix, Error, ErrorKind, Result};
use crate::util::parse::{parse_bool, parse_size, parse_unsigned};

/// Makes a task's future on the session's thread (so the future itself
/// need not be `Send`).
type Task = Box<dyn FnOnce() -> LocalFuture + Send>;
type LocalFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

enum Work {
    /// Runs next to the other tasks.
    Task(Task),
    /// Runs to its end, then the thread ends.
    Last(Task),
}

/// The thread of one connection's SSH session and its tokio runtime.
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<Work>,
}

fn lost() -> Error {
    Error::io("the ssh plugin's session thread has ended")
}

impl Worker {
    fn start() -> Result<Worker> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| Error::io(format!("cannot start the ssh plugin's runtime: {e}")))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("ssh-session".into())
            .spawn(move || {
                let tasks = tokio::task::LocalSet::new();
                tasks.block_on(&rt, async move {
                    while let Some(w) = rx.recv().await {
                        match w {
                            Work::Task(t) => drop(tokio::task::spawn_local(t())),
                            Work::Last(t) => return t().await,
                        }
                    }
                })
            })
            .map_err(|e| Error::io(format!("cannot start the ssh plugin's thread: {e}")))?;
        Ok(Worker { tx })
    }

    /// Runs the future `f` makes on the session's thread and waits for its
    /// result on this one.
    fn run<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + 'static,
    {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let task: Task = Box::new(move || -> LocalFuture {
            Box::pin(async move {
                let _ = done.send(f().await);
            })
        });
        self.tx.send(Work::Task(task)).map_err(|_| lost())?;
        result.recv().map_err(|_| lost())
    }

    /// Runs the future `f` makes on the session's thread without waiting,
    /// then ends the thread.
    fn finish<F: std::future::Future<Output = ()> + 'static>(&self, f: impl FnOnce() -> F + Send + 'static) {
        let task: Task = Box::new(move || -> LocalFuture { Box::pin(f()) });
        let _ = self.tx.send(Work::Last(task));
    }
}

#[derive(Default)]
struct SshPlugin {
    host: Option<String>,
    path: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    /// `None`: the default files; `Some("")`: none; `Some(f)`: that file.
    config: Option<String>,
    identities: Vec<String>,
    known_hosts: Option<String>,
    verify_remote_host: bool,
    timeout: Option<u32>,
    compression: Option<bool>,
    create: bool,
    create_size: Option<u64>,
    create_mode: u32,
    /// -D ssh.log=N.
    log_level: i64,
    /// Set once the first connection created the file (create=true).
    created: Arc<tokio::sync::Mutex<bool>>,
}

impl SshPlugin {
    fn new() -> SshPlugin {
        SshPlugin { verify_remote_host: true, create_mode: 0o600, ..SshPlugin::default() }
    }
}

/// nbdkit_read_password: the value, `+FILE`, `-` (the terminal) or `-FD`.
fn read_password(value: &str) -> Result<String> {
    use std::io::Read;
    fn first_line(mut s: String) -> String {
        if let Some(i) = s.find('\n') {
            s.truncate(i);
        }
        if s.ends_with('\r') {
            s.pop();
        }
        s
    }
    if let Some(file) = value.strip_prefix('+') {
        let s = std::fs::read(file).map_err(|e| Error::invalid(format!("open {file}: {}", strip_os_suffix(&e))))?;
        return Ok(first_line(String::from_utf8_lossy(&s).into_owned()));
    }
    if value == "-" {
        return read_password_tty();
    }
    if let Some(fd) = value.strip_prefix('-') {
        if let Ok(fd) = fd.parse::<i32>() {
            if (0..=2).contains(&fd) {
                return Err(Error::invalid("cannot use password -FD for stdin/stdout/stderr"));
            }
            // SAFETY: fcntl only asks whether fd is open.
            #[allow(unsafe_code)]
            if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
                return Err(Error::invalid(format!("fdopen {fd}: Bad file descriptor")));
            }
            // SAFETY: fd is open, and nbdkit closes it after reading too.
            #[allow(unsafe_code)]
            let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let mut s = Vec::new();
            f.read_to_end(&mut s).map_err(|e| Error::invalid(format!("read password: {}", strip_os_suffix(&e))))?;
            return Ok(first_line(String::from_utf8_lossy(&s).into_owned()));
        }
    }
    Ok(value.to_string())
}

#[allow(unsafe_code)]
fn read_password_tty() -> Result<String> {
    use std::io::{BufRead, Write};
    // SAFETY: isatty and termios calls on fd 0 with structs we own.
    unsafe {
        if libc::isatty(0) == 0 {
            return Err(Error::invalid("stdin is not a tty, cannot read password interactively"));
        }
        print!("password: ");
        let _ = std::io::stdout().flush();
        let mut old: libc::termios = std::mem::zeroed();
        let have = libc::tcgetattr(0, &mut old) == 0;
        if have {
            let mut t = old;
            t.c_lflag &= !libc::ECHO;
            t.c_lflag |= libc::ECHONL;
            libc::tcsetattr(0, libc::TCSAFLUSH, &t);
        }
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        if have {
            libc::tcsetattr(0, libc::TCSAFLUSH, &old);
        }
        r.map_err(|e| Error::invalid(format!("could not read password from stdin: {e}")))?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
    }
}

/// A port name or number (`getservbyname` for names).
fn parse_port(s: &str) -> Result<u16> {
    if let Ok(p) = s.parse::<u16>() {
        return Ok(p);
    }
    let c = std::ffi::CString::new(s).map_err(|_| Error::invalid(format!("invalid port: {s}")))?;
    // SAFETY: getservbyname with valid C strings; the result is read at once.
    #[allow(unsafe_code)]
    let port = unsafe {
        let e = libc::getservbyname(c.as_ptr(), c"tcp".as_ptr());
        if e.is_null() {
            None
        } else {
            Some(u16::from_be((*e).s_port as u16))
        }
    };
    port.ok_or_else(|| Error::invalid(format!("failed to set port in libssh session: {s}: Invalid argument")))
}

impl Plugin for SshPlugin {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        match key {
            "host" => self.host = Some(value.to_string()),
            "path" => self.path = Some(value.to_string()),
            "port" => self.port = Some(value.to_string()),
            "user" => self.user = Some(value.to_string()),
            "password" => self.password = Some(read_password(value)?),
            "config" => self.config = Some(value.to_string()),
            "identity" => self.identities.push(value.to_string()),
            "known-hosts" => self.known_hosts = Some(value.to_string()),
            "verify-remote-host" => self.verify_remote_host = parse_bool(value)?,
            "timeout" => self.timeout = Some(parse_unsigned("timeout", value, u32::MAX.into())? as u32),
            "compression" => self.compression = Some(parse_bool(value)?),
            "create" => self.create = parse_bool(value)?,
            "create-size" => self.create_size = Some(parse_size(value)?),
            "create-mode" => {
                let m = parse_unsigned("create-mode", value, u32::MAX.into())?;
                if m > 0o777 {
                    return Err(Error::invalid("create-mode must be <= 0777"));
                }
                self.create_mode = m as u32;
            }
            _ => return Ok(Param::NotMine),
        }
        Ok(Param::Used)
    }

    fn config_complete(&mut self) -> Result<()> {
        if self.host.is_none() || self.path.is_none() {
            return Err(Error::invalid(
                "you must supply the host and path parameters after the plugin name on the command line",
            ));
        }
        if self.create && self.create_size.is_none() {
            return Err(Error::invalid(
                "if using create=true, you must specify the size of the new remote file using create-size=SIZE",
            ));
        }
        if let Some(p) = &self.port {
            parse_port(p)?;
        }
        self.log_level = crate::util::log::debug_flag("ssh", "log");
        crate::util::log::set_ssh_log(self.log_level);
        Ok(())
    }

    fn thread_model(&self) -> ThreadModel {
        ThreadModel::Parallel
    }

    fn open(&self, readonly: bool, _export: &str, _is_tls: bool) -> Result<Box<dyn Handle>> {
        let settings = self.settings()?;
        let worker = Worker::start()?;
        let log_level = self.log_level;
        let conn = worker.run(move || connect(settings, log_level))??;
        let file = OpenFile {
            path: self.path.clone().unwrap_or_default(),
            create: self.create,
            create_size: self.create_size,
            create_mode: self.create_mode,
            created: self.created.clone(),
        };
        let conn = Arc::new(conn);
        let c = conn.clone();
        let (handle, limits) = worker.run(move || async move {
            let h = open_file(&c.sftp, &file, readonly).await?;
            // Without the limits, requests stay small enough for any server.
            let limits = c.sftp.limits().await.unwrap_or_else(|e| {
                crate::debug!("ssh: limits@openssh.com: {e}");
                None
            });
            Ok::<_, Error>((h, limits))
        })??;
        let flush = conn.sftp.has_extension("fsync@openssh.com", "1");
        let (read_chunk, write_chunk) =
            limits.map_or((sftp::SAFE_CHUNK, sftp::SAFE_CHUNK), |l| (l.read_chunk(), l.write_chunk()));
        crate::debug!(
            "ssh: opened {} (fsync@openssh.com: {flush}, limits@openssh.com: {limits:?}, \
             requests of up to {read_chunk} bytes read, {write_chunk} written)",
            self.path.as_deref().unwrap_or("")
        );
        Ok(Box::new(SshHandle {
            worker,
            conn,
            handle: handle.into(),
            flush,
            readonly,
            read_chunk,
            write_chunk,
        }))
    }
}

/// Everything a connection needs, with the config files applied.
#[derive(Clone, Debug)]
struct Settings {
    /// Where to connect (`HostName` of the config, else `host=`); known_hosts
    /// entries are looked up by this name too, as libssh does.
    hostname: String,
    port: u16,
    user: String,
    password: Option<String>,
    identities: Vec<PathBuf>,
    known_hosts: Vec<PathBuf>,
    verify: bool,
    timeout: Option<Duration>,
    compression: bool,
}

impl SshPlugin {
    /// nbdkit's order: options, then the config files, which do not
    /// override `port=` and `user=`.
    fn settings(&self) -> Result<Settings> {
        let host = self.host.clone().unwrap_or_default();
        let mut hc = HostConfig::default();
        let files: Vec<PathBuf> = match &self.config {
            Some(f) if f.is_empty() => vec![],
            Some(f) => {
                let e = Expand { remote_host: host.clone(), remote_user: config::local_user(), port: 22 };
                let p = e.expand(f).map_err(|m| Error::invalid(format!("failed to parse SSH configuration: {f}: {m}")))?;
                if !Path::new(&p).is_absolute() {
                    return Err(Error::invalid(format!(
                        "failed to parse SSH configuration: {f}: the path must be absolute after %-expansion"
                    )));
                }
                vec![p.into()]
            }
            None => vec![format!("{}/.ssh/config", config::home()).into(), "/etc/ssh/ssh_config".into()],
        };
        for f in &files {
            match std::fs::read_to_string(f) {
                Ok(t) => {
                    let dir = PathBuf::from(format!("{}/.ssh", config::home()));
                    config::apply(&mut hc, &t, &host, &dir, 0).map_err(|m| {
                        Error::invalid(format!("failed to parse SSH configuration: {}: {m}", f.display()))
                    })?;
                }
                // libssh ignores a config file that does not exist.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::invalid(format!(
                        "failed to parse SSH configuration: {}: {}",
                        f.display(),
                        strip_os_suffix(&e)
                    )))
                }
            }
        }
        let port = match self.port.as_ref().or(hc.port.as_ref()) {
            Some(p) => parse_port(p)?,
            None => 22,
        };
        let user = self.user.clone().or(hc.user.clone()).unwrap_or_else(config::local_user);
        let mut ex = Expand { remote_host: host.clone(), remote_user: user.clone(), port };
        let hostname = match &hc.hostname {
            Some(h) => ex.expand(h).map_err(Error::invalid)?,
            None => host.clone(),
        };
        ex.remote_host = hostname.clone();
        let expand = |s: &str| ex.expand(s).map_err(|m| Error::invalid(format!("{s}: {m}")));
        // identity= are prepended to the config's and the defaults.
        let mut identities = Vec::new();
        for i in self.identities.iter().chain(hc.identities.iter()) {
            identities.push(PathBuf::from(expand(i)?));
        }
        for d in ["%d/id_ed25519", "%d/id_ecdsa", "%d/id_rsa"] {
            identities.push(PathBuf::from(expand(d)?));
        }
        let known_hosts = match &self.known_hosts {
            Some(k) => vec![PathBuf::from(expand(k)?)],
            None => {
                let u = hc.user_known_hosts.clone().unwrap_or_else(|| "%d/known_hosts".into());
                let g = hc.global_known_hosts.clone().unwrap_or_else(|| "/etc/ssh/ssh_known_hosts".into());
                vec![PathBuf::from(expand(&u)?), PathBuf::from(expand(&g)?)]
            }
        };
        let timeout = self.timeout.or(hc.connect_timeout).filter(|&t| t > 0).map(|t| Duration::from_secs(t.into()));
        Ok(Settings {
            hostname,
            port,
            user,
            password: self.password.clone(),
            identities,
            known_hosts,
            verify: self.verify_remote_host,
            timeout,
            compression: self.compression.or(hc.compression).unwrap_or(false),
        })
    }
}

/// The russh event handler: checks the server's key against known_hosts.
struct Client {
    settings: Settings,
    verdict: Arc<Mutex<Option<KnownState>>>,
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let key = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            russh::keys::PublicKeyOrCertificate::Certificate(c) => {
                russh::keys::PublicKey::new(c.public_key().clone(), "")
            }
        };
        if !self.settings.verify {
            return Ok(true);
        }
        let files: Vec<_> = self
            .settings
            .known_hosts
            .iter()
            .map(|p| match std::fs::read_to_string(p) {
                Ok(t) => Some(Ok(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => Some(Err(format!("{}: {}", p.display(), strip_os_suffix(&e)))),
            })
            .collect();
        let name = known_hosts::lookup_name(&self.settings.hostname, self.settings.port);
        let blob = key.to_bytes().unwrap_or_default();
        let v = known_hosts::verdict(&files, &name, key.algorithm().as_str(), &blob);
        crate::debug!("ssh: known_hosts verdict for {name}: {v:?}");
        let ok = v == KnownState::Ok;
        *self.verdict.lock().unwrap() = Some(v);
        Ok(ok)
    }
}

/// One SSH session with its SFTP channel.
struct Conn {
    session: russh::client::Handle<Client>,
    sftp: Sftp,
}

/// nbdkit's message for a host-key verdict other than OK.
fn verdict_message(v: &KnownState) -> String {
    match v {
        KnownState::Ok => "host key verified".into(),
        KnownState::Changed => "host key for server changed".into(),
        KnownState::Other => "host key for server was not found but another type of key exists".into(),
        KnownState::NotFound => "could not find known_hosts file".into(),
        KnownState::Unknown => "either the host key is unknown, you must use ssh first and accept the host key; or \
                                the known_hosts file (usually ~/.ssh/known_hosts) could not be opened, check that \
                                the file exists and file permissions"
            .into(),
        KnownState::Error(e) => format!("known hosts error: {e}"),
    }
}

async fn connect(s: Settings, log_level: i64) -> Result<Conn> {
    let connect_err = |m: String| Error::io(format!("failed to connect to remote host: {}: {m}", s.hostname));
    let tcp = async {
        let addrs = tokio::net::lookup_host((s.hostname.as_str(), s.port)).await.map_err(|e| {
            let m = strip_os_suffix(&e);
            let m = m.strip_prefix("failed to lookup address information: ").unwrap_or(&m);
            std::io::Error::other(format!("Failed to resolve hostname {} ({m})", s.hostname))
        })?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address for host");
        for a in addrs {
            match tokio::net::TcpStream::connect(a).await {
                Ok(t) => return Ok(t),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    let tcp = match s.timeout {
        Some(t) => tokio::time::timeout(t, tcp).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "Timeout connecting to remote host"))
        }),
        None => tcp.await,
    }
    .map_err(|e| connect_err(strip_os_suffix(&e)))?;
    let _ = tcp.set_nodelay(true);
    if log_level >= 2 {
        crate::debug!("ssh: connected to {}:{}", s.hostname, s.port);
    }

    let mut cfg = russh::client::Config { nodelay: true, ..Default::default() };
    // AES-GCM first: ring's (AES-NI) is several times faster than the
    // software ChaCha20-Poly1305 russh would pick, and sshd's (OpenSSL) is
    // cheaper than its ChaCha20-Poly1305 too; AES-128 takes 10 rounds to
    // AES-256's 14.
    cfg.preferred.cipher = std::borrow::Cow::Borrowed(&[
        russh::cipher::AES_128_GCM,
        russh::cipher::AES_256_GCM,
        russh::cipher::CHACHA20_POLY1305,
        russh::cipher::AES_256_CTR,
        russh::cipher::AES_192_CTR,
        russh::cipher::AES_128_CTR,
    ]);
    // A wide window, and channel packets up to 128 KiB from the server
    // (russh takes transport packets up to 256 KiB; OpenSSH sends 32 KiB
    // by default).
    cfg.window_size = 8 << 20;
    cfg.maximum_packet_size = 128 << 10;
    if s.compression {
        cfg.preferred.compression = std::borrow::Cow::Borrowed(&[
            russh::compression::ZLIB_LEGACY,
            russh::compression::ZLIB,
            russh::compression::NONE,
        ]);
    } else {
        cfg.preferred.compression = std::borrow::Cow::Borrowed(&[russh::compression::NONE]);
    }
    let verdict = Arc::new(Mutex::new(None));
    let client = Client { settings: s.clone(), verdict: verdict.clone() };
    // russh reads each packet's length, then the rest: a buffer makes that
    // one system call per many packets.
    let tcp = tokio::io::BufReader::with_capacity(256 << 10, tcp);
    let handshake = russh::client::connect_stream(Arc::new(cfg), tcp, client);
    let r = match s.timeout {
        Some(t) => tokio::time::timeout(t, handshake).await.unwrap_or(Err(russh::Error::ConnectionTimeout)),
        None => handshake.await,
    };
    let mut session = match r {
        Ok(session) => session,
        Err(e) => {
            if let Some(v) = verdict.lock().unwrap().take() {
                if v != KnownState::Ok {
                    return Err(Error::io(verdict_message(&v)));
                }
            }
            return Err(connect_err(e.to_string()));
        }
    };
    let auth = auth::authenticate(&mut session, &s);
    match s.timeout {
        Some(t) => tokio::time::timeout(t, auth)
            .await
            .unwrap_or_else(|_| Err(Error::io("timeout during authentication")))?,
        None => auth.await?,
    };
    let sftp_err = |e: String| Error::io(format!("failed to initialize sftp session: {e}"));
    let start = async {
        let ch = session.channel_open_session().await.map_err(|e| sftp_err(e.to_string()))?;
        ch.request_subsystem(true, "sftp").await.map_err(|e| sftp_err(e.to_string()))?;
        let (r, w) = ch.split();
        Sftp::start(r, w, s.timeout).await.map_err(|e| sftp_err(e.to_string()))
    };
    let sftp = match s.timeout {
        Some(t) => tokio::time::timeout(t, start).await.unwrap_or_else(|_| Err(sftp_err("timeout".into())))?,
        None => start.await?,
    };
    if log_level >= 2 {
        crate::debug!("ssh: sftp extensions: {:?}", sftp.extensions);
    }
    Ok(Conn { session, sftp })
}

/// What `open_file` needs of the plugin's parameters.
struct OpenFile {
    path: String,
    create: bool,
    create_size: Option<u64>,
    create_mode: u32,
    created: Arc<tokio::sync::Mutex<bool>>,
}

/// Opens the remote file; with create=true the first connection creates
/// (or truncates) it, sets its size and mode, and removes it again if that
/// fails.
async fn open_file(sftp: &Sftp, p: &OpenFile, readonly: bool) -> Result<Vec<u8>> {
    let path = p.path.as_str();
    let rw = if readonly { "reading" } else { "writing" };
    let mut created = p.created.lock().await;
    if p.create && !*created {
        let flags = sftp::FXF_READ | sftp::FXF_WRITE | sftp::FXF_CREAT | sftp::FXF_TRUNC;
        let attrs = Attrs { size: None, permissions: Some(p.create_mode) };
        let h = sftp
            .open(path.as_bytes(), flags, attrs)
            .await
            .map_err(|e| Error::io(format!("{path}: cannot create file for {rw}: {e}")))?;
        let set = Attrs { size: p.create_size, permissions: Some(p.create_mode) };
        if let Err(e) = sftp.call_status(&sftp::Request::Setstat { path: path.as_bytes(), attrs: set }).await {
            let _ = sftp.call_status(&sftp::Request::Close { handle: &h }).await;
            if let Err(e2) = sftp.call_status(&sftp::Request::Remove { path: path.as_bytes() }).await {
                crate::log_error!("unlink failed: {e2}");
            }
            return Err(Error::io(format!("setstat failed: {e}")));
        }
        *created = true;
        return Ok(h);
    }
    drop(created);
    let flags = if readonly { sftp::FXF_READ } else { sftp::FXF_READ | sftp::FXF_WRITE };
    let h = sftp
        .open(path.as_bytes(), flags, Attrs::default())
        .await
        .map_err(|e| Error::new(open_kind(&e), format!("{path}: cannot open file for {rw}: {e}")))?;
    Ok(h)
}

fn open_kind(e: &SftpError) -> ErrorKind {
    match e {
        SftpError::Status(2, _) => ErrorKind::NotFound,
        SftpError::Status(3, _) => ErrorKind::Perm,
        _ => ErrorKind::Io,
    }
}

struct SshHandle {
    worker: Worker,
    conn: Arc<Conn>,
    handle: Arc<[u8]>,
    flush: bool,
    readonly: bool,
    /// Bytes per READ and WRITE request at most (the server's limits).
    read_chunk: usize,
    write_chunk: usize,
}

/// The error of a data call: EIO with libssh-like wording.
fn io_err(what: &str, e: SftpError) -> Error {
    Error::io(format!("{what} failed: {e}"))
}

impl SshHandle {
    /// Runs `f` with the connection and the file handle on the session's thread.
    fn run<T, F>(&self, f: impl FnOnce(Arc<Conn>, Arc<[u8]>) -> F + Send + 'static) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + 'static,
    {
        let (conn, handle) = (self.conn.clone(), self.handle.clone());
        self.worker.run(move || f(conn, handle))
    }
}

impl Handle for SshHandle {
    fn size(&self) -> Result<u64> {
        let a = self.run(move |c, h| async move { c.sftp.fstat(&h).await })?.map_err(|e| io_err("fstat", e))?;
        a.size.ok_or_else(|| Error::io("fstat: the server did not return the file size"))
    }

    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            write: !self.readonly,
            flush: self.flush,
            fua: if self.flush { Support::Emulate } else { Support::None },
            multi_conn: self.flush,
            zero: Support::Emulate,
            // nbdkit advertises fast zero for plugins without .zero: the
            // emulation fails at once.
            fast_zero: true,
            ..Caps::default()
        })
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let (len, chunk) = (buf.len(), sftp::piece_size(buf.len(), self.read_chunk));
        let parts = self
            .run(move |c, h| async move { c.sftp.pread(&h, len, offset, chunk).await })?
            .map_err(|e| io_err("read", e))?;
        // Sftp::pread's pieces cover the buffer exactly.
        for (at, data) in parts {
            buf[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        // The one copy of the data: into the messages, on this thread.
        let chunk = sftp::piece_size(buf.len(), self.write_chunk);
        let msgs: Vec<(u32, bytes::Bytes)> = buf
            .chunks(chunk)
            .enumerate()
            .map(|(i, data)| {
                let (sftp, id) = (&self.conn.sftp, self.conn.sftp.new_id());
                let mut m = sftp.pool.get();
                sftp::encode_write(&mut m, id, &self.handle, offset + (i * chunk) as u64, data);
                (id, sftp.pool.bytes(m))
            })
            .collect();
        self.run(move |c, _| async move { c.sftp.pwrite(msgs).await })?.map_err(|e| io_err("write", e))
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.run(move |c, h| async move { c.sftp.call_status(&sftp::Request::Fsync { handle: &h }).await })?
            .map_err(|e| io_err("fsync", e))
    }
}

impl Drop for SshHandle {
    fn drop(&mut self) {
        let (conn, handle) = (self.conn.clone(), self.handle.clone());
        // Close politely, but never wait long for a server that stalls;
        // the thread ends after that.
        self.worker.finish(move || async move {
            let bye = async {
                if !conn.sftp.is_broken() {
                    if let Err(e) = conn.sftp.call_status(&sftp::Request::Close { handle: &handle }).await {
                        crate::debug!("ssh: cannot close file: {e}");
                    }
                }
                let _ = conn.session.disconnect(russh::Disconnect::ByApplication, "", "en").await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
        });
    }
}

inventory::submit! {
    PluginEntry {
        name: "ssh",
        longname: "",
        description: "nbdkit SSH plugin: serve a remote file over SFTP",
        help: "host=<HOST>     (required) SSH server hostname.\n\
[path=]<PATH>   (required) SSH remote path.\n\
port=<PORT>                SSH protocol port number.\n\
user=<USER>                SSH user name.\n\
password=<PASSWORD>        SSH password.\n\
config=<CONFIG>            Alternate local SSH configuration file.\n\
known-hosts=<FILENAME>     Set location of known_hosts file.\n\
identity=<FILENAME>        Prepend private key (identity) file.\n\
timeout=SECS               Set SSH connection timeout.\n\
verify-remote-host=false   Ignore known_hosts.\n\
compression=true           Enable compression.\n\
create=true                Create the remote file.\n\
create-mode=MODE           Set the permissions of the remote file.\n\
create-size=SIZE           Set the size of the remote file.",
        magic_key: Some("path"),
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: false,
        has: &["config", "config_complete", "config_help", "open", "close", "get_size", "can_flush",
               "can_fua", "can_multi_conn", "pread", "pwrite", "flush"],
        new: || Box::new(SshPlugin::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_as_nbdkit() {
        let mut p = SshPlugin::new();
        assert_eq!(p.config_complete().unwrap_err().message(),
                   "you must supply the host and path parameters after the plugin name on the command line");
        p.config("host", "h").unwrap();
        p.config("path", "/p").unwrap();
        p.config("create", "true").unwrap();
        assert!(p.config_complete().unwrap_err().message().starts_with("if using create=true"));
        assert_eq!(p.config("create-mode", "01000").unwrap_err().message(), "create-mode must be <= 0777");
        p.config("create-mode", "0644").unwrap();
        assert_eq!(p.create_mode, 0o644);
        assert_eq!(p.config("timeout", "-1").unwrap_err().message(), "timeout: negative numbers are not allowed");
        assert_eq!(p.config("foo", "1").unwrap(), Param::NotMine);
        assert_eq!(p.config("password", "-0").unwrap_err().message(),
                   "cannot use password -FD for stdin/stdout/stderr");
        assert_eq!(p.config("password", "-99").unwrap_err().message(), "fdopen 99: Bad file descriptor");
        assert_eq!(p.config("password", "+/nonexistent").unwrap_err().message(),
                   "open /nonexistent: No such file or directory");
        p.config("password", "secret").unwrap();
        assert_eq!(p.password.as_deref(), Some("secret"));
        assert_eq!(parse_port("ssh").unwrap(), 22);
        assert_eq!(parse_port("2222").unwrap(), 2222);
        assert!(parse_port("nosuchservice").is_err());
    }

    #[test]
    fn settings_from_config_file() {
        let d = std::env::temp_dir().join(format!("sshplug-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("cfg");
        std::fs::write(&f, "Host alias\n HostName 127.0.0.9\n Port 2022\n User cfguser\n IdentityFile /id/%r\n").unwrap();
        let mut p = SshPlugin::new();
        p.config("host", "alias").unwrap();
        p.config("path", "x").unwrap();
        p.config("config", f.to_str().unwrap()).unwrap();
        p.config("identity", "/first/%h").unwrap();
        p.config("known-hosts", "/kh/%p").unwrap();
        p.config_complete().unwrap();
        let s = p.settings().unwrap();
        assert_eq!((s.hostname.as_str(), s.port, s.user.as_str()), ("127.0.0.9", 2022, "cfguser"));
        assert_eq!(s.identities[0], PathBuf::from("/first/127.0.0.9"));
        assert_eq!(s.identities[1], PathBuf::from("/id/cfguser"));
        assert_eq!(s.known_hosts, [PathBuf::from("/kh/2022")]);
        // The command line wins over the file.
        p.config("port", "33").unwrap();
        p.config("user", "me").unwrap();
        let s = p.settings().unwrap();
        assert_eq!((s.port, s.user.as_str()), (33, "me"));
        p.config("config", "relative").unwrap();
        assert!(p.settings().is_err());
        p.config("config", "").unwrap();
        assert_eq!(p.settings().unwrap().hostname, "alias");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
