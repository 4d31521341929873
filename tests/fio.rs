//! fio's nbd engine against the server: a random-write job with crc32c
//! verification must write and read back every block, on memory and on a
//! file; and the same job must fail on a disk that drops its writes.

mod common;
use common::*;

use std::fs::File;

/// `io_bytes` of the `read` and `write` sections of fio's JSON output.
fn io_bytes(json: &str) -> (u64, u64) {
    let get = |section: &str| -> u64 {
        let at = json
            .find(&format!("\"{section}\" : {{"))
            .unwrap_or_else(|| panic!("no {section} in {json}"));
        let rest = &json[at..];
        let v = rest.find("\"io_bytes\" : ").map(|i| &rest[i + 13..]).unwrap();
        v[..v.find(',').unwrap()].trim().parse().unwrap()
    };
    (get("read"), get("write"))
}

/// A 16 MiB random-write job with 4 KiB blocks, 8 in flight, verified
/// with crc32c after the write phase.
fn verify_job(srv: &Server) -> std::process::Output {
    run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_state_save=0", // no state file in the working directory on failure
            "--output-format=json",
        ],
    )
}

fn assert_verified(srv: &Server) {
    let o = verify_job(srv);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "fio failed: {}\n{out}", String::from_utf8_lossy(&o.stderr));
    // Every block was written, then read back and checked.
    assert_eq!(io_bytes(&out), (16 << 20, 16 << 20), "{out}");
}

#[test]
fn verify_job_on_memory() {
    require!("fio", "--version");
    let mut srv = Server::start(&["memory", "16M"]);
    assert_verified(&srv);
    srv.health_check();
}

#[test]
fn verify_job_on_a_file() {
    require!("fio", "--version");
    let dir = TempDir::new("fio");
    let img = dir.path("disk.img");
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let srv = Server::start(&["file", img.to_str().unwrap()]);
    assert_verified(&srv);
    // fio wrote its verification headers into the file itself.
    assert!(std::fs::read(&img).unwrap().chunks(4096).all(|b| b.iter().any(|&x| x != 0)));
}

#[test]
fn verify_job_fails_on_a_disk_that_drops_writes() {
    require!("fio", "--version");
    // The control: the null plugin discards writes, so verification fails.
    let srv = Server::start(&["null", "16M"]);
    let o = verify_job(&srv);
    assert!(!o.status.success(), "fio verified a disk that drops writes");
    assert!(String::from_utf8_lossy(&o.stderr).contains("verify: bad magic header"), "{o:?}");
}
