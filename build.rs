//! Build script: embeds the manual pages (docs/man/*.md) and notes the
//! TLS library the build links, for `nbdkit --man` and `nbdkit --version`.
//!
//! Pages are collected by file name, whatever exists: a page whose plugin
//! or filter is not compiled in costs nothing but its text, and a layer
//! without a page is caught by tests/manuals.rs, not by the build.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let dir = Path::new(&root).join("docs/man");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut pages: Vec<(String, String)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md") {
                println!("cargo:rerun-if-changed={}", p.display());
                let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
                pages.push((stem, p.display().to_string()));
            }
        }
    }
    pages.sort();
    let mut src = String::from("/// (page name, markdown source), sorted by name.\npub static PAGES: &[(&str, &str)] = &[\n");
    for (name, path) in &pages {
        let _ = writeln!(src, "    ({name:?}, include_str!({path:?})),");
    }
    src.push_str("];\n");
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    std::fs::write(Path::new(&out).join("man_pages.rs"), src).expect("write man_pages.rs");

    // The TLS library, from the lock file: whatever the TLS work linked.
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string(Path::new(&root).join("Cargo.lock")).unwrap_or_default();
    let tls = ["rustls", "openssl", "native-tls"]
        .iter()
        .find_map(|name| lock_version(&lock, name).map(|v| format!("{name} {v}")))
        .unwrap_or_else(|| "none".to_string());
    println!("cargo:rustc-env=NBDKIT_TLS_LIBRARY={tls}");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=NBDKIT_BUILD_TARGET={target}");
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!("cargo:rustc-env=NBDKIT_BUILD_PROFILE={profile}");
}

/// The version of package `name` in a Cargo.lock, if it is there.
fn lock_version(lock: &str, name: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == format!("name = \"{name}\"") {
            let v = lines.next()?.trim().strip_prefix("version = \"")?.strip_suffix('"')?;
            return Some(v.to_string());
        }
    }
    None
}
