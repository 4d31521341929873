//! Every plugin and filter compiled into the binary, registered at link
//! time with `inventory::submit!` in its own file and found here by name.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::{Filter, Plugin, ThreadModel};

/// A built-in plugin: what `--help`, `--version` and `--dump-plugin` show,
/// and how to make a fresh instance.
pub struct PluginEntry {
    /// Name on the command line (`[A-Za-z0-9][A-Za-z0-9-]*`).
    pub name: &'static str,
    /// Long name, e.g. "nbdkit file plugin".
    pub longname: &'static str,
    /// One-paragraph description.
    pub description: &'static str,
    /// config_help: one line per parameter.
    pub help: &'static str,
    /// The key bare arguments are given to (`nbdkit null 1M` = `size=1M`).
    pub magic_key: Option<&'static str>,
    /// API version nbdkit's C plugin of the same name declares.
    pub api_version: u32,
    /// The THREAD_MODEL of the plugin.
    pub max_thread_model: ThreadModel,
    /// errno_is_preserved of the C plugin.
    pub errno_is_preserved: bool,
    /// Callbacks the C plugin defines, in `--dump-plugin`'s `has_` order.
    pub has: &'static [&'static str],
    /// A fresh, unconfigured instance.
    pub new: fn() -> Box<dyn Plugin>,
}

/// A built-in filter.
pub struct FilterEntry {
    /// Registered name (the error filter registers as `error-inject`).
    pub name: &'static str,
    /// Name on the command line, if it differs from `name` (`error`).
    pub alias: Option<&'static str>,
    /// Long name.
    pub longname: &'static str,
    /// Description.
    pub description: &'static str,
    /// config_help.
    pub help: &'static str,
    /// A fresh, unconfigured instance.
    pub new: fn() -> Box<dyn Filter>,
}

/// The `-D NAME.FLAG=N` flags a backend reads (nbdkit finds them as
/// `NAME_debug_FLAG` variables in the plugin). A backend that declares
/// its flags gets nbdkit's warning for any other flag; one that declares
/// nothing is not checked.
pub struct DebugFlags {
    /// Plugin or filter name.
    pub backend: &'static str,
    /// Flag names, as on the command line (`AST`, `zero`).
    pub flags: &'static [&'static str],
}

inventory::collect!(PluginEntry);
inventory::collect!(FilterEntry);
inventory::collect!(DebugFlags);

/// The debug flags `backend` declares, if it declares them.
pub fn debug_flags(backend: &str) -> Option<&'static [&'static str]> {
    inventory::iter::<DebugFlags>.into_iter().find(|d| d.backend == backend).map(|d| d.flags)
}

/// All plugins by name. Panics on a duplicate name: a build bug.
pub fn plugins() -> &'static BTreeMap<&'static str, &'static PluginEntry> {
    static MAP: OnceLock<BTreeMap<&'static str, &'static PluginEntry>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut m = BTreeMap::new();
        for e in inventory::iter::<PluginEntry> {
            assert!(m.insert(e.name, e).is_none(), "duplicate plugin name {}", e.name);
        }
        m
    })
}

/// All filters by the name used on the command line.
pub fn filters() -> &'static BTreeMap<&'static str, &'static FilterEntry> {
    static MAP: OnceLock<BTreeMap<&'static str, &'static FilterEntry>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut m = BTreeMap::new();
        for e in inventory::iter::<FilterEntry> {
            let key = e.alias.unwrap_or(e.name);
            assert!(m.insert(key, e).is_none(), "duplicate filter name {key}");
        }
        m
    })
}

/// The plugin called `name`.
pub fn plugin(name: &str) -> Option<&'static PluginEntry> {
    plugins().get(name).copied()
}

/// The filter called `name` on the command line (or by its registered name).
pub fn filter(name: &str) -> Option<&'static FilterEntry> {
    filters().get(name).copied().or_else(|| filters().values().find(|e| e.name == name).copied())
}
