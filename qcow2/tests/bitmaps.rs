//! Persistent dirty bitmaps, judged by qemu: bitmaps qemu made and filled are read as qemu
//! wrote them; writes through vdisk set the bits qemu's own NBD export then reports; every
//! store leaves an image `qemu-img check` finds clean, with the flags qemu-img info shows;
//! qemu's refusals; and every cut of the write stream around a store leaves no corruption.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::Command;

use common::nbd::qemu_dirty_ranges;
use common::*;
use vdisk_block::file::record::{FileOp, Recording};
use vdisk_block::{BlockDev, DirtyBitmapInfo, ErrorKind, OpenOptions, Preallocation, ZeroMode};
use vdisk_qcow2::Qcow2Image;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, &OpenOptions::read_write())
        .unwrap_or_else(|e| panic!("open {} rw: {e}", path.display()))
}

/// `qemu-img check --output=json`: (exit code, corruptions, leaks, check errors).
fn qemu_check(path: &Path) -> (i32, u64, u64, u64) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(path)])
        .output()
        .expect("run qemu-img check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check output: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (
        out.status.code().unwrap_or(-1),
        n("corruptions"),
        n("leaks"),
        n("check-errors"),
    )
}

fn assert_clean(path: &Path, what: &str) {
    assert_eq!(qemu_check(path), (0, 0, 0, 0), "{what}: qemu-img check");
}

/// The bitmaps `qemu-img info --output=json` lists.
fn qemu_bitmaps(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", "-U", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("info json");
    v["format-specific"]["data"]
        .get("bitmaps")
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// Granule-widened, merged ranges of `writes` (what a bitmap must show for them).
fn expected(writes: &[(u64, u64)], gran: u64, size: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(o, l)| (o / gran * gran, ((o + l).div_ceil(gran) * gran).min(size)))
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (a, b - a)).collect()
}

fn info(name: &str, granularity: u64, enabled: bool, inconsistent: bool) -> DirtyBitmapInfo {
    DirtyBitmapInfo {
        name: name.into(),
        granularity,
        enabled,
        inconsistent,
    }
}

#[test]
fn qemu_writes_are_dirty_in_vdisk_view() {
    let sc = Scratch::new("bm-qemu");
    let img = sc.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_img(&["bitmap", "--add", "-g", "64k", s(&img), "on"]);
    qemu_img(&["bitmap", "--add", "-g", "4k", "--disable", s(&img), "off"]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "fine"]);
    qemu_io(
        &img,
        &[
            "write 70000 5000",
            "write -z 3M 1M",
            "discard 6M 64k",
            "write 8388000 192",
        ],
    );
    let dev = open(&img);
    assert_eq!(
        dev.dirty_bitmaps().expect("list"),
        vec![
            info("on", 65536, true, false),
            info("off", 4096, false, false),
            info("fine", 512, true, false)
        ]
    );
    let writes = [
        (70000, 5000),
        (3 << 20, 1 << 20),
        (6 << 20, 65536),
        (8388000, 192),
    ];
    for (name, gran) in [("on", 65536), ("fine", 512)] {
        assert_eq!(
            dev.dirty_bitmap_ranges(name).expect("ranges"),
            expected(&writes, gran, 8 << 20),
            "{name}"
        );
        assert_eq!(
            dev.dirty_bitmap_ranges(name).expect("ranges"),
            qemu_dirty_ranges(&img, name, &sc),
            "{name} against qemu-nbd"
        );
    }
    assert!(dev.dirty_bitmap_ranges("off").expect("ranges").is_empty());
    let e = dev.dirty_bitmap_ranges("nope").expect_err("missing");
    assert_eq!(e.message(), "Dirty bitmap 'nope' not found");
}

#[test]
fn vdisk_writes_are_dirty_in_qemu_view_and_the_image_stays_clean() {
    let sc = Scratch::new("bm-vdisk");
    let img = sc.path("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "16M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "64k", s(&img), "big"]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "small"]);
    qemu_img(&["bitmap", "--add", "--disable", s(&img), "frozen"]);
    qemu_io(&img, &["write 0 4k"]);
    let mut writes = vec![(0u64, 4096u64)];
    {
        let dev = rw(&img);
        // Marked in use on disk while open, as qemu shows a running VM's bitmaps.
        let flags = qemu_bitmaps(&img);
        for b in flags.as_array().expect("bitmaps") {
            assert!(
                b["flags"]
                    .as_array()
                    .expect("flags")
                    .iter()
                    .any(|f| f == "in-use"),
                "open: {flags}"
            );
        }
        dev.write_at(&[7u8; 3000], 1_000_000).expect("write");
        writes.push((1_000_000, 3000));
        dev.write_zeroes(5 << 20, 300_000, ZeroMode::MayUnmap)
            .expect("zero");
        writes.push((5 << 20, 300_000));
        dev.discard(9 << 20, 1 << 20).expect("discard");
        writes.push((9 << 20, 1 << 20));
        dev.write_at(&[1u8; 512], (16 << 20) - 512)
            .expect("write at the end");
        writes.push(((16 << 20) - 512, 512));
        // The whole disk in one bitmap chunk run (all-ones data clusters).
        dev.dirty_bitmap_set_range("small", 12 << 20, 2 << 20, true)
            .expect("set");
        writes.push((12 << 20, 2 << 20));
        dev.flush().expect("flush");
    }
    assert_clean(&img, "after close");
    let b = qemu_bitmaps(&img);
    assert_eq!(
        b,
        serde_json::json!([
            {"flags": ["auto"], "name": "big", "granularity": 65536},
            {"flags": ["auto"], "name": "small", "granularity": 512},
            {"flags": [], "name": "frozen", "granularity": 4096}
        ])
    );
    let small_writes: Vec<(u64, u64)> = writes.clone();
    let big_writes: Vec<(u64, u64)> = writes
        .iter()
        .copied()
        .filter(|&w| w != (12 << 20, 2 << 20))
        .collect();
    assert_eq!(
        qemu_dirty_ranges(&img, "big", &sc),
        expected(&big_writes, 65536, 16 << 20)
    );
    assert_eq!(
        qemu_dirty_ranges(&img, "small", &sc),
        expected(&small_writes, 512, 16 << 20)
    );
    assert!(qemu_dirty_ranges(&img, "frozen", &sc).is_empty());
    // A second session adds to the stored bits, and qemu-io's own writes join them.
    rw(&img).write_at(&[2u8; 10], 15 << 20).expect("write");
    qemu_io(&img, &["write 2M 4k"]);
    assert_clean(&img, "second session");
    let mut more = big_writes.clone();
    more.push((15 << 20, 10));
    more.push((2 << 20, 4096));
    assert_eq!(
        open(&img).dirty_bitmap_ranges("big").expect("ranges"),
        expected(&more, 65536, 16 << 20)
    );
}

#[test]
fn operations_match_qemu_img_bitmap_on_a_twin() {
    let sc = Scratch::new("bm-ops");
    let ours = sc.path("ours.qcow2");
    let twin = sc.path("twin.qcow2");
    let other = sc.path("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&ours), "32M"]);
    std::fs::copy(&ours, &twin).expect("copy");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "32M"]);
    qemu_img(&["bitmap", "--add", s(&other), "src"]);
    qemu_io(&other, &["write 20M 64k"]);
    qemu_io(&ours, &["write 1M 64k"]);
    qemu_io(&twin, &["write 1M 64k"]);
    type Step<'a> = (&'a [&'a str], Box<dyn Fn(&Qcow2Image) + 'a>);
    let steps: Vec<Step> = vec![
        (
            &["--add", "a"],
            Box::new(|d: &Qcow2Image| d.add_bitmap("a", None, false).expect("add")),
        ),
        (
            &["--add", "-g", "4k", "--disable", "b"],
            Box::new(|d: &Qcow2Image| d.add_bitmap("b", Some(4096), true).expect("add")),
        ),
        (
            &["--disable", "a"],
            Box::new(|d: &Qcow2Image| d.enable_bitmap("a", false).expect("disable")),
        ),
        (
            &["--enable", "b"],
            Box::new(|d: &Qcow2Image| d.enable_bitmap("b", true).expect("enable")),
        ),
        (
            &["--merge", "src", "-b", "OTHER", "-F", "qcow2", "a"],
            Box::new(|d: &Qcow2Image| {
                let src = open(&sc.path("other.qcow2"));
                BlockDev::dirty_bitmap_merge(d, "a", &src, "src").expect("merge")
            }),
        ),
        (
            &["--merge", "a", "b"],
            Box::new(|d: &Qcow2Image| BlockDev::dirty_bitmap_merge(d, "b", d, "a").expect("merge")),
        ),
        (
            &["--clear", "a"],
            Box::new(|d: &Qcow2Image| d.clear_bitmap("a").expect("clear")),
        ),
        (
            &["--remove", "a"],
            Box::new(|d: &Qcow2Image| d.remove_bitmap("a").expect("remove")),
        ),
        (
            &["--remove", "b"],
            Box::new(|d: &Qcow2Image| d.remove_bitmap("b").expect("remove")),
        ),
        (
            &["--add", "-g", "2G", "c"],
            Box::new(|d: &Qcow2Image| d.add_bitmap("c", Some(1 << 31), false).expect("add")),
        ),
    ];
    for (args, op) in &steps {
        {
            let dev = rw(&ours);
            op(&dev);
            dev.store_bitmaps().expect("store");
        }
        let mut qargs = vec!["bitmap"];
        for a in *args {
            qargs.push(if *a == "OTHER" { s(&other) } else { a });
        }
        let name = qargs.pop().expect("name");
        qargs.push(s(&twin));
        qargs.push(name);
        qemu_img(&qargs);
        assert_clean(&ours, &format!("{args:?}"));
        assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&twin), "{args:?}");
        let (a, b) = (open(&ours), open(&twin));
        for bm in b.dirty_bitmaps().expect("list") {
            assert_eq!(
                a.dirty_bitmap_ranges(&bm.name).expect("ours"),
                b.dirty_bitmap_ranges(&bm.name).expect("twin"),
                "{args:?}: bitmap {}",
                bm.name
            );
        }
    }
    // The merged bits are those qemu sees.
    let dev = rw(&ours);
    dev.add_bitmap("m", None, true).expect("add");
    BlockDev::dirty_bitmap_merge(&dev, "m", &open(&other), "src").expect("merge");
    drop(dev);
    assert_eq!(qemu_dirty_ranges(&ours, "m", &sc), vec![(20 << 20, 65536)]);
    assert_clean(&ours, "merge");
}

#[test]
fn refusals_as_qemu() {
    let sc = Scratch::new("bm-refuse");
    let img = sc.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    let dev = rw(&img);
    let msg = |r: vdisk_block::Result<()>| r.expect_err("refused").message().to_string();
    assert_eq!(
        msg(dev.add_bitmap("", None, false)),
        "Bitmap name cannot be empty"
    );
    for g in [0, 256, 1000, 3 << 20] {
        assert_eq!(
            msg(dev.add_bitmap("x", Some(g), false)),
            "Granularity must be power of 2 and at least 512"
        );
    }
    let long = "n".repeat(1024);
    assert_eq!(
        msg(dev.add_bitmap(&long, None, false)),
        format!(
            "Can't make bitmap '{long}' persistent in '#block0': Name length exceeds maximum (1023 characters)"
        )
    );
    dev.add_bitmap(&"n".repeat(1023), None, false)
        .expect("1023 bytes");
    dev.add_bitmap("x", None, false).expect("add");
    assert_eq!(
        msg(dev.add_bitmap("x", None, false)),
        "Bitmap already exists: x"
    );
    assert_eq!(msg(dev.clear_bitmap("y")), "Dirty bitmap 'y' not found");
    assert_eq!(msg(dev.remove_bitmap("y")), "Dirty bitmap 'y' not found");
    drop(dev);
    assert_clean(&img, "after refusals");
    // Version 2 images cannot hold bitmaps.
    let v2 = sc.path("v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&v2),
        "1M",
    ]);
    assert_eq!(
        msg(rw(&v2).add_bitmap("b", None, false)),
        "Can't make bitmap 'b' persistent in '#block0': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    // A read-only image reads bitmaps but does not change them.
    let ro = open(&img);
    assert_eq!(
        ro.add_bitmap("z", None, false)
            .expect_err("read-only")
            .kind(),
        ErrorKind::ReadOnly
    );
}

/// Sets the in_use flag of the first bitmap of `path` by hand (what a crash leaves).
fn set_first_in_use(path: &Path) {
    let data = std::fs::read(path).expect("read");
    let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    let mut at = 112usize;
    loop {
        let kind = u32::from_be_bytes(data[at..at + 4].try_into().expect("4"));
        let len = u32::from_be_bytes(data[at + 4..at + 8].try_into().expect("4")) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let dir = be64(at + 24);
            let f = File::options().write(true).open(path).expect("open");
            std::os::unix::fs::FileExt::write_all_at(&f, &[0, 0, 0, 3], dir + 12)
                .expect("write flags");
            return;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn an_in_use_bitmap_is_inconsistent_and_only_removable() {
    let sc = Scratch::new("bm-inuse");
    let img = sc.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_img(&["bitmap", "--add", s(&img), "bad"]);
    qemu_img(&["bitmap", "--add", s(&img), "good"]);
    set_first_in_use(&img);
    let twin = sc.path("twin.qcow2");
    std::fs::copy(&img, &twin).expect("copy");
    {
        let dev = rw(&img);
        assert_eq!(
            dev.dirty_bitmaps().expect("list"),
            vec![
                info("bad", 65536, true, true),
                info("good", 65536, true, false)
            ]
        );
        let hint = "Bitmap 'bad' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk";
        assert_eq!(
            dev.clear_bitmap("bad").expect_err("inconsistent").message(),
            hint
        );
        assert_eq!(
            dev.dirty_bitmap_ranges("bad")
                .expect_err("inconsistent")
                .message(),
            hint
        );
        // qemu refuses to resize with it too.
        assert_eq!(
            dev.resize(16 << 20, Preallocation::Off)
                .expect_err("resize")
                .message(),
            hint
        );
        dev.write_at(&[1; 4096], 0).expect("write");
    }
    // Stored again: the inconsistent one stays as it was, the other is clean.
    assert_clean(&img, "with an in-use bitmap");
    assert_eq!(
        qemu_bitmaps(&img),
        serde_json::json!([
            {"flags": ["in-use", "auto"], "name": "bad", "granularity": 65536},
            {"flags": ["auto"], "name": "good", "granularity": 65536}
        ])
    );
    {
        let dev = rw(&img);
        dev.remove_bitmap("bad").expect("remove");
    }
    qemu_img(&["bitmap", "--remove", s(&twin), "bad"]);
    assert_clean(&img, "after removing it");
    assert_eq!(qemu_bitmaps(&img), qemu_bitmaps(&twin));
    assert_eq!(
        open(&img).dirty_bitmap_ranges("good").expect("ranges"),
        vec![(0, 65536)]
    );
}

#[test]
fn resize_follows_the_bitmaps() {
    let sc = Scratch::new("bm-resize");
    let img = sc.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b"]);
    {
        let dev = rw(&img);
        dev.write_at(&[1; 512], (8 << 20) - 512).expect("write");
        dev.resize(40 << 20, Preallocation::Off).expect("grow");
        dev.write_at(&[1; 512], 39 << 20).expect("write");
    }
    assert_clean(&img, "grown");
    assert_eq!(
        qemu_dirty_ranges(&img, "b", &sc),
        vec![((8 << 20) - 65536, 65536), (39 << 20, 65536)]
    );
    {
        let dev = rw(&img);
        dev.resize(4 << 20, Preallocation::Off).expect("shrink");
    }
    assert_clean(&img, "shrunk");
    assert!(qemu_dirty_ranges(&img, "b", &sc).is_empty());
}

/// Every prefix of the write stream of a session that changes bitmaps (a store with new
/// and freed clusters, the in_use marking at open) leaves an image qemu-img check finds
/// free of corruption; each cut bitmap is either the old one, in use (inconsistent), or
/// the new one.
#[test]
fn cuts_around_a_store_leave_no_corruption() {
    let sc = Scratch::new("bm-crash");
    let img = sc.path("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "16M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "a"]);
    qemu_img(&["bitmap", "--add", s(&img), "b"]);
    qemu_io(&img, &["write 0 64k"]);
    let pristine = std::fs::read(&img).expect("read");
    let rec = Recording::start(&img).expect("record");
    {
        let dev = rw(&img);
        dev.write_at(&[5; 8192], 3 << 20).expect("write");
        dev.remove_bitmap("b").expect("remove");
        dev.add_bitmap("c", Some(4096), false).expect("add");
        dev.write_at(&[6; 100], 10 << 20).expect("write");
        dev.store_bitmaps().expect("store");
        dev.write_at(&[7; 100], 12 << 20)
            .expect("write after the store");
    }
    let ops = rec.ops();
    drop(rec);
    assert_clean(&img, "uncut");
    let flushes: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, FileOp::Flush))
        .map(|(i, _)| i)
        .collect();
    assert!(
        flushes.len() > 6,
        "the session flushed {} times",
        flushes.len()
    );
    let cut = sc.path("cut.qcow2");
    let mut checked = 0;
    // Every prefix, and torn writes too: every multi-sector write cut in half.
    for k in 0..=ops.len() {
        let mut variants: Vec<Vec<FileOp>> = vec![Vec::new()];
        if let Some(next @ FileOp::Write { data, .. }) = ops.get(k) {
            if data.len() > 512 {
                let pieces = next.sectors(512);
                variants.push(pieces[..pieces.len() / 2].to_vec());
                variants.push(pieces[pieces.len() / 2..].to_vec());
            }
        }
        for extra in variants {
            std::fs::write(&cut, &pristine).expect("write");
            let f = File::options().write(true).open(&cut).expect("open");
            for op in ops[..k].iter().chain(extra.iter()) {
                op.apply(&f).expect("apply");
            }
            drop(f);
            let (code, corruptions, _leaks, errors) = qemu_check(&cut);
            assert_eq!(
                (corruptions, errors),
                (0, 0),
                "cut after {k} of {} changes (+{} pieces): qemu-img check exit {code}",
                ops.len(),
                extra.len()
            );
            // vdisk opens the cut image and reads its bitmaps as qemu does.
            let dev = open(&cut);
            let list = dev.dirty_bitmaps().expect("list bitmaps of a cut image");
            let at_flush = k > 0 && matches!(ops[k - 1], FileOp::Flush) && extra.is_empty();
            for b in &list {
                if !b.inconsistent && at_flush {
                    let ours = dev.dirty_bitmap_ranges(&b.name).expect("ranges");
                    assert_eq!(
                        ours,
                        qemu_dirty_ranges(&cut, &b.name, &sc),
                        "cut after {k}: bitmap {}",
                        b.name
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked > ops.len());
}

/// The host offset of bitmap 0's table, from the directory.
fn first_table(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("read");
    let be = |at: usize, n: usize| {
        data[at..at + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    let mut at = 112usize;
    loop {
        let (kind, len) = (be(at, 4), be(at + 4, 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return be(be(at + 24, 8) as usize, 8);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// A table entry of 1 (a data cluster of all ones that is not stored) reads as qemu reads
/// it, survives a store and stays in qemu's view.
#[test]
fn an_all_ones_table_entry_reads_as_qemu_reads_it() {
    let sc = Scratch::new("bm-ones");
    let img = sc.path("a.qcow2");
    // 512-byte clusters and granularity: one table entry covers 2 MiB of guest data.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&img),
        "5M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&img), "b"]);
    let table = first_table(&img);
    let f = File::options().write(true).open(&img).expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &1u64.to_be_bytes(), table + 8).expect("poke");
    drop(f);
    assert_clean(&img, "entry 1");
    let want = vec![(2 << 20, 2 << 20)];
    assert_eq!(qemu_dirty_ranges(&img, "b", &sc), want);
    assert_eq!(open(&img).dirty_bitmap_ranges("b").expect("ranges"), want);
    {
        let dev = rw(&img);
        dev.write_at(&[3; 512], 0).expect("write");
    }
    assert_clean(&img, "stored");
    let want = vec![(0, 512), (2 << 20, 2 << 20)];
    assert_eq!(qemu_dirty_ranges(&img, "b", &sc), want);
}
