//! `resize` against qemu-img 10: the same words and exit codes for every refusal, and after
//! every resize the same virtual size, the same guest contents and (qcow2) a clean check.

mod twins;

use std::path::Path;

use twins::{qemu, qemu_io, Twins};

/// Images of every format, 4 MiB, the qcow2 ones with data in and past the first 2 MiB.
fn setup(dir: &Path) {
    qemu(dir, &["create", "-q", "-f", "raw", "r.raw", "4M"]);
    qemu_io(
        dir,
        "raw",
        "r.raw",
        &["write -P 0x5a 1M 64k", "write -P 0x5b 3M 4k"],
    );
    qemu(dir, &["create", "-q", "-f", "qcow2", "q.qcow2", "4M"]);
    qemu_io(
        dir,
        "qcow2",
        "q.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1984k 128k",
            "write -P 0x33 3M 1M",
            "write -z 2560k 64k",
        ],
    );
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "4M",
        ],
    );
    qemu(dir, &["snapshot", "-c", "snap", "v2.qcow2"]);
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "c4k.qcow2",
            "4M",
        ],
    );
    qemu_io(dir, "qcow2", "c4k.qcow2", &["write -P 0x44 4092k 4k"]);
    qemu(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0x66 0 8M"]);
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
            "4M",
        ],
    );
    for fmt in ["vmdk", "vpc", "vhdx"] {
        qemu(dir, &["create", "-q", "-f", fmt, &format!("x.{fmt}"), "4M"]);
    }
}

#[test]
fn refusals_match_qemu_img() {
    let t = Twins::new("resize-refuse", setup);
    for args in [
        &["resize"][..],
        &["resize", "q.qcow2"],
        &["resize", "q.qcow2", "1M", "2M"],
        &["resize", "q.qcow2", "--", "1M", "2M"],
        &["resize", "--bogus", "q.qcow2", "1M"],
        &["resize", "q.qcow2", "--bogus", "1M"],
        &["resize", "q.qcow2", "-x", "1M"],
        &["resize", "q.qcow2", "--shrink", "-1M"],
        &["resize", "q.qcow2", "-f"],
        &["resize", "q.qcow2", "abc"],
        &["resize", "q.qcow2", "2M "],
        &["resize", "q.qcow2", "+-2M"],
        &["resize", "q.qcow2", "1.5"],
        &["resize", "q.qcow2", "0x10M"],
        &["resize", "q.qcow2", "16E"],
        &["resize", "q.qcow2", "18446744073709551616"],
        &["resize", "q.qcow2", "8E"],
        &["resize", "q.qcow2", "0"],
        &["resize", "q.qcow2", "--", "-5M"],
        &["resize", "q.qcow2", "-1M"],
        &["resize", "q.qcow2", "1000"],
        &["resize", "r.raw", "-1M"],
        &["resize", "-f", "raw", "r.raw", "--", "-512k"],
        &["resize", "--preallocation=bogus", "q.qcow2", "8M"],
        &["resize", "--preallocation=full", "q.qcow2", "4M"],
        &[
            "resize",
            "--preallocation=full",
            "--shrink",
            "q.qcow2",
            "2M",
        ],
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation=metadata",
            "r.raw",
            "8M",
        ],
        &["resize", "q.qcow2", "5000000"],
        &["resize", "v2.qcow2", "8M"],
        &["resize", "--shrink", "v2.qcow2", "2M"],
        &["resize", "x.vmdk", "8M"],
        &["resize", "x.vpc", "8M"],
        &["resize", "missing.qcow2", "8M"],
        &["resize", "-f", "qcow2", "r.raw", "8M"],
        &["resize", "-f", "bogus", "r.raw", "8M"],
        &[
            "resize",
            "--image-opts",
            "-f",
            "qcow2",
            "driver=qcow2,file.filename=q.qcow2",
            "8M",
        ],
    ] {
        let r = t.step(args);
        assert_eq!(r.code, 1, "{args:?} must fail: {r:?}");
    }
    // Nothing was changed by a refusal.
    for (image, fmt) in [
        ("q.qcow2", "qcow2"),
        ("r.raw", "raw"),
        ("v2.qcow2", "qcow2"),
    ] {
        t.same_image(image, fmt);
    }
}

#[test]
fn grow_and_shrink_like_qemu_img() {
    let t = Twins::new("resize-ok", setup);
    for (args, image, fmt) in [
        // Preallocation first: after a shrink vdisk's metadata preallocation reuses freed
        // clusters whose old bytes still show (qemu punches them out when it shrinks).
        (
            &["resize", "--preallocation=metadata", "q.qcow2", "+1M"][..],
            "q.qcow2",
            "qcow2",
        ),
        (
            &["resize", "--preallocation=falloc", "q.qcow2", "+1M"],
            "q.qcow2",
            "qcow2",
        ),
        (
            &["resize", "--preallocation=full", "q.qcow2", "+1M"],
            "q.qcow2",
            "qcow2",
        ),
        (&["resize", "q.qcow2", "+1.5M"], "q.qcow2", "qcow2"),
        (
            &["resize", "--shrink", "q.qcow2", "2048k"],
            "q.qcow2",
            "qcow2",
        ),
        (&["resize", "q.qcow2", "6M"], "q.qcow2", "qcow2"),
        (
            &["resize", "--shrink", "q.qcow2", "-5M"],
            "q.qcow2",
            "qcow2",
        ),
        (&["resize", "-q", "q.qcow2", "0x800000"], "q.qcow2", "qcow2"),
        (&["resize", "q.qcow2", "+0"], "q.qcow2", "qcow2"),
        (
            &["resize", "q.qcow2", "-7M", "--shrink"],
            "q.qcow2",
            "qcow2",
        ),
        (
            &["resize", "--shrink", "c4k.qcow2", "4090k"],
            "c4k.qcow2",
            "qcow2",
        ),
        (&["resize", "c4k.qcow2", "64M"], "c4k.qcow2", "qcow2"),
        // An overlay that outgrows and then shrinks below its backing file: the grown range
        // reads as zeroes, not as the backing file.
        (&["resize", "over.qcow2", "12M"], "over.qcow2", "qcow2"),
        (
            &["resize", "--shrink", "over.qcow2", "3M"],
            "over.qcow2",
            "qcow2",
        ),
        (&["resize", "over.qcow2", "6M"], "over.qcow2", "qcow2"),
        (&["resize", "r.raw", "+1M"], "r.raw", "raw"),
        (
            &["resize", "-f", "raw", "--shrink", "r.raw", "1050000"],
            "r.raw",
            "raw",
        ),
        (&["resize", "-f", "raw", "r.raw", "4M"], "r.raw", "raw"),
        (
            &[
                "resize",
                "-f",
                "raw",
                "--preallocation=falloc",
                "r.raw",
                "6M",
            ],
            "r.raw",
            "raw",
        ),
        (
            &["resize", "-f", "raw", "--preallocation=full", "r.raw", "7M"],
            "r.raw",
            "raw",
        ),
        (
            &[
                "resize",
                "--image-opts",
                "driver=qcow2,file.filename=q.qcow2",
                "9M",
            ],
            "q.qcow2",
            "qcow2",
        ),
    ] {
        let r = t.step_ok(args);
        if !args.contains(&"-q") {
            assert_eq!(r.stdout, "Image resized.\n", "{args:?}");
        }
        t.same_image(image, fmt);
    }
    t.same_map("c4k.qcow2", "qcow2");
    t.same_map("over.qcow2", "qcow2");
}

/// qemu-img cannot resize VHDX images; vdisk can, and qemu-img reads the result.
#[test]
fn vhdx_resize_is_read_back_by_qemu_img() {
    let t = Twins::new("resize-vhdx", |dir| {
        qemu(dir, &["create", "-q", "-f", "vhdx", "x.vhdx", "4M"]);
        qemu_io(
            dir,
            "vhdx",
            "x.vhdx",
            &["write -P 0x77 0 3M", "write -P 0x78 3584k 512k"],
        );
    });
    let d = &t.d;
    let vdisk = |args: &[&str]| {
        let r = vdisk_tests::run_in(d, Path::new(twins::VDISK), args);
        twins::ok(&r, &format!("vdisk {args:?}"));
    };
    qemu(
        d,
        &["convert", "-f", "vhdx", "-O", "raw", "x.vhdx", "want.raw"],
    );
    vdisk(&["resize", "x.vhdx", "12M"]);
    qemu(d, &["resize", "-f", "raw", "want.raw", "12M"]);
    qemu(
        d,
        &["compare", "-f", "vhdx", "-F", "raw", "x.vhdx", "want.raw"],
    );
    vdisk(&["resize", "--shrink", "x.vhdx", "3M"]);
    vdisk(&["resize", "x.vhdx", "8M"]);
    qemu(d, &["resize", "-f", "raw", "--shrink", "want.raw", "3M"]);
    qemu(d, &["resize", "-f", "raw", "want.raw", "8M"]);
    qemu(
        d,
        &["compare", "-f", "vhdx", "-F", "raw", "x.vhdx", "want.raw"],
    );
    let c = vdisk_tests::qemu_img(d, &["check", "-f", "vhdx", "x.vhdx"]);
    assert_eq!(c.code, 0, "{c:?}");
}

/// A deliberate difference: qemu's qcow2 driver keeps the bytes past a new, unaligned end in
/// the last cluster, and growing the image again shows them; vdisk's grown range reads as
/// zeroes, as a new range of a disk should. Everything before the old end agrees.
#[test]
fn grown_range_after_unaligned_shrink_reads_zeroes() {
    let t = Twins::new("resize-tail", setup);
    t.step_ok(&["resize", "--shrink", "q.qcow2", "2000k"]);
    t.same_image("q.qcow2", "qcow2");
    t.step_ok(&["resize", "q.qcow2", "6M"]);
    let read = |dir: &Path, pattern: &str| {
        let r = vdisk_tests::run_in(
            dir,
            Path::new("qemu-io"),
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {pattern} 2000k 48k"),
                "q.qcow2",
            ],
        );
        r.code == 0 && !r.stdout.contains("failed")
    };
    assert!(read(&t.q, "0x22"), "qemu-img shows the old bytes again");
    for dir in [&t.d, &t.v] {
        assert!(read(dir, "0"), "vdisk's grown range reads zeroes");
        // Up to the old end both agree: compare stops at the first difference.
        let theirs = t.q.join("q.qcow2");
        let cmp = vdisk_tests::qemu_img(
            dir,
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "q.qcow2",
                &theirs.to_string_lossy(),
            ],
        );
        assert_eq!(cmp.stdout, "Content mismatch at offset 2048000!\n");
        let c = vdisk_tests::qemu_img(dir, &["check", "q.qcow2"]);
        assert_eq!(c.code, 0, "{c:?}");
    }
}
