//! Hostile VHDX and VHD images (the classes of the reference's §8.2, plus random damage) are
//! refused with a clear `Corrupt` error, or read with errors, never a panic or a runaway
//! allocation.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{must_fail, Scratch};
use vdisk_block::testing::Rng;
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, Format, OpenOptions};
use vdisk_vhdx::guid::Guid;
use vdisk_vhdx::vhdx::bat;
use vdisk_vhdx::vhdx::header::HEADER_OFFSETS;
use vdisk_vhdx::vhdx::log::{encode_entry, LogWrite};
use vdisk_vhdx::vhdx::region::{self, RegionEntry, REGION_TABLE_OFFSETS};
use vdisk_vhdx::{VhdxFormat, VhdxImage, VpcFormat};

const MIB: u64 = 1 << 20;

fn poke(path: &Path, data: &[u8], at: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(data, at).expect("write");
}

fn peek(path: &Path, len: usize, at: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, at)
        .expect("read");
    buf
}

/// A small valid image with two allocated blocks; returns it and a pristine copy.
fn sample(dir: &Scratch) -> std::path::PathBuf {
    let path = dir.path("good.vhdx");
    VhdxFormat
        .create(
            &path,
            CreateOptions {
                size: 8 * MIB,
                options: CreateOptions::parse_options("block_size=1M").expect("opts"),
            },
        )
        .expect("create");
    let img = VhdxFormat
        .open(&path, &OpenOptions::read_write())
        .expect("open");
    img.write_at(&[7u8; 5000], 10).expect("write");
    img.write_at(&[8u8; 5000], 3 * MIB).expect("write");
    img.flush().expect("flush");
    path
}

fn copy_of(good: &Path, dir: &Scratch, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    std::fs::copy(good, &p).expect("copy");
    p
}

fn refused(path: &Path, what: &str, expect: &str) {
    let err = must_fail(
        VhdxFormat.open(path, &OpenOptions::read_only()),
        &format!("{what}: a hostile image opened"),
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
    assert!(
        err.to_string().contains(expect),
        "{what}: '{err}' lacks '{expect}'"
    );
}

#[test]
fn vhdx_structural_damage_is_refused() {
    let dir = Scratch::new("hostile");
    let good = sample(&dir);
    let (header, regions) = {
        let img = VhdxImage::open(&good, &OpenOptions::read_only()).expect("open");
        (img.header(), *img.regions())
    };

    let p = copy_of(&good, &dir, "headers.vhdx");
    for off in HEADER_OFFSETS {
        poke(&p, &[0xff], off + 100);
    }
    refused(&p, "both headers bad", "no valid header");

    let write_header = |p: &Path, h: &vdisk_vhdx::vhdx::header::Header| {
        for off in HEADER_OFFSETS {
            poke(p, &h.encode(), off);
        }
    };
    let p = copy_of(&good, &dir, "logversion.vhdx");
    let mut h = header.clone();
    h.log_version = 1;
    write_header(&p, &h);
    refused(&p, "log version", "log version");

    let p = copy_of(&good, &dir, "logalign.vhdx");
    let mut h = header.clone();
    h.log_offset += 4096;
    write_header(&p, &h);
    refused(&p, "unaligned log", "aligned");

    let write_regions = |p: &Path, entries: &[RegionEntry]| {
        for off in REGION_TABLE_OFFSETS {
            poke(p, &region::encode(entries), off);
        }
    };
    let p = copy_of(&good, &dir, "regionlen.vhdx");
    let mut bad = regions;
    bad.bat.length = u32::MAX - (u32::MAX % MIB as u32);
    write_regions(&p, &[bad.bat, bad.metadata]);
    refused(&p, "BAT region past the file", "past the end");

    let p = copy_of(&good, &dir, "overlap.vhdx");
    let mut bad = regions;
    bad.bat.offset = bad.metadata.offset;
    write_regions(&p, &[bad.bat, bad.metadata]);
    refused(&p, "overlapping regions", "overlaps");

    let p = copy_of(&good, &dir, "overlaplog.vhdx");
    let mut bad = regions;
    bad.metadata.offset = header.log_offset;
    write_regions(&p, &[bad.bat, bad.metadata]);
    refused(&p, "metadata over the log", "overlaps");

    // The File Parameters item is the first value at +64 KiB in our layout.
    let p = copy_of(&good, &dir, "blocksize.vhdx");
    poke(&p, &0u32.to_le_bytes(), regions.metadata.offset + 65536);
    refused(&p, "zero block size (CVE-2014-0148)", "block size");

    let p = copy_of(&good, &dir, "sector.vhdx");
    let m = peek(&p, 65536, regions.metadata.offset);
    let count = u16::from_le_bytes([m[10], m[11]]) as usize;
    for i in 0..count {
        let e = &m[32 + i * 32..64 + i * 32];
        if Guid::from_slice(&e[..16]) == vdisk_vhdx::vhdx::metadata::LOGICAL_SECTOR_SIZE {
            let off = u32::from_le_bytes([e[16], e[17], e[18], e[19]]) as u64;
            poke(&p, &1000u32.to_le_bytes(), regions.metadata.offset + off);
        }
    }
    refused(&p, "odd sector size", "sector size");

    let bat_at = |index: u64| regions.bat.offset + index * 8;
    let p = copy_of(&good, &dir, "bateof.vhdx");
    poke(&p, &bat::make_entry(6, 1 << 40).to_le_bytes(), bat_at(1));
    refused(&p, "BAT entry past the end", "past the end of the file");

    let p = copy_of(&good, &dir, "batmeta.vhdx");
    poke(
        &p,
        &bat::make_entry(6, regions.metadata.offset).to_le_bytes(),
        bat_at(1),
    );
    refused(
        &p,
        "BAT entry over the metadata",
        "over the metadata region",
    );

    let p = copy_of(&good, &dir, "batdup.vhdx");
    let e0 = peek(&p, 8, bat_at(0));
    poke(&p, &e0, bat_at(1));
    refused(&p, "two blocks at one offset", "over each other");

    let p = copy_of(&good, &dir, "batstate.vhdx");
    poke(&p, &bat::make_entry(4, 0).to_le_bytes(), bat_at(1));
    refused(&p, "reserved state", "reserved state");

    // PARTIALLY_PRESENT without a parent opens (as in qemu) but its reads fail cleanly.
    let p = copy_of(&good, &dir, "partial.vhdx");
    let e3 = u64::from_le_bytes(peek(&p, 8, bat_at(3)).try_into().expect("8 bytes"));
    poke(&p, &(e3 | 7).to_le_bytes(), bat_at(3));
    let img = VhdxFormat
        .open(&p, &OpenOptions::read_only())
        .expect("opens");
    let mut buf = vec![0u8; 512];
    let err = must_fail(
        img.read_at(&mut buf, 3 * MIB),
        "partial read in a plain image",
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn vhdx_hostile_logs_are_refused_or_ignored() {
    let dir = Scratch::new("hostile-log");
    let good = sample(&dir);
    let (header, regions) = {
        let img = VhdxImage::open(&good, &OpenOptions::read_only()).expect("open");
        (img.header(), *img.regions())
    };
    let guid = Guid([0x42; 16]);
    let dirty = |p: &Path, entry: &[u8]| {
        poke(p, entry, header.log_offset);
        let mut h = header.clone();
        h.sequence += 1;
        h.log_guid = guid;
        for off in HEADER_OFFSETS {
            poke(p, &h.encode(), off);
        }
    };
    let len = std::fs::metadata(&good).expect("stat").len();
    let sector = vec![0x5au8; 4096];

    let p = copy_of(&good, &dir, "truncated.vhdx");
    let write = LogWrite::Data {
        offset: regions.bat.offset,
        data: sector.clone(),
    };
    dirty(
        &p,
        &encode_entry(guid, 1, 0, len + MIB, len, std::slice::from_ref(&write)),
    );
    refused(&p, "flushed offset past the file", "truncated");

    let p = copy_of(&good, &dir, "intoheader.vhdx");
    let write = LogWrite::Data {
        offset: HEADER_OFFSETS[0],
        data: sector.clone(),
    };
    dirty(&p, &encode_entry(guid, 1, 0, len, len, &[write]));
    refused(&p, "log writing the headers", "headers or the log");

    let p = copy_of(&good, &dir, "intolog.vhdx");
    let write = LogWrite::Zero {
        offset: header.log_offset,
        len: 4096,
    };
    dirty(&p, &encode_entry(guid, 1, 0, len, len, &[write]));
    refused(&p, "log zeroing itself", "headers or the log");

    // An entry with a bad checksum or another GUID is not part of the log: nothing replays
    // and the image reads as before.
    let p = copy_of(&good, &dir, "badcrc.vhdx");
    let mut entry = encode_entry(
        guid,
        1,
        0,
        len,
        len,
        &[LogWrite::Data {
            offset: regions.bat.offset,
            data: sector.clone(),
        }],
    );
    entry[200] ^= 1;
    dirty(&p, &entry);
    let img = VhdxImage::open(&p, &OpenOptions::read_only()).expect("opens");
    assert!(img.replayed().is_none());
    let mut buf = vec![0u8; 10];
    img.read_at(&mut buf, 10).expect("read");
    assert_eq!(buf, vec![7u8; 10]);
}

/// Random byte damage in the metadata-bearing part of an image never panics.
/// `VHDX_FUZZ_ROUNDS` raises the number of rounds for a longer local run.
fn fuzz(format: &dyn Format, good: &Path, dir: &Scratch, span: u64, rounds: u64) {
    let rounds = std::env::var("VHDX_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(rounds);
    let len = std::fs::metadata(good).expect("stat").len();
    let mut rng = Rng::new(0x5eed);
    for _ in 0..rounds {
        let p = copy_of(good, dir, "fuzz.img");
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(span.min(len));
            poke(&p, &[rng.next_u64() as u8], at);
        }
        vdisk_vhdx::fuzzing::exercise(format, &p);
    }
}

#[test]
fn vhdx_random_damage_never_panics() {
    let dir = Scratch::new("fuzz-vhdx");
    let good = sample(&dir);
    // Headers, region tables, log, metadata and BAT all lie in the first 4 MiB.
    fuzz(&VhdxFormat, &good, &dir, 4 * MIB, 300);
}

#[test]
fn vhd_random_damage_never_panics() {
    let dir = Scratch::new("fuzz-vhd");
    let Some(fixtures) = common::fixtures() else {
        return;
    };
    let good = fixtures.join("vhd/qemu-ext2-dynamic--ext2.vhd");
    // The footer copy, dynamic header and BAT sit in the first few KiB; checksums make
    // most damage a clean refusal, so also damage past them (BAT, bitmaps, data).
    fuzz(&VpcFormat, &good, &dir, 8192, 300);
}

/// Damage aimed at the unchecksummed VHDX structures (metadata table and items, BAT).
#[test]
fn vhdx_metadata_and_bat_damage_never_panics() {
    let dir = Scratch::new("fuzz-vhdx-meta");
    let good = sample(&dir);
    let regions = *VhdxImage::open(&good, &OpenOptions::read_only())
        .expect("open")
        .regions();
    let rounds = std::env::var("VHDX_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(300u64);
    let mut rng = Rng::new(0xbad);
    for _ in 0..rounds {
        let p = copy_of(&good, &dir, "fuzz.vhdx");
        for _ in 0..1 + rng.below(6) {
            let at = match rng.below(3) {
                0 => regions.metadata.offset + rng.below(32 + 6 * 32),
                1 => regions.metadata.offset + 65536 + rng.below(64),
                _ => regions.bat.offset + rng.below(80),
            };
            poke(&p, &[rng.next_u64() as u8], at);
        }
        vdisk_vhdx::fuzzing::exercise(&VhdxFormat, &p);
    }
}

/// Damage to VHD headers with the checksums made right again, so parsing goes deeper.
#[test]
fn vhd_damage_with_fixed_checksums_never_panics() {
    let dir = Scratch::new("fuzz-vhd-sum");
    let Some(fixtures) = common::fixtures() else {
        return;
    };
    let good = fixtures.join("vhd/qemu-ext2-dynamic--ext2.vhd");
    let len = std::fs::metadata(&good).expect("stat").len();
    let rounds = std::env::var("VHDX_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(300u64);
    let mut rng = Rng::new(0xfeed);
    let fix = |p: &Path, at: u64, size: usize, field: usize| {
        let mut buf = peek(p, size, at);
        buf[field..field + 4].fill(0);
        let sum = !buf.iter().fold(0u32, |s, b| s.wrapping_add(*b as u32));
        poke(p, &sum.to_be_bytes(), at + field as u64);
    };
    for _ in 0..rounds {
        let p = copy_of(&good, &dir, "fuzz.vhd");
        for _ in 0..1 + rng.below(6) {
            let at = match rng.below(3) {
                0 => rng.below(512),
                1 => 512 + rng.below(1024),
                _ => 1536 + rng.below(64),
            };
            poke(&p, &[rng.next_u64() as u8], at);
        }
        fix(&p, 0, 512, 64);
        fix(&p, 512, 1024, 36);
        let footer = peek(&p, 512, 0);
        poke(&p, &footer, len - 512);
        vdisk_vhdx::fuzzing::exercise(&VpcFormat, &p);
    }
}
