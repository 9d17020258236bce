//! `rebase` against qemu-img 10: the same words, exit codes and progress; after a safe
//! rebase the guest sees what it saw before, the image holds the same clusters as qemu-img's
//! rebase wrote (map), the backing fields are qemu-img's, and qemu-img check is clean.

mod twins;

use std::path::Path;

use twins::{qemu, qemu_io, Twins};

/// A chain of three with patterns at every level (each overwriting part of the one below),
/// an unrelated base with other contents, a smaller raw base, and other formats.
fn setup(dir: &Path) {
    let create = |args: &[&str]| {
        let mut full = vec!["create", "-q", "-f"];
        full.extend_from_slice(args);
        qemu(dir, &full);
    };
    create(&["qcow2", "base.qcow2", "8M"]);
    qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &[
            "write -P 0xb0 0 3M",
            "write -P 0xb1 5M 1M",
            "write -z 1M 64k",
        ],
    );
    create(&["qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]);
    qemu_io(
        dir,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 0xa0 512k 1M",
            "write -P 0xa1 4M 192k",
            "write -z 5M 64k",
        ],
    );
    create(&["qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0xc0 1M 64k",
            "write -P 0xc1 4160k 4k",
            "write -P 0xc2 7M 100k",
        ],
    );
    create(&["qcow2", "other.qcow2", "8M"]);
    qemu_io(
        dir,
        "qcow2",
        "other.qcow2",
        &["write -P 0xd0 2M 3M", "write -P 0xb0 0 1M"],
    );
    create(&["raw", "small.raw", "3M"]);
    qemu_io(dir, "raw", "small.raw", &["write -P 0xe0 0 2M"]);
    create(&["qcow2", "alone.qcow2", "8M"]);
    qemu_io(dir, "qcow2", "alone.qcow2", &["write -P 0xf0 3M 64k"]);
    create(&[
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "small-cl.qcow2",
    ]);
    qemu_io(dir, "qcow2", "small-cl.qcow2", &["write -P 0xc3 6M 10k"]);
    create(&[
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "xl2.qcow2",
    ]);
    qemu_io(
        dir,
        "qcow2",
        "xl2.qcow2",
        &[
            "write -P 0xc4 100k 4k",
            "write -P 0xc5 4200k 8k",
            "write -z 600k 32k",
        ],
    );
    create(&[
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "-u",
        "orphan.qcow2",
        "8M",
    ]);
    std::fs::create_dir_all(dir.join("sub")).expect("sub");
    create(&["qcow2", "sub/sb.qcow2", "8M"]);
    qemu_io(dir, "qcow2", "sub/sb.qcow2", &["write -P 0x99 0 1M"]);
    create(&["qcow2", "-b", "sb.qcow2", "-F", "qcow2", "sub/st.qcow2"]);
    for fmt in ["vmdk", "vhdx", "vpc"] {
        create(&[fmt, &format!("x.{fmt}"), "4M"]);
    }
}

/// The guest view of `image` in `dir` as a raw file, for before/after comparisons.
fn snapshot_raw(dir: &Path, image: &str, out: &str) {
    qemu(dir, &["convert", "-f", "qcow2", "-O", "raw", image, out]);
}

fn unchanged(t: &Twins, image: &str, raw: &str) {
    for dir in [&t.q, &t.d, &t.v] {
        qemu(dir, &["compare", "-f", "qcow2", "-F", "raw", image, raw]);
    }
}

#[test]
fn refusals_match_qemu_img() {
    let t = Twins::new("rebase-refuse", setup);
    for args in [
        &["rebase", "top.qcow2"][..],
        &["rebase", "-b", "base.qcow2"],
        &["rebase", "-b", "base.qcow2", "top.qcow2", "mid.qcow2"],
        &["rebase", "-b", "base.qcow2", "top.qcow2", "--bogus"],
        &["rebase", "-b", "base.qcow2", "top.qcow2"],
        &["rebase", "-u", "-b", "base.qcow2", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "bogus", "top.qcow2"],
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-b", "missing.qcow2", "top.qcow2"],
        &[
            "rebase",
            "-t",
            "bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "-T",
            "bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-p", "-t", "bogus", "-u", "-b", "", "top.qcow2"],
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "small.raw",
        ],
        &[
            "rebase",
            "-f",
            "raw",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "small.raw",
        ],
        &["rebase", "-u", "-f", "raw", "-b", "", "small.raw"],
        &["rebase", "-u", "-f", "raw", "small.raw"],
        &["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "x.vmdk"],
        &["rebase", "-b", "", "x.vmdk"],
        &["rebase", "-c", "-b", "", "x.vhdx"],
        &["rebase", "-b", "", "x.vpc"],
        &["rebase", "-b", "nob.qcow2", "-F", "qcow2", "sub/st.qcow2"],
        // Safe mode opens the old chain, whose backing file is gone.
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "orphan.qcow2"],
    ] {
        let r = t.step(args);
        assert_eq!(r.code, 1, "{args:?} must fail: {r:?}");
    }
    for image in ["top.qcow2", "mid.qcow2", "sub/st.qcow2"] {
        t.same_image(image, "qcow2");
    }
}

#[test]
fn safe_rebase_keeps_the_guest_view_like_qemu_img() {
    let t = Twins::new("rebase-safe", setup);
    t.each(|dir| snapshot_raw(dir, "top.qcow2", "top-before.raw"));
    t.each(|dir| snapshot_raw(dir, "small-cl.qcow2", "small-cl-before.raw"));
    t.each(|dir| snapshot_raw(dir, "alone.qcow2", "alone-before.raw"));
    // Onto the bottom of its own chain, then onto an unrelated base, a shorter raw base,
    // compressed, and finally standalone.
    for args in [
        &[
            "rebase",
            "-p",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ][..],
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-p", "-b", "small.raw", "-F", "raw", "top.qcow2"],
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-p", "-b", "", "top.qcow2"],
    ] {
        t.step_ok(args);
        t.same_image("top.qcow2", "qcow2");
        t.same_map("top.qcow2", "qcow2");
        unchanged(&t, "top.qcow2", "top-before.raw");
    }
    // 4 KiB clusters over a 64 KiB-cluster chain.
    t.step_ok(&[
        "rebase",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "small-cl.qcow2",
    ]);
    t.same_image("small-cl.qcow2", "qcow2");
    t.same_map("small-cl.qcow2", "qcow2");
    unchanged(&t, "small-cl.qcow2", "small-cl-before.raw");
    // Extended L2: writes are widened to 4 KiB subclusters, not 128 KiB clusters.
    t.each(|dir| snapshot_raw(dir, "xl2.qcow2", "xl2-before.raw"));
    for args in [
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "xl2.qcow2"][..],
        &["rebase", "-b", "", "xl2.qcow2"],
    ] {
        t.step_ok(args);
        t.same_image("xl2.qcow2", "qcow2");
        t.same_map("xl2.qcow2", "qcow2");
        unchanged(&t, "xl2.qcow2", "xl2-before.raw");
    }
    // A standalone image onto a base: where the base has data, the image must now hold
    // zeroes. qemu-img makes zero clusters; vdisk writes zero data (its qcow2 driver leaves
    // a range that already reads as zeroes unallocated), so only the contents are compared.
    t.step_ok(&[
        "rebase",
        "-p",
        "-b",
        "other.qcow2",
        "-F",
        "qcow2",
        "alone.qcow2",
    ]);
    t.same_image("alone.qcow2", "qcow2");
    unchanged(&t, "alone.qcow2", "alone-before.raw");
    t.step_ok(&[
        "rebase",
        "--image-opts",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "driver=qcow2,file.filename=alone.qcow2",
    ]);
    t.same_image("alone.qcow2", "qcow2");
    unchanged(&t, "alone.qcow2", "alone-before.raw");
    // Backing names are relative to the image's folder.
    t.each(|dir| snapshot_raw(dir, "sub/st.qcow2", "st-before.raw"));
    t.step_ok(&[
        "rebase",
        "-b",
        "../base.qcow2",
        "-F",
        "qcow2",
        "sub/st.qcow2",
    ]);
    t.same_image("sub/st.qcow2", "qcow2");
    t.same_map("sub/st.qcow2", "qcow2");
    unchanged(&t, "sub/st.qcow2", "st-before.raw");
}

#[test]
fn unsafe_rebase_only_renames_like_qemu_img() {
    let t = Twins::new("rebase-unsafe", setup);
    t.each(|dir| snapshot_raw(dir, "top.qcow2", "top-before.raw"));
    // The backing file moves: -u points the image at its new name without reading it.
    t.each(|dir| std::fs::rename(dir.join("mid.qcow2"), dir.join("moved.qcow2")).expect("mv"));
    t.step_ok(&[
        "rebase",
        "-u",
        "-b",
        "moved.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    t.same_image("top.qcow2", "qcow2");
    t.same_map("top.qcow2", "qcow2");
    unchanged(&t, "top.qcow2", "top-before.raw");
    t.step_ok(&[
        "rebase",
        "-p",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "orphan.qcow2",
    ]);
    t.same_info("orphan.qcow2");
    // Without -b, -u drops the backing file.
    t.step_ok(&["rebase", "-u", "orphan.qcow2"]);
    t.same_image("orphan.qcow2", "qcow2");
    t.step_ok(&[
        "rebase",
        "-u",
        "-U",
        "-b",
        "base.qcow2",
        "-F",
        "raw",
        "orphan.qcow2",
    ]);
    t.same_image("orphan.qcow2", "qcow2");
}

/// qemu-img aborts on `rebase -c` of an extended-L2 image whose clusters are partly held
/// (its compressed writes would cover the held subclusters); vdisk writes such stretches
/// plainly and keeps the guest view.
#[test]
fn compressed_rebase_of_extended_l2_keeps_held_subclusters() {
    let s = vdisk_tests::Scratch::new("rebase-xl2");
    let dir = s.dir();
    qemu(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(
        dir,
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 512k"],
    );
    qemu(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "x.qcow2",
        &["write -P 4 100k 4k", "write -P 5 3200k 8k"],
    );
    snapshot_raw(dir, "x.qcow2", "before.raw");
    let r = vdisk_tests::run_in(
        dir,
        Path::new(twins::VDISK),
        &["rebase", "-c", "-b", "", "x.qcow2"],
    );
    twins::ok(&r, "vdisk rebase -c");
    qemu(
        dir,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "x.qcow2",
            "before.raw",
        ],
    );
    qemu(dir, &["check", "x.qcow2"]);
    let info = qemu(dir, &["info", "--output=json", "x.qcow2"]);
    assert!(!info.stdout.contains("backing-filename"), "{}", info.stdout);
}
