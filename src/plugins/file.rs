//! `file` plugin (being written).
