//! The eval plugin through real clients: scripts given as METHOD='…',
//! the synthesized can_* answers, `missing=`, config routing, the 1.44
//! get_size check, the errors of nbdkit-eval-plugin, and bad-input T21.

mod common;
use common::*;


fn start(args: &[&str]) -> Term {
    Term(Server::start(args))
}


fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn nbdkit(args: &[&str]) -> std::process::Output {
    run(nbdkit_bin().to_str().unwrap(), args)
}

fn py(srv: &Server, body: &str) -> String {
    python_ok(&format!(
        "import nbd\nh = nbd.NBD()\nh.set_strict_mode(0)\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.connect_uri({:?})\n{PY_FAILS}{body}",
        srv.uri()
    ))
}

#[test]
fn data_methods_bring_their_can_answers() {
    require!("nbdinfo", "--version");
    let mut srv = start(&[
        "eval",
        "get_size=echo 64K",
        "pread=head -c $3 /dev/zero",
        "pwrite=cat >/dev/null",
        "flush=exit 0",
        "trim=exit 0",
        "zero=exit 0",
        "extents=echo 0 $3 hole,zero",
        "cache=exit 0",
    ]);
    let info = run_ok("nbdinfo", &[&srv.uri()]);
    for want in ["is_read_only: false", "can_flush: true", "can_trim: true", "can_zero: true", "can_cache: true"] {
        assert!(info.contains(want), "{want} not in {info}");
    }
    // can_fua: emulated through flush; fast zero not (zero is native).
    assert!(info.contains("can_fua: true") && info.contains("can_fast_zero: false"), "{info}");
    let map = run_ok("nbdinfo", &["--map", &srv.uri()]);
    assert!(map.contains("hole,zero"), "{map}");
    srv.health_check();
    // An explicit can_ method wins over the synthesized one.
    let srv = start(&["eval", "get_size=echo 64K", "pread=head -c $3 /dev/zero", "pwrite=cat >/dev/null", "can_write=exit 3"]);
    let info = run_ok("nbdinfo", &[&srv.uri()]);
    assert!(info.contains("is_read_only: true"), "{info}");
    // Without data methods: nothing.
    let srv = start(&["eval", "get_size=echo 64K", "pread=head -c $3 /dev/zero"]);
    let info = run_ok("nbdinfo", &[&srv.uri()]);
    assert!(info.contains("is_read_only: true") && info.contains("can_flush: false"), "{info}");
}

#[test]
fn missing_script_runs_for_every_undefined_method() {
    require!("nbdinfo", "--version");
    let dir = TempDir::new("ev-miss");
    let log = dir.path("calls");
    let missing = format!("echo \"in missing: $1 ($0)\" >> {}; exit 2", log.display());
    let srv = start(&["eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero", &format!("missing={missing}")]);
    run_ok("nbdinfo", &[&srv.uri()]);
    let calls = read(&log);
    for m in ["config_complete", "thread_model", "get_ready", "open", "can_write", "can_cache"] {
        assert!(calls.contains(&format!("in missing: {m} (/tmp/nbdkit")), "{m} not in {calls}");
    }
    assert!(calls.contains("/missing)"), "{calls}");
    assert!(!calls.contains("in missing: get_size") && !calls.contains("in missing: pread"), "{calls}");
}

#[test]
fn unknown_keys_go_to_the_config_script() {
    let dir = TempDir::new("ev-cfg");
    let log = dir.path("cfg");
    let config = format!("echo \"$1 $2=$3 $0\" >> {}", log.display());
    let out = nbdkit(&["--dump-plugin", "eval", "get_size=echo 1", &format!("config={config}"), "foo=bar", "baz="]);
    assert!(out.status.success(), "{:?}", out);
    let got = read(&log);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 2, "{got}");
    assert!(lines[0].starts_with("config foo=bar /tmp/nbdkit") && lines[0].ends_with("/config"), "{got}");
    assert!(lines[1].starts_with("config baz= "), "{got}");
    // A bare first word is script=…, which only a config script can take.
    let out = nbdkit(&["--dump-plugin", "eval", "bare", "get_size=echo 1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("callback 'script' is unknown"), "{:?}", out);
    // No config script: nbdkit's message, naming the missing script.
    let out = nbdkit(&["eval", "foo=bar", "get_size=echo 1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("nbdkit: error: /tmp/nbdkit") && err.ends_with(
        "/missing: callback 'foo' is unknown, and there is no 'config' callback to handle it\n"), "{err}");
    // A config script that fails stops the server from starting.
    let out = nbdkit(&["eval", "get_size=echo 1", "config=echo EINVAL bad key $2 >&2; exit 1", "k=v"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/config: bad key k\n"), "{:?}", out);
}

#[test]
fn errors_of_the_command_line() {
    let out = nbdkit(&["eval", "get_size=echo 1", "get_size=echo 2"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "nbdkit: error: method get_size defined more than once on the command line\n");
    let out = nbdkit(&["eval", "missing=exit 2", "missing=exit 2", "get_size=echo 1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("method missing defined more than once"), "{:?}", out);
    // nbdkit ≥ 1.38: get_size is required (missing= does not count)…
    let out = nbdkit(&["eval", "pread=exit 0", "missing=echo 1M"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "nbdkit: error: 'get_size' method is required\n");
    assert_eq!(out.status.code(), Some(1));
    // … but not for --dump-plugin, which does not complete the configuration.
    let out = nbdkit(&["--dump-plugin", "eval", "pread=exit 0"]);
    assert!(out.status.success(), "{:?}", out);
    // No temporary directory is left behind by any of these.
}

#[test]
fn dump_plugin_thread_model_and_help() {
    let out = String::from_utf8(nbdkit(&["--dump-plugin", "eval", "get_size=echo 1", "dump_plugin=echo a=1; echo b=2"]).stdout).unwrap();
    assert!(out.contains("\nname=eval\n") && !out.contains("magic_config_key"), "{out}");
    assert!(out.contains("\nthread_model=serialize_all_requests\n"), "{out}");
    assert!(out.ends_with("has_cache=1\nmax_known_status=8\na=1\nb=2\n"), "{out}");
    // Exit 4 (shut the server down) from dump_plugin is a success, and
    // does not kill the process before the server watches signals.
    let o = nbdkit(&["--dump-plugin", "eval", "dump_plugin=echo x=1; exit 4"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).ends_with("max_known_status=8\nx=1\n"), "{o:?}");
    let out = String::from_utf8(nbdkit(&["--dump-plugin", "eval", "thread_model=echo PARALLEL"]).stdout).unwrap();
    assert!(out.contains("\nthread_model=parallel\n"), "{out}");
    let out = String::from_utf8(nbdkit(&["--dump-plugin", "eval", "thread_model=echo serialize-requests"]).stdout).unwrap();
    assert!(out.contains("\nthread_model=serialize_requests\n"), "{out}");
    let out = String::from_utf8(nbdkit(&["eval", "--help"]).stdout).unwrap();
    assert!(out.ends_with("\nplugin: eval\n(built in)\nget_size=' SCRIPT '\npread=' SCRIPT '\n[etc]\n"), "{out}");
}

#[test]
fn open_errors_reach_the_log_with_the_script_name() {
    require!("qemu-img", "--version");
    let (mut srv, log) = start_logged_term(&[], &[
        "eval",
        "get_size=echo 1M",
        "pread=head -c $3 /dev/zero",
        "open=if [ \"$3\" = bad ]; then echo EPERM Go Away >&2; exit 1; fi",
    ]);
    let out = run("qemu-img", &["info", &srv.uri_export("bad")]);
    assert!(!out.status.success());
    let log = read(&log);
    assert!(log.contains("/open: Go Away\n"), "{log}");
    srv.health_check();
}

#[test]
fn scripts_with_a_shebang_are_run_by_it_and_see_their_arguments() {
    require!("nbdsh", "--version");
    let dir = TempDir::new("ev-args");
    let log = dir.path("args");
    let srv = start(&[
        "eval",
        "get_size=#!/bin/bash\n[[ 1 == 1 ]] && echo 8K",
        &format!("pread=echo \"$0|$1|$2|$3|$4\" >> {}; head -c $3 /dev/zero", log.display()),
        "open=echo myhandle",
    ]);
    py(&srv, "assert h.get_size() == 8192\nh.pread(512, 1024)\n");
    let got = read(&log);
    assert!(got.starts_with("/tmp/nbdkit") && got.ends_with("/pread|pread|myhandle|512|1024\n"), "{got}");
}

#[test]
fn t21_write_with_fua_when_fua_is_not_advertised() {
    require!("nbdsh", "--version");
    let mut srv = start(&[
        "eval",
        "get_size=echo 1M",
        "pread=head -c $3 /dev/zero",
        "pwrite=cat >/dev/null",
        "flush=exit 0",
        "can_fua=echo none",
    ]);
    py(&srv, "assert not h.can_fua()\nfails('EINVAL', h.pwrite, b'x' * 512, 0, nbd.CMD_FLAG_FUA)\nh.pwrite(b'x' * 512, 0)\n");
    srv.health_check();
}

#[test]
fn a_crashing_method_fails_its_request_only() {
    require!("nbdsh", "--version");
    let mut srv = start(&[
        "eval",
        "get_size=echo 1M",
        "thread_model=echo parallel",
        "pread=if [ $4 = 0 ]; then head -c $3 /dev/zero; else kill -SEGV $$; fi",
    ]);
    py(&srv, "fails('EIO', h.pread, 512, 4096)\nassert h.pread(512, 0) == bytes(512)\n");
    srv.health_check();
}

#[test]
fn block_status_near_4g_returns_one_clamped_extent() {
    require!("nbdsh", "--version");
    // nbdkit 1.44's test-eval-extents.sh (CVE-2025-47711).
    let srv = start(&[
        "eval",
        "get_size=echo 5G",
        "pread=head -c $3 /dev/zero",
        "extents=echo 0 4G 1; echo 4G 1G 2",
    ]);
    py(
        &srv,
        r#"
for off in (0, 1, 2):
    seen = []
    def cb(meta, o, ents, err):
        seen.append(ents)
    h.block_status(2**32 - 1, off, cb)
    assert seen == [[4294901760, 1]], (off, seen)
"#,
    );
}

#[test]
fn keys_with_dot_go_to_config_and_slash_or_leading_dot_are_not_keys() {
    // As Debian's nbdkit: `a.b=1` is no method, so the user's config gets
    // it; the core does not take `a/b=1` or `.x=1` as key=value at all
    // (nothing may name a file outside $tmpdir).
    let dir = TempDir::new("eval-keys");
    let seen = dir.path("seen");
    let config = format!("config=echo \"$2=$3\" >> {}", seen.display());
    let out = nbdkit(&["eval", &config, "a.b=1", "open.x=2", "get_size=echo 1M", "--run", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read(&seen), "a.b=1\nopen.x=2\n");
    for bad in ["a/b=1", ".x=1", "../get_size=echo 1M"] {
        let out = nbdkit(&["eval", &config, bad, "get_size=echo 1M", "--run", "true"]);
        assert!(!out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("nbdkit: expecting key=value on the command line but got: {bad}\n")
        );
    }
}
