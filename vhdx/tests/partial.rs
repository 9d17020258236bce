//! PARTIALLY_PRESENT blocks (Hyper-V's differencing images): each logical sector comes from
//! the child or the parent as the sector bitmap says; block status follows the bitmap; a
//! write into such a block completes it from the parent and makes it FULLY_PRESENT.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::{read_all, Scratch};
use vdisk_block::format::ImageOpener;
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, Result};
use vdisk_vhdx::vhdx::bat;
use vdisk_vhdx::{VhdxFormat, VhdxImage};

const MIB: u64 = 1 << 20;

struct VhdxOpener;

impl ImageOpener for VhdxOpener {
    fn open_image(&self, p: &Path, _f: Option<&str>, o: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        VhdxFormat.open(p, o)
    }
}

fn opts(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        opener: Some(Arc::new(VhdxOpener)),
        ..OpenOptions::default()
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
        .expect("create");
}

/// Sector `s` of block 2 is in the child when `(s / 8) % 2 == 0`.
fn in_child(s: u64) -> bool {
    (s / 8).is_multiple_of(2)
}

#[test]
fn partially_present_blocks_follow_the_sector_bitmap() {
    let dir = Scratch::new("partial");
    let base = dir.path("base.vhdx");
    create(&base, 8 * MIB, "block_size=1M");
    {
        let b = VhdxFormat.open(&base, &opts(true)).expect("base");
        b.write_at(&vec![0xbb; 8 * MIB as usize], 0).expect("fill");
    }
    let child = dir.path("child.vhdx");
    create(&child, 0, "backing_file=base.vhdx,block_size=1M");
    let (regions, ratio) = {
        let c = VhdxImage::open(&child, &opts(false)).expect("child");
        (*c.regions(), c.params().chunk_ratio())
    };
    // Hand-build what Hyper-V writes: block 2 PARTIALLY_PRESENT with its data block, and the
    // chunk's sector bitmap block.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&child)
        .expect("open");
    let end = f.metadata().expect("stat").len().next_multiple_of(MIB);
    f.write_all_at(&vec![0xcc; MIB as usize], end)
        .expect("data");
    let mut bitmap = vec![0u8; MIB as usize];
    let sectors_per_block = MIB / 512;
    for s in 0..sectors_per_block {
        if in_child(s) {
            let bit = 2 * sectors_per_block + s;
            bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    f.write_all_at(&bitmap, end + MIB).expect("bitmap");
    let entry = |i: u64, e: u64| {
        f.write_all_at(&e.to_le_bytes(), regions.bat.offset + i * 8)
            .expect("bat");
    };
    entry(bat::payload_index(2, ratio), bat::make_entry(7, end));
    entry(bat::bitmap_index(2, ratio), bat::make_entry(6, end + MIB));
    drop(f);

    let expect = |s: u64| if in_child(s) { 0xcc } else { 0xbb };
    let img = VhdxFormat.open(&child, &opts(false)).expect("open");
    let all = read_all(img.as_ref());
    for s in 0..sectors_per_block {
        let at = (2 * MIB + s * 512) as usize;
        assert!(
            all[at..at + 512].iter().all(|&b| b == expect(s)),
            "sector {s} of block 2"
        );
    }
    assert!(all[..2 * MIB as usize].iter().all(|&b| b == 0xbb));
    // An unaligned read across child and parent runs.
    let mut buf = vec![0u8; 9000];
    img.read_at(&mut buf, 2 * MIB + 3000).expect("read");
    assert_eq!(
        buf,
        all[(2 * MIB + 3000) as usize..(2 * MIB + 12000) as usize]
    );
    // Block status: 4 KiB in the child, then 4 KiB from the parent.
    let st = img.block_status(2 * MIB, MIB).expect("status");
    assert!(st.allocated && st.data && st.len == 4096, "{st:?}");
    let st = img.block_status(2 * MIB + 4096, MIB).expect("status");
    assert!(!st.allocated && st.len == 4096, "{st:?}");
    drop(img);

    // A write completes the block from the parent and makes it FULLY_PRESENT.
    {
        let w = VhdxFormat.open(&child, &opts(true)).expect("rw");
        w.write_at(&[0x11; 100], 2 * MIB + 5000).expect("write");
    }
    let img = VhdxImage::open(&child, &opts(false)).expect("reopen");
    let e = img.bat_entry(bat::payload_index(2, ratio)).expect("entry");
    assert_eq!(bat::state_bits(e), 6);
    let mut want = all.clone();
    want[(2 * MIB + 5000) as usize..(2 * MIB + 5100) as usize].fill(0x11);
    assert!(read_all(&img) == want);
}
