fn main() {
    match nbdkit::cli::parse(std::env::args_os()) {
        nbdkit::cli::Action::Exit(code) => std::process::exit(code),
        nbdkit::cli::Action::Serve(_) => println!("serving"),
    }
}
