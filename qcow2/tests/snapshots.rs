//! Internal snapshots made and deleted by our driver: qemu-img lists them, reads each one
//! back exactly, finds the image clean, and can delete them itself (and we delete its own).

mod common;

use std::path::Path;

use common::*;
use vdisk_block::{BlockDev, OpenOptions, ZeroMode};
use vdisk_qcow2::Qcow2Image;

fn open_rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(
        path,
        &OpenOptions {
            writable: true,
            ..options()
        },
    )
    .unwrap_or_else(|e| panic!("open rw {}: {e}", path.display()))
}

fn check_clean(image: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", image.to_str().expect("utf-8")])
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn snapshot_contents(image: &Path, name: &str, s: &Scratch) -> Vec<u8> {
    let raw = s.path("snap.raw");
    qemu_img(&[
        "convert",
        "-l",
        &format!("snapshot.name={name}"),
        "-O",
        "raw",
        image.to_str().expect("utf-8"),
        raw.to_str().expect("utf-8"),
    ]);
    let bytes = std::fs::read(&raw).expect("read");
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn scenario(name: &str, opts: &str) {
    let s = Scratch::new(name);
    let img = s.path("s.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().expect("u"), "6M"]);
    qemu_img(&args);
    qemu_io(&img, &["write -P 0x11 0 2m", "write -P 0x12 4m 100k"]);
    let v0 = qemu_contents(&img, &s);
    {
        let dev = open_rw(&img);
        dev.snapshot_create("first").expect("snapshot first");
        dev.write_at(&[0x21; 5000], 1000).expect("write");
        dev.write_zeroes(1 << 20, 1 << 20, ZeroMode::MayUnmap)
            .expect("zeroes");
        dev.snapshot_create("second").expect("snapshot second");
        assert!(dev.snapshot_create("second").is_err(), "duplicate name");
        dev.write_at(&[0x31; 70_000], 4 << 20).expect("write");
        dev.discard(0, 1 << 20).expect("discard");
        dev.flush().expect("flush");
    }
    check_clean(&img);
    let mut v1 = v0.clone();
    v1[1000..6000].fill(0x21);
    v1[1 << 20..2 << 20].fill(0);
    let mut v2 = v1.clone();
    v2[4 << 20..(4 << 20) + 70_000].fill(0x31);
    let active = qemu_contents(&img, &s);
    for i in 0..1 << 20 {
        assert!(active[i] == 0 || active[i] == v2[i], "discarded byte {i}");
    }
    v2[..1 << 20].copy_from_slice(&active[..1 << 20]);
    assert_same(&active, &v2, "active layer");
    assert_same(&snapshot_contents(&img, "first", &s), &v0, "snapshot first");
    assert_same(
        &snapshot_contents(&img, "second", &s),
        &v1,
        "snapshot second",
    );
    let list = qemu_img(&["snapshot", "-l", img.to_str().expect("u")]);
    assert!(list.contains("first") && list.contains("second"), "{list}");

    // We delete one, qemu-img deletes the other.
    open_rw(&img)
        .snapshot_delete("first")
        .expect("delete first");
    check_clean(&img);
    assert_same(
        &snapshot_contents(&img, "second", &s),
        &v1,
        "second after delete",
    );
    assert_same(&qemu_contents(&img, &s), &v2, "active after delete");
    qemu_img(&["snapshot", "-d", "second", img.to_str().expect("u")]);
    check_clean(&img);
    assert!(open(&img).snapshots().expect("list").is_empty());

    // And a snapshot qemu-img made, deleted by us; writes are in place again afterwards.
    qemu_img(&["snapshot", "-c", "q", img.to_str().expect("u")]);
    {
        let dev = open_rw(&img);
        assert!(dev.snapshot_delete("nope").is_err());
        dev.snapshot_delete("q").expect("delete qemu's snapshot");
        dev.write_at(&[0x41; 512], 0).expect("write");
        dev.flush().expect("flush");
    }
    check_clean(&img);
    v2[..512].fill(0x41);
    assert_same(
        &qemu_contents(&img, &s),
        &v2,
        "after deleting qemu's snapshot",
    );
}

#[test]
fn create_and_delete() {
    scenario("snap-default", "");
    scenario("snap-v2", "compat=0.10,cluster_size=4k");
    scenario("snap-ext", "extended_l2=on,refcount_bits=2");
}

#[test]
fn apply_reverts_to_a_snapshot() {
    for opts in ["", "cluster_size=512", "extended_l2=on"] {
        let s = Scratch::new("snap-apply");
        let img = s.path("a.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.to_str().expect("u"), "4M"]);
        qemu_img(&args);
        qemu_io(&img, &["write -P 0x51 0 1m"]);
        let v0 = qemu_contents(&img, &s);
        // A snapshot made by qemu-img, applied by us.
        qemu_img(&["snapshot", "-c", "q", img.to_str().expect("u")]);
        qemu_io(&img, &["write -P 0x52 512k 1m", "write -z 0 4k"]);
        {
            let dev = open_rw(&img);
            dev.snapshot_apply("q").expect("apply");
            let mut buf = vec![0u8; 4 << 20];
            dev.read_at(&mut buf, 0).expect("read");
            assert_same(&buf, &v0, "reverted (our view)");
            // Writes after the revert must not touch the snapshot.
            dev.write_at(&[0x53; 3000], 100).expect("write");
            dev.snapshot_create("ours").expect("create");
            dev.write_at(&[0x54; 70_000], 2 << 20).expect("write");
            dev.flush().expect("flush");
        }
        check_clean(&img);
        assert_same(&snapshot_contents(&img, "q", &s), &v0, "snapshot q intact");
        let mut v1 = v0.clone();
        v1[100..3100].fill(0x53);
        assert_same(&snapshot_contents(&img, "ours", &s), &v1, "snapshot ours");
        // Our snapshot, applied by qemu-img.
        qemu_img(&["snapshot", "-a", "ours", img.to_str().expect("u")]);
        check_clean(&img);
        assert_same(&qemu_contents(&img, &s), &v1, "qemu applied ours");
        assert_same(&read_all(&open(&img)), &v1, "we read qemu's revert");
    }
}

/// qemu-img 10 resizes v3 images that have snapshots (each snapshot keeps its own size) and
/// refuses v2 ones: shrinking and growing the active layer through vdisk must leave every
/// snapshot as it was, the image clean, and the active layer equal to qemu-img's own resize
/// of a twin copy.
#[test]
fn resize_under_snapshots_matches_qemu() {
    use vdisk_block::Preallocation;
    for opts in ["cluster_size=65536", "cluster_size=512,refcount_bits=4"] {
        let s = Scratch::new("snap-resize");
        let ours = s.path("ours.qcow2");
        let twin = s.path("twin.qcow2");
        let (o, t) = (ours.to_str().expect("u"), twin.to_str().expect("u"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, o, "8M"]);
        // Data on both sides of the new end, and an L2 table wholly past it.
        qemu_io(
            &ours,
            &[
                "write -P 0x51 0 1m",
                "write -P 0x52 2900k 300k",
                "write -P 0x53 7m 1m",
            ],
        );
        qemu_img(&["snapshot", "-c", "before", o]);
        let before = qemu_contents(&ours, &s);
        std::fs::copy(&ours, &twin).expect("twin");

        // Cluster-aligned: after an unaligned shrink and a grow, qemu-img shows the stale
        // tail of the last partial cluster again, where vdisk reads zeroes (on purpose).
        let shrunk = 3 << 20;
        {
            let dev = open_rw(&ours);
            dev.resize(shrunk, Preallocation::Off).expect("shrink");
            dev.resize(10 << 20, Preallocation::Off).expect("grow");
            dev.write_at(&[0x54; 4096], 9 << 20)
                .expect("write past the old end");
            dev.flush().expect("flush");
        }
        let shrunk_arg = shrunk.to_string();
        qemu_img(&["resize", "-q", "--shrink", t, &shrunk_arg]);
        qemu_img(&["resize", "-q", t, "10M"]);
        qemu_io(&twin, &["write -P 0x54 9m 4k"]);

        let mut snaps = Vec::new();
        for img in [&ours, &twin] {
            check_clean(img);
            // `convert -l` reads a snapshot at the image's current size (10M): the
            // snapshot's 8M, then zeroes where its L1 table ends.
            let snap = snapshot_contents(img, "before", &s);
            assert_eq!(snap.len(), 10 << 20, "{opts}: snapshot read length");
            assert_same(
                &snap[..8 << 20],
                &before,
                &format!("{opts}: snapshot after resize ({})", img.display()),
            );
            assert!(
                snap[8 << 20..].iter().all(|&b| b == 0),
                "{opts}: snapshot tail"
            );
            snaps.push(snap);
        }
        assert_same(
            &snaps[0],
            &snaps[1],
            &format!("{opts}: snapshot, ours and qemu's"),
        );
        let ours_now = qemu_contents(&ours, &s);
        assert_eq!(ours_now.len(), 10 << 20, "{opts}: new size");
        assert_same(
            &ours_now,
            &qemu_contents(&twin, &s),
            &format!("{opts}: active layer against qemu-img's resize"),
        );
        // What was cut off reads as zeroes after growing again, as in qemu.
        assert!(ours_now[shrunk as usize..9 << 20].iter().all(|&b| b == 0));
    }

    // v2 snapshot entries have no size: refused, as qemu-img refuses.
    let s = Scratch::new("snap-resize-v2");
    let img = s.path("v2.qcow2");
    let p = img.to_str().expect("u");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "4M"]);
    qemu_img(&["snapshot", "-c", "s", p]);
    let err = open_rw(&img)
        .resize(8 << 20, Preallocation::Off)
        .expect_err("v2 with snapshots");
    assert!(
        err.to_string()
            .contains("Can't resize a v2 image which has snapshots"),
        "{err}"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["resize", p, "8M"])
        .output()
        .expect("qemu-img resize");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Can't resize a v2 image which has snapshots"));
}
