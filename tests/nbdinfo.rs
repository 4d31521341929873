//! nbdinfo against the server: `--size`, `--list`, `--map [--totals]`,
//! `--can`/`--is`, `--json`, and parity of `--json` (and `--map`) with
//! Debian's C nbdkit run with the same plugin and arguments.

mod common;
use common::*;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const M: u64 = 1024 * 1024;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The value of the first `"key": value` line of nbdinfo's JSON (which
/// prints one field per line), without quotes or the trailing comma.
fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\": ");
    let line = json
        .lines()
        .find_map(|l| l.trim().strip_prefix(&pat))
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    line.trim_end_matches(',').trim_matches('"')
}

/// `nbdinfo --can WHAT` / `--is WHAT`: exit 0 is yes, 2 is no, anything
/// else (1: error) fails the test.
fn ask(flag: &str, what: &str, uri: &str) -> bool {
    let o = run("nbdinfo", &[flag, what, uri]);
    match o.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {flag} {what} failed: {o:?}"),
    }
}

#[test]
fn size_is_exact_for_each_plugin() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("nbdinfo");
    let odd = dir.path("odd.img");
    File::create(&odd).unwrap().write_all(&[7; 12345]).unwrap();
    for (args, size) in [
        (vec!["memory", "1M"], "1048576"),
        (vec!["null", "1T"], "1099511627776"),
        (vec!["null", "size=1"], "1"),
        (vec!["file", s(&odd)], "12345"),
    ] {
        let srv = Server::start(&args);
        assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri()]).trim(), size, "{args:?}");
    }
}

#[test]
fn list_shows_the_regular_files_of_a_dir_export() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("nbdinfo");
    for (name, size) in [("a", M), ("b", 2 * M), ("c.img", 3 * M)] {
        File::create(dir.path(name)).unwrap().set_len(size).unwrap();
    }
    std::fs::create_dir(dir.path("subdir")).unwrap(); // not an export
    let srv = Server::start(&["file", &format!("dir={}", dir.0.display())]);
    let json = run_ok("nbdinfo", &["--list", "--json", &srv.uri()]);
    let mut exports: Vec<(String, u64)> = json
        .split("\"export-name\": ")
        .skip(1)
        .map(|e| (e.split('"').nth(1).unwrap().to_string(), field(e, "export-size").parse().unwrap()))
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        [("a".to_string(), M), ("b".to_string(), 2 * M), ("c.img".to_string(), 3 * M)],
        "{json}"
    );
    // Each listed export is reachable by its name.
    assert_eq!(run_ok("nbdinfo", &["--size", &srv.uri_export("c.img")]).trim(), (3 * M).to_string());
    // The plain listing names them too.
    let text = run_ok("nbdinfo", &["--list", &srv.uri()]);
    for name in ["export=\"a\":", "export=\"b\":", "export=\"c.img\":"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(!text.contains("subdir"), "{text}");
}

#[test]
fn list_of_a_memory_disk_is_the_one_default_export() {
    require!("nbdinfo", "--version");
    let srv = Server::start(&["memory", "1M"]);
    let json = run_ok("nbdinfo", &["--list", "--json", &srv.uri()]);
    assert_eq!(json.matches("\"export-name\"").count(), 1, "{json}");
    assert_eq!(field(&json, "export-name"), "");
    assert_eq!(field(&json, "export-size"), "1048576");
}

#[test]
fn map_and_totals_of_a_partly_written_memory_disk() {
    require!("nbdinfo", "--version");
    require!("nbdsh", "--version");
    let srv = Server::start(&["memory", "4M"]);
    nbdsh_ok(&srv, "h.pwrite(b'x' * 65536, 1048576)\nh.pwrite(b'y' * 10, 3145828)");
    let map = run_ok("nbdinfo", &["--map", &srv.uri()]);
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            ["0", "1048576", "3", "hole,zero"],
            ["1048576", "65536", "0", "data"],
            ["1114112", "2031616", "3", "hole,zero"],
            ["3145728", "32768", "0", "data"], // 10 bytes allocate a 32 KiB page
            ["3178496", "1015808", "3", "hole,zero"],
        ],
        "{map}"
    );
    let totals = run_ok("nbdinfo", &["--map", "--totals", &srv.uri()]);
    let rows: Vec<Vec<&str>> = totals.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [["98304", "2.3%", "0", "data"], ["4096000", "97.7%", "3", "hole,zero"]],
        "{totals}"
    );
    let json = run_ok("nbdinfo", &["--map", "--totals", "--json", &srv.uri()]);
    assert!(json.contains("\"size\": 98304,") && json.contains("\"size\": 4096000,"), "{json}");
}

#[test]
fn map_of_a_sparse_file() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("nbdinfo");
    let img = dir.path("sparse.img");
    let f = File::create(&img).unwrap();
    f.set_len(2 * M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1; 8192], M).unwrap();
    drop(f);
    let srv = Server::start(&["file", s(&img)]);
    let map = run_ok("nbdinfo", &["--map", &srv.uri()]);
    let rows: Vec<Vec<&str>> = map.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            ["0", "1048576", "3", "hole,zero"],
            ["1048576", "8192", "0", "data"],
            ["1056768", "1040384", "3", "hole,zero"]
        ],
        "{map}"
    );
}

/// Flags asked with `--can`, in the order of the expectation arrays.
const CAN: [&str; 9] = ["write", "trim", "zero", "fua", "flush", "cache", "fast-zero", "multi-conn", "df"];

#[test]
fn can_and_is_follow_the_plugin_and_read_only_mode() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("nbdinfo");
    let img = dir.path("disk.img");
    File::create(&img).unwrap().set_len(M).unwrap();
    let img = s(&img);
    const T: bool = true;
    const F: bool = false;
    // A read-only export keeps flush, cache, multi-conn and df (as C nbdkit does).
    let ro = [F, F, F, F, T, T, F, T, T];
    // (server options, plugin and arguments, --can CAN, --is read-only)
    type Case<'a> = (&'a [&'a str], &'a [&'a str], [bool; 9], bool);
    let cases: &[Case] = &[
        (&[], &["memory", "1M"], [T; 9], F),
        (&["-r"], &["memory", "1M"], ro, T),
        (&[], &["--filter=readonly", "memory", "1M"], ro, T),
        (&[], &["null", "1M"], [T; 9], F),
        (&["-r"], &["null", "1M"], ro, T),
        // A regular file cannot zero faster than writing.
        (&[], &["file", img], [T, T, T, T, T, T, F, T, T], F),
        (&["-r"], &["file", img], ro, T),
        (&[], &["--filter=readonly", "file", img], ro, T),
    ];
    for (opts, args, can, readonly) in cases {
        let srv = Server::start_with(opts, args);
        let uri = srv.uri();
        let got: Vec<bool> = CAN.iter().map(|w| ask("--can", w, &uri)).collect();
        assert_eq!(got, can, "--can {CAN:?} for {opts:?} {args:?}");
        assert_eq!(ask("--is", "read-only", &uri), *readonly, "--is read-only for {opts:?} {args:?}");
        assert!(!ask("--is", "rotational", &uri));
        assert!(ask("--can", "connect", &uri));
    }
}

#[test]
fn json_describes_the_export() {
    require!("nbdinfo", "--version");
    let srv = Server::start(&["memory", "1M"]);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    for (key, want) in [
        ("protocol", "newstyle-fixed"),
        ("TLS", "false"),
        ("structured", "true"),
        ("export-name", ""),
        ("uri", &srv.uri()),
        ("is_rotational", "false"),
        ("is_read_only", "false"),
        ("can_cache", "true"),
        ("can_df", "true"),
        ("can_fast_zero", "true"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_multi_conn", "true"),
        ("can_trim", "true"),
        ("can_zero", "true"),
        // nbdkit ≥ 1.38's memory plugin: minimum 1, preferred = the sparse
        // allocator's 32 KiB page, maximum = the 64 MiB request limit.
        ("block_size_minimum", "1"),
        ("block_size_preferred", "32768"),
        ("block_size_maximum", "67108864"),
        ("export-size", "1048576"),
        ("export-size-str", "1M"),
    ] {
        assert_eq!(field(&json, key), want, "{key} in {json}");
    }
    assert!(json.contains("\"contexts\": [\n\t\t\"base:allocation\"\n\t]"), "{json}");
}

#[test]
fn json_shows_read_only_oldstyle_and_no_structured_replies() {
    require!("nbdinfo", "--version");
    let srv = Server::start_with(&["-r"], &["memory", "1M"]);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    for (key, want) in [
        ("is_read_only", "true"),
        ("can_trim", "false"),
        ("can_zero", "false"),
        ("can_fua", "false"),
        ("can_flush", "true"),
    ] {
        assert_eq!(field(&json, key), want, "-r: {key} in {json}");
    }
    drop(srv);

    let srv = Server::start_with(&["-o"], &["memory", "1M"]);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    assert_eq!(field(&json, "protocol"), "oldstyle", "{json}");
    assert_eq!(field(&json, "structured"), "false", "{json}");
    assert_eq!(field(&json, "export-size"), "1048576", "{json}");
    drop(srv);

    let srv = Server::start_with(&["--no-sr"], &["memory", "1M"]);
    let json = run_ok("nbdinfo", &["--json", &srv.uri()]);
    assert_eq!(field(&json, "protocol"), "newstyle-fixed", "{json}");
    assert_eq!(field(&json, "structured"), "false", "{json}");
    assert_eq!(field(&json, "can_df"), "false", "{json}"); // DF needs structured replies
    assert!(!json.contains("base:allocation"), "{json}");
}

// ---- Parity with Debian's C nbdkit ----

/// Debian's C nbdkit (1.32), the reference. Debian installs it as
/// /usr/bin/nbdkit (/usr/sbin is checked first, as nbdkit's docs place
/// it there). Missing: skip, or fail under NBDKIT_TEST_STRICT.
fn reference_nbdkit() -> Option<PathBuf> {
    let found = ["/usr/sbin/nbdkit", "/usr/bin/nbdkit"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists() && *p != nbdkit_bin() && available(s(p), &["--version"]));
    if found.is_none() {
        if std::env::var_os("NBDKIT_TEST_STRICT").is_some() {
            panic!("the reference C nbdkit (/usr/sbin/nbdkit or /usr/bin/nbdkit) is required (NBDKIT_TEST_STRICT is set)");
        }
        eprintln!("SKIP: reference C nbdkit not available");
    }
    found
}

/// Starts the reference nbdkit like `Server::start_with` starts ours.
fn start_reference(bin: &Path, opts: &[&str], args: &[&str]) -> Server {
    let dir = TempDir::new("ref");
    let sock = dir.path("sock");
    let child = Command::new(bin)
        .args(["-f", "-U"])
        .arg(&sock)
        .args(opts)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut srv = Server { child, sock, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !srv.sock.exists() {
        assert!(srv.alive(), "reference nbdkit {opts:?} {args:?} exited early");
        assert!(Instant::now() < deadline, "reference nbdkit did not create {:?}", srv.sock);
        thread::sleep(Duration::from_millis(10));
    }
    srv
}

/// `nbdinfo ARGS` against both servers, minus the lines naming the socket
/// and any line containing one of `skip`.
fn both(reference: &Path, opts: &[&str], args: &[&str], nbdinfo: &[&str], skip: &[&str]) -> (String, String) {
    let ours = Server::start_with(opts, args);
    let theirs = start_reference(reference, opts, args);
    let out = |srv: &Server| {
        let mut a = nbdinfo.to_vec();
        let uri = srv.uri();
        a.push(&uri);
        run_ok("nbdinfo", &a)
            .lines()
            .filter(|l| !l.contains("\"uri\":") && !skip.iter().any(|k| l.contains(k)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    (out(&ours), out(&theirs))
}

#[test]
fn json_matches_the_c_nbdkit_for_null() {
    require!("nbdinfo", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    for opts in [&[][..], &["-r"], &["-o"], &["--no-sr"]] {
        let (ours, theirs) = both(&reference, opts, &["null", "1M"], &["--json"], &[]);
        assert_eq!(ours, theirs, "null 1M with {opts:?}");
        assert!(ours.contains("\"export-size\": 1048576"), "{ours}");
    }
}

#[test]
fn json_matches_the_c_nbdkit_for_file() {
    require!("nbdinfo", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    let dir = TempDir::new("parity");
    let img = dir.path("disk.img");
    File::create(&img).unwrap().set_len(M).unwrap();
    for opts in [&[][..], &["-r"], &["-o"], &["--no-sr"]] {
        let (ours, theirs) = both(&reference, opts, &["file", s(&img)], &["--json"], &[]);
        assert_eq!(ours, theirs, "file with {opts:?}");
        assert!(ours.contains("\"export-size\": 1048576"), "{ours}");
    }
}

#[test]
fn json_matches_the_c_nbdkit_for_memory_but_block_sizes() {
    require!("nbdinfo", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    // nbdkit 1.38 gave the memory plugin a .block_size callback (minimum 1,
    // preferred 32 KiB, the sparse allocator's page); 1.32 has none, so
    // nbdinfo prints no block_size_* fields for it. We follow 1.44.
    for opts in [&[][..], &["-r"], &["-o"], &["--no-sr"]] {
        let (ours, theirs) = both(&reference, opts, &["memory", "1M"], &["--json"], &["\"block_size_"]);
        assert_eq!(ours, theirs, "memory 1M with {opts:?}");
        assert!(ours.contains("\"export-size\": 1048576"), "{ours}");
    }
}

#[test]
fn list_and_map_match_the_c_nbdkit_for_file() {
    require!("nbdinfo", "--version");
    let Some(reference) = reference_nbdkit() else { return };
    let dir = TempDir::new("parity");
    for (name, size) in [("a", M), ("b.img", 2 * M)] {
        File::create(dir.path(name)).unwrap().set_len(size).unwrap();
    }
    let f = File::options().write(true).open(dir.path("b.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9; 65536], M / 2).unwrap();
    drop(f);
    let (ours, theirs) = both(
        &reference,
        &[],
        &["file", &format!("dir={}", dir.0.display())],
        &["--list", "--json"],
        &[],
    );
    assert_eq!(ours, theirs);
    assert!(ours.contains("\"export-name\": \"b.img\""), "{ours}");
    let (ours, theirs) = both(&reference, &[], &["file", s(&dir.path("b.img"))], &["--map"], &[]);
    assert_eq!(ours, theirs);
    assert!(ours.contains("data"), "{ours}");
}
