//! VHDX images vdisk creates pass `qemu-img check`, have the size and block size qemu-img
//! reports, read as zeroes, take qemu-io writes that read back through both tools alike, and
//! the options are validated with qemu-img's messages.

mod common;

use std::path::Path;
use std::process::Command;

use common::json::Json;
use common::{have_qemu, read_all, run, Scratch};
use vdisk_block::{CreateOptions, Format, OpenOptions};
use vdisk_vhdx::VhdxFormat;

const MIB: u64 = 1 << 20;

fn create(path: &Path, size: u64, opts: &str) -> vdisk_block::Result<()> {
    VhdxFormat.create(
        path,
        CreateOptions {
            size,
            options: CreateOptions::parse_options(opts).expect("options"),
        },
    )
}

fn qemu_info(path: &Path) -> Json {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vhdx"])
        .arg(path));
    Json::parse(&String::from_utf8_lossy(&out))
}

fn qemu_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(path)
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn created_images_satisfy_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("create");
    for (size, opts, block) in [
        (64 * MIB, "", 8 * MIB),
        (40 * MIB + 1, "subformat=dynamic,block_size=1M", MIB),
        (3 << 30, "log_size=3M", 16 * MIB),
        (
            24 * MIB,
            "subformat=fixed,block_state_zero=off,block_size=2M",
            2 * MIB,
        ),
        (24 * MIB, "subformat=fixed", 8 * MIB),
        (0, "", 8 * MIB),
    ] {
        let path = dir.path(&format!(
            "img-{size}-{}.vhdx",
            opts.replace([',', '='], "_")
        ));
        create(&path, size, opts).unwrap_or_else(|e| panic!("create {opts}: {e}"));
        qemu_check_clean(&path);
        let info = qemu_info(&path);
        let vsize = size.next_multiple_of(512);
        assert_eq!(info.get("virtual-size").and_then(Json::as_u64), Some(vsize));
        assert_eq!(info.get("cluster-size").and_then(Json::as_u64), Some(block));
        let img = VhdxFormat
            .open(&path, &OpenOptions::read_only())
            .expect("open our image");
        assert_eq!(img.size(), vsize);
        if vsize == 0 || vsize > 256 * MIB {
            continue;
        }
        assert!(read_all(img.as_ref()).iter().all(|&b| b == 0));
        let st = img.block_status(0, vsize).expect("status");
        if opts.contains("block_state_zero=off") {
            assert!(st.data && st.allocated && st.len == vsize, "{st:?}");
        } else {
            assert!(!st.allocated && st.zero && st.len == vsize, "{st:?}");
        }
        drop(img);
        run(Command::new("qemu-io")
            .args([
                "-f",
                "vhdx",
                "-c",
                "write -P 0x5a 1000 70000",
                "-c",
                &format!("write -P 0xa5 {} 4096", vsize - 4096),
            ])
            .arg(&path));
        qemu_check_clean(&path);
        let raw = dir.path("oracle.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(&path)
            .arg(&raw));
        let img = VhdxFormat
            .open(&path, &OpenOptions::read_only())
            .expect("reopen");
        assert!(read_all(img.as_ref()) == std::fs::read(&raw).expect("raw"));
    }
}

#[test]
fn bad_options_are_refused_like_qemu_img() {
    let dir = Scratch::new("create-bad");
    let p = dir.path("bad.vhdx");
    for (size, opts, why) in [
        (MIB, "block_size=3M", "Block size must be a power of two"),
        (MIB, "log_size=0", "Log size must be a multiple of 1 MB"),
        (MIB, "subformat=weird", "does not accept value 'weird'"),
        (MIB, "block_state_zero=maybe", "expects 'on' or 'off'"),
        (65 << 40, "", "Image size too large; max of 64TB"),
        (MIB, "cluster_size=64k", "Invalid parameter 'cluster_size'"),
    ] {
        let err = common::must_fail(create(&p, size, opts), "bad option accepted");
        assert!(err.to_string().contains(why), "{opts}: {err}");
    }
}
