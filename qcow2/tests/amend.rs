//! `amend` against qemu-img 10: images made and filled by qemu-img/qemu-io (patterns, zero
//! clusters with and without a preallocated cluster, discards, compressed clusters,
//! internal snapshots, backing files), amended by vdisk, then checked by qemu-img (check:
//! no errors and no leaks; compare with an untouched copy; info; every snapshot's contents
//! by `convert -l`). Refusals are the cases qemu-img amend refuses, with its messages.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{qemu_img, qemu_io, Scratch};
use vdisk_block::{CreateOptions, Format};
use vdisk_qcow2::Qcow2Format;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
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

/// Runs `qemu-img amend -o opts` (bounded: qemu spins on some images); returns whether it
/// succeeded and its stderr without the program prefix. `None` when it timed out.
fn qemu_amend(path: &Path, opts: &str) -> Option<(bool, String)> {
    let out = Command::new("timeout")
        .args([
            "60",
            "qemu-img",
            "amend",
            "-f",
            "qcow2",
            "-o",
            opts,
            s(path),
        ])
        .output()
        .expect("run qemu-img amend");
    if out.status.code() == Some(124) {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr)
        .trim_end()
        .trim_start_matches("qemu-img: ")
        .to_string();
    Some((out.status.success(), err))
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy image");
}

/// `qemu-img check`: no errors, no corruptions, no leaks.
fn check_strict(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("check json of {}: {e}: {text}", path.display()));
    assert!(
        out.status.success()
            && v["check-errors"] == 0
            && v.get("corruptions").is_none()
            && v.get("leaks").is_none(),
        "qemu-img check {}: {text}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", s(a), s(b)])
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn info(path: &Path) -> serde_json::Value {
    let text = qemu_img(&["info", "--output=json", s(path)]);
    serde_json::from_str(&text).expect("info json")
}

fn specific(path: &Path) -> serde_json::Value {
    info(path)["format-specific"]["data"].clone()
}

fn snapshot_names(path: &Path) -> Vec<String> {
    info(path)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|sn| sn["name"].as_str().expect("name").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A snapshot's guest contents by `qemu-img convert -l`.
fn snapshot_contents(path: &Path, name: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    qemu_img(&[
        "convert",
        "-l",
        &format!("snapshot.name={name}"),
        "-O",
        "raw",
        s(path),
        s(out),
    ]);
    let bytes = std::fs::read(out).expect("read snapshot contents");
    let _ = std::fs::remove_file(out);
    bytes
}

/// Everything an amend must keep: active contents (compare) and every snapshot's.
fn assert_same_contents(sc: &Scratch, amended: &Path, original: &Path) {
    compare(amended, original);
    let names = snapshot_names(original);
    assert_eq!(snapshot_names(amended), names);
    for name in names {
        let a = snapshot_contents(amended, &name, &sc.path("sa.raw"));
        let b = snapshot_contents(original, &name, &sc.path("sb.raw"));
        assert!(a == b, "snapshot {name} of {} changed", amended.display());
    }
}

/// Counts qemu-img map extents that are zero clusters (present, not data) and data.
fn zero_extents(path: &Path) -> usize {
    let text = qemu_img(&["map", "--output=json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("map json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|e| {
            e["zero"] == true && e["data"] == false && e["present"] == true && e["depth"] == 0
        })
        .count()
}

/// A v3 image with `cs`-byte clusters holding every kind of cluster: data, zero clusters
/// without and with a preallocated host cluster, discarded ranges, compressed clusters,
/// and internal snapshots taken between the writes (so L2 tables and clusters are shared
/// with snapshots, some of them holding zero clusters).
fn filled_image(sc: &Scratch, name: &str, cs: u64, extra: &str, backing: Option<&Path>) -> PathBuf {
    let img = sc.path(name);
    let size = 64 * cs;
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("cluster_size={cs}{extra}"),
    ];
    if let Some(b) = backing {
        args.extend(["-b".into(), s(b).into(), "-F".into(), "qcow2".into()]);
    }
    args.extend([s(&img).to_string(), size.to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&refs);
    let c = |n: u64| (n * cs).to_string();
    qemu_io(
        &img,
        &[
            &format!("write -P 0x11 0 {}", c(4)),
            // Zero clusters without a host cluster.
            &format!("write -z {} {}", c(6), c(2)),
            // Preallocated zero clusters (data overwritten by zeroes, not unmapped).
            &format!("write -P 0x22 {} {}", c(10), c(2)),
            &format!("write -z {} {}", c(10), c(1)),
            &format!("write -P 0x33 {} {}", c(14), c(2)),
            &format!("discard {} {}", c(15), c(1)),
            &format!("write -c -P 0x44 {} {}", c(20), c(2)),
        ],
    );
    qemu_img(&["snapshot", "-c", "one", s(&img)]);
    qemu_io(
        &img,
        &[
            // After the snapshot: data over shared clusters, zeroes over shared data (a
            // preallocated zero cluster whose host cluster the snapshot reads as data),
            // new zero clusters.
            &format!("write -P 0x55 {} {}", c(2), c(1)),
            &format!("write -z {} {}", c(3), c(1)),
            &format!("write -z {} {}", c(30), c(3)),
            &format!("write -P 0x66 {} {}", c(40), c(2)),
            &format!("write -z {} {}", c(41), c(1)),
        ],
    );
    qemu_img(&["snapshot", "-c", "two", s(&img)]);
    qemu_io(&img, &[&format!("write -P 0x77 {} {}", c(50), c(1))]);
    // Last, so the active L2 tables (zero clusters included) stay shared with it.
    qemu_img(&["snapshot", "-c", "three", s(&img)]);
    img
}

fn base_image(sc: &Scratch, cs: u64) -> PathBuf {
    let base = sc.path("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cs}"),
        s(&base),
        &(64 * cs).to_string(),
    ]);
    // Backing data under every zero cluster of `filled_image` (and under clusters it
    // leaves unallocated), not everywhere: 2 MiB clusters make whole images large.
    qemu_io(
        &base,
        &[
            &format!("write -P 0xbb {} {}", 2 * cs, 10 * cs),
            &format!("write -P 0xbc {} {}", 29 * cs, 5 * cs),
            &format!("write -P 0xbd {} {}", 40 * cs, 3 * cs),
        ],
    );
    base
}

fn downgrade_case(cs: u64, with_backing: bool) {
    let sc = Scratch::new("amend-down");
    let base = with_backing.then(|| base_image(&sc, cs));
    let img = filled_image(&sc, "img.qcow2", cs, ",lazy_refcounts=on", base.as_deref());
    assert!(zero_extents(&img) > 0, "the source has zero clusters");
    let orig = sc.path("orig.qcow2");
    copy(&img, &orig);
    amend(&img, "compat=0.10").expect("downgrade");
    check_strict(&img);
    let sp = specific(&img);
    assert_eq!(sp["compat"], "0.10", "{sp}");
    assert!(sp.get("lazy-refcounts").is_none(), "{sp}");
    assert_same_contents(&sc, &img, &orig);
    assert_eq!(zero_extents(&img), 0, "no zero clusters are left in v2");
    // Back up to 1.1 and check again.
    amend(&img, "compat=1.1").expect("upgrade");
    check_strict(&img);
    assert_same_contents(&sc, &img, &orig);
    writes_after_amend_stay_clean(&img, cs);
}

/// qemu can keep allocating in the amended image (its refcount structures are usable).
fn writes_after_amend_stay_clean(img: &Path, cs: u64) {
    qemu_io(
        img,
        &[
            &format!("write -P 0x99 {} {}", 60 * cs, 4 * cs),
            &format!("write -P 0x98 {} {}", cs / 2, cs),
        ],
    );
    check_strict(img);
    // And so can vdisk.
    let opts = vdisk_block::OpenOptions {
        writable: true,
        ..common::options()
    };
    let dev = vdisk_qcow2::Qcow2Image::open(img, &opts).expect("open read-write");
    use vdisk_block::BlockDev;
    dev.write_at(&vec![0x97; (3 * cs) as usize], 56 * cs + cs / 2)
        .expect("write");
    dev.flush().expect("flush");
    drop(dev);
    check_strict(img);
}

#[test]
fn downgrade_expands_zero_clusters_512() {
    downgrade_case(512, false);
    downgrade_case(512, true);
}

#[test]
fn downgrade_expands_zero_clusters_64k() {
    downgrade_case(64 * KIB, false);
    downgrade_case(64 * KIB, true);
}

#[test]
fn downgrade_expands_zero_clusters_2m() {
    downgrade_case(2 * MIB, false);
    downgrade_case(2 * MIB, true);
}

/// qemu-img 10 itself: downgrading the same images loses snapshot contents (it zero-fills
/// in place a preallocated zero cluster whose host cluster a snapshot reads as data, and
/// leaves an OFLAG_COPIED error), so the oracle above is the untouched copy, not qemu's
/// result. This records that qemu accepts the downgrade too (same case accepted).
#[test]
fn qemu_accepts_the_same_downgrades() {
    let sc = Scratch::new("amend-qemu-down");
    let img = filled_image(&sc, "img.qcow2", 64 * KIB, "", None);
    let (ok, err) = qemu_amend(&img, "compat=0.10").expect("qemu-img amend finishes");
    assert!(ok, "{err}");
}

fn refcount_chain(cs: u64, widths: &[u32], snapshots: bool) {
    let sc = Scratch::new("amend-rc");
    let img = if snapshots {
        filled_image(&sc, "img.qcow2", cs, "", None)
    } else {
        let img = sc.path("img.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&img),
            &(64 * cs).to_string(),
        ]);
        qemu_io(
            &img,
            &[
                &format!("write -P 0x12 0 {}", 5 * cs),
                &format!("write -z {} {}", 8 * cs, 2 * cs),
                &format!("write -c -P 0x13 {} {}", 12 * cs, cs),
            ],
        );
        img
    };
    let orig = sc.path("orig.qcow2");
    copy(&img, &orig);
    for &bits in widths {
        amend(&img, &format!("refcount_bits={bits}"))
            .unwrap_or_else(|e| panic!("refcount_bits={bits} ({cs}-byte clusters): {e}"));
        check_strict(&img);
        assert_eq!(specific(&img)["refcount-bits"], bits, "{}", img.display());
        assert_same_contents(&sc, &img, &orig);
    }
    if widths.last().is_some_and(|&w| w >= 4) {
        writes_after_amend_stay_clean(&img, cs);
    }
}

#[test]
fn refcount_width_every_width_512() {
    refcount_chain(512, &[1, 2, 4, 8, 16, 32, 64, 1, 64, 16], false);
    refcount_chain(512, &[64, 4, 8, 16], true);
}

#[test]
fn refcount_width_every_width_64k() {
    refcount_chain(64 * KIB, &[64, 32, 8, 4, 2, 1, 16], false);
    refcount_chain(64 * KIB, &[4, 64, 16], true);
}

/// qemu-img 10 spins (for hours) changing the refcount width of a 2 MiB-cluster image, so
/// the oracle is qemu-img check and compare only.
#[test]
fn refcount_width_2m() {
    refcount_chain(2 * MIB, &[1, 64, 8, 16], false);
    refcount_chain(2 * MIB, &[4, 16], true);
}

/// A refcount that does not fit the new width: qemu's message, and the image unchanged.
#[test]
fn refcount_width_too_narrow_is_refused_like_qemu() {
    let sc = Scratch::new("amend-rc-narrow");
    let img = filled_image(&sc, "img.qcow2", 64 * KIB, "", None);
    let q = sc.path("q.qcow2");
    copy(&img, &q);
    let before = std::fs::read(&img).expect("read");
    let err = amend(&img, "refcount_bits=1").expect_err("refcount 3 does not fit one bit");
    let (ok, qerr) = qemu_amend(&q, "refcount_bits=1").expect("qemu finishes");
    assert!(!ok);
    assert_eq!(err.message(), qerr);
    assert!(
        std::fs::read(&img).expect("read") == before,
        "refused amend wrote nothing"
    );
}

/// Upgrade and a new width in one amend, and compat=0.10 with refcount_bits=16 from 64.
#[test]
fn combined_compat_and_width() {
    let sc = Scratch::new("amend-combined");
    let img = sc.path("v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 7 0 192k", "write -z 256k 64k"]);
    let orig = sc.path("orig.qcow2");
    copy(&img, &orig);
    amend(&img, "compat=1.1,refcount_bits=8").expect("upgrade + width");
    check_strict(&img);
    let sp = specific(&img);
    assert!(sp["compat"] == "1.1" && sp["refcount-bits"] == 8, "{sp}");
    qemu_io(&img, &["write -z 64k 64k"]);
    copy(&img, &orig);
    amend(&img, "compat=0.10,refcount_bits=16").expect("width + downgrade");
    check_strict(&img);
    let sp = specific(&img);
    assert!(sp["compat"] == "0.10" && sp["refcount-bits"] == 16, "{sp}");
    compare(&img, &orig);
}

/// A dirty image (lazy refcounts, qemu-io aborted before the refcounts were written) is
/// repaired first, as qemu repairs it when it opens the image.
#[test]
fn dirty_image_is_repaired_before_downgrade() {
    let sc = Scratch::new("amend-dirty");
    let img = sc.path("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&img),
        "4M",
    ]);
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 5 0 256k",
            "-c",
            "write -z 512k 128k",
            "-c",
            "abort",
            s(&img),
        ])
        .output()
        .expect("qemu-io");
    assert_eq!(info(&img)["dirty-flag"], true, "the image is dirty");
    let orig = sc.path("orig.qcow2");
    copy(&img, &orig);
    amend(&img, "compat=0.10").expect("downgrade of a dirty image");
    check_strict(&img);
    assert_eq!(specific(&img)["compat"], "0.10");
    compare(&img, &orig);
    // lazy_refcounts=off on a dirty image: repaired, clean, lazy refcounts off.
    copy(&orig, &img);
    amend(&img, "lazy_refcounts=off").expect("lazy off on a dirty image");
    check_strict(&img);
    let i = info(&img);
    assert!(
        i["dirty-flag"] == false && i["format-specific"]["data"]["lazy-refcounts"] == false,
        "{i}"
    );
    compare(&img, &orig);
}

/// Bitmaps do not survive a downgrade in qemu either (it keeps them unreadable and leaks
/// their clusters); vdisk drops them and frees their clusters.
#[test]
fn downgrade_drops_bitmaps() {
    let sc = Scratch::new("amend-bitmaps");
    let img = sc.path("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_io(&img, &["write -P 3 0 128k"]);
    let orig = sc.path("orig.qcow2");
    copy(&img, &orig);
    amend(&img, "compat=0.10").expect("downgrade");
    check_strict(&img);
    compare(&img, &orig);
    assert!(specific(&img).get("bitmaps").is_none());
    // A refcount width change keeps them.
    copy(&orig, &img);
    amend(&img, "refcount_bits=64").expect("width");
    check_strict(&img);
    assert_eq!(specific(&img)["bitmaps"][0]["name"], "b0");
}

/// Options and images qemu-img amend refuses: vdisk refuses the same cases with the same
/// message (where qemu's message names no vdisk-specific state) and leaves the image as
/// it was; options qemu accepts without a change are accepted.
#[test]
fn refusals_match_qemu() {
    let sc = Scratch::new("amend-refuse");
    let data_file = format!("data_file={}", s(&sc.path("d.raw")));
    let make = |name: &str, opts: &str| -> PathBuf {
        let p = sc.path(name);
        let _ = std::fs::remove_file(&p);
        // The data file goes in the scratch folder, not the working directory.
        let opts = opts.replace("data_file=d.raw", &data_file);
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&p), "16M"]);
        p
    };
    let zstd = make("zstd.qcow2", "compression_type=zstd");
    qemu_io(&zstd, &["write -c 0 64k"]);
    let cases: Vec<(&str, &str)> = vec![
        ("compat=1.1", "cluster_size=65536"),
        ("compat=1.1", "cluster_size=4096"),
        ("compat=1.1", "extended_l2=off"),
        ("compat=1.1", "extended_l2=on"),
        ("compat=1.1", "preallocation=off"),
        ("compat=1.1", "preallocation=metadata"),
        ("compat=1.1", "compression_type=zlib"),
        ("compat=1.1", "encryption=off"),
        ("compat=1.1", "encrypt.format=luks"),
        ("compat=1.1", "encrypt.key-secret=x"),
        ("compat=1.1", "encrypt.new-secret=x"),
        ("compat=1.1", "encrypt.keyslot=0"),
        ("compat=1.1", "refcount_bits=8,cluster_size=64k"),
        ("compat=1.1", "bogus=1"),
        ("compat=1.1", "nocow=on"),
        ("compat=1.1", "compat=0.9"),
        ("compat=1.1", "compat="),
        ("compat=1.1", "refcount_bits=3"),
        ("compat=1.1", "refcount_bits=128"),
        ("compat=1.1", "refcount_bits=0"),
        ("compat=1.1", "refcount_bits=abc"),
        ("compat=1.1", "lazy_refcounts=maybe"),
        ("compat=1.1", "size=100"),
        ("compat=1.1", "data_file=d.raw"),
        ("compat=1.1", "data_file_raw=on"),
        ("compat=1.1", "backing_file=x.qcow2"),
        ("compat=1.1", "backing_fmt=qcow2"),
        ("compat=1.1", "lazy_refcounts=on,compat=0.10"),
        ("compat=1.1", "compat=0.10,refcount_bits=8"),
        ("compat=0.10", "refcount_bits=8"),
        ("compat=0.10", "lazy_refcounts=on"),
        ("compat=0.10", "data_file=d.raw"),
        ("refcount_bits=64", "compat=0.10"),
        ("refcount_bits=8", "compat=0.10,refcount_bits=8"),
        ("extended_l2=on", "compat=0.10"),
        ("extended_l2=on,compression_type=zstd", "compat=0.10"),
        ("data_file=d.raw", "compat=0.10"),
        ("data_file=d.raw", "data_file_raw=on"),
        (
            "data_file=d.raw,data_file_raw=on",
            "backing_file=x.qcow2,backing_fmt=qcow2",
        ),
    ];
    for (create, opts) in cases {
        let img = make("img.qcow2", create);
        let q = sc.path("q.qcow2");
        copy(&img, &q);
        let before = std::fs::read(&img).expect("read");
        let (ok, qerr) = qemu_amend(&q, opts).expect("qemu finishes");
        assert!(!ok, "qemu refuses {opts} on {create}");
        let err = amend(&img, opts).expect_err(opts);
        assert_eq!(err.message().trim_end(), qerr, "{opts} on {create}");
        assert!(
            std::fs::read(&img).expect("read") == before,
            "{opts}: image unchanged"
        );
    }
    // Unknown incompatible feature bits: neither opens the image (the wording differs:
    // qemu names the bit as a mask, vdisk by number).
    let unknown = make("unknown.qcow2", "compat=1.1");
    let mut bytes = std::fs::read(&unknown).expect("read");
    bytes[72..80].copy_from_slice(&(1u64 << 10).to_be_bytes());
    std::fs::write(&unknown, &bytes).expect("write");
    for opts in ["compat=0.10", "refcount_bits=8", "lazy_refcounts=on"] {
        let (ok, qerr) = qemu_amend(&unknown, opts).expect("qemu finishes");
        assert!(
            !ok && qerr.contains("Unknown incompatible feature"),
            "{qerr}"
        );
        let err = amend(&unknown, opts).expect_err(opts);
        assert!(
            err.message().contains("Unknown incompatible feature"),
            "{err}"
        );
        assert!(std::fs::read(&unknown).expect("read") == bytes);
    }
    // Encrypted images: qemu cannot open them for amend without the key.
    let luks = sc.path("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        s(&luks),
        "4M",
    ]);
    for opts in ["compat=0.10", "refcount_bits=8", "encrypt.new-secret=x"] {
        let (ok, qerr) = qemu_amend(&luks, opts).expect("qemu finishes");
        assert!(!ok, "{opts}");
        let err = amend(&luks, opts).expect_err(opts);
        assert_eq!(err.message(), qerr, "{opts}");
    }
    let (ok, qerr) = qemu_amend(&zstd, "compat=0.10").expect("qemu finishes");
    assert!(!ok);
    let err = amend(&zstd, "compat=0.10").expect_err("zstd with compressed clusters");
    assert_eq!(err.message(), qerr);
    check_strict(&zstd);
    // Accepted by both, image still clean.
    for (create, opts) in [
        (
            "compat=1.1",
            "compat=1.1,refcount_bits=16,lazy_refcounts=off",
        ),
        ("compat=1.1", "data_file_raw=off"),
        ("compat=0.10", "compat=v2"),
        ("compression_type=zstd", "compat=0.10"),
        ("lazy_refcounts=on", "lazy_refcounts=off,compat=0.10"),
    ] {
        let img = make("img.qcow2", create);
        let q = sc.path("q.qcow2");
        copy(&img, &q);
        let (ok, qerr) = qemu_amend(&q, opts).expect("qemu finishes");
        assert!(ok, "qemu accepts {opts} on {create}: {qerr}");
        amend(&img, opts).unwrap_or_else(|e| panic!("{opts} on {create}: {e}"));
        check_strict(&img);
        assert_eq!(specific(&img)["compat"], specific(&q)["compat"], "{opts}");
        assert_eq!(
            specific(&img)["compression-type"],
            specific(&q)["compression-type"],
            "{opts}"
        );
    }
}

/// data_file: the name may change (the file is not touched), data_file_raw may only be
/// cleared, an empty name drops the name; as qemu-img amend does.
#[test]
fn data_file_options_like_qemu() {
    let sc = Scratch::new("amend-datafile");
    let orig = sc.path("orig.qcow2");
    let img = sc.path("img.qcow2");
    let q = sc.path("q.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", s(&sc.path("d.raw"))),
        s(&orig),
        "4M",
    ]);
    for opts in [
        "data_file_raw=on",
        "data_file_raw=off",
        "data_file=e.raw",
        "data_file=",
    ] {
        copy(&orig, &q);
        copy(&orig, &img);
        let (ok, qerr) = qemu_amend(&q, opts).expect("qemu finishes");
        assert!(ok, "{opts}: {qerr}");
        amend(&img, opts).unwrap_or_else(|e| panic!("{opts}: {e}"));
        let (ours, theirs) = (header_of(&img), header_of(&q));
        assert_eq!(
            ours.extensions.data_file, theirs.extensions.data_file,
            "{opts}"
        );
        assert_eq!(ours.autoclear_features, theirs.autoclear_features, "{opts}");
        assert_eq!(
            ours.incompatible_features, theirs.incompatible_features,
            "{opts}"
        );
    }
    assert!(
        !sc.path("e.raw").exists(),
        "amend does not create data files"
    );
}

/// The parsed header (qemu-img info cannot open an image whose data file is gone).
fn header_of(path: &Path) -> vdisk_qcow2::Header {
    let bytes = std::fs::read(path).expect("read image");
    let cs = 1usize << bytes[23];
    vdisk_qcow2::Header::parse(&bytes[..cs.min(bytes.len())]).expect("header")
}

/// `size` is an amend option in qemu 10 (a resize).
#[test]
fn size_resizes_like_qemu() {
    let sc = Scratch::new("amend-size");
    let img = sc.path("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    qemu_io(&img, &["write -P 1 0 1M"]);
    let q = sc.path("q.qcow2");
    for size in ["32M", "8M"] {
        copy(&img, &q);
        let (ok, qerr) = qemu_amend(&q, &format!("size={size}")).expect("qemu finishes");
        assert!(ok, "{qerr}");
        amend(&img, &format!("size={size}")).expect("resize");
        check_strict(&img);
        assert_eq!(info(&img)["virtual-size"], info(&q)["virtual-size"]);
        compare(&img, &q);
    }
}

/// Width changes of images whose L2 entries are extended or whose data lives in an
/// external data file (no refcounts for guest data).
#[test]
fn refcount_width_extended_l2_and_data_file() {
    let sc = Scratch::new("amend-rc-kinds");
    let orig = sc.path("orig.qcow2");
    for opts in [
        "extended_l2=on,cluster_size=64k".to_string(),
        format!("data_file={}", s(&sc.path("d.raw"))),
    ] {
        let img = sc.path("img.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"]);
        qemu_io(
            &img,
            &[
                "write -P 0x21 0 200k",
                "write -z 256k 64k",
                "write -P 0x22 1M 4k",
            ],
        );
        if !opts.contains("data_file") {
            // qemu cannot snapshot images with a data file.
            qemu_img(&["snapshot", "-c", "s", s(&img)]);
        }
        copy(&img, &orig);
        for bits in [64, 4, 16] {
            amend(&img, &format!("refcount_bits={bits}")).expect("width");
            check_strict(&img);
            assert_eq!(specific(&img)["refcount-bits"], bits, "{opts}");
            assert_same_contents(&sc, &img, &orig);
        }
    }
}

/// Crash safety: the only write after amend's first flush is the header in cluster 0, so
/// the file a crash just before that write leaves is the amended file with the old first
/// cluster. That file must still be the old image, whole and clean (the new structures are
/// unreferenced clusters with a refcount of zero, not leaks).
#[test]
fn crash_before_the_header_switch_leaves_the_old_image() {
    let sc = Scratch::new("amend-crash");
    for (cs, opts) in [
        (512, "compat=0.10"),
        (64 * KIB, "compat=0.10"),
        (512, "refcount_bits=64"),
        (64 * KIB, "refcount_bits=4"),
    ] {
        let img = filled_image(&sc, "img.qcow2", cs, "", None);
        let orig = sc.path("orig.qcow2");
        copy(&img, &orig);
        amend(&img, opts).unwrap_or_else(|e| panic!("{opts}: {e}"));
        let old = std::fs::read(&orig).expect("read");
        let mut cut = std::fs::read(&img).expect("read");
        assert!(cut.len() >= cs as usize && cut != old);
        cut[..cs as usize].copy_from_slice(&old[..cs as usize]);
        let crashed = sc.path("crashed.qcow2");
        std::fs::write(&crashed, &cut).expect("write");
        check_strict(&crashed);
        assert_eq!(specific(&crashed), specific(&orig), "{opts}");
        assert_same_contents(&sc, &crashed, &orig);
        std::fs::remove_file(&img).expect("remove");
    }
}

/// Crash safety by the recorded write stream: the file is rebuilt as a power cut would
/// leave it after every change amend made, with every multi-sector write torn (every other
/// sector landed), and with the writes since the last flush landed in reverse order and
/// only half of them. Every such file is a clean image (no errors, no leaks) with the old
/// contents and snapshots, at the old or the new options.
#[test]
fn every_cut_of_the_write_stream_is_the_old_or_the_new_image() {
    use vdisk_block::file::record::{FileOp, Recording};
    let sc = Scratch::new("amend-stream");
    let base = base_image(&sc, 64 * KIB);
    for (cs, opts, backing) in [
        (512, "compat=0.10", None),
        (64 * KIB, "compat=0.10", Some(base.as_path())),
        (64 * KIB, "refcount_bits=4", None),
    ] {
        let img = filled_image(&sc, "img.qcow2", cs, ",lazy_refcounts=on", backing);
        let orig = sc.path("orig.qcow2");
        copy(&img, &orig);
        let old_spec = specific(&orig);
        let snaps: Vec<(String, Vec<u8>)> = snapshot_names(&orig)
            .into_iter()
            .map(|n| {
                let c = snapshot_contents(&orig, &n, &sc.path("s.raw"));
                (n, c)
            })
            .collect();
        let rec = Recording::start(&img).expect("record");
        amend(&img, opts).expect("amend");
        let ops = rec.ops();
        drop(rec);
        let new_spec = specific(&img);
        let flushes: Vec<usize> = (0..ops.len())
            .filter(|&i| ops[i] == FileOp::Flush)
            .collect();
        assert!(flushes.len() >= 2, "{opts}: {} flushes", flushes.len());
        let mut cuts: Vec<Vec<FileOp>> = (0..=ops.len()).map(|i| ops[..i].to_vec()).collect();
        for i in 0..ops.len() {
            let pieces = ops[i].sectors(512);
            if pieces.len() > 1 {
                let mut cut = ops[..i].to_vec();
                cut.extend(pieces.into_iter().step_by(2));
                cuts.push(cut);
            }
        }
        let mut start = 0;
        for &f in &flushes {
            let pending: Vec<FileOp> = ops[start..f].iter().rev().cloned().collect();
            let mut cut = ops[..start].to_vec();
            cut.extend(pending.iter().take(pending.len().div_ceil(2)).cloned());
            cuts.push(cut);
            start = f + 1;
        }
        let old_bytes = std::fs::read(&orig).expect("read");
        let crashed = sc.path("cut.qcow2");
        let (mut saw_old, mut saw_new) = (0, 0);
        for (n, cut) in cuts.iter().enumerate() {
            std::fs::write(&crashed, &old_bytes).expect("write");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&crashed)
                .expect("open");
            for op in cut {
                op.apply(&f).expect("replay");
            }
            drop(f);
            let what = format!("{opts} ({cs}-byte clusters), cut {n} of {}", cuts.len());
            check_strict(&crashed);
            let spec = specific(&crashed);
            if spec == old_spec {
                saw_old += 1;
            } else if spec == new_spec {
                saw_new += 1;
            } else {
                panic!("{what}: {spec}");
            }
            compare(&crashed, &orig);
            for (name, contents) in &snaps {
                let c = snapshot_contents(&crashed, name, &sc.path("s.raw"));
                assert!(&c == contents, "{what}: snapshot {name}");
            }
        }
        eprintln!("{opts}: {} cuts, {saw_old} old, {saw_new} new", cuts.len());
        assert!(
            saw_old > 3 && saw_new > 0,
            "{opts}: the stream holds the switch"
        );
        std::fs::remove_file(&img).expect("remove");
    }
}
