//! The sh plugin through real clients (nbdinfo, nbdcopy, qemu-img, Python
//! libnbd): every method of the script protocol with its arguments and
//! defaults, exit codes 0–8, the errno rules for stderr, `$tmpdir`, the
//! inline script, big requests through the pipes, thread models, and
//! scripts that misbehave (bad-input P05–P08, T32), each ending with the
//! health check.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Writes an executable `#!/bin/sh` script with `body`.
fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn start(args: &[&str]) -> Term {
    Term(Server::start(args))
}


/// True while `pid` exists and is not a zombie (an orphaned grandchild
/// killed with its group waits for init to reap it).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Python prelude: `h` connected, strict mode off, `fails(ERRNO, f, …)`.
fn py(srv: &Server, body: &str) -> String {
    python_ok(&format!(
        "import nbd, os, time\nh = nbd.NBD()\nh.set_strict_mode(0)\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.connect_uri({:?})\n{PY_FAILS}{body}",
        srv.uri()
    ))
}

/// A file-backed script implementing every method, logging each call
/// (`METHOD|ARG|ARG|…`) to `log`.
fn disk_script(dir: &TempDir, disk: &Path, log: &Path) -> PathBuf {
    script(
        dir,
        "disk.sh",
        &format!(
            r#"disk={disk}
printf '%s|' "$@" >> {log}; echo >> {log}
case "$1" in
  thread_model) echo parallel ;;
  open) echo "handle-$3" ;;
  get_size) stat -L -c %s $disk ;;
  can_write|can_flush|can_trim|can_zero|can_extents|can_multi_conn|can_fast_zero) exit 0 ;;
  is_rotational) exit 3 ;;
  can_fua|can_cache) echo native ;;
  pread) dd if=$disk skip=$4 count=$3 iflag=skip_bytes,count_bytes bs=64K status=none ;;
  pwrite) dd of=$disk seek=$4 oflag=seek_bytes conv=notrunc bs=64K status=none ;;
  zero) dd if=/dev/zero of=$disk seek=$4 count=$3 oflag=seek_bytes iflag=count_bytes conv=notrunc bs=64K status=none ;;
  flush|trim|cache|close|preconnect|get_ready|after_fork|config_complete) ;;
  extents) if [ -f $disk.holes ]; then echo "$4 4096 data"; echo "$(($4 + 4096)) 1M hole,zero"; else echo "$4 $3"; fi ;;
  export_description) echo "the disk of $2" ;;
  block_size) echo 512 4K 32M ;;
  *) exit 2 ;;
esac
"#,
            disk = disk.display(),
            log = log.display()
        ),
    )
}

fn random_disk(dir: &TempDir, size: usize) -> PathBuf {
    let p = dir.path("disk.img");
    let mut v = vec![0u8; size];
    let mut x: u32 = 0x1234_5678;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&p, v).unwrap();
    p
}

#[test]
fn a_file_backed_script_reads_and_writes_through_real_clients() {
    require!("nbdcopy", "--version");
    require!("qemu-img", "--version");
    let dir = TempDir::new("sh-rw");
    let disk = random_disk(&dir, 1 << 20);
    let log = dir.path("calls");
    let s = disk_script(&dir, &disk, &log);
    let mut srv = start(&["sh", s.to_str().unwrap()]);
    let info = run_ok("qemu-img", &["info", "--output=json", &srv.uri()]);
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");
    let out = dir.path("out.img");
    run_ok("nbdcopy", &[&srv.uri(), out.to_str().unwrap()]);
    assert_eq!(sha256(&out), sha256(&disk));
    // Write a different image back and read it again.
    let src = dir.path("src.img");
    std::fs::write(&src, vec![0x5a; 1 << 20]).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &srv.uri()]);
    assert_eq!(sha256(&disk), sha256(&src));
    srv.health_check();
}

#[test]
fn every_data_method_gets_nbdkits_arguments_and_flags() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-args");
    let disk = random_disk(&dir, 1 << 20);
    std::fs::write(dir.path("disk.img.holes"), "").unwrap();
    let log = dir.path("calls");
    let s = disk_script(&dir, &disk, &log);
    let srv = start(&["sh", s.to_str().unwrap()]);
    py(
        &srv,
        r#"
assert h.can_fua() and h.can_cache() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_multi_conn() and h.can_flush() and not h.is_rotational()
h.pwrite(b"x" * 512, 1024, nbd.CMD_FLAG_FUA)
assert h.pread(512, 1024) == b"x" * 512
h.flush()
h.trim(4096, 8192, nbd.CMD_FLAG_FUA)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, 12288, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
h.cache(4096, 0)
seen = []
def cb(meta, off, ents, err):
    seen.append(ents)
h.block_status(65536, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert seen[-1][:2] == [4096, 0], seen
h.block_status(65536, 0, cb)
assert seen[-1][:3] == [4096, 0, 1044480] and seen[-1][3] == 3, seen
"#,
    );
    let calls = read(&log);
    for want in [
        "open|false||false|",
        "pwrite|handle-|512|1024|fua|",
        "pread|handle-|512|1024|",
        "flush|handle-|",
        "trim|handle-|4096|8192|fua|",
        "zero|handle-|4096|8192||",
        "zero|handle-|4096|12288|fua,may_trim,fast|",
        "cache|handle-|4096|0|",
        "extents|handle-|65536|0|req_one|",
        "extents|handle-|65536|0||",
    ] {
        assert!(calls.lines().any(|l| l == want), "no call {want:?} in:\n{calls}");
    }
    // Without NO_HOLE a zero may trim.
    py(&srv, "h.zero(512, 0)");
    assert!(read(&log).lines().any(|l| l == "zero|handle-|512|0|may_trim|"), "{}", read(&log));
    // Each can_* once per connection, and close with the handle at the end.
    let calls = read(&log);
    let opens = calls.lines().filter(|l| l.starts_with("open|")).count();
    assert_eq!(calls.lines().filter(|l| l.starts_with("can_flush|")).count(), opens, "{calls}");
    assert_eq!(calls.lines().filter(|l| l.starts_with("can_zero|")).count(), opens, "{calls}");
    thread::sleep(Duration::from_millis(200));
    assert!(read(&log).lines().any(|l| l == "close|handle-|"), "{}", read(&log));
}

#[test]
fn negotiation_methods_exports_description_block_size() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("sh-neg");
    let disk = random_disk(&dir, 65536);
    let log = dir.path("calls");
    let s = disk_script(&dir, &disk, &log);
    let lst = script(
        &dir,
        "wrap.sh",
        &format!(
            r#"case "$1" in
  list_exports) printf 'INTERLEAVED\na\ndesc of a\nb\ndesc of b\n' ;;
  default_export) echo a ;;
  *) exec {} "$@" ;;
esac
"#,
            s.display()
        ),
    );
    let srv = start(&["sh", lst.to_str().unwrap()]);
    let list = run_ok("nbdinfo", &["--list", &srv.uri()]);
    assert!(list.contains("export=\"a\"") && list.contains("description: desc of a"), "{list}");
    assert!(list.contains("export=\"b\"") && list.contains("description: desc of b"), "{list}");
    let json = run_ok("nbdinfo", &["--json", &srv.uri_export("b")]);
    assert!(json.contains("\"export-name\": \"b\""), "{json}");
    assert!(json.contains("\"description\": \"the disk of handle-b\""), "{json}");
    assert!(json.contains("\"block_size_minimum\": 512"), "{json}");
    assert!(json.contains("\"block_size_preferred\": 4096"), "{json}");
    assert!(json.contains("\"block_size_maximum\": 33554432"), "{json}");
    // The default export is canonicalised by default_export.
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    assert!(json.contains("\"description\": \"the disk of handle-a\""), "{json}");
    assert!(read(&log).contains("open|false|a|false|"), "{}", read(&log));
}

#[test]
fn the_other_list_formats() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("sh-lst");
    for (out, want) in [
        ("NAMES+DESCRIPTIONS\\nx\\ny\\ndx\\ndy\\n", &["export=\"x\"", "description: dx", "export=\"y\"", "description: dy"][..]),
        ("p\\nq\\n", &["export=\"p\"", "export=\"q\""]),
        ("NAMES\\nr\\n", &["export=\"r\""]),
    ] {
        let s = script(
            &dir,
            "l.sh",
            &format!("case \"$1\" in list_exports) printf '{out}' ;; get_size) echo 1M ;; pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac\n"),
        );
        let srv = start(&["sh", s.to_str().unwrap()]);
        let list = run_ok("nbdinfo", &["--list", &srv.uri()]);
        for w in want {
            assert!(list.contains(w), "{w} not in {list}");
        }
    }
}

#[test]
fn missing_methods_have_the_sh_defaults() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-def");
    // Only get_size and pread: read-only, nothing advertised.
    let s = script(&dir, "min.sh", "case \"$1\" in get_size) echo 1M ;; pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac\n");
    let srv = start(&["sh", s.to_str().unwrap()]);
    py(
        &srv,
        r#"
assert h.is_read_only()
assert not (h.can_flush() or h.can_trim() or h.can_zero() or h.can_fua() or h.can_cache() or h.can_multi_conn())
assert not h.is_rotational()
assert h.pread(512, 0) == bytes(512)
fails("EPERM", h.pwrite, b"x" * 512, 0)
"#,
    );
    // Writable, flush, can_zero false, no can_fua/can_fast_zero: FUA is
    // emulated with flush, zeroes are emulated and fast zeroes refused.
    let log = dir.path("calls");
    let s = script(
        &dir,
        "w.sh",
        &format!(
            "printf '%s|' \"$@\" >> {log}; echo >> {log}\n\
             case \"$1\" in get_size) echo 64K ;; pread) head -c $3 /dev/zero ;; can_write|can_flush) exit 0 ;;\n\
             can_zero) exit 3 ;; pwrite) cat >/dev/null ;; flush) ;; *) exit 2 ;; esac\n",
            log = log.display()
        ),
    );
    let srv = start(&["sh", s.to_str().unwrap()]);
    py(
        &srv,
        r#"
assert not h.is_read_only() and h.can_flush() and h.can_fua() and h.can_zero() and h.can_fast_zero()
h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_FUA)
h.zero(1024, 0)
fails("ENOTSUP", h.zero, 1024, 0, nbd.CMD_FLAG_FAST_ZERO)
fails("EINVAL", h.trim, 512, 0)
"#,
    );
    let calls = read(&log);
    // FUA by flush; zero by pwrite of zeroes; trim missing = ignored.
    assert!(calls.contains("pwrite||512|0||\nflush||\n"), "{calls}");
    assert!(calls.contains("pwrite||1024|0||"), "{calls}");
    assert!(!calls.lines().any(|l| l.starts_with("zero|")), "{calls}");
}

#[test]
fn zero_missing_falls_back_to_pwrite_and_enotsup_from_zero_too() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-zero");
    let log = dir.path("calls");
    let s = script(
        &dir,
        "z.sh",
        &format!(
            "printf '%s|' \"$@\" >> {log}; echo >> {log}\n\
             case \"$1\" in get_size) echo 64K ;; pread) head -c $3 /dev/zero ;; can_write|can_zero|can_fast_zero) exit 0 ;;\n\
             zero) echo ENOTSUP not today >&2; exit 1 ;; pwrite) cat >/dev/null ;; *) exit 2 ;; esac\n",
            log = log.display()
        ),
    );
    let srv = start(&["sh", s.to_str().unwrap()]);
    py(&srv, "h.zero(4096, 0)\nfails('ENOTSUP', h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)\n");
    let calls = read(&log);
    assert!(calls.contains("zero||4096|0|may_trim|\npwrite||4096|0||"), "{calls}");
}

/// The errno each pread gets when the script exits `code` after printing
/// `stderr` (one server, case N answering the read at offset 512·N, each
/// read on a connection of its own), and the server's log.
fn pread_errors(dir: &TempDir, cases: &[(u8, &str)]) -> (Vec<String>, String) {
    let mut arms = String::new();
    for (i, (code, stderr)) in cases.iter().enumerate() {
        arms.push_str(&format!("  {}) printf '{stderr}' >&2; exit {code} ;;\n", (i + 1) * 512));
    }
    let s = script(
        dir,
        "e1.sh",
        &format!(
            "case \"$1\" in get_size) echo 1M ;; thread_model) echo parallel ;;\n\
             pread) case $4 in\n  0) head -c $3 /dev/zero ;;\n{arms}esac ;; *) exit 2 ;; esac\n"
        ),
    );
    let (mut srv, log) = start_logged_term(&[], &["sh", s.to_str().unwrap()]);
    let out = python_ok(&format!(
        "import nbd\nfor i in range(1, {n}):\n    h = nbd.NBD()\n    h.connect_uri({uri:?})\n    try:\n        h.pread(512, i * 512)\n        print('OK')\n    except nbd.Error as e:\n        print(e.errno)\n    del h\n",
        n = cases.len() + 1,
        uri = srv.uri()
    ));
    srv.health_check();
    (out.lines().map(str::to_string).collect(), read(&log))
}

#[test]
fn stderr_errno_rules() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-errno");
    let mut cases = Vec::new();
    for (stderr, errno, msg) in [
        ("EPERM go away\\n", "EPERM", ": go away\n"),
        ("enospc  full up\\n", "ENOSPC", ": full up\n"),
        ("EDQUOT\\n", "ENOSPC", ": \n"),
        ("EFBIG big\\n", "ENOSPC", ": big\n"),
        ("EINVAL\\tbad\\n", "EINVAL", ": bad\n"),
        ("EROFS ro\\n", "EPERM", ": ro\n"),
        ("ENOMEM x\\n", "ENOMEM", ": x\n"),
        ("EOVERFLOW x\\n", "EINVAL", ": x\n"), // EOVERFLOW only goes on the wire for DF reads
        ("EOPNOTSUPP x\\n", "EINVAL", ": x\n"), // ENOTSUP is EINVAL on the wire without FAST_ZERO
        ("EINVALID thing\\n", "EIO", ": EINVALID thing\n"),
        ("EBADF unknown\\n", "EIO", ": EBADF unknown\n"),
        ("garbage \\001\\377 here\\n", "EIO", ": garbage "),
        ("EPERM first line\\nsecond line\\nthird\\n\\n", "EPERM", ": first line\n"),
        ("", "EIO", ": script exited with error, but did not print an error message on stderr\n"),
    ] {
        cases.push((stderr, errno, msg));
    }
    let (got, log) = pread_errors(&dir, &cases.iter().map(|c| (1, c.0)).collect::<Vec<_>>());
    for ((stderr, errno, msg), got) in cases.iter().zip(&got) {
        assert_eq!(got, errno, "stderr {stderr:?}: {log}");
        assert!(log.contains(&format!("e1.sh{msg}")), "stderr {stderr:?}: want {msg:?} in {log}");
    }
    // The whole multi-line text goes to the debug log, only the first line is the error.
    assert!(log.contains("second line"), "{log}");
    assert!(!log.contains("error: second"), "{log}");
}

#[test]
fn exit_codes() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-exit");
    // 9..255: errors; 3 from pread: unexpected false; 2: missing pread.
    let cases = [
        (9u8, "oops9\\n", "EIO", "e1.sh: oops9\n"),
        (255, "oops255\\n", "EIO", "e1.sh: oops255\n"),
        (3, "", "EIO", "pread method returned unexpected code (3/false)"),
        (2, "", "EIO", "the pread method is required"),
        (8, "", "ESHUTDOWN", ""),
        (0, "", "EIO", "incorrect amount of data read: expecting 512 bytes but received 0 bytes"),
    ];
    let (got, log) = pread_errors(&dir, &cases.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>());
    for ((code, _, want, msg), got) in cases.iter().zip(&got) {
        assert_eq!(got, want, "exit {code}: {log}");
        assert!(log.contains(msg), "exit {code}: {msg:?} not in {log}");
    }
}

#[test]
fn exit_4_and_5_shut_the_server_down() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-exit45");
    for code in [4u8, 5] {
        let s = script(
            &dir,
            "s.sh",
            &format!("case \"$1\" in get_size) echo 1M ;; pread) head -c $3 /dev/zero; exit {code} ;; *) exit 2 ;; esac\n"),
        );
        let mut srv = start(&["sh", s.to_str().unwrap()]);
        let out = nbdsh(&srv, "h.pread(512, 0)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while srv.alive() {
            assert!(Instant::now() < deadline, "exit {code}: server still running");
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(srv.child.wait().unwrap().code(), Some(0));
        // 4 is a success, 5 an error.
        assert_eq!(out.status.success(), code == 4, "exit {code}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn exit_6_disconnects_and_7_stops_reading() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-exit67");
    let s = script(
        &dir,
        "d.sh",
        "case \"$1\" in get_size) echo 1M ;; thread_model) echo parallel ;;\n\
         pread) if [ $4 = 4096 ]; then exit 6; fi; if [ $4 = 8192 ]; then head -c $3 /dev/zero; exit 7; fi; head -c $3 /dev/zero ;; *) exit 2 ;; esac\n",
    );
    let mut srv = start(&["sh", s.to_str().unwrap()]);
    // 6: the connection is dropped.
    let out = py(
        &srv,
        "try:\n    h.pread(512, 4096)\n    print('OK')\nexcept nbd.Error as e:\n    print('ERR')\n",
    );
    assert_eq!(out.trim(), "ERR");
    // 7: this request succeeds; no more are read.
    let out = py(
        &srv,
        "h.pread(512, 8192)\ntry:\n    h.pread(512, 0)\n    print('MORE')\nexcept nbd.Error as e:\n    print('STOPPED')\n",
    );
    assert_eq!(out.trim(), "STOPPED");
    srv.health_check();
}

#[test]
fn signals_and_bad_output_fail_the_request_not_the_server() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-p05");
    let s = script(
        &dir,
        "bad.sh",
        "case \"$1\" in get_size) echo 1M ;; thread_model) echo parallel ;; can_extents) exit 0 ;;\n\
         pread) case $4 in\n\
           0) head -c $3 /dev/zero ;;\n\
           512) kill -SEGV $$ ;;\n\
           1024) head -c 100 /dev/zero ;;\n\
           1536) head -c $(($3 + 1)) /dev/zero ;;\n\
           2048) yes ;;\n\
           2560) head -c $3 /dev/zero; kill -KILL $$ ;;\n\
         esac ;;\n\
         extents) echo 'not an extent' ;;\n\
         *) exit 2 ;; esac\n",
    );
    let (mut srv, log) = start_logged_term(&[], &["sh", s.to_str().unwrap()]);
    py(
        &srv,
        r#"
fails("EIO", h.pread, 512, 512)
fails("EIO", h.pread, 512, 1024)
fails("EIO", h.pread, 512, 1536)
fails("EIO", h.pread, 512, 2048)
fails("EIO", h.pread, 512, 2560)
fails("EIO", h.block_status, 512, 0, lambda *a: 0)
assert h.pread(512, 0) == bytes(512)
"#,
    );
    let log = read(&log);
    for want in [
        "bad.sh: script terminated by signal 11",
        "expecting 512 bytes but received 100 bytes",
        "expecting 512 bytes but received 513 bytes",
        "bad.sh: the script printed too much on stdout",
        "bad.sh: script terminated by signal 9",
        "bad.sh: extents: cannot parse not an extent",
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    srv.health_check();
}

#[test]
fn unparsable_can_fua_fails_the_handshake_only() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("sh-fua");
    let s = script(
        &dir,
        "f.sh",
        "case \"$1\" in get_size) echo 1M ;; can_write) exit 0 ;; can_fua) echo sometimes ;; pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac\n",
    );
    let (mut srv, log) = start_logged_term(&["-r"], &["sh", s.to_str().unwrap()]);
    // With -r can_fua is never asked.
    srv.health_check();
    drop(srv);
    let (srv, log2) = start_logged_term(&[], &["sh", s.to_str().unwrap()]);
    let out = run("nbdinfo", &[&srv.uri()]);
    assert!(!out.status.success());
    assert!(read(&log2).contains("could not parse output from can_fua method: sometimes"), "{}", read(&log2));
    assert!(!read(&log).contains("can_fua"), "{}", read(&log));
}

#[test]
fn pwrite_that_does_not_read_stdin() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-p06");
    let s = script(
        &dir,
        "w.sh",
        "case \"$1\" in get_size) echo 64M ;; pread) head -c $3 /dev/zero ;; can_write) exit 0 ;;\n\
         pwrite) if [ $4 = 0 ]; then exit 0; else echo EIO did not read >&2; exit 1; fi ;; *) exit 2 ;; esac\n",
    );
    let (mut srv, log) = start_logged_term(&[], &["sh", s.to_str().unwrap()]);
    // nbdkit ≥ 1.36: EPIPE on stdin is ignored, the exit status decides.
    py(&srv, "h.pwrite(b'x' * (32 << 20), 0)\nfails('EIO', h.pwrite, b'x' * (32 << 20), 32 << 20)\n");
    let log = read(&log);
    assert!(log.contains("write: Broken pipe (ignored)"), "{log}");
    assert!(log.contains("w.sh: did not read"), "{log}");
    srv.health_check();
}

#[test]
fn big_requests_do_not_deadlock_the_pipes() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-big");
    let disk = dir.path("disk");
    std::fs::write(&disk, []).unwrap();
    // Reads its stdin after writing a lot on stderr, and the other way round.
    let s = script(
        &dir,
        "big.sh",
        &format!(
            "case \"$1\" in get_size) echo 128M ;; thread_model) echo parallel ;; can_write) exit 0 ;;\n\
             pread) head -c 1M /dev/zero | tr '\\0' e >&2; head -c $3 /dev/urandom | tee {d}.r ;;\n\
             pwrite) head -c 1M /dev/zero >&2; cat > {d}.w ;; *) exit 2 ;; esac\n",
            d = disk.display()
        ),
    );
    let srv = start(&["sh", s.to_str().unwrap()]);
    py(
        &srv,
        &format!(
            "d = h.pread(64 << 20, 0)\nassert len(d) == 64 << 20\nassert d == open('{d}.r', 'rb').read()\n\
             buf = os.urandom(64 << 20)\nh.pwrite(buf, 1 << 20)\nassert open('{d}.w', 'rb').read() == buf\n",
            d = disk.display()
        ),
    );
}

#[test]
fn parallel_scripts_run_at_once_and_serialized_ones_do_not() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-par");
    let log = dir.path("log");
    for (model, parallel) in [("parallel", true), ("serialize_requests", false), ("", false)] {
        let _ = std::fs::remove_file(&log);
        let s = script(
            &dir,
            "p.sh",
            &format!(
                "case \"$1\" in get_size) echo 1M ;; thread_model) [ -n '{model}' ] && echo {model} || exit 2 ;;\n\
                 pread) echo start >> {l}; sleep 0.3; echo end >> {l}; head -c $3 /dev/zero ;; *) exit 2 ;; esac\n",
                l = log.display()
            ),
        );
        let srv = start(&["sh", s.to_str().unwrap()]);
        py(
            &srv,
            "cmds = [h.aio_pread(nbd.Buffer(512), i * 512) for i in range(4)]\n\
             while h.aio_in_flight() > 0:\n    h.poll(-1)\n",
        );
        // Serialized scripts never overlap: start, end, start, end…
        let got = read(&log).replace('\n', " ");
        let overlapped = got.contains("start start");
        assert_eq!(overlapped, parallel, "{model:?}: {got}");
        assert_eq!(got.matches("end").count(), 4, "{got}");
    }
}

#[test]
fn a_hung_script_is_killed_when_the_client_goes() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-p08");
    let pids = dir.path("pids");
    // The third hangs after closing its stdout and stderr.
    for (model, close) in [("parallel", ""), ("serialize_all_requests", ""), ("parallel", "exec >/dev/null 2>&1;")] {
        let _ = std::fs::remove_file(&pids);
        let s = script(
            &dir,
            "h.sh",
            &format!(
                "case \"$1\" in get_size) echo 1M ;; thread_model) echo {model} ;;\n\
                 pread) if [ $4 = 0 ]; then head -c $3 /dev/zero; else {close} sleep 1000 & echo $$ $! >> {p}; wait; fi ;; *) exit 2 ;; esac\n",
                p = pids.display()
            ),
        );
        let mut srv = start(&["sh", s.to_str().unwrap()]);
        srv.health_check();
        let fds = settled_fds(srv.child.id());
        // A client sends a read that hangs, then goes away.
        let mut client = Command::new("nbdsh")
            .env("PATH", path_env())
            .args(["-u", &srv.uri(), "-c", "h.pread(512, 4096)"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while read(&pids).is_empty() {
            assert!(Instant::now() < deadline, "script never started");
            thread::sleep(Duration::from_millis(20));
        }
        // Meanwhile the server still serves others (parallel only).
        if model == "parallel" {
            srv.health_check();
        }
        client.kill().unwrap();
        client.wait().unwrap();
        let ids: Vec<u32> = read(&pids).split_whitespace().map(|p| p.parse().unwrap()).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The script and its child are gone, and reaped (no zombie).
        while ids.iter().any(|&p| running(p)) || Path::new(&format!("/proc/{}", ids[0])).exists() {
            assert!(Instant::now() < deadline, "{model}: {ids:?} still there (or not reaped)");
            thread::sleep(Duration::from_millis(20));
        }
        srv.health_check();
        // No descriptor left behind by the killed script's pipes.
        let after = settled_fds(srv.child.id());
        assert!(after <= fds, "{model}: {fds} descriptors before, {after} after");
    }
}

/// How many descriptors process `pid` has open, once closed connections
/// are gone (the same count twice, 100 ms apart).
fn settled_fds(pid: u32) -> usize {
    let count = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let mut last = count();
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let n = count();
        if n == last {
            return n;
        }
        last = n;
    }
    last
}

#[test]
fn a_hung_script_does_not_hold_up_sigterm() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-term");
    let pids = dir.path("pids");
    let s = script(
        &dir,
        "h.sh",
        &format!(
            "case \"$1\" in get_size) echo 1M ;; thread_model) echo parallel ;;\n\
             pread) sleep 1000 & echo $! >> {p}; wait ;; *) exit 2 ;; esac\n",
            p = pids.display()
        ),
    );
    let mut srv = start(&["sh", s.to_str().unwrap()]);
    let mut client = Command::new("nbdsh")
        .env("PATH", path_env())
        .args(["-u", &srv.uri(), "-c", "h.pread(512, 0)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while read(&pids).is_empty() {
        assert!(Instant::now() < deadline, "script never started");
        thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    // SAFETY-free: kill(1) of the server we started.
    run_ok("kill", &["-TERM", &srv.child.id().to_string()]);
    let st = srv.child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert_eq!(st.code(), Some(0));
    let pid: u32 = read(&pids).trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) {
        assert!(Instant::now() < deadline, "sleep {pid} survived");
        thread::sleep(Duration::from_millis(20));
    }
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn inline_script_tmpdir_and_no_leak_into_run() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-inline");
    let seen = dir.path("tmpdir");
    let body = format!(
        "case \"$1\" in\n  get_size) echo 1M ;;\n  pread) echo \"$tmpdir\" > {s}; head -c $3 /dev/zero ;;\n  *) exit 2 ;;\nesac\n",
        s = seen.display()
    );
    let mut child = Command::new(nbdkit_bin())
        .env("PATH", path_env())
        .args(["-U", "-", "sh", "-", "--run"])
        .arg("nbdsh -u \"$uri\" -c 'h.pread(512, 0)' && echo \"run tmpdir=[$tmpdir]\"")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("run tmpdir=[]"), "{stdout}");
    let t = read(&seen).trim().to_string();
    assert!(t.starts_with("/tmp/nbdkit"), "{t}");
    // The script was kept in $tmpdir, which is gone now.
    assert!(!Path::new(&t).exists(), "{t} left behind");
}

#[test]
fn tmpdir_is_removed_after_sigterm_and_dump_plugin() {
    let dir = TempDir::new("sh-tmp");
    let seen = dir.path("tmpdir");
    let s = script(
        &dir,
        "t.sh",
        &format!("case \"$1\" in load) echo \"$tmpdir\" > {s} ;; get_size) echo 1M ;; *) exit 2 ;; esac\n", s = seen.display()),
    );
    let mut srv = start(&["sh", s.to_str().unwrap()]);
    let t = read(&seen).trim().to_string();
    assert!(Path::new(&t).is_dir(), "{t}");
    run_ok("kill", &["-TERM", &srv.child.id().to_string()]);
    srv.child.wait().unwrap();
    assert!(!Path::new(&t).exists(), "{t} left behind");
    let out = run(nbdkit_bin().to_str().unwrap(), &["--dump-plugin", "sh", s.to_str().unwrap()]);
    assert!(out.status.success());
    let t2 = read(&seen).trim().to_string();
    assert_ne!(t, t2);
    assert!(!Path::new(&t2).exists(), "{t2} left behind");
}

#[test]
fn shebangless_scripts_run_with_bin_sh() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-nosb");
    let p = dir.path("plain");
    std::fs::write(&p, "case \"$1\" in get_size) echo 4K ;; pread) head -c $3 /dev/zero | tr '\\0' A ;; *) exit 2 ;; esac\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    let srv = start(&["sh", p.to_str().unwrap()]);
    py(&srv, "assert h.pread(4, 0) == b'AAAA'\nassert h.pread(4, 4) == b'AAAA'\n");
}

#[test]
fn config_magic_key_and_errors() {
    let dir = TempDir::new("sh-cfg");
    let log = dir.path("calls");
    let s = script(
        &dir,
        "c.sh",
        &format!(
            "printf '%s|' \"$@\" >> {log}; echo >> {log}\n\
             case \"$1\" in magic_config_key) echo file ;; config) [ \"$2\" = bad ] && {{ echo EINVAL no way >&2; exit 1; }}; exit 0 ;;\n\
             dump_plugin) echo mine=1; echo also=2 ;; thread_model) echo serialize_requests ;; get_size) echo 1M ;; *) exit 2 ;; esac\n",
            log = log.display()
        ),
    );
    let nbdkit = nbdkit_bin();
    let nb = nbdkit.to_str().unwrap();
    let out = run_ok(nb, &["--dump-plugin", "sh", s.to_str().unwrap(), "bare1", "k=v", "bare2"]);
    assert!(out.contains("\nmagic_config_key=script\n"), "{out}");
    assert!(out.contains("\nthread_model=serialize_requests\n"), "{out}");
    assert!(out.ends_with("has_cache=1\nmax_known_status=8\nmine=1\nalso=2\n"), "{out}");
    let calls = read(&log);
    assert!(calls.contains("load|\nmagic_config_key|\nconfig|file|bare1|\nconfig|k|v|\nconfig|file|bare2|\n"), "{calls}");
    assert!(calls.contains("unload|"), "{calls}");
    let out = run(nb, &["--dump-plugin", "sh", s.to_str().unwrap(), "bad=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("c.sh: no way"), "{:?}", out);
    // A script without config: parameters are an error.
    let s2 = script(&dir, "n.sh", "exit 2\n");
    let out = run(nb, &["--dump-plugin", "sh", s2.to_str().unwrap(), "x=1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("n.sh: this plugin does not need command line configuration"), "{:?}", out);
    let out = run(nb, &["--dump-plugin", "sh", s2.to_str().unwrap(), "bare"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("n.sh: expecting key=value on the command line but got: bare"), "{:?}", out);
    // No script, a missing script, one that is not executable.
    let out = run(nb, &["sh"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "nbdkit: error: missing script parameter\n");
    let out = run(nb, &["sh", "/nonexistent/x"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "nbdkit: error: realpath: /nonexistent/x: No such file or directory\n");
    let ne = dir.path("noexec");
    std::fs::write(&ne, "exit 0\n").unwrap();
    let out = run(nb, &["sh", ne.to_str().unwrap()]);
    let p = ne.display();
    assert_eq!(String::from_utf8_lossy(&out.stderr), format!("nbdkit: error: {p}: {p}: Permission denied\n"));
    let out = run_ok(nb, &["--dump-plugin", "sh"]);
    assert!(out.contains("\nthread_model=parallel\n") && out.ends_with("max_known_status=8\n"), "{out}");
}

#[test]
fn debug_lines_calling_and_completed() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("sh-dbg");
    let s = script(&dir, "d s.sh", "case \"$1\" in get_size) echo 1M ;; pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac\n");
    let (srv, log) = start_logged_term(&["-e", "a b"], &["sh", s.to_str().unwrap()]);
    run_ok("nbdinfo", &[&srv.uri_export("a%20b")]);
    let log = read(&log);
    let q = format!("\"{}\"", s.display());
    assert!(log.contains(&format!("debug: calling: {q} open false \"a b\" false\n")), "{log}");
    assert!(log.contains(&format!("debug: completed: {} open: status 2\n", s.display())), "{log}");
    assert!(log.contains(&format!("debug: calling: {q} get_size \"\"\n")), "{log}");
}

#[test]
fn help_and_no_script() {
    let out = run_ok(nbdkit_bin().to_str().unwrap(), &["sh", "--help"]);
    assert!(out.ends_with(
        "\nplugin: sh\n(built in)\nscript=<FILENAME>     (required) The shell script to run.\n\
         [other arguments may be used by the plugin that you load]\n"
    ), "{out}");
}

#[test]
fn a_script_cannot_see_the_servers_descriptors() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-fds");
    let fds = dir.path("fds");
    let s = script(
        &dir,
        "f.sh",
        &format!("case \"$1\" in get_size) echo 1M ;; pread) ls -l /proc/$$/fd > {f}; head -c $3 /dev/zero ;; *) exit 2 ;; esac\n", f = fds.display()),
    );
    let srv = start(&["sh", s.to_str().unwrap()]);
    py(&srv, "h.pread(512, 0)");
    // No socket, epoll or eventfd of the server (the test harness's own
    // inherited pipes may show up; the server adds none of its own).
    let listing = read(&fds);
    for bad in ["socket:", "anon_inode:", "/sock", "eventpoll", "eventfd"] {
        assert!(!listing.contains(bad), "{bad} leaked: {listing}");
    }
}

/// Connects to `srv` asking for `export`: `REFUSED` if the handshake
/// fails, else `CONNECTED` then `MORE` or `STOPPED` after one read.
fn connect_and_read(srv: &Server, export: &str) -> String {
    python_ok(&format!(
        "import nbd\nh = nbd.NBD()\nh.set_export_name({export:?})\n\
         try:\n    h.connect_unix({:?})\nexcept nbd.Error:\n    print('REFUSED')\n    raise SystemExit\n\
         print('CONNECTED')\ntry:\n    h.pread(512, 0)\n    print('MORE')\nexcept nbd.Error:\n    print('STOPPED')\n",
        srv.sock.to_str().unwrap()
    ))
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" ")
}

#[test]
fn exit_6_to_8_act_in_the_handshake_too() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-exit68h");
    // The export name says which negotiation call exits with which code;
    // open hands it on as the handle.
    let s = script(
        &dir,
        "d.sh",
        "case \"$1\" in\n\
         open) case \"$3\" in open*) exit ${3#open} ;; esac; echo \"$3\" ;;\n\
         get_size) echo 1M ;;\n\
         can_write|can_flush) case \"$2\" in $1*) exit ${2#$1} ;; esac; exit 0 ;;\n\
         pread) head -c $3 /dev/zero ;; pwrite) cat >/dev/null ;;\n\
         *) exit 2 ;; esac\n",
    );
    let mut srv = start(&["sh", s.to_str().unwrap()]);
    assert_eq!(connect_and_read(&srv, "plain"), "CONNECTED MORE");
    // 6: a hard disconnect, even though the call itself "succeeded".
    assert_eq!(connect_and_read(&srv, "open6"), "REFUSED");
    assert_eq!(connect_and_read(&srv, "can_flush6"), "REFUSED");
    // 7: the call succeeds (can_write true), but no request is read.
    assert_eq!(connect_and_read(&srv, "can_write7"), "CONNECTED STOPPED");
    assert_eq!(connect_and_read(&srv, "open7"), "CONNECTED STOPPED");
    // 8: an error, and a soft disconnect.
    assert_eq!(connect_and_read(&srv, "open8"), "REFUSED");
    srv.health_check();
}

#[test]
fn a_script_hung_in_the_negotiation_is_killed_when_the_client_goes() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("sh-p08h");
    let pids = dir.path("pids");
    let hang = format!("sleep 1000 & echo $$ $! >> {}; wait", pids.display());
    let s = script(
        &dir,
        "h.sh",
        &format!(
            "case \"$1\" in\n\
             open) if [ \"$3\" = open ]; then {hang}; fi; echo \"$3\" ;;\n\
             get_size) if [ \"$2\" = get_size ]; then {hang}; fi; echo 1M ;;\n\
             can_write) if [ \"$2\" = can_write ]; then {hang}; fi; exit 0 ;;\n\
             pread) head -c $3 /dev/zero ;; *) exit 2 ;; esac\n"
        ),
    );
    let mut srv = start(&["sh", s.to_str().unwrap()]);
    srv.health_check();
    for method in ["open", "get_size", "can_write"] {
        let _ = std::fs::remove_file(&pids);
        let mut client = Command::new("nbdsh")
            .env("PATH", path_env())
            .args(["-c", &format!("h.set_export_name({method:?}); h.connect_unix({:?})", srv.sock.to_str().unwrap())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while read(&pids).is_empty() {
            assert!(Instant::now() < deadline, "{method}: script never started");
            thread::sleep(Duration::from_millis(20));
        }
        client.kill().unwrap();
        client.wait().unwrap();
        let ids: Vec<u32> = read(&pids).split_whitespace().map(|p| p.parse().unwrap()).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The script and its child are gone (the server keeps running).
        while ids.iter().any(|&p| running(p)) {
            assert!(Instant::now() < deadline, "{method}: {ids:?} still running after the client left");
            thread::sleep(Duration::from_millis(20));
        }
        srv.health_check();
    }
}

/// A shutdown signal during start-up (here while `config_complete` runs)
/// waits until the server can stop cleanly: it exits 0 and `$tmpdir` is
/// removed, instead of dying by the signal's default action.
#[test]
fn sigterm_during_start_up_stops_cleanly() {
    let dir = TempDir::new("sh-early-term");
    let seen = dir.path("tmpdir");
    let s = script(
        &dir,
        "t.sh",
        &format!(
            "case \"$1\" in load) echo \"$tmpdir\" > {s} ;; config_complete) sleep 1 ;; get_size) echo 1M ;; *) exit 2 ;; esac\n",
            s = seen.display()
        ),
    );
    let sock = dir.path("sock");
    let mut child = std::process::Command::new(nbdkit_bin())
        .args(["-f", "-U", sock.to_str().unwrap(), "sh", s.to_str().unwrap()])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read_opt(&seen).is_none() {
        assert!(std::time::Instant::now() < deadline, "load never ran");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let t = read(&seen).trim().to_string();
    run_ok("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!Path::new(&t).exists(), "{t} left behind");
}

fn read_opt(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().filter(|s| s.ends_with('\n'))
}
