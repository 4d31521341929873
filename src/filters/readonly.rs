//! `readonly` filter (being written).
