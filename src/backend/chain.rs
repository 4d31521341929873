//! Filter chain.
