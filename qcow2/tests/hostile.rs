//! Hostile qcow2 images, classes 4 to 9 of §8.2 of the block reference: refcount tables,
//! snapshot tables, L2/data entries, metadata overlaps, bitmap directories and external
//! references. (Classes 1 to 3 live in `header.rs`.)
//!
//! Every case patches an image that `qemu-img` made and states, in its table row:
//! - where vdisk refuses it: at open, at `info` (the snapshot table and the bitmap directory
//!   are read there, not at a read-only open, which never needs them), at the read or write
//!   that meets the damage, or only in `check`; the error must name the damage;
//! - what qemu does with the same bytes (`qemu-img info`, `qemu-io -r -c read`,
//!   `qemu-io -c write` followed by the corrupt bit, `qemu-img check` counts), asserted
//!   against the real qemu on every run, so a difference is deliberate and explained;
//! - for `check`, whether vdisk counts the same corruptions and leaks as qemu-img check.
//!
//! Each case runs in a watchdog thread (bounded time) while a counting global allocator
//! records the peak heap use, which must stay below [`MEMORY_LIMIT`]. A panic anywhere in
//! vdisk fails the case. Writes happen on a copy; a refused write must leave the image
//! marked corrupt, after which it opens read-only only.

mod common;

use std::alloc::System;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};
use vdisk_block::{BlockDev, CheckReport, Format, OpenOptions, RepairMode};
use vdisk_qcow2::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

/// Counts heap use so each case's peak can be bounded.
#[global_allocator]
static ALLOCATOR: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Most heap one case may use on top of what was live when it started.
const MEMORY_LIMIT: usize = 64 << 20;
/// Longest one case may take (the images are a few hundred KiB).
const TIME_LIMIT: Duration = Duration::from_secs(20);

/// The tests run one at a time, so the peak measured is the case's own.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a watchdog thread: fails when it panics, takes longer than [`TIME_LIMIT`]
/// or allocates more than [`MEMORY_LIMIT`] at once.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    // The peak is counted from here: bytes allocated since, net of those freed.
    ALLOCATOR.reset_peak_memory();
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let out = f();
        let _ = tx.send(());
        out
    });
    match rx.recv_timeout(TIME_LIMIT) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: vdisk did not finish within {TIME_LIMIT:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
    }
    let out = match handle.join() {
        Ok(out) => out,
        Err(panic) => {
            eprintln!("{what}: vdisk panicked");
            std::panic::resume_unwind(panic)
        }
    };
    let peak = ALLOCATOR.get_peak_memory();
    assert!(
        peak < MEMORY_LIMIT,
        "{what}: peak heap use {peak} bytes (limit {MEMORY_LIMIT})"
    );
    assert!(start.elapsed() < TIME_LIMIT, "{what}: too slow");
    out
}

// ---------------------------------------------------------------------------------------
// Byte helpers: where things are in an image made by qemu-img.

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn set16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
/// The active L1 table.
fn l1(b: &[u8]) -> usize {
    be64(b, 40) as usize
}
/// The L2 table of L1 entry 0.
fn l2(b: &[u8]) -> usize {
    (be64(b, l1(b)) & OFFSET_MASK) as usize
}
/// L2 entry `i` of the first L2 table (standard entries).
fn l2e(b: &[u8], i: usize) -> usize {
    l2(b) + 8 * i
}
/// Extended L2 entry `i` of the first L2 table: the entry, then its bitmap.
fn l2x(b: &[u8], i: usize) -> usize {
    l2(b) + 16 * i
}
/// The refcount table.
fn reftable(b: &[u8]) -> usize {
    be64(b, 48) as usize
}
/// Refcount block 0.
fn refblock(b: &[u8]) -> usize {
    (be64(b, reftable(b)) & !0x1ff) as usize
}
/// Sets the (16-bit) refcount of host cluster `c`.
fn set_refcount(b: &mut [u8], c: usize, v: u16) {
    let at = refblock(b) + 2 * c;
    set16(b, at, v);
}
/// The snapshot table.
fn snaps(b: &[u8]) -> usize {
    be64(b, 64) as usize
}
/// The L1 table of snapshot 0.
fn snap_l1(b: &[u8]) -> usize {
    be64(b, snaps(b)) as usize
}
/// The bitmaps extension's payload in the header.
fn bitmaps_ext(b: &[u8]) -> usize {
    let mut at = 112;
    loop {
        let kind = be32(b, at);
        let len = be32(b, at + 4) as usize;
        assert!(kind != 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.next_multiple_of(8);
    }
}
/// The bitmap directory.
fn bitmap_dir(b: &[u8]) -> usize {
    be64(b, bitmaps_ext(b) + 16) as usize
}
/// The compressed stream of L2 entry 0 (its byte offset).
fn compressed_at(b: &[u8]) -> usize {
    (be64(b, l2e(b, 0)) & ((1 << 54) - 1)) as usize
}
/// Makes L2 entry 0 (a data cluster) point at the cluster holding `target`, in place.
fn point_data_at(b: &mut [u8], target: fn(&[u8]) -> usize) {
    let (at, target) = (l2e(b, 0), target(b));
    set64(b, at, COPIED | (target as u64 & !0xffff));
}

/// Writes `bytes` at `at`, growing the image when they reach past its end.
fn put(b: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if b.len() < at + bytes.len() {
        b.resize(at + bytes.len(), 0);
    }
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = vec![0u8; data.len() + 1024];
    let status = c
        .compress(data, &mut out, flate2::FlushCompress::Finish)
        .expect("deflate");
    assert_eq!(status, flate2::Status::StreamEnd);
    out.truncate(c.total_out() as usize);
    out
}

// ---------------------------------------------------------------------------------------
// The oracle.

/// Runs a program under `timeout`; returns whether it succeeded and what it printed.
fn sh(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new("timeout")
        .arg("30")
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let code = out.status.code();
    assert_ne!(code, Some(124), "{program} {args:?} timed out");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn st(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// What qemu does with a hostile image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Q {
    Ok,
    Fails,
}

/// `qemu-img check`: its corruption and leak counts, or a failure to check at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QCheck {
    Counts(u64, u64),
    Fails,
}

/// `qemu-io -c write` on a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QWrite {
    /// Written; the image is not marked corrupt.
    Ok,
    /// Refused, and the image is now marked corrupt.
    Corrupt,
    /// Refused without marking (or the image does not open read/write).
    Fails,
    /// Not tried.
    Skip,
}

fn q_info(img: &Path) -> Q {
    match sh("qemu-img", &["info", "-f", "qcow2", st(img)]).0 {
        true => Q::Ok,
        false => Q::Fails,
    }
}

fn q_read(img: &Path, (off, len): (u64, u64)) -> Q {
    let cmd = format!("read {off} {len}");
    let (ok, out, err) = sh("qemu-io", &["-r", "-f", "qcow2", "-c", &cmd, st(img)]);
    match ok && !out.contains("failed") && !err.contains("failed") {
        true => Q::Ok,
        false => Q::Fails,
    }
}

fn q_check(img: &Path) -> QCheck {
    let (_, out, _) = sh(
        "qemu-img",
        &["check", "-f", "qcow2", "--output=json", st(img)],
    );
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
        return QCheck::Fails;
    };
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    QCheck::Counts(n("corruptions"), n("leaks"))
}

fn qemu_corrupt_bit(img: &Path) -> bool {
    let (_, out, _) = sh(
        "qemu-img",
        &["info", "-U", "-f", "qcow2", "--output=json", st(img)],
    );
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["format-specific"]["data"]["corrupt"].as_bool())
        .unwrap_or(false)
}

fn q_write(img: &Path, copy: &Path, (off, len): (u64, u64)) -> QWrite {
    std::fs::copy(img, copy).expect("copy");
    let cmd = format!("write -P 7 {off} {len}");
    let (ok, out, err) = sh("qemu-io", &["-f", "qcow2", "-c", &cmd, st(copy)]);
    let wrote = ok && !out.contains("failed") && !err.contains("failed");
    let corrupt = qemu_corrupt_bit(copy);
    let _ = std::fs::remove_file(copy);
    match (wrote, corrupt) {
        (true, false) => QWrite::Ok,
        (_, true) => QWrite::Corrupt,
        (false, false) => QWrite::Fails,
    }
}

// ---------------------------------------------------------------------------------------
// The cases.

/// What a vdisk step must do: succeed, or fail with an error that contains the text.
#[derive(Debug, Clone, Copy)]
enum V {
    Ok,
    Err(&'static str),
}

/// What vdisk's check must report.
#[derive(Debug, Clone, Copy)]
enum VCheck {
    /// The same corruption and leak counts as qemu-img check.
    Qemu,
    /// These counts (qemu differs; the case says why).
    Counts(u64, u64),
    /// Check refuses the image with this text.
    Fails(&'static str),
}

/// What a vdisk write on a copy must do.
#[derive(Debug, Clone, Copy)]
enum VWrite {
    /// The write succeeds and the image stays clean.
    Ok,
    /// The write fails with this text and leaves the image marked corrupt.
    Refused(&'static str),
    /// Not tried.
    Skip,
}

/// The qemu-made images the cases start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    /// 8 MiB, 64 KiB clusters, nothing written: header, reftable, refblock, L1.
    Empty,
    /// `Empty` with guest cluster 0 written (L2 table, then the data cluster).
    Data,
    /// `Data` with snapshot `s1` taken, then cluster 0 rewritten (so the snapshot has its
    /// own L1, L2 and data cluster).
    Snap,
    /// Extended L2 entries, guest cluster 0 written.
    ExtL2,
    /// Guest cluster 0 written compressed (deflate).
    Compressed,
    /// Guest cluster 0 written compressed with zstd.
    Zstd,
    /// An external data file, guest cluster 0 written.
    DataFile,
    /// Two persistent bitmaps, `b0` and `b1`, and guest cluster 0 written.
    Bitmaps,
}

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    base: Base,
    mutate: fn(&mut Vec<u8>),
    /// The guest range read and written.
    io: (u64, u64),
    /// Read-only open.
    open: V,
    /// `qcow2_info` (what `info` prints: snapshots, bitmaps).
    info: V,
    read: V,
    check: VCheck,
    write: VWrite,
    q_info: Q,
    q_read: Q,
    q_check: QCheck,
    q_write: QWrite,
    /// The byte every guest byte of `io` must read as, in vdisk and in qemu.
    content: Option<u8>,
}

const CASE: Case = Case {
    name: "",
    base: Base::Data,
    mutate: |_| {},
    io: (0, 65536),
    open: V::Ok,
    info: V::Ok,
    read: V::Ok,
    check: VCheck::Qemu,
    write: VWrite::Skip,
    q_info: Q::Ok,
    q_read: Q::Ok,
    q_check: QCheck::Counts(0, 0),
    q_write: QWrite::Skip,
    content: None,
};

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..options()
    }
}

fn incompat(path: &Path) -> u64 {
    be64(&std::fs::read(path).expect("read"), 72)
}

fn expect(what: &str, got: vdisk_block::Result<()>, want: V) {
    match (want, got) {
        (V::Ok, Ok(())) => {}
        (V::Ok, Err(e)) => panic!("{what}: expected success, got: {e}"),
        (V::Err(needle), Ok(())) => panic!("{what}: expected an error with '{needle}'"),
        (V::Err(needle), Err(e)) => assert!(
            e.to_string().contains(needle),
            "{what}: error '{e}' does not mention '{needle}'"
        ),
    }
}

/// Everything vdisk does with the image; returns its check report (or error text).
fn vdisk_side(c: Case, img: PathBuf, copy: PathBuf) -> Result<CheckReport, String> {
    let name = c.name;
    let opened = Qcow2Image::open(&img, &options());
    match (c.open, opened) {
        (V::Err(_), got) => {
            expect(&format!("{name}: open"), got.map(|_| ()), c.open);
            let rw_open = Qcow2Image::open(&img, &rw()).map(|_| ());
            expect(&format!("{name}: read/write open"), rw_open, c.open);
        }
        (V::Ok, Err(e)) => panic!("{name}: open failed: {e}"),
        (V::Ok, Ok(dev)) => {
            expect(
                &format!("{name}: info"),
                dev.qcow2_info().map(|_| ()),
                c.info,
            );
            dev.info()
                .unwrap_or_else(|e| panic!("{name}: basic info: {e}"));
            let mut buf = vec![0u8; c.io.1 as usize];
            let read = dev.read_at(&mut buf, c.io.0);
            if let Err(e) = &read {
                assert_eq!(
                    e.kind(),
                    vdisk_block::ErrorKind::Corrupt,
                    "{name}: read error kind: {e}"
                );
            }
            expect(&format!("{name}: read"), read, c.read);
            if let Some(p) = c.content {
                assert!(buf.iter().all(|&x| x == p), "{name}: guest data differs");
            }
            // Block status meets the same entries; it must not panic either way.
            let _ = dev.block_status(c.io.0, c.io.1);
        }
    }
    let report = Qcow2Format
        .check(&img, &options(), RepairMode::None)
        .map_err(|e| e.to_string());
    // A full repair may fail on damage it cannot mend, but must not panic, hang or
    // allocate without bound either; what it leaves must check without new corruptions.
    std::fs::copy(&img, &copy).expect("copy");
    if let Ok(after) = Qcow2Format.check(&copy, &options(), RepairMode::All) {
        eprintln!(
            "{name}: repair leaves {} corruptions, {} leaks",
            after.corruptions, after.leaks
        );
    }
    let _ = std::fs::remove_file(&copy);
    match c.write {
        VWrite::Skip => {}
        want => {
            std::fs::copy(&img, &copy).expect("copy");
            let result = Qcow2Image::open(&copy, &rw()).and_then(|dev| {
                let written = dev.write_at(&vec![7u8; c.io.1 as usize], c.io.0);
                written.and_then(|()| dev.flush())
            });
            match want {
                VWrite::Ok => {
                    result.unwrap_or_else(|e| panic!("{name}: write failed: {e}"));
                    assert_eq!(incompat(&copy) & 2, 0, "{name}: marked corrupt");
                }
                VWrite::Refused(needle) => {
                    let e = result.expect_err(name);
                    assert!(
                        e.to_string().contains(needle),
                        "{name}: write error '{e}' does not mention '{needle}'"
                    );
                }
                VWrite::Skip => unreachable!(),
            }
            if let VWrite::Refused(_) = want {
                // Nothing of the refused write reached the file, metadata or elsewhere.
                let after = std::fs::read(&copy).expect("read copy");
                assert!(
                    !after.chunks(512).any(|s| s.iter().all(|&x| x == 7)),
                    "{name}: the refused write's data is in the image"
                );
                assert_ne!(incompat(&copy) & 2, 0, "{name}: not marked corrupt");
                let again = Qcow2Image::open(&copy, &rw()).expect_err("corrupt image opened rw");
                assert!(again.to_string().contains("corrupt"), "{name}: {again}");
                Qcow2Image::open(&copy, &options())
                    .unwrap_or_else(|e| panic!("{name}: read-only open after marking: {e}"));
            }
            let _ = std::fs::remove_file(&copy);
        }
    }
    report
}

/// Runs one case through vdisk (bounded) and qemu, asserting both sides.
fn run_case(s: &Scratch, bases: &Bases, c: Case) {
    let name = c.name;
    let mut bytes = bases.bytes(c.base).to_vec();
    (c.mutate)(&mut bytes);
    let img = s.path(&format!("{}.qcow2", name.replace(' ', "_")));
    let copy = s.path(&format!("{}-w.qcow2", name.replace(' ', "_")));
    std::fs::write(&img, &bytes).expect("write image");
    let (i, cp) = (img.clone(), copy.clone());
    let report = bounded(name, move || vdisk_side(c, i, cp));

    let qemu = (
        q_info(&img),
        q_read(&img, c.io),
        q_check(&img),
        match c.q_write {
            QWrite::Skip => QWrite::Skip,
            _ => q_write(&img, &copy, c.io),
        },
    );
    if let Some(p) = c.content {
        let cmd = format!("read -P {p} {} {}", c.io.0, c.io.1);
        let (ok, out, _) = sh("qemu-io", &["-r", "-f", "qcow2", "-c", &cmd, st(&img)]);
        assert!(
            ok && !out.contains("failed") && !out.contains("differs"),
            "{name}: qemu reads {out}"
        );
    }
    assert_eq!(
        qemu,
        (c.q_info, c.q_read, c.q_check, c.q_write),
        "{name}: qemu (info, read, check, write)"
    );
    if let VCheck::Fails(needle) = c.check {
        let e = report.expect_err(name);
        assert!(
            e.contains(needle),
            "{name}: check error '{e}' does not mention '{needle}'"
        );
        std::fs::remove_file(&img).expect("remove");
        return;
    }
    let report = report.unwrap_or_else(|e| panic!("{name}: vdisk check failed: {e}"));
    let ours = (report.corruptions, report.leaks);
    let want = match (c.check, c.q_check) {
        (VCheck::Qemu, QCheck::Counts(a, b)) => (a, b),
        (VCheck::Qemu, QCheck::Fails) => panic!("{name}: qemu-img check fails"),
        (VCheck::Counts(a, b), _) => (a, b),
        (VCheck::Fails(_), _) => unreachable!(),
    };
    assert_eq!(ours, want, "{name}: vdisk check {:?}", report.messages);
    std::fs::remove_file(&img).expect("remove");
}

/// The base images, made once per test.
struct Bases(Vec<(Base, Vec<u8>)>);

impl Bases {
    fn bytes(&self, base: Base) -> &[u8] {
        &self
            .0
            .iter()
            .find(|(b, _)| *b == base)
            .unwrap_or_else(|| panic!("base {base:?} not made"))
            .1
    }

    fn make(s: &Scratch, which: &[Base]) -> Bases {
        let mut out = Vec::new();
        for &base in which {
            let img = s.path(&format!("base-{base:?}.qcow2"));
            let p = st(&img).to_string();
            let create = |opts: &str| {
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                if !opts.is_empty() {
                    args.extend(["-o", opts]);
                }
                args.extend([p.as_str(), "8M"]);
                qemu_img(&args);
            };
            match base {
                Base::Empty | Base::Data | Base::Snap | Base::Bitmaps => create(""),
                Base::ExtL2 => create("extended_l2=on"),
                Base::Compressed => create(""),
                Base::Zstd => create("compression_type=zstd"),
                Base::DataFile => {
                    let data = s.path("data.raw");
                    create(&format!("data_file={}", st(&data)));
                }
            }
            match base {
                Base::Empty => {}
                Base::Compressed | Base::Zstd => qemu_io(&img, &["write -c -P 1 0 64k"]),
                _ => qemu_io(&img, &["write -P 1 0 64k"]),
            }
            if base == Base::Snap {
                qemu_img(&["snapshot", "-c", "s1", &p]);
                qemu_io(&img, &["write -P 2 0 64k"]);
            }
            if base == Base::Bitmaps {
                qemu_img(&["bitmap", "--add", &p, "b0"]);
                qemu_img(&["bitmap", "--add", &p, "b1"]);
            }
            out.push((base, std::fs::read(&img).expect("read base")));
        }
        Bases(out)
    }
}

fn run_all(label: &str, which: &[Base], cases: &[Case]) {
    let _serial = serial();
    let s = Scratch::new(label);
    let bases = Bases::make(&s, which);
    let start = Instant::now();
    let mut failed = Vec::new();
    for &c in cases {
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&s, &bases, c)));
        if run.is_err() {
            failed.push(c.name);
        }
    }
    eprintln!("{label}: {} cases in {:?}", cases.len(), start.elapsed());
    assert!(failed.is_empty(), "{label}: failed cases {failed:?}");
}

// ---------------------------------------------------------------------------------------
// Class 4: the refcount table.

#[test]
fn class4_refcount_table() {
    run_all(
        "rc",
        &[Base::Data, Base::Empty],
        &[
            // Header-level bounds (header.rs covers more variants of the messages).
            Case {
                name: "reftable too large",
                mutate: |b| set32(b, 56, 0x1000),
                open: V::Err("Reference count table too large"),
                check: VCheck::Fails("Reference count table too large"),
                q_info: Q::Fails,
                q_read: Q::Fails,
                q_check: QCheck::Fails,
                ..CASE
            },
            Case {
                name: "reftable unaligned",
                mutate: |b| set64(b, 48, 0x10008),
                open: V::Err("not cluster aligned"),
                check: VCheck::Fails("not cluster aligned"),
                q_info: Q::Fails,
                q_read: Q::Fails,
                q_check: QCheck::Fails,
                ..CASE
            },
            Case {
                name: "reftable offset overflows",
                mutate: |b| set64(b, 48, 0xffff_ffff_ffff_0000),
                open: V::Err("Reference count table offset invalid"),
                check: VCheck::Fails("Reference count table offset invalid"),
                q_info: Q::Fails,
                q_read: Q::Fails,
                q_check: QCheck::Fails,
                ..CASE
            },
            Case {
                name: "reftable empty",
                mutate: |b| set32(b, 56, 0),
                open: V::Err("does not contain a reference count table"),
                check: VCheck::Fails("does not contain a reference count table"),
                q_info: Q::Fails,
                q_read: Q::Fails,
                // qemu-img check still counts every used cluster as unreferenced; vdisk
                // refuses the header as every open does.
                q_check: QCheck::Counts(6, 0),
                ..CASE
            },
            // A refblock "at offset 0" is a missing one: every refcount it covers reads 0.
            // Reads never need refcounts; check sees every used cluster unreferenced; the
            // first allocation would hand out the refcount table's own cluster, which the
            // overlap guard refuses (qemu's guard trips on it too).
            Case {
                name: "refblock at offset 0",
                mutate: |b| {
                    let at = reftable(b);
                    set64(b, at, 0)
                },
                io: (65536, 65536),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(7, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // Inside the header (an unaligned offset in cluster 0): check cannot read the
            // refcounts (check errors, not corruptions, in both), a write fails on it.
            Case {
                name: "refblock inside the header",
                mutate: |b| {
                    let at = reftable(b);
                    set64(b, at, 0x200)
                },
                io: (65536, 65536),
                write: VWrite::Refused("malformed"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // Past the end of the file a refblock reads as zeroes, as in qemu.
            Case {
                name: "refblock past eof",
                mutate: |b| {
                    let at = reftable(b);
                    set64(b, at, 1 << 40)
                },
                io: (65536, 65536),
                write: VWrite::Refused("past the end of the file"),
                q_check: QCheck::Counts(8, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // qemu ignores the reserved bits when it uses the entry, so its write
            // succeeds; vdisk refuses to update refcounts through a malformed table entry
            // (and marks the image corrupt); check counts the same in both.
            Case {
                name: "reftable entry reserved bits",
                mutate: |b| {
                    let at = reftable(b);
                    let v = be64(b, at) | 1;
                    set64(b, at, v)
                },
                io: (65536, 65536),
                write: VWrite::Refused("malformed"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Ok,
                ..CASE
            },
            // A refblock that does not describe itself: its cluster looks free, so the
            // next allocation (here the first L2 table) would land on it.
            Case {
                name: "refblock without its own refcount",
                base: Base::Empty,
                mutate: |b| set_refcount(b, 2, 0),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "refblock without its own refcount, data",
                mutate: |b| set_refcount(b, 2, 0),
                io: (65536, 65536),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Class 5: the snapshot table. A read-only open does not read it (reads of the active
// layer never need it), so vdisk refuses a bad table where it is used: `info`, `check`,
// snapshot commands and read/write opens. qemu reads it at every open.

#[test]
fn class5_snapshots() {
    run_all(
        "snap",
        &[Base::Snap],
        &[
            Case {
                name: "too many snapshots",
                base: Base::Snap,
                mutate: |b| set32(b, 60, 100_000),
                open: V::Err("Too many snapshots"),
                check: VCheck::Fails("Too many snapshots"),
                q_info: Q::Fails,
                q_read: Q::Fails,
                q_check: QCheck::Fails,
                ..CASE
            },
            // qemu refuses even to check it; vdisk's check counts the table as one
            // corruption (so the snapshot's clusters show as leaks).
            Case {
                name: "snapshot extra data too large",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b) + 36;
                    set32(b, at, 1025)
                },
                info: V::Err("Too much extra metadata"),
                check: VCheck::Counts(1, 4),
                q_info: Q::Fails,
                q_read: Q::Fails,
                q_check: QCheck::Fails,
                ..CASE
            },
            // The id runs 64 KiB past the table, over the active L2 table: both read the
            // garbage id, and check finds the L2 cluster referenced twice.
            Case {
                name: "snapshot id past the table",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b) + 12;
                    set16(b, at, 0xffff)
                },
                q_check: QCheck::Counts(1, 0),
                ..CASE
            },
            // Entry 1 is the zeroes after the table: a version 3 entry without the
            // required 16 bytes of extra data ("incomplete" in qemu's check).
            Case {
                name: "snapshot count beyond the table",
                base: Base::Snap,
                mutate: |b| set32(b, 60, 2),
                q_check: QCheck::Counts(1, 0),
                ..CASE
            },
            Case {
                name: "snapshot extra data too small",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b) + 36;
                    set32(b, at, 8)
                },
                q_check: QCheck::Counts(1, 0),
                ..CASE
            },
            // vdisk refuses to list a snapshot whose L1 table it could never use; qemu
            // lists it. Both checks report the entry once, skip it and so leak its L1, L2
            // and data clusters.
            Case {
                name: "snapshot L1 unaligned",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b);
                    let v = be64(b, at) + 0x200;
                    set64(b, at, v)
                },
                info: V::Err("Snapshot L1 table offset invalid"),
                q_check: QCheck::Counts(1, 3),
                ..CASE
            },
            Case {
                name: "snapshot L1 too large",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b) + 8;
                    set32(b, at, 0x1000_0000)
                },
                info: V::Err("Snapshot L1 table too large"),
                q_check: QCheck::Counts(1, 3),
                ..CASE
            },
            Case {
                name: "snapshot L1 past eof",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b);
                    set64(b, at, 1 << 40)
                },
                q_check: QCheck::Counts(1, 3),
                ..CASE
            },
            Case {
                name: "snapshot L1 past 2^56",
                base: Base::Snap,
                mutate: |b| {
                    let at = snaps(b);
                    set64(b, at, 1 << 56)
                },
                info: V::Err("Snapshot L1 table offset invalid"),
                q_check: QCheck::Counts(1, 3),
                ..CASE
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Class 6: L2 entries and the data they point to. Damage is met by the read or write
// that uses the entry; a read-only image is left alone, a read/write one is marked
// corrupt (qemu's qcow2_signal_corruption).

#[test]
fn class6_l2_and_data() {
    run_all(
        "l2",
        &[
            Base::Data,
            Base::DataFile,
            Base::ExtL2,
            Base::Compressed,
            Base::Zstd,
        ],
        &[
            Case {
                name: "L1 entry unaligned",
                mutate: |b| {
                    let at = l1(b);
                    let v = be64(b, at) + 0x200;
                    set64(b, at, v)
                },
                read: V::Err("unaligned"),
                write: VWrite::Refused("unaligned"),
                q_read: Q::Fails,
                // qemu's check reads an L2 table at the unaligned offset anyway and counts
                // every garbage entry of it; vdisk reports the L1 entry and skips the
                // table, leaking the real L2 table and its data cluster.
                check: VCheck::Counts(1, 2),
                q_check: QCheck::Counts(129, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // qemu masks reserved bits away when it uses an entry and only check reports
            // them; vdisk treats them as corruption (its check counts like qemu's).
            Case {
                name: "L1 entry reserved bits",
                mutate: |b| {
                    let at = l1(b);
                    let v = be64(b, at) | 1 << 57;
                    set64(b, at, v)
                },
                read: V::Err("reserved bits"),
                write: VWrite::Refused("reserved bits"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Ok,
                ..CASE
            },
            // qemu reads an L2 table past the end of the file as zeroes (a short read of
            // the host file): the clusters it maps read as unallocated. vdisk reads it so on
            // a read-only open; a writable one refuses, since a new cluster allocated there
            // would hold both the table and guest data.
            Case {
                name: "L1 entry past eof",
                mutate: |b| {
                    let at = l1(b);
                    set64(b, at, COPIED | 1 << 40)
                },
                content: Some(0),
                write: VWrite::Refused("past the end of the image file"),
                q_check: QCheck::Counts(2, 2),
                ..CASE
            },
            Case {
                name: "L2 entry unaligned",
                mutate: |b| {
                    let at = l2e(b, 0);
                    let v = be64(b, at) + 0x200;
                    set64(b, at, v)
                },
                read: V::Err("unaligned"),
                write: VWrite::Refused("unaligned"),
                q_read: Q::Fails,
                q_check: QCheck::Counts(2, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "preallocated zero cluster unaligned",
                mutate: |b| {
                    let at = l2e(b, 0);
                    let v = (be64(b, at) + 0x200) | ZERO;
                    set64(b, at, v)
                },
                read: V::Err("unaligned"),
                write: VWrite::Refused("unaligned"),
                q_read: Q::Fails,
                q_check: QCheck::Counts(2, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // Host offsets of 2^56 and more can only be spelt with reserved bits.
            Case {
                name: "L2 entry past 2^56",
                mutate: |b| {
                    let at = l2e(b, 0);
                    let v = be64(b, at) | 1 << 56;
                    set64(b, at, v)
                },
                read: V::Err("reserved bits"),
                write: VWrite::Refused("reserved bits"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Ok,
                ..CASE
            },
            Case {
                name: "L2 entry reserved bits",
                mutate: |b| {
                    let at = l2e(b, 0);
                    let v = be64(b, at) | 2;
                    set64(b, at, v)
                },
                read: V::Err("reserved bits"),
                write: VWrite::Refused("reserved bits"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Ok,
                ..CASE
            },
            // Far past the end of the file: both read zeroes there (a short read of the
            // host file), and only check reports it. No write: it would make a 1 TiB
            // sparse file, in qemu as in vdisk.
            Case {
                name: "L2 entry far past eof",
                mutate: |b| {
                    let at = l2e(b, 0);
                    set64(b, at, COPIED | 1 << 40)
                },
                content: Some(0),
                q_check: QCheck::Counts(2, 1),
                ..CASE
            },
            Case {
                name: "compressed cluster with a data file",
                base: Base::DataFile,
                mutate: |b| {
                    let at = l2e(b, 0);
                    set64(b, at, COMPRESSED | 0x50000)
                },
                read: V::Err("external data file"),
                // qemu's whole-cluster write replaces the entry without decoding it;
                // vdisk decodes every entry it replaces, and refuses this one.
                write: VWrite::Refused("external data file"),
                q_read: Q::Fails,
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Ok,
                ..CASE
            },
            Case {
                name: "subcluster allocated and zero",
                base: Base::ExtL2,
                mutate: |b| {
                    let at = l2x(b, 0) + 8;
                    set64(b, at, 1 | 1 << 32)
                },
                read: V::Err("both allocated and zero"),
                write: VWrite::Refused("both allocated and zero"),
                q_read: Q::Fails,
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "subcluster allocated without a cluster",
                base: Base::ExtL2,
                mutate: |b| {
                    let at = l2x(b, 1);
                    set64(b, at, 0);
                    set64(b, at + 8, 1);
                },
                io: (65536, 65536),
                read: V::Err("allocated in an unallocated cluster"),
                write: VWrite::Refused("allocated in an unallocated cluster"),
                q_read: Q::Fails,
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // The sector count reaches 128 KiB past the stream: the bytes past the end of
            // the file read as zeroes and the stream still decompresses, in both; check
            // reports the reference past the end of the file.
            Case {
                name: "compressed sectors past eof",
                base: Base::Compressed,
                mutate: |b| {
                    let at = l2e(b, 0);
                    let v = be64(b, at) | 0xff << 54;
                    set64(b, at, v)
                },
                content: Some(1),
                q_check: QCheck::Counts(1, 1),
                ..CASE
            },
            Case {
                name: "compressed offset past eof",
                base: Base::Compressed,
                mutate: |b| {
                    let at = l2e(b, 0);
                    set64(b, at, COMPRESSED | 1 << 40)
                },
                read: V::Err("does not decompress"),
                q_read: Q::Fails,
                q_check: QCheck::Counts(1, 1),
                ..CASE
            },
            // A stored block of 100 bytes: less than one cluster, an I/O error.
            Case {
                name: "compressed stream too short",
                base: Base::Compressed,
                mutate: |b| {
                    let at = compressed_at(b);
                    let mut stream = vec![0x01, 100, 0, !100, 0xff];
                    stream.extend([9u8; 100]);
                    put(b, at, &stream);
                },
                read: V::Err("yields"),
                q_read: Q::Fails,
                ..CASE
            },
            // A stream of two clusters: decompression stops after one, in both.
            Case {
                name: "compressed stream too long",
                base: Base::Compressed,
                mutate: |b| {
                    let at = compressed_at(b);
                    put(b, at, &raw_deflate(&[0x5a; 2 << 16]));
                },
                content: Some(0x5a),
                ..CASE
            },
            Case {
                name: "compressed garbage",
                base: Base::Compressed,
                mutate: |b| {
                    let at = compressed_at(b);
                    put(b, at, &[0xff; 256]);
                },
                read: V::Err("does not decompress"),
                q_read: Q::Fails,
                ..CASE
            },
            // A zstd frame that declares a 2 TiB window and an endless content size: it
            // must fail without reserving the window.
            Case {
                name: "zstd frame with a huge window",
                base: Base::Zstd,
                mutate: |b| {
                    let at = compressed_at(b);
                    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xc0, 0xf8];
                    frame.extend(u64::MAX.to_le_bytes());
                    // One RLE block of 100 bytes, not the last.
                    frame.extend([(100 << 3 | 1 << 1) as u8, 0, 0, 0x33]);
                    put(b, at, &frame);
                },
                read: V::Err("does not decompress"),
                q_read: Q::Fails,
                ..CASE
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Class 7: a data cluster or an L2 table on top of other metadata. Reads return the
// metadata's bytes (qemu does not check reads either); a write there is refused and
// marks the image corrupt; check finds the cluster referenced twice.

#[test]
fn class7_overlapping_metadata() {
    run_all(
        "overlap",
        &[Base::Data, Base::Empty, Base::Snap, Base::Bitmaps],
        &[
            Case {
                name: "data on the L1 table",
                mutate: |b| point_data_at(b, l1),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "data on the refcount table",
                mutate: |b| point_data_at(b, reftable),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "data on the refcount block",
                mutate: |b| point_data_at(b, refblock),
                write: VWrite::Refused("overwrite metadata"),
                // Referenced twice, and now not COPIED-consistent.
                q_check: QCheck::Counts(2, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "data on its own L2 table",
                mutate: |b| point_data_at(b, l2),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "data on the snapshot table",
                base: Base::Snap,
                mutate: |b| point_data_at(b, snaps),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "data on the snapshot L1 table",
                base: Base::Snap,
                mutate: |b| point_data_at(b, snap_l1),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // qemu's default overlap check ("cached") leaves inactive L2 tables out, so
            // qemu writes guest data over the snapshot's L2 table; vdisk refuses.
            Case {
                name: "data on the snapshot L2 table",
                base: Base::Snap,
                mutate: |b| point_data_at(b, |b| (be64(b, snap_l1(b)) & OFFSET_MASK) as usize),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Ok,
                ..CASE
            },
            // qemu writes guest data over the bitmap directory; vdisk refuses.
            Case {
                name: "data on the bitmap directory",
                base: Base::Bitmaps,
                mutate: |b| point_data_at(b, bitmap_dir),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 1),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // No L2 entry can name the header (offset 0 means unallocated), but a zero
            // refcount can offer it for allocation: qemu then trips its overlap check;
            // vdisk never allocates cluster 0, so the write goes elsewhere.
            Case {
                name: "header without a refcount",
                mutate: |b| set_refcount(b, 0, 0),
                io: (65536, 65536),
                write: VWrite::Ok,
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // An L2 table that is really the refcount table (or the L1 table): the write
            // would change an entry of that table.
            Case {
                name: "L2 table on the refcount table",
                mutate: |b| {
                    let at = l1(b);
                    let v = COPIED | reftable(b) as u64;
                    set64(b, at, v)
                },
                io: (65536, 65536),
                write: VWrite::Refused("metadata"),
                q_check: QCheck::Counts(4, 2),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            Case {
                name: "L2 table on the L1 table",
                mutate: |b| {
                    let at = l1(b);
                    let v = COPIED | l1(b) as u64;
                    set64(b, at, v)
                },
                io: (65536, 65536),
                write: VWrite::Refused("metadata"),
                q_check: QCheck::Counts(1, 2),
                q_write: QWrite::Corrupt,
                ..CASE
            },
            // The L1 table's cluster looks free: the first new L2 table would land on it.
            Case {
                name: "new L2 table on the L1 table",
                base: Base::Empty,
                mutate: |b| set_refcount(b, 3, 0),
                write: VWrite::Refused("overwrite metadata"),
                q_check: QCheck::Counts(1, 0),
                q_write: QWrite::Corrupt,
                ..CASE
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Class 8: the bitmap directory. Like the snapshot table it is read by `info` (and by
// check and read/write opens), not by a read-only open; qemu reads it at every open.

const BITMAP: Case = Case {
    base: Base::Bitmaps,
    info: V::Err("bitmap"),
    check: VCheck::Fails("bitmap"),
    q_info: Q::Fails,
    q_read: Q::Fails,
    q_check: QCheck::Fails,
    ..CASE
};

#[test]
fn class8_bitmaps() {
    run_all(
        "bitmaps",
        &[Base::Bitmaps],
        &[
            Case {
                name: "bitmap directory past eof",
                mutate: |b| {
                    let at = bitmaps_ext(b) + 16;
                    set64(b, at, 1 << 40)
                },
                info: V::Err("past the end of the file"),
                ..BITMAP
            },
            Case {
                name: "bitmap directory unaligned",
                mutate: |b| {
                    let at = bitmaps_ext(b) + 16;
                    let v = be64(b, at) + 0x200;
                    set64(b, at, v)
                },
                open: V::Err("Bitmap directory offset invalid"),
                check: VCheck::Fails("Bitmap directory offset invalid"),
                ..BITMAP
            },
            Case {
                name: "bitmap directory too large",
                mutate: |b| {
                    let at = bitmaps_ext(b) + 8;
                    set64(b, at, 65 << 20)
                },
                open: V::Err("Bitmap directory too large"),
                check: VCheck::Fails("Bitmap directory too large"),
                ..BITMAP
            },
            Case {
                name: "more bitmaps than the header says",
                mutate: |b| {
                    let at = bitmaps_ext(b);
                    set32(b, at, 1)
                },
                info: V::Err("2 bitmaps found, the header says 1"),
                ..BITMAP
            },
            Case {
                name: "fewer bitmaps than the header says",
                mutate: |b| {
                    let at = bitmaps_ext(b);
                    set32(b, at, 3)
                },
                info: V::Err("the header says 3"),
                ..BITMAP
            },
            Case {
                name: "bitmap name empty",
                mutate: |b| {
                    let at = bitmap_dir(b) + 18;
                    set16(b, at, 0)
                },
                info: V::Err("name length 0"),
                ..BITMAP
            },
            Case {
                name: "bitmap name too long",
                mutate: |b| {
                    let at = bitmap_dir(b) + 18;
                    set16(b, at, 1024)
                },
                ..BITMAP
            },
            Case {
                name: "duplicate bitmap names",
                mutate: |b| {
                    let at = bitmap_dir(b) + 32 + 24 + 1;
                    b[at] = b'0';
                },
                info: V::Err("duplicate bitmap name"),
                ..BITMAP
            },
            Case {
                name: "bitmap granularity 2^8",
                mutate: |b| {
                    let at = bitmap_dir(b) + 17;
                    b[at] = 8;
                },
                info: V::Err("granularity"),
                ..BITMAP
            },
            Case {
                name: "bitmap granularity 2^32",
                mutate: |b| {
                    let at = bitmap_dir(b) + 17;
                    b[at] = 32;
                },
                info: V::Err("granularity"),
                ..BITMAP
            },
            Case {
                name: "bitmap table size wrong",
                mutate: |b| {
                    let at = bitmap_dir(b) + 8;
                    let v = be32(b, at) + 1;
                    set32(b, at, v)
                },
                info: V::Err("table size"),
                ..BITMAP
            },
            Case {
                name: "bitmap flag unknown",
                mutate: |b| {
                    let at = bitmap_dir(b) + 12;
                    let v = be32(b, at) | 8;
                    set32(b, at, v)
                },
                info: V::Err("unknown bits"),
                ..BITMAP
            },
            Case {
                name: "bitmap type unknown",
                mutate: |b| {
                    let at = bitmap_dir(b) + 16;
                    b[at] = 2;
                },
                info: V::Err("type 2"),
                ..BITMAP
            },
            Case {
                name: "bitmap extra data",
                mutate: |b| {
                    let at = bitmap_dir(b) + 20;
                    set32(b, at, 8)
                },
                info: V::Err("extra data"),
                ..BITMAP
            },
            // An in-use bitmap (not saved cleanly) is listed as such and is otherwise
            // harmless to readers; writers must not trust it (vdisk refuses read/write
            // opens of images with bitmaps in any case).
            Case {
                name: "bitmap in use",
                mutate: |b| {
                    let at = bitmap_dir(b) + 12;
                    let v = be32(b, at) | 1;
                    set32(b, at, v)
                },
                info: V::Ok,
                check: VCheck::Qemu,
                // Written as qemu does: the in-use bitmap stays as it is, inconsistent.
                write: VWrite::Ok,
                q_info: Q::Ok,
                q_read: Q::Ok,
                q_check: QCheck::Counts(0, 0),
                q_write: QWrite::Ok,
                ..BITMAP
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Class 9: external references. `info` must never open a backing file (vdisk's info opens
// with `no_backing`, as qemu-img info uses BDRV_O_NO_BACKING) nor need the data file;
// protocol and `json:` names are never followed; a FIFO or device is never opened, because
// opening a FIFO blocks (qemu-io hangs on both images below).

/// `qemu-io -r -c read` with a short timeout: `None` when it hangs.
fn q_read_within(img: &Path, cmd: &str, secs: &str) -> Option<bool> {
    let out = std::process::Command::new("timeout")
        .args([secs, "qemu-io", "-r", "-f", "qcow2", "-c", cmd, st(img)])
        .output()
        .expect("run qemu-io");
    if out.status.code() == Some(124) {
        return None;
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Some(out.status.success() && !text.contains("failed") && !text.contains("Pattern"))
}

/// The options `vdisk info` opens an image with.
fn info_options() -> OpenOptions {
    OpenOptions {
        no_backing: true,
        ..options()
    }
}

fn mkfifo(path: &Path) {
    let (ok, _, err) = sh("mkfifo", &[st(path)]);
    assert!(ok, "mkfifo: {err}");
}

/// Creates `name` (1 MiB) with `opts`, `-u` so qemu-img does not open the backing file.
/// A 1M qcow2 at `img` with an external data file at `data`, written by qemu-io, whose data
/// file is then deleted (the cases put something else, or nothing, in its place).
fn written_then_data_file_removed(img: &Path, data: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", st(data)),
        st(img),
        "1M",
    ]);
    qemu_io(img, &["write -P 1 0 64k"]);
    std::fs::remove_file(data).expect("remove data file");
}

fn create_unsafe(s: &Scratch, name: &str, opts: &[&str]) -> PathBuf {
    let img = s.path(name);
    let mut args = vec!["create", "-q", "-f", "qcow2", "-u"];
    args.extend(opts);
    args.extend([st(&img), "1M"]);
    qemu_img(&args);
    img
}

#[test]
fn class9_external_references() {
    let _serial = serial();
    let s = Scratch::new("external");
    let other = Scratch::new("elsewhere");
    let secret = other.path("secret.raw");
    std::fs::write(&secret, vec![b'S'; 1 << 20]).expect("secret");
    let fifo = s.path("fifo");
    mkfifo(&fifo);

    // A backing file that is a FIFO.
    let img = create_unsafe(&s, "fifo-backing.qcow2", &["-b", st(&fifo), "-F", "raw"]);
    assert!(q_info(&img) == Q::Ok, "qemu-img info opens no backing file");
    assert_eq!(
        q_read_within(&img, "read 0 512", "3"),
        None,
        "qemu-io hangs"
    );
    let (i, f) = (img.clone(), fifo.clone());
    bounded("fifo backing", move || {
        let dev = Qcow2Image::open(&i, &info_options()).expect("info open");
        let info = dev.info().expect("info");
        assert_eq!(info.backing_filename.as_deref(), f.to_str());
        dev.qcow2_info().expect("format-specific info");
        let err = Qcow2Image::open(&i, &options()).expect_err("a FIFO backing file");
        assert!(err.to_string().contains("FIFO"), "{err}");
    });

    // An external data file that is a FIFO: info works, reads fail instead of hanging.
    let data = s.path("fifo-data.raw");
    let img = s.path("fifo-data.qcow2");
    written_then_data_file_removed(&img, &data);
    mkfifo(&data);
    assert!(q_info(&img) == Q::Ok, "qemu-img info opens no data file");
    assert_eq!(
        q_read_within(&img, "read 0 512", "3"),
        None,
        "qemu-io hangs"
    );
    let (i, d) = (img.clone(), data.clone());
    bounded("fifo data file", move || {
        for opts in [info_options(), options()] {
            let dev = Qcow2Image::open(&i, &opts).expect("open");
            let q = dev.qcow2_info().expect("format-specific info");
            assert_eq!(q.data_file.as_deref(), d.to_str());
            let mut buf = [0u8; 512];
            let err = dev.read_at(&mut buf, 0).expect_err("read through a FIFO");
            assert!(err.to_string().contains("FIFO"), "{err}");
        }
    });

    // A data file that does not exist: info neither opens it nor needs it (as in
    // qemu-img info); the first read of guest data tries, and fails naming it. An open
    // for I/O opens it at once and fails there, as qemu's does.
    let data = s.path("gone.raw");
    let img = s.path("gone-data.qcow2");
    written_then_data_file_removed(&img, &data);
    assert!(q_info(&img) == Q::Ok, "qemu-img info needs no data file");
    assert_eq!(q_read_within(&img, "read 0 512", "10"), Some(false));
    let (i, d) = (img.clone(), data.clone());
    bounded("missing data file", move || {
        let dev = Qcow2Image::open(&i, &info_options()).expect("info open");
        let q = dev.qcow2_info().expect("format-specific info");
        assert_eq!(q.data_file.as_deref(), d.to_str());
        dev.info().expect("info");
        let mut buf = [0u8; 512];
        let err = dev.read_at(&mut buf, 0).expect_err("no data file");
        assert!(
            err.to_string()
                .contains("cannot open the external data file"),
            "{err}"
        );
        Qcow2Image::open(&i, &options()).expect_err("an I/O open needs the data file");
    });

    // A json: backing file name: qemu follows it (and reads the other file's bytes),
    // vdisk never does, whatever the policy.
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}"#,
        st(&secret)
    );
    let img = create_unsafe(&s, "json-backing.qcow2", &["-b", &json, "-F", "raw"]);
    assert!(q_info(&img) == Q::Ok);
    assert_eq!(
        q_read_within(&img, "read -P 0x53 0 512", "10"),
        Some(true),
        "qemu follows json: backing names"
    );
    let (i, j) = (img.clone(), json.clone());
    bounded("json backing", move || {
        let dev = Qcow2Image::open(&i, &info_options()).expect("info open");
        assert_eq!(dev.info().expect("info").backing_filename, Some(j));
        for policy in [
            vdisk_block::FollowPolicy::SameFolder,
            vdisk_block::FollowPolicy::Anything,
        ] {
            let opts = OpenOptions {
                policy,
                ..options()
            };
            let err = Qcow2Image::open(&i, &opts).expect_err("json: backing");
            assert!(err.to_string().contains("json: name"), "{err}");
        }
    });

    // A protocol backing name.
    let img = create_unsafe(
        &s,
        "nbd-backing.qcow2",
        &["-b", "nbd://127.0.0.1:1/x", "-F", "raw"],
    );
    assert!(q_info(&img) == Q::Ok);
    let i = img.clone();
    bounded("protocol backing", move || {
        Qcow2Image::open(&i, &info_options()).expect("info open");
        let err = Qcow2Image::open(&i, &options()).expect_err("nbd: backing");
        assert!(err.to_string().contains("protocol"), "{err}");
    });

    // A backing file outside the image's folder: qemu reads it, vdisk only when the
    // caller's policy allows that folder.
    let img = create_unsafe(&s, "far-backing.qcow2", &["-b", st(&secret), "-F", "raw"]);
    assert_eq!(q_read_within(&img, "read -P 0x53 0 512", "10"), Some(true));
    let (i, o) = (img.clone(), other.0.clone());
    bounded("backing elsewhere", move || {
        Qcow2Image::open(&i, &info_options()).expect("info open");
        let err = Qcow2Image::open(&i, &options()).expect_err("outside the folder");
        assert!(err.to_string().contains("policy does not allow"), "{err}");
        let opts = OpenOptions {
            policy: vdisk_block::FollowPolicy::Folders(vec![o]),
            ..options()
        };
        let dev = Qcow2Image::open(&i, &opts).expect("allowed folder");
        let mut buf = [0u8; 512];
        dev.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [b'S'; 512]);
    });

    // A json: data file name: the image still opens for info; reads fail, never
    // following the name. The name is patched into the DATA extension in place.
    let json = format!(r#"json:{{"driver":"file","filename":"{}"}}"#, st(&secret));
    let prefix = st(&s.0).len() + 1;
    let placeholder = s.path(&"d".repeat(json.len() - prefix));
    let img = s.path("json-data.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", st(&placeholder)),
        st(&img),
        "1M",
    ]);
    qemu_io(&img, &["write -P 1 0 64k"]);
    let mut bytes = std::fs::read(&img).expect("read");
    let name = st(&placeholder).as_bytes();
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("data file name in the header");
    bytes[at..at + json.len()].copy_from_slice(json.as_bytes());
    std::fs::write(&img, &bytes).expect("write");
    assert!(q_info(&img) == Q::Ok);
    let qemu_reads = q_read_within(&img, "read -P 0x53 0 512", "10");
    let (i, j) = (img.clone(), json.clone());
    bounded("json data file", move || {
        let dev = Qcow2Image::open(&i, &options()).expect("open");
        assert_eq!(dev.qcow2_info().expect("info").data_file, Some(j));
        let mut buf = [0u8; 512];
        let err = dev.read_at(&mut buf, 0).expect_err("json: data file");
        assert!(err.to_string().contains("json: name"), "{err}");
    });
    eprintln!("qemu-io on a json: data file name reads the named file: {qemu_reads:?}");
}

/// A snapshot table longer than qemu's 64 MiB limit, in a sparse 80 MiB file: 600
/// entries of 1024 bytes of extra data and 64 KiB names each.
#[test]
fn class5_snapshot_table_too_large() {
    let _serial = serial();
    let s = Scratch::new("bigsnap");
    let bases = Bases::make(&s, &[Base::Snap]);
    let mut bytes = bases.bytes(Base::Snap).to_vec();
    let l1 = snap_l1(&bytes) as u64;
    let table = 1u64 << 20;
    set32(&mut bytes, 60, 600);
    set64(&mut bytes, 64, table);
    let img = s.path("big.qcow2");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&img).expect("create");
        f.write_all_at(&bytes, 0).expect("write");
        f.set_len(80 << 20).expect("sparse length");
        let mut pos = table;
        for _ in 0..600 {
            let mut e = [0u8; 40];
            set64(&mut e, 0, l1);
            set32(&mut e, 8, 1);
            set16(&mut e, 12, 0xffff);
            set16(&mut e, 14, 0xffff);
            set32(&mut e, 36, 1024);
            f.write_all_at(&e, pos).expect("entry");
            pos += (40 + 1024 + 2 * 0xffff + 7) & !7;
        }
    }
    // qemu: "Snapshot table is too big" at open, and check refuses too.
    assert_eq!(q_info(&img), Q::Fails);
    assert_eq!(q_check(&img), QCheck::Fails);
    let i = img.clone();
    let report = bounded("snapshot table too large", move || {
        let dev = Qcow2Image::open(&i, &options()).expect("read-only open");
        let err = dev.qcow2_info().expect_err("snapshot table too large");
        assert!(
            err.to_string().contains("Snapshot table is too big"),
            "{err}"
        );
        Qcow2Format
            .check(&i, &options(), RepairMode::None)
            .expect("check")
    });
    assert_eq!(
        (report.corruptions, report.leaks),
        (1, 4),
        "{:?}",
        report.messages
    );
}

/// A compressed write (what `convert -c` does) meets a malformed refcount table entry the
/// same way a plain write does: refused, and the image marked corrupt.
#[test]
fn compressed_write_over_broken_refcounts() {
    let _serial = serial();
    let s = Scratch::new("cwrite");
    let bases = Bases::make(&s, &[Base::Data]);
    let mut bytes = bases.bytes(Base::Data).to_vec();
    let at = reftable(&bytes);
    set64(&mut bytes, at, 0x200);
    let img = s.path("c.qcow2");
    std::fs::write(&img, &bytes).expect("write");
    let i = img.clone();
    bounded("compressed write", move || {
        let dev = Qcow2Image::open(&i, &rw()).expect("open");
        let err = dev
            .write_compressed(&[1u8; 65536], 65536)
            .expect_err("broken refcounts");
        assert!(err.to_string().contains("malformed"), "{err}");
    });
    assert_ne!(incompat(&img) & 2, 0, "not marked corrupt");
    Qcow2Image::open(&img, &rw()).expect_err("corrupt image opened rw");
}
