//! `vdisk` sub-commands on every format of the project (qcow2, vmdk, vhdx, vpc, raw), run
//! side by side with the system qemu-img on the same files.
//!
//! Images are made by qemu-img and filled by qemu-io with known patterns; both tools then run
//! from the same folder so even names in the output agree. Where vdisk deliberately differs
//! (VHDX allocation: qemu-img reports every VHDX block as data, vdisk reports the truth) the
//! test says so and checks vdisk's answer against the contents instead.

use std::fs;
use std::path::Path;

use serde_json::Value;
use vdisk_block::OpenOptions;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, settle, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const MIB: u64 = 1 << 20;

fn vdisk(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, Path::new(VDISK), args)
}

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let r = run_in(dir, Path::new("qemu-io"), &args);
    ok(&r, &format!("qemu-io {args:?}"));
    assert!(!r.stdout.contains("failed"), "qemu-io {args:?}: {r:?}");
}

/// A pattern that touches data, explicit zeroes and holes at cluster-unaligned offsets.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000k 300k",
    "write -z 3M 1M",
    "write -P 0x33 5M 4k",
    "write -P 0x44 8388096 512",
];

/// One image made by qemu-img: file name, format, `create -o` options.
struct Made {
    name: String,
    format: &'static str,
}

/// Images of every format and the layouts that matter, each 8 MiB, filled with [`WRITES`].
fn make_images(dir: &Path) -> Vec<Made> {
    let specs: &[(&str, &str, &str)] = &[
        ("v3.qcow2", "qcow2", ""),
        ("v2.qcow2", "qcow2", "compat=0.10"),
        ("c512.qcow2", "qcow2", "cluster_size=512,refcount_bits=1"),
        ("c2m.qcow2", "qcow2", "cluster_size=2M,extended_l2=on"),
        ("lazy.qcow2", "qcow2", "lazy_refcounts=on,refcount_bits=64"),
        ("zstd.qcow2", "qcow2", "compression_type=zstd"),
        ("meta.qcow2", "qcow2", "preallocation=metadata"),
        ("sparse.vmdk", "vmdk", ""),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse"),
        ("splitflat.vmdk", "vmdk", "subformat=twoGbMaxExtentFlat"),
        ("zg.vmdk", "vmdk", "zeroed_grain=on,adapter_type=lsilogic"),
        ("dyn.vhdx", "vhdx", ""),
        ("b1m.vhdx", "vhdx", "block_size=1M"),
        ("fixed.vhdx", "vhdx", "subformat=fixed"),
        ("dyn.vpc", "vpc", ""),
        ("fixed.vpc", "vpc", "subformat=fixed,force_size=on"),
        ("plain.raw", "raw", ""),
    ];
    let mut out = Vec::new();
    for (name, format, opts) in specs {
        let mut args = vec!["create", "-q", "-f", format];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([*name, "8M"]);
        ok(&qemu_img(dir, &args), &format!("qemu-img {args:?}"));
        qemu_io(dir, format, name, WRITES);
        out.push(Made {
            name: name.to_string(),
            format,
        });
    }
    // A streamOptimized VMDK can only be written in order: qemu-img convert makes it.
    ok(
        &qemu_img(
            dir,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                "-f",
                "qcow2",
                "v3.qcow2",
                "stream.vmdk",
            ],
        ),
        "qemu-img convert to streamOptimized",
    );
    out.push(Made {
        name: "stream.vmdk".into(),
        format: "vmdk",
    });
    // A qcow2 chain over a raw base, with a snapshot and a bitmap in the top image.
    ok(
        &qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "plain.raw",
                "-F",
                "raw",
                "mid.qcow2",
            ],
        ),
        "create mid",
    );
    qemu_io(dir, "qcow2", "mid.qcow2", &["write -P 0x55 2M 128k"]);
    ok(
        &qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        ),
        "create top",
    );
    qemu_io(dir, "qcow2", "top.qcow2", &["write -P 0x66 2100k 8k"]);
    ok(
        &qemu_img(dir, &["snapshot", "-c", "before", "top.qcow2"]),
        "snapshot",
    );
    ok(
        &qemu_img(dir, &["bitmap", "--add", "top.qcow2", "bm0"]),
        "bitmap",
    );
    out.push(Made {
        name: "top.qcow2".into(),
        format: "qcow2",
    });
    for m in &out {
        settle(&dir.join(&m.name));
    }
    out
}

/// Runs `args` with both tools: same exit code, same stdout (parsed and as bytes for
/// JSON), nothing on vdisk's stderr when qemu-img wrote nothing there.
fn same(dir: &Path, args: &[&str]) {
    let q = qemu_img(dir, args);
    let v = vdisk(dir, args);
    assert_eq!(v.code, q.code, "exit code of {args:?}: {v:?} vs {q:?}");
    if args.contains(&"--output=json") && q.code == 0 {
        let qv: Value = serde_json::from_str(&q.stdout).expect("qemu-img JSON");
        let vv: Value = serde_json::from_str(&v.stdout)
            .unwrap_or_else(|e| panic!("vdisk {args:?}: invalid JSON ({e}):\n{}", v.stdout));
        assert_eq!(vv, qv, "JSON of {args:?} differs");
    }
    assert_eq!(v.stdout, q.stdout, "stdout of {args:?} differs");
    if q.stderr.is_empty() {
        assert!(v.stderr.is_empty(), "vdisk {args:?} stderr: {}", v.stderr);
    }
}

/// Runs `args` with qemu-img and with vdisk linked as `qemu-img` in `bin` (drop-in mode):
/// same exit code, stdout and stderr.
fn same_dropin(dir: &Path, bin: &Path, args: &[&str]) {
    let q = run_with_path(dir, Some(bin), Path::new("/usr/bin/qemu-img"), args);
    let v = run_with_path(dir, Some(bin), &bin.join("qemu-img"), args);
    assert_eq!(
        (v.code, &v.stdout, &v.stderr),
        (q.code, &q.stdout, &q.stderr),
        "{args:?}"
    );
}

#[test]
fn info_matches_qemu_img_for_every_format() {
    let s = Scratch::new("fmt-info");
    let images = make_images(s.dir());
    for m in &images {
        for extra in [&[][..], &["--output=json"], &["-f", m.format, "-U"]] {
            let mut args = vec!["info"];
            args.extend_from_slice(extra);
            args.push(&m.name);
            same(s.dir(), &args);
        }
    }
    same(s.dir(), &["info", "--backing-chain", "top.qcow2"]);
    same(
        s.dir(),
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    );
}

#[test]
fn map_matches_qemu_img_except_where_qemu_misreports_vhdx() {
    let s = Scratch::new("fmt-map");
    let images = make_images(s.dir());
    for m in images.iter().filter(|m| m.format != "vhdx") {
        same(s.dir(), &["map", "--output=json", &m.name]);
        same(s.dir(), &["map", &m.name]);
        same(
            s.dir(),
            &[
                "map",
                "--output=json",
                "--start-offset=1M",
                "--max-length=3M",
                &m.name,
            ],
        );
    }
    // VHDX: qemu-img calls every block data. vdisk reports which blocks hold data; every
    // range it calls a hole must read as zeroes, and everything qemu-io wrote must be data.
    for m in images.iter().filter(|m| m.format == "vhdx") {
        let v = vdisk(s.dir(), &["map", "--output=json", &m.name]);
        ok(&v, "vdisk map");
        let map: Value = serde_json::from_str(&v.stdout).expect("map JSON");
        let raw = s.path(&format!("{}.raw", m.name));
        ok(
            &qemu_img(
                s.dir(),
                &[
                    "convert",
                    "-O",
                    "raw",
                    &m.name,
                    raw.to_str().expect("utf-8"),
                ],
            ),
            "qemu-img convert",
        );
        let bytes = fs::read(&raw).expect("read contents");
        let mut end = 0;
        for e in map.as_array().expect("map is a list") {
            let start = e["start"].as_u64().expect("start");
            let len = e["length"].as_u64().expect("length");
            assert_eq!(start, end, "{}: map is contiguous", m.name);
            end = start + len;
            let range = &bytes[start as usize..end as usize];
            if e["data"] == Value::Bool(false) {
                assert_eq!(e["zero"], Value::Bool(true), "{}: {e}", m.name);
                assert!(
                    range.iter().all(|&b| b == 0),
                    "{}: hole {e} holds data",
                    m.name
                );
            } else if m.name != "fixed.vhdx" {
                assert!(e["offset"].is_u64(), "{}: data without offset: {e}", m.name);
            }
        }
        assert_eq!(end, bytes.len() as u64, "{}: map covers the disk", m.name);
        let data_at = |off: u64| {
            map.as_array().expect("list").iter().any(|e| {
                let start = e["start"].as_u64().unwrap_or(0);
                let len = e["length"].as_u64().unwrap_or(0);
                e["data"] == Value::Bool(true) && start <= off && off < start + len
            })
        };
        for written in [0, 1000 * 1024, 5 * MIB, 8388096] {
            assert!(
                data_at(written),
                "{}: written offset {written} is data",
                m.name
            );
        }
        if m.name == "b1m.vhdx" {
            // 1 MiB blocks: the block at 6M was never written.
            assert!(!data_at(6 * MIB), "b1m.vhdx: never-written 6M is a hole");
        }
    }
}

#[test]
fn check_matches_qemu_img_for_every_format() {
    let s = Scratch::new("fmt-check");
    let images = make_images(s.dir());
    for m in &images {
        same(s.dir(), &["check", &m.name]);
        same(s.dir(), &["check", "--output=json", &m.name]);
    }
}

/// `convert` from every format to every format: contents equal to the source (qemu-img
/// compare), targets clean under qemu-img check, and allocation as qemu-img's own
/// conversion allocates (the maps without host offsets agree).
#[test]
fn convert_between_every_format() {
    let s = Scratch::new("fmt-convert");
    let images = make_images(s.dir());
    let targets: &[(&str, &str, &str)] = &[
        ("raw", "", "raw"),
        ("qcow2", "", "qcow2"),
        ("qcow2", "compat=0.10,cluster_size=4k", "qcow2"),
        ("qcow2", "extended_l2=on,cluster_size=128k", "qcow2"),
        ("vmdk", "", "vmdk"),
        ("vmdk", "subformat=streamOptimized", "vmdk"),
        ("vmdk", "subformat=twoGbMaxExtentFlat", "vmdk"),
        ("vhdx", "", "vhdx"),
        ("vpc", "", "vpc"),
    ];
    let sources = [
        "v3.qcow2",
        "c2m.qcow2",
        "stream.vmdk",
        "split.vmdk",
        "dyn.vhdx",
        "dyn.vpc",
        "top.qcow2",
    ];
    for src in sources {
        let m = images.iter().find(|m| m.name == src).expect("source made");
        for (i, (fmt, opts, ext)) in targets.iter().enumerate() {
            for (tool, out) in [
                ("v", format!("v{i}-{src}.{ext}")),
                ("q", format!("q{i}-{src}.{ext}")),
            ] {
                let mut args = vec!["convert", "-f", m.format, "-O", fmt];
                if !opts.is_empty() {
                    args.extend(["-o", opts]);
                }
                args.extend([src, out.as_str()]);
                let r = if tool == "v" {
                    vdisk(s.dir(), &args)
                } else {
                    qemu_img(s.dir(), &args)
                };
                ok(&r, &format!("{tool} {args:?}"));
                assert!(r.stdout.is_empty(), "{args:?} printed {}", r.stdout);
            }
            let (v, q) = (format!("v{i}-{src}.{ext}"), format!("q{i}-{src}.{ext}"));
            // vpc rounds sizes up to its geometry, so compare without strictness on size.
            let cmp = qemu_img(s.dir(), &["compare", "-f", m.format, "-F", fmt, src, &v]);
            assert_eq!(
                cmp.code, 0,
                "{src} -> {fmt} {opts}: {}{}",
                cmp.stdout, cmp.stderr
            );
            if *fmt != "raw" && *fmt != "vpc" {
                let chk = qemu_img(s.dir(), &["check", "-f", fmt, &v]);
                assert_eq!(chk.code, 0, "check {v}: {}{}", chk.stdout, chk.stderr);
            }
            if *fmt != "raw" {
                assert_eq!(
                    allocation(s.dir(), fmt, &v),
                    allocation(s.dir(), fmt, &q),
                    "{src} -> {fmt} {opts}: allocation differs from qemu-img's"
                );
            }
            let info = |name: &str| -> Value {
                let r = qemu_img(s.dir(), &["info", "--output=json", "-f", fmt, name]);
                ok(&r, "qemu-img info");
                let mut v: Value = serde_json::from_str(&r.stdout).expect("info");
                let o = v.as_object_mut().expect("object");
                for k in ["filename", "actual-size", "children", "dirty-flag"] {
                    o.remove(k);
                }
                if let Some(d) = o
                    .get_mut("format-specific")
                    .and_then(|f| f.get_mut("data"))
                    .and_then(|d| d.as_object_mut())
                {
                    // VMDK CIDs are random; extents carry the file names.
                    for k in ["cid", "parent-cid", "extents"] {
                        d.remove(k);
                    }
                }
                v
            };
            assert_eq!(
                info(&v),
                info(&q),
                "{src} -> {fmt} {opts}: info differs from qemu-img's output"
            );
        }
    }
}

#[test]
fn create_makes_what_qemu_img_makes_for_every_format() {
    let s = Scratch::new("fmt-create");
    let q = s.sub("q");
    let v = s.sub("v");
    let cases: &[(&str, &str, &str)] = &[
        ("qcow2", "", "1G"),
        ("qcow2", "compat=0.10", "100M"),
        (
            "qcow2",
            "cluster_size=2M,extended_l2=on,lazy_refcounts=on",
            "3G",
        ),
        ("qcow2", "refcount_bits=1,cluster_size=512", "10M"),
        ("qcow2", "preallocation=metadata", "64M"),
        ("qcow2", "preallocation=full", "8M"),
        ("vmdk", "", "1G"),
        ("vmdk", "subformat=monolithicFlat", "10M"),
        ("vmdk", "subformat=twoGbMaxExtentSparse", "5G"),
        ("vmdk", "subformat=streamOptimized", "1G"),
        (
            "vmdk",
            "adapter_type=lsilogic,hwversion=6,zeroed_grain=on",
            "1G",
        ),
        ("vhdx", "", "1G"),
        ("vhdx", "subformat=fixed", "16M"),
        ("vhdx", "block_size=1M,log_size=2M", "1G"),
        ("vpc", "", "1G"),
        ("vpc", "subformat=fixed,force_size=on", "10M"),
        ("vpc", "force_size=on", "1000M"),
    ];
    for (fmt, opts, size) in cases {
        let name = format!("x.{fmt}");
        let mut args = vec!["create", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name.as_str(), size]);
        let qr = qemu_img(&q, &args);
        let vr = vdisk(&v, &args);
        ok(&qr, &format!("qemu-img {args:?}"));
        assert_eq!(vr.code, qr.code, "{args:?}: {vr:?}");
        assert_eq!(vr.stdout, qr.stdout, "{args:?}: Formatting line differs");
        let info = |dir: &Path| -> Value {
            let r = qemu_img(dir, &["info", "--output=json", &name]);
            ok(&r, "qemu-img info");
            let mut j: Value = serde_json::from_str(&r.stdout).expect("info");
            let o = j.as_object_mut().expect("object");
            o.remove("actual-size");
            o.remove("children");
            if let Some(d) = o
                .get_mut("format-specific")
                .and_then(|f| f.get_mut("data"))
                .and_then(|d| d.as_object_mut())
            {
                d.remove("cid");
            }
            j
        };
        assert_eq!(info(&v), info(&q), "{args:?}: created images differ");
        let map = |dir: &Path| qemu_img(dir, &["map", "--output=json", &name]).stdout;
        if *fmt != "vhdx" {
            assert_eq!(map(&v), map(&q), "{args:?}: maps differ");
        }
        if *fmt != "vpc" {
            let chk = qemu_img(&v, &["check", &name]);
            assert_eq!(chk.code, 0, "{args:?}: {}{}", chk.stdout, chk.stderr);
        }
        for dir in [&q, &v] {
            for e in fs::read_dir(dir).expect("list").flatten() {
                fs::remove_file(e.path()).expect("remove");
            }
        }
    }
}

#[test]
fn compare_agrees_with_qemu_img_across_formats() {
    let s = Scratch::new("fmt-compare");
    let images = make_images(s.dir());
    // Every image holds the same contents (WRITES) except the chain top.
    let same_content: Vec<&Made> = images
        .iter()
        .filter(|m| m.name != "top.qcow2" && !m.name.ends_with(".vpc"))
        .collect();
    for pair in same_content.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // Strict mode compares allocation too, and vdisk reports VHDX allocation truly
        // where qemu-img calls every block data: strict answers differ there by design.
        let vhdx = a.format == "vhdx" || b.format == "vhdx";
        for strict in [false, true].into_iter().filter(|&s| !(s && vhdx)) {
            let mut args = vec!["compare", "-f", a.format, "-F", b.format];
            if strict {
                args.push("-s");
            }
            args.extend([a.name.as_str(), b.name.as_str()]);
            same(s.dir(), &args);
        }
    }
    same(s.dir(), &["compare", "v3.qcow2", "top.qcow2"]);
    same(s.dir(), &["compare", "dyn.vpc", "dyn.vhdx"]);
    same(s.dir(), &["compare", "-s", "dyn.vpc", "dyn.vhdx"]);
}

/// Errors a script meets, in drop-in mode: the words and exit codes of qemu-img.
#[test]
fn format_errors_match_qemu_img_in_drop_in_mode() {
    let s = Scratch::new("fmt-errors");
    let dir = s.dir();
    let bin = s.sub("bin");
    dropin_link(&bin, Path::new(VDISK));
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "1M"]),
        "create",
    );
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "raw", "plain.raw", "1M"]),
        "create",
    );
    // A qcow2 whose version field is 9.
    let mut bytes = fs::read(s.path("good.qcow2")).expect("read");
    bytes[7] = 9;
    fs::write(s.path("v9.qcow2"), &bytes).expect("write");
    ok(
        &qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "gone.qcow2",
                "-F",
                "qcow2",
                "-u",
                "orphan.qcow2",
                "1M",
            ],
        ),
        "create orphan",
    );
    for args in [
        &["info", "-f", "qcow2", "plain.raw"][..],
        &["info", "-f", "vmdk", "plain.raw"],
        &["info", "-f", "vhdx", "plain.raw"],
        &["info", "-f", "vpc", "plain.raw"],
        &["info", "v9.qcow2"],
        &["info", "orphan.qcow2"],
        &["check", "plain.raw"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "plain.raw",
            "out.qcow2",
        ],
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=bogus",
            "plain.raw",
            "out.vmdk",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "new.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=3M",
            "new.vhdx",
            "1M",
        ],
    ] {
        same_dropin(dir, &bin, args);
    }
}

/// A VHDX chain made by vdisk (dynamic base and two differencing layers, which qemu-img
/// cannot open): `map` says which layer each extent comes from, and the chain converts to
/// the flattened contents.
#[test]
fn vhdx_chain_map_shows_each_layer() {
    let s = Scratch::new("fmt-vhdx-chain");
    let dir = s.dir();
    let mut model = vec![0u8; 64 * MIB as usize];
    // Each layer is written before its child is made: writing to a parent later changes its
    // DataWriteGuid, and the child then (rightly) refuses it.
    let layers: [(&str, Option<&str>, u64, u64, u8); 3] = [
        ("base.vhdx", None, 0, 8 * MIB, 0xb0),
        ("mid.vhdx", Some("base.vhdx"), 16 * MIB, 8 * MIB, 0x3d),
        ("top.vhdx", Some("mid.vhdx"), 32 * MIB, 2 * MIB, 0x70),
    ];
    for (name, parent, off, len, byte) in layers {
        let create = match parent {
            None => vdisk(dir, &["create", "-q", "-f", "vhdx", name, "64M"]),
            Some(p) => vdisk(
                dir,
                &["create", "-q", "-f", "vhdx", "-b", p, "-F", "vhdx", name],
            ),
        };
        ok(&create, &format!("create {name}"));
        let mut opts = OpenOptions::read_write();
        opts.no_backing = true;
        let img =
            vdisk_blockjobs::open_image(&s.path(name), Some("vhdx"), &opts).expect("open layer");
        img.write_at(&vec![byte; len as usize], off).expect("write");
        img.flush().expect("flush");
        model[off as usize..(off + len) as usize].fill(byte);
    }
    let r = vdisk(dir, &["map", "--output=json", "top.vhdx"]);
    ok(&r, "map");
    let map: Vec<Value> = serde_json::from_str(&r.stdout).expect("map JSON");
    let depth_at = |off: u64| -> Option<u64> {
        map.iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap_or(0);
                start <= off && off < start + e["length"].as_u64().unwrap_or(0)
            })
            .filter(|e| e["data"] == Value::Bool(true))
            .and_then(|e| e["depth"].as_u64())
    };
    assert_eq!(depth_at(0), Some(2), "base data: {map:?}");
    assert_eq!(depth_at(16 * MIB), Some(1), "mid data");
    assert_eq!(depth_at(32 * MIB), Some(0), "top data");
    assert_eq!(depth_at(48 * MIB), None, "never written");
    let human = vdisk(dir, &["map", "top.vhdx"]);
    ok(&human, "human map");
    for file in ["base.vhdx", "mid.vhdx", "top.vhdx"] {
        assert!(
            human.stdout.contains(file),
            "human map names {file}:\n{}",
            human.stdout
        );
    }
    ok(
        &vdisk(dir, &["convert", "-O", "raw", "top.vhdx", "flat.raw"]),
        "convert chain",
    );
    assert!(
        fs::read(s.path("flat.raw")).expect("read") == model,
        "flattened chain contents"
    );
    let opened = vdisk_blockjobs::open_image(&s.path("top.vhdx"), None, &OpenOptions::read_only())
        .expect("open chain");
    assert_eq!(opened.size(), 64 * MIB);
    let info = vdisk(
        dir,
        &["info", "--backing-chain", "--output=json", "top.vhdx"],
    );
    ok(&info, "info chain");
    let chain: Vec<Value> = serde_json::from_str(&info.stdout).expect("json");
    assert_eq!(chain.len(), 3);
    // The locator keeps Hyper-V's relative spelling (`.\\mid.vhdx`); the full name resolves.
    for (node, parent) in [(&chain[0], "mid.vhdx"), (&chain[1], "base.vhdx")] {
        let full = node["full-backing-filename"]
            .as_str()
            .expect("resolved parent");
        assert!(full.ends_with(parent), "{node}");
        assert!(dir.join(full).exists(), "{full} exists");
    }
}

/// `qemu-img map` of `name` without host offsets, runs of equal flags merged: what is
/// allocated how, independent of where the host file put it.
fn allocation(dir: &Path, fmt: &str, name: &str) -> Vec<Value> {
    let r = qemu_img(dir, &["map", "--output=json", "-f", fmt, name]);
    ok(&r, "qemu-img map");
    let list: Vec<Value> = serde_json::from_str(&r.stdout).expect("map JSON");
    let mut out: Vec<Value> = Vec::new();
    for mut e in list {
        if let Some(o) = e.as_object_mut() {
            o.remove("offset");
        }
        let same_flags = |a: &Value, b: &Value| {
            ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| a[k] == b[k])
        };
        match out.last_mut() {
            Some(last) if same_flags(last, &e) => {
                let len = last["length"].as_u64().unwrap_or(0) + e["length"].as_u64().unwrap_or(0);
                last["length"] = Value::from(len);
            }
            _ => out.push(e),
        }
    }
    out
}

/// `convert -c`: compressed qcow2 (zlib and zstd, several cluster sizes, a source of odd
/// length and several concatenated sources) holds the source's contents, passes qemu-img
/// check, and compresses the clusters qemu-img compresses; formats that cannot compress
/// refuse as qemu-img does.
#[test]
fn compressed_convert_matches_qemu_img() {
    let s = Scratch::new("fmt-compress");
    let dir = s.dir();
    let images = make_images(dir);
    // Text-like data that compresses, random data that does not, and an odd length.
    let mut odd = Vec::with_capacity(3 * MIB as usize + 1000);
    let mut x: u32 = 12345;
    for i in 0..(3 * MIB as usize + 1000) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        odd.push(if i < 2 * MIB as usize {
            b"vdisk compresses "[i % 17]
        } else {
            (x >> 16) as u8
        });
    }
    fs::write(s.path("odd.raw"), &odd).expect("write odd source");
    let cases: &[(&[&str], &str)] = &[
        (&["-f", "qcow2", "v3.qcow2"], ""),
        (&["-f", "qcow2", "top.qcow2"], "compression_type=zstd"),
        (&["-f", "vmdk", "stream.vmdk"], "cluster_size=4k"),
        (&["-f", "raw", "odd.raw"], ""),
        (
            &["-f", "raw", "odd.raw"],
            "compression_type=zstd,cluster_size=2M",
        ),
        (&["-f", "raw", "odd.raw", "odd.raw"], "cluster_size=512"),
    ];
    assert!(images.iter().any(|m| m.name == "top.qcow2"));
    for (i, (src, opts)) in cases.iter().enumerate() {
        let mut outs = Vec::new();
        for tool in ["v", "q"] {
            let out = format!("{tool}{i}.qcow2");
            let mut args = vec!["convert", "-c", "-O", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend_from_slice(src);
            args.push(&out);
            let r = if tool == "v" {
                vdisk(dir, &args)
            } else {
                qemu_img(dir, &args)
            };
            ok(&r, &format!("{tool} {args:?}"));
            outs.push(out);
        }
        let (v, q) = (&outs[0], &outs[1]);
        let chk = qemu_img(dir, &["check", "--output=json", v]);
        ok(&chk, &format!("check {v}"));
        let report: Value = serde_json::from_str(&chk.stdout).expect("check JSON");
        assert!(
            report.get("corruptions").is_none() && report.get("leaks").is_none(),
            "{report}"
        );
        assert!(
            report["compressed-clusters"].as_u64().unwrap_or(0) > 0,
            "{src:?}: nothing compressed: {report}"
        );
        let cmp = qemu_img(dir, &["compare", "-f", "qcow2", "-F", "qcow2", v, q]);
        assert_eq!(cmp.code, 0, "{src:?} {opts}: {}", cmp.stdout);
        let map = |name: &str| allocation(dir, "qcow2", name);
        assert_eq!(
            map(v),
            map(q),
            "{src:?} {opts}: compressed allocation differs"
        );
        let len = |name: &str| fs::metadata(s.path(name)).expect("stat").len();
        assert_eq!(
            len(v) % 512,
            0,
            "the file ends on a whole sector, as qemu's does"
        );
        let qchk: Value =
            serde_json::from_str(&qemu_img(dir, &["check", "--output=json", q]).stdout)
                .expect("json");
        assert_eq!(
            report["compressed-clusters"], qchk["compressed-clusters"],
            "{src:?} {opts}"
        );
        assert_eq!(
            report["allocated-clusters"], qchk["allocated-clusters"],
            "{src:?} {opts}"
        );
    }
    // VMDK takes -c (plain grains outside streamOptimized); VHDX and VPC refuse; a qcow2
    // with a data file fails at the first write, all as qemu-img does.
    let bin = s.sub("bin");
    dropin_link(&bin, Path::new(VDISK));
    for args in [
        &["convert", "-c", "-O", "vmdk", "v3.qcow2", "c.vmdk"][..],
        &[
            "convert",
            "-c",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "v3.qcow2",
            "cs.vmdk",
        ],
        &["convert", "-c", "-O", "vhdx", "v3.qcow2", "c.vhdx"],
        &["convert", "-c", "-O", "vpc", "v3.qcow2", "c.vpc"],
        &["convert", "-c", "-O", "raw", "v3.qcow2", "c.raw"],
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "data_file=c.data",
            "v3.qcow2",
            "cd.qcow2",
        ],
    ] {
        let q = run_with_path(dir, Some(&bin), Path::new("/usr/bin/qemu-img"), args);
        for f in [
            "c.vmdk", "cs.vmdk", "c.vhdx", "c.vpc", "c.raw", "cd.qcow2", "c.data",
        ] {
            let _ = fs::remove_file(s.path(f));
        }
        let v = run_with_path(dir, Some(&bin), &bin.join("qemu-img"), args);
        assert_eq!(
            (v.code, &v.stdout, &v.stderr),
            (q.code, &q.stdout, &q.stderr),
            "{args:?}"
        );
        if q.code == 0 {
            let cmp = qemu_img(dir, &["compare", "v3.qcow2", args[args.len() - 1]]);
            assert_eq!(cmp.code, 0, "{args:?}: {}", cmp.stdout);
        }
    }
}

/// An OVA appliance with two disks, read in place: `info` lists both, `convert` takes the
/// first by default and another with `--image-opts ...,disk=N`, and the results hold the
/// disks' contents and pass qemu-img check. qemu-img cannot read appliances, so the
/// oracle is qemu-img's view of the disks themselves.
#[test]
fn ova_appliances_convert_disk_by_disk() {
    let s = Scratch::new("fmt-ova");
    let dir = s.dir();
    let mut xml_refs = String::new();
    let mut xml_disks = String::new();
    for i in 0..2u64 {
        let raw = format!("s{i}.raw");
        fs::File::create(s.path(&raw))
            .and_then(|f| f.set_len((4 + 4 * i) * MIB))
            .expect("raw");
        qemu_io(
            dir,
            "raw",
            &raw,
            &[&format!("write -P {} {}M 300k", 0x31 + i, i)],
        );
        ok(
            &qemu_img(
                dir,
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "vmdk",
                    "-o",
                    "subformat=streamOptimized",
                    &raw,
                    &format!("d{i}.vmdk"),
                ],
            ),
            "make stream disk",
        );
        xml_refs.push_str(&format!(
            "    <File ovf:href=\"d{i}.vmdk\" ovf:id=\"file{i}\"/>\n"
        ));
        xml_disks.push_str(&format!(
            "    <Disk ovf:capacity=\"{}\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            (4 + 4 * i) * MIB
        ));
    }
    fs::write(
        s.path("app.ovf"),
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\">\n  <References>\n{xml_refs}  </References>\n  <DiskSection>\n    <Info>Virtual disks</Info>\n{xml_disks}  </DiskSection>\n</Envelope>\n"
        ),
    )
    .expect("ovf");
    let tar = run_in(
        dir,
        Path::new("tar"),
        &["-cf", "app.ova", "app.ovf", "d0.vmdk", "d1.vmdk"],
    );
    ok(&tar, "tar");
    for f in ["d0.vmdk", "d1.vmdk"] {
        fs::remove_file(s.path(f)).expect("only the archive remains");
    }
    let info = vdisk(dir, &["info", "--output=json", "app.ova"]);
    ok(&info, "info app.ova");
    let j: Value = serde_json::from_str(&info.stdout).expect("json");
    assert_eq!(j["format"], "vmdk");
    assert_eq!(j["virtual-size"], 4 * MIB);
    let disks = &j["format-specific"]["data"]["appliance"]["disks"];
    assert_eq!(disks.as_array().map(Vec::len), Some(2), "{j}");
    assert_eq!(disks[1]["file"], "d1.vmdk");
    ok(
        &vdisk(dir, &["convert", "-O", "qcow2", "app.ova", "o0.qcow2"]),
        "convert disk 0",
    );
    ok(
        &vdisk(
            dir,
            &[
                "convert",
                "--image-opts",
                "-O",
                "qcow2",
                "driver=vmdk,file.filename=app.ova,disk=1",
                "o1.qcow2",
            ],
        ),
        "convert disk 1",
    );
    for i in 0..2 {
        let cmp = qemu_img(
            dir,
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                &format!("s{i}.raw"),
                &format!("o{i}.qcow2"),
            ],
        );
        assert_eq!(cmp.code, 0, "disk {i}: {}", cmp.stdout);
        ok(&qemu_img(dir, &["check", &format!("o{i}.qcow2")]), "check");
    }
    let bad = vdisk(
        dir,
        &[
            "info",
            "--image-opts",
            "driver=vmdk,file.filename=app.ova,disk=2",
        ],
    );
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("there is no disk 2"), "{}", bad.stderr);
    let bad = vdisk(
        dir,
        &[
            "info",
            "--image-opts",
            "driver=vmdk,file.filename=app.ova,bogus=1",
        ],
    );
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("no option 'bogus'"), "{}", bad.stderr);
}

/// `--image-opts` as qemu-img parses it, in drop-in mode: the same output and errors.
#[test]
fn image_opts_match_qemu_img() {
    let s = Scratch::new("fmt-imageopts");
    let dir = s.dir();
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]),
        "create",
    );
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 9 1M 64k"]);
    same(
        dir,
        &["info", "--image-opts", "driver=qcow2,file.filename=a.qcow2"],
    );
    same(
        dir,
        &[
            "map",
            "--output=json",
            "--image-opts",
            "file.filename=a.qcow2",
        ],
    );
    let bin = s.sub("bin");
    dropin_link(&bin, Path::new(VDISK));
    for args in [
        &[
            "info",
            "--image-opts",
            "-f",
            "qcow2",
            "driver=qcow2,file.filename=a.qcow2",
        ][..],
        &["info", "--image-opts", "a.qcow2"],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,bogus=1",
        ],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=nope.qcow2",
        ],
    ] {
        same_dropin(dir, &bin, args);
    }
    ok(
        &vdisk(
            dir,
            &[
                "convert",
                "--image-opts",
                "-O",
                "raw",
                "driver=qcow2,file.filename=a.qcow2",
                "a.raw",
            ],
        ),
        "convert --image-opts",
    );
    assert_eq!(qemu_img(dir, &["compare", "a.qcow2", "a.raw"]).code, 0);
}
