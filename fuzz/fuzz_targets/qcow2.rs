//! qcow2: arbitrary bytes opened read-write (on a scratch copy), one read, one write, a
//! flush and `check`; no backing or data file is ever opened.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file per fuzzing process, overwritten by every input.
fn scratch() -> &'static PathBuf {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        std::env::temp_dir().join(format!("vdisk-fuzz-qcow2-{}.qcow2", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| vdisk_qcow2::fuzzing::fuzz_bytes(data, scratch()));
