//! Headers written by `qemu-img create` with many option combinations parse to the values
//! the options asked for; hostile mutations of a real header are refused with an error
//! (never a panic or a huge allocation), and random corruption never panics.

mod common;

use std::path::Path;

use common::*;
use vdisk_block::{BlockDev, ErrorKind, Format, OpenOptions, RepairMode};
use vdisk_qcow2::header::{
    autoclear, compat, ext, incompat, CompressionType, CryptMethod, FeatureKind, Header,
};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

fn create(s: &Scratch, name: &str, opts: &str, size: &str) -> std::path::PathBuf {
    let img = s.path(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().expect("utf-8"), size]);
    qemu_img(&args);
    img
}

fn header_of(path: &Path) -> Header {
    Header::parse(&std::fs::read(path).expect("read image")).expect("parse header")
}

#[test]
fn qemu_created_headers() {
    let s = Scratch::new("headers");
    let h = header_of(&create(&s, "v2.qcow2", "compat=0.10", "64M"));
    assert_eq!((h.version, h.header_length, h.refcount_order), (2, 72, 4));
    assert_eq!((h.cluster_bits, h.size), (16, 64 << 20));
    assert_eq!(h.incompatible_features | h.compatible_features, 0);
    assert!(h.extensions.feature_names.is_empty());

    let h = header_of(&create(&s, "v3.qcow2", "", "64M"));
    assert_eq!((h.version, h.header_length), (3, 112));
    assert_eq!(h.compression_type, CompressionType::Deflate);
    assert_eq!(h.extensions.feature_names.len(), 8);
    assert!(h
        .extensions
        .feature_names
        .iter()
        .any(|f| f.kind == FeatureKind::Incompatible
            && f.bit == 4
            && f.name == "extended L2 entries"));
    assert_eq!(h.l1_size as u64, h.required_l1_size());

    let h = header_of(&create(
        &s,
        "many.qcow2",
        "cluster_size=16k,refcount_bits=64,lazy_refcounts=on,extended_l2=on,compression_type=zstd",
        "40M",
    ));
    assert_eq!((h.cluster_bits, h.refcount_bits()), (14, 64));
    assert!(h.compatible_features & compat::LAZY_REFCOUNTS != 0);
    assert!(h.extended_l2());
    assert_eq!(h.compression_type, CompressionType::Zstd);
    assert!(h.incompatible_features & incompat::COMPRESSION != 0);

    let h = header_of(&create(
        &s,
        "ext.qcow2",
        "cluster_size=32k,extended_l2=on,refcount_bits=1",
        "40M",
    ));
    assert!(h.extended_l2());
    assert_eq!(
        (h.cluster_bits, h.refcount_bits(), h.l2_entries()),
        (15, 1, 2048)
    );

    for bits in [9u32, 12, 16, 21] {
        let h = header_of(&create(
            &s,
            &format!("c{bits}.qcow2"),
            &format!("cluster_size={}", 1u64 << bits),
            "8M",
        ));
        assert_eq!(h.cluster_bits, bits);
    }

    create(&s, "base.qcow2", "", "8M");
    let h = header_of(&create(
        &s,
        "top.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "8M",
    ));
    assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(h.extensions.backing_format.as_deref(), Some("qcow2"));

    let data = s.path("d.raw");
    let h = header_of(&create(
        &s,
        "data.qcow2",
        &format!("data_file={},data_file_raw=on", data.display()),
        "8M",
    ));
    assert!(h.has_data_file() && h.data_file_raw());
    assert!(h.autoclear_features & autoclear::DATA_FILE_RAW != 0);
    assert_eq!(h.extensions.data_file.as_deref(), data.to_str());
}

#[test]
fn bitmaps_and_encryption_extensions() {
    let s = Scratch::new("exts");
    let img = create(&s, "bm.qcow2", "", "16M");
    qemu_img(&["bitmap", "--add", img.to_str().expect("u"), "b0"]);
    let h = header_of(&img);
    let bm = h.extensions.bitmaps.expect("bitmaps extension");
    assert_eq!(bm.nb_bitmaps, 1);
    assert!(h.autoclear_features & autoclear::BITMAPS != 0);
    // The bitmap's clusters are referenced, so check finds no leaks.
    let r = Qcow2Format
        .check(&img, &options(), RepairMode::None)
        .expect("check");
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{r:?}");

    let luks = s.path("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=pass",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        luks.to_str().expect("u"),
        "4M",
    ]);
    let h = header_of(&luks);
    assert_eq!(h.crypt_method, CryptMethod::Luks);
    assert!(h.extensions.crypto.is_some());
    // Data needs the key (tests/luks.rs has the rest); info opens without it.
    let err = Qcow2Image::open(&luks, &options()).expect_err("no key");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.message().contains("encrypt.key-secret"), "{err}");
    let meta = OpenOptions {
        metadata_only: true,
        ..options()
    };
    let dev = Qcow2Image::open(&luks, &meta).expect("metadata-only open");
    assert!(dev.info().expect("info").encrypted);
    let st = dev.block_status(0, 512).expect("status");
    assert!(st.host.is_none(), "no host offsets into ciphertext");
}

/// Builds a copy of `image` whose extension area is `exts` (type, payload) followed by the
/// end marker.
fn with_extensions(image: &[u8], exts: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = image.to_vec();
    let mut at = 112;
    for (kind, data) in exts {
        out[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        out[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        out[at + 8..at + 8 + data.len()].copy_from_slice(data);
        let padded = (data.len() + 7) & !7;
        out[at + 8 + data.len()..at + 8 + padded].fill(0);
        at += 8 + padded;
    }
    out[at..at + 8].fill(0);
    out
}

#[test]
fn unknown_extensions_are_preserved_and_tolerated_by_qemu() {
    let s = Scratch::new("unknown");
    let img = create(&s, "u.qcow2", "", "8M");
    let bytes = std::fs::read(&img).expect("read");
    let h = header_of(&img);
    let mut table = Vec::new();
    for f in &h.extensions.feature_names {
        let mut e = vec![0u8; 48];
        e[0] = match f.kind {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Other(x) => x,
        };
        e[1] = f.bit;
        e[2..2 + f.name.len()].copy_from_slice(f.name.as_bytes());
        table.extend(e);
    }
    let mutated = with_extensions(
        &bytes,
        &[
            (0x1234_5678, b"hello".to_vec()),
            (ext::FEATURE_NAMES, table),
        ],
    );
    std::fs::write(&img, &mutated).expect("write");
    qemu_img(&["info", img.to_str().expect("u")]);
    let h = header_of(&img);
    assert_eq!(h.extensions.unknown, vec![(0x1234_5678, b"hello".to_vec())]);
    assert_eq!(h.extensions.feature_names.len(), 8);
}

/// Writes `bytes` to a scratch image and requires both our open and qemu-img to refuse it.
fn refused(s: &Scratch, name: &str, bytes: &[u8], needle: &str, qemu_too: bool) {
    let path = s.path(name);
    std::fs::write(&path, bytes).expect("write");
    let err = Qcow2Image::open(&path, &options()).expect_err(name);
    assert!(
        err.to_string().contains(needle),
        "{name}: error '{err}' does not mention '{needle}'"
    );
    if qemu_too {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-f", "qcow2", path.to_str().expect("u")])
            .output()
            .expect("run qemu-img");
        assert!(!out.status.success(), "{name}: qemu-img accepts it");
    }
}

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn hostile_headers_are_refused() {
    let s = Scratch::new("hostile");
    let img = create(&s, "ok.qcow2", "", "8M");
    let good = std::fs::read(&img).expect("read");
    type Mutation = (&'static str, fn(&mut Vec<u8>), &'static str, bool);
    let cases: &[Mutation] = &[
        ("magic", |b| b[0] = b'X', "not in qcow2 format", true),
        ("version", |b| set32(b, 4, 4), "version 4", true),
        ("cluster_bits 8", |b| set32(b, 20, 8), "cluster size", true),
        (
            "cluster_bits 22",
            |b| set32(b, 20, 22),
            "cluster size",
            true,
        ),
        (
            "cluster_bits huge",
            |b| set32(b, 20, 0xffff_ffff),
            "cluster size",
            true,
        ),
        ("header too short", |b| set32(b, 100, 96), "too short", true),
        (
            "header too long",
            |b| set32(b, 100, 0x20000),
            "exceeds cluster size",
            true,
        ),
        (
            "header unaligned",
            |b| set32(b, 100, 108),
            "multiple of 8",
            false,
        ),
        (
            "unknown incompat",
            |b| set64(b, 72, 1 << 40),
            "bit 40",
            true,
        ),
        (
            "refcount order",
            |b| set32(b, 96, 7),
            "Reference count entry width",
            true,
        ),
        ("compression type", |b| b[104] = 2, "compression type", true),
        (
            "zstd without bit",
            |b| b[104] = 1,
            "incompatible bit is not set",
            true,
        ),
        (
            "bit without zstd",
            |b| set64(b, 72, incompat::COMPRESSION),
            "compression",
            true,
        ),
        (
            "crypt method",
            |b| set32(b, 32, 3),
            "encryption method",
            true,
        ),
        (
            "luks without header",
            |b| set32(b, 32, 2),
            "Missing CRYPTO header",
            true,
        ),
        (
            "l1 huge",
            |b| set32(b, 36, 0x1000_0000),
            "L1 table too large",
            true,
        ),
        (
            "l1 too small",
            |b| set64(b, 24, 1 << 40),
            "L1 table is too small",
            true,
        ),
        (
            "l1 unaligned",
            |b| set64(b, 40, 0x30200),
            "not cluster aligned",
            true,
        ),
        // qemu only checks that the table does not pass 2^63; nothing past 2^56 is addressable.
        (
            "l1 past 2^56",
            |b| set64(b, 40, 1 << 60),
            "Active L1 table offset invalid",
            false,
        ),
        // qemu reads a table past the end of the file as zeroes; we refuse the truncated image.
        (
            "l1 past eof",
            |b| set64(b, 40, 1 << 40),
            "past the end of the file",
            false,
        ),
        ("size huge", |b| set64(b, 24, u64::MAX), "too big", true),
        (
            "no refcount table",
            |b| set32(b, 56, 0),
            "reference count table",
            true,
        ),
        (
            "refcount table huge",
            |b| set32(b, 56, 0x1000),
            "Reference count table too large",
            true,
        ),
        (
            "refcount table unaligned",
            |b| set64(b, 48, 0x10008),
            "not cluster aligned",
            true,
        ),
        (
            "snapshots",
            |b| set32(b, 60, 100_000),
            "Too many snapshots",
            true,
        ),
        (
            "backing name long",
            |b| {
                set64(b, 8, 0x1000);
                set32(b, 16, 2000);
            },
            "Backing file name too long",
            true,
        ),
        (
            "backing name past cluster",
            |b| {
                set64(b, 8, 0xffff);
                set32(b, 16, 100);
            },
            "Invalid backing file offset",
            true,
        ),
        (
            "extension too large",
            |b| set32(b, 116, 0x10_0000),
            "Header extension too large",
            true,
        ),
        (
            "feature table length",
            |b| set32(b, 116, 47),
            "feature name table",
            false,
        ),
        (
            "raw data without data file",
            |b| set64(b, 88, autoclear::DATA_FILE_RAW),
            "external data file bit",
            false,
        ),
        (
            "bitmaps bit without extension",
            |b| set64(b, 88, autoclear::BITMAPS),
            "bitmaps extension",
            false,
        ),
        // `qemu-img info` never opens the data file, so it only fails on I/O.
        (
            "data file without name",
            |b| set64(b, 72, incompat::DATA_FILE),
            "does not name it",
            false,
        ),
        (
            "extended l2 small clusters",
            |b| {
                set64(b, 72, incompat::EXTENDED_L2);
                set32(b, 20, 13);
            },
            "Extended L2",
            true,
        ),
    ];
    for (name, mutate, needle, qemu_too) in cases {
        let mut bytes = good.clone();
        mutate(&mut bytes);
        refused(&s, &name.replace(' ', "_"), &bytes, needle, *qemu_too);
    }

    // An unknown incompatible bit is named from the feature table when it has the name.
    let mut bytes = good.clone();
    set64(&mut bytes, 72, 1 << 9);
    let h = header_of(&img);
    let pos = bytes
        .windows(19)
        .position(|w| w == b"extended L2 entries")
        .expect("feature table entry");
    bytes[pos - 1] = 9;
    bytes[pos..pos + 19].copy_from_slice(b"fancy new feature!!");
    assert!(h.extensions.feature_names.len() == 8);
    refused(&s, "named", &bytes, "fancy new feature!! (bit 9)", true);

    // Duplicate extensions.
    let dup = with_extensions(
        &good,
        &[
            (ext::BACKING_FORMAT, b"raw".to_vec()),
            (ext::BACKING_FORMAT, b"raw".to_vec()),
        ],
    );
    refused(&s, "dup", &dup, "Duplicate header extension", false);
}

/// A tiny deterministic generator; tests must not depend on the clock.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

#[test]
fn random_corruption_never_panics() {
    let s = Scratch::new("fuzz");
    let img = create(&s, "f.qcow2", "cluster_size=4k,extended_l2=off", "2M");
    qemu_io(
        &img,
        &["write -P 1 0 300k", "write -z 512k 8k", "write -P 2 1m 4k"],
    );
    let good = std::fs::read(&img).expect("read");
    let mut rng = Lcg(42);
    let target = s.path("m.qcow2");
    for _ in 0..400 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next() % 8 {
            // Mostly the header and the metadata clusters that follow it.
            let limit = if rng.next() & 3 == 0 {
                bytes.len()
            } else {
                6 * 4096
            };
            let at = (rng.next() as usize) % limit;
            bytes[at] = rng.next() as u8;
        }
        std::fs::write(&target, &bytes).expect("write");
        if let Ok(dev) = Qcow2Image::open(&target, &options()) {
            let mut buf = vec![0u8; 64 * 1024];
            let mut pos = 0;
            while pos < dev.size() {
                let n = (dev.size() - pos).min(buf.len() as u64);
                let _ = dev.read_at(&mut buf[..n as usize], pos);
                let _ = dev.block_status(pos, n);
                pos += n;
            }
        }
        let _ = Qcow2Format.check(&target, &options(), RepairMode::None);
    }
}

#[test]
fn format_specific_info_matches_qemu() {
    let s = Scratch::new("specific");
    let data = s.path("d.raw");
    for opts in [
        "compat=0.10".to_string(),
        "lazy_refcounts=on,refcount_bits=64".to_string(),
        "extended_l2=on,compression_type=zstd".to_string(),
        format!("data_file={},data_file_raw=on", data.display()),
    ] {
        let img = create(&s, "i.qcow2", &opts, "8M");
        qemu_io(&img, &["write -P 1 0 64k"]);
        if !opts.contains("data_file") {
            // Images with an external data file cannot have internal snapshots.
            qemu_img(&["snapshot", "-c", "first", img.to_str().expect("u")]);
            qemu_img(&["snapshot", "-c", "second", img.to_str().expect("u")]);
        }
        let json = qemu_img(&["info", "--output=json", img.to_str().expect("u")]);
        let q: serde_json::Value = serde_json::from_str(&json).expect("json");
        let d = &q["format-specific"]["data"];
        let ours = open(&img).qcow2_info().expect("info");
        assert_eq!(d["compat"].as_str(), Some(ours.compat), "{opts}");
        if ours.compat == "1.1" {
            assert_eq!(d["compression-type"].as_str(), Some(ours.compression_type));
            assert_eq!(d["lazy-refcounts"].as_bool(), Some(ours.lazy_refcounts));
            assert_eq!(d["extended-l2"].as_bool(), Some(ours.extended_l2));
            assert_eq!(d["corrupt"].as_bool(), Some(ours.corrupt));
        }
        assert_eq!(
            d["refcount-bits"].as_u64(),
            Some(u64::from(ours.refcount_bits))
        );
        assert_eq!(d["data-file"].as_str(), ours.data_file.as_deref(), "{opts}");
        if ours.data_file.is_some() {
            assert_eq!(d["data-file-raw"].as_bool(), Some(ours.data_file_raw));
        }
        let none = Vec::new();
        let snaps = q["snapshots"].as_array().unwrap_or(&none);
        assert_eq!(snaps.len(), ours.snapshots.len());
        for (a, b) in snaps.iter().zip(&ours.snapshots) {
            assert_eq!(a["name"].as_str(), Some(b.name.as_str()));
            assert_eq!(a["id"].as_str(), Some(b.id.as_str()));
            assert_eq!(a["date-sec"].as_u64(), Some(u64::from(b.date_sec)));
            assert_eq!(a["date-nsec"].as_u64(), Some(u64::from(b.date_nsec)));
            assert_eq!(a["vm-state-size"].as_u64(), Some(b.vm_state_size));
        }
        std::fs::remove_file(&img).expect("remove");
    }
}

#[test]
fn random_corruption_never_panics_when_writing() {
    let s = Scratch::new("fuzzw");
    let img = create(&s, "f.qcow2", "cluster_size=4k", "2M");
    qemu_io(
        &img,
        &["write -P 1 0 300k", "write -z 512k 8k", "write -P 2 1m 4k"],
    );
    qemu_img(&["snapshot", "-c", "s", img.to_str().expect("u")]);
    let good = std::fs::read(&img).expect("read");
    let mut rng = Lcg(7);
    let target = s.path("m.qcow2");
    let rw = vdisk_block::OpenOptions {
        writable: true,
        ..options()
    };
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.next() % 6 {
            let at = (rng.next() as usize) % bytes.len().min(12 * 4096);
            bytes[at] = rng.next() as u8;
        }
        std::fs::write(&target, &bytes).expect("write");
        if let Ok(dev) = Qcow2Image::open(&target, &rw) {
            for _ in 0..6 {
                let off = rng.next() % (2 << 20);
                let len = (1 + rng.next() % 20_000).min((2 << 20) - off);
                let _ = match rng.next() % 4 {
                    0 => dev.write_zeroes(off, len, vdisk_block::ZeroMode::MayUnmap),
                    1 => dev.discard(off, len),
                    _ => dev.write_at(&vec![0x5a; len as usize], off),
                };
            }
            let _ = dev.flush();
            let _ = dev.resize(3 << 20, vdisk_block::Preallocation::Off);
        }
    }
}

#[test]
fn images_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Qcow2Image>();
}

#[test]
fn bitmaps_are_listed_like_qemu() {
    let s = Scratch::new("bitmaps");
    let img = create(&s, "b.qcow2", "", "10M");
    let p = img.to_str().expect("u");
    qemu_img(&["bitmap", "--add", p, "first"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", p, "second"]);
    qemu_img(&["bitmap", "--disable", p, "second"]);
    let json = qemu_img(&["info", "--output=json", p]);
    let q: serde_json::Value = serde_json::from_str(&json).expect("json");
    let theirs = q["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps");
    let ours = open(&img).qcow2_info().expect("info").bitmaps;
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in theirs.iter().zip(&ours) {
        assert_eq!(a["name"].as_str(), Some(b.name.as_str()));
        assert_eq!(a["granularity"].as_u64(), Some(b.granularity));
        let flags: Vec<&str> = a["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        assert_eq!(flags, b.flag_names(), "{}", b.name);
    }
}
