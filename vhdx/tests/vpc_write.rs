//! VHDs vdisk creates have the sizes qemu-img gives the same options (a fixed whole-MiB
//! image keeps its exact size, as Azure requires), survive a random-operation model test,
//! and read through qemu-img exactly as through vdisk, including after qemu-io writes.

mod common;

use std::path::Path;
use std::process::Command;

use common::json::Json;
use common::{have_qemu, read_all, run, Scratch};
use vdisk_block::testing::ModelTest;
use vdisk_block::{CreateOptions, Format, OpenOptions};
use vdisk_vhdx::VpcFormat;

const MIB: u64 = 1 << 20;

fn create(path: &Path, size: u64, opts: &str) {
    VpcFormat
        .create(
            path,
            CreateOptions {
                size,
                options: CreateOptions::parse_options(opts).expect("options"),
            },
        )
        .unwrap_or_else(|e| panic!("create {opts}: {e}"));
}

fn qemu_size(path: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(path));
    Json::parse(&String::from_utf8_lossy(&out))
        .get("virtual-size")
        .and_then(Json::as_u64)
        .expect("virtual-size")
}

fn same_as_qemu(path: &Path, dir: &Scratch) {
    let raw = dir.path("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(path)
        .arg(&raw));
    let img = VpcFormat
        .open(path, &OpenOptions::read_only())
        .expect("open");
    assert_eq!(img.size(), qemu_size(path));
    assert!(read_all(img.as_ref()) == std::fs::read(&raw).expect("raw"));
}

#[test]
fn created_vhds_have_qemus_sizes() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("vpc-create");
    let odd = 50 * MIB + 7 * 512;
    for (size, opts) in [
        (odd, ""),
        (odd, "force_size=on"),
        (odd, "subformat=fixed"),
        (10 * MIB, "subformat=fixed,force_size=off"),
        (10 * MIB, "subformat=dynamic"),
        (3 << 30, ""),
    ] {
        let ours = dir.path("ours.vhd");
        let theirs = dir.path("theirs.vhd");
        create(&ours, size, opts);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "vpc"]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        run(cmd.arg(&theirs).arg(size.to_string()));
        assert_eq!(qemu_size(&ours), qemu_size(&theirs), "{size} {opts}");
        let img = VpcFormat
            .open(&ours, &OpenOptions::read_only())
            .expect("open");
        assert_eq!(img.size(), qemu_size(&ours));
    }
}

/// The 512-byte footer at the end of `path`.
fn tail_footer(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).expect("read");
    data[data.len() - 512..].to_vec()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The footer with the fields that differ between any two creations (timestamp, checksum,
/// unique ID) blanked.
fn comparable(footer: &[u8]) -> Vec<u8> {
    let mut f = footer.to_vec();
    f[24..28].fill(0);
    f[64..84].fill(0);
    f
}

/// What Azure checks of an uploaded fixed VHD (and qemu/Hyper-V read): the footer cookie,
/// a valid checksum, fixed disk type, no dynamic header, and original and current size both
/// the whole-MiB virtual size that the file holds before its footer.
#[test]
fn fixed_whole_mib_vhds_are_azure_sized() {
    let dir = Scratch::new("vpc-azure");
    for size in [MIB, 30 * MIB, 1000 * MIB, 5 * 1024 * MIB] {
        let path = dir.path("azure.vhd");
        create(&path, size, "subformat=fixed");
        let len = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(len, size + 512, "data of whole MiB plus one footer");
        let f = tail_footer(&path);
        assert_eq!(&f[..8], b"conectix", "cookie");
        let sum = !f
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
        assert_eq!(be32(&f, 64), sum, "checksum");
        assert_eq!(be32(&f, 60), 2, "disk type: fixed");
        assert_eq!(be64(&f, 16), u64::MAX, "data offset: none");
        assert_eq!(be64(&f, 40), size, "original size");
        assert_eq!(be64(&f, 48), size, "current size");
        assert_eq!(be32(&f, 12), 0x0001_0000, "file format version");
        let img = VpcFormat
            .open(&path, &OpenOptions::read_only())
            .expect("open");
        assert_eq!(img.size(), size);
        if have_qemu() {
            assert_eq!(qemu_size(&path), size);
            // qemu-img makes the same footer only when told to keep the size.
            let theirs = dir.path("theirs.vhd");
            run(Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "vpc",
                    "-o",
                    "subformat=fixed,force_size=on",
                ])
                .arg(&theirs)
                .arg(size.to_string()));
            assert_eq!(std::fs::metadata(&theirs).expect("stat").len(), len);
            assert!(
                comparable(&f) == comparable(&tail_footer(&theirs)),
                "{size}: our footer differs from qemu-img's (force_size=on)"
            );
        }
    }
}

/// Sizes that are not whole MiB get exactly what qemu-img gives them, with the size kept
/// (`force_size=on`, Azure's only hope for such a size) and without (CHS rounding).
#[test]
fn fixed_vhds_of_other_sizes_are_made_as_qemu_makes_them() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("vpc-fixed-odd");
    for size in [
        1_024_000,
        50 * MIB + 7 * 512,
        1_000_001,
        3 * 1024 * MIB + 512,
    ] {
        for opts in ["subformat=fixed,force_size=on", "subformat=fixed"] {
            let ours = dir.path("ours.vhd");
            let theirs = dir.path("theirs.vhd");
            create(&ours, size, opts);
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "vpc", "-o", opts])
                .arg(&theirs)
                .arg(size.to_string()));
            let what = format!("{size} bytes, {opts}");
            assert_eq!(
                std::fs::metadata(&ours).expect("stat").len(),
                std::fs::metadata(&theirs).expect("stat").len(),
                "{what}: file length"
            );
            assert!(
                comparable(&tail_footer(&ours)) == comparable(&tail_footer(&theirs)),
                "{what}: our footer differs from qemu-img's"
            );
            assert_eq!(qemu_size(&ours), qemu_size(&theirs), "{what}");
            let img = VpcFormat
                .open(&ours, &OpenOptions::read_only())
                .expect("open");
            assert_eq!(img.size(), qemu_size(&ours), "{what}");
        }
    }
}

#[test]
fn model_test_on_vhds_then_qemu_reads_the_same() {
    let dir = Scratch::new("vpc-model");
    for (name, size, opts) in [
        ("dyn.vhd", 20 * MIB, "force_size=on"),
        ("fixed.vhd", 8 * MIB, "subformat=fixed"),
    ] {
        let path = dir.path(name);
        create(&path, size, opts);
        ModelTest::new(size)
            .threads(3)
            .ops(150)
            .seed(11)
            .max_io(256 * 1024)
            .large_io(3 * MIB)
            .reopen(true)
            .run(|| VpcFormat.open(&path, &OpenOptions::read_write()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if have_qemu() {
            same_as_qemu(&path, &dir);
            run(Command::new("qemu-io")
                .args(["-f", "vpc", "-c", "write -P 0x3c 3000000 100000"])
                .arg(&path));
            same_as_qemu(&path, &dir);
        }
    }
}
