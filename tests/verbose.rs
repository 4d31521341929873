//! `-v` says what nbdkit's `-v` says: the same clients against this
//! server and Debian's nbdkit, each run with `-v`; the debug lines are
//! reduced to their kinds (handles, pointers, paths, versions and thread
//! names normalized) and the two sequences must be equal, except for the
//! lines README.md lists as deliberate differences. A failed handshake
//! says what happened.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{available, nbdkit_bin, path_env, TempDir};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

/// Debian's nbdkit, the reference (skip, or fail under NBDKIT_TEST_STRICT).
fn reference() -> Option<PathBuf> {
    let found = ["/usr/sbin/nbdkit", "/usr/bin/nbdkit"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists() && *p != nbdkit_bin() && available(&p.to_string_lossy(), &["--version"]));
    if found.is_none() {
        if std::env::var_os("NBDKIT_TEST_STRICT").is_some() {
            panic!("the reference C nbdkit is required (NBDKIT_TEST_STRICT is set)");
        }
        eprintln!("SKIP: reference C nbdkit not available");
    }
    found
}

/// A server run with `-fv`, its stderr in a file.
struct Verbose {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Verbose {
    fn start(bin: &Path, opts: &[&str], args: &[&str]) -> Verbose {
        let dir = TempDir::new("verbose");
        let sock = dir.path("sock");
        let log = dir.path("stderr");
        let child = Command::new(bin)
            .arg("-fv")
            .arg("-U")
            .arg(&sock)
            .args(opts)
            .args(args)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot run nbdkit");
        let deadline = Instant::now() + Duration::from_secs(20);
        // Listening once the layers' after_fork has run (a test connection
        // would show up in the log).
        while !sock.exists() || !std::fs::read_to_string(&log).unwrap_or_default().contains(": after_fork") {
            assert!(Instant::now() < deadline, "{} did not start listening", bin.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Verbose { child, sock, log, _dir: dir }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Stops the server (SIGTERM, as an operator would) once the
    /// connection's lines have settled; returns everything it printed.
    fn finish(mut self) -> String {
        // Settled: unchanged for 300 ms (at most 5 s).
        let (mut last, mut same) = (String::new(), 0);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = std::fs::read_to_string(&self.log).unwrap_or_default();
            same = if now == last { same + 1 } else { 0 };
            if same == 3 {
                break;
            }
            last = now;
        }
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on the child we started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Verbose {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a scenario allows to differ (README.md, "Known differences").
#[derive(Default, Clone, Copy)]
struct Allow {
    /// The client offers extended headers: this server accepts them
    /// (NBD_OPT_EXTENDED_HEADERS), nbdkit 1.32 does not know the option
    /// and the client falls back to structured replies.
    extended_headers: bool,
    /// Compare each layer's lines on their own: capabilities are one call
    /// per layer here, so a filter's and its plugin's calls do not
    /// interleave as nbdkit's do.
    by_layer: bool,
    /// Lines that depend on when the client hangs up (nbdinfo closes
    /// before reading the ABORT reply).
    racy_abort: bool,
}

/// Debug messages only, prefix and context removed.
fn messages(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("nbdkit: ")?;
            let i = rest.find("debug: ")?;
            Some(rest[i + 7..].to_string())
        })
        .collect()
}

/// The kind of a debug message: variable parts normalized, or `None` for
/// a line that is a deliberate difference.
fn kind(msg: &str, allow: Allow) -> Option<String> {
    let m = msg;
    let drop_if = [
        // Workers start on demand here (nbdkit starts all of them).
        m.starts_with("starting worker thread "),
        m.starts_with("exiting worker thread "),
        // Asked once, before open, to open the canonical name.
        m.contains(": default_export "),
        // The memory plugin reports block sizes here (as nbdkit ≥ 1.34).
        m.contains("NBD_INFO_BLOCK_SIZE: client requested but no plugin"),
        // This server's own lines: 1.44's layer summary, the handshake
        // timeout, how requests are processed.
        m.starts_with("request processing: "),
        m.starts_with("handshake timeout: "),
        m.starts_with("transmission: "),
        // nbdkit 1.44's service mode and URI (1.32 has neither).
        m.starts_with("service mode: "),
        m.starts_with("NBD URI: "),
        m.starts_with("no NBD URI because "),
        allow.extended_headers
            && (m.contains("NBD_OPT_EXTENDED_HEADERS") || m.contains("unknown (0xb)") || m.contains("NBD_OPT_STRUCTURED_REPLY")),
        allow.racy_abort && (m.starts_with("write: ") || m.starts_with("handshake: ") || m.starts_with("client sent NBD_OPT_ABORT")),
    ];
    if drop_if.iter().any(|&d| d) {
        return None;
    }
    let words: Vec<String> = m
        .split(' ')
        .map(|w| {
            if w.starts_with('/') {
                "PATH".to_string()
            } else if w.starts_with("0x") && m.contains("open returned handle") {
                "HANDLE".to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    let mut k = words.join(" ");
    if k.starts_with("registering ") || k.starts_with("registered ") {
        k = words[..2].join(" "); // a .so path there, "NAME (built in)" here
    }
    if m.starts_with("nbdkit ") {
        k = "nbdkit VERSION".into();
    }
    Some(k)
}

fn kinds(log: &str, allow: Allow) -> Vec<String> {
    let mut v: Vec<String> = messages(log).iter().filter_map(|m| kind(m, allow)).collect();
    // nbdkit 1.32 logs the plugin's finalize twice under a filter.
    v.dedup_by(|a, b| a == b && a.ends_with(": finalize"));
    v
}

/// Splits kinds into the server's own and each layer's (`NAME: …`).
fn by_layer(k: &[String], layers: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = layers.iter().map(|l| (l.to_string(), Vec::new())).collect();
    groups.push(("server".into(), Vec::new()));
    for line in k {
        let i = layers.iter().position(|l| line.starts_with(&format!("{l}: "))).unwrap_or(layers.len());
        groups[i].1.push(line.clone());
    }
    for g in &mut groups {
        g.1.dedup_by(|a, b| a == b && a.ends_with(": finalize"));
    }
    groups
}

/// Runs `client` (given the URI) against both servers and compares.
fn compare(opts: &[&str], args: &[&str], allow: Allow, client: impl Fn(&Verbose)) -> Option<String> {
    let reference = reference()?;
    let run = |bin: &Path| {
        let srv = Verbose::start(bin, opts, args);
        client(&srv);
        srv.finish()
    };
    let theirs = run(&reference);
    let ours = run(&nbdkit_bin());
    let (a, b) = (kinds(&theirs, allow), kinds(&ours, allow));
    let show = || format!("--- nbdkit:\n{theirs}\n--- ours:\n{ours}");
    // Something to compare: the whole life of a server and a connection.
    for k in ["nbdkit VERSION", "accepted connection", "memory: preconnect", "memory: cleanup"] {
        assert!(b.iter().any(|x| x == k), "missing {k:?}\n{}", show());
    }
    if allow.by_layer {
        let layers: Vec<&str> = args.iter().take(1).copied().chain(opts.iter().filter_map(|o| o.strip_prefix("--filter="))).collect();
        let (ga, gb) = (by_layer(&a, &layers), by_layer(&b, &layers));
        for ((name, x), (_, y)) in ga.iter().zip(&gb) {
            assert_eq!(x, y, "layer {name} differs\n{}", show());
        }
    } else {
        if a != b {
            let diff: Vec<String> = a
                .iter()
                .zip(&b)
                .enumerate()
                .find(|(_, (x, y))| x != y)
                .map(|(i, (x, y))| vec![format!("first difference at line {i}: nbdkit {x:?} vs ours {y:?}")])
                .unwrap_or_else(|| vec![format!("lengths {} vs {}", a.len(), b.len())]);
            panic!("{}\n{}", diff.join("\n"), show());
        }
    }
    Some(ours)
}

fn client_ok(prog: &str, args: &[&str]) {
    let o = Command::new(prog).args(args).env("PATH", path_env()).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(o.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn count(log: &str, what: &str) -> usize {
    messages(log).iter().filter(|m| m.starts_with(what)).count()
}

#[test]
fn qemu_io_read() {
    require!("qemu-io", "--version");
    let allow = Allow { extended_headers: true, ..Allow::default() };
    let Some(ours) = compare(&[], &["memory", "1G"], allow, |s| {
        client_ok("qemu-io", &["-f", "raw", "-c", "read 0 64k", &s.uri()]);
    }) else {
        return;
    };
    // What nbdkit 1.32 cannot say: qemu's extended headers, accepted.
    assert!(ours.contains("debug: newstyle negotiation: NBD_OPT_EXTENDED_HEADERS: client requested extended headers"), "{ours}");
    assert!(ours.contains("debug: replying to NBD_OPT_EXTENDED_HEADERS with NBD_REP_ACK"), "{ours}");
    assert!(ours.contains("debug: transmission: extended headers;"), "{ours}");
    // nbdkit 1.44's service mode and URI lines.
    assert!(ours.contains("debug: service mode: unix socket\n"), "{ours}");
    assert!(ours.contains("debug: NBD URI: nbd+unix://?socket="), "{ours}");
    // Workers: at least one started, each that started also exited.
    assert!(count(&ours, "starting worker thread ") >= 1, "{ours}");
    assert_eq!(count(&ours, "starting worker thread "), count(&ours, "exiting worker thread "), "{ours}");
}

#[test]
fn nbdinfo_list() {
    require!("nbdinfo", "--version");
    let allow = Allow { racy_abort: true, ..Allow::default() };
    compare(&[], &["memory", "1G"], allow, |s| client_ok("nbdinfo", &["--list", &s.uri()]));
}

#[test]
fn nbdsh_structured_replies_through_a_filter() {
    require!("nbdsh", "--version");
    let allow = Allow { by_layer: true, ..Allow::default() };
    let Some(ours) = compare(&["--filter=delay"], &["memory", "1G"], allow, |s| {
        client_ok("nbdsh", &["-u", &s.uri(), "-c", "h.pwrite(b'x' * 512, 0)", "-c", "h.pread(512, 0)", "-c", "h.flush()"]);
    }) else {
        return;
    };
    for l in ["delay: load", "delay: preconnect", "delay: can_write", "delay: pread count=512 offset=0", "delay: close", "delay: unload filter"] {
        assert!(ours.contains(&format!("debug: {l}")), "missing {l}:\n{ours}");
    }
}

#[test]
fn nbdsh_simple_replies() {
    require!("nbdsh", "--version");
    compare(&[], &["memory", "1G"], Allow::default(), |s| {
        client_ok(
            "nbdsh",
            &[
                "-c",
                "h.set_request_structured_replies(False)",
                "-c",
                &format!("h.connect_uri('{}')", s.uri()),
                "-c",
                "h.pwrite(b'x' * 512, 0); h.zero(512, 0); h.trim(512, 0); h.flush(); h.cache(512, 0)",
            ],
        );
    });
}

fn option(s: &mut UnixStream, opt: u32, payload: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// Reads one option reply, returns its type.
fn reply(s: &mut UnixStream) -> u32 {
    let mut h = [0; 20];
    s.read_exact(&mut h).unwrap();
    let mut p = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut p).unwrap();
    u32::from_be_bytes(h[12..16].try_into().unwrap())
}

fn raw(srv: &Verbose) -> UnixStream {
    let mut s = UnixStream::connect(&srv.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0; 18];
    s.read_exact(&mut greeting).unwrap();
    s
}

#[test]
fn raw_client_unknown_options() {
    let Some(ours) = compare(&[], &["memory", "1G"], Allow::default(), |srv| {
        let mut s = raw(srv);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        option(&mut s, 0x1234, b"abcd");
        assert_eq!(reply(&mut s), 0x8000_0001);
        option(&mut s, 5, b"x"); // STARTTLS with a payload
        assert_eq!(reply(&mut s), 0x8000_0003);
        option(&mut s, 8, b""); // STRUCTURED_REPLY
        assert_eq!(reply(&mut s), 1);
        option(&mut s, 3, b""); // LIST
        while reply(&mut s) != 1 {}
        option(&mut s, 3, b""); // LIST again
        assert_eq!(reply(&mut s), 0x8000_0003);
        option(&mut s, 2, b""); // ABORT
        assert_eq!(reply(&mut s), 1);
    }) else {
        return;
    };
    assert!(ours.contains("debug: replying to unknown (0x1234) with NBD_REP_ERR_UNSUP"), "{ours}");
}

/// A failed handshake says what happened (this server only).
fn failed(opts: &[&str], client: impl Fn(&Verbose)) -> Vec<String> {
    let srv = Verbose::start(&nbdkit_bin(), opts, &["memory", "1M"]);
    client(&srv);
    // Wait for the connection's end to be told (a loaded machine is slow).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&srv.log).unwrap_or_default();
        if log.contains("debug: handshake: ") || log.contains("to abort the connection") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    messages(&srv.finish())
}

#[test]
fn failed_handshakes_say_what_happened() {
    let bad_magic = failed(&[], |srv| {
        let mut s = raw(srv);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut b = 0x1234u64.to_be_bytes().to_vec();
        b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
        s.write_all(&b).unwrap();
        let _ = s.read(&mut [0; 1]); // the server closes
    });
    assert!(
        bad_magic.iter().any(|m| m == "handshake: unknown option version 1234, expecting 49484156454f5054, closing connection"),
        "{bad_magic:#?}"
    );

    let bad_flags = failed(&[], |srv| {
        let mut s = raw(srv);
        s.write_all(&0xffu32.to_be_bytes()).unwrap();
        let _ = s.read(&mut [0; 1]);
    });
    assert!(bad_flags.iter().any(|m| m == "newstyle negotiation: client flags: 0xff"), "{bad_flags:#?}");
    assert!(bad_flags.iter().any(|m| m.contains("unknown or unadvertised flags")), "{bad_flags:#?}");

    let hung_up = failed(&[], |srv| {
        let mut s = raw(srv);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 100, b'a']);
        s.write_all(&b).unwrap(); // GO with 1 of its 100 bytes, then gone
    });
    assert!(hung_up.iter().any(|m| m == "handshake: client closed the connection during negotiation"), "{hung_up:#?}");

    let aborted = failed(&[], |srv| {
        let mut s = raw(srv);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        option(&mut s, 2, b"");
        assert_eq!(reply(&mut s), 1);
    });
    let i = aborted.iter().position(|m| m == "replying to NBD_OPT_ABORT with NBD_REP_ACK").expect("ABORT reply");
    assert_eq!(aborted[i + 1], "client sent NBD_OPT_ABORT to abort the connection", "{aborted:#?}");

    let timed_out = failed(&["--timeout=1"], |srv| {
        let mut s = raw(srv);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let _ = s.read(&mut [0; 1]); // stalls; the server shuts it down
        assert!(t.elapsed() >= Duration::from_millis(900));
    });
    assert!(timed_out.iter().any(|m| m == "connection timed out"), "{timed_out:#?}");
    assert!(timed_out.iter().any(|m| m.starts_with("handshake: not complete within --timeout=1s")), "{timed_out:#?}");
}

#[test]
fn quiet_without_v() {
    // Without -v: no debug line at all, through a whole session.
    let dir = TempDir::new("quiet");
    let sock = dir.path("sock");
    let log = dir.path("stderr");
    let mut child = Command::new(nbdkit_bin())
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["memory", "1M"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut g = [0; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    option(&mut s, 0x1234, b"");
    assert_eq!(reply(&mut s), 0x8000_0001);
    option(&mut s, 2, b"");
    assert_eq!(reply(&mut s), 1);
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the child we started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!out.contains("debug:"), "{out}");
}

#[test]
fn oldstyle_readonly_serial() {
    require!("nbdsh", "--version");
    let Some(ours) = compare(&["-o", "-r", "-t", "1"], &["memory", "1G"], Allow::default(), |s| {
        client_ok("nbdsh", &["-u", &s.uri(), "-c", "h.pread(512, 0)"]);
    }) else {
        return;
    };
    assert!(ours.contains("debug: oldstyle negotiation: flags: global 0x0 export 0x"), "{ours}");
    assert!(ours.contains("debug: handshake complete, processing requests serially"), "{ours}");
    assert!(!ours.contains("debug: memory: can_write"), "-r: can_write is not asked\n{ours}");
}

#[test]
fn export_name_without_fixed_newstyle() {
    require!("nbdsh", "--version");
    let Some(ours) = compare(&["--mask-handshake=0"], &["memory", "1G"], Allow::default(), |s| {
        client_ok("nbdsh", &["-u", &s.uri(), "-c", "h.pread(512, 0)"]);
    }) else {
        return;
    };
    assert!(ours.contains("debug: newstyle negotiation: NBD_OPT_EXPORT_NAME: client requested export ''"), "{ours}");
}

#[test]
fn controlpath_flag_off() {
    require!("nbdsh", "--version");
    let Some(ours) = compare(&["-D", "nbdkit.backend.controlpath=0"], &["memory", "1G"], Allow::default(), |s| {
        client_ok("nbdsh", &["-u", &s.uri(), "-c", "h.pread(512, 0)"]);
    }) else {
        return;
    };
    assert!(!ours.contains("debug: memory: open"), "{ours}");
    assert!(ours.contains("debug: memory: pread count=512 offset=0"), "{ours}");
}

/// `-D memory.dir=1` and `-D data.dir=1`: the sparse allocator logs its
/// directory insertions and lookups (nbdkit's `sparse_debug_dir`); without
/// the flag it says nothing of them.
#[test]
fn allocator_directory_debugging() {
    require!("nbdsh", "--version");
    for (opts, args, on) in [
        (&["-D", "memory.dir=1"][..], &["memory", "1G"][..], true),
        (&["-D", "data.dir=1"], &["data", "1 2 3", "size=1G"], true),
        (&[], &["memory", "1G"], false),
    ] {
        let s = Verbose::start(&nbdkit_bin(), opts, args);
        client_ok("nbdsh", &["-u", &s.uri(), "-c", "h.pwrite(b'x' * 512, 1 << 29); h.pread(512, 1 << 29); h.pread(512, 1 << 20)"]);
        let log = s.finish();
        assert_eq!(log.contains("debug: insert: inserted new directory node for page 16384 at level"), on, "{opts:?}\n{log}");
        assert_eq!(log.contains("debug: lookup: search dir: entry found: page 16384"), on, "{opts:?}\n{log}");
        // (The data plugin answers unwritten pages from its pattern.)
        if args[0] == "memory" {
            assert_eq!(log.contains("debug: lookup: search dir: no entry found: page 32"), on, "{opts:?}\n{log}");
        }
    }
}
