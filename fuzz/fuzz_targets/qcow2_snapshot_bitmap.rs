//! qcow2_snapshot_bitmap: a qcow2 image whose snapshot table and bitmap directory are what
//! the fuzzer changes most. The input is the whole image file, as for the `qcow2` target; a
//! custom mutator finds the snapshot table, the snapshots' L1 tables, the bitmaps extension,
//! the bitmap directory and the bitmap tables of the input (by the offsets its header gives)
//! and, four times in five, mutates the bytes of one of them in place, so valid seeds with
//! snapshots and bitmaps stay valid images everywhere else.
//!
//! One input: opened read-only, snapshots listed and each (up to four) loaded with
//! `load_snapshot_tmp` and read, bitmaps listed and their ranges read; then opened read-write
//! to apply the first snapshot (what `qemu-img snapshot -a` does), and `check`ed. No backing
//! or data file is ever opened.
#![no_main]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use vdisk_block::{BlockDev, EngineChoice, FollowPolicy, Format, OpenOptions, RepairMode};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

/// The most snapshots loaded and bitmaps read per input.
const MAX_ITEMS: usize = 4;
/// The longest guest read per loaded snapshot.
const READ_LIMIT: u64 = 64 << 10;
/// The longest structure the mutator works on at once.
const REGION_LIMIT: u64 = 64 << 10;
/// qcow2's bitmaps header extension.
const BITMAPS_EXTENSION: u64 = 0x2385_2875;

fn scratch() -> &'static PathBuf {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        std::env::temp_dir().join(format!("vdisk-fuzz-qcow2-snap-{}.qcow2", std::process::id()))
    })
}

fn options(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        policy: FollowPolicy::Nothing,
        no_backing: true,
        opener: None,
        engine: EngineChoice::Sync,
        ..OpenOptions::default()
    }
}

fn exercise(path: &Path) {
    if let Ok(image) = Qcow2Image::open(path, &options(false)) {
        let _ = image.info();
        let _ = image.format_specific();
        let _ = BlockDev::snapshots(&image);
        if let Ok(bitmaps) = image.bitmap_list() {
            for b in bitmaps.iter().take(MAX_ITEMS) {
                let _ = image.bitmap_ranges(&b.name);
                let _ = image.check_bitmap_usable(&b.name);
            }
        }
        let snapshots = image.snapshots().unwrap_or_default();
        for s in snapshots.iter().take(MAX_ITEMS) {
            if image.load_snapshot_tmp(Some(&s.id), None).is_ok() {
                let size = image.size();
                let len = size.min(READ_LIMIT);
                let mut buf = vec![0u8; len as usize];
                let _ = image.read_at(&mut buf, 0);
                if size > 0 {
                    let _ = image.block_status(0, size.min(1 << 20));
                }
            }
        }
    }
    if let Ok(image) = Qcow2Image::open(path, &options(true)) {
        if let Some(first) = image.snapshots().ok().and_then(|s| s.into_iter().next()) {
            let _ = image.snapshot_apply(&first.id);
        }
        let _ = image.flush();
    }
    let _ = Qcow2Format.check(path, &options(false), RepairMode::None);
}

fuzz_target!(|data: &[u8]| {
    if std::fs::write(scratch(), data).is_ok() {
        exercise(scratch());
    }
});

fn be16(d: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let b = d.get(at..at.checked_add(2)?)?;
    Some(u64::from(u16::from_be_bytes([b[0], b[1]])))
}

fn be32(d: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let b = d.get(at..at.checked_add(4)?)?;
    Some(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
}

fn be64(d: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let b = d.get(at..at.checked_add(8)?)?;
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    Some(u64::from_be_bytes(w))
}

/// `[start, start + len)` clipped to the input and to [`REGION_LIMIT`], if not empty.
fn clip(d: &[u8], start: u64, len: u64, out: &mut Vec<Range<usize>>) {
    let total = d.len() as u64;
    if start >= total || len == 0 {
        return;
    }
    let end = start.saturating_add(len.min(REGION_LIMIT)).min(total);
    out.push(start as usize..end as usize);
}

/// The snapshot and bitmap structures the header of `d` points at. Offsets come from the
/// input, so every sum saturates (a found overflow: the first run panicked here).
fn structures(d: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    if d.get(..4) != Some(b"QFI\xfb") {
        return out;
    }
    let (Some(version), Some(nb_snapshots), Some(snapshots)) =
        (be32(d, 4), be32(d, 60), be64(d, 64))
    else {
        return out;
    };
    // nb_snapshots and the table offset themselves.
    clip(d, 60, 12, &mut out);
    let mut at = snapshots;
    for _ in 0..nb_snapshots.min(64) {
        let (Some(l1), Some(l1_size), Some(id_len), Some(name_len), Some(extra)) = (
            be64(d, at),
            be32(d, at.saturating_add(8)),
            be16(d, at.saturating_add(12)),
            be16(d, at.saturating_add(14)),
            be32(d, at.saturating_add(36)),
        ) else {
            break;
        };
        let len = (40 + extra + id_len + name_len).next_multiple_of(8);
        clip(d, at, len, &mut out);
        clip(d, l1, l1_size * 8, &mut out);
        at = at.saturating_add(len);
    }
    // Header extensions, after the header (v3 says how long it is).
    let mut ext = if version >= 3 {
        be32(d, 100).unwrap_or(104)
    } else {
        72
    };
    for _ in 0..16 {
        let (Some(kind), Some(len)) = (be32(d, ext), be32(d, ext.saturating_add(4))) else {
            break;
        };
        if kind == 0 {
            break;
        }
        if kind == BITMAPS_EXTENSION {
            clip(d, ext.saturating_add(8), len, &mut out);
            if let (Some(count), Some(dir_size), Some(dir)) =
                (be32(d, ext.saturating_add(8)), be64(d, ext.saturating_add(16)), be64(d, ext.saturating_add(24)))
            {
                clip(d, dir, dir_size, &mut out);
                let mut e = dir;
                for _ in 0..count.min(64) {
                    let (Some(table), Some(table_size), Some(name_len), Some(extra)) = (
                        be64(d, e),
                        be32(d, e.saturating_add(8)),
                        be16(d, e.saturating_add(18)),
                        be32(d, e.saturating_add(20)),
                    ) else {
                        break;
                    };
                    clip(d, table, table_size * 8, &mut out);
                    e = e.saturating_add((24 + extra + name_len).next_multiple_of(8));
                }
            }
        }
        ext = ext.saturating_add(8 + len.next_multiple_of(8));
    }
    out
}

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let regions = structures(&data[..size]);
    if seed % 5 == 0 || regions.is_empty() {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    let r = regions[(seed / 5) as usize % regions.len()].clone();
    let len = r.len();
    let mut piece = data[r.clone()].to_vec();
    // In place: the structure keeps its length (a shrink keeps the old tail).
    let n = libfuzzer_sys::fuzzer_mutate(&mut piece, len, len);
    data[r.start..r.start + n].copy_from_slice(&piece[..n]);
    size
});
