//! Images the system qemu-img creates (VHDX and VHD, dynamic and fixed, several block
//! sizes) with data written by qemu-io read byte for byte as `qemu-img convert -O raw` reads
//! them, with the same virtual size `qemu-img info` reports, and with true holes in block
//! status where qemu never allocated a block.

mod common;

use std::path::Path;
use std::process::Command;

use common::json::Json;
use common::{have_qemu, read_all, run, Scratch};
use vdisk_block::{BlockDev, Format, OpenOptions};
use vdisk_vhdx::{VhdxFormat, VpcFormat};

const MIB: u64 = 1 << 20;

/// Writes qemu-io `commands` (each a `-c` argument) into `image` of `format`.
fn qemu_io(image: &Path, format: &str, commands: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(image));
}

fn qemu_raw(image: &Path, format: &str, dir: &Scratch) -> Vec<u8> {
    let raw = dir.path("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&raw));
    std::fs::read(&raw).expect("read oracle")
}

fn qemu_size(image: &Path, format: &str) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(image));
    Json::parse(&String::from_utf8_lossy(&out))
        .get("virtual-size")
        .and_then(Json::as_u64)
        .expect("virtual-size")
}

/// A mix of writes: unaligned, straddling blocks, repeated, zeroed, at the very end.
fn writes(size: u64, block: u64) -> Vec<String> {
    vec![
        "write -P 0x11 0 4096".to_string(),
        format!("write -P 0x22 {} 70000", block - 1000),
        format!("write -P 0x33 {} 512", 3 * block + 512),
        format!("write -P 0x44 {} 8192", size - 8192),
        "write -P 0x55 1024 1536".to_string(),
        format!("write -z {} 4096", block),
    ]
}

fn compare(
    fmt: &dyn Format,
    image: &Path,
    qemu_fmt: &str,
    dir: &Scratch,
) -> std::sync::Arc<dyn BlockDev> {
    let img = fmt
        .open(image, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("open {}: {e}", image.display()));
    assert_eq!(img.size(), qemu_size(image, qemu_fmt), "virtual size");
    let ours = read_all(img.as_ref());
    let oracle = qemu_raw(image, qemu_fmt, dir);
    assert_eq!(ours.len(), oracle.len());
    if let Some(at) = ours.iter().zip(&oracle).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {at}", image.display());
    }
    // Unaligned reads across pieces agree too.
    let mut buf = vec![0u8; 3 * 4096 + 17];
    let at = 1000.min(img.size() - buf.len() as u64);
    img.read_at(&mut buf, at).expect("read");
    assert_eq!(buf, oracle[at as usize..at as usize + buf.len()]);
    img
}

/// Every byte of a range that block status calls a hole (no data stored: unallocated, or
/// zeroes this layer decides, as a dynamic VHD's unallocated blocks) reads as zero, and a
/// dynamic image has at least one hole.
fn check_holes(img: &dyn BlockDev, expect_holes: bool) {
    let mut off = 0;
    let mut holes = 0;
    while off < img.size() {
        let st = img
            .block_status(off, img.size() - off)
            .expect("block status");
        assert_eq!(st.offset, off);
        assert!(st.len > 0);
        if !st.data {
            assert!(
                st.zero && st.host.is_none(),
                "a hole without backing reads as zeroes"
            );
            holes += st.len;
            let mut buf = vec![0u8; st.len.min(MIB) as usize];
            img.read_at(&mut buf, off).expect("read hole");
            assert!(buf.iter().all(|&b| b == 0));
        } else if st.data {
            assert!(st.host.is_some());
        }
        off += st.len;
    }
    assert_eq!(holes > 0, expect_holes, "holes: {holes}");
}

#[test]
fn vhdx_made_by_qemu_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("interop-vhdx");
    // qemu's fixed images keep never-written blocks in the ZERO state unless
    // block_state_zero=off: those read as zeroes and are holes in block status.
    for (subformat, block, size, zero_state, holes) in [
        ("dynamic", None, 64 * MIB, "on", true),
        ("dynamic", Some(MIB), 40 * MIB + 512, "on", true),
        ("dynamic", Some(32 * MIB), 200 * MIB, "off", true),
        ("fixed", Some(MIB), 24 * MIB, "off", false),
        ("fixed", None, 40 * MIB, "on", true),
    ] {
        let image = dir.path(&format!("{subformat}-{block:?}-{zero_state}.vhdx"));
        let mut opts = format!("subformat={subformat},block_state_zero={zero_state}");
        if let Some(b) = block {
            opts.push_str(&format!(",block_size={b}"));
        }
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx", "-o", &opts])
            .arg(&image)
            .arg(size.to_string()));
        let bs = block.unwrap_or(8 * MIB).min(size / 4);
        qemu_io(&image, "vhdx", &writes(size, bs));
        let img = compare(&VhdxFormat, &image, "vhdx", &dir);
        check_holes(img.as_ref(), holes);
    }
}

#[test]
fn vhd_made_by_qemu_reads_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("interop-vpc");
    // 50 MiB + 7 sectors is not a whole CHS geometry: the CHS and current-size rules differ.
    let odd = 50 * MIB + 7 * 512;
    for (subformat, force_size, size) in [
        ("dynamic", false, odd),
        ("dynamic", true, odd),
        ("fixed", false, odd),
        ("fixed", true, 16 * MIB),
        ("dynamic", false, 130 * MIB),
    ] {
        let image = dir.path(&format!("{subformat}-{force_size}-{size}.vhd"));
        let opts = format!(
            "subformat={subformat},force_size={}",
            if force_size { "on" } else { "off" }
        );
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", &opts])
            .arg(&image)
            .arg(size.to_string()));
        let vsize = qemu_size(&image, "vpc");
        qemu_io(&image, "vpc", &writes(vsize, 2 * MIB));
        let img = compare(&VpcFormat, &image, "vpc", &dir);
        check_holes(img.as_ref(), subformat == "dynamic");
    }
}
