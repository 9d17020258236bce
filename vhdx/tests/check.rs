//! `check` on VHDX: clean images are clean; an unreplayed log refuses a read-only check (as
//! qemu's open does) and is replayed by repair; bad BAT entries are reported, repaired with `-r all`, and the repaired image is clean for us and qemu-img.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::{have_qemu, Scratch};
use vdisk_block::{CreateOptions, Format, OpenOptions, RepairMode};
use vdisk_vhdx::guid::Guid;
use vdisk_vhdx::vhdx::bat;
use vdisk_vhdx::vhdx::header::HEADER_OFFSETS;
use vdisk_vhdx::vhdx::log::{encode_entry, LogWrite};
use vdisk_vhdx::{VhdxFormat, VhdxImage};

const MIB: u64 = 1 << 20;

fn sample(path: &Path) {
    VhdxFormat
        .create(
            path,
            CreateOptions {
                size: 8 * MIB,
                options: CreateOptions::parse_options("block_size=1M").expect("opts"),
            },
        )
        .expect("create");
    let img = VhdxFormat
        .open(path, &OpenOptions::read_write())
        .expect("open");
    img.write_at(&[1u8; 3000], 5).expect("write");
    img.write_at(&[2u8; 3000], 4 * MIB).expect("write");
}

fn poke(path: &Path, data: &[u8], at: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .write_all_at(data, at)
        .expect("write");
}

fn check(path: &Path, repair: RepairMode) -> vdisk_block::CheckReport {
    VhdxFormat
        .check(path, &OpenOptions::read_only(), repair)
        .expect("check runs")
}

fn qemu_clean(path: &Path) {
    if have_qemu() {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "vhdx"])
            .arg(path)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_clean_image_checks_clean() {
    let dir = Scratch::new("check-clean");
    let p = dir.path("a.vhdx");
    sample(&p);
    let r = check(&p, RepairMode::None);
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
    // Like qemu-img, no cluster statistics for VHDX.
    assert_eq!((r.total_clusters, r.image_end_offset), (None, None));
}

#[test]
fn an_unreplayed_log_is_reported_and_replayed_by_repair() {
    let dir = Scratch::new("check-log");
    let p = dir.path("a.vhdx");
    sample(&p);
    let (header, regions) = {
        let img = VhdxImage::open(&p, &OpenOptions::read_only()).expect("open");
        (img.header(), *img.regions())
    };
    let mut sector = vec![0u8; 4096];
    std::fs::File::open(&p)
        .expect("open")
        .read_exact_at(&mut sector, regions.bat.offset)
        .expect("read");
    // The entry moves block 4 to block 6's slot: a visible change only replay makes.
    let e4 = sector[32..40].to_vec();
    sector[48..56].copy_from_slice(&e4);
    sector[32..40].fill(0);
    let guid = Guid([9; 16]);
    let len = std::fs::metadata(&p).expect("stat").len();
    let entry = encode_entry(
        guid,
        3,
        0,
        len,
        len,
        &[LogWrite::Data {
            offset: regions.bat.offset,
            data: sector,
        }],
    );
    poke(&p, &entry, header.log_offset);
    let mut h = header.clone();
    h.sequence += 1;
    h.log_guid = guid;
    for off in HEADER_OFFSETS {
        poke(&p, &h.encode(), off);
    }
    let err = VhdxFormat
        .check(&p, &OpenOptions::read_only(), RepairMode::None)
        .expect_err("qemu refuses a read-only check of a log that needs replaying");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::ReadOnly, "{err}");
    assert!(err.message().contains("needs to be replayed"), "{err}");
    let r = check(&p, RepairMode::All);
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{r:?}");
    let r = check(&p, RepairMode::None);
    assert_eq!(r.corruptions, 0, "{r:?}");
    qemu_clean(&p);
    let img = VhdxFormat
        .open(&p, &OpenOptions::read_only())
        .expect("open");
    let mut buf = vec![0u8; 10];
    img.read_at(&mut buf, 6 * MIB).expect("read");
    assert_eq!(buf, vec![2u8; 10], "the replayed BAT is in the file");
}

#[test]
fn bad_bat_entries_are_reported_and_reset_by_repair() {
    let dir = Scratch::new("check-bat");
    let p = dir.path("a.vhdx");
    sample(&p);
    let regions = *VhdxImage::open(&p, &OpenOptions::read_only())
        .expect("open")
        .regions();
    poke(
        &p,
        &bat::make_entry(6, 1 << 40).to_le_bytes(),
        regions.bat.offset + 2 * 8,
    );
    assert!(VhdxFormat.open(&p, &OpenOptions::read_only()).is_err());
    let r = check(&p, RepairMode::None);
    assert_eq!(r.corruptions, 1, "{r:?}");
    assert!(
        r.messages[0].contains("past the end of the file"),
        "{:?}",
        r.messages
    );
    let r = check(&p, RepairMode::Leaks);
    assert_eq!(r.corruptions, 1, "-r leaks does not touch the BAT");
    let r = check(&p, RepairMode::All);
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{r:?}");
    assert_eq!(check(&p, RepairMode::None).corruptions, 0);
    qemu_clean(&p);
    let img = VhdxFormat
        .open(&p, &OpenOptions::read_only())
        .expect("open");
    let mut buf = vec![0u8; 3000];
    img.read_at(&mut buf, 5).expect("read");
    assert_eq!(buf, vec![1u8; 3000], "data elsewhere survives the repair");
}
