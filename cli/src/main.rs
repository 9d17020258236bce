//! The `vdisk` binary.

fn main() {
    std::process::exit(vdisk_cli::run(std::env::args_os()));
}
