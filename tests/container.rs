//! The container image's promise without a container engine: the binary
//! runs in an empty root directory (user namespace + chroot, as
//! `FROM scratch` with `USER 65534` gives it), with nothing but `/nbdkit`,
//! `/tmp` and the served file, and serves a memory disk and that file to
//! nbdinfo and nbdcopy running outside. With the static build
//! (`NBDKIT_BIN=…/x86_64-unknown-linux-musl/release/nbdkit`, as
//! scripts/test runs it) the root holds nothing else; a dynamically linked
//! test binary gets its shared libraries copied in, and says so.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Is `bin` statically linked?
fn is_static(bin: &Path) -> bool {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.contains("not a dynamic executable") || text.contains("statically linked")
}

/// Copies what a dynamic binary needs (ld.so and its libraries) into `root`.
fn copy_libs(bin: &Path, root: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let mut copied = Vec::new();
    for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if word.starts_with('/') {
            let dst = root.join(word.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(word, &dst).unwrap();
            copied.push(PathBuf::from(word));
        }
    }
    copied
}

struct Jail {
    dir: TempDir,
    extra: Vec<PathBuf>,
}

fn jail() -> Jail {
    let dir = TempDir::new("emptyroot");
    let root = &dir.0;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = nbdkit_bin();
    std::fs::copy(&bin, root.join("nbdkit")).unwrap();
    std::fs::create_dir(root.join("tmp")).unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let disk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(root.join("disk.img"), disk).unwrap();
    std::fs::set_permissions(root.join("disk.img"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let extra = if is_static(&bin) { Vec::new() } else { copy_libs(&bin, root) };
    if std::env::var_os("NBDKIT_BIN").is_some() && std::env::var_os("NBDKIT_TEST_STRICT").is_some() {
        assert!(extra.is_empty(), "NBDKIT_BIN {bin:?} is not static");
    }
    if !extra.is_empty() {
        eprintln!("note: {bin:?} is dynamic; copied into the root: {extra:?}");
    }
    Jail { dir, extra }
}

/// Runs `/nbdkit ARGS` inside the root as uid/gid 65534 in a user namespace.
fn spawn_in(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--map-user=65534", "--map-group=65534"]).arg(format!("--root={}", root.display()));
    c.arg("--wd=/").arg("/nbdkit").args(args).env_clear().stdin(Stdio::null());
    c
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(root: &Path, sock_in_root: &str, args: &[&str]) -> (Running, PathBuf) {
    let mut full = vec!["-f", "-U", sock_in_root];
    full.extend_from_slice(args);
    let mut child = Running(spawn_in(root, &full).spawn().expect("unshare"));
    let sock = root.join(sock_in_root.trim_start_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("nbdkit {args:?} in the empty root exited: {st}");
        }
        assert!(Instant::now() < deadline, "no socket {sock:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock)
}

#[test]
fn serves_memory_and_file_from_an_empty_root() {
    require!("unshare", "--version");
    require!("nbdinfo", "--version");
    require!("nbdcopy", "--version");
    let j = jail();
    let root = &j.dir.0;
    let mut entries: Vec<String> =
        std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    entries.sort();
    if j.extra.is_empty() {
        assert_eq!(entries, ["disk.img", "nbdkit", "tmp"]);
    }

    // The manuals come with the binary.
    let out = spawn_in(root, &["--man", "memory"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("# nbdkit-memory-plugin(1)"));
    let out = spawn_in(root, &["--version"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("nbdkit "), "{out:?}");

    let (_mem, msock) = serve(root, "/tmp/mem.sock", &["memory", "3M"]);
    let info = run_ok("nbdinfo", &["--size", &format!("nbd+unix:///?socket={}", msock.display())]);
    assert_eq!(info.trim(), "3145728");

    let (_file, fsock) = serve(root, "/tmp/file.sock", &["-r", "file", "/disk.img"]);
    let copy = j.dir.path("copy.img");
    let uri = format!("nbd+unix:///?socket={}", fsock.display());
    run_ok("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(root.join("disk.img")).unwrap());
    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains("is_read_only: true"), "{info}");
}
