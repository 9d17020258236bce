//! luks_header: arbitrary bytes as a LUKS header region (header, key material, payload):
//! parse, round trip, unlock with a fixed passphrase (PBKDF2 capped in fuzzing builds), a key
//! slot added and erased in memory when it unlocks, then the driver on a scratch file.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file per fuzzing process, overwritten by every input.
fn scratch() -> &'static PathBuf {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        std::env::temp_dir().join(format!("vdisk-fuzz-luks-{}.luks", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| vdisk_luks::fuzzing::fuzz_bytes(data, scratch()));
