//! The vdisk CLI, built inside the test package so integration tests can run it.

fn main() {
    std::process::exit(vdisk_cli::run(std::env::args_os()));
}
