//! `vdisk bench` against `qemu-img bench` of qemu 10.
//!
//! Every case runs in three folders holding the same image: qemu-img in the first, vdisk
//! under the name `qemu-img` (drop-in mode) in the second, vdisk under its own name in the
//! third. The header line(s) must be qemu-img's; the "Run completed in X.XXX seconds." line
//! carries each tool's own time. Failures must exit alike with qemu-img's words in drop-in
//! mode. After write runs the images must read alike (`qemu-img compare`) and pass check.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

struct Trio {
    _scratch: Scratch,
    bin: PathBuf,
    dirs: [PathBuf; 3],
}

impl Trio {
    fn new(tag: &str) -> Trio {
        let scratch = Scratch::new(&format!("bench-{tag}"));
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let dirs = [scratch.sub("q"), scratch.sub("d"), scratch.sub("v")];
        for dir in &dirs {
            for (fmt, name) in [
                ("qcow2", "b.qcow2"),
                ("raw", "b.raw"),
                ("vmdk", "b.vmdk"),
                ("vhdx", "b.vhdx"),
                ("vpc", "b.vpc"),
            ] {
                let r = qemu_img(dir, &["create", "-q", "-f", fmt, name, "1M"]);
                assert_eq!(r.code, 0, "{r:?}");
            }
        }
        Trio {
            _scratch: scratch,
            bin,
            dirs,
        }
    }

    fn check(&self, args: &[&str]) -> Run {
        let [qd, dd, vd] = &self.dirs;
        let name = Path::new("qemu-img");
        let q = run_with_path(qd, None, name, args);
        let d = run_with_path(dd, Some(&self.bin), name, args);
        let v = run_in(vd, Path::new(VDISK), args);
        assert_eq!(
            d.code, q.code,
            "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
        );
        assert_eq!(
            without_time(&d.stdout),
            without_time(&q.stdout),
            "stdout of {args:?}"
        );
        assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
        assert_eq!(v.code, q.code, "exit code of vdisk {args:?}: {v:?}");
        assert_eq!(
            without_time(&v.stdout),
            without_time(&q.stdout),
            "stdout of vdisk {args:?}"
        );
        assert!(
            !v.stderr.contains("panicked"),
            "vdisk {args:?}: {}",
            v.stderr
        );
        if q.code != 0 {
            let lines: Vec<&str> = v.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "vdisk {args:?}: {}", v.stderr);
            assert!(
                lines[0].starts_with("vdisk: "),
                "vdisk {args:?}: {}",
                v.stderr
            );
        }
        for r in [&d, &v] {
            if q.code == 0 {
                let last = r.stdout.lines().last().unwrap_or_default();
                assert!(timing_line(last), "{args:?}: {last:?}");
            }
        }
        q
    }

    fn same_images(&self, file: &str, fmt: &str) {
        let [qd, dd, vd] = &self.dirs;
        let twin = qd.join(file);
        let twin = twin.to_string_lossy();
        for dir in [dd, vd] {
            let r = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, file, twin.as_ref()]);
            assert_eq!(r.code, 0, "{file} in {}: {r:?}", dir.display());
            if fmt == "qcow2" {
                let r = qemu_img(dir, &["check", "--output=json", file]);
                assert_eq!(r.code, 0, "check {file}: {r:?}");
                let v: Value = serde_json::from_str(&r.stdout).expect("check JSON");
                for key in ["check-errors", "corruptions", "leaks"] {
                    assert_eq!(v.get(key).and_then(Value::as_u64).unwrap_or(0), 0, "{key}");
                }
            }
        }
    }
}

/// True for qemu-img's `Run completed in X.XXX seconds.`
fn timing_line(line: &str) -> bool {
    let Some(t) = line
        .strip_prefix("Run completed in ")
        .and_then(|r| r.strip_suffix(" seconds."))
    else {
        return false;
    };
    let (secs, millis) = t.split_once('.').unwrap_or(("", ""));
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && millis.len() == 3
        && millis.bytes().all(|b| b.is_ascii_digit())
}

/// The output with the time of the run replaced.
fn without_time(stdout: &str) -> String {
    stdout
        .lines()
        .map(|l| {
            if timing_line(l) {
                "Run completed in <time> seconds."
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn headers_match_qemu_img() {
    let t = Trio::new("header");
    for args in [
        vec!["bench", "-c", "100", "b.qcow2"],
        vec!["bench", "-q", "-c", "10", "-f", "raw", "b.raw"],
        vec![
            "bench", "-c", "5", "-s", "64k", "-S", "1k", "-o", "3", "-d", "2", "b.qcow2",
        ],
        vec!["bench", "-c", "010", "-d", "0x10", "b.vmdk"],
        vec!["bench", "-c", "5", "-s", "010", "-o", "010", "b.qcow2"],
        vec!["bench", "-c", "1", "-s", "1k", "-o", "1023k", "b.qcow2"],
        vec!["bench", "-c", "5", "-s", "1M", "b.qcow2"],
        vec!["bench", "-c", "5", "-i", "threads", "b.qcow2"],
        vec!["bench", "-c", "5", "-t", "none", "-n", "b.qcow2"],
        vec!["bench", "-c", "5", "-U", "b.qcow2"],
        vec!["bench", "-c", "5", "--no-drain", "b.qcow2"],
        vec![
            "bench",
            "-c",
            "5",
            "--image-opts",
            "driver=qcow2,file.filename=b.qcow2",
        ],
        vec![
            "bench",
            "-c",
            "5",
            "-w",
            "--flush-interval=2",
            "-d",
            "1",
            "b.qcow2",
        ],
        vec![
            "bench",
            "-c",
            "9",
            "-w",
            "--flush-interval=4",
            "-d",
            "2",
            "--no-drain",
            "b.raw",
        ],
        vec![
            "bench",
            "-c",
            "5",
            "-w",
            "-d",
            "1",
            "--flush-interval=0",
            "b.qcow2",
        ],
    ] {
        assert_eq!(t.check(&args).code, 0, "{args:?}");
    }
}

#[test]
fn failures_match_qemu_img() {
    let t = Trio::new("errors");
    for args in [
        vec!["bench", "-c", "0", "b.qcow2"],
        vec!["bench", "-c", "-1", "b.qcow2"],
        vec!["bench", "-c", "x", "b.qcow2"],
        vec!["bench", "-c", "1k", "b.qcow2"],
        vec!["bench", "-c", "3000000000", "b.qcow2"],
        vec!["bench", "-d", "0", "b.qcow2"],
        vec!["bench", "-c", "10", "-s", "0", "b.qcow2"],
        vec!["bench", "-c", "5", "-s", "3G", "b.qcow2"],
        vec!["bench", "-c", "5", "-S", "-1", "b.qcow2"],
        vec!["bench", "-c", "5", "-o", "x", "b.qcow2"],
        vec!["bench", "-c", "5", "-o", "-1", "b.qcow2"],
        vec!["bench", "-c", "5", "-w", "--pattern=256", "b.qcow2"],
        vec!["bench", "-c", "5", "-w", "--pattern=x", "b.qcow2"],
        vec!["bench", "-c", "5", "--flush-interval=2", "b.qcow2"],
        vec!["bench", "-c", "5", "-w", "--flush-interval=2", "b.qcow2"],
        vec![
            "bench",
            "-c",
            "5",
            "-w",
            "-d",
            "1",
            "--flush-interval=x",
            "b.qcow2",
        ],
        vec!["bench", "-c", "5", "-i", "foo", "b.qcow2"],
        vec!["bench", "-c", "5", "-t", "foo", "b.qcow2"],
        vec!["bench", "-c", "5", "-n", "b.qcow2"],
        vec!["bench", "-c", "5", "-U", "-w", "b.qcow2"],
        vec!["bench", "-c", "5"],
        vec!["bench", "-c", "5", "b.qcow2", "b.raw"],
        vec!["bench", "-c", "5", "missing.qcow2"],
        vec!["bench", "-c", "5", "-x", "b.qcow2"],
        vec!["bench", "-c", "5", "--bogus", "b.qcow2"],
        // Requests past the end fail after the header, with EIO's words.
        vec!["bench", "-c", "5", "-o", "2M", "b.qcow2"],
        vec!["bench", "-c", "5", "-s", "2M", "b.qcow2"],
        vec!["bench", "-c", "30", "-d", "1", "-w", "-S", "341k", "b.raw"],
    ] {
        assert_eq!(t.check(&args).code, 1, "{args:?}");
    }
}

#[test]
fn writes_leave_what_qemu_img_leaves() {
    let t = Trio::new("write");
    t.check(&["bench", "-c", "300", "-w", "--pattern=0xab", "b.qcow2"]);
    t.same_images("b.qcow2", "qcow2");
    // Steps that wrap at the end of the image and overlap.
    t.check(&[
        "bench",
        "-c",
        "40",
        "-d",
        "1",
        "-w",
        "--pattern=17",
        "-S",
        "3k",
        "-s",
        "1k",
        "b.raw",
    ]);
    t.same_images("b.raw", "raw");
    t.check(&[
        "bench",
        "-c",
        "70",
        "-d",
        "4",
        "-w",
        "--pattern=010",
        "-S",
        "5k",
        "-o",
        "7",
        "b.vmdk",
    ]);
    t.same_images("b.vmdk", "vmdk");
    t.check(&[
        "bench",
        "-c",
        "64",
        "-w",
        "--pattern=0x5c",
        "-s",
        "64k",
        "-t",
        "none",
        "b.qcow2",
    ]);
    t.same_images("b.qcow2", "qcow2");
    t.check(&[
        "bench",
        "-c",
        "100",
        "-d",
        "8",
        "-w",
        "--pattern=0x42",
        "-S",
        "12k",
        "b.vhdx",
    ]);
    t.same_images("b.vhdx", "vhdx");
    t.check(&[
        "bench",
        "-c",
        "100",
        "-d",
        "8",
        "-w",
        "--pattern=0x43",
        "-s",
        "8k",
        "b.vpc",
    ]);
    t.same_images("b.vpc", "vpc");
    // A read run changes nothing.
    t.check(&["bench", "-c", "64", "-s", "16k", "b.qcow2"]);
    t.same_images("b.qcow2", "qcow2");
    let _ = fs::metadata(t.dirs[0].join("b.qcow2")).expect("image");
}
