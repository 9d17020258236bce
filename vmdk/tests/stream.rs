//! The streamOptimized writer: what it writes must pass `qemu-img check`, read back through
//! qemu-img byte for byte, and have VMware's layout (grain markers, GT/GD markers, footer,
//! end-of-stream marker), checked structurally here.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{read_all, Scratch};
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, Format, OpenOptions, ZeroMode};
use vdisk_vmdk::header::{Marker, SparseHeader, GD_AT_END};
use vdisk_vmdk::VmdkFormat;

fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn create(path: &Path, size: u64) {
    let options = CreateOptions {
        size,
        options: CreateOptions::parse_options("subformat=streamOptimized,adapter_type=lsilogic")
            .expect("options"),
    };
    VmdkFormat.create(path, options).expect("create");
}

fn open(path: &Path, writable: bool) -> Arc<dyn BlockDev> {
    let options = OpenOptions {
        writable,
        ..OpenOptions::default()
    };
    VmdkFormat
        .open(path, &options)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// qemu-img checks the image and reads exactly `want`; so do we.
fn agrees(path: &Path, want: &[u8], scratch: &Scratch) {
    let p = path.to_str().expect("utf8");
    let check = qemu(&["check", "-f", "vmdk", p]);
    assert!(check.contains("No errors were found"), "{check}");
    let raw = scratch.path("oracle.raw");
    qemu(&[
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        p,
        raw.to_str().expect("utf8"),
    ]);
    let theirs = std::fs::read(&raw).expect("oracle output");
    std::fs::remove_file(&raw).expect("remove");
    assert_eq!(theirs.len(), want.len());
    assert!(theirs == want, "qemu-img reads other contents");
    assert!(
        read_all(open(path, false).as_ref()) == want,
        "we read other contents"
    );
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Walks the whole file from the first grain and checks VMware's stream layout.
fn check_layout(path: &Path) {
    let bytes = std::fs::read(path).expect("read");
    let header = SparseHeader::decode(&bytes).expect("header");
    assert_eq!(header.version, 3);
    assert_eq!(
        header.flags, 0x30001,
        "newline test, compressed, markers; no redundant GD"
    );
    assert_eq!(
        header.gd_offset, GD_AT_END,
        "the first header defers to the footer"
    );
    assert_eq!(header.compress_algorithm, 1);
    let mut at = (header.overhead * 512) as usize;
    let mut grains = Vec::new();
    // Grain markers.
    loop {
        let m = Marker::decode(&bytes[at..]).expect("marker");
        if m.size == 0 {
            break;
        }
        assert_eq!(
            m.val % header.grain_sectors,
            0,
            "grain markers carry grain LBAs"
        );
        assert_eq!(&bytes[at + 12..at + 14], &[0x78, 0x9c], "zlib streams");
        grains.push((m.val, at as u64 / 512));
        at += (12 + m.size as usize).div_ceil(512) * 512;
    }
    // Grain tables, each behind its marker.
    let mut tables = Vec::new();
    loop {
        let m = Marker::decode(&bytes[at..]).expect("marker");
        assert_eq!(m.size, 0);
        if m.kind != 1 {
            break;
        }
        assert_eq!(m.val, 4, "a grain table is 4 sectors");
        tables.push(at as u64 / 512 + 1);
        at += 512 * 5;
    }
    let gd_marker = Marker::decode(&bytes[at..]).expect("gd marker");
    assert_eq!((gd_marker.size, gd_marker.kind), (0, 2), "GD marker");
    let gd_at = at + 512;
    at = gd_at + gd_marker.val as usize * 512;
    let footer_marker = Marker::decode(&bytes[at..]).expect("footer marker");
    assert_eq!(
        (footer_marker.val, footer_marker.size, footer_marker.kind),
        (1, 0, 3)
    );
    let footer = SparseHeader::decode(&bytes[at + 512..]).expect("footer");
    assert_eq!(
        footer.gd_offset,
        gd_at as u64 / 512,
        "the footer points at the GD"
    );
    assert_eq!(
        SparseHeader {
            gd_offset: GD_AT_END,
            ..footer.clone()
        },
        header,
        "the footer is the header with the real gdOffset"
    );
    let eos = &bytes[at + 1024..at + 1536];
    assert!(eos.iter().all(|&b| b == 0), "end-of-stream marker");
    assert_eq!(at + 1536, bytes.len(), "the stream ends the file");
    // Every grain is in its table, and every table in the directory.
    for (lba, sector) in grains {
        let grain = lba / header.grain_sectors;
        let gd_entry = u32_at(&bytes, gd_at + (grain / 512) as usize * 4) as u64;
        assert!(
            tables.contains(&gd_entry),
            "grain {grain}'s table is one of the written ones"
        );
        let gte = u32_at(
            &bytes,
            (gd_entry * 512) as usize + (grain % 512) as usize * 4,
        ) as u64;
        assert_eq!(gte, sector, "grain {grain}");
    }
}

#[test]
fn a_new_stream_is_valid_and_empty() {
    let scratch = Scratch::new("stream-empty");
    let path = scratch.path("s.vmdk");
    create(&path, (64 << 20) + 1000);
    check_layout(&path);
    let size = open(&path, false).size();
    assert_eq!(size, (64 << 20) + 1024, "sizes round up to sectors");
    agrees(&path, &vec![0u8; size as usize], &scratch);
}

#[test]
fn written_streams_read_back_and_keep_vmwares_layout() {
    let scratch = Scratch::new("stream-write");
    let path = scratch.path("s.vmdk");
    let size = (40u64 << 20) + 3 * 512;
    create(&path, size);
    let mut model = vec![0u8; size as usize];
    let dev = open(&path, true);
    // Whole grains from several threads, partial grains pieced together, a write in the last
    // partial grain, and zeroes over unwritten space.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = &dev;
            s.spawn(move || {
                for i in 0..40u64 {
                    let grain = t * 40 + i;
                    let data = vec![(grain % 250) as u8 + 1; 65536];
                    dev.write_at(&data, grain * 65536).expect("whole grain");
                }
            });
        }
    });
    for grain in 0..160u64 {
        let at = (grain * 65536) as usize;
        model[at..at + 65536].fill((grain % 250) as u8 + 1);
    }
    let base = 33u64 << 20;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    dev.write_at(&data[100_000..], base + 100_000)
        .expect("second half first");
    dev.write_at(&data[..100_000], base)
        .expect("then the first half");
    model[base as usize..base as usize + 200_000].copy_from_slice(&data);
    dev.write_at(&[0xee; 1000], size - 1200)
        .expect("tail grain");
    model[(size - 1200) as usize..(size - 200) as usize].fill(0xee);
    dev.write_zeroes(20 << 20, 1 << 20, ZeroMode::MayUnmap)
        .expect("zeroes");
    // Reads see pending and written grains before any flush.
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, size - 4096).expect("read pending");
    assert!(buf[..] == model[(size - 4096) as usize..]);
    dev.flush().expect("flush");
    let err = dev.write_at(&[1; 512], 0).expect_err("append-only");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    drop(dev);
    check_layout(&path);
    agrees(&path, &model, &scratch);

    // Reopen and append more, including grains of tables that already exist.
    let dev = open(&path, true);
    dev.write_at(&vec![0x42; 131072], 36 << 20)
        .expect("append after reopen");
    model[(36 << 20) as usize..(36 << 20) as usize + 131072].fill(0x42);
    dev.flush().expect("flush");
    drop(dev);
    check_layout(&path);
    agrees(&path, &model, &scratch);
}

#[test]
fn an_unflushed_writer_still_leaves_a_complete_stream() {
    let scratch = Scratch::new("stream-drop");
    let path = scratch.path("s.vmdk");
    create(&path, 1 << 20);
    let dev = open(&path, true);
    dev.write_at(&[7u8; 3000], 5000).expect("partial grain");
    drop(dev);
    check_layout(&path);
    let mut model = vec![0u8; 1 << 20];
    model[5000..8000].fill(7);
    agrees(&path, &model, &scratch);
}

#[test]
fn qemu_streams_cannot_be_appended_to() {
    let scratch = Scratch::new("stream-qemu");
    let path = scratch.path("q.vmdk");
    qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        path.to_str().expect("utf8"),
        "1M",
    ]);
    let options = OpenOptions::read_write();
    let err = VmdkFormat
        .open(&path, &options)
        .map(|_| ())
        .expect_err("qemu layout");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn grains_of_zeroes_are_not_stored() {
    let scratch = Scratch::new("stream-zero");
    let path = scratch.path("s.vmdk");
    create(&path, 4 << 20);
    let dev = open(&path, true);
    dev.write_at(&vec![0u8; 2 << 20], 0).expect("zeroes");
    dev.write_at(&vec![9u8; 65536], 2 << 20).expect("data");
    dev.flush().expect("flush");
    let st = dev.block_status(0, 4 << 20).expect("status");
    assert!(!st.allocated && st.len == 2 << 20, "{st:?}");
    drop(dev);
    check_layout(&path);
    let mut model = vec![0u8; 4 << 20];
    model[2 << 20..(2 << 20) + 65536].fill(9);
    agrees(&path, &model, &scratch);
}

#[test]
fn a_stream_whose_tables_alias_is_not_appended_to() {
    let scratch = Scratch::new("stream-alias");
    let path = scratch.path("s.vmdk");
    create(&path, 64 << 20);
    let dev = open(&path, true);
    dev.write_at(&[1u8; 65536], 0).expect("grain in table 0");
    dev.write_at(&[2u8; 65536], 40 << 20)
        .expect("grain in table 1");
    dev.flush().expect("flush");
    drop(dev);
    let mut bytes = std::fs::read(&path).expect("read");
    let len = bytes.len();
    let footer = SparseHeader::decode(&bytes[len - 1024..]).expect("footer");
    let gd = (footer.gd_offset * 512) as usize;
    let first = u32_at(&bytes, gd);
    bytes[gd + 4..gd + 8].copy_from_slice(&first.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let err = VmdkFormat
        .open(&path, &OpenOptions::read_write())
        .map(|_| ())
        .expect_err("aliased tables");
    assert!(err.message().contains("share"), "{err}");
}
