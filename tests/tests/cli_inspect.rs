//! `vdisk info`, `map`, `measure`, `compare` and `create` on raw images, against the system
//! qemu-img as the oracle.
//!
//! The images are made by qemu-img and qemu-io (holes, write-zeroes, data at odd offsets,
//! sizes that are not a multiple of 4096 or even of 512, empty files), then both tools run
//! on the same files from the same folder, so even file names in the output must agree.
//! JSON is compared both parsed (field for field) and as raw bytes, since qemu's pretty
//! printer is deterministic; human output is compared as bytes.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{
    dropin_link, qemu_img, qemu_io_raw, run_in, settle, size_and_allocation, Run, Scratch,
};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// The set of raw images every inspection test runs over.
struct Fixtures {
    scratch: Scratch,
    names: Vec<&'static str>,
}

fn fixtures(tag: &str) -> Fixtures {
    let s = Scratch::new(tag);
    let dir = s.dir().to_path_buf();
    let create = |args: &[&str]| {
        let r = qemu_img(&dir, args);
        assert_eq!(r.code, 0, "qemu-img {args:?}: {}", r.stderr);
    };
    // Sparse with data at odd offsets, a write-zeroes range and a tail of holes.
    create(&["create", "-q", "-f", "raw", "holes.raw", "4M"]);
    qemu_io_raw(
        &dir,
        "holes.raw",
        &[
            "write -P 0xab 1M 64k",
            "write -z 2M 128k",
            "write -P 1 3000001 7",
            "write -P 2 4194303 1",
        ],
    );
    // Data written, then zeroed in place (write -z keeps or punches, as qemu decides).
    create(&["create", "-q", "-f", "raw", "zeroed.raw", "1M"]);
    qemu_io_raw(
        &dir,
        "zeroed.raw",
        &["write -P 7 0 256k", "write -z 64k 64k"],
    );
    create(&[
        "create",
        "-q",
        "-f",
        "raw",
        "-o",
        "preallocation=full",
        "full.raw",
        "1M",
    ]);
    create(&[
        "create",
        "-q",
        "-f",
        "raw",
        "-o",
        "preallocation=falloc",
        "falloc.raw",
        "1M",
    ]);
    create(&["create", "-q", "-f", "raw", "empty.raw", "0"]);
    // Sizes qemu rounds up to a whole sector: all data, and all hole.
    fs::write(s.path("odd-data.raw"), vec![0x5a; 1000]).expect("write odd-data");
    fs::File::create(s.path("odd-hole.raw"))
        .and_then(|f| f.set_len(5000))
        .expect("make odd-hole");
    // Not a multiple of 4096, data in the partial last block.
    fs::File::create(s.path("tail.raw"))
        .and_then(|f| f.set_len(3 * 4096 + 1536))
        .expect("make tail");
    qemu_io_raw(&dir, "tail.raw", &["write -P 9 12800 512"]);
    // Larger than qemu-img's 1 GiB block-status step, with data across the step boundaries
    // (sparse, so it costs nothing).
    create(&["create", "-q", "-f", "raw", "big.raw", "3G"]);
    qemu_io_raw(
        &dir,
        "big.raw",
        &[
            "write -P 1 1073737728 8192",
            "write -P 2 2147479552 4096",
            "write -P 3 2684354560 65536",
        ],
    );
    for entry in fs::read_dir(s.dir()).expect("list fixtures").flatten() {
        settle(&entry.path());
    }
    Fixtures {
        scratch: s,
        names: vec![
            "holes.raw",
            "zeroed.raw",
            "full.raw",
            "falloc.raw",
            "empty.raw",
            "odd-data.raw",
            "odd-hole.raw",
            "tail.raw",
            "big.raw",
        ],
    }
}

fn vdisk(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, Path::new(VDISK), args)
}

/// Runs `args` with both tools and requires the same exit code, stdout bytes and (for JSON)
/// the same parsed value.
fn same_output(dir: &Path, args: &[&str], json: bool) {
    let q = qemu_img(dir, args);
    let v = vdisk(dir, args);
    assert_eq!(q.code, 0, "qemu-img {args:?} failed: {}", q.stderr);
    assert_eq!(v.code, q.code, "exit code of {args:?}: {}", v.stderr);
    if json {
        let qv: Value = serde_json::from_str(&q.stdout).expect("qemu-img JSON parses");
        let vv: Value = serde_json::from_str(&v.stdout)
            .unwrap_or_else(|e| panic!("vdisk {args:?} printed invalid JSON ({e}):\n{}", v.stdout));
        assert_eq!(vv, qv, "JSON values of {args:?} differ");
    }
    assert_eq!(v.stdout, q.stdout, "output bytes of {args:?} differ");
    assert!(
        v.stderr.is_empty(),
        "vdisk {args:?} wrote to stderr: {}",
        v.stderr
    );
}

#[test]
fn info_matches_qemu_img() {
    let fx = fixtures("info");
    for name in &fx.names {
        let dir = fx.scratch.dir();
        same_output(dir, &["info", name], false);
        same_output(dir, &["info", "-f", "raw", name], false);
        same_output(dir, &["info", "--output=json", name], true);
        same_output(dir, &["info", "--output", "json", "-U", name], true);
        same_output(
            dir,
            &["info", "--backing-chain", "--output=json", name],
            true,
        );
        same_output(dir, &["info", "--backing-chain", name], false);
    }
    // qemu's explicit `file:` protocol prefix.
    same_output(fx.scratch.dir(), &["info", "file:holes.raw"], false);
    same_output(
        fx.scratch.dir(),
        &["map", "--output=json", "file:holes.raw"],
        true,
    );
    // A device node is read through qemu's host_device protocol.
    same_output(fx.scratch.dir(), &["info", "-f", "raw", "/dev/null"], false);
    same_output(
        fx.scratch.dir(),
        &["info", "--output=json", "/dev/null"],
        true,
    );
}

#[test]
fn info_json_has_the_raw_shape() {
    let fx = fixtures("info-shape");
    let v = vdisk(fx.scratch.dir(), &["info", "--output=json", "holes.raw"]);
    let parsed: Value = serde_json::from_str(&v.stdout).expect("JSON");
    assert_eq!(parsed["format"], "raw");
    assert_eq!(parsed["virtual-size"], 4 << 20);
    assert_eq!(parsed["children"][0]["name"], "file");
    assert_eq!(parsed["children"][0]["info"]["format"], "file");
    assert_eq!(
        parsed["children"][0]["info"]["format-specific"]["type"],
        "file"
    );
    let (_, allocated) = size_and_allocation(&fx.scratch.path("holes.raw"));
    assert_eq!(parsed["actual-size"], allocated);
}

#[test]
fn map_matches_qemu_img() {
    let fx = fixtures("map");
    for name in &fx.names {
        let dir = fx.scratch.dir();
        same_output(dir, &["map", name], false);
        same_output(dir, &["map", "--output=json", name], true);
        same_output(dir, &["map", "-f", "raw", "--output=json", name], true);
    }
    let dir = fx.scratch.dir();
    for (start, len) in [
        ("5000", "200000"),
        ("1M", "64k"),
        ("0", "0"),
        ("999", "1"),
        ("4194303", "10"),
        ("16M", "1M"),
        ("3000000", "1M"),
    ] {
        let args = [
            "map",
            "--output=json",
            "--start-offset",
            start,
            "--max-length",
            len,
            "holes.raw",
        ];
        same_output(dir, &args, true);
        let human = [
            "map",
            "--start-offset",
            start,
            "--max-length",
            len,
            "holes.raw",
        ];
        same_output(dir, &human, false);
    }
    same_output(
        dir,
        &[
            "map",
            "--output=json",
            "--start-offset",
            "999",
            "odd-data.raw",
        ],
        true,
    );
}

#[test]
fn measure_matches_qemu_img() {
    let fx = fixtures("measure");
    let dir = fx.scratch.dir();
    for name in &fx.names {
        same_output(dir, &["measure", "-O", "raw", name], false);
        same_output(dir, &["measure", "--output=json", "-O", "raw", name], true);
    }
    for size in ["0", "1", "1000", "1M", "10G", "1.5T"] {
        same_output(dir, &["measure", "-O", "raw", "--size", size], false);
        same_output(dir, &["measure", "--output=json", "--size", size], true);
    }
    same_output(
        dir,
        &[
            "measure",
            "-O",
            "raw",
            "-o",
            "preallocation=full",
            "--size",
            "1M",
        ],
        false,
    );
}

/// Runs `compare args` with both tools; requires the same exit code and stdout.
fn same_compare(dir: &Path, args: &[&str]) -> i32 {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    let q = qemu_img(dir, &full);
    let v = vdisk(dir, &full);
    assert_eq!(v.code, q.code, "exit code of {full:?}: {v:?} vs {q:?}");
    assert_eq!(v.stdout, q.stdout, "output of {full:?}");
    q.code
}

#[test]
fn compare_agrees_with_qemu_img() {
    let s = Scratch::new("compare");
    let dir = s.dir();
    let create = |name: &str, size: &str| {
        assert_eq!(
            qemu_img(dir, &["create", "-q", "-f", "raw", name, size]).code,
            0
        );
    };
    create("a.raw", "4M");
    qemu_io_raw(
        dir,
        "a.raw",
        &["write -P 3 1M 1M", "write -P 4 3500000 1000"],
    );
    fs::copy(s.path("a.raw"), s.path("same.raw")).expect("copy");
    // The same contents with different allocation: fully written.
    create("dense.raw", "4M");
    qemu_io_raw(
        dir,
        "dense.raw",
        &[
            "write -P 0 0 4M",
            "write -P 3 1M 1M",
            "write -P 4 3500000 1000",
        ],
    );
    // One byte differs in the middle of a data range.
    fs::copy(s.path("a.raw"), s.path("byte.raw")).expect("copy");
    qemu_io_raw(dir, "byte.raw", &["write -P 5 1500001 1"]);
    // One byte of data where the other has a hole.
    fs::copy(s.path("a.raw"), s.path("hole-byte.raw")).expect("copy");
    qemu_io_raw(dir, "hole-byte.raw", &["write -P 1 2500003 1"]);
    // Larger, with a zero tail, and with data in the tail.
    fs::copy(s.path("a.raw"), s.path("bigger.raw")).expect("copy");
    qemu_img(dir, &["resize", "-q", "-f", "raw", "bigger.raw", "6M"]);
    fs::copy(s.path("bigger.raw"), s.path("bigger-data.raw")).expect("copy");
    qemu_io_raw(dir, "bigger-data.raw", &["write -P 8 5000000 1"]);
    // Odd sizes that qemu rounds to the same sector count.
    fs::write(s.path("odd1.raw"), vec![0u8; 1000]).expect("write");
    fs::write(s.path("odd2.raw"), vec![0u8; 1024]).expect("write");

    // Large sparse images: only the data ranges are read.
    for name in ["big1.raw", "big2.raw"] {
        create(name, "3G");
        qemu_io_raw(dir, name, &["write -P 6 1073737728 8192"]);
    }
    qemu_io_raw(dir, "big2.raw", &["write -P 7 3113851290 1"]);

    assert_eq!(same_compare(dir, &["big1.raw", "big1.raw"]), 0);
    assert_eq!(same_compare(dir, &["big1.raw", "big2.raw"]), 1);
    assert_eq!(same_compare(dir, &["-s", "big1.raw", "big2.raw"]), 1);
    assert_eq!(same_compare(dir, &["a.raw", "same.raw"]), 0);
    assert_eq!(
        same_compare(dir, &["-f", "raw", "-F", "raw", "a.raw", "dense.raw"]),
        0
    );
    assert_eq!(same_compare(dir, &["-s", "a.raw", "dense.raw"]), 1);
    assert_eq!(same_compare(dir, &["a.raw", "byte.raw"]), 1);
    assert_eq!(same_compare(dir, &["byte.raw", "a.raw"]), 1);
    assert_eq!(same_compare(dir, &["a.raw", "hole-byte.raw"]), 1);
    assert_eq!(same_compare(dir, &["-q", "a.raw", "hole-byte.raw"]), 1);
    assert_eq!(same_compare(dir, &["a.raw", "bigger.raw"]), 0);
    assert_eq!(same_compare(dir, &["bigger.raw", "a.raw"]), 0);
    assert_eq!(same_compare(dir, &["-s", "a.raw", "bigger.raw"]), 1);
    assert_eq!(same_compare(dir, &["a.raw", "bigger-data.raw"]), 1);
    assert_eq!(same_compare(dir, &["bigger-data.raw", "a.raw"]), 1);
    assert_eq!(same_compare(dir, &["-p", "bigger-data.raw", "a.raw"]), 1);
    assert_eq!(same_compare(dir, &["-p", "a.raw", "same.raw"]), 0);
    assert_eq!(same_compare(dir, &["odd1.raw", "odd2.raw"]), 0);
    // Strict mode sees the data of the 1000-byte file end before the rounded size.
    assert_eq!(same_compare(dir, &["-s", "odd1.raw", "odd2.raw"]), 1);
    // Errors: a missing image, a folder, an unknown format, a bad command line.
    assert_eq!(same_compare(dir, &["a.raw", "missing.raw"]), 2);
    assert_eq!(same_compare(dir, &["missing.raw", "a.raw"]), 2);
    assert_eq!(same_compare(dir, &["a.raw", "."]), 2);
    assert_eq!(same_compare(dir, &["-F", "nosuchfmt", "a.raw", "a.raw"]), 2);
    assert_eq!(same_compare(dir, &["a.raw"]), 1);
}

/// Creates `name` with `args` in two sibling folders, one per tool, and requires the same
/// output and exit code, and files of the same length and allocation.
fn same_create(s: &Scratch, args: &[&str], name: &str) {
    let qdir = s.sub("q");
    let vdir = s.sub("v");
    let mut full = vec!["create"];
    full.extend_from_slice(args);
    let q = qemu_img(&qdir, &full);
    let v = vdisk(&vdir, &full);
    assert_eq!(v.code, q.code, "exit code of {full:?}: {v:?} vs {q:?}");
    assert_eq!(v.stdout, q.stdout, "output of {full:?}");
    let (qf, vf): (PathBuf, PathBuf) = (qdir.join(name), vdir.join(name));
    assert_eq!(
        qf.exists(),
        vf.exists(),
        "{full:?}: file exists for one tool only"
    );
    if qf.exists() {
        settle(&qf);
        settle(&vf);
        assert_eq!(
            size_and_allocation(&vf),
            size_and_allocation(&qf),
            "{full:?}: length and allocation differ"
        );
        let qm = qemu_img(&qdir, &["map", "--output=json", "-f", "raw", name]);
        let vm = qemu_img(&vdir, &["map", "--output=json", "-f", "raw", name]);
        assert_eq!(vm.stdout, qm.stdout, "{full:?}: maps differ");
        fs::remove_file(&qf).expect("remove");
        fs::remove_file(&vf).expect("remove");
    }
}

#[test]
fn create_makes_the_same_files_as_qemu_img() {
    let s = Scratch::new("create");
    for args in [
        vec!["-f", "raw", "x.raw", "1M"],
        vec!["x.raw", "64k"],
        vec!["-q", "-f", "raw", "x.raw", "1M"],
        vec!["-f", "raw", "x.raw", "0"],
        vec!["-f", "raw", "x.raw", "1000"],
        vec!["-f", "raw", "x.raw", "1"],
        vec!["-f", "raw", "x.raw", "1.5k"],
        vec!["-f", "raw", "-o", "preallocation=off", "x.raw", "1M"],
        vec!["-f", "raw", "-o", "preallocation=falloc", "x.raw", "1M"],
        vec!["-f", "raw", "-o", "preallocation=full", "x.raw", "1M"],
        vec!["-f", "raw", "-o", "preallocation=full", "x.raw", "1000"],
        vec!["-f", "raw", "-o", "size=5k", "x.raw"],
        vec!["-f", "raw", "-o", "preallocation=full,size=5k", "x.raw"],
        vec![
            "-f",
            "raw",
            "-o",
            "nocow=on,preallocation=full,extent_size_hint=1M",
            "x.raw",
            "1M",
        ],
        vec![
            "-f",
            "raw",
            "-o",
            "preallocation=falloc",
            "-o",
            "nocow=off",
            "x.raw",
            "1M",
        ],
    ] {
        same_create(&s, &args, "x.raw");
    }
}

#[test]
fn create_help_lists_options_like_qemu_img() {
    let s = Scratch::new("create-help");
    let bin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    for args in [
        vec!["create", "-o", "help"],
        vec!["create", "-f", "raw", "-o", "help"],
        vec!["create", "-f", "raw", "-o", "help", "x.raw"],
        vec!["create", "-f", "raw", "-o", "?", "x.raw", "1M"],
    ] {
        let q = qemu_img(s.dir(), &args);
        let v = run_in(s.dir(), &bin, &args);
        assert_eq!((v.code, &v.stdout), (q.code, &q.stdout), "{args:?}");
    }
    assert!(
        !s.path("x.raw").exists(),
        "-o help must not create the file"
    );
}

#[test]
fn every_command_teaches_its_options() {
    let s = Scratch::new("help");
    for cmd in ["create", "info", "map", "measure", "compare", "check"] {
        let v = vdisk(s.dir(), &[cmd, "--help"]);
        assert_eq!(v.code, 0, "{cmd} --help");
        assert!(v.stdout.contains("Usage:"), "{cmd} --help: {}", v.stdout);
        assert!(v.stdout.contains("--"), "{cmd} --help lists no options");
    }
}

#[test]
fn human_sizes_round_like_qemu_img() {
    // qemu prints sizes with C's %0.3g after switching units at 1000: "1e+03 KiB",
    // "0.977 MiB". Sparse files, so they cost nothing.
    let s = Scratch::new("human-sizes");
    for size in [
        512u64,
        1024,
        1536,
        102_400,
        1_023_488,
        1_024_000,
        1_048_064,
        1_100_288,
        1_048_051_712,
        1_073_741_824,
        1_099_511_627_776,
    ] {
        let name = format!("s{size}.raw");
        fs::File::create(s.path(&name))
            .and_then(|f| f.set_len(size))
            .expect("make sparse file");
        same_output(s.dir(), &["info", "-f", "raw", &name], false);
    }
}
