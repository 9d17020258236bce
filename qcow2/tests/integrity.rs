//! Ways a writable open could silently damage an image, each checked against qemu-img:
//! persistent bitmaps and auto-clear bits, refcount blocks created by a repair, the corrupt
//! bit after bad table entries, v2 write-zeroes, header rewrites and backing chain loops.

mod common;

use std::path::Path;

use common::*;
use vdisk_block::{BlockDev, ErrorKind, Format, OpenOptions, RepairMode};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

fn rw_options() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..options()
    }
}

fn open_rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, &rw_options())
        .unwrap_or_else(|e| panic!("open rw {}: {e}", path.display()))
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `qemu-img check --output=json` as JSON (it exits non-zero when it finds problems).
fn qemu_check(image: &Path) -> serde_json::Value {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", s(image)])
        .output()
        .expect("run qemu-img check");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn field(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// `qemu-img check` must report no corruptions, leaks or check errors.
fn qemu_check_clean(image: &Path) {
    let v = qemu_check(image);
    assert_eq!(
        (
            field(&v, "corruptions"),
            field(&v, "leaks"),
            field(&v, "check-errors")
        ),
        (0, 0, 0),
        "qemu-img check {}: {v}",
        image.display()
    );
}

fn qemu_info(image: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", "-U", s(image)]);
    serde_json::from_str(&out).expect("qemu-img info json")
}

fn create(path: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    qemu_img(&args);
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poking");
    f.write_all_at(bytes, offset).expect("poke");
}

fn be64_at(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open for peeking");
    let mut a = [0u8; 8];
    f.read_exact_at(&mut a, offset).expect("peek");
    u64::from_be_bytes(a)
}

#[test]
fn live_persistent_bitmaps_stay_valid_across_writable_opens() {
    let sc = Scratch::new("bitmaps-rw");
    let img = sc.path("bm.qcow2");
    create(&img, "", "8M");
    qemu_io(&img, &["write -P 0x5a 0 1m"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);

    // A writable open (through the format, as the CLI and the VMM do) records the write
    // in the bitmap and stores it on close with the autoclear bit kept.
    let dev = Qcow2Format
        .open(&img, &rw_options())
        .expect("writable open with bitmaps");
    dev.write_at(&[1; 512], 3 << 20).expect("write");
    dev.flush().expect("flush");
    drop(dev);
    qemu_check_clean(&img);
    assert_eq!(be64_at(&img, 88) & 1, 1, "bitmaps autoclear bit");
    let bitmaps = &qemu_info(&img)["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "b0", "{bitmaps}");
    assert_eq!(
        bitmaps[0]["flags"],
        serde_json::json!(["auto"]),
        "{bitmaps}"
    );
    let dev = open(&img);
    assert_eq!(
        dev.dirty_bitmap_ranges("b0").expect("ranges"),
        vec![(3 << 20, 65536)]
    );
    let data = read_all(&dev);
    assert!(data[..1 << 20].iter().all(|&b| b == 0x5a));
    drop(dev);

    // A repair never changes guest data and leaves the bitmaps as they are.
    let r = Qcow2Format
        .check(&img, &options(), RepairMode::All)
        .expect("repair of an image with bitmaps");
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    qemu_check_clean(&img);
    let bitmaps = &qemu_info(&img)["format-specific"]["data"]["bitmaps"];
    assert_eq!(
        bitmaps[0]["flags"],
        serde_json::json!(["auto"]),
        "{bitmaps}"
    );
    assert_eq!(
        open(&img).dirty_bitmap_ranges("b0").expect("ranges"),
        vec![(3 << 20, 65536)]
    );
}

#[test]
fn unknown_autoclear_bits_are_cleared_on_writable_open() {
    let sc = Scratch::new("autoclear");
    let img = sc.path("ac.qcow2");
    create(&img, "", "4M");
    qemu_io(&img, &["write -P 0x21 64k 64k"]);
    // Bits 5 and 40 are unknown to qemu and to us; a writer must clear them.
    let unknown = (1u64 << 5) | (1u64 << 40);
    poke(&img, 88, &unknown.to_be_bytes());
    qemu_check_clean(&img);

    // A read-only open leaves them alone.
    drop(open(&img));
    assert_eq!(be64_at(&img, 88), unknown);

    let dev = open_rw(&img);
    assert_eq!(be64_at(&img, 88), 0, "unknown auto-clear bits survived");
    dev.write_at(&[0x77; 4096], 0).expect("write");
    dev.flush().expect("flush");
    drop(dev);
    assert_eq!(be64_at(&img, 88), 0);
    qemu_check_clean(&img);
    let data = qemu_contents(&img, &sc);
    assert!(data[..4096].iter().all(|&b| b == 0x77));
    assert!(data[64 << 10..128 << 10].iter().all(|&b| b == 0x21));

    // A known bit that still holds (data_file_raw) survives next to an unknown one.
    let data_file = sc.path("data.raw");
    let raw = sc.path("raw.qcow2");
    create(
        &raw,
        &format!("data_file={},data_file_raw=on", s(&data_file)),
        "4M",
    );
    let bits = be64_at(&raw, 88);
    assert_eq!(bits, 2, "qemu sets data_file_raw");
    poke(&raw, 88, &(bits | 1 << 7).to_be_bytes());
    let dev = open_rw(&raw);
    dev.write_at(&[3; 512], 0).expect("write");
    dev.flush().expect("flush");
    drop(dev);
    assert_eq!(be64_at(&raw, 88), 2);
    qemu_check_clean(&raw);
}

/// Zeroes refcount table entry `t` of `img` (so the clusters its block described look free
/// although they are in use) and returns the cluster size and entries per refcount block.
fn drop_refcount_block(img: &Path, t: u64) -> (u64, u64) {
    let cluster_bits = be64_at(img, 16) & 0xffff_ffff;
    let cs = 1u64 << cluster_bits;
    let order = be64_at(img, 92) & 0xffff_ffff;
    let per = (8 * cs) >> order;
    let table = be64_at(img, 48);
    assert_ne!(be64_at(img, table + 8 * t), 0, "refcount block {t} exists");
    poke(img, table + 8 * t, &0u64.to_be_bytes());
    (cs, per)
}

#[test]
fn repair_never_places_a_refcount_block_on_a_used_cluster() {
    for (opts, t) in [
        ("cluster_size=512,refcount_bits=16", 5u64),
        ("cluster_size=4k,refcount_bits=64", 0),
        ("cluster_size=512,refcount_bits=16,lazy_refcounts=on", 3),
    ] {
        let sc = Scratch::new("refblock");
        let img = sc.path("img.qcow2");
        create(&img, opts, "8M");
        qemu_io(
            &img,
            &[
                "write -P 0x31 0 3m",
                "write -P 0x32 5m 1m",
                "write -z 1m 64k",
            ],
        );
        let expect = qemu_contents(&img, &sc);
        let (cs, per) = drop_refcount_block(&img, t);
        // The dropped block's range lies wholly below the end of the file, and (qemu
        // allocates from the front) nearly all of its clusters are in use.
        let file_clusters = std::fs::metadata(&img).expect("stat").len() / cs;
        assert!(file_clusters > (t + 1) * per, "{opts}: image too small");
        let q = qemu_check(&img);
        assert!(field(&q, "corruptions") >= per / 2, "{opts}: {q}");

        if opts.contains("lazy_refcounts") {
            // The automatic rebuild of a dirty image is the same repair.
            let hdr_incompat = be64_at(&img, 72);
            poke(&img, 72, &(hdr_incompat | 1).to_be_bytes());
            let dev = open_rw(&img);
            assert_same(&read_all(&dev), &expect, opts);
            drop(dev);
        } else {
            let r = Qcow2Format
                .check(&img, &options(), RepairMode::All)
                .unwrap_or_else(|e| panic!("{opts}: repair: {e}"));
            let tail = &r.messages[r.messages.len().saturating_sub(5)..];
            assert_eq!((r.corruptions, r.leaks), (0, 0), "{opts}: {tail:?}");
        }
        qemu_check_clean(&img);
        assert_same(&qemu_contents(&img, &sc), &expect, opts);
        // The new block works for later allocations too.
        let dev = open_rw(&img);
        dev.write_at(&vec![0x44; 256 << 10], 7 << 20)
            .expect("write");
        dev.flush().expect("flush");
        drop(dev);
        qemu_check_clean(&img);
    }
}

/// Host offset of the first L2 table of `img` and the raw value of its entry `idx`.
fn l2_entry(img: &Path, idx: u64) -> (u64, u64) {
    let l1 = be64_at(img, 40);
    let l2 = be64_at(img, l1) & 0x00ff_ffff_ffff_fe00;
    (l2 + 8 * idx, be64_at(img, l2 + 8 * idx))
}

fn qemu_says_corrupt(img: &Path) -> bool {
    qemu_info(img)["format-specific"]["data"]["corrupt"]
        .as_bool()
        .expect("corrupt field")
}

#[test]
fn bad_table_entries_mark_writable_images_corrupt() {
    // (name, create options, how the first L2 entry is damaged)
    for (name, opts, damage) in [
        ("unaligned", "", 0x200u64),
        ("reserved", "", 0x2),
        ("unaligned-v2", "compat=0.10", 0x200),
    ] {
        let sc = Scratch::new("corrupt-bit");
        let img = sc.path("img.qcow2");
        create(&img, opts, "4M");
        qemu_io(&img, &["write -P 0x61 0 128k", "write -P 0x62 1m 64k"]);
        let (at, entry) = l2_entry(&img, 0);
        poke(&img, at, &(entry | damage).to_be_bytes());
        let v3 = !opts.contains("0.10");
        let incompat = if v3 { be64_at(&img, 72) } else { 0 };

        // Read-only: the request fails, nothing is written.
        let before = std::fs::read(&img).expect("read image");
        let dev = open(&img);
        let mut buf = vec![0u8; 4096];
        let err = dev.read_at(&mut buf, 0).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        dev.read_at(&mut buf, 1 << 20).expect("undamaged range");
        assert!(buf.iter().all(|&b| b == 0x62), "{name}");
        drop(dev);
        assert!(std::fs::read(&img).expect("read") == before, "{name}");

        // Writable: the write fails and the image is marked corrupt.
        let dev = open_rw(&img);
        let err = dev.write_at(&[7; 4096], 0).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        assert!(err.message().contains("marked corrupt"), "{name}: {err}");
        // No further write anywhere, as qemu stops using the image.
        let err = dev.write_at(&[7; 512], 2 << 20).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        dev.flush().expect("flush");
        drop(dev);
        if !v3 {
            // Version 2 has no feature bits: the mark lives only as long as the image.
            assert!(std::fs::read(&img).expect("read") == before, "{name}");
            let q = qemu_check(&img);
            assert!(field(&q, "corruptions") >= 1, "{name}: {q}");
            continue;
        }
        assert_eq!(be64_at(&img, 72), incompat | 2, "{name}: corrupt bit");
        assert!(qemu_says_corrupt(&img), "{name}");
        let q = qemu_check(&img);
        assert!(field(&q, "corruptions") >= 1, "{name}: {q}");
        // Afterwards writable opens are refused; read-only ones work, as with qemu.
        let err = Qcow2Image::open(&img, &rw_options()).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        let dev = open(&img);
        let mut buf = vec![0u8; 4096];
        dev.read_at(&mut buf, 64 << 10)
            .expect("read of a good cluster");
        assert!(buf.iter().all(|&b| b == 0x61), "{name}");
    }
}

#[test]
fn reads_of_bad_entries_mark_writable_images_corrupt() {
    // qemu-io opens images writable, and a read of an unaligned L1 or L2 entry marks the
    // image corrupt there too.
    for l1 in [false, true] {
        let sc = Scratch::new("corrupt-read");
        let img = sc.path("img.qcow2");
        create(&img, "", "4M");
        qemu_io(&img, &["write -P 0x61 0 128k"]);
        let qemu_img_copy = sc.path("qemu.qcow2");
        let (at, entry) = if l1 {
            let l1 = be64_at(&img, 40);
            (l1, be64_at(&img, l1))
        } else {
            l2_entry(&img, 0)
        };
        poke(&img, at, &(entry | 0x200).to_be_bytes());
        std::fs::copy(&img, &qemu_img_copy).expect("copy");
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read 0 4k", s(&qemu_img_copy)])
            .output()
            .expect("qemu-io");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("read failed"),
            "qemu reads it"
        );
        assert!(
            qemu_says_corrupt(&qemu_img_copy),
            "qemu marks it (l1: {l1})"
        );

        let dev = open_rw(&img);
        let mut buf = vec![0u8; 4096];
        let err = dev.read_at(&mut buf, 0).expect_err("read of a bad entry");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        drop(dev);
        assert!(qemu_says_corrupt(&img), "l1: {l1}");
    }
}

/// `qemu-img map --output=json` of `img`.
fn qemu_map(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["map", "--output=json", s(img)])).expect("map json")
}

/// Applies the same write-zeroes requests through qemu-io to one copy of `base` and through
/// us to another, then requires the same allocation (`qemu-img map`, host offsets
/// included), the same contents and clean images.
fn same_zeroing_as_qemu(name: &str, base: &Path, sc: &Scratch, ops: &[(u64, u64, bool)]) {
    let theirs = sc.path(&format!("{name}-qemu.qcow2"));
    let ours = sc.path(&format!("{name}-ours.qcow2"));
    std::fs::copy(base, &theirs).expect("copy");
    std::fs::copy(base, &ours).expect("copy");
    let commands: Vec<String> = ops
        .iter()
        .map(|&(off, len, unmap)| format!("write -z {}{off} {len}", if unmap { "-u " } else { "" }))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&theirs, &commands);
    let dev = open_rw(&ours);
    for &(off, len, unmap) in ops {
        let mode = if unmap {
            vdisk_block::ZeroMode::MayUnmap
        } else {
            vdisk_block::ZeroMode::KeepAllocated
        };
        dev.write_zeroes(off, len, mode)
            .unwrap_or_else(|e| panic!("{name}: write zeroes {off} {len}: {e}"));
    }
    dev.flush().expect("flush");
    drop(dev);
    qemu_check_clean(&ours);
    assert_eq!(
        qemu_map(&ours),
        qemu_map(&theirs),
        "{name}: allocation differs"
    );
    qemu_img(&["compare", "-q", s(&ours), s(&theirs)]);
}

#[test]
fn v2_write_zeroes_allocates_like_qemu() {
    let sc = Scratch::new("v2-zeroes");
    const K: u64 = 1024;
    // (offset, length, may unmap): whole clusters over data and over nothing, pieces of
    // clusters over data and over nothing, a request with ragged ends, the last cluster.
    let ops: &[(u64, u64, bool)] = &[
        (64 * K, 128 * K, false),
        (1024 * K, 128 * K, false),
        (2048 * K, 64 * K, true),
        (300 * K, 8 * K, false),
        (3200 * K, 4 * K, true),
        (512 * K + 4 * K, 4 * K, false),
        (520 * K, 200 * K, true),
        (4096 * K - 64 * K, 64 * K, false),
        (6000 * K, 300 * K, false),
        (8 * 1024 * K - 1000, 1000, false),
    ];
    for (name, opts) in [
        ("v2", "compat=0.10"),
        ("v2-small", "compat=0.10,cluster_size=4k"),
    ] {
        let base = sc.path(&format!("{name}.qcow2"));
        create(&base, opts, "8M");
        qemu_io(
            &base,
            &[
                "write -P 0x11 0 768k",
                "write -P 0x12 2m 128k",
                "write -P 0x13 4032k 64k",
                "write -P 0x14 8100k 92k",
            ],
        );
        same_zeroing_as_qemu(name, &base, &sc, ops);
    }
    // With a backing file v2 has nothing to show zeroes with but zeroed data clusters.
    let backing = sc.path("backing.qcow2");
    create(&backing, "compat=0.10", "8M");
    qemu_io(&backing, &["write -P 0x21 0 8m"]);
    let top = sc.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        s(&backing),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x11 0 768k", "write -P 0x12 2m 128k"]);
    same_zeroing_as_qemu("v2-backing", &top, &sc, ops);
}

/// The header extensions of `img` as (type, payload), read straight from the bytes.
fn raw_extensions(img: &Path) -> Vec<(u32, Vec<u8>)> {
    let b = std::fs::read(img).expect("read image");
    let be32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut at = if be32(4) >= 3 { be32(100) as usize } else { 72 };
    let mut out = Vec::new();
    loop {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        if kind == 0 {
            return out;
        }
        out.push((kind, b[at + 8..at + 8 + len].to_vec()));
        at += 8 + ((len + 7) & !7);
    }
}

/// Appends an extension of `kind` with `payload` after the existing ones (before the end
/// marker), as a newer writer would.
fn add_extension(img: &Path, kind: u32, payload: &[u8]) {
    let mut b = std::fs::read(img).expect("read image");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut at = be32(&b, 100) as usize;
    while be32(&b, at) != 0 {
        at += 8 + ((be32(&b, at + 4) as usize + 7) & !7);
    }
    let padded = (payload.len() + 7) & !7;
    let backing_at = be64_at(img, 8) as usize;
    assert!(
        backing_at == 0 || at + 16 + padded <= backing_at,
        "no room before the backing file name"
    );
    b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
    b[at + 4..at + 8].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    b[at + 8..at + 8 + payload.len()].copy_from_slice(payload);
    b[at + 8 + payload.len()..at + 16 + padded].fill(0);
    std::fs::write(img, &b).expect("write image");
}

#[test]
fn unknown_extensions_survive_amend() {
    let sc = Scratch::new("amend-ext");
    let backing = sc.path("backing.qcow2");
    create(&backing, "", "4M");
    qemu_io(&backing, &["write -P 0x42 0 1m"]);
    let img = sc.path("img.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "backing.qcow2",
        "-F",
        "qcow2",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 0x43 64k 64k"]);
    // The backing file name sits at the end of the header area; make room before it as
    // a newer writer would have, by moving the name.
    let name_at = be64_at(&img, 8);
    let name_len = (be64_at(&img, 16) >> 32) as usize;
    let mut b = std::fs::read(&img).expect("read");
    let name = b[name_at as usize..name_at as usize + name_len].to_vec();
    b[name_at as usize..name_at as usize + name_len].fill(0);
    let new_at = 1024usize;
    b[new_at..new_at + name_len].copy_from_slice(&name);
    b[8..16].copy_from_slice(&(new_at as u64).to_be_bytes());
    std::fs::write(&img, &b).expect("write");
    let unknown = [
        (0x1234_5678u32, b"kept by every writer".to_vec()),
        (0x0bad_cafe, vec![0xa5; 13]),
    ];
    for (kind, payload) in &unknown {
        add_extension(&img, *kind, payload);
    }
    qemu_check_clean(&img);
    let before = raw_extensions(&img);
    let contents = qemu_contents(&img, &sc);

    let amend = |opts: &str| {
        Qcow2Format
            .amend(
                &img,
                vdisk_block::CreateOptions {
                    size: 0,
                    options: vdisk_block::CreateOptions::parse_options(opts).expect("options"),
                },
            )
            .unwrap_or_else(|e| panic!("amend {opts}: {e}"))
    };
    amend("lazy_refcounts=on");
    assert_eq!(raw_extensions(&img), before, "extensions after our rewrite");
    let info = qemu_info(&img);
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
    assert_eq!(info["backing-filename"], "backing.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    qemu_check_clean(&img);
    assert_same(&qemu_contents(&img, &sc), &contents, "after amend");

    // qemu rewrites the header keeping only the unknown extensions it parsed: ours must
    // have been well-formed for them to come through.
    qemu_img(&["amend", "-o", "lazy_refcounts=off", s(&img)]);
    let after_qemu = raw_extensions(&img);
    for ext in &unknown {
        assert!(after_qemu.contains(ext), "qemu lost {:#x}", ext.0);
    }
    amend("lazy_refcounts=on");
    // A longer backing file name moves it within the header cluster (rebase -u's header
    // rewrite: qemu 10's amend refuses backing changes).
    vdisk_qcow2::amend::set_backing(&img, Some("./backing.qcow2"), Some("qcow2"))
        .expect("set backing");
    let ours = raw_extensions(&img);
    for ext in &unknown {
        assert!(ours.contains(ext), "lost {:#x}", ext.0);
    }
    assert_eq!(qemu_info(&img)["backing-filename"], "./backing.qcow2");
    qemu_check_clean(&img);
    assert_same(
        &qemu_contents(&img, &sc),
        &contents,
        "after the second amend",
    );
}

/// Points the backing file of `img` at `name` without opening anything.
fn set_backing(img: &Path, name: &str) {
    qemu_img(&["rebase", "-u", "-b", name, "-F", "qcow2", s(img)]);
}

#[test]
fn backing_chain_loops_are_refused() {
    let sc = Scratch::new("chain-loop");
    // An image that is its own backing file.
    let me = sc.path("me.qcow2");
    create(&me, "", "1M");
    set_backing(&me, "me.qcow2");
    let err = Qcow2Image::open(&me, &options()).expect_err("self loop");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.message().contains("backing chain loops"), "{err}");
    assert!(err.message().contains("me.qcow2"), "{err}");

    // a -> b -> a, opened from either end, read-only and writable.
    let a = sc.path("a.qcow2");
    let b = sc.path("b.qcow2");
    create(&a, "", "1M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "1M",
    ]);
    set_backing(&a, "b.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--backing-chain", s(&a)])
        .output()
        .expect("qemu-img info");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("infinite loop"),
        "qemu refuses the loop too"
    );
    for (top, opts) in [(&a, options()), (&b, options()), (&a, rw_options())] {
        let before = std::fs::read(top).expect("read");
        let err = Qcow2Image::open(top, &opts).expect_err("two-image loop");
        assert!(err.message().contains("backing chain loops"), "{err}");
        assert!(
            std::fs::read(top).expect("read") == before,
            "refused open wrote"
        );
    }
    // The refusal leaves nothing behind: a good image opens on the same thread.
    set_backing(&a, "");
    let dev = open(&b);
    assert_eq!(read_all(&dev), vec![0u8; 1 << 20]);
}

#[test]
fn backing_chains_deeper_than_the_limit_are_refused() {
    let sc = Scratch::new("chain-depth");
    let limit = vdisk_qcow2::open::MAX_CHAIN_DEPTH;
    let base = sc.path("0.qcow2");
    create(&base, "", "1M");
    qemu_io(&base, &["write -P 0x77 0 64k"]);
    for i in 1..=limit {
        let prev = format!("{}.qcow2", i - 1);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &prev,
            "-F",
            "qcow2",
            s(&sc.path(&format!("{i}.qcow2"))),
            "1M",
        ]);
    }
    // A chain of exactly `limit` images opens and reads through to the base, on a test
    // thread's ordinary stack.
    let deepest_allowed = sc.path(&format!("{}.qcow2", limit - 1));
    let dev = open(&deepest_allowed);
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 0).expect("read through the chain");
    assert!(buf.iter().all(|&b| b == 0x77));
    drop(dev);
    // One more is refused, clearly.
    let too_deep = sc.path(&format!("{limit}.qcow2"));
    let err = Qcow2Image::open(&too_deep, &options()).expect_err("too deep");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(
        err.message()
            .contains(&format!("the backing chain is deeper than {limit} images")),
        "{}",
        &err.message()[err.message().len().saturating_sub(300)..]
    );
    assert!(
        err.message().len() < 1000,
        "one clear line, not one per image: {err}"
    );
    assert!(
        err.message().contains(s(&sc.path("0.qcow2"))),
        "names the refused file: {err}"
    );
    // The guard unwound: the allowed chain still opens on this thread.
    drop(open(&deepest_allowed));
}
