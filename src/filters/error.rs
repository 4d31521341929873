//! `error` filter (being written).
