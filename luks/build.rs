//! Declares the `fuzzing` cfg that cargo-fuzz sets (see `src/fuzzing.rs`), so ordinary builds
//! do not warn about it; the workspace lint table cannot be extended per crate.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}
