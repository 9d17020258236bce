//! Differencing VHDs: vdisk creates them against a VHD parent, reads fall through to the
//! parent, writes copy the parent's bytes in first; a random-operation model test (with
//! the parent's contents as the starting model) passes, and a replaced parent is refused.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{read_all, Scratch};
use vdisk_block::format::ImageOpener;
use vdisk_block::testing::ModelTest;
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, Result};
use vdisk_vhdx::VpcFormat;

const MIB: u64 = 1 << 20;

struct VpcOpener;

impl ImageOpener for VpcOpener {
    fn open_image(&self, p: &Path, _f: Option<&str>, o: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        VpcFormat.open(p, o)
    }
}

fn opts(writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        opener: Some(Arc::new(VpcOpener)),
        ..OpenOptions::default()
    }
}

fn create(path: &Path, size: u64, o: &str) -> Result<()> {
    VpcFormat.create(
        path,
        CreateOptions {
            size,
            options: CreateOptions::parse_options(o).expect("options"),
        },
    )
}

fn base(dir: &Scratch) -> std::path::PathBuf {
    let base = dir.path("base.vhd");
    create(&base, 12 * MIB, "force_size=on").expect("create base");
    let b = VpcFormat.open(&base, &opts(true)).expect("open base");
    let data: Vec<u8> = (0..5 * MIB).map(|i| (i % 253) as u8 | 1).collect();
    b.write_at(&data, MIB + 17).expect("write base");
    base
}

#[test]
fn a_differencing_vhd_reads_through_and_writes_over_its_parent() {
    let dir = Scratch::new("vpc-diff");
    let base = base(&dir);
    let child = dir.path("child.vhd");
    create(&child, 0, "backing_file=base.vhd,backing_fmt=vpc").expect("create child");
    let c = VpcFormat.open(&child, &opts(false)).expect("open child");
    let b = VpcFormat.open(&base, &opts(false)).expect("open base");
    assert_eq!(c.size(), b.size());
    assert!(read_all(c.as_ref()) == read_all(b.as_ref()));
    assert_eq!(
        c.info().expect("info").backing_filename.as_deref(),
        Some(".\\base.vhd")
    );
    drop(c);
    ModelTest::new(12 * MIB)
        .threads(2)
        .ops(150)
        .seed(5)
        .max_io(200 * 1024)
        .large_io(3 * MIB)
        .initial_zero(false)
        .reopen(true)
        .run(|| VpcFormat.open(&child, &opts(true)))
        .unwrap_or_else(|e| panic!("{e}"));
    // The parent is untouched by the child's writes.
    let b2 = VpcFormat.open(&base, &opts(false)).expect("open base");
    assert!(read_all(b2.as_ref()) == read_all(b.as_ref()));
}

#[test]
fn a_replaced_parent_is_refused_and_sizes_must_match() {
    let dir = Scratch::new("vpc-diff-bad");
    let base = base(&dir);
    let child = dir.path("child.vhd");
    assert!(create(&child, 5 * MIB, "backing_file=base.vhd").is_err());
    create(&child, 0, "backing_file=base.vhd").expect("create child");
    create(&base, 12 * MIB, "force_size=on").expect("replace the parent");
    let err = common::must_fail(VpcFormat.open(&child, &opts(false)), "replaced parent");
    assert!(err.to_string().contains("unique ID"), "{err}");
    std::fs::remove_file(&base).expect("remove");
    let err = common::must_fail(VpcFormat.open(&child, &opts(false)), "missing parent");
    assert!(err.to_string().contains("base.vhd"), "{err}");
}
