//! `memory` plugin (being written).
