//! The stack `filter₁(filter₂(… plugin))`: built from names, configured
//! by routing each key=value from the outermost filter down, and opened
//! per connection with a checking layer between every two layers.

use super::checked::Checked;
use super::registry::{self, FilterEntry, PluginEntry};
use super::{Export, Filter, Handle, Next, Param, Plugin, ThreadModel};
use crate::error::{Error, Result};
use crate::util::log;

/// A plugin with its filters, outermost first.
pub struct Chain {
    /// The plugin's registration.
    pub plugin_entry: &'static PluginEntry,
    /// The filters' registrations, outermost first.
    pub filter_entries: Vec<&'static FilterEntry>,
    plugin: Box<dyn Plugin>,
    filters: Vec<Box<dyn Filter>>,
}

impl Chain {
    /// Instantiates `plugin` under `filters` (outermost first). The error
    /// is nbdkit's message for a name that is not built in.
    pub fn new(plugin: &str, filters: &[String]) -> std::result::Result<Chain, String> {
        let plugin_entry = registry::plugin(plugin).ok_or_else(|| not_found("plugin", plugin))?;
        let filter_entries = filters
            .iter()
            .map(|f| registry::filter(f).ok_or_else(|| not_found("filter", f)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // nbdkit's order: the plugin, then the filters from the innermost.
        let plugin = load("plugin", plugin_entry.name, plugin_entry.new);
        let mut filters: Vec<Box<dyn Filter>> =
            filter_entries.iter().rev().map(|e| load("filter", e.name, e.new)).collect();
        filters.reverse();
        let chain = Chain { plugin, filters, plugin_entry, filter_entries };
        if log::verbose() {
            let mut layers: Vec<String> = chain.filter_entries.iter().map(|e| format!("{} (filter)", e.name)).collect();
            layers.push(format!("{} (plugin)", chain.plugin_entry.name));
            if let Some(first) = layers.first_mut() {
                first.insert_str(first.len() - 1, ", first");
            }
            if layers.len() > 1 {
                if let Some(last) = layers.last_mut() {
                    last.insert_str(last.len() - 1, ", last");
                }
            }
            log::debug(&format!("request processing: {}", layers.join(" -> ")));
        }
        Ok(chain)
    }

    /// Names of the layers, outermost first, and whether each is the plugin.
    fn layer_names(&self) -> impl DoubleEndedIterator<Item = (&'static str, bool)> + '_ {
        self.filter_entries.iter().map(|e| (e.name, false)).chain(std::iter::once((self.plugin_entry.name, true)))
    }

    /// The point where nbdkit unloads each layer (plugin first, then the
    /// filters from the innermost): only a debug line here, the layers are
    /// built in and live until exit.
    pub fn unload(&self) {
        // (nbdkit prints these under the controlpath flag.)
        if !log::trace_controlpath() {
            return;
        }
        for (name, plugin) in self.layer_names().rev() {
            log::debug(&format!("{name}: unload {}", if plugin { "plugin" } else { "filter" }));
        }
    }

    /// Name of the plugin.
    pub fn plugin_name(&self) -> &'static str {
        self.plugin_entry.name
    }

    /// Offers `key=value` to each filter from the outermost, then to the plugin.
    pub fn config(&mut self, key: &str, value: &str) -> Result<()> {
        for (f, e) in self.filters.iter_mut().zip(&self.filter_entries) {
            crate::debug!("{}: config key={key}, value={value}", e.name);
            if f.config(key, value)? == Param::Used {
                return Ok(());
            }
        }
        crate::debug!("{}: config key={key}, value={value}", self.plugin_entry.name);
        match self.plugin.config(key, value)? {
            Param::Used => Ok(()),
            Param::NotMine => Err(Error::invalid(format!(
                "{}: unknown parameter '{key}'",
                self.plugin_entry.name
            ))),
        }
    }

    /// config_complete: filters from the outermost, then the plugin.
    pub fn config_complete(&mut self) -> Result<()> {
        for (f, e) in self.filters.iter_mut().zip(&self.filter_entries) {
            crate::debug!("{}: config_complete", e.name);
            f.config_complete()?;
        }
        crate::debug!("{}: config_complete", self.plugin_entry.name);
        self.plugin.config_complete()
    }

    /// The chain's thread model: the tightest of every layer's.
    pub fn thread_model(&self) -> ThreadModel {
        let mut m = self.plugin_entry.max_thread_model.min(self.plugin.thread_model());
        for f in &self.filters {
            m = m.min(f.thread_model());
        }
        m
    }

    /// The plugin's own `--dump-plugin` lines.
    pub fn dump_plugin(&self) -> Vec<String> {
        self.plugin.dump_plugin()
    }

    /// get_ready: the plugin first, then filters from the innermost.
    pub fn get_ready(&mut self) -> Result<()> {
        crate::debug!("{}: get_ready", self.plugin_entry.name);
        self.plugin.get_ready()?;
        let model = self.thread_model();
        for (f, e) in self.filters.iter_mut().zip(&self.filter_entries).rev() {
            crate::debug!("{}: get_ready thread_model={}", e.name, model as u8);
            f.get_ready(model)?;
        }
        Ok(())
    }

    /// after_fork: the plugin first, then filters from the innermost.
    pub fn after_fork(&self) -> Result<()> {
        crate::debug!("{}: after_fork", self.plugin_entry.name);
        self.plugin.after_fork()?;
        for (f, e) in self.filters.iter().zip(&self.filter_entries).rev() {
            crate::debug!("{}: after_fork", e.name);
            f.after_fork()?;
        }
        Ok(())
    }

    /// cleanup: filters from the outermost, then the plugin.
    pub fn cleanup(&self) {
        for (f, e) in self.filters.iter().zip(&self.filter_entries) {
            crate::debug!("{}: cleanup", e.name);
            f.cleanup();
        }
        crate::debug!("{}: cleanup", self.plugin_entry.name);
        self.plugin.cleanup();
    }

    /// The outermost layer, as a client connection sees it.
    pub fn top(&self) -> Layer<'_> {
        Layer { chain: self, index: 0 }
    }
}

/// Instantiates one layer, with nbdkit's registering/load lines.
fn load<T: ?Sized>(kind: &str, name: &str, new: fn() -> Box<T>) -> Box<T> {
    crate::debug!("registering {kind} {name} (built in)");
    let layer = new();
    crate::debug!("registered {kind} {name} (built in) (name {name})");
    crate::debug!("{name}: load");
    layer
}

fn not_found(what: &str, name: &str) -> String {
    format!(
        "cannot open {what} \"{name}\": not built in (built-in {what}s: {})\n\n\
         Use 'nbdkit --help' or read the nbdkit(1) manual page for documentation.",
        match what {
            "plugin" => registry::plugins().keys().copied().collect::<Vec<_>>().join(", "),
            _ => registry::filters().keys().copied().collect::<Vec<_>>().join(", "),
        }
    )
}

/// Layer `index` of a chain (0 = outermost filter; `filters.len()` = plugin).
#[derive(Clone, Copy)]
pub struct Layer<'a> {
    chain: &'a Chain,
    index: usize,
}

impl Layer<'_> {
    fn below(&self) -> Layer<'_> {
        Layer { chain: self.chain, index: self.index + 1 }
    }
    fn name(&self) -> &'static str {
        self.chain.filter_entries.get(self.index).map_or(self.chain.plugin_entry.name, |e| e.name)
    }
    fn filter(&self) -> Option<&dyn Filter> {
        self.chain.filters.get(self.index).map(|f| &**f)
    }
}

impl Next for Layer<'_> {
    fn preconnect(&self, readonly: bool) -> Result<()> {
        crate::debug!("{}: preconnect", self.name()); // (not a controlpath line in nbdkit)
        match self.filter() {
            Some(f) => f.preconnect(&self.below(), readonly),
            None => self.chain.plugin.preconnect(readonly),
        }
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        let control = log::trace_controlpath();
        if control {
            log::debug(&format!("{}: list_exports readonly={} tls={}", self.name(), readonly as u8, is_tls as u8));
        }
        let list = match self.filter() {
            Some(f) => f.list_exports(&self.below(), readonly, is_tls),
            None => self.chain.plugin.list_exports(readonly, is_tls),
        };
        if control {
            match &list {
                Ok(l) => log::debug(&format!("{}: list_exports returned {} names", self.name(), l.len())),
                Err(_) => log::debug(&format!("{}: list_exports failed", self.name())),
            }
        }
        list
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Option<String> {
        if log::trace_controlpath() {
            log::debug(&format!("{}: default_export readonly={} tls={}", self.name(), readonly as u8, is_tls as u8));
        }
        let name = match self.filter() {
            Some(f) => f.default_export(&self.below(), readonly, is_tls),
            None => self.chain.plugin.default_export(readonly, is_tls),
        };
        name.filter(|n| n.len() <= 4096 && !n.contains('\0'))
    }

    fn open(&self, readonly: bool, export: &str, is_tls: bool) -> Result<Box<dyn Handle>> {
        let name = self.name();
        if log::trace_controlpath() {
            log::debug(&format!("{name}: open readonly={} exportname=\"{export}\" tls={}", readonly as u8, is_tls as u8));
        }
        let h = match self.filter() {
            Some(f) => f.open(&self.below(), readonly, export, is_tls)?,
            None => self.chain.plugin.open(readonly, export, is_tls)?,
        };
        if log::trace_controlpath() {
            log::debug(&format!("{name}: open returned handle {:p}", &*h as *const dyn Handle as *const u8));
        }
        Ok(Box::new(Checked::new(name, h, readonly)?))
    }
}
