//! Long options as qemu-img's getopt reads them: unambiguous abbreviations, the aliases
//! qemu-img 10 knows (`convert --output-format`, `compare --left-format`, `bitmap
//! --source-file`), and getopt's refusals (ambiguous abbreviation, a value for an option
//! that takes none, a missing value). qemu-img is the oracle; vdisk runs under its name.

use std::path::Path;

use vdisk_tests::{dropin_link, qemu_img, run_with_path, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// Runs `args` in `dir` with qemu-img and with vdisk under its name; both streams and the
/// exit code must be equal. Returns the exit code.
fn same(dir: &Path, dropin: &Path, args: &[&str]) -> i32 {
    let q = qemu_img(dir, args);
    let d = run_with_path(dir, dropin.parent(), Path::new("qemu-img"), args);
    assert_eq!(
        d.code, q.code,
        "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
    );
    assert_eq!(d.stdout, q.stdout, "stdout of {args:?}");
    assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
    q.code
}

#[test]
fn abbreviated_long_options_read_as_qemu_img_reads_them() {
    let s = Scratch::new("getopt");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    let dir = s.dir();
    let r = qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    assert_eq!(r.code, 0, "{r:?}");
    for args in [
        &["info", "--out=json", "a.qcow2"][..],
        &["info", "--ba", "--force", "a.qcow2"],
        &[
            "map",
            "--out=json",
            "--start=65536",
            "--max=65536",
            "a.qcow2",
        ],
        &["check", "--out", "json", "a.qcow2"],
        &["measure", "--out=json", "--si", "1G", "-O", "qcow2"],
        &[
            "compare",
            "--st",
            "--left-f=qcow2",
            "--right-format",
            "qcow2",
            "a.qcow2",
            "a.qcow2",
        ],
        &[
            "compare",
            "--a-format",
            "qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "a.qcow2",
        ],
    ] {
        assert_eq!(same(dir, &dropin, args), 0, "{args:?}");
    }
}

#[test]
fn getopt_refusals_are_qemu_img_s() {
    let s = Scratch::new("getopt-refused");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    let dir = s.dir();
    let r = qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    assert_eq!(r.code, 0, "{r:?}");
    for args in [
        // Ambiguous, with getopt's list in qemu-img's table order.
        &["convert", "--tar", "a.qcow2", "o.raw"][..],
        &["convert", "--s", "a.qcow2", "o.raw"],
        &["convert", "--source-", "a.qcow2", "o.raw"],
        &["measure", "--s", "1G"],
        &["create", "--o", "x", "o.qcow2"],
        &["bitmap", "--s", "x", "a.qcow2", "b"],
        &["rebase", "--b", "x", "a.qcow2"],
        // A value for an option that takes none, and a missing one.
        &["info", "--image-opts=x", "a.qcow2"],
        &["check", "--rep"],
        &["compare", "--l"],
        &["snapshot", "--apply=s", "a.qcow2"],
        // Unknown to both.
        &["info", "--frobnicate", "a.qcow2"],
    ] {
        assert_eq!(same(dir, &dropin, args), 1, "{args:?}");
        assert!(!dir.join("o.raw").exists() && !dir.join("o.qcow2").exists());
    }
}

#[test]
fn qemu_img_s_aliases_do_what_the_short_options_do() {
    let s = Scratch::new("getopt-aliases");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    for (dir, bin) in [("q", None), ("d", dropin.parent())] {
        let d = s.sub(dir);
        let r = qemu_img(&d, &["create", "-q", "-f", "raw", "src.raw", "1M"]);
        assert_eq!(r.code, 0, "{r:?}");
        let r = run_with_path(
            &d,
            bin,
            Path::new("qemu-img"),
            &[
                "convert",
                "--output-format=qcow2",
                "--options",
                "cluster_size=4k",
                "--output-cache",
                "writeback",
                "src.raw",
                "o.qcow2",
            ],
        );
        assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{dir}: {r:?}");
        let r = qemu_img(&d, &["info", "--output=json", "o.qcow2"]);
        assert!(r.stdout.contains("\"cluster-size\": 4096"), "{dir}: {r:?}");
    }
}
