//! Checking layer.
