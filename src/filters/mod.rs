//! Built-in filters: one module each, registered with `inventory::submit!`.
