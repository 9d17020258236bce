//! Crash tests of the VHDX write path: the stream of file writes and flushes is cut after
//! every one of its operations in turn (a simulated power cut: what was written before the
//! cut is in the file, nothing after it; and again with the interrupted write torn, half of
//! its sectors written), then the image is opened read-only (replaying its log in memory),
//! checked, repaired, and, where qemu-img can open it, checked, repaired and read by
//! qemu-img too.
//!
//! Two workloads: a dynamic image (writes, zeroes, a grow, a shrink inside a block and a
//! grow again) and a differencing image over a dynamic parent (partial-block writes that
//! copy the parent's bytes, whole-block zeroes that hide the parent, writes and zeroes into
//! PARTIALLY_PRESENT blocks as Hyper-V leaves them, a grow, a shrink inside a block that
//! falls through to the parent, and a grow again). vdisk never writes sector bitmaps (see
//! [`crate::vhdx::write`]: a partial block is completed in place from the parent and made
//! FULLY_PRESENT), so a differencing image's metadata updates are BAT entries and the size
//! item, all through the log.
//!
//! Required after every cut:
//! - the image opens read-only, and opening it (and checking it read-only, with vdisk and
//!   with qemu-img) leaves the file byte for byte as it was;
//! - its size is the size before or after an interrupted resize, the size after every
//!   completed one;
//! - every write acknowledged before the last successful flush reads back; every other
//!   range reads as either its old or its new contents; ranges cut off by a shrink read as
//!   zeroes when the disk grows again;
//! - vdisk's read-only check finds nothing but the unreplayed log, exactly when qemu-img
//!   refuses a read-only open for it; after `check -r all` (vdisk's or qemu-img's) both
//!   tools find nothing at all and read the same bytes as the read-only open did.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vdisk_block::format::ImageOpener;
use vdisk_block::{
    BlockDev, CheckReport, CreateOptions, Format, OpenOptions, Preallocation, RepairMode, Result,
    ZeroMode,
};

use crate::vhdx::bat::{self, PayloadState};
use crate::vhdx::check::check;
use crate::vhdx::format::VhdxFormat;
use crate::vhdx::image::VhdxImage;

const MIB: u64 = 1 << 20;

/// One step of the workload. Writes and zeroes each touch their own range (disjoint from
/// every other step's), so each can be judged on its own.
#[derive(Clone, Copy, Debug)]
enum Step {
    Write { at: u64, len: u64, fill: u8 },
    Zero { at: u64, len: u64 },
    Flush,
    Resize { to: u64 },
}

/// A workload on one image.
struct Scenario {
    name: &'static str,
    /// The virtual size before the workload.
    size: u64,
    /// The guest contents before the workload, as long as the largest size it reaches
    /// (zeroes past `size`).
    base: Vec<u8>,
    steps: Vec<Step>,
    /// A differencing image (its parent is `parent.vhdx` beside it); qemu-img cannot open
    /// these, so only vdisk judges them.
    differencing: bool,
}

fn dynamic_scenario() -> Scenario {
    use Step::*;
    let size = 8 * MIB;
    let mut base = vec![0u8; 12 * MIB as usize];
    for (i, b) in base
        .iter_mut()
        .enumerate()
        .skip(2 * MIB as usize)
        .take(MIB as usize)
    {
        *b = (i % 251) as u8;
    }
    let steps = vec![
        Write {
            at: 100,
            len: 5000,
            fill: 1,
        },
        Write {
            at: MIB + 7,
            len: MIB - 100,
            fill: 2,
        },
        Flush,
        Write {
            at: 4 * MIB,
            len: 4096,
            fill: 3,
        },
        Zero {
            at: 2 * MIB,
            len: MIB,
        },
        Flush,
        Write {
            at: 6 * MIB - 512,
            len: 1024,
            fill: 4,
        },
        Write {
            at: 200_000,
            len: 300,
            fill: 5,
        },
        // Commits the two unflushed writes' BAT entries together with the size.
        Resize { to: 12 * MIB },
        Write {
            at: 10 * MIB + 3,
            len: 5000,
            fill: 6,
        },
        Write {
            at: 11 * MIB + 100,
            len: MIB - 200,
            fill: 7,
        },
        Flush,
        // Inside block 11: its tail is zeroed in place before the size shrinks.
        Resize {
            to: 11 * MIB + MIB / 2,
        },
        Write {
            at: 7 * MIB,
            len: 10,
            fill: 8,
        },
        Resize { to: 12 * MIB },
        Write {
            at: 9 * MIB,
            len: 10,
            fill: 9,
        },
    ];
    Scenario {
        name: "dynamic",
        size,
        base,
        steps,
        differencing: false,
    }
}

/// The parent's contents: a pattern in every block but block 6 (a hole in the parent too).
fn parent_contents() -> Vec<u8> {
    let mut v = vec![0u8; 8 * MIB as usize];
    for (i, b) in v.iter_mut().enumerate() {
        if i / MIB as usize != 6 {
            *b = ((i * 7) % 253) as u8 | 1;
        }
    }
    v
}

/// Blocks of the differencing image that start PARTIALLY_PRESENT, as Hyper-V leaves them:
/// a sector bitmap says which 512-byte sectors are in the child.
const PARTIAL_BLOCKS: [u64; 2] = [1, 4];
/// What the child's file holds in a partial block's sectors the bitmap leaves to the
/// parent: never visible.
const HIDDEN: u8 = 0xee;

/// Whether sector `s` of a partial block is in the child: the first 512, then runs of four
/// in and four out up to sector 1024, none after.
fn partial_present(s: u64) -> bool {
    s < 512 || (s < 1024 && s % 8 < 4)
}

/// The bytes the child's file holds in partial block `block` (its own, or `HIDDEN`).
fn partial_data(block: u64) -> Vec<u8> {
    let mut v = vec![HIDDEN; MIB as usize];
    for (s, sector) in v.chunks_mut(512).enumerate() {
        if partial_present(s as u64) {
            sector.fill(0xd0 | block as u8);
        }
    }
    v
}

/// Makes `PARTIAL_BLOCKS` of the fresh differencing image at `path` PARTIALLY_PRESENT, with
/// one sector bitmap block for their chunk, written straight into the file (the image is
/// clean, so nothing in its log can undo it).
fn make_partial(path: &Path) {
    use std::os::unix::fs::FileExt;
    let img = VhdxImage::open(
        path,
        &OpenOptions {
            no_backing: true,
            ..OpenOptions::read_only()
        },
    )
    .expect("open child");
    let params = img.params().clone();
    let bat_at = img.regions().bat.offset;
    drop(img);
    assert_eq!(params.logical_sector_size, 512);
    assert_eq!(params.block_size as u64, MIB);
    let ratio = params.chunk_ratio();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open child file");
    let bitmap_at = file.metadata().expect("stat").len().next_multiple_of(MIB);
    let mut bitmap = vec![0u8; MIB as usize];
    for (i, &block) in PARTIAL_BLOCKS.iter().enumerate() {
        let payload_at = bitmap_at + (1 + i as u64) * MIB;
        file.write_all_at(&partial_data(block), payload_at)
            .expect("payload");
        let first = (block % ratio) * (MIB / 512);
        for s in (0..MIB / 512).filter(|&s| partial_present(s)) {
            let bit = first + s;
            bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
        }
        let entry = bat::make_entry(PayloadState::PartiallyPresent.bits(), payload_at);
        file.write_all_at(
            &entry.to_le_bytes(),
            bat_at + bat::payload_index(block, ratio) * 8,
        )
        .expect("BAT");
    }
    file.write_all_at(&bitmap, bitmap_at).expect("bitmap");
    let entry = bat::make_entry(bat::SB_PRESENT, bitmap_at);
    file.write_all_at(
        &entry.to_le_bytes(),
        bat_at + bat::bitmap_index(PARTIAL_BLOCKS[0], ratio) * 8,
    )
    .expect("BAT");
    file.sync_all().expect("sync");
}

fn differencing_scenario() -> Scenario {
    use Step::*;
    let mut base = parent_contents();
    for block in PARTIAL_BLOCKS {
        let at = (block * MIB) as usize;
        let data = partial_data(block);
        for (i, b) in base[at..at + MIB as usize].iter_mut().enumerate() {
            if data[i] != HIDDEN {
                *b = data[i];
            }
        }
    }
    base.resize(10 * MIB as usize, 0);
    let steps = vec![
        // A partial write: block 0 is materialised with the parent's bytes around it.
        Write {
            at: 100,
            len: 5000,
            fill: 1,
        },
        // A whole block: ZERO, hiding the parent.
        Zero {
            at: 2 * MIB,
            len: MIB,
        },
        Flush,
        Write {
            at: 3 * MIB + 512,
            len: 512,
            fill: 2,
        },
        // Part of a partial block, across sectors in the child and in the parent: it is
        // completed in place from the parent, then zeroed there.
        Zero {
            at: 4 * MIB + 250 * 512,
            len: 600 * 512,
        },
        Flush,
        Write {
            at: 5 * MIB,
            len: 4096,
            fill: 3,
        },
        // Inside block 7, which falls through to the parent: growing again must not show
        // the parent's bytes past the cut.
        Resize {
            to: 7 * MIB + MIB / 2,
        },
        // Into a partial block, in sectors the bitmap leaves to the parent.
        Write {
            at: MIB + 1100 * 512 + 1,
            len: 100,
            fill: 4,
        },
        Flush,
        // New blocks are ZERO so the parent does not show through.
        Resize { to: 10 * MIB },
        Write {
            at: 9 * MIB + 1,
            len: 100,
            fill: 5,
        },
        Flush,
        Write {
            at: 6 * MIB + 10,
            len: 4096,
            fill: 6,
        },
        Zero {
            at: 3 * MIB + 8192,
            len: 4096,
        },
    ];
    Scenario {
        name: "differencing",
        size: 8 * MIB,
        base,
        steps,
        differencing: true,
    }
}

/// Opens parents as VHDX, as the registry would.
struct VhdxOpener;

impl ImageOpener for VhdxOpener {
    fn open_image(
        &self,
        path: &Path,
        _format: Option<&str>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDev>> {
        VhdxFormat.open(path, options)
    }
}

fn options(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        opener: Some(Arc::new(VhdxOpener)),
        ..OpenOptions::default()
    }
}

fn create(path: &Path, size: u64, opts: &str) {
    VhdxFormat
        .create(
            path,
            CreateOptions {
                size,
                options: CreateOptions::parse_options(opts).expect("options"),
            },
        )
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Makes the image the workload starts from (and its parent), returns its path.
fn prepare(scn: &Scenario, dir: &Path) -> PathBuf {
    let pristine = dir.join(format!("pristine-{}.vhdx", scn.name));
    if scn.differencing {
        let parent = dir.join("parent.vhdx");
        create(&parent, 8 * MIB, "block_size=1M");
        let img = VhdxImage::open(&parent, &options(true)).expect("open parent");
        let contents = parent_contents();
        for block in (0..8).filter(|&b| b != 6) {
            let at = (block * MIB) as usize;
            img.write_at(&contents[at..at + MIB as usize], block * MIB)
                .expect("parent write");
        }
        img.flush().expect("flush");
        drop(img);
        create(&pristine, 0, "block_size=1M,backing_file=parent.vhdx");
        make_partial(&pristine);
    } else {
        create(&pristine, scn.size, "block_size=1M");
        let img = VhdxImage::open(&pristine, &options(true)).expect("open");
        img.write_at(&scn.base[2 * MIB as usize..3 * MIB as usize], 2 * MIB)
            .expect("base write");
        img.flush().expect("flush");
    }
    pristine
}

/// Runs the workload with `budget` file operations allowed (`-1`: all). Returns how many
/// steps completed, how many of them were covered by a successful flush, and the number of
/// file operations used.
fn run(scn: &Scenario, path: &Path, budget: i64, torn: bool) -> (usize, usize, i64) {
    let img = VhdxImage::open(path, &options(true)).expect("open writable");
    img.fault.1.store(torn, Ordering::SeqCst);
    const LARGE: i64 = 1 << 40;
    img.fault
        .0
        .store(if budget < 0 { LARGE } else { budget }, Ordering::SeqCst);
    let (mut done, mut flushed) = (0, 0);
    for step in &scn.steps {
        let ok = match *step {
            Step::Write { at, len, fill } => img.write_at(&vec![fill; len as usize], at).is_ok(),
            Step::Zero { at, len } => img.write_zeroes(at, len, ZeroMode::MayUnmap).is_ok(),
            Step::Flush => img.flush().is_ok(),
            Step::Resize { to } => img.resize(to, Preallocation::Off).is_ok(),
        };
        if !ok {
            break;
        }
        done += 1;
        if matches!(step, Step::Flush) {
            flushed = done;
        }
    }
    let used = if budget < 0 {
        LARGE - img.fault.0.load(Ordering::SeqCst)
    } else {
        budget
    };
    // A cut image is dropped without its closing flush (the power is gone).
    if budget >= 0 {
        img.fault.0.store(0, Ordering::SeqCst);
    }
    drop(img);
    (done, flushed, used)
}

// What a byte may read as after a cut, as a bit set: the byte of `base`, zero, or fill
// value f (bit f + 1; fills are 1..=14).
const BASE: u16 = 1;
const ZERO: u16 = 2;

fn fill_bit(fill: u8) -> u16 {
    assert!((1..=14).contains(&fill), "fill values are 1..=14");
    1 << (fill + 1)
}

fn accepts(mask: u16, base: u8, got: u8) -> bool {
    (mask & BASE != 0 && got == base)
        || (mask & ZERO != 0 && got == 0)
        || ((1..=14).contains(&got) && mask & fill_bit(got) != 0)
}

/// What every byte may read as, and what the size may be, when `done` steps completed and
/// the first `flushed` of them were covered by a flush (step `done` was interrupted, later
/// ones never ran).
fn expectation(scn: &Scenario, done: usize, flushed: usize) -> (Vec<u16>, Vec<u64>) {
    let mut mask = vec![BASE; scn.base.len()];
    let mut sizes = vec![scn.size];
    for (i, step) in scn.steps.iter().enumerate().take(done + 1) {
        let finished = i < done;
        let durable = i < flushed;
        let mut set = |at: u64, len: u64, bit: u16, durable: bool| {
            for m in &mut mask[at as usize..(at + len) as usize] {
                *m = if durable { bit } else { *m | bit };
            }
        };
        match *step {
            Step::Write { at, len, fill } => set(at, len, fill_bit(fill), durable),
            Step::Zero { at, len } => set(at, len, ZERO, durable),
            Step::Flush => {}
            Step::Resize { to } => {
                // Only the last step can be unfinished, so before it there is one size.
                let current = sizes[0];
                if to < current {
                    // A resize returns only once it is durable.
                    set(to, current - to, ZERO, finished);
                }
                if finished {
                    sizes = vec![to];
                } else {
                    sizes.push(to);
                }
            }
        }
    }
    (mask, sizes)
}

fn qemu_img(args: &[&str], image: &Path) -> Output {
    Command::new("qemu-img")
        .args(args)
        .arg(image)
        .output()
        .expect("run qemu-img")
}

fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

/// The number after `"key": ` in qemu-img's JSON output (qemu leaves out zero counts of
/// repairs).
fn json_count(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    let digits: String = json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn assert_clean(report: &CheckReport, what: &str) {
    assert!(
        report.corruptions == 0
            && report.leaks == 0
            && report.check_errors == 0
            && report.messages.is_empty(),
        "{what}: check is not clean: {report:?}"
    );
}

/// Every judgement of one cut image (see the module docs); returns whether its log had
/// something to replay.
fn judge(
    scn: &Scenario,
    dir: &Path,
    image: &Path,
    done: usize,
    flushed: usize,
    what: &str,
) -> bool {
    let before = std::fs::read(image).expect("read image file");
    let img = VhdxImage::open(image, &options(false))
        .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
    let pending = img.replayed().is_some();
    let size = img.size();
    let (mask, sizes) = expectation(scn, done, flushed);
    assert!(
        sizes.contains(&size),
        "{what}: the size is {size}, expected one of {sizes:?}"
    );
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).expect("read");
    drop(img);
    if let Some(bad) = (0..got.len()).find(|&i| !accepts(mask[i], scn.base[i], got[i])) {
        panic!(
            "{what}: byte {bad} reads {}, allowed set {:#06x} (old byte {}); {done} steps done, {flushed} flushed",
            got[bad], mask[bad], scn.base[bad]
        );
    }

    let read_only = check(image, &options(false), RepairMode::None);
    if pending {
        // As qemu: a read-only check refuses an image whose log needs replaying.
        let err = read_only.expect_err("a read-only check of a pending log must refuse");
        assert!(
            err.kind() == vdisk_block::ErrorKind::ReadOnly
                && err.message().contains("needs to be replayed"),
            "{what}: a read-only check should refuse only for the pending log: {err}"
        );
    } else {
        let report = read_only.unwrap_or_else(|e| panic!("{what}: read-only check failed: {e}"));
        assert_clean(&report, &format!("{what}: read-only check"));
    }
    let qemu = have_qemu() && !scn.differencing;
    if qemu {
        // qemu refuses a read-only open exactly when the log has something to replay.
        let out = qemu_img(&["check", "-f", "vhdx"], image);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if pending {
            assert!(
                out.status.code() == Some(1)
                    && stderr.contains("contains a log that needs to be replayed"),
                "{what}: qemu-img check should refuse the unreplayed log: {out:?}"
            );
        } else {
            assert!(
                out.status.code() == Some(0),
                "{what}: qemu-img check is not clean: {out:?}"
            );
        }
    }
    assert!(
        std::fs::read(image).expect("read image file") == before,
        "{what}: a read-only open or check changed the file"
    );

    // vdisk's repair replays the log and finds nothing else to fix.
    let ours = dir.join("repaired-by-vdisk.vhdx");
    std::fs::copy(image, &ours).expect("copy");
    let report = check(&ours, &options(true), RepairMode::All)
        .unwrap_or_else(|e| panic!("{what}: check -r all failed: {e}"));
    assert!(
        report.corruptions == 0
            && report.leaks == 0
            && report.check_errors == 0
            && report.corruptions_fixed == u64::from(pending),
        "{what}: check -r all should only replay the log: {report:?}"
    );
    let report = check(&ours, &options(false), RepairMode::None).expect("check");
    assert_clean(&report, &format!("{what}: check after vdisk's repair"));
    let img = VhdxImage::open(&ours, &options(false)).expect("open repaired");
    assert!(img.replayed().is_none(), "{what}: the repair left a log");
    let mut again = vec![0u8; img.size() as usize];
    img.read_at(&mut again, 0).expect("read");
    assert!(again == got, "{what}: the repair changed the contents");
    drop(img);

    if !qemu {
        return pending;
    }
    let out = qemu_img(&["check", "-f", "vhdx"], &ours);
    assert!(
        out.status.success(),
        "{what}: qemu-img check after vdisk's repair: {out:?}"
    );
    // qemu's repair replays the log (its one possible fix for a VHDX) and nothing else.
    let theirs = dir.join("repaired-by-qemu.vhdx");
    std::fs::copy(image, &theirs).expect("copy");
    let out = qemu_img(
        &["check", "-r", "all", "--output=json", "-f", "vhdx"],
        &theirs,
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && json_count(&json, "corruptions-fixed").unwrap_or(0) == u64::from(pending)
            && json_count(&json, "check-errors") == Some(0)
            && !json.contains("\"corruptions\"")
            && !json.contains("\"leaks\""),
        "{what}: qemu-img check -r all should only replay the log: {out:?}"
    );
    let out = qemu_img(&["check", "-f", "vhdx"], &theirs);
    assert!(
        out.status.success(),
        "{what}: qemu-img check after its repair: {out:?}"
    );
    let report = check(&theirs, &options(false), RepairMode::None).expect("check");
    assert_clean(&report, &format!("{what}: check after qemu's repair"));
    let raw = dir.join("qemu.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&theirs)
        .arg(&raw)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{what}: qemu-img cannot read the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&raw).expect("raw") == got,
        "{what}: qemu-img reads other contents than we do"
    );
    pending
}

fn every_cut(scn: &Scenario) {
    let dir = vdisk_block::testing::TempDir::new("vhdx-crash").expect("temp dir");
    let pristine = prepare(scn, dir.path());
    let probe = dir.join(format!("probe-{}.vhdx", scn.name));
    std::fs::copy(&pristine, &probe).expect("copy");
    let (all, _, total) = run(scn, &probe, -1, false);
    assert_eq!(all, scn.steps.len(), "the uncut workload failed");
    assert!(
        !judge(scn, dir.path(), &probe, all, all, "uncut run"),
        "a cleanly closed image has a log to replay"
    );
    assert!(total > 40, "the workload made only {total} file operations");
    eprintln!(
        "{}: the workload makes {total} file writes and flushes; cutting after each",
        scn.name
    );
    let mut pending = 0;
    // Every cut twice: the interrupted write lost whole, and torn in half.
    for (cut, torn) in (0..=total).flat_map(|c| [(c, false), (c, true)]) {
        let image = dir.join(format!("cut-{}.vhdx", scn.name));
        std::fs::copy(&pristine, &image).expect("copy");
        let (done, flushed, _) = run(scn, &image, cut, torn);
        let what = format!("{}: cut {cut} (torn {torn})", scn.name);
        pending += usize::from(judge(scn, dir.path(), &image, done, flushed, &what));
    }
    let cuts = 2 * (total as usize + 1);
    eprintln!(
        "{}: {pending} of {cuts} cuts left a log to replay",
        scn.name
    );
    // Both kinds of cut images were judged: with a log to replay and without.
    assert!(
        pending > 0 && pending < cuts,
        "{pending} of {cuts} cuts left a log to replay"
    );
}

#[test]
fn every_cut_of_a_dynamic_image_write_stream_leaves_a_consistent_image() {
    every_cut(&dynamic_scenario());
}

#[test]
fn every_cut_of_a_differencing_image_write_stream_leaves_a_consistent_image() {
    every_cut(&differencing_scenario());
}

/// A VHDX with a non-empty log made by a real cut: the power fails after a commit's log
/// entry is flushed, before its BAT sectors are written in place. A read-only open replays
/// the entry in memory and shows the block it maps, reads what the image holds once the log
/// is replayed into the file (by vdisk's writable open and by qemu-img's `check -r all`),
/// and leaves the file byte for byte unmodified.
#[test]
fn a_cut_that_leaves_an_unreplayed_log_entry_opens_read_only_with_the_replayed_contents() {
    let scn = dynamic_scenario();
    let dir = vdisk_block::testing::TempDir::new("vhdx-log-cut").expect("temp dir");
    let pristine = prepare(&scn, dir.path());
    let probe = dir.join("probe.vhdx");
    std::fs::copy(&pristine, &probe).expect("copy");
    let (_, _, total) = run(&scn, &probe, -1, false);
    let image = dir.join("cut.vhdx");
    // The first cut whose log maps a block the BAT in the file does not: the entry is
    // logged but not applied.
    let found = (0..=total).find_map(|cut| {
        std::fs::copy(&pristine, &image).expect("copy");
        run(&scn, &image, cut, false);
        let img = VhdxImage::open(&image, &options(false)).expect("open");
        img.replayed()?;
        let mut raw = vec![0u8; img.params().bat_entries() as usize * 8];
        img.file()
            .read_at(&mut raw, img.regions().bat.offset)
            .expect("read the BAT in the file");
        let ratio = img.params().chunk_ratio();
        let bs = img.params().block_size as u64;
        (0..img.size() / bs).find_map(|block| {
            let index = bat::payload_index(block, ratio) as usize;
            let on_disk = raw.get(index * 8..index * 8 + 8)?;
            let on_disk = u64::from_le_bytes(on_disk.try_into().ok()?);
            let replayed = img.bat_entry(index as u64).ok()?;
            (bat::state_bits(on_disk) == 0 && bat::state_bits(replayed) == 6)
                .then_some((cut, block))
        })
    });
    let (cut, block) = found.expect("no cut leaves a logged, unapplied BAT update");
    eprintln!("cut {cut}: the log maps block {block}, the file's BAT does not");
    let before = std::fs::read(&image).expect("read image file");
    let img = VhdxImage::open(&image, &options(false)).expect("open read-only");
    let replay = img.replayed().expect("a log to replay");
    assert!(replay.entries >= 1, "{replay:?}");
    let mut got = vec![0u8; img.size() as usize];
    img.read_at(&mut got, 0).expect("read");
    let bs = img.params().block_size as usize;
    let start = block as usize * bs;
    assert!(
        got[start..start + bs].iter().any(|&b| b != 0),
        "block {block} reads as zeroes: the replayed mapping was not used"
    );
    drop(img);
    assert!(
        std::fs::read(&image).expect("read image file") == before,
        "the read-only open changed the file"
    );

    // Replayed into the file by a writable open, the image reads the same.
    let ours = dir.join("replayed-by-vdisk.vhdx");
    std::fs::copy(&image, &ours).expect("copy");
    drop(VhdxImage::open(&ours, &options(true)).expect("open writable"));
    let img = VhdxImage::open(&ours, &options(false)).expect("open");
    assert!(img.replayed().is_none(), "the writable open left a log");
    let mut replayed = vec![0u8; img.size() as usize];
    img.read_at(&mut replayed, 0).expect("read");
    assert!(
        replayed == got,
        "the in-memory replay differs from the replay into the file"
    );
    drop(img);

    if !have_qemu() {
        return;
    }
    let out = qemu_img(&["info", "-f", "vhdx"], &image);
    assert!(
        !out.status.success(),
        "qemu-img opened the unreplayed image read-only: {out:?}"
    );
    let theirs = dir.join("replayed-by-qemu.vhdx");
    std::fs::copy(&image, &theirs).expect("copy");
    let out = qemu_img(&["check", "-q", "-r", "all", "-f", "vhdx"], &theirs);
    assert!(out.status.success(), "qemu-img check -r all: {out:?}");
    let raw = dir.join("qemu.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&theirs)
        .arg(&raw)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    assert!(
        std::fs::read(&raw).expect("raw") == got,
        "qemu-img reads other contents after its replay than our read-only open"
    );
}
