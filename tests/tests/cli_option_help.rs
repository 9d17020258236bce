//! `-o help` and the typing of `-o` values, side by side with qemu-img 10.
//!
//! Drop-in vdisk (a `qemu-img` symlink first in PATH) must print exactly what qemu-img
//! prints for `-o help` of create, convert and amend, and fail on a malformed option
//! value (bad size, number or boolean) with the same exit code, stdout and stderr.
//! Under its own name vdisk prints the same sorted, typed layout listing every option its
//! driver accepts.

use std::fs;
use std::path::{Path, PathBuf};

use vdisk_tests::{dropin_link, qemu_img, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const FORMATS: &[&str] = &["raw", "qcow2", "vmdk", "vhdx", "vpc", "luks"];

/// qemu-img and drop-in vdisk, each in a folder of its own holding the same small images.
struct Twins {
    _scratch: Scratch,
    bin: PathBuf,
    qemu_dir: PathBuf,
    vdisk_dir: PathBuf,
}

impl Twins {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let qemu_dir = scratch.sub("q");
        let vdisk_dir = scratch.sub("d");
        for dir in [&qemu_dir, &vdisk_dir] {
            fs::create_dir_all(dir).expect("create folder");
            for (file, fmt) in [("src.raw", "raw"), ("a.qcow2", "qcow2")] {
                let r = qemu_img(dir, &["create", "-q", "-f", fmt, file, "1M"]);
                assert_eq!(r.code, 0, "{r:?}");
            }
        }
        Twins {
            _scratch: scratch,
            bin,
            qemu_dir,
            vdisk_dir,
        }
    }

    /// Runs `args` through both tools and asserts the same exit code, stdout and stderr;
    /// returns qemu-img's run.
    fn same(&self, args: &[&str]) -> Run {
        let q = qemu_img(&self.qemu_dir, args);
        let v = run_with_path(
            &self.vdisk_dir,
            Some(&self.bin),
            Path::new("qemu-img"),
            args,
        );
        assert_eq!(
            (v.code, &v.stdout, &v.stderr),
            (q.code, &q.stdout, &q.stderr),
            "qemu-img {}",
            args.join(" ")
        );
        q
    }
}

#[test]
fn help_matches_qemu_img_for_create_convert_and_amend() {
    let t = Twins::new("option-help");
    for &f in FORMATS {
        let new = format!("new.{f}");
        let dst = format!("dst.{f}");
        for help in ["help", "?"] {
            let cases: Vec<Vec<&str>> = vec![
                vec!["create", "-f", f, "-o", help],
                vec!["create", "-f", f, "-o", help, &new],
                vec!["create", "-f", f, "-o", help, &new, "1M"],
                vec!["create", "-f", f, "-o", "cluster_size=1Z,help", &new],
                vec!["convert", "-O", f, "-o", help, "src.raw", &dst],
                vec!["convert", "-O", f, "-o", help, "missing.raw", &dst],
                vec!["amend", "-f", f, "-o", help, "a.qcow2"],
                vec!["amend", "-f", f, "-o", help],
            ];
            for args in cases {
                let q = t.same(&args);
                if args[0] != "amend" {
                    assert_eq!(q.code, 0, "{args:?}: {q:?}");
                }
            }
        }
        for dir in [&t.qemu_dir, &t.vdisk_dir] {
            assert!(!dir.join(&new).exists(), "-o help created {new}");
            assert!(!dir.join(&dst).exists(), "-o help created {dst}");
        }
    }
}

/// A value of the wrong type for each typed option of each format, and a few that qemu's
/// parsers take although they look odd (hex, a leading `+`, `010`).
const CREATE_VALUES: &[(&str, &str)] = &[
    ("qcow2", "cluster_size=1Z"),
    ("qcow2", "cluster_size=-1"),
    ("qcow2", "cluster_size=0x10000"),
    ("qcow2", "refcount_bits=abc"),
    ("qcow2", "lazy_refcounts=maybe"),
    ("vmdk", "hwversion=x"),
    ("vmdk", "hwversion=4"),
    ("vmdk", "compat6=maybe"),
    ("vmdk", "zeroed_grain=2"),
    ("vmdk", "size=1Z"),
    ("vhdx", "block_size=1Z"),
    ("vhdx", "block_size=abc"),
    ("vhdx", "log_size=-1"),
    ("vhdx", "log_size=-0"),
    ("vhdx", "log_size= -5"),
    ("vhdx", "log_size=-1k"),
    ("vhdx", "log_size=1Z"),
    ("vhdx", "log_size=16E"),
    ("vhdx", "log_size=99999999999999999999"),
    ("vhdx", "log_size=0x100000"),
    ("vhdx", "log_size=+1M"),
    ("vhdx", "block_state_zero=maybe"),
    ("vhdx", "size=-1"),
    ("vpc", "force_size=maybe"),
    ("vpc", "force_size=1"),
    ("vpc", "force_size=yes"),
    ("vpc", "force_size"),
    ("vpc", "noforce_size"),
    ("luks", "iter-time=abc"),
    ("luks", "iter-time=-1"),
    ("luks", "iter-time=1Z"),
    ("luks", "iter-time=99999999999999999999"),
    ("luks", "detached-header=maybe"),
    ("luks", "extent_size_hint=x"),
    ("raw", "size=-0"),
];

/// The file protocol's options, which qemu-img takes for every format.
const PROTOCOL_VALUES: &[&str] = &[
    "preallocation=full",
    "preallocation=metadata",
    "preallocation=bogus",
    "nocow=on",
    "nocow=maybe",
    "extent_size_hint=1M",
    "extent_size_hint=1Z",
    "extent_size_hint=5G",
    "extent_size_hint=1M,preallocation=falloc,nocow=on",
];

#[test]
fn protocol_options_are_taken_by_every_format_as_in_qemu_img() {
    let t = Twins::new("option-values-protocol");
    for f in ["vmdk", "vhdx", "vpc"] {
        for option in PROTOCOL_VALUES {
            let file = format!("x.{f}");
            t.same(&["create", "-f", f, "-o", option, &file, "1M"]);
            let dst = format!("y.{f}");
            t.same(&["convert", "-O", f, "-o", option, "src.raw", &dst]);
        }
    }
}

#[test]
fn malformed_create_values_fail_as_in_qemu_img() {
    let t = Twins::new("option-values-create");
    for (f, option) in CREATE_VALUES {
        let file = format!("x.{f}");
        t.same(&["create", "-f", f, "-o", option, &file, "1M"]);
    }
    // Sizes in -o size: qemu prints them as signed numbers.
    t.same(&["create", "-f", "raw", "-o", "size=0x100000", "y.raw"]);
    t.same(&["create", "-f", "raw", "-o", "size=9E", "z.raw"]);
}

#[test]
fn malformed_convert_values_fail_as_in_qemu_img() {
    let t = Twins::new("option-values-convert");
    for (f, option) in [
        ("qcow2", "cluster_size=1Z"),
        ("qcow2", "cluster_size=-1"),
        ("qcow2", "refcount_bits=abc"),
        ("qcow2", "refcount_bits=99999999999999999999"),
        ("qcow2", "lazy_refcounts=maybe"),
        ("qcow2", "nofoo"),
        ("vmdk", "hwversion=x"),
        ("vmdk", "compat6=maybe"),
        ("vhdx", "block_size=1Z"),
        ("vhdx", "log_size=-1"),
        ("vpc", "force_size=maybe"),
        ("luks", "iter-time=abc"),
    ] {
        let dst = format!("dst.{f}");
        t.same(&["convert", "-O", f, "-o", option, "src.raw", &dst]);
        // The sources are opened first; -o is read before -c and --bitmaps are checked.
        t.same(&["convert", "-O", f, "-o", option, "missing.raw", &dst]);
        t.same(&["convert", "-c", "-O", f, "-o", option, "src.raw", &dst]);
        t.same(&[
            "convert",
            "--bitmaps",
            "-O",
            f,
            "-o",
            option,
            "src.raw",
            &dst,
        ]);
    }
    t.same(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=1Z,encrypt.format=luks",
        "src.raw",
        "dst.qcow2",
    ]);
    t.same(&["convert", "-c", "-O", "vpc", "missing.raw", "dst.vpc"]);
    t.same(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=0x10000",
        "src.raw",
        "h.qcow2",
    ]);
}

/// Values outside an option's list of names, refused by qemu's drivers when they create
/// the image (after create's "Formatting" line), before their other checks.
const ENUM_VALUES: &[(&str, &str)] = &[
    ("qcow2", "preallocation=x"),
    ("qcow2", "compression_type=foo,preallocation=x"),
    ("qcow2", "encryption=no"),
    ("qcow2", "encryption=true"),
    ("qcow2", "encrypt.format=luks,encrypt.cipher-alg=foo"),
    ("qcow2", "encrypt.format=luks,encrypt.cipher-mode=foo"),
    ("qcow2", "encrypt.format=luks,encrypt.hash-alg=foo"),
    ("luks", "cipher-alg=AES-256"),
    ("luks", "cipher-alg=des-rfb"),
    ("luks", "cipher-mode=foo"),
    ("luks", "ivgen-alg=foo"),
    ("luks", "ivgen-hash-alg=foo"),
    ("luks", "hash-alg=foo"),
    ("luks", "preallocation=x,hash-alg=foo"),
    ("vmdk", "adapter_type=IDE"),
    ("vmdk", "adapter_type=foo"),
    // The file protocol's value, checked when the file is created (and refused with -c).
    ("vmdk", "preallocation=x"),
    ("vmdk", "preallocation=metadata"),
];

#[test]
fn values_outside_an_options_names_fail_as_in_qemu_img() {
    let t = Twins::new("option-values-enum");
    for (f, option) in ENUM_VALUES {
        let file = format!("x.{f}");
        assert_eq!(
            t.same(&["create", "-f", f, "-o", option, &file, "1M"]).code,
            1
        );
        let dst = format!("y.{f}");
        let r = t.same(&["convert", "-O", f, "-o", option, "src.raw", &dst]);
        assert_eq!(r.code, 1, "{f} {option}");
        // Compression is refused before the driver sees the value.
        t.same(&["convert", "-c", "-O", f, "-o", option, "src.raw", &dst]);
    }
}

#[test]
fn malformed_measure_values_fail_as_in_qemu_img() {
    let t = Twins::new("option-values-measure");
    for (f, option) in [
        ("vmdk", "hwversion=x"),
        ("vmdk", "hwversion=4"),
        ("vmdk", "nohwversion"),
        ("vmdk", "compat6=maybe"),
        ("vhdx", "log_size=-1"),
        ("vhdx", "block_size=1Z"),
        ("vpc", "force_size=maybe"),
        ("luks", "iter-time=abc"),
        ("qcow2", "cluster_size=-1"),
    ] {
        t.same(&["measure", "-O", f, "-o", option, "--size", "1G"]);
    }
}

/// The option names of a help listing, checking that its lines are sorted and typed.
fn listed_options(text: &str, what: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("  ")).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "{what}: not sorted:\n{text}");
    lines
        .iter()
        .map(|l| {
            let (name, rest) = l.trim_start().split_once('=').unwrap_or_else(|| {
                panic!("{what}: untyped line {l:?}");
            });
            assert!(
                ["<str>", "<size>", "<num>", "<bool (on/off)>"]
                    .iter()
                    .any(|t| rest.starts_with(t)),
                "{what}: unknown type in {l:?}"
            );
            name.to_string()
        })
        .collect()
}

#[test]
fn vdisk_help_is_sorted_and_lists_every_accepted_option() {
    let s = Scratch::new("option-help-vdisk");
    for &f in FORMATS {
        let driver = vdisk_blockjobs::format_by_name(f).expect("known format");
        let mut accepted: Vec<String> = driver
            .create_options_help()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        // The file protocol's options are accepted for every format (as qemu-img does).
        for extra in ["nocow", "preallocation", "extent_size_hint"] {
            if !accepted.iter().any(|a| a == extra) {
                accepted.push(extra.to_string());
            }
        }
        accepted.sort();
        let dst = format!("dst.{f}");
        for args in [
            vec!["create", "-f", f, "-o", "help"],
            vec!["create", "-f", f, "-o", "help", "x"],
            vec!["convert", "-O", f, "-o", "help", "src.raw", &dst],
        ] {
            let v = run_with_path(s.dir(), None, Path::new(VDISK), &args);
            assert_eq!((v.code, v.stderr.as_str()), (0, ""), "{args:?}");
            let what = format!("vdisk {}", args.join(" "));
            let mut listed = listed_options(&v.stdout, &what);
            listed.sort();
            assert_eq!(listed, accepted, "{what}");
        }
    }
    // The amend lists are typed and sorted too.
    for f in ["qcow2", "luks"] {
        let v = run_with_path(
            s.dir(),
            None,
            Path::new(VDISK),
            &["amend", "-f", f, "-o", "help"],
        );
        assert_eq!(v.code, 0, "{v:?}");
        assert!(!listed_options(&v.stdout, f).is_empty());
    }
}
