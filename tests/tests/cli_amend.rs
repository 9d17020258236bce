//! `amend` against qemu-img 10: the same words, exit codes and progress output, and after
//! every change the same qcow2 features, size and contents, with a clean check.

mod twins;

use std::path::Path;

use twins::{qemu, qemu_io, Twins};

fn setup(dir: &Path) {
    qemu(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(
        dir,
        "qcow2",
        "a.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 3M 64k"],
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
    qemu_io(dir, "qcow2", "v2.qcow2", &["write -P 0x21 64k 128k"]);
    qemu(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
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
            "t.qcow2",
        ],
    );
    qemu(dir, &["create", "-q", "-f", "raw", "r.raw", "4M"]);
    for fmt in ["vmdk", "vhdx", "vpc"] {
        qemu(dir, &["create", "-q", "-f", fmt, &format!("x.{fmt}"), "4M"]);
    }
}

#[test]
fn refusals_and_help_match_qemu_img() {
    let t = Twins::new("amend-refuse", setup);
    for args in [
        &["amend", "a.qcow2"][..],
        &["amend", "-o", "lazy_refcounts=on"],
        &["amend", "-o", "lazy_refcounts=on", "a.qcow2", "t.qcow2"],
        &["amend", "-t", "bogus", "-o", "lazy_refcounts=on", "a.qcow2"],
        &["amend", "-U", "-o", "lazy_refcounts=on", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "a.qcow2", "--bogus"],
        &["amend", "-o", "", "a.qcow2"],
        &["amend", "-o", ",", "a.qcow2"],
        &["amend", "-o", "help"],
        &["amend", "-f", "raw", "-o", "help"],
        &["amend", "-f", "vmdk", "-o", "help"],
        &["amend", "-f", "bogus", "-o", "help"],
        &["amend", "-o", "help", "r.raw"],
        &["amend", "-f", "raw", "-o", "size=1M", "r.raw"],
        &["amend", "-o", "lazy_refcounts=on", "x.vmdk"],
        &["amend", "-o", "lazy_refcounts=on", "x.vhdx"],
        &["amend", "-o", "lazy_refcounts=on", "x.vpc"],
        &["amend", "-o", "lazy_refcounts=on", "missing.qcow2"],
        &["amend", "-o", "bogus=1", "a.qcow2"],
        &["amend", "-o", "cluster_size=4k", "a.qcow2"],
        &["amend", "-o", "cluster_size=4k,bogus=1", "a.qcow2"],
        &["amend", "-o", "preallocation=full", "a.qcow2"],
        &["amend", "-o", "encrypt.format=luks", "a.qcow2"],
        &["amend", "-o", "encrypt.new-secret=x", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=maybe", "a.qcow2"],
        &["amend", "-o", "refcount_bits=abc", "a.qcow2"],
        &["amend", "-o", "size", "a.qcow2"],
        &["amend", "-o", "size=2000000", "a.qcow2"],
        &["amend", "-o", "compat=2", "a.qcow2"],
        &["amend", "-o", "compat=v3,compat=bogus", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "v2.qcow2"],
        // qemu 10 changes backing files only through rebase.
        &["amend", "-o", "backing_file=base.qcow2", "a.qcow2"],
        &[
            "amend",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "a.qcow2",
        ],
        &["amend", "-o", "backing_file=base.qcow2", "t.qcow2"],
        &["amend", "-o", "backing_fmt=raw", "t.qcow2"],
        &[
            "amend",
            "-o",
            "backing_file=./base.qcow2,backing_fmt=qcow2",
            "t.qcow2",
        ],
        &["amend", "-p", "-o", "lazy_refcounts=on"],
        &["amend", "-p", "-o", "bogus=on", "a.qcow2"],
        &["amend", "-p", "-o", "compat=2", "a.qcow2"],
        &["amend", "-p", "-o", "backing_file=x", "a.qcow2"],
    ] {
        let r = t.step(args);
        assert_eq!(r.code, 1, "{args:?} must fail: {r:?}");
    }
    for args in [
        &["amend", "-o", "help", "a.qcow2"][..],
        &["amend", "-f", "qcow2", "-o", "help"],
        &["amend", "-f", "qcow2", "-o", "?", "nothing-needed"],
        &["amend", "-p", "-f", "qcow2", "-o", "help"],
    ] {
        let r = t.step_ok(args);
        assert!(r.stdout.contains("Amend options for 'qcow2':"), "{r:?}");
    }
    for (image, fmt) in [
        ("a.qcow2", "qcow2"),
        ("v2.qcow2", "qcow2"),
        ("t.qcow2", "qcow2"),
    ] {
        t.same_image(image, fmt);
    }
}

#[test]
fn changes_match_qemu_img() {
    let t = Twins::new("amend-ok", setup);
    for (args, image) in [
        (
            &["amend", "-o", "lazy_refcounts=on", "a.qcow2"][..],
            "a.qcow2",
        ),
        (&["amend", "-o", "lazy_refcounts=off", "a.qcow2"], "a.qcow2"),
        (
            &[
                "amend",
                "-o",
                "lazy_refcounts",
                "-o",
                "nolazy_refcounts",
                "a.qcow2",
            ],
            "a.qcow2",
        ),
        (
            &["amend", "-p", "-o", "lazy_refcounts=on", "a.qcow2"],
            "a.qcow2",
        ),
        (
            &["amend", "-q", "-p", "-o", "lazy_refcounts=off", "a.qcow2"],
            "a.qcow2",
        ),
        (&["amend", "-o", "compat=1.1", "a.qcow2"], "a.qcow2"),
        (&["amend", "-o", "refcount_bits=16", "a.qcow2"], "a.qcow2"),
        (&["amend", "-o", "size=0", "a.qcow2"], "a.qcow2"),
        (
            &["amend", "-t", "none", "-o", "size=8M", "a.qcow2"],
            "a.qcow2",
        ),
        (
            &["amend", "-f", "qcow2", "-o", "size=3M", "a.qcow2"],
            "a.qcow2",
        ),
        (
            &[
                "amend",
                "--image-opts",
                "-o",
                "lazy_refcounts=on",
                "driver=qcow2,file.filename=a.qcow2",
            ],
            "a.qcow2",
        ),
        (
            &["amend", "--force", "-o", "data_file_raw=off", "a.qcow2"],
            "a.qcow2",
        ),
        (
            &[
                "amend",
                "-p",
                "-o",
                "compat=1.1,lazy_refcounts=on",
                "v2.qcow2",
            ],
            "v2.qcow2",
        ),
        // The current backing file and format may be named.
        (
            &[
                "amend",
                "-o",
                "backing_file=base.qcow2,backing_fmt=qcow2",
                "t.qcow2",
            ],
            "t.qcow2",
        ),
        (&["amend", "-o", "size=6M", "t.qcow2"], "t.qcow2"),
    ] {
        t.step_ok(args);
        t.same_image(image, "qcow2");
    }
}
