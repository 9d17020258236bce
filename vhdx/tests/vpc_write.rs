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

#[test]
fn fixed_whole_mib_vhds_are_azure_sized() {
    let dir = Scratch::new("vpc-azure");
    let path = dir.path("azure.vhd");
    create(&path, 30 * MIB, "subformat=fixed");
    let len = std::fs::metadata(&path).expect("stat").len();
    assert_eq!(len, 30 * MIB + 512, "data of whole MiB plus one footer");
    let img = VpcFormat
        .open(&path, &OpenOptions::read_only())
        .expect("open");
    assert_eq!(img.size(), 30 * MIB);
    if have_qemu() {
        assert_eq!(qemu_size(&path), 30 * MIB);
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
