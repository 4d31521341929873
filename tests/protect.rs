//! The protect filter through real clients, side by side with Debian's
//! nbdkit: which writes are refused (EPERM, nbdkit's message), that a
//! refused write changes nothing, `-D protect.write=1`, the one
//! documented difference (contained ranges), and bad-input P15.

mod common;
mod filter_util;
use common::*;
use filter_util::*;

/// Runs `body` (Python, `h` connected, `fails` defined) against `srv`;
/// returns its stdout.
fn py(srv: &Server, body: &str) -> String {
    python_ok(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({:?})\nh.set_strict_mode(0)\n{PY_FAILS}{body}",
        srv.uri()
    ))
}

/// One line per write tried: "ok" or the errno.
const PROBES: &str = r#"
def probe(f, *args):
    try:
        f(*args)
        print("ok")
    except nbd.Error as e:
        print(e.errno)
probe(h.pwrite, b"x" * 10, 95)            # changes protected bytes
probe(h.pwrite, b"\0" * 5 + b"hello", 95)  # identical bytes
probe(h.pwrite, b"y" * 512, 1)             # one byte over the end of 0-511
probe(h.pwrite, b"y" * 512, 512)           # protected by ~1024-2047 too
probe(h.zero, 512, 0)                      # not all zero
probe(h.zero, 100, 200)                    # zero over zeroes
probe(h.trim, 100, 200)
probe(h.pwrite, b"z", 2048)                # protected by ~1024-2047
probe(h.pwrite, b"z" * 1024, 1024)         # inside the hole of ~1024-2047
probe(h.pwrite, b"z" * 1025, 1024)         # one byte over it
"#;

fn disk(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.path("disk.img");
    let mut d = vec![0u8; 1 << 20];
    d[100..105].copy_from_slice(b"hello");
    std::fs::write(&img, d).unwrap();
    img
}

#[test]
fn refuses_exactly_what_nbdkit_refuses() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let mut results = Vec::new();
    let mut files = Vec::new();
    for bin in [None, Some(REFERENCE)] {
        let dir = TempDir::new("protect");
        let img = disk(&dir);
        let args = ["--filter=protect", "file", img.to_str().unwrap(), "protect=0-511", "protect=~1024-2047"];
        let mut srv = start_logged(bin, &args);
        results.push(py(&srv, PROBES));
        assert!(wait_log(&srv, "error: protect filter prevented write to protected range 0-511"), "{}", log_of(&srv));
        assert!(wait_log(&srv, "protect filter prevented write to protected range ~1024-2047"));
        if bin.is_none() {
            srv.health_check();
        }
        drop(srv);
        files.push(std::fs::read(&img).unwrap());
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0].lines().collect::<Vec<_>>(),
               ["EPERM", "ok", "EPERM", "EPERM", "EPERM", "ok", "ok", "EPERM", "ok", "EPERM"]);
    assert_eq!(files[0], files[1]);
    assert_eq!(&files[0][100..105], b"hello");
}

#[test]
fn nbdinfo_matches_nbdkit() {
    let dir = TempDir::new("protect-info");
    let img = disk(&dir);
    same_as_reference(&["--filter=protect", "file", img.to_str().unwrap(), "protect=0-511"], |s| s);
    same_as_reference(&["-r", "--filter=protect", "file", img.to_str().unwrap(), "protect=~-"], |s| s);
}

#[test]
fn debug_flag_logs_the_checks() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("protect-debug");
    let img = disk(&dir);
    let srv = start_logged(None, &["-v", "-D", "protect.write=1", "--filter=protect", "file", img.to_str().unwrap(), "protect=0-511"]);
    py(&srv, "fails('EPERM', h.pwrite, b'x' * 10, 95)\nh.pwrite(b'x', 4096)");
    assert!(wait_log(&srv, "protect: checking protected region offset 95 length 10"), "{}", log_of(&srv));
    assert!(!log_of(&srv).contains("offset 4096"));
    // Without the flag, no such line.
    let srv = start_logged(None, &["-v", "--filter=protect", "file", img.to_str().unwrap(), "protect=0-511"]);
    py(&srv, "fails('EPERM', h.pwrite, b'x' * 10, 95)");
    assert!(wait_log(&srv, "prevented write"));
    assert!(!log_of(&srv).contains("checking protected region"));
}

/// The documented difference: nbdkit merges a range contained in another
/// to the inner range's end, leaving the rest of the outer one writable;
/// we keep the larger end.
#[test]
fn contained_ranges_stay_protected() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let probe = "try:\n    h.pwrite(b'x', 800)\n    print('ok')\nexcept nbd.Error as e:\n    print(e.errno)\n";
    let mut out = Vec::new();
    for bin in [None, Some(REFERENCE)] {
        let dir = TempDir::new("protect-merge");
        let img = disk(&dir);
        let srv = start_logged(bin, &["--filter=protect", "file", img.to_str().unwrap(), "protect=0-1023", "protect=256-511"]);
        out.push(py(&srv, probe));
    }
    assert_eq!(out, ["EPERM\n", "ok\n"]);
}

#[test]
fn bad_ranges_are_refused_at_start_up() {
    for (arg, msg) in [
        ("protect=5", "cannot parse range, missing '-': 5"),
        ("protect=5-1", "invalid range, end < start: 5-1"),
        ("protect=x-1", "range: "),
    ] {
        let o = std::process::Command::new(nbdkit_bin()).args(["--filter=protect", "null", "1M", arg]).output().unwrap();
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains(msg), "{arg}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

/// P15: a write overlapping a protected range by one byte fails with
/// EPERM and writes nothing, at either edge; the readonly filter refuses
/// every write.
#[test]
fn p15_one_byte_overlap_writes_nothing() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let dir = TempDir::new("protect-p15");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0x11u8; 1 << 20]).unwrap();
    let mut srv = Server::start(&["--filter=protect", "file", img.to_str().unwrap(), "protect=4096-8191"]);
    py(&srv, r#"
fails("EPERM", h.pwrite, b"\x22" * 4096, 1)
fails("EPERM", h.pwrite, b"\x22" * 65536, 8191)
fails("EPERM", h.zero, 65536, 8191)
fails("EPERM", h.trim, 4097, 0)
fails("EPERM", h.pwrite, b"\x22" * (1 << 20), 0)
h.pwrite(b"\x22" * 4096, 0)
h.pwrite(b"\x22" * 4096, 8192)
h.flush()
"#);
    let d = std::fs::read(&img).unwrap();
    assert!(d[..4096].iter().all(|&b| b == 0x22));
    assert!(d[4096..8192].iter().all(|&b| b == 0x11));
    assert!(d[8192..12288].iter().all(|&b| b == 0x22));
    assert!(d[12288..].iter().all(|&b| b == 0x11));
    srv.health_check();

    let mut ro = Server::start(&["--filter=readonly", "file", img.to_str().unwrap()]);
    py(&ro, "fails('EPERM', h.pwrite, b'x', 0)\nfails('EPERM', h.zero, 1, 0)\nfails('EPERM', h.trim, 1, 0)");
    assert_eq!(std::fs::read(&img).unwrap(), d);
    ro.health_check();
}
