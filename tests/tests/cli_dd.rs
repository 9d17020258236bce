//! `vdisk dd` against `qemu-img dd` of qemu 10.
//!
//! Every case runs in three folders holding the same inputs: qemu-img in the first, vdisk
//! under the name `qemu-img` (drop-in mode) in the second, vdisk under its own name in the
//! third. Drop-in vdisk must print what qemu-img prints and exit alike; plain vdisk must exit
//! alike with the same stdout, failing on one `vdisk: ` line. Every output file must be byte
//! for byte the file qemu-img wrote.

use std::fs;
use std::path::{Path, PathBuf};

use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

/// The inputs: a qcow2 image with data, zeroes and holes, its raw conversion, a vmdk and
/// a raw file whose length is not a whole number of sectors.
fn setup(dir: &Path) {
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "qcow2", "in.qcow2", "3M"]),
        "create",
    );
    let mut args = vec!["-f", "qcow2"];
    for c in [
        "write -P 0x5a 4k 100k",
        "write -P 0xa5 1M 64k",
        "write -z 1088k 64k",
        "write -P 0x33 3000k 72k",
    ] {
        args.extend(["-c", c]);
    }
    args.push("in.qcow2");
    ok(&run_in(dir, Path::new("qemu-io"), &args), "qemu-io");
    ok(
        &qemu_img(dir, &["convert", "-O", "raw", "in.qcow2", "in.raw"]),
        "convert raw",
    );
    ok(
        &qemu_img(dir, &["convert", "-O", "vmdk", "in.qcow2", "in.vmdk"]),
        "convert vmdk",
    );
    let odd: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(dir.join("odd.bin"), odd).expect("odd.bin");
}

struct Trio {
    _scratch: Scratch,
    bin: PathBuf,
    dirs: [PathBuf; 3],
}

impl Trio {
    fn new(tag: &str) -> Trio {
        let scratch = Scratch::new(&format!("dd-{tag}"));
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let dirs = [scratch.sub("q"), scratch.sub("d"), scratch.sub("v")];
        setup(&dirs[0]);
        for entry in fs::read_dir(&dirs[0]).expect("read q").flatten() {
            for twin in &dirs[1..] {
                fs::copy(entry.path(), twin.join(entry.file_name())).expect("copy");
            }
        }
        Trio {
            _scratch: scratch,
            bin,
            dirs,
        }
    }

    /// Runs `args` with the three tools; `output` (if any) must come out byte-identical.
    fn check(&self, args: &[&str], output: Option<&str>) -> Run {
        let [qd, dd, vd] = &self.dirs;
        if let Some(out) = output {
            for dir in &self.dirs {
                let _ = fs::remove_file(dir.join(out));
            }
        }
        let name = Path::new("qemu-img");
        let q = run_with_path(qd, None, name, args);
        let d = run_with_path(dd, Some(&self.bin), name, args);
        let v = run_in(vd, Path::new(VDISK), args);
        assert_eq!(
            d.code, q.code,
            "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
        );
        assert_eq!(d.stdout, q.stdout, "stdout of {args:?}");
        assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
        assert_eq!(v.code, q.code, "exit code of vdisk {args:?}: {v:?}");
        assert_eq!(v.stdout, q.stdout, "stdout of vdisk {args:?}");
        assert!(
            !v.stderr.contains("panicked"),
            "vdisk {args:?}: {}",
            v.stderr
        );
        if !q.stderr.is_empty() {
            let lines: Vec<&str> = v.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "vdisk {args:?}: {}", v.stderr);
            assert!(
                lines[0].starts_with("vdisk: "),
                "vdisk {args:?}: {}",
                v.stderr
            );
        }
        if let Some(out) = output {
            let want = fs::read(qd.join(out)).expect("qemu-img's output");
            for dir in [dd, vd] {
                let got = fs::read(dir.join(out))
                    .unwrap_or_else(|e| panic!("{args:?}: no output in {}: {e}", dir.display()));
                assert_eq!(got.len(), want.len(), "length of {out} for {args:?}");
                assert!(got == want, "{out} differs from qemu-img's for {args:?}");
            }
        }
        q
    }
}

#[test]
fn copies_match_qemu_img_byte_for_byte() {
    let t = Trio::new("copy");
    for (args, out) in [
        (vec!["dd", "if=in.qcow2", "of=o.raw"], "o.raw"),
        (vec!["dd", "bs=64k", "if=in.qcow2", "of=o.raw"], "o.raw"),
        (
            vec!["dd", "bs=1M", "count=2", "if=in.qcow2", "of=o.raw"],
            "o.raw",
        ),
        (
            vec!["dd", "bs=4k", "skip=10", "if=in.qcow2", "of=o.raw"],
            "o.raw",
        ),
        // count counts the skipped blocks too.
        (
            vec![
                "dd",
                "bs=4k",
                "count=300",
                "skip=7",
                "if=in.qcow2",
                "of=o.raw",
            ],
            "o.raw",
        ),
        (
            vec!["dd", "bs=3", "count=1000", "if=in.raw", "of=o.raw"],
            "o.raw",
        ),
        (
            vec!["dd", "bs=1000", "count=1", "if=in.qcow2", "of=o.raw"],
            "o.raw",
        ),
        (
            vec!["dd", "-f", "raw", "bs=4k", "if=odd.bin", "of=o.raw"],
            "o.raw",
        ),
        (vec!["dd", "bs=2M", "if=in.vmdk", "of=o.raw"], "o.raw"),
        (vec!["dd", "if=in.qcow2", "of=o.raw", "count=0"], "o.raw"),
        (
            vec!["dd", "-O", "qcow2", "bs=64k", "if=in.raw", "of=o.qcow2"],
            "o.qcow2",
        ),
        (
            vec![
                "dd",
                "-O",
                "qcow2",
                "bs=4k",
                "count=200",
                "if=in.qcow2",
                "of=o.qcow2",
            ],
            "o.qcow2",
        ),
        (
            vec![
                "dd",
                "-O",
                "qcow2",
                "bs=1536",
                "skip=3",
                "if=in.qcow2",
                "of=o.qcow2",
            ],
            "o.qcow2",
        ),
        (
            vec![
                "dd",
                "-U",
                "--image-opts",
                "bs=16k",
                "if=driver=qcow2,file.filename=in.qcow2",
                "of=o.raw",
            ],
            "o.raw",
        ),
        // The last of repeated operands wins.
        (
            vec![
                "dd",
                "if=missing",
                "if=in.raw",
                "bs=1k",
                "bs=64k",
                "of=x",
                "of=o.raw",
            ],
            "o.raw",
        ),
    ] {
        assert_eq!(t.check(&args, Some(out)).code, 0, "{args:?}");
    }
}

#[test]
fn skipping_past_the_end_makes_an_empty_output_and_a_warning() {
    let t = Trio::new("skip");
    let r = t.check(
        &["dd", "bs=4k", "skip=100000", "if=in.qcow2", "of=o.raw"],
        Some("o.raw"),
    );
    assert_eq!(r.code, 0);
    assert_eq!(
        r.stderr,
        "qemu-img: in.qcow2: cannot skip to specified offset\n"
    );
    t.check(
        &["dd", "bs=1M", "skip=3", "if=in.qcow2", "of=o.raw"],
        Some("o.raw"),
    );
}

#[test]
fn bad_operands_fail_like_qemu_img() {
    let t = Trio::new("errors");
    for args in [
        vec!["dd"],
        vec!["dd", "if=in.qcow2"],
        vec!["dd", "of=x.raw"],
        vec!["dd", "foo=bar", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "junk", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "bs=0", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "bs=-1", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "bs=3G", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "bs=1x", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "count=x", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "count=-1", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "skip=x", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "if=missing.raw", "of=x.raw"],
        vec!["dd", "-O", "nofmt", "if=in.qcow2", "of=x.raw"],
        vec!["dd", "if=in.qcow2", "of=no/such/dir/x.raw"],
    ] {
        assert_eq!(t.check(&args, None).code, 1, "{args:?}");
    }
    // No output appears after an argument error.
    for dir in &t.dirs {
        assert!(!dir.join("x.raw").exists(), "{}", dir.display());
    }
}

#[test]
fn copies_into_every_output_format() {
    let t = Trio::new("formats");
    // qcow2 and raw outputs are byte for byte qemu-img's (above). VMDK and VHD carry random
    // identifiers (CID, UUID) and VHDX a layout of its own, so those outputs must read as
    // qemu-img's and pass its check.
    for fmt in ["vmdk", "vpc", "vhdx"] {
        let out = format!("o.{fmt}");
        let of = format!("of={out}");
        t.check(&["dd", "-O", fmt, "bs=64k", "if=in.qcow2", &of], None);
        let want = t.dirs[0].join(&out);
        let want = want.to_string_lossy();
        for dir in &t.dirs[1..] {
            let r = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, &out, want.as_ref()]);
            assert_eq!(r.code, 0, "{out} in {}: {r:?}", dir.display());
            let r = qemu_img(dir, &["check", "-f", fmt, &out]);
            assert!(
                r.code == 0 || fmt == "vpc" && r.code == 63,
                "check {out}: {r:?}"
            );
        }
    }
}
