//! VMDK: the text descriptor parser, and the round trip of what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vdisk_vmdk::fuzzing::descriptor(data));
