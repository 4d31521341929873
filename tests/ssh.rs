//! The ssh plugin against a real OpenSSH sshd, started by each test on a
//! loopback port with its own host key, config and authorized_keys
//! (internal-sftp), ssh-agent for agent authentication and a
//! password-only account for password authentication. Clients: nbdinfo,
//! nbdcopy, qemu-img, nbdsh. Faults: P10 (sshd's session killed or
//! stopped mid-read), wrong, changed and unknown host keys, wrong password.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The password-only account (created if missing; its password is reset).
const PW_USER: &str = "nbdkitsshpw";
const PW_PASS: &str = "Nbdkit-test-pw-1";
/// A second account whose password the wrong-password test changes.
const PW_USER2: &str = "nbdkitsshpw2";

fn run_in(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).current_dir(dir).env("PATH", path_env()).output().unwrap();
    assert!(o.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn keygen(path: &Path, ty: &str) {
    let _ = std::fs::remove_file(path);
    run_ok("ssh-keygen", &["-q", "-t", ty, "-N", "", "-C", "test", "-f", path.to_str().unwrap()]);
}

/// Creates (once per process) the password accounts with their passwords.
fn ensure_users() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap();
    if *done {
        return;
    }
    for u in [PW_USER, PW_USER2] {
        if !Command::new("id").arg(u).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success() {
            let o = Command::new("useradd").args(["-M", "-d", "/nonexistent", "-s", "/bin/sh", u]).output().unwrap();
            // Another test binary may have created it meanwhile.
            assert!(o.status.success() || String::from_utf8_lossy(&o.stderr).contains("already exists"),
                    "useradd {u}: {}", String::from_utf8_lossy(&o.stderr));
        }
        set_password(u, PW_PASS);
    }
    *done = true;
}

fn set_password(user: &str, pass: &str) {
    let mut c = Command::new("chpasswd").stdin(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    writeln!(c.stdin.take().unwrap(), "{user}:{pass}").unwrap();
    assert!(c.wait().unwrap().success(), "chpasswd");
}

/// A private sshd on 127.0.0.1.
struct Sshd {
    child: Child,
    dir: TempDir,
    port: u16,
}

impl Sshd {
    fn start() -> Sshd {
        ensure_users();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let dir = TempDir::new("sshd");
        std::fs::create_dir_all(dir.path("home/.ssh")).unwrap();
        keygen(&dir.path("host_ed25519"), "ed25519");
        keygen(&dir.path("home/.ssh/id_ed25519"), "ed25519");
        keygen(&dir.path("agent_key"), "ed25519");
        keygen(&dir.path("other_key"), "ed25519");
        let auth = [
            std::fs::read_to_string(dir.path("home/.ssh/id_ed25519.pub")).unwrap(),
            std::fs::read_to_string(dir.path("agent_key.pub")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.path("authorized_keys"), auth).unwrap();
        // Others (the password account) must reach the data files.
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for _ in 0..20 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let conf = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPermitRootLogin yes\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel ERROR\n\
                 Subsystem sftp internal-sftp\n\
                 Match User {PW_USER},{PW_USER2}\n  PasswordAuthentication yes\n  PubkeyAuthentication no\n",
                d = dir.0.display()
            );
            std::fs::write(dir.path("sshd_config"), conf).unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(dir.path("sshd_config"))
                .stderr(std::fs::File::create(dir.path("sshd.log")).unwrap())
                .spawn()
                .expect("cannot run /usr/sbin/sshd");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Sshd { child, dir, port };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    break; // port taken meanwhile: try another
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sshd did not start: {}", std::fs::read_to_string(dir.path("sshd.log")).unwrap_or_default());
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// The known_hosts line for this server (`[127.0.0.1]:PORT TYPE KEY`).
    fn known_line(&self) -> String {
        let k = std::fs::read_to_string(self.path("host_ed25519.pub")).unwrap();
        format!("[127.0.0.1]:{} {}", self.port, k.trim())
    }

    /// Writes `known_hosts` with the right key and returns its path.
    fn known_hosts(&self) -> String {
        std::fs::write(self.path("known_hosts"), self.known_line() + "\n").unwrap();
        self.s("known_hosts")
    }

    /// The usual parameters: key auth as root, the right known_hosts.
    fn args(&self, file: &str) -> Vec<String> {
        vec![
            "ssh".into(),
            "host=127.0.0.1".into(),
            format!("port={}", self.port),
            "user=root".into(),
            format!("identity={}", self.s("home/.ssh/id_ed25519")),
            format!("known-hosts={}", self.known_hosts()),
            "config=".into(),
            self.s(file),
        ]
    }

    /// Every process of sshd's sessions (descendants of the listener).
    fn session_pids(&self) -> Vec<i32> {
        let mut parent = std::collections::HashMap::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { continue };
            let ppid: i32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
            parent.insert(pid, ppid);
        }
        let me = self.child.id() as i32;
        let mut out = Vec::new();
        for &pid in parent.keys() {
            let mut p = pid;
            while let Some(&pp) = parent.get(&p) {
                if pp == me {
                    out.push(pid);
                    break;
                }
                p = pp;
            }
        }
        out
    }

    fn signal_sessions(&self, sig: i32) -> usize {
        let pids = self.session_pids();
        for &p in &pids {
            // SAFETY: plain kill(2) on descendants of the sshd this test started.
            unsafe { libc::kill(p, sig) };
        }
        pids.len()
    }

    /// Writes `size` bytes of pseudo-random data to `name`.
    fn make_file(&self, name: &str, size: usize) -> String {
        let mut v = vec![0u8; size];
        let mut x: u64 = 0x9e3779b97f4a7c15 ^ size as u64;
        for b in v.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(self.path(name), v).unwrap();
        self.s(name)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.signal_sessions(libc::SIGCONT);
        self.signal_sessions(libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts our nbdkit with `env` (HOME is the test's home), stderr to a file.
fn start(sshd: &Sshd, opts: &[&str], args: &[String], env: &[(&str, &str)]) -> Server {
    let dir = TempDir::new("sshsrv");
    let sock = dir.path("sock");
    let mut cmd = Command::new(nbdkit_bin());
    cmd.args(["--foreground", "--unix"]).arg(&sock).args(opts).args(args);
    cmd.env("HOME", sshd.path("home")).env_remove("SSH_AUTH_SOCK").env("PATH", path_env());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.path("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&srv.sock).is_err() {
        if let Ok(Some(st)) = srv.child.try_wait() {
            panic!("nbdkit exited early: {st}: {}", stderr_of(&srv));
        }
        assert!(Instant::now() < deadline, "server did not start");
        thread::sleep(Duration::from_millis(10));
    }
    srv
}

fn stderr_of(srv: &Server) -> String {
    std::fs::read_to_string(srv.dir.path("stderr")).unwrap_or_default()
}

/// Runs our nbdkit with `--run` (one-shot), returning its output.
fn run_nbdkit(sshd: &Sshd, args: &[String], run: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(nbdkit_bin());
    cmd.arg("-U").arg("-").args(args).arg("--run").arg(run);
    cmd.env("HOME", sshd.path("home")).env_remove("SSH_AUTH_SOCK").env("PATH", path_env());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn sized(srv: &Server) -> u64 {
    run_ok("nbdinfo", &["--size", &srv.uri()]).trim().parse().unwrap()
}

#[test]
fn nbdcopy_in_and_out_qemu_img_and_flush() {
    require!("nbdcopy", "--version");
    require!("qemu-img", "--version");
    let sshd = Sshd::start();
    let remote = sshd.make_file("disk.img", 6 << 20);
    let before = sha256(Path::new(&remote));
    let mut srv = start(&sshd, &[], &sshd.args("disk.img"), &[]);
    assert_eq!(sized(&srv), 6 << 20);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    for k in ["\"can_flush\": true", "\"can_multi_conn\": true", "\"can_fua\": true", "\"is_read_only\": false",
              "\"can_trim\": false"] {
        assert!(json.contains(k), "{k} in {json}");
    }
    // Out: remote → local, by nbdcopy and by qemu-img.
    let out = sshd.s("out.img");
    run_ok("nbdcopy", &[&srv.uri(), &out]);
    assert_eq!(sha256(Path::new(&out)), before);
    let q = sshd.s("q.raw");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.uri(), &q]);
    assert_eq!(sha256(Path::new(&q)), before);
    // In: local → remote; the remote file is then the source's copy.
    let src = sshd.make_file("src.img", (6 << 20) - 4096);
    let mut data = std::fs::read(&src).unwrap();
    data.extend_from_slice(&[0x5a; 4096]);
    std::fs::write(&src, &data).unwrap();
    run_ok("nbdcopy", &["--flush", &src, &srv.uri()]);
    assert_eq!(sha256(Path::new(&remote)), sha256(Path::new(&src)));
    // Unaligned writes and reads across chunk boundaries, and flush.
    nbdsh_ok(&srv, "buf = bytes(range(256)) * 1000\n\
                    h.pwrite(buf, 65536 - 7)\n\
                    h.flush()\n\
                    assert h.pread(len(buf), 65536 - 7) == buf\n\
                    assert h.pread(1, 6*1024*1024 - 1) == b'\\x5a'\n");
    let now = std::fs::read(&remote).unwrap();
    assert_eq!(&now[65536 - 7..65536 - 7 + 256], &(0..=255u8).collect::<Vec<_>>()[..]);
    // Each connection's session thread ends with the connection.
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", srv.child.id()))
            .unwrap()
            .filter(|t| {
                let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap_or_default();
                comm.trim() == "ssh-session"
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads() > 0 {
        assert!(Instant::now() < deadline, "{} ssh-session threads left", threads());
        thread::sleep(Duration::from_millis(20));
    }
    srv.health_check();
}

#[test]
fn readonly_and_eof_mid_read() {
    let sshd = Sshd::start();
    let remote = sshd.make_file("ro.img", 1 << 20);
    let mut srv = start(&sshd, &["-r"], &sshd.args("ro.img"), &[]);
    let script = format!(
        "{PY_FAILS}\nassert h.is_read_only()\nfails('EPERM', h.pwrite, b'x' * 512, 0)\n\
         import os\nos.truncate('{remote}', 300000)\n\
         assert len(h.pread(4096, 0)) == 4096\n\
         fails('EIO', h.pread, 65536, 262144)\n\
         fails('EIO', h.pread, 4096, 1048576 - 4096)\n"
    );
    nbdsh_ok(&srv, &script);
    assert!(stderr_of(&srv).contains("end of file"), "{}", stderr_of(&srv));
    std::fs::write(&remote, vec![1u8; 1 << 20]).unwrap();
    srv.health_check();
}

#[test]
fn agent_and_default_identity_and_hashed_known_hosts() {
    require!("ssh-agent");
    let sshd = Sshd::start();
    sshd.make_file("a.img", 1 << 20);
    // The default known_hosts (~/.ssh/known_hosts), hashed by ssh-keygen -H.
    let kh = sshd.path("home/.ssh/known_hosts");
    std::fs::write(&kh, sshd.known_line() + "\n").unwrap();
    run_ok("ssh-keygen", &["-q", "-H", "-f", kh.to_str().unwrap()]);
    let hashed = std::fs::read_to_string(&kh).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["ssh", "host=127.0.0.1", "user=root", "config="].iter().map(|s| s.to_string()).collect();
        v.push(format!("port={}", sshd.port));
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(sshd.s("a.img"));
        v
    };
    // The default identity ~/.ssh/id_ed25519.
    let o = run_nbdkit(&sshd, &base(&[]), "nbdinfo --size \"$uri\"", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1048576");

    // No usable key: nbdkit's message.
    std::fs::rename(sshd.path("home/.ssh/id_ed25519"), sshd.path("moved_key")).unwrap();
    let o = run_nbdkit(&sshd, &base(&[]), "nbdinfo --size \"$uri\"", &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ssh[1]: error: all possible authentication methods failed"), "{err}");

    // ssh-agent holding the other authorized key.
    let sock = sshd.s("agent.sock");
    let mut agent = Command::new("ssh-agent").args(["-D", "-a", &sock]).stdout(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&sock).exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        thread::sleep(Duration::from_millis(10));
    }
    let o = Command::new("ssh-add").arg(sshd.path("agent_key")).env("SSH_AUTH_SOCK", &sock).output().unwrap();
    assert!(o.status.success(), "ssh-add: {}", String::from_utf8_lossy(&o.stderr));
    let mut srv = start(&sshd, &["-v"], &base(&[]), &[("SSH_AUTH_SOCK", &sock)]);
    assert_eq!(sized(&srv), 1 << 20);
    assert!(stderr_of(&srv).contains("authentication methods offered by the server"), "{}", stderr_of(&srv));
    srv.health_check();
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn password_forms_and_wrong_password() {
    let sshd = Sshd::start();
    let img = sshd.make_file("pw.img", 1 << 20);
    std::fs::set_permissions(&img, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(sshd.path("pwfile"), format!("{PW_PASS}\n")).unwrap();
    let args = |user: &str, pw: &str| -> Vec<String> {
        vec!["-r".into(), "ssh".into(), "host=127.0.0.1".into(), format!("port={}", sshd.port), format!("user={user}"),
             format!("password={pw}"), format!("known-hosts={}", sshd.known_hosts()), "config=".into(),
             "timeout=20".into(), format!("path={img}")]
    };
    for pw in [PW_PASS.to_string(), format!("+{}", sshd.s("pwfile"))] {
        let o = run_nbdkit(&sshd, &args(PW_USER, &pw), "nbdinfo --size \"$uri\"", &[]);
        assert!(o.status.success(), "{pw}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1048576");
    }
    // password=-FD: a descriptor the shell opens.
    let line = args(PW_USER, "-3").join(" ");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("exec \"$0\" -U - {line} --run 'nbdinfo --size \"$uri\"' 3<{}", sshd.s("pwfile")))
        .arg(nbdkit_bin())
        .env("PATH", path_env())
        .env("HOME", sshd.path("home"))
        .output()
        .unwrap();
    assert!(o.status.success(), "-FD: {}", String::from_utf8_lossy(&o.stderr));
    // password=- without a terminal.
    let o = run_nbdkit(&sshd, &args(PW_USER, "-"), "true", &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("stdin is not a tty, cannot read password interactively"));

    // Wrong password: the connection fails with nbdkit's message, the
    // server lives on, and once the password is right it serves.
    set_password(PW_USER2, "something-else");
    let mut srv = start(&sshd, &[], &args(PW_USER2, PW_PASS), &[]);
    let o = run("nbdinfo", &["--size", &srv.uri()]);
    assert!(!o.status.success());
    assert!(stderr_of(&srv).contains("error: all possible authentication methods failed"), "{}", stderr_of(&srv));
    set_password(PW_USER2, PW_PASS);
    srv.health_check();
}

#[test]
fn host_key_states() {
    let sshd = Sshd::start();
    sshd.make_file("hk.img", 1 << 20);
    let other = std::fs::read_to_string(sshd.path("other_key.pub")).unwrap();
    let ecdsa = {
        keygen(&sshd.path("ecdsa_key"), "ecdsa");
        std::fs::read_to_string(sshd.path("ecdsa_key.pub")).unwrap()
    };
    let kh = sshd.path("kh_test");
    let args = |extra: &str| -> Vec<String> {
        let mut v = sshd.args("hk.img");
        v[5] = format!("known-hosts={}", kh.display());
        if !extra.is_empty() {
            v.push(extra.to_string());
        }
        v
    };
    let cases = [
        (format!("[127.0.0.1]:{} {}", sshd.port, other.trim()), "host key for server changed"),
        (format!("[127.0.0.1]:{} {}", sshd.port, ecdsa.trim()),
         "host key for server was not found but another type of key exists"),
        (format!("127.0.0.1 {}", std::fs::read_to_string(sshd.path("host_ed25519.pub")).unwrap().trim()),
         "either the host key is unknown, you must use ssh first and accept the host key"),
    ];
    let mut srv = start(&sshd, &[], &args(""), &[]);
    for (line, msg) in &cases {
        std::fs::write(&kh, format!("{line}\n")).unwrap();
        let o = run("nbdinfo", &["--size", &srv.uri()]);
        assert!(!o.status.success(), "{msg}");
        assert!(stderr_of(&srv).contains(&format!("ssh[1]: error: {msg}")) || stderr_of(&srv).contains(msg),
                "{msg}: {}", stderr_of(&srv));
    }
    let _ = std::fs::remove_file(&kh);
    let o = run("nbdinfo", &["--size", &srv.uri()]);
    assert!(!o.status.success());
    // As libssh 0.10 (Debian's nbdkit): no file, so the host is unknown.
    assert_eq!(stderr_of(&srv).matches("error: either the host key is unknown").count(), 2, "{}", stderr_of(&srv));
    // The known_hosts file is read per connection: fixed, it serves.
    std::fs::write(&kh, sshd.known_line() + "\n").unwrap();
    srv.health_check();
    drop(srv);
    // verify-remote-host=false accepts an unknown key.
    std::fs::write(&kh, "").unwrap();
    let mut srv = start(&sshd, &[], &args("verify-remote-host=false"), &[]);
    srv.health_check();
}

#[test]
fn config_file_percent_expansion_create_compression_debug() {
    let sshd = Sshd::start();
    // An ssh_config with an alias; identity and known_hosts through %d and
    // %p; the command line's port= and user= are not needed.
    std::fs::write(sshd.path("home/.ssh/kh"), sshd.known_line() + "\n").unwrap();
    let cfg = format!(
        "Host other\n  Port 1\nHost testalias\n  HostName 127.0.0.1\n  Port {}\n  User root\n  \
         IdentityFile %d/id_ed25519\n  UserKnownHostsFile %d/kh\n  Compression yes\n",
        sshd.port
    );
    std::fs::write(sshd.path("ssh_config"), cfg).unwrap();
    let new = sshd.s("new-%p.img").replace("-%p", "");
    let _ = std::fs::remove_file(&new);
    let args: Vec<String> = vec![
        "ssh".into(), "host=testalias".into(), format!("config={}", sshd.s("ssh_config")),
        "create=true".into(), "create-size=3M".into(), "create-mode=0640".into(),
        "compression=true".into(), "timeout=30".into(), new.clone(),
    ];
    let mut srv = start(&sshd, &["-v", "-D", "ssh.log=2"], &args, &[]);
    let o = run("nbdinfo", &["--size", &srv.uri()]);
    assert!(o.status.success(), "{}", stderr_of(&srv));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), (3 << 20).to_string());
    let md = std::fs::metadata(&new).unwrap();
    assert_eq!(md.len(), 3 << 20);
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777, 0o640);
    // Written data stays: later connections open, they do not truncate.
    let src = sshd.make_file("c.img", 3 << 20);
    run_ok("nbdcopy", &[&src, &srv.uri()]);
    assert_eq!(sized(&srv), 3 << 20);
    assert_eq!(sha256(Path::new(&new)), sha256(Path::new(&src)));
    let err = stderr_of(&srv);
    assert!(err.contains("sftp extensions"), "{err}");
    // Requests as big as OpenSSH's limits@openssh.com allow (255 KiB).
    assert!(err.contains("requests of up to 261120 bytes read, 261120 written"), "{err}");
    srv.health_check();

    // A missing config file is ignored (as libssh does); %-sequences in identity=.
    let mut a = sshd.args("c.img");
    a[4] = "identity=%d/id_ed25519".into();
    a[6] = "config=/nonexistent/cfg".into();
    let o = run_nbdkit(&sshd, &a, "nbdinfo --size \"$uri\"", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn p10_sshd_session_stopped_or_killed_mid_read() {
    let sshd = Sshd::start();
    sshd.make_file("p10.img", 4 << 20);
    let mut args = sshd.args("p10.img");
    args.insert(1, "timeout=2".into());
    let mut srv = start(&sshd, &[], &args, &[]);
    // A client reads, then the server's session stops (SIGSTOP): the read
    // fails with EIO within the timeout instead of hanging.
    let script = format!(
        "{PY_FAILS}\nimport os, signal, time, sys\n\
         assert len(h.pread(65536, 0)) == 65536\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         t = time.time()\n\
         fails('EIO', h.pread, 1048576, 0)\n\
         assert time.time() - t < 8, time.time() - t\n\
         fails('EIO', h.pread, 512, 0)\n"
    );
    let mut c = Command::new("nbdsh")
        .args(["-u", &srv.uri(), "-c", &script])
        .env("PATH", path_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    assert!(sshd.signal_sessions(libc::SIGSTOP) > 0);
    writeln!(c.stdin.take().unwrap()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "stalled: {}", String::from_utf8_lossy(&o.stderr));
    sshd.signal_sessions(libc::SIGCONT);
    sshd.signal_sessions(libc::SIGKILL);
    srv.health_check();

    // The session is killed mid-session: EIO at once, new connections fine.
    let script = format!(
        "{PY_FAILS}\nimport sys\nassert len(h.pread(65536, 0)) == 65536\nprint('ready', flush=True)\n\
         sys.stdin.readline()\nfails('EIO', h.pread, 1048576, 0)\n"
    );
    let mut c = Command::new("nbdsh")
        .args(["-u", &srv.uri(), "-c", &script])
        .env("PATH", path_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(sshd.signal_sessions(libc::SIGKILL) > 0);
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    writeln!(c.stdin.take().unwrap()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "killed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < Duration::from_secs(5));
    srv.health_check();
}

#[test]
fn bad_parameters() {
    let sshd = Sshd::start();
    let cases: &[(&[&str], &str)] = &[
        (&["ssh", "host=h"], "you must supply the host and path parameters"),
        (&["ssh", "host=h", "p", "create=true"], "you must specify the size of the new remote file"),
        (&["ssh", "host=h", "p", "create-mode=01000"], "create-mode must be <= 0777"),
        (&["ssh", "host=h", "p", "timeout=-1"], "timeout: negative numbers are not allowed"),
        (&["ssh", "host=h", "p", "password=-1"], "cannot use password -FD for stdin/stdout/stderr"),
        (&["ssh", "host=h", "p", "compression=maybe"], "could not decipher boolean (maybe)"),
    ];
    for (args, msg) in cases {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let o = run_nbdkit(&sshd, &args, "true", &[]);
        assert!(!o.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(msg), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    // Connection refused and a missing remote file: errors at open.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let args: Vec<String> = vec!["ssh".into(), "host=127.0.0.1".into(), format!("port={port}"), "p".into()];
    let o = run_nbdkit(&sshd, &args, "nbdinfo --size \"$uri\"", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("failed to connect to remote host: 127.0.0.1: Connection refused"), "{err}");
    let args: Vec<String> = vec!["ssh".into(), "host=nosuchhost.invalid".into(), "p".into()];
    let o = run_nbdkit(&sshd, &args, "nbdinfo --size \"$uri\"", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("failed to connect to remote host: nosuchhost.invalid: Failed to resolve hostname \
                          nosuchhost.invalid ("), "{err}");
    let o = run_nbdkit(&sshd, &sshd.args("missing.img"), "nbdinfo --size \"$uri\"", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing.img: cannot open file for writing: SFTP server: No such file"), "{err}");
    let _ = run_in(&sshd.dir.0, "true", &[]);
}

#[test]
fn nbdinfo_json_matches_debian_nbdkit() {
    require!("/usr/bin/nbdkit", "--version");
    let sshd = Sshd::start();
    sshd.make_file("j.img", 3 << 20);
    let args = sshd.args("j.img");
    let json = |bin: &Path, ro: bool| -> String {
        let mut cmd = Command::new(bin);
        cmd.arg("-U").arg("-");
        if ro {
            cmd.arg("-r");
        }
        let o = cmd
            .args(&args)
            .args(["--run", "nbdinfo --json \"$uri\""])
            .env("HOME", sshd.path("home"))
            .env("PATH", path_env())
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{bin:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.contains("\"uri\"")).collect::<Vec<_>>().join("\n")
    };
    for ro in [false, true] {
        assert_eq!(json(&nbdkit_bin(), ro), json(Path::new("/usr/bin/nbdkit"), ro), "readonly={ro}");
    }
}
