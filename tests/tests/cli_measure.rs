//! `vdisk measure` against the system qemu-img as the oracle, for every target format.
//!
//! Each case runs three times in the same folder: qemu-img, vdisk under the name `qemu-img`
//! (drop-in mode, which must match exit code, stdout and stderr byte for byte) and vdisk by
//! its own name (same exit code and stdout; a failure explained on one `vdisk: ` line). JSON
//! is also compared parsed, field for field.
//!
//! The sources are made by qemu-img and qemu-io: sparse raw files with data at odd offsets,
//! qcow2 images with data, zeroed and discarded ranges, compressed clusters, persistent
//! bitmaps and a backing chain, so the allocation walk and the bitmap room are exercised.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, settle, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

struct Bench {
    scratch: Scratch,
    dropin: PathBuf,
}

impl Bench {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let dropin = dropin_link(&scratch.sub("bin"), Path::new(VDISK));
        Bench { scratch, dropin }
    }

    fn dir(&self) -> &Path {
        self.scratch.dir()
    }

    /// Runs `args` with all three and requires them to agree; returns qemu-img's result.
    fn same(&self, args: &[&str]) -> Run {
        let dir = self.dir();
        let name = Path::new("qemu-img");
        let q = run_with_path(dir, None, name, args);
        let d = run_with_path(dir, self.dropin.parent(), name, args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "drop-in vdisk vs qemu-img for {args:?}"
        );
        if q.code == 0 && args.contains(&"--output=json") {
            let qv: Value = serde_json::from_str(&q.stdout).expect("qemu-img JSON parses");
            let dv: Value = serde_json::from_str(&d.stdout)
                .unwrap_or_else(|e| panic!("vdisk {args:?} printed invalid JSON ({e})"));
            assert_eq!(dv, qv, "JSON of {args:?}");
        }
        let v = run_in(dir, Path::new(VDISK), args);
        assert_eq!(
            (v.code, &v.stdout),
            (q.code, &q.stdout),
            "vdisk vs qemu-img for {args:?}: {}",
            v.stderr
        );
        if q.code == 0 {
            assert!(v.stderr.is_empty(), "vdisk {args:?}: {}", v.stderr);
        } else {
            let lines: Vec<&str> = v.stderr.lines().collect();
            assert!(
                lines.len() == 1 && lines[0].starts_with("vdisk: "),
                "vdisk {args:?} must fail on one 'vdisk: ' line: {}",
                v.stderr
            );
        }
        q
    }

    /// [`Bench::same`] for the human and the JSON form of `measure args`.
    fn both_forms(&self, args: &[&str]) -> Run {
        let mut full = vec!["measure"];
        full.extend_from_slice(args);
        let human = self.same(&full);
        full.insert(1, "--output=json");
        let json = self.same(&full);
        assert_eq!(human.code, json.code, "{args:?}");
        json
    }

    fn qemu_ok(&self, args: &[&str]) {
        let r = qemu_img(self.dir(), args);
        assert_eq!(r.code, 0, "qemu-img {args:?}: {}", r.stderr);
    }

    fn qemu_io(&self, format: &str, file: &str, cmds: &[&str]) {
        let mut args = vec!["-f", format];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(file);
        let r = run_in(self.dir(), Path::new("qemu-io"), &args);
        assert_eq!(r.code, 0, "qemu-io {args:?}: {}", r.stderr);
        assert!(
            !r.stdout.contains("failed") && !r.stderr.contains("failed"),
            "qemu-io {args:?}: {r:?}"
        );
    }

    fn settle_all(&self) {
        for entry in std::fs::read_dir(self.dir()).expect("list").flatten() {
            if entry.path().is_file() {
                settle(&entry.path());
            }
        }
    }
}

#[test]
fn empty_images_of_every_shape() {
    let b = Bench::new("measure-size");
    let mut measured = 0;
    for size in ["0", "1M", "1073741825", "100G", "2T"] {
        for cluster in ["512", "64k", "2M"] {
            for refcount in ["1", "16", "64"] {
                for ext in ["off", "on"] {
                    for prealloc in ["off", "metadata", "full"] {
                        let opts = format!(
                            "cluster_size={cluster},refcount_bits={refcount},extended_l2={ext},preallocation={prealloc}"
                        );
                        let r = b.both_forms(&["-O", "qcow2", "-o", &opts, "--size", size]);
                        if r.code == 0 {
                            measured += 1;
                            // The numbers themselves, not only agreement: full preallocation
                            // requires everything.
                            let v: Value = serde_json::from_str(&r.stdout).expect("json");
                            if prealloc == "full" {
                                assert_eq!(v["required"], v["fully-allocated"], "{opts} {size}");
                            }
                        }
                    }
                }
            }
        }
    }
    // extended_l2 with 512-byte clusters and 2T with small clusters fail; most succeed.
    assert!(measured > 150, "only {measured} combinations measured");
    for opts in [
        "compat=0.10",
        "compat=1.1,lazy_refcounts=on",
        "preallocation=falloc",
        "backing_file=whatever.qcow2,backing_fmt=qcow2",
        "data_file=x.raw,data_file_raw=on,compression_type=zstd",
        "refcount_bits=0x10",
        "refcount_bits=010",
        "extended_l2",
        "noextended_l2",
        "extended_l2=y,cluster_size=16k",
        "size=5M",
        "nocow=on,extent_size_hint=1M",
    ] {
        let r = b.both_forms(&["-O", "qcow2", "-o", opts, "--size", "10G"]);
        assert_eq!(r.code, 0, "{opts}: {}", r.stderr);
    }
    // Repeated -o: the last value wins.
    b.both_forms(&[
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "cluster_size=1M",
        "--size",
        "10G",
    ]);
    let r = b.both_forms(&["-O", "qcow2", "--size", "10G"]);
    assert!(r.stdout.contains("\"required\": 1900544"), "{}", r.stdout);
}

/// Makes the source images; returns their names.
fn sources(b: &Bench) -> Vec<&'static str> {
    // Sparse raw with data at odd offsets and across 2M boundaries.
    b.qemu_ok(&["create", "-q", "-f", "raw", "sparse.raw", "100M"]);
    b.qemu_io(
        "raw",
        "sparse.raw",
        &[
            "write -P 0xab 1M 64k",
            "write -P 1 3000001 7",
            "write -P 2 4194300 8",
            "write -P 3 70M 3M",
            "write -P 4 104857599 1",
        ],
    );
    // Not a multiple of 512, data in the partial last sector.
    std::fs::write(b.scratch.path("odd.raw"), vec![0x5a; 5000]).expect("odd.raw");
    b.qemu_ok(&["create", "-q", "-f", "raw", "empty.raw", "0"]);
    // A qcow2 written by qemu-io: data, zeroes, a discard, compressed clusters.
    b.qemu_ok(&["create", "-q", "-f", "qcow2", "data.qcow2", "64M"]);
    b.qemu_io(
        "qcow2",
        "data.qcow2",
        &[
            "write -P 1 0 100k",
            "write -P 2 10M 1M",
            "write -z 20M 1M",
            "write -P 3 30M 256k",
            "discard 30M 64k",
            "write -c -P 4 40M 128k",
            "write -P 5 67108352 512",
        ],
    );
    // Persistent bitmaps of two granularities (and a long name).
    b.qemu_ok(&["create", "-q", "-f", "qcow2", "bitmaps.qcow2", "1G"]);
    b.qemu_io("qcow2", "bitmaps.qcow2", &["write -P 9 512M 1M"]);
    b.qemu_ok(&["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    b.qemu_ok(&[
        "bitmap",
        "--add",
        "-g",
        "4096",
        "bitmaps.qcow2",
        "a-rather-long-bitmap-name-for-the-directory",
    ]);
    // A v2 image (cannot hold bitmaps: no bitmaps field).
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        "v2.qcow2",
        "16M",
    ]);
    b.qemu_io("qcow2", "v2.qcow2", &["write -P 6 5M 12k"]);
    // A chain: data in the base shows through the overlay.
    b.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "32M"]);
    b.qemu_io(
        "qcow2",
        "base.qcow2",
        &["write -P 7 0 1M", "write -P 7 16M 64k"],
    );
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "48M",
    ]);
    b.qemu_io(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 8 512k 1M",
            "write -z 16M 64k",
            "write -P 8 40M 4k",
        ],
    );
    // Extended L2 with data in single subclusters.
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "ext.qcow2",
        "8M",
    ]);
    b.qemu_io(
        "qcow2",
        "ext.qcow2",
        &["write -P 1 4k 4k", "write -P 2 1M 300k"],
    );
    // The other formats as sources: their allocation (or, for VHDX, whose qemu driver has
    // no block status, all of it) decides what a qcow2 copy requires.
    for format in ["vmdk", "vhdx", "vpc"] {
        let name = format!("src.{format}");
        b.qemu_ok(&["create", "-q", "-f", format, &name, "64M"]);
        b.qemu_io(
            format,
            &name,
            &["write -P 1 1M 100k", "write -P 2 33M 4k", "write -z 40M 2M"],
        );
    }
    // streamOptimized is written front to back, so it is converted from the sparse raw.
    b.qemu_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "sparse.raw",
        "stream.vmdk",
    ]);
    b.settle_all();
    vec![
        "src.vmdk",
        "src.vhdx",
        "src.vpc",
        "stream.vmdk",
        "sparse.raw",
        "odd.raw",
        "empty.raw",
        "data.qcow2",
        "bitmaps.qcow2",
        "v2.qcow2",
        "top.qcow2",
        "ext.qcow2",
    ]
}

#[test]
fn converted_copies_of_real_images() {
    let b = Bench::new("measure-src");
    let names = sources(&b);
    for name in &names {
        for opts in [
            "",
            "cluster_size=512",
            "cluster_size=2M,refcount_bits=1",
            "refcount_bits=64,extended_l2=on",
            "compat=0.10",
            "preallocation=metadata",
            "preallocation=full",
            "backing_file=base.qcow2,backing_fmt=qcow2",
        ] {
            let mut args = vec!["-O", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.push(name);
            let r = b.both_forms(&args);
            assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        }
        let r = b.both_forms(&["-O", "raw", name]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        // The source format named explicitly gives the same answer.
        let format = name.rsplit('.').next().unwrap_or("raw");
        b.both_forms(&["-f", format, "-O", "qcow2", "-U", name]);
    }
    // What the allocation walk must have found, beyond agreeing with qemu-img: the
    // bitmaps field appears for v3 qcow2 sources only, with room for both bitmaps.
    let json = |name: &str| -> Value {
        let r = b.same(&["measure", "--output=json", "-O", "qcow2", name]);
        serde_json::from_str(&r.stdout).expect("json")
    };
    assert!(json("sparse.raw").get("bitmaps").is_none());
    assert!(json("v2.qcow2").get("bitmaps").is_none());
    assert_eq!(json("data.qcow2")["bitmaps"], 0);
    let with = json("bitmaps.qcow2");
    assert!(with["bitmaps"].as_u64().unwrap_or(0) >= 3 * 65536, "{with}");
    // The base's data counts for the overlay: more than the overlay's own 1M + 64k.
    let top = json("top.qcow2");
    let empty = b.same(&["measure", "--output=json", "-O", "qcow2", "--size", "48M"]);
    let empty: Value = serde_json::from_str(&empty.stdout).expect("json");
    let data = top["required"].as_u64().unwrap_or(0) - empty["required"].as_u64().unwrap_or(0);
    assert!(data > (1 << 20) + (64 << 10), "top needs {data} data bytes");
}

#[test]
fn formats_qemu_cannot_measure_are_refused_alike() {
    let b = Bench::new("measure-fmt");
    sources(&b);
    for target in ["vmdk", "vhdx", "vpc"] {
        let r = b.both_forms(&["-O", target, "--size", "1G"]);
        assert_eq!(r.code, 1, "{target}");
        assert!(
            r.stderr.contains("does not support size measurement"),
            "{target}: {}",
            r.stderr
        );
        b.both_forms(&["-O", target, "sparse.raw"]);
        b.both_forms(&["-O", target, "data.qcow2"]);
        // Unknown options are found before the refusal.
        let r = b.both_forms(&["-O", target, "-o", "bogus=1", "--size", "1G"]);
        assert!(
            r.stderr.contains("Invalid parameter 'bogus'"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn mistakes_fail_like_qemu_img() {
    let b = Bench::new("measure-err");
    b.qemu_ok(&["create", "-q", "-f", "raw", "a.raw", "1M"]);
    b.qemu_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    for args in [
        vec!["-O", "qcow9", "--size", "1G"],
        vec!["-O", "qcow9", "a.raw"],
        vec!["-O", "qcow9", "missing.raw"],
        vec!["-O", "qcow2", "missing.raw"],
        vec!["-O", "qcow2", "--size", "1G", "a.raw"],
        vec!["-O", "qcow2"],
        vec!["-O", "qcow2", "a.raw", "a.qcow2"],
        vec!["-O", "qcow2", "-f", "qcow2", "a.raw"],
        vec!["-O", "qcow2", "-l", "snap", "a.raw"],
        vec!["-O", "qcow2", "--size", "16E"],
        vec!["-O", "qcow2", "--size", "1x"],
        vec!["-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "help", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "nofoo", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "cluster_size=0", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "cluster_size=1x", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=0", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=-1", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=128", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "refcount_bits=16k", "--size", "1G"],
        vec![
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        vec!["-O", "qcow2", "-o", "compat=1.2", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "compat=v3", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1G"],
        vec!["-O", "qcow2", "-o", "nocow=maybe", "--size", "1G"],
        vec![
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            "--size",
            "1G",
        ],
        vec!["-O", "qcow2", "-o", "cluster_size=512", "--size", "2T"],
        vec!["-O", "qcow2", "-o", "size=1x", "--size", "1G"],
        vec!["-O", "raw", "-o", "foo=bar", "--size", "1G"],
        vec!["-O", "raw", "-o", "nocow", "--size", "1G"],
        vec!["-O", "qcow2", "--output=xml", "--size", "1G"],
    ] {
        let mut full = vec!["measure"];
        full.extend_from_slice(&args);
        let r = b.same(&full);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(!r.stderr.is_empty(), "{args:?}");
    }
}
