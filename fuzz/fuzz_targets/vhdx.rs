//! VHDX and VHD: arbitrary bytes opened read-only as VHDX (log replay included) and as VHD,
//! read, mapped and described, then checked; no parent is ever opened.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file per fuzzing process, overwritten by every input.
fn scratch() -> &'static PathBuf {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        std::env::temp_dir().join(format!("vdisk-fuzz-vhdx-{}.vhdx", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| vdisk_vhdx::fuzzing::fuzz_bytes(data, scratch()));
