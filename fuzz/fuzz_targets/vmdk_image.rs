//! VMDK: arbitrary bytes opened as a sparse, stream-optimized, COWD or descriptor image and
//! read with block status.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vdisk_vmdk::fuzzing::image(data));
