//! Images we create look to qemu-img exactly like the ones it creates with the same
//! options (`info` fields, contents, allocation), pass `qemu-img check`, and take writes
//! from both qemu-io and our driver.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use vdisk_block::testing::ModelTest;
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, Format, OpenOptions};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

fn ours(path: &Path, size: u64, opts: &str) -> vdisk_block::Result<()> {
    Qcow2Format.create(
        path,
        CreateOptions {
            size,
            options: CreateOptions::parse_options(opts).expect("options"),
        },
    )
}

fn info(path: &Path) -> serde_json::Value {
    let json = qemu_img(&["info", "--output=json", path.to_str().expect("utf-8")]);
    serde_json::from_str(&json).expect("info json")
}

fn check_clean(path: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", path.to_str().expect("utf-8")])
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn same_as_qemu_for_every_option() {
    let s = Scratch::new("create");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s.path("base.qcow2").to_str().expect("u"),
        "4M",
    ]);
    let data_ours = s.path("ours.data");
    let data_qemu = s.path("qemu.data");
    let combos: Vec<String> = vec![
        String::new(),
        "compat=0.10".into(),
        "compat=v3,cluster_size=512".into(),
        "cluster_size=4k,refcount_bits=1".into(),
        "cluster_size=2M,refcount_bits=64".into(),
        "refcount_bits=8,lazy_refcounts=on".into(),
        "extended_l2=on".into(),
        "extended_l2=on,cluster_size=16k,compression_type=zstd".into(),
        "compression_type=zstd".into(),
        "backing_file=base.qcow2,backing_fmt=qcow2".into(),
        "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2".into(),
        "preallocation=metadata".into(),
        "preallocation=metadata,cluster_size=4k,compat=0.10".into(),
        "preallocation=falloc,cluster_size=16k".into(),
        "preallocation=full".into(),
        "data_file=DATA".into(),
        "data_file=DATA,data_file_raw=on".into(),
        "data_file=DATA,data_file_raw=on,cluster_size=4k".into(),
        "data_file=DATA,data_file_raw=on,preallocation=full".into(),
        "data_file=DATA,preallocation=metadata".into(),
        "data_file=DATA,preallocation=falloc".into(),
        "data_file=DATA,preallocation=full".into(),
        "data_file=DATA,preallocation=metadata,extended_l2=on".into(),
        "data_file=DATA,preallocation=full,extended_l2=on,cluster_size=16k".into(),
        "extended_l2=on,preallocation=metadata".into(),
        "extended_l2=on,preallocation=falloc,cluster_size=16k".into(),
        "extended_l2=on,preallocation=full,cluster_size=2M,refcount_bits=1".into(),
        "extended_l2=on,preallocation=metadata,backing_file=base.qcow2,backing_fmt=qcow2".into(),
        "extended_l2=on,preallocation=full,backing_file=base.qcow2,backing_fmt=qcow2".into(),
        "preallocation=full,cluster_size=4k".into(),
        "preallocation=falloc,cluster_size=512,refcount_bits=64".into(),
    ];
    for combo in &combos {
        for size in [0, 3u64 << 20, (3 << 20) + 512, (40 << 20) + 4096] {
            let a = s.path("ours.qcow2");
            let b = s.path("qemu.qcow2");
            let _ = std::fs::remove_file(&a);
            let _ = std::fs::remove_file(&b);
            let oa = combo.replace("DATA", data_ours.to_str().expect("u"));
            let ob = combo.replace("DATA", data_qemu.to_str().expect("u"));
            ours(&a, size, &oa).unwrap_or_else(|e| panic!("create {combo}: {e}"));
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !ob.is_empty() {
                args.extend(["-o", ob.as_str()]);
            }
            let size_s = size.to_string();
            args.extend([b.to_str().expect("u"), size_s.as_str()]);
            qemu_img(&args);
            let (ia, ib) = (info(&a), info(&b));
            let what = format!("{combo} {size}: ours {ia}\nqemu {ib}");
            for key in [
                "virtual-size",
                "cluster-size",
                "backing-filename",
                "backing-filename-format",
            ] {
                assert_eq!(ia.get(key), ib.get(key), "{key}: {what}");
            }
            let mut fa = ia["format-specific"]["data"].clone();
            let mut fb = ib["format-specific"]["data"].clone();
            for f in [&mut fa, &mut fb] {
                if let Some(o) = f.as_object_mut() {
                    o.remove("data-file");
                }
            }
            assert_eq!(fa, fb, "format-specific: {what}");
            // The same layout: lengths of the image and of its data file, and the
            // allocation maps of both (data file names aside).
            let len = |p: &Path| std::fs::metadata(p).expect("stat").len();
            assert_eq!(len(&a), len(&b), "file length: {what}");
            assert_eq!(map(&a, &data_ours), map(&b, &data_qemu), "map: {what}");
            if combo.contains("data_file") {
                assert_eq!(len(&data_ours), len(&data_qemu), "data file length: {what}");
                assert_eq!(
                    raw_map(&data_ours),
                    raw_map(&data_qemu),
                    "data file map: {what}"
                );
            }
            check_clean(&a);
            assert_eq!(check_json(&a), check_json(&b), "check: {what}");
            qemu_img(&["compare", a.to_str().expect("u"), b.to_str().expect("u")]);
            let _ = std::fs::remove_file(&data_ours);
            let _ = std::fs::remove_file(&data_qemu);
        }
    }
}

/// `qemu-img map --output=json` of a qcow2 image, its data file's name replaced.
fn map(image: &Path, data_file: &Path) -> serde_json::Value {
    let json = qemu_img(&["map", "--output=json", image.to_str().expect("utf-8")]);
    let json = json.replace(data_file.to_str().expect("utf-8"), "DATA");
    serde_json::from_str(&json).expect("map json")
}

/// `qemu-img map --output=json` of a raw file.
fn raw_map(file: &Path) -> serde_json::Value {
    let json = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "raw",
        file.to_str().expect("utf-8"),
    ]);
    serde_json::from_str(&json).expect("map json")
}

/// `qemu-img check --output=json` without the file name.
fn check_json(image: &Path) -> serde_json::Value {
    let json = qemu_img(&["check", "--output=json", image.to_str().expect("utf-8")]);
    let mut v: serde_json::Value = serde_json::from_str(&json).expect("check json");
    if let Some(o) = v.as_object_mut() {
        o.remove("filename");
    }
    v
}

#[test]
fn invalid_options_are_refused_like_qemu() {
    let s = Scratch::new("create-bad");
    let p = s.path("x.qcow2");
    for (opts, needle) in [
        ("compat=1.2", "does not accept value '1.2'"),
        ("cluster_size=3000", "power of two between 512 and 2048k"),
        ("cluster_size=4M", "power of two between 512 and 2048k"),
        ("refcount_bits=3", "Refcount width must be a power of two"),
        ("refcount_bits=128", "Refcount width must be a power of two"),
        (
            "compat=0.10,refcount_bits=8",
            "Different refcount widths than 16 bits",
        ),
        (
            "compat=0.10,lazy_refcounts=on",
            "Lazy refcounts only supported",
        ),
        (
            "compat=0.10,extended_l2=on",
            "Extended L2 entries are only supported",
        ),
        ("extended_l2=on,cluster_size=4k", "at least 16384 bytes"),
        ("compression_type=lz4", "does not accept value 'lz4'"),
        (
            "compat=0.10,compression_type=zstd",
            "Non-zlib compression type",
        ),
        ("data_file_raw=on", "data-file-raw requires data-file"),
        ("backing_file=b.qcow2", "without backing format"),
        ("bogus=1", "Invalid parameter 'bogus'"),
    ] {
        let err = ours(&p, 1 << 20, opts).expect_err(opts);
        assert!(err.to_string().contains(needle), "{opts}: {err}");
        assert!(
            matches!(err.kind(), ErrorKind::InvalidInput),
            "{opts}: {err:?}"
        );
        let out = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                p.to_str().expect("u"),
                "1M",
            ])
            .output()
            .expect("qemu-img");
        assert!(!out.status.success(), "qemu-img accepts {opts}");
    }
}

#[test]
fn created_images_take_writes() {
    for opts in [
        "",
        "compat=0.10,cluster_size=4k",
        "refcount_bits=1,cluster_size=1k",
    ] {
        let s = Scratch::new("create-write");
        let img = s.path("w.qcow2");
        ours(&img, 8 << 20, opts).expect("create");
        ModelTest::new(8 << 20)
            .threads(2)
            .ops(150)
            .reopen(true)
            .run(|| {
                let o = OpenOptions {
                    writable: true,
                    ..options()
                };
                Ok(Arc::new(Qcow2Image::open(&img, &o)?) as Arc<dyn BlockDev>)
            })
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
        check_clean(&img);
        assert_same(&read_all(&open(&img)), &qemu_contents(&img, &s), opts);
        // And qemu-io can write into what we made.
        qemu_io(&img, &["write -P 0x42 100k 300k"]);
        check_clean(&img);
        assert_same(&read_all(&open(&img)), &qemu_contents(&img, &s), opts);
    }
}

fn amend(path: &Path, opts: &str) -> vdisk_block::Result<()> {
    Qcow2Format.amend(
        path,
        CreateOptions {
            size: 0,
            options: CreateOptions::parse_options(opts).expect("options"),
        },
    )
}

/// Runs `qemu-img amend` (bounded) on a copy of `img`; returns whether qemu accepts
/// `opts` and its message.
fn qemu_amend_copy(img: &Path, opts: &str, s: &Scratch) -> (bool, String) {
    let copy = s.path("qemu-copy.qcow2");
    std::fs::copy(img, &copy).expect("copy");
    let out = std::process::Command::new("timeout")
        .args(["60", "qemu-img", "amend", "-f", "qcow2", "-o", opts])
        .arg(&copy)
        .output()
        .expect("qemu-img amend");
    assert_ne!(
        out.status.code(),
        Some(124),
        "qemu-img amend -o {opts} hung"
    );
    let err = String::from_utf8_lossy(&out.stderr)
        .trim_end()
        .trim_start_matches("qemu-img: ")
        .to_string();
    (out.status.success(), err)
}

#[test]
fn amend_header_options() {
    let s = Scratch::new("amend");
    let base = s.path("base.qcow2");
    let other = s.path("other.raw");
    let img = s.path("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().expect("u"),
        "4M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        other.to_str().expect("u"),
        "4M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        img.to_str().expect("u"),
        "4M",
    ]);
    qemu_io(&img, &["write -P 9 0 64k"]);
    let before = qemu_contents(&img, &s);
    // qemu 10 refuses to amend the backing file (rebase does it); the current value is
    // accepted.
    for opts in [
        "backing_file=other.raw,backing_fmt=raw",
        "backing_file=base.qcow2",
    ] {
        let (ok, message) = qemu_amend_copy(&img, opts, &s);
        assert!(!ok, "{opts}");
        let err = amend(&img, opts).expect_err(opts);
        assert_eq!(err.message(), message, "{opts}");
    }
    amend(&img, "backing_file=base.qcow2,backing_fmt=qcow2").expect("current backing");
    // rebase -u's header rewrite: another backing file of another format.
    vdisk_qcow2::amend::set_backing(&img, Some("other.raw"), Some("raw")).expect("rebase -u");
    let info = qemu_img(&["info", "--output=json", img.to_str().expect("u")]);
    assert!(
        info.contains("\"backing-filename\": \"other.raw\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    // Upgrade to 1.1, then lazy refcounts on.
    amend(&img, "compat=1.1").expect("upgrade");
    amend(&img, "lazy_refcounts=on").expect("lazy");
    let info = qemu_img(&["info", "--output=json", img.to_str().expect("u")]);
    assert!(
        info.contains("\"compat\": \"1.1\"") && info.contains("\"lazy-refcounts\": true"),
        "{info}"
    );
    check_clean(&img);
    assert_eq!(
        qemu_contents(&img, &s),
        before,
        "data unchanged (both backings are zero)"
    );
    // qemu 10 refuses create-only options even with their current value, and accepts a
    // new refcount width and a downgrade (which then needs 16-bit refcounts).
    for (opts, accepted) in [
        ("cluster_size=64k,refcount_bits=16", false),
        ("cluster_size=4k", false),
        ("extended_l2=on", false),
        ("bogus=1", false),
        ("refcount_bits=16", true),
        ("refcount_bits=8", true),
        ("compat=0.10", false),
        ("compat=0.10,refcount_bits=16", true),
    ] {
        let (ok, message) = qemu_amend_copy(&img, opts, &s);
        assert_eq!(ok, accepted, "qemu-img amend -o {opts}: {message}");
        match amend(&img, opts) {
            Ok(()) => assert!(accepted, "{opts} accepted"),
            Err(e) => {
                assert!(!accepted, "{opts}: {e}");
                assert_eq!(e.message().trim_end(), message, "{opts}");
            }
        }
        check_clean(&img);
    }
    let info = qemu_img(&["info", "--output=json", img.to_str().expect("u")]);
    assert!(
        info.contains("\"compat\": \"0.10\"") && info.contains("\"refcount-bits\": 16"),
        "{info}"
    );
    assert_eq!(qemu_contents(&img, &s), before, "data unchanged");
    // Dropping the backing file.
    vdisk_qcow2::amend::set_backing(&img, Some(""), None).expect("drop backing");
    let info = qemu_img(&["info", "--output=json", img.to_str().expect("u")]);
    assert!(!info.contains("backing-filename"), "{info}");
    check_clean(&img);
}
