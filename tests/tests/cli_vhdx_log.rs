//! A VHDX whose log still needs replaying (a host crashed mid-update), through `check`,
//! `info` and `convert`, with qemu-img as the oracle and vdisk under the name `qemu-img`.

use std::os::unix::fs::FileExt;
use std::path::Path;

use vdisk_block::{CreateOptions, Format, OpenOptions};
use vdisk_tests::{dropin_link, qemu_img, run_with_path, Run, Scratch};
use vdisk_vhdx::guid::Guid;
use vdisk_vhdx::vhdx::header::HEADER_OFFSETS;
use vdisk_vhdx::vhdx::log::{encode_entry, LogWrite};
use vdisk_vhdx::{VhdxFormat, VhdxImage};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const MIB: u64 = 1 << 20;

fn poke(path: &Path, data: &[u8], at: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .write_all_at(data, at)
        .expect("write");
}

/// An 8 MiB dynamic VHDX with data in blocks 0 and 4, and a log entry (not yet replayed)
/// that moves block 4 into block 6's BAT slot.
fn dirty_log_image(path: &Path) {
    VhdxFormat
        .create(
            path,
            CreateOptions {
                size: 8 * MIB,
                options: CreateOptions::parse_options("block_size=1M").expect("opts"),
            },
        )
        .expect("create");
    {
        let img = VhdxFormat
            .open(path, &OpenOptions::read_write())
            .expect("open");
        img.write_at(&[1u8; 3000], 5).expect("write");
        img.write_at(&[2u8; 3000], 4 * MIB).expect("write");
    }
    let (header, regions) = {
        let img = VhdxImage::open(path, &OpenOptions::read_only()).expect("open");
        (img.header(), *img.regions())
    };
    let mut sector = vec![0u8; 4096];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut sector, regions.bat.offset)
        .expect("read");
    let e4 = sector[32..40].to_vec();
    sector[48..56].copy_from_slice(&e4);
    sector[32..40].fill(0);
    let guid = Guid([9; 16]);
    let len = std::fs::metadata(path).expect("stat").len();
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
    poke(path, &entry, header.log_offset);
    let mut h = header.clone();
    h.sequence += 1;
    h.log_guid = guid;
    for off in HEADER_OFFSETS {
        poke(path, &h.encode(), off);
    }
}

/// Runs `args` with qemu-img and drop-in vdisk, each on a fresh copy of the image, and
/// requires the same exit code, stdout and stderr. Returns both results.
fn same(s: &Scratch, dropin: &Path, args: &[&str]) -> (Run, Run) {
    let mut runs = Vec::new();
    for (dir, bin) in [("q", None), ("d", dropin.parent())] {
        let d = s.sub(dir);
        dirty_log_image(&d.join("a.vhdx"));
        let _ = std::fs::remove_file(d.join("out.raw"));
        runs.push(run_with_path(&d, bin, Path::new("qemu-img"), args));
    }
    let d = runs.pop().expect("drop-in run");
    let q = runs.pop().expect("qemu run");
    assert_eq!(
        d.code, q.code,
        "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
    );
    assert_eq!(d.stdout, q.stdout, "stdout of {args:?}");
    assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
    (q, d)
}

#[test]
fn check_of_a_pending_log_matches_qemu_img() {
    let s = Scratch::new("vhdx-log");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    let (q, _) = same(&s, &dropin, &["check", "a.vhdx"]);
    assert_ne!(q.code, 0, "{q:?}");
    same(&s, &dropin, &["check", "--output=json", "a.vhdx"]);
    let (q, _) = same(&s, &dropin, &["check", "-r", "all", "a.vhdx"]);
    assert_eq!(q.code, 0, "{q:?}");
    same(&s, &dropin, &["check", "-r", "leaks", "a.vhdx"]);
    same(
        &s,
        &dropin,
        &["check", "-r", "all", "--output=json", "a.vhdx"],
    );
    // After either tool's repair the other reads the replayed image the same way.
    for dir in ["q", "d"] {
        let d = s.sub(dir);
        let r = qemu_img(&d, &["check", "a.vhdx"]);
        assert_eq!(r.code, 0, "{dir}: {r:?}");
        let r = qemu_img(&d, &["convert", "-O", "raw", "a.vhdx", "out.raw"]);
        assert_eq!(r.code, 0, "{dir}: {r:?}");
        let data = std::fs::read(d.join("out.raw")).expect("read");
        assert_eq!(
            &data[6 * MIB as usize..6 * MIB as usize + 3000],
            &[2u8; 3000][..]
        );
        assert!(data[4 * MIB as usize..5 * MIB as usize]
            .iter()
            .all(|&b| b == 0));
    }
}
