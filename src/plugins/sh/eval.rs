//! `eval`: the sh plugin's engine with each method's script given on the
//! command line (`nbdkit eval get_size='echo 1M' pread='…'`,
//! nbdkit-eval-plugin(1)). Each script is written to `$tmpdir/METHOD`
//! and run by /bin/sh as `$tmpdir/METHOD METHOD ARGS…`; undefined
//! methods run `$tmpdir/missing` (by default `exit 2`).

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use super::call::Script;
use super::methods::{Answer, Engine, Scripts};
use super::{tf, Core, HAS};
use crate::backend::{Export, Handle, Param, Plugin, PluginEntry, ThreadModel};
use crate::error::{Error, Result};

/// Methods a `KEY=SCRIPT` may define (no `load`: the scripts are not
/// written yet when nbdkit loads a plugin).
const METHODS: &[&str] = &[
    "after_fork", "block_size", "cache", "can_cache", "can_extents", "can_fast_zero", "can_flush", "can_fua",
    "can_multi_conn", "can_trim", "can_write", "can_zero", "close", "config", "config_complete", "default_export",
    "dump_plugin", "export_description", "extents", "flush", "get_ready", "get_size", "is_rotational",
    "list_exports", "missing", "open", "pread", "preconnect", "pwrite", "thread_model", "trim", "unload", "zero",
];

/// The can_* answer eval gives when only the data method was defined,
/// as a C plugin would get from the core.
const SYNTHESIZED: &[(&str, &str, &str)] = &[
    ("pwrite", "can_write", "exit 0"),
    ("flush", "can_flush", "exit 0"),
    ("trim", "can_trim", "exit 0"),
    ("zero", "can_zero", "exit 0"),
    ("extents", "can_extents", "exit 0"),
    ("cache", "can_cache", "echo native"),
];

/// One script per defined method, and `missing` for the rest.
struct EvalScripts {
    defined: HashMap<String, Script>,
    missing: Script,
}

impl Scripts for EvalScripts {
    fn script(&self, method: &str) -> &Script {
        self.defined.get(method).unwrap_or(&self.missing)
    }
}

/// Writes `text` (plus a newline if it lacks one) to `path`, mode 0500.
fn write_script(path: &Path, text: &str) -> Result<Script> {
    let _ = std::fs::remove_file(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(0o500))
    };
    write().map_err(|e| Error::os(format!("{}", path.display()), e))?;
    // Without a #! line execvp would fall back to /bin/sh: go there at once.
    Ok(Script::new(path.to_path_buf(), !text.starts_with("#!")))
}

/// `nbdkit eval METHOD='script' …`.
struct Eval {
    core: Core<EvalScripts>,
    missing_given: bool,
}

impl Eval {
    fn new() -> Eval {
        let mut core = Core::new();
        if let Ok(t) = &core.tmpdir {
            let dir = t.path().to_path_buf();
            if let Ok(missing) = write_script(&dir.join("missing"), "exit 2") {
                core.engine = Some(Arc::new(Engine { scripts: EvalScripts { defined: HashMap::new(), missing }, tmpdir: dir }));
            }
        }
        Eval { core, missing_given: false }
    }

    fn engine_mut(&mut self) -> Result<&mut Engine<EvalScripts>> {
        let tmp = self.core.tmpdir()?;
        self.core
            .engine
            .as_mut()
            .and_then(Arc::get_mut)
            .ok_or_else(|| Error::io(format!("{}: cannot write the scripts", tmp.display())))
    }

    fn define(&mut self, method: &str, text: &str) -> Result<()> {
        let given = method == "missing" && self.missing_given;
        let engine = self.engine_mut()?;
        if given || engine.scripts.defined.contains_key(method) {
            return Err(Error::invalid(format!("method {method} defined more than once on the command line")));
        }
        // nbdkit's guard: the name becomes a file in $tmpdir, so it must
        // not leave it (known names never contain these; the core refuses
        // `/` in keys, and a key with `.` goes to the user's config).
        if method.contains(['.', '/']) {
            return Err(Error::invalid(format!("method name {method} is invalid")));
        }
        let script = write_script(&engine.tmpdir.join(method), text)?;
        if method == "missing" {
            engine.scripts.missing = script;
            self.missing_given = true;
        } else {
            engine.scripts.defined.insert(method.to_string(), script);
        }
        Ok(())
    }
}

impl Plugin for Eval {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        if METHODS.contains(&key) {
            self.define(key, value)?;
            return Ok(Param::Used);
        }
        // Anything else is for the user's config script.
        let e = self.core.engine()?;
        match e.call("config", &[key, value])? {
            Answer::Ok(_) => Ok(Param::Used),
            Answer::Missing => Err(Error::invalid(format!(
                "{}: callback '{key}' is unknown, and there is no 'config' callback to handle it",
                e.name("config")
            ))),
            Answer::False => Err(e.unexpected_false("config")),
        }
    }

    fn config_complete(&mut self) -> Result<()> {
        let engine = self.engine_mut()?;
        for (data, can, text) in SYNTHESIZED {
            if engine.scripts.defined.contains_key(*data) && !engine.scripts.defined.contains_key(*can) {
                let script = write_script(&engine.tmpdir.join(can), text)?;
                engine.scripts.defined.insert(can.to_string(), script);
            }
        }
        // nbdkit ≥ 1.38: a missing= script does not count.
        if !engine.scripts.defined.contains_key("get_size") {
            return Err(Error::invalid("'get_size' method is required"));
        }
        self.core.engine()?.call_ok("config_complete", &[]).map(|_| ())
    }

    core_methods!();
}

inventory::submit! {
    PluginEntry {
        name: "eval",
        longname: "",
        description: "",
        help: "get_size=' SCRIPT '\npread=' SCRIPT '\n[etc]",
        magic_key: None,
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: HAS,
        new: || Box::new(Eval::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_but_missing_is_a_protocol_method() {
        for m in METHODS {
            assert!(*m == "missing" || HAS.contains(m), "{m}");
        }
        assert!(!METHODS.contains(&"load"));
    }
}
