//! `sh`: a plugin written as a script (`nbdkit sh SCRIPT|- [args…]`), run
//! once per callback as `SCRIPT METHOD ARGS…` (nbdkit-sh-plugin(3)).
//!
//! `call` spawns a script and talks to it, `methods` is the protocol
//! (exit codes, errno rules, each method's output), and this file is the
//! plugin and its handle, which `eval` shares.

/// The `Plugin` methods the sh and eval plugins both hand to their
/// `Core` unchanged (each plugin's own are config and config_complete).
macro_rules! core_methods {
    () => {
        fn thread_model(&self) -> ThreadModel {
            self.core.thread_model()
        }

        fn dump_plugin(&self) -> Vec<String> {
            self.core.dump_plugin()
        }

        fn get_ready(&mut self) -> Result<()> {
            self.core.simple("get_ready", &[])
        }

        fn after_fork(&self) -> Result<()> {
            self.core.simple("after_fork", &[])
        }

        fn cleanup(&self) {
            self.core.unload();
        }

        fn preconnect(&self, readonly: bool) -> Result<()> {
            self.core.simple("preconnect", &[tf(readonly)])
        }

        fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
            self.core.list_exports(readonly, is_tls)
        }

        fn default_export(&self, readonly: bool, is_tls: bool) -> Option<String> {
            self.core.default_export(readonly, is_tls)
        }

        fn open(&self, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
            self.core.open(readonly, export, is_tls)
        }
    };
}

mod call;
mod eval;
mod methods;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::backend::{
    BlockSize, Caps, Export, Extents, Flags, Handle, Param, Plugin, PluginEntry, Support, ThreadModel,
};
use crate::error::{Error, Result};
use call::Script;
use methods::{chomp, tf, Engine, Scripts, TmpDir};

/// Every callback nbdkit's sh and eval plugins define (`--dump-plugin`).
const HAS: &[&str] = &[
    "load", "unload", "dump_plugin", "config", "config_complete", "config_help", "thread_model", "get_ready",
    "after_fork", "preconnect", "list_exports", "default_export", "open", "close", "export_description",
    "get_size", "block_size", "can_write", "can_flush", "is_rotational", "can_trim", "can_zero",
    "can_fast_zero", "can_extents", "can_fua", "can_multi_conn", "can_cache", "pread", "pwrite", "flush",
    "trim", "zero", "extents", "cache",
];

/// What the sh and eval plugins share: `$tmpdir`, the engine once there
/// is a script, and the thread model once asked.
struct Core<S: Scripts + 'static> {
    engine: Option<Arc<Engine<S>>>,
    model: OnceLock<ThreadModel>,
    unloaded: AtomicBool,
    // Declared last: removed after the engine is gone.
    tmpdir: std::result::Result<TmpDir, String>,
}

impl<S: Scripts + 'static> Core<S> {
    fn new() -> Core<S> {
        let tmpdir = TmpDir::new().map_err(|e| format!("mkdtemp: /tmp: {e}"));
        if let Ok(t) = &tmpdir {
            crate::debug!("load: tmpdir: {}", t.path().display());
        }
        Core { engine: None, model: OnceLock::new(), unloaded: AtomicBool::new(false), tmpdir }
    }

    fn tmpdir(&self) -> Result<PathBuf> {
        self.tmpdir.as_ref().map(|t| t.path().to_path_buf()).map_err(|e| Error::io(e.clone()))
    }

    fn engine(&self) -> Result<&Arc<Engine<S>>> {
        self.engine.as_ref().ok_or_else(|| Error::invalid("missing script parameter"))
    }

    fn thread_model(&self) -> ThreadModel {
        let Some(e) = &self.engine else { return ThreadModel::Parallel };
        *self.model.get_or_init(|| {
            e.thread_model().unwrap_or_else(|err| {
                crate::log_error!("{}", err.message());
                ThreadModel::SerializeAllRequests
            })
        })
    }

    fn dump_plugin(&self) -> Vec<String> {
        let mut v = vec!["max_known_status=8".to_string()];
        if let Some(e) = &self.engine {
            match e.call_ok("dump_plugin", &[]) {
                Ok(Some(out)) => v.extend(String::from_utf8_lossy(&out).lines().map(str::to_string)),
                Ok(None) => {}
                Err(err) => crate::log_error!("{}", err.message()),
            }
        }
        v
    }

    fn simple(&self, method: &str, args: &[&str]) -> Result<()> {
        match &self.engine {
            Some(e) => e.call_ok(method, args).map(|_| ()),
            None => Ok(()),
        }
    }

    /// unload, once: at cleanup, or when the plugin is dropped (an exit
    /// after --dump-plugin or a failed start-up). Errors are logged.
    fn unload(&self) {
        if self.unloaded.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(e) = &self.engine {
            if let Err(err) = e.call_ok("unload", &[]) {
                crate::log_error!("{}", err.message());
            }
        }
        // The chain is never dropped once serving: remove $tmpdir here.
        if let Ok(t) = &self.tmpdir {
            t.remove();
        }
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        // Missing: the default export alone (the server names it).
        Ok(self.engine()?.list_exports(readonly, is_tls)?.unwrap_or_else(|| vec![Export::new("")]))
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Option<String> {
        let e = self.engine.as_ref()?;
        match e.default_export(readonly, is_tls) {
            Ok(name) => Some(name.unwrap_or_default()),
            Err(err) => {
                crate::log_error!("{}", err.message());
                None
            }
        }
    }

    fn open(&self, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let e = self.engine()?.clone();
        let h = match e.call_ok("open", &[tf(readonly), export, tf(is_tls)])? {
            Some(out) => chomp(&out),
            None => String::new(),
        };
        crate::debug!("sh: handle: {h}");
        Ok(Box::new(ScriptHandle { engine: e, h, readonly }))
    }
}

impl<S: Scripts + 'static> Drop for Core<S> {
    fn drop(&mut self) {
        self.unload();
    }
}

/// The sh plugin's one script.
struct ShScripts(Script);

impl Scripts for ShScripts {
    fn script(&self, _method: &str) -> &Script {
        &self.0
    }
}

/// `nbdkit sh SCRIPT`.
struct Sh {
    core: Core<ShScripts>,
    /// The script's own magic key (its `magic_config_key` method).
    magic: Option<String>,
}

impl Sh {
    /// The first parameter: the script (or `-`: read it from stdin), then
    /// its `load` and `magic_config_key` methods.
    fn set_script(&mut self, value: &str) -> Result<()> {
        let tmpdir = self.core.tmpdir()?;
        let path = if value == "-" {
            if !crate::util::stdio::safe() {
                return Err(Error::invalid("inline script is incompatible with -s"));
            }
            let p = tmpdir.join("inline-script.sh");
            let copy = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&p)?;
                std::io::copy(&mut std::io::stdin().lock(), &mut f)?;
                f.flush()?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o500))
            };
            copy().map_err(|e| Error::io(format!("sh: failed to copy inline script to temporary file: {e}")))?;
            p
        } else {
            std::fs::canonicalize(value).map_err(|e| Error::os(format!("realpath: {value}"), e))?
        };
        let engine = Engine { scripts: ShScripts(Script::new(path, false)), tmpdir };
        engine.call_ok("load", &[])?;
        self.magic = engine.call_ok("magic_config_key", &[])?.map(|out| chomp(&out));
        self.core.engine = Some(Arc::new(engine));
        Ok(())
    }
}

impl Plugin for Sh {
    fn config(&mut self, key: &str, value: &str) -> Result<Param> {
        let Some(e) = &self.core.engine else {
            if key != "script" {
                return Err(Error::invalid("the first parameter must be script=/path/to/script"));
            }
            self.set_script(value)?;
            return Ok(Param::Used);
        };
        // Bare words come as script=…: they belong to the script's own key.
        let key = if key == "script" {
            match &self.magic {
                Some(m) => m.as_str(),
                None => {
                    return Err(Error::invalid(format!(
                        "{}: expecting key=value on the command line but got: {value}",
                        e.name("config")
                    )))
                }
            }
        } else {
            key
        };
        match e.call_ok("config", &[key, value])? {
            Some(_) => Ok(Param::Used),
            None => Err(Error::invalid(format!(
                "{}: this plugin does not need command line configuration",
                e.name("config")
            ))),
        }
    }

    fn config_complete(&mut self) -> Result<()> {
        self.core.engine()?.call_ok("config_complete", &[]).map(|_| ())
    }

    core_methods!();
}

/// One connection's handle: the string the script's `open` printed.
struct ScriptHandle<S: Scripts + 'static> {
    engine: Arc<Engine<S>>,
    h: String,
    readonly: bool,
}

impl<S: Scripts + 'static> ScriptHandle<S> {
    fn boolean(&self, method: &str) -> Result<bool> {
        self.engine.call_bool(method, &[&self.h], false)
    }
}

impl<S: Scripts + 'static> Handle for ScriptHandle<S> {
    fn size(&self) -> Result<u64> {
        self.engine.get_size(&self.h)
    }

    /// Each can_* method once per connection (the checking layer caches
    /// the answers), in nbdkit's order; with -r, or when can_write says
    /// no, the methods about writing are not asked.
    fn caps(&self) -> Result<Caps> {
        let write = !self.readonly && self.boolean("can_write")?;
        let flush = self.boolean("can_flush")?;
        let rotational = self.boolean("is_rotational")?;
        let (mut trim, mut zero, mut fast_zero, mut fua) = (false, Support::None, false, Support::None);
        if write {
            trim = self.boolean("can_trim")?;
            let can_zero = self.boolean("can_zero")?;
            zero = if can_zero { Support::Native } else { Support::Emulate };
            // Missing: fast zeroes are "supported" exactly when zeroes are
            // emulated (they then fail at once), as nbdkit documents.
            fast_zero = self.engine.call_bool("can_fast_zero", &[&self.h], !can_zero)?;
        }
        let extents = self.boolean("can_extents")?;
        if write {
            fua = match self.engine.call_support("can_fua", &self.h)? {
                Some(s) => s,
                None if flush => Support::Emulate,
                None => Support::None,
            };
        }
        let multi_conn = self.boolean("can_multi_conn")?;
        let cache = self.engine.call_support("can_cache", &self.h)?.unwrap_or(Support::None);
        Ok(Caps { write, flush, rotational, trim, zero, fast_zero, extents, fua, multi_conn, cache })
    }

    fn block_size(&self) -> Result<Option<BlockSize>> {
        self.engine.block_size(&self.h)
    }

    fn export_description(&self) -> Option<String> {
        match self.engine.call_ok("export_description", &[&self.h]) {
            Ok(out) => out.map(|o| chomp(&o)),
            Err(e) => {
                crate::log_error!("{}", e.message());
                None
            }
        }
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.engine.pread(&self.h, buf, offset)
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.engine.pwrite(&self.h, buf, offset, flags)
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.engine.call_or_ignore("flush", &[&self.h])
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let (c, o, f) = (count.to_string(), offset.to_string(), methods::flags_string(flags));
        self.engine.call_or_ignore("trim", &[&self.h, &c, &o, &f])
    }

    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.engine.zero(&self.h, count, offset, flags)
    }

    fn extents(&self, count: u64, offset: u64, flags: Flags, ext: &mut Extents) -> Result<()> {
        self.engine.extents(&self.h, count, offset, flags, ext)
    }

    fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let (c, o) = (count.to_string(), offset.to_string());
        self.engine.call_or_ignore("cache", &[&self.h, &c, &o])
    }
}

impl<S: Scripts + 'static> Drop for ScriptHandle<S> {
    /// close: errors are logged, nothing else can be done.
    fn drop(&mut self) {
        if let Err(e) = self.engine.call_ok("close", &[&self.h]) {
            crate::log_error!("{}", e.message());
        }
    }
}

inventory::submit! {
    PluginEntry {
        name: "sh",
        longname: "",
        description: "",
        help: "script=<FILENAME>     (required) The shell script to run.\n\
               [other arguments may be used by the plugin that you load]",
        magic_key: Some("script"),
        api_version: 2,
        max_thread_model: ThreadModel::Parallel,
        errno_is_preserved: true,
        has: HAS,
        new: || Box::new(Sh { core: Core::new(), magic: None }),
    }
}
