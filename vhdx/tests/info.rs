//! `info` of VHDX and VHD images has the shape qemu-img gives it: qemu prints no
//! format-specific section for either format (only its protocol child has one), so the
//! drivers report none, for every subformat.

mod common;

use std::process::Command;

use common::json::Json;
use common::{have_qemu, run, Scratch};
use vdisk_block::{Format, OpenOptions};
use vdisk_vhdx::{VhdxFormat, VpcFormat};

#[test]
fn neither_qemu_nor_vdisk_has_format_specific_info_for_vhdx_or_vhd() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("info");
    let cases: [(&str, &str, &dyn Format); 4] = [
        ("vhdx", "subformat=dynamic", &VhdxFormat),
        ("vhdx", "subformat=fixed", &VhdxFormat),
        ("vpc", "subformat=dynamic", &VpcFormat),
        ("vpc", "subformat=fixed", &VpcFormat),
    ];
    for (fmt, opts, driver) in cases {
        let path = dir.path(&format!("{fmt}-{opts}.img"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt, "-o", opts])
            .arg(&path)
            .arg("8M"));
        let out = run(Command::new("qemu-img")
            .args(["info", "--output=json", "-f", fmt])
            .arg(&path));
        let info = Json::parse(&String::from_utf8_lossy(&out));
        assert_eq!(info.get("format").and_then(Json::as_str), Some(fmt));
        assert!(
            info.get("format-specific").is_none(),
            "{fmt} {opts}: qemu-img now prints a format-specific section; vdisk should too"
        );
        let img = driver.open(&path, &OpenOptions::read_only()).expect("open");
        assert!(
            img.format_specific().expect("format specific").is_none(),
            "{fmt} {opts}: vdisk reports format-specific info qemu-img does not have"
        );
    }
}
