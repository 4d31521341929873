//! A short run of scripts/soak (10 s): random reads, writes, trims,
//! zeroes and flushes from 4 libnbd connections through the error (10%)
//! and delay (1 ms) filters, failed operations retried, every read and
//! finally every byte of the export checked against a model. The full
//! soak is `scripts/soak [SECONDS]` (default 60).

mod common;

use std::process::Command;

use common::*;

#[test]
fn soak_10s() {
    require!("/usr/bin/python3", "-c", "import nbd");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak");
    let out = Command::new(script)
        .env("SOAK_SECONDS", "10")
        .env("NBDKIT_BIN", nbdkit_bin())
        .env("PATH", path_env())
        .output()
        .expect("cannot run scripts/soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "soak failed: {}", out.status);
    assert!(stdout.contains("injected errors retried"), "no summary from the soak");
    assert!(!stdout.contains(" 0 injected errors"), "the error filter injected nothing");
}
