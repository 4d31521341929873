//! The first thing that must work: a memory disk answers nbdinfo and
//! keeps what qemu-io writes.

mod common;
use common::*;

#[test]
fn nbdinfo_reports_the_memory_disk_size() {
    require!("nbdinfo", "--version");
    let srv = Server::start(&["memory", "size=1M"]);
    assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri()]).trim(), "1048576");
}

#[test]
fn qemu_io_pattern_survives() {
    require!("qemu-io", "--version");
    let mut srv = Server::start(&["memory", "64M"]);
    let out = run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0xa5 4096 1M", "-c", "read -P 0xa5 4096 1M", "-c", "read -P 0 0 4096", &srv.uri()]);
    assert!(!out.contains("fail") && !out.contains("mismatch"), "{out}");
    srv.health_check();
}
