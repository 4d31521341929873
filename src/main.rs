//! `nbdkit`: parse the command line, serve, exit with nbdkit's codes.

/// malloc with a bounded cache of freed mid-size blocks (src/alloc.rs):
/// musl's malloc maps and unmaps those on every allocation.
#[global_allocator]
static ALLOC: nbdkit::alloc::MidCache = nbdkit::alloc::MidCache::new();

fn main() {
    std::process::exit(nbdkit::main_with_args(std::env::args_os()));
}
