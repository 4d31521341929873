//! The curl plugin against a real nginx started by each test (its own
//! config, ports, Unix socket and certificates from a test CA), plus a tiny
//! in-test HTTP server for faults nginx cannot make. Clients: nbdinfo,
//! nbdcopy, qemu-img, nbdsh; Debian's nbdkit for comparison.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const IMG_SIZE: usize = 4 << 20;

fn image() -> Vec<u8> {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    (0..IMG_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A CA (`NAME.pem`/`NAME.key`) and, if `server`, a certificate it signed.
fn make_ca(dir: &Path, name: &str) {
    let key = format!("{name}.key");
    let pem = format!("{name}.pem");
    openssl(dir, &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-keyout", &key, "-out", &pem, "-days", "2", "-subj", &format!("/CN={name}"),
                   "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
}

fn make_server_cert(dir: &Path) {
    openssl(dir, &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                   "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"]);
    fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,DNS:example.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(dir, &["x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                   "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf"]);
}

/// nginx, started as a child with its own config; killed (this PID only) on drop.
struct Nginx {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    tls_port: u16,
}

impl Nginx {
    fn start() -> Nginx {
        let dir = TempDir::new("nginx");
        let d = dir.0.clone();
        fs::create_dir_all(d.join("www")).unwrap();
        fs::create_dir_all(d.join("tmp")).unwrap();
        fs::write(d.join("www/disk.img"), image()).unwrap();
        fs::write(d.join("htpasswd"), "alice:{PLAIN}wonderland\n").unwrap();
        make_ca(&d, "ca");
        make_ca(&d, "otherca");
        make_server_cert(&d);
        let mut n = Nginx { child: None, port: free_port(), tls_port: free_port(), dir };
        n.write_conf();
        n.spawn();
        n
    }

    fn write_conf(&self) {
        let d = self.dir.0.display();
        let www = format!("{d}/www/");
        let conf = format!(
            r#"worker_processes 1;
master_process off;
user root;
error_log {d}/error.log;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  default_type application/octet-stream;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    listen unix:{d}/nginx.sock;
    listen 127.0.0.1:{tls} ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {d}/srv.pem;
    ssl_certificate_key {d}/srv.key;
    root {www};
    location = /r1 {{ return 302 /r2; }}
    location = /r2 {{ return 301 http://127.0.0.1:{port}/r3; }}
    location = /r3 {{ return 307 /disk.img; }}
    location = /loop {{ return 302 /loop; }}
    location = /to-https {{ return 302 https://127.0.0.1:{tls}/disk.img; }}
    location /s3/ {{ if ($request_method = HEAD) {{ return 403; }} alias {www}; }}
    location /noranges/ {{ max_ranges 0; alias {www}; }}
    location /cookie/ {{ if ($cookie_session != "secret") {{ return 403; }} add_header Set-Cookie "seen=yes; Path=/"; alias {www}; }}
    location /token/ {{ if ($http_x_token != "t0ken") {{ return 401; }} alias {www}; }}
    location /ua/ {{ if ($http_user_agent != "nbdkit-test/1") {{ return 403; }} alias {www}; }}
    location /noaccept/ {{ if ($http_accept) {{ return 403; }} alias {www}; }}
    location /auth/ {{ auth_basic "test"; auth_basic_user_file {d}/htpasswd; alias {www}; }}
    location /pa/ {{ if ($http_proxy_authorization != "Basic cHU6cHA=") {{ return 407; }} alias {www}; }}
    location /dav/ {{ dav_methods PUT; alias {www}; }}
  }}
}}
"#,
            port = self.port,
            tls = self.tls_port
        );
        fs::write(self.dir.path("nginx.conf"), conf).unwrap();
    }

    fn spawn(&mut self) {
        let d = self.dir.0.display().to_string();
        let _ = fs::remove_file(self.dir.path("nginx.sock"));
        let child = Command::new("/usr/sbin/nginx")
            .args(["-p", &d, "-c", &format!("{d}/nginx.conf"), "-e", &format!("{d}/error.log"),
                   "-g", &format!("daemon off; pid {d}/nginx.pid;")])
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run /usr/sbin/nginx");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || TcpStream::connect(("127.0.0.1", self.tls_port)).is_err()
            || UnixStream::connect(self.dir.path("nginx.sock")).is_err()
        {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("nginx exited: {st}: {}", fs::read_to_string(self.dir.path("error.log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn tls_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.tls_port)
    }

    fn file(&self, name: &str) -> String {
        self.dir.path(name).display().to_string()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server with its stderr in a file (for -v / -D checks).
fn start_logged(opts: &[&str], args: &[&str]) -> (Server, PathBuf) {
    let dir = TempDir::new("curlsrv");
    let sock = dir.path("sock");
    let log = dir.path("stderr");
    let child = Command::new(nbdkit_bin())
        .args(["--foreground", "--unix"])
        .arg(&sock)
        .args(opts)
        .args(args)
        .stdin(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&srv.sock).is_err() {
        if let Ok(Some(st)) = srv.child.try_wait() {
            panic!("nbdkit exited early: {st}: {}", fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(10));
    }
    (srv, log)
}

fn image_sha() -> String {
    let t = TempDir::new("curlimg");
    fs::write(t.path("i"), image()).unwrap();
    sha256(&t.path("i"))
}

/// nbdcopy the export to a file and compare with the image.
fn copy_matches(srv: &Server) {
    let t = TempDir::new("curlcopy");
    let out = t.path("out");
    run_ok("nbdcopy", &[&srv.uri(), &out.display().to_string()]);
    assert_eq!(sha256(&out), image_sha());
}

/// Reading the first 512 bytes works (an nbdsh check).
fn reads_ok(srv: &Server) {
    let img = image();
    let want: Vec<String> = img[4096..4100].iter().map(|b| b.to_string()).collect();
    nbdsh_ok(srv, &format!("assert list(h.pread(4, 4096)) == [{}]", want.join(",")));
}

/// nbdkit must fail to start (or to open) with this message.
fn open_fails(args: &[&str], msg: &str) {
    let (mut srv, log) = start_logged(&[], args);
    let o = run("nbdinfo", &[&srv.uri()]);
    assert!(!o.status.success(), "{args:?} should fail to open");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains(msg), "{args:?}: expected {msg:?} in:\n{text}");
    assert!(srv.alive());
}

fn start_fails(args: &[&str], msg: &str) {
    let o = Command::new(nbdkit_bin()).args(["-U", "-", "-f"]).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(!o.status.success(), "{args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(msg), "{args:?}: expected {msg:?} in {e}");
}

#[test]
fn http_through_real_clients() {
    require!("nginx", "-v");
    require!("nbdinfo", "--version");
    require!("nbdcopy", "--version");
    require!("qemu-img", "--version");
    require!("nbdsh", "--version");
    let ng = Nginx::start();
    let url = ng.url("/disk.img");
    let mut srv = Server::start(&["curl", &url]);
    copy_matches(&srv);
    // qemu-img from nbd+unix://
    let t = TempDir::new("curlqemu");
    let out = t.path("q.raw").display().to_string();
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.uri(), &out]);
    assert_eq!(sha256(Path::new(&out)), image_sha());
    reads_ok(&srv);
    // Reads across the end and zero-length/odd sizes.
    let img = image();
    let last: Vec<String> = img[IMG_SIZE - 3..].iter().map(|b| b.to_string()).collect();
    nbdsh_ok(&srv, &format!(
        "assert h.get_size() == {IMG_SIZE}\nassert list(h.pread(3, {})) == [{}]\nassert not h.can_zero() or True",
        IMG_SIZE - 3, last.join(",")));
    // Writes: nginx has no ranged PUT: the write fails with EIO, the connection lives.
    nbdsh_ok(&srv, &format!("{PY_FAILS}\nfails('EIO', h.pwrite, b'x' * 512, 0)\nassert len(h.pread(512, 0)) == 512"));
    srv.health_check();
}

#[test]
fn nbdinfo_json_matches_debian_nbdkit() {
    require!("nginx", "-v");
    require!("nbdinfo", "--version");
    if !Path::new("/usr/bin/nbdkit").exists() {
        panic!("Debian's nbdkit (/usr/bin/nbdkit) is required");
    }
    let ng = Nginx::start();
    let url = ng.url("/disk.img");
    for ro in [false, true] {
        let opts: &[&str] = if ro { &["-r"] } else { &[] };
        let ours = Server::start_with(opts, &["curl", &url]);
        let dir = TempDir::new("debcurl");
        let sock = dir.path("sock");
        let mut deb = Command::new("/usr/bin/nbdkit")
            .args(["-f", "-U"]).arg(&sock).args(opts).args(["curl", &url])
            .stdin(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline);
            thread::sleep(Duration::from_millis(10));
        }
        let a = run_ok("nbdinfo", &["--json", &ours.uri()]);
        let b = run_ok("nbdinfo", &["--json", &format!("nbd+unix:///?socket={}", sock.display())]);
        let _ = deb.kill();
        let _ = deb.wait();
        let norm = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| l.trim().trim_end_matches(',').to_string())
                // 1.44: read-only curl exports are multi-conn (documented difference).
                .filter(|l| !(l.contains("socket=") || l.contains("\"uri\"") || ro && l.contains("can_multi_conn")))
                .collect()
        };
        assert_eq!(norm(&a), norm(&b), "nbdinfo --json differs (ro={ro})\nours:\n{a}\ndebian:\n{b}");
        if ro {
            assert!(a.contains("\"can_multi_conn\": true"), "{a}");
        }
    }
}

#[test]
fn unix_socket_debug_flags_and_pool() {
    require!("nginx", "-v");
    require!("nbdcopy", "--version");
    let ng = Nginx::start();
    let sock = ng.file("nginx.sock");
    let url = "http://nginx.invalid/disk.img".to_string();
    let (mut srv, log) = start_logged(
        &["-v", "-D", "curl.verbose=1", "-D", "curl.pool=1"],
        &["curl", &url, &format!("unix-socket-path={sock}"), "connections=2", "tcp-nodelay=false",
          "tcp-keepalive=true", "user-agent=nbdkit-test/1", "timeout=20", "header=X-Empty;", "header=Accept:",
          "header=X-Added: yes"],
    );
    // Many requests in parallel (multi-conn + 16 in flight) over 2 HTTP connections.
    let t = TempDir::new("curlpar");
    let out = t.path("o").display().to_string();
    run_ok("nbdcopy", &["-C", "4", "-R", "16", "--request-size=65536", &srv.uri(), &out]);
    assert_eq!(sha256(Path::new(&out)), image_sha());
    srv.health_check();
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("debug: C: GET /disk.img HTTP/1.1"), "{text}");
    assert!(text.contains("debug: C: Host: nginx.invalid"), "{text}");
    assert!(text.contains("debug: C: X-Empty:\n"), "{text}");
    assert!(text.contains("debug: C: X-Added: yes\n"), "{text}");
    assert!(!text.contains("debug: C: Accept"), "{text}");
    assert!(text.contains("debug: S: HTTP/1.1 206 Partial Content"), "{text}");
    assert!(text.contains("debug: pool: waiting for a free connection")
        || text.contains("debug: pool: reusing connection"), "{text}");
    let news = text.matches("debug: pool: new connection").count();
    assert!((1..=8).contains(&news), "{news} connections made for 2 slots");
}

#[test]
fn https_certificates_and_tls_options() {
    require!("nginx", "-v");
    require!("nbdsh", "--version");
    let ng = Nginx::start();
    let url = ng.tls_url("/disk.img");
    let ca = format!("cainfo={}", ng.file("ca.pem"));
    let mut srv = Server::start(&["curl", &url, &ca]);
    copy_matches(&srv);
    srv.health_check();
    // capath: a directory holding the CA.
    let capdir = TempDir::new("capath");
    fs::copy(ng.file("ca.pem"), capdir.path("ca.pem")).unwrap();
    let mut s2 = Server::start(&["curl", &url, &format!("capath={}", capdir.0.display()), "cainfo="]);
    reads_ok(&s2);
    s2.health_check();
    // TLS versions and ciphers rustls can do.
    for extra in [["ssl-version=tlsv1.3", "tls13-ciphers=TLS_CHACHA20_POLY1305_SHA256"],
                  ["ssl-version=max-tlsv1.2", "ssl-cipher-list=ECDHE-ECDSA-AES128-GCM-SHA256"]] {
        let mut s = Server::start(&["curl", &url, &ca, extra[0], extra[1]]);
        reads_ok(&s);
        s.health_check();
    }
    // resolve= maps a name in the certificate to loopback; https://name works.
    let named = format!("https://example.test:{}/disk.img", ng.tls_port);
    let mut s3 = Server::start(&["curl", &named, &ca, &format!("resolve=example.test:{}:127.0.0.1", ng.tls_port),
                                 "ipresolve=v4"]);
    reads_ok(&s3);
    s3.health_check();
    // Unknown CA: refused; with sslverify=false: served.
    open_fails(&["curl", &url, &format!("cainfo={}", ng.file("otherca.pem"))], "problem doing HEAD request");
    open_fails(&["curl", &url], "TLS handshake");
    let mut s4 = Server::start(&["curl", &url, "sslverify=false"]);
    reads_ok(&s4);
    s4.health_check();
    // http → https redirect, protocols=http refuses it.
    let mut s5 = Server::start(&["curl", &ng.url("/to-https"), &ca]);
    reads_ok(&s5);
    s5.health_check();
    open_fails(&["curl", &ng.url("/to-https"), &ca, "protocols=http"], "not allowed by protocols");
}

#[test]
fn redirects_s3_ranges_and_loops() {
    require!("nginx", "-v");
    require!("nbdsh", "--version");
    let ng = Nginx::start();
    let mut srv = Server::start(&["curl", &ng.url("/r1"), "followlocation=true", "protocols=http,https"]);
    copy_matches(&srv);
    srv.health_check();
    open_fails(&["curl", &ng.url("/r1"), "followlocation=false"], "server does not support 'range'");
    open_fails(&["curl", &ng.url("/loop")], "maximum (30) redirects followed");
    open_fails(&["curl", &ng.url("/nosuch.img")], "returned error: 404");
    // S3 style: HEAD → 403, so GET for the size.
    let (mut s3, log) = start_logged(&["-v"], &["curl", &ng.url("/s3/disk.img")]);
    copy_matches(&s3);
    s3.health_check();
    assert!(fs::read_to_string(&log).unwrap().contains("HEAD request returned 403, trying GET"));
    // A location that refuses ranges.
    open_fails(&["curl", &ng.url("/noranges/disk.img")], "server does not support 'range' (byte range) requests");
}

#[test]
fn auth_cookies_headers_and_scripts() {
    require!("nginx", "-v");
    require!("nbdsh", "--version");
    let ng = Nginx::start();
    let t = TempDir::new("curlauth");
    // Basic auth: user/password, password=+FILE, credentials in the URL.
    open_fails(&["curl", &ng.url("/auth/disk.img")], "returned error: 401");
    open_fails(&["curl", &ng.url("/auth/disk.img"), "user=alice", "password=nope"], "returned error: 401");
    let mut s = Server::start(&["curl", &ng.url("/auth/disk.img"), "user=alice", "password=wonderland"]);
    reads_ok(&s);
    s.health_check();
    fs::write(t.path("pw"), "wonderland\n").unwrap();
    let mut s = Server::start(&["curl", &ng.url("/auth/disk.img"), "user=alice",
                                &format!("password=+{}", t.path("pw").display())]);
    reads_ok(&s);
    s.health_check();
    let mut s = Server::start(&["curl", &format!("http://alice:wonderland@127.0.0.1:{}/auth/disk.img", ng.port)]);
    reads_ok(&s);
    s.health_check();
    // password=-FD: an inherited descriptor (the shell opens fd 3).
    {
        let o = Command::new("/bin/sh")
            .args(["-c", &format!(
                "exec 3<'{pw}'; exec '{bin}' -U - curl '{url}' user=alice password=-3 --run 'nbdinfo --size \"$uri\"'",
                pw = t.path("pw").display(), bin = nbdkit_bin().display(), url = ng.url("/auth/disk.img"))])
            .env("PATH", path_env())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), IMG_SIZE.to_string());
    }
    // Cookies.
    open_fails(&["curl", &ng.url("/cookie/disk.img")], "returned error: 403");
    let mut s = Server::start(&["curl", &ng.url("/cookie/disk.img"), "cookie=session=secret"]);
    reads_ok(&s);
    s.health_check();
    fs::write(t.path("cookie"), "session=secret\n").unwrap();
    let mut s = Server::start(&["curl", &ng.url("/cookie/disk.img"), &format!("cookie=+{}", t.path("cookie").display())]);
    reads_ok(&s);
    s.health_check();
    fs::write(t.path("jar.txt"), "127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\tsecret\n").unwrap();
    let jar = t.path("jar.txt").display().to_string();
    let out_jar = t.path("out-jar.txt").display().to_string();
    let mut s = Server::start(&["curl", &ng.url("/cookie/disk.img"), &format!("cookiefile={jar}"),
                                &format!("cookiejar={out_jar}")]);
    reads_ok(&s);
    s.health_check();
    // SIGTERM: the jar is saved at unload, with the cookie the server set.
    let pid = s.child.id() as i32;
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(s.child.wait().unwrap().success());
    let saved = fs::read_to_string(&out_jar).unwrap();
    assert!(saved.contains("session\tsecret") && saved.contains("seen\tyes"), "{saved}");
    let mut s = Server::start(&["curl", &ng.url("/cookie/disk.img"), "cookie-script=echo session=secret",
                                "cookie-script-renew=1"]);
    reads_ok(&s);
    s.health_check();
    // Headers: add, remove a default (Accept:), user-agent.
    open_fails(&["curl", &ng.url("/token/disk.img")], "returned error: 401");
    let mut s = Server::start(&["curl", &ng.url("/token/disk.img"), "header=X-Token: t0ken", "header=X-Empty;"]);
    reads_ok(&s);
    s.health_check();
    open_fails(&["curl", &ng.url("/noaccept/disk.img")], "returned error: 403");
    let mut s = Server::start(&["curl", &ng.url("/noaccept/disk.img"), "header=Accept:"]);
    reads_ok(&s);
    s.health_check();
    let mut s = Server::start(&["curl", &ng.url("/ua/disk.img"), "user-agent=nbdkit-test/1"]);
    reads_ok(&s);
    s.health_check();
    // header-script with $url and $iteration, renewed every second.
    let script = format!(
        "echo \"$iteration\" >> {d}/iters; test \"$url\" = '{u}' || exit 1; echo 'X-Token: t0ken'",
        d = t.0.display(),
        u = ng.url("/token/disk.img")
    );
    let (mut s, log) = start_logged(&["-v", "-D", "curl.scripts=1"],
                                    &["curl", &ng.url("/token/disk.img"), &format!("header-script={script}"),
                                      "header-script-renew=1"]);
    reads_ok(&s);
    thread::sleep(Duration::from_millis(1100));
    reads_ok(&s);
    s.health_check();
    let iters = fs::read_to_string(t.path("iters")).unwrap();
    assert!(iters.starts_with("0\n1\n"), "{iters}");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("header-script returned 1 header(s)") && text.contains("header-script: X-Token: t0ken"), "{text}");
    // Failing and garbage scripts: open fails with the script's message, the server lives.
    open_fails(&["curl", &ng.url("/token/disk.img"), "header-script=echo broken >&2; exit 3"],
               "header-script failed: broken");
    open_fails(&["curl", &ng.url("/token/disk.img"), "header-script=printf 'no colon here\\n'"],
               "header-script: invalid header");
    open_fails(&["curl", &ng.url("/cookie/disk.img"), "cookie-script=exit 1"], "cookie-script failed");
    open_fails(&["curl", &ng.url("/cookie/disk.img"), "cookie-script=printf 'a\\001b'"], "control character");
}

#[test]
fn proxy_and_file_urls() {
    require!("nginx", "-v");
    require!("nbdsh", "--version");
    let ng = Nginx::start();
    // nginx answers absolute-form requests, so it can stand in for a proxy.
    let url = format!("http://proxied.invalid:{}/pa/disk.img", ng.port);
    let proxy = format!("proxy=http://127.0.0.1:{}", ng.port);
    open_fails(&["curl", &url, &proxy], "returned error: 407");
    let mut s = Server::start(&["curl", &url, &proxy, "proxy-user=pu", "proxy-password=pp"]);
    reads_ok(&s);
    s.health_check();
    // An https:// proxy checked against proxy-cainfo (the origin's cainfo is not used for it).
    let tproxy = format!("proxy=https://127.0.0.1:{}", ng.tls_port);
    open_fails(&["curl", &url, &tproxy, "proxy-user=pu", "proxy-password=pp"], "TLS handshake");
    let mut s = Server::start(&["curl", &url, &tproxy, "proxy-user=pu", "proxy-password=pp",
                                &format!("proxy-cainfo={}", ng.file("ca.pem")),
                                &format!("proxy-capath={}", ng.dir.0.display())]);
    reads_ok(&s);
    s.health_check();
    // HTTP/1.0 (nginx closes each connection) and 1.1.
    for v in ["http-version=1.0", "http-version=1.1", "http-version=none"] {
        let mut s = Server::start(&["curl", &ng.url("/disk.img"), v]);
        copy_matches(&s);
        s.health_check();
    }
    // file: URLs, read and write.
    let t = TempDir::new("curlfile");
    fs::write(t.path("f.img"), image()).unwrap();
    let furl = format!("file://{}", t.path("f.img").display());
    let mut s = Server::start(&["curl", &furl]);
    copy_matches(&s);
    nbdsh_ok(&s, "h.pwrite(b'\\xab' * 512, 512)\nassert h.pread(512, 512) == b'\\xab' * 512");
    s.health_check();
    assert_eq!(&fs::read(t.path("f.img")).unwrap()[512..1024], &[0xab; 512][..]);
}

#[test]
fn bad_parameters() {
    start_fails(&["curl"], "you must supply the url=<URL> parameter");
    start_fails(&["curl", "ftp://127.0.0.1/x"], "unsupported URL scheme 'ftp'");
    start_fails(&["curl", "http://127.0.0.1/x", "connections=0"], "connections parameter must not be 0");
    start_fails(&["curl", "http://127.0.0.1/x", "http-version=2.0"], "http-version 2.0 is not supported");
    start_fails(&["curl", "http://127.0.0.1/x", "http-version=9"], "unknown http-version: 9");
    start_fails(&["curl", "http://127.0.0.1/x", "ssl-version=sslv3"], "ssl-version sslv3 is not supported");
    start_fails(&["curl", "http://127.0.0.1/x", "tls13-ciphers=NOPE"], "tls13-ciphers: no cipher");
    start_fails(&["curl", "http://127.0.0.1/x", "header-script-renew=3"], "header-script-renew cannot be used");
    start_fails(&["curl", "http://127.0.0.1/x", "cookie-script-renew=3"], "cookie-script-renew cannot be used");
    start_fails(&["curl", "http://127.0.0.1/x", "header=A: b", "header-script=true"], "cannot be used at the same time");
    start_fails(&["curl", "http://127.0.0.1/x", "cookie=a", "cookie-script=true"], "cannot be used at the same time");
    start_fails(&["curl", "http://127.0.0.1/x", "cookiejar=-"], "cookiejar parameter cannot be");
    start_fails(&["curl", "http://127.0.0.1/x", "ipresolve=v5"], "unknown ipresolve: v5");
    start_fails(&["curl", "http://127.0.0.1/x", "protocols=gopherz"], "unknown protocol");
    start_fails(&["curl", "http://127.0.0.1/x", "timeout=-1"], "timeout");
    start_fails(&["curl", "http://127.0.0.1/x", "sslverify=maybe"], "could not decipher boolean (maybe)");
    start_fails(&["curl", "http://127.0.0.1/x", "header=nocolon"], "invalid header");
    start_fails(&["curl", "http://127.0.0.1/x", "proxy=socks5://127.0.0.1:1"], "proxy scheme socks5");
    start_fails(&["curl", "https://127.0.0.1/x", "cainfo=/nonexistent/ca.pem"], "/nonexistent/ca.pem");
}

/// P09: nginx killed mid-session: EIO while down; after a restart the same
/// connection and new ones work.
#[test]
fn p09_origin_killed_and_restarted() {
    require!("nginx", "-v");
    require!("nbdsh", "--version");
    let mut ng = Nginx::start();
    let mut srv = Server::start(&["curl", &ng.url("/disk.img"), "timeout=5"]);
    let script = format!(
        r#"{PY_FAILS}
import subprocess, sys
assert len(h.pread(512, 0)) == 512
print("ready", flush=True)
sys.stdin.readline()          # nginx is now down
fails('EIO', h.pread, 512, 4096)
print("failed", flush=True)
sys.stdin.readline()          # nginx is back
assert len(h.pread(65536, 65536)) == 65536
print("recovered", flush=True)
"#
    );
    let mut py = Command::new("nbdsh")
        .args(["-u", &srv.uri(), "-c", &script])
        .env("PATH", path_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = py.stdin.take().unwrap();
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    ng.stop();
    stdin.write_all(b"\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "failed");
    assert!(srv.alive());
    ng.spawn();
    stdin.write_all(b"\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "recovered");
    assert!(py.wait().unwrap().success());
    srv.health_check();
    copy_matches(&srv);
}

/// Faults nginx cannot make, from a tiny in-test server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    Short,
    Long,
    WrongRange,
    Hang,
    IgnoreRange,
    BadHead,
    /// Not a fault: a correct 206 in chunked transfer encoding.
    Chunked,
    /// A chunked 206 with more data than the range.
    ChunkedLong,
}

struct FaultServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

const FAULT_SIZE: u64 = 1 << 30;

impl FaultServer {
    /// Serves HEAD honestly (a 1 GiB file); GETs at offset 0 honestly (for
    /// the health check); other GETs with the fault.
    fn start(fault: Fault) -> FaultServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        l.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let st = st.clone();
                        thread::spawn(move || serve(s, fault, st));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultServer { port, stop }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(s: TcpStream, fault: Fault, stop: Arc<AtomicBool>) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    loop {
        let mut req = Vec::new();
        loop {
            let mut l = String::new();
            if rd.read_line(&mut l).unwrap_or(0) == 0 {
                return;
            }
            if l == "\r\n" {
                break;
            }
            req.push(l);
        }
        let head = req[0].starts_with("HEAD");
        let range = req.iter().find_map(|l| l.strip_prefix("Range: bytes=")).map(|r| {
            let (a, b) = r.trim().split_once('-').unwrap();
            (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())
        });
        if head {
            if fault == Fault::BadHead {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\n");
                return;
            }
            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {FAULT_SIZE}\r\nAccept-Ranges: bytes\r\n\r\n");
            continue;
        }
        let (a, b) = range.unwrap_or((0, FAULT_SIZE - 1));
        let n = b - a + 1;
        let body = |w: &mut TcpStream, n: u64| {
            let chunk = vec![0x5au8; 65536];
            let mut left = n;
            while left > 0 && !stop.load(Ordering::Relaxed) {
                let k = left.min(65536) as usize;
                if w.write_all(&chunk[..k]).is_err() {
                    return false;
                }
                left -= k as u64;
            }
            true
        };
        if a == 0 {
            let _ = write!(w, "HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: bytes {a}-{b}/{FAULT_SIZE}\r\n\r\n");
            body(&mut w, n);
            continue;
        }
        match fault {
            Fault::Short => {
                let _ = write!(w, "HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: bytes {a}-{b}/{FAULT_SIZE}\r\n\r\n");
                body(&mut w, n / 2);
                return;
            }
            Fault::Long => {
                let _ = write!(w, "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{FAULT_SIZE}\r\n\r\n", n + 100);
                body(&mut w, n + 100);
            }
            Fault::WrongRange => {
                let _ = write!(w, "HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: bytes {}-{}/{FAULT_SIZE}\r\n\r\n", a + 512, b + 512);
                body(&mut w, n);
            }
            Fault::Hang => {
                while !stop.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            Fault::Chunked | Fault::ChunkedLong => {
                let _ = write!(w, "HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\nContent-Range: bytes {a}-{b}/{FAULT_SIZE}\r\n\r\n");
                let extra = if fault == Fault::ChunkedLong { 7 } else { 0 };
                let first = n / 3;
                for part in [first, n - first + extra] {
                    let _ = write!(w, "{part:x};ext=1\r\n");
                    body(&mut w, part);
                    let _ = w.write_all(b"\r\n");
                }
                let _ = w.write_all(b"0\r\nX-Trailer: t\r\n\r\n");
            }
            Fault::IgnoreRange | Fault::BadHead => {
                // The whole 1 GiB file: must be refused, never buffered.
                let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {FAULT_SIZE}\r\n\r\n");
                body(&mut w, FAULT_SIZE);
                return;
            }
        }
    }
}

#[test]
fn faults_short_long_wrong_range_hang_ignored_range() {
    require!("nbdsh", "--version");
    for fault in [Fault::Short, Fault::Long, Fault::WrongRange, Fault::Hang, Fault::IgnoreRange] {
        let fs_ = FaultServer::start(fault);
        let url = format!("http://127.0.0.1:{}/f.img", fs_.port);
        let mut srv = Server::start(&["curl", &url, "timeout=2"]);
        let t0 = Instant::now();
        nbdsh_ok(&srv, &format!("{PY_FAILS}\nfails('EIO', h.pread, 65536, 1048576)"));
        assert!(t0.elapsed() < Duration::from_secs(15), "{fault:?} took {:?}", t0.elapsed());
        srv.health_check();
        drop(fs_);
    }
    let fs_ = FaultServer::start(Fault::ChunkedLong);
    let mut srv = Server::start(&["curl", &format!("http://127.0.0.1:{}/f.img", fs_.port), "timeout=2"]);
    nbdsh_ok(&srv, &format!("{PY_FAILS}\nfails('EIO', h.pread, 65536, 1048576)"));
    srv.health_check();
    drop(fs_);
    // Chunked transfer encoding: several reads on one keep-alive connection.
    let fs_ = FaultServer::start(Fault::Chunked);
    let mut srv = Server::start(&["curl", &format!("http://127.0.0.1:{}/f.img", fs_.port), "connections=1"]);
    nbdsh_ok(&srv, "for i in range(5):\n    assert h.pread(65536, 1048576 + i * 4096) == b'\\x5a' * 65536");
    srv.health_check();
    drop(fs_);
    let fs_ = FaultServer::start(Fault::BadHead);
    open_fails(&["curl", &format!("http://127.0.0.1:{}/f.img", fs_.port)], "could not get length of remote file");
}

#[test]
fn dump_plugin_and_help() {
    let o = Command::new(nbdkit_bin()).args(["curl", "--dump-plugin"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for k in ["name=curl", "max_thread_model=parallel", "curl_protocol_http=yes", "curl_protocol_https=yes",
              "curl_protocol_file=yes", "curl_version=", "magic_config_key=url"] {
        assert!(s.contains(k), "{k} missing in\n{s}");
    }
    assert!(!s.contains("curl_protocol_ftp"));
}
