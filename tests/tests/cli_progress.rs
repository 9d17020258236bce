//! Progress output (`-p`) against qemu-img 10.
//!
//! Not on a terminal, qemu-img prints `    (N.NN/100%)` and a carriage return each time the
//! percentage moved by more than one point (and at 0 and 100), then a newline; a drop-in
//! vdisk must print the same bytes where qemu's figures do not depend on thread timing
//! (convert, compare, rebase). On a terminal vdisk draws a bar with rate and ETA instead.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vdisk_tests::{dropin_link, qemu_img, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// The images: a 64 MiB qcow2 with data, a zeroed range and holes, its raw copy, and a
/// qcow2 overlay over an 8 MiB base.
fn fixtures(tag: &str) -> (Scratch, PathBuf) {
    let scratch = Scratch::new(tag);
    let bin = scratch.sub("bin");
    dropin_link(&bin, Path::new(VDISK));
    let dir = scratch.dir().to_path_buf();
    let io = |fmt: &str, file: &str, cmds: &[&str]| {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(file);
        let r = run_with_path(&dir, None, Path::new("qemu-io"), &args);
        assert_eq!(r.code, 0, "qemu-io {args:?}: {r:?}");
    };
    let ok = |args: &[&str]| {
        let r = qemu_img(&dir, args);
        assert_eq!(r.code, 0, "qemu-img {args:?}: {r:?}");
    };
    ok(&["create", "-q", "-f", "qcow2", "big.qcow2", "64M"]);
    io(
        "qcow2",
        "big.qcow2",
        &[
            "write -P 1 0 5M",
            "write -P 2 7M 300k",
            "write -z 10M 10M",
            "write -P 3 33M 17M",
            "write -P 4 63M 64k",
        ],
    );
    ok(&["convert", "-O", "raw", "big.qcow2", "big.raw"]);
    ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    io(
        "qcow2",
        "base.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x22 2M 1M"],
    );
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    io(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x33 512k 64k",
            "write -z 2M 64k",
            "write -P 0x44 4M 64k",
        ],
    );
    ok(&["create", "-q", "-f", "qcow2", "small.qcow2", "4M"]);
    // Compressed, in 4 KiB clusters: qemu's block status answers it a cluster at a time
    // and an L2 table (2 MiB) at most.
    ok(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "top.qcow2",
        "ctop.qcow2",
    ]);
    (scratch, bin)
}

/// Runs `args` with qemu-img and with drop-in vdisk, each in a fresh copy of the fixtures.
fn both(scratch: &Scratch, bin: &Path, tag: &str, args: &[&str]) -> (Run, Run) {
    let mut runs = Vec::new();
    for (who, path) in [("q", None), ("d", Some(bin))] {
        let dir = scratch.path(&format!("{tag}-{who}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        for f in [
            "big.qcow2",
            "big.raw",
            "base.qcow2",
            "top.qcow2",
            "small.qcow2",
            "ctop.qcow2",
        ] {
            let st = Command::new("cp")
                .arg("-a")
                .arg(scratch.path(f))
                .arg(&dir)
                .status()
                .expect("cp");
            assert!(st.success());
        }
        runs.push(run_with_path(&dir, path, Path::new("qemu-img"), args));
    }
    let d = runs.pop().expect("vdisk run");
    let q = runs.pop().expect("qemu run");
    (q, d)
}

/// The figures of a progress stream, in order.
fn figures(stdout: &str) -> Vec<String> {
    stdout
        .split('\r')
        .filter_map(|p| p.trim().strip_prefix('('))
        .filter_map(|p| p.strip_suffix("/100%)"))
        .map(str::to_string)
        .collect()
}

#[test]
fn progress_lines_are_qemu_img_bytes() {
    let (scratch, bin) = fixtures("progress-plain");
    let cases: &[&[&str]] = &[
        &["convert", "-p", "-O", "qcow2", "big.qcow2", "out.qcow2"],
        &["convert", "-p", "-O", "raw", "big.raw", "out.raw"],
        &["convert", "-p", "-O", "vmdk", "big.qcow2", "out.vmdk"],
        // Through a backing chain: what reads as zeroes in it does not count.
        &["convert", "-p", "-O", "qcow2", "top.qcow2", "out.qcow2"],
        &[
            "convert",
            "-p",
            "-O",
            "raw",
            "-S",
            "0",
            "top.qcow2",
            "out.raw",
        ],
        &[
            "convert",
            "-p",
            "-S",
            "0",
            "-O",
            "qcow2",
            "big.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "-p",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            "big.qcow2",
            "out.qcow2",
        ],
        // Failures after the progress started end its line; -q silences it.
        &["convert", "-p", "-O", "qcow2", "nothere.qcow2", "out.qcow2"],
        &["convert", "-p", "-O", "bogus", "big.raw", "out.raw"],
        &["convert", "-p", "-c", "-O", "raw", "big.raw", "out.raw"],
        &["convert", "-p", "-q", "-O", "raw", "big.raw", "out.raw"],
        &["convert", "-p", "big.raw"],
        &["compare", "-p", "big.qcow2", "big.raw"],
        &["compare", "-p", "top.qcow2", "base.qcow2"],
        &["compare", "-p", "-q", "big.qcow2", "big.raw"],
        &[
            "rebase",
            "-p",
            "-b",
            "small.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-p", "-b", "", "top.qcow2"],
        // qemu-img check has no -p: both refuse it alike.
        &["check", "-p", "big.qcow2"],
        // Compressed copies count a target cluster at a time; compressed sources a source
        // cluster at a time; -S 0 writes (and counts) the zero ranges too.
        &["convert", "-p", "-c", "-O", "qcow2", "big.raw", "out.qcow2"],
        &[
            "convert",
            "-p",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "-p",
            "-c",
            "-S",
            "0",
            "-O",
            "qcow2",
            "top.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "-p",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "top.qcow2",
            "out.vmdk",
        ],
        &["convert", "-p", "-O", "raw", "ctop.qcow2", "out.raw"],
        &["compare", "-p", "ctop.qcow2", "top.qcow2"],
        &["compare", "-p", "ctop.qcow2", "big.qcow2"],
    ];
    for (n, args) in cases.iter().enumerate() {
        let (q, d) = both(&scratch, &bin, &format!("c{n}"), args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "drop-in vdisk (left) vs qemu-img (right): {args:?}"
        );
    }
}

#[test]
fn commit_progress_has_qemu_img_figures() {
    // qemu-img commit prints each time its job loop wakes up, so how often 0.00 and 100.00
    // repeat depends on timing; the figures in between and the shape must agree.
    let (scratch, bin) = fixtures("progress-commit");
    let (q, d) = both(&scratch, &bin, "commit", &["commit", "-p", "top.qcow2"]);
    assert_eq!((d.code, &d.stderr), (q.code, &q.stderr));
    let dedup = |r: &Run| {
        let mut f = figures(&r.stdout);
        f.dedup();
        f
    };
    assert_eq!(dedup(&d).first().map(String::as_str), Some("0.00"));
    assert_eq!(dedup(&d).last().map(String::as_str), Some("100.00"));
    for r in [&q, &d] {
        assert!(
            r.stdout.starts_with("    (0.00/100%)\r")
                && r.stdout.ends_with("(100.00/100%)\r\nImage committed.\n"),
            "{r:?}"
        );
    }
    // qemu-img shows a figure only when its loop wakes after it, so it may skip some:
    // its figures must come out of vdisk's, in order.
    let ours = dedup(&d);
    let mut rest = ours.iter();
    for f in dedup(&q) {
        assert!(
            rest.any(|o| *o == f),
            "qemu-img figure {f} missing from vdisk's {ours:?}"
        );
    }
}

#[test]
fn a_terminal_gets_a_bar_with_rate_and_eta() {
    let (scratch, _bin) = fixtures("progress-tty");
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("skipped: util-linux script(1) is not installed");
        return;
    }
    // Copies show their byte rate; compare and rebase, which count in percent, the time.
    for (args, rate) in [
        ("convert -p -O qcow2 big.qcow2 out.qcow2", "B/s"),
        ("commit -p top.qcow2", "B/s"),
        ("compare -p big.qcow2 big.raw", ":"),
        ("rebase -p -b small.qcow2 -F qcow2 top.qcow2", ":"),
    ] {
        let cmd = format!("{VDISK} {args}");
        let out = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(scratch.dir())
            .env("LC_ALL", "C")
            .output()
            .expect("run script");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args}: {text}");
        assert!(
            text.contains("ETA") && text.contains(rate) && text.contains('%'),
            "{args}: no bar with rate and ETA on a terminal: {text:?}"
        );
        assert!(
            !text.contains("/100%)"),
            "{args}: plain lines on a terminal: {text:?}"
        );
    }
    // The copy is right too.
    let r = qemu_img(scratch.dir(), &["compare", "big.qcow2", "out.qcow2"]);
    assert_eq!(r.code, 0, "{r:?}");
}
