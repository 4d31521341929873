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
        Ok(Chain {
            plugin: (plugin_entry.new)(),
            filters: filter_entries.iter().map(|e| (e.new)()).collect(),
            plugin_entry,
            filter_entries,
        })
    }

    /// Name of the plugin.
    pub fn plugin_name(&self) -> &'static str {
        self.plugin_entry.name
    }

    /// Offers `key=value` to each filter from the outermost, then to the plugin.
    pub fn config(&mut self, key: &str, value: &str) -> Result<()> {
        for f in &mut self.filters {
            if f.config(key, value)? == Param::Used {
                return Ok(());
            }
        }
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
        for f in &mut self.filters {
            f.config_complete()?;
        }
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
        self.plugin.get_ready()?;
        let model = self.thread_model();
        for f in self.filters.iter_mut().rev() {
            f.get_ready(model)?;
        }
        Ok(())
    }

    /// after_fork: the plugin first, then filters from the innermost.
    pub fn after_fork(&self) -> Result<()> {
        self.plugin.after_fork()?;
        for f in self.filters.iter().rev() {
            f.after_fork()?;
        }
        Ok(())
    }

    /// cleanup: filters from the outermost, then the plugin.
    pub fn cleanup(&self) {
        for f in &self.filters {
            f.cleanup();
        }
        self.plugin.cleanup();
    }

    /// The outermost layer, as a client connection sees it.
    pub fn top(&self) -> Layer<'_> {
        Layer { chain: self, index: 0 }
    }
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
        match self.filter() {
            Some(f) => f.preconnect(&self.below(), readonly),
            None => self.chain.plugin.preconnect(readonly),
        }
    }

    fn list_exports(&self, readonly: bool, is_tls: bool) -> Result<Vec<Export>> {
        match self.filter() {
            Some(f) => f.list_exports(&self.below(), readonly, is_tls),
            None => self.chain.plugin.list_exports(readonly, is_tls),
        }
    }

    fn default_export(&self, readonly: bool, is_tls: bool) -> Option<String> {
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
        Ok(Box::new(Checked::new(name, h, readonly)?))
    }
}
