//! `delay` filter (being written).
