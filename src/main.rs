//! `nbdkit`: parse the command line, serve, exit with nbdkit's codes.

fn main() {
    std::process::exit(nbdkit::main_with_args(std::env::args_os()));
}
