//! Crash consistency at operation boundaries: after every write, write-zeroes or discard
//! (without a flush) the image file as it stands must have no corruption (leaked clusters
//! are allowed: a crash may leak, never corrupt), and after every flush it must be fully
//! clean and read exactly as the model says.
//!
//! Every write goes to the host file at once (pwrite), so a copy of the file taken between
//! operations is what a crash at that point would leave if the host kept write order; the
//! ordering rules (data and refcounts before tables, tables before refcount decrements) are
//! what makes each such copy consistent.

mod common;

use std::path::Path;

use common::*;
use vdisk_block::testing::Rng;
use vdisk_block::{BlockDev, MemImage, OpenOptions, ZeroMode};
use vdisk_qcow2::Qcow2Image;

fn check_counts(image: &Path) -> (u64, u64, u64) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", image.to_str().expect("utf-8")])
        .output()
        .expect("qemu-img check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let f = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (f("corruptions"), f("leaks"), f("check-errors"))
}

fn crash_run(name: &str, setup: &[&str], opts: &str, snapshot: bool) {
    let s = Scratch::new(name);
    let img = s.path("img.qcow2");
    let size: u64 = 4 << 20;
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().expect("u"), "4M"]);
    qemu_img(&args);
    if !setup.is_empty() {
        qemu_io(&img, setup);
    }
    if snapshot {
        qemu_img(&["snapshot", "-c", "s", img.to_str().expect("u")]);
    }
    let model = MemImage::from_bytes(&qemu_contents(&img, &s));
    let copy = s.path("crash.qcow2");
    let dev = Qcow2Image::open(
        &img,
        &OpenOptions {
            writable: true,
            ..options()
        },
    )
    .expect("open rw");
    let mut rng = Rng::new(name.len() as u64);
    for step in 0..80 {
        let cs = 64 << 10;
        let off = rng.below(size - 1);
        let len = (1 + rng.below(3 * cs)).min(size - off);
        match rng.below(12) {
            10 => {
                let snaps = dev.snapshots().expect("list");
                if snaps.len() < 3 {
                    dev.snapshot_create(&format!("s{step}")).expect("snapshot");
                } else {
                    dev.snapshot_delete(&snaps[0].id).expect("delete snapshot");
                }
            }
            11 => {
                let cs = dev.header().cluster_size();
                let start = off / cs * cs;
                let n = cs.min(size - start);
                let mut buf = vec![0u8; n as usize];
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i / 9) as u8 ^ (step as u8);
                }
                dev.write_compressed(&buf, start).expect("compressed");
                model.write_at(&buf, start).expect("model");
            }
            0..=4 => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                dev.write_at(&buf, off).expect("write");
                model.write_at(&buf, off).expect("model");
            }
            5 | 6 => {
                let mode = if rng.chance(50) {
                    ZeroMode::MayUnmap
                } else {
                    ZeroMode::KeepAllocated
                };
                dev.write_zeroes(off, len, mode).expect("zeroes");
                model.write_zeroes(off, len, mode).expect("model");
            }
            7 => {
                // Whole clusters only, so the model knows what discard leaves.
                let start = off / cs * cs;
                let n = (len / cs).max(1) * cs;
                let n = n.min(size - start);
                if n & (cs - 1) == 0 || start + n == size {
                    dev.discard(start, n).expect("discard");
                    let mut now = vec![0u8; n as usize];
                    dev.read_at(&mut now, start).expect("read back");
                    model.write_at(&now, start).expect("model");
                }
            }
            _ => {
                dev.flush().expect("flush");
                std::fs::copy(&img, &copy).expect("copy");
                assert_eq!(check_counts(&copy), (0, 0, 0), "{name}: after flush {step}");
                assert_same(
                    &qemu_contents(&copy, &s),
                    &model.to_vec(),
                    &format!("{name}: flushed contents at step {step}"),
                );
                continue;
            }
        }
        std::fs::copy(&img, &copy).expect("copy");
        let (corruptions, _leaks, errors) = check_counts(&copy);
        assert_eq!(
            (corruptions, errors),
            (0, 0),
            "{name}: unflushed state at step {step}"
        );
    }
    dev.flush().expect("flush");
    drop(dev);
    assert_eq!(check_counts(&img), (0, 0, 0), "{name}: final");
    assert_same(&qemu_contents(&img, &s), &model.to_vec(), name);
}

#[test]
fn consistent_at_every_operation_boundary() {
    crash_run("crash-plain", &[], "", false);
    crash_run(
        "crash-v2",
        &["write -P 3 0 1m"],
        "compat=0.10,cluster_size=4k",
        false,
    );
    crash_run("crash-snapshot", &["write -P 7 0 4m"], "", true);
    crash_run(
        "crash-ext",
        &["write -P 5 1m 1m"],
        "extended_l2=on,cluster_size=32k",
        true,
    );
}
