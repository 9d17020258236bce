//! The VHDX payload block states UNDEFINED (1) and UNMAPPED (3, and 5 of the 0.95 draft),
//! which neither vdisk nor qemu writes but Hyper-V may: BAT entries of a qemu-made image
//! are patched to them (keeping or dropping the file offset) and the image must read as
//! qemu-img reads it (zeroes, the old data unreachable), report those blocks as holes, and
//! check clean with both tools. In a differencing image (qemu cannot open those) UNDEFINED
//! falls through to the parent and UNMAPPED reads zeroes that hide it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{have_qemu, read_all, run, Scratch};
use vdisk_block::format::ImageOpener;
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, RepairMode, Result};
use vdisk_vhdx::vhdx::bat;
use vdisk_vhdx::{VhdxFormat, VhdxImage};

const MIB: u64 = 1 << 20;
const UNDEFINED: u64 = 1;
const UNMAPPED: u64 = 3;
const UNMAPPED_V095: u64 = 5;

/// Rewrites the payload BAT entry of `block` with `state`, keeping its offset or not.
fn patch(path: &Path, block: u64, state: u64, keep_offset: bool) {
    let (at, entry) = {
        let img = VhdxImage::open(
            path,
            &OpenOptions {
                no_backing: true,
                ..OpenOptions::read_only()
            },
        )
        .expect("open");
        let index = bat::payload_index(block, img.params().chunk_ratio());
        (
            img.regions().bat.offset + index * 8,
            img.bat_entry(index).expect("entry"),
        )
    };
    let offset = if keep_offset {
        bat::file_offset(entry)
    } else {
        0
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .write_all_at(&bat::make_entry(state, offset).to_le_bytes(), at)
        .expect("write");
}

#[test]
fn undefined_and_unmapped_blocks_read_as_qemu_reads_them() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("states");
    let image = dir.path("states.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&image)
        .arg("8M"));
    let mut io = Command::new("qemu-io");
    io.args(["-f", "vhdx"]);
    for block in 0..6u64 {
        io.args([
            "-c",
            &format!("write -P {:#x} {}M 1M", 0x11 * (block + 1), block),
        ]);
    }
    run(io.arg(&image));
    // Block 0 stays FULLY_PRESENT; 1-5 take the rare states, with and without an offset.
    patch(&image, 1, UNDEFINED, true);
    patch(&image, 2, UNDEFINED, false);
    patch(&image, 3, UNMAPPED, true);
    patch(&image, 4, UNMAPPED, false);
    patch(&image, 5, UNMAPPED_V095, true);

    let raw = dir.path("qemu.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&image)
        .arg(&raw));
    let theirs = std::fs::read(&raw).expect("raw");
    let img = VhdxFormat
        .open(&image, &OpenOptions::read_only())
        .expect("open");
    let ours = read_all(img.as_ref());
    assert!(ours == theirs, "vdisk reads other bytes than qemu-img");
    // Not only equal: the patched blocks' old data is unreachable.
    let m = MIB as usize;
    assert!(
        ours[..m].iter().all(|&b| b == 0x11),
        "block 0 lost its data"
    );
    assert!(
        ours[m..6 * m].iter().all(|&b| b == 0),
        "UNDEFINED/UNMAPPED blocks show data"
    );
    for block in 1..6 {
        let st = img.block_status(block * MIB, MIB).expect("status");
        assert!(
            st.zero && !st.data && st.host.is_none() && st.len == MIB,
            "block {block}: {st:?}"
        );
    }
    let st = img.block_status(0, MIB).expect("status");
    assert!(st.data && st.host.is_some(), "block 0: {st:?}");
    drop(img);

    let report = VhdxFormat
        .check(&image, &OpenOptions::read_only(), RepairMode::None)
        .expect("check");
    assert!(
        report.corruptions == 0 && report.leaks == 0 && report.messages.is_empty(),
        "{report:?}"
    );
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&image)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "qemu-img check: {out:?}");
}

struct VhdxOpener;

impl ImageOpener for VhdxOpener {
    fn open_image(&self, p: &Path, _f: Option<&str>, o: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        VhdxFormat.open(p, o)
    }
}

fn create(path: &Path, size: u64, o: &str) {
    VhdxFormat
        .create(
            path,
            CreateOptions {
                size,
                options: CreateOptions::parse_options(o).expect("options"),
            },
        )
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

#[test]
fn in_a_differencing_image_undefined_falls_through_and_unmapped_hides_the_parent() {
    let dir = Scratch::new("states-diff");
    let parent = dir.path("parent.vhdx");
    create(&parent, 4 * MIB, "block_size=1M");
    let p = VhdxFormat
        .open(&parent, &OpenOptions::read_write())
        .expect("open parent");
    p.write_at(&vec![0x5a; 4 * MIB as usize], 0)
        .expect("write parent");
    p.flush().expect("flush");
    drop(p);
    let child = dir.path("child.vhdx");
    create(&child, 0, "block_size=1M,backing_file=parent.vhdx");
    let opts = |writable| OpenOptions {
        writable,
        opener: Some(Arc::new(VhdxOpener)),
        ..OpenOptions::default()
    };
    let c = VhdxFormat.open(&child, &opts(true)).expect("open child");
    c.write_at(&vec![0xc3; 3 * MIB as usize], 0)
        .expect("write child");
    c.flush().expect("flush");
    drop(c);
    patch(&child, 1, UNDEFINED, true);
    patch(&child, 2, UNMAPPED, true);

    let c = VhdxFormat.open(&child, &opts(false)).expect("open child");
    let got = read_all(c.as_ref());
    let m = MIB as usize;
    assert!(
        got[..m].iter().all(|&b| b == 0xc3),
        "block 0: the child's data"
    );
    assert!(
        got[m..2 * m].iter().all(|&b| b == 0x5a),
        "block 1 (UNDEFINED): the parent's data"
    );
    assert!(
        got[2 * m..3 * m].iter().all(|&b| b == 0),
        "block 2 (UNMAPPED): zeroes hiding the parent"
    );
    assert!(
        got[3 * m..].iter().all(|&b| b == 0x5a),
        "block 3 (NOT_PRESENT): the parent's data"
    );
    // Block status says which layer decides: the parent for UNDEFINED, this one for UNMAPPED.
    let st = c.block_status(MIB, MIB).expect("status");
    assert!(!st.allocated && !st.data, "UNDEFINED: {st:?}");
    let st = c.block_status(2 * MIB, MIB).expect("status");
    assert!(st.allocated && st.zero && !st.data, "UNMAPPED: {st:?}");
}
