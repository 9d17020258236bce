//! The `vdisk` binary.
fn main() {}
