//! README.md's recipes, run verbatim: each ```sh block after a
//! `<!-- recipe: NAME -->` line runs under `bash -euo pipefail` in a fresh
//! directory, with the binary under test first on PATH as `nbdkit`, and
//! its stdout must equal the ```text block that follows it.

mod common;

use common::*;
use std::process::{Command, Stdio};

struct Recipe {
    script: String,
    expected: String,
}

fn recipe(name: &str) -> Recipe {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let marker = format!("<!-- recipe: {name} -->\n");
    let start = readme.find(&marker).unwrap_or_else(|| panic!("README.md has no recipe {name}"));
    let rest = &readme[start + marker.len()..];
    let block = |text: &str, fence: &str| -> (String, usize) {
        let open = text.find(fence).unwrap_or_else(|| panic!("recipe {name}: no {fence} block"));
        let body = &text[open + fence.len()..];
        let close = body.find("\n```\n").unwrap_or_else(|| panic!("recipe {name}: unclosed block"));
        (body[..close + 1].to_string(), open + fence.len() + close + 5)
    };
    let (script, used) = block(rest, "```sh\n");
    let tail = &rest[used..];
    assert!(tail.trim_start().starts_with("```text\n"), "recipe {name}: no ```text block right after it");
    let (expected, _) = block(tail, "```text\n");
    Recipe { script, expected }
}

fn run_recipe(name: &str) {
    let r = recipe(name);
    let dir = TempDir::new(&format!("readme-{name}"));
    let bin = dir.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(nbdkit_bin(), bin.join("nbdkit")).unwrap();
    let work = dir.path("work");
    std::fs::create_dir(&work).unwrap();
    let path = format!("{}:/usr/bin:/usr/sbin:/bin:/sbin", bin.display());
    let out = Command::new("bash")
        .args(["--norc", "-euo", "pipefail", "-c", &r.script])
        .current_dir(&work)
        .env("PATH", path)
        .env("TMPDIR", &work)
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "recipe {name} failed ({}):\n{}\nstdout:\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, r.expected, "recipe {name}: stderr:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The layers a recipe needs must be built in: say which is missing
/// rather than let the recipe fail obscurely (never a skip).
fn needs(plugins: &[&str], filters: &[&str]) {
    let help = run_ok(nbdkit_bin().to_str().unwrap(), &["--help"]);
    let list = |kind: &str| -> Vec<String> {
        let line = help.lines().find_map(|l| l.strip_prefix(&format!("Built-in {kind}: "))).unwrap_or_default();
        line.split_whitespace().map(String::from).collect()
    };
    let (have_p, have_f) = (list("plugins"), list("filters"));
    let missing: Vec<&str> = plugins
        .iter()
        .filter(|p| !have_p.iter().any(|h| h == *p))
        .chain(filters.iter().filter(|f| !have_f.iter().any(|h| h == *f)))
        .copied()
        .collect();
    assert!(missing.is_empty(), "this binary lacks {missing:?}, which the README recipe needs");
}

#[test]
fn ci_fixture() {
    require!("nbdsh", "--version");
    needs(&["memory"], &[]);
    run_recipe("ci-fixture");
}

#[test]
fn ci_fixture_data() {
    require!("nbdsh", "--version");
    needs(&["data"], &[]);
    run_recipe("ci-fixture-data");
}

#[test]
fn cloud_image() {
    require!("nginx", "-v");
    require!("qemu-img", "--version");
    require!("e2fsck", "-V");
    require!("sfdisk", "--version");
    require!("xz", "--version");
    require!("curl", "--version");
    needs(&["curl"], &["cow", "partition", "xz"]);
    run_recipe("cloud-image");
}
