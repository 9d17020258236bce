//! Writing VHDX: a random-operation model test (several threads, reopen) on dynamic, fixed
//! and differencing images vdisk creates; afterwards qemu-img checks the image clean and
//! reads exactly what we read. A differencing chain (base + two layers) reads the same as a
//! flattened copy, and block status tells which layer each extent comes from.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{have_qemu, read_all, run, Scratch};
use vdisk_block::format::ImageOpener;
use vdisk_block::testing::ModelTest;
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, Result};
use vdisk_vhdx::VhdxFormat;

const MIB: u64 = 1 << 20;

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

fn qemu_agrees(path: &Path, dir: &Scratch) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(path)
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = dir.path("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(path)
        .arg(&raw));
    let img = VhdxFormat.open(path, &options(false)).expect("reopen");
    assert!(read_all(img.as_ref()) == std::fs::read(&raw).expect("raw"));
}

#[test]
fn model_test_on_dynamic_and_fixed_images() {
    let dir = Scratch::new("write-model");
    for (name, size, opts, resizes) in [
        (
            "dyn1m.vhdx",
            24 * MIB + 512,
            "block_size=1M",
            vec![30 * MIB + 512, 10 * MIB + 1024, 26 * MIB],
        ),
        ("dyn8m.vhdx", 40 * MIB, "", vec![20 * MIB - 4096, 48 * MIB]),
        (
            "fixed.vhdx",
            12 * MIB,
            "subformat=fixed,block_size=1M,block_state_zero=off",
            vec![16 * MIB],
        ),
        (
            "fixedzero.vhdx",
            12 * MIB,
            "subformat=fixed,block_size=2M",
            vec![],
        ),
    ] {
        let path = dir.path(name);
        create(&path, size, opts);
        let report = ModelTest::new(size)
            .threads(3)
            .ops(150)
            .seed(size ^ name.len() as u64)
            .max_io(256 * 1024)
            .large_io(3 * MIB)
            .reopen(true)
            .resize_steps(&resizes)
            .run(|| VhdxFormat.open(&path, &options(true)))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.writes > 0 && report.discards > 0);
        if have_qemu() {
            qemu_agrees(&path, &dir);
        }
    }
}

fn fill(img: &dyn BlockDev, seed: u8, pieces: &[(u64, u64)]) {
    for &(off, len) in pieces {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        img.write_at(&data, off).expect("write");
    }
    img.flush().expect("flush");
}

fn chain(dir: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.path("base.vhdx");
    let mid = dir.path("mid.vhdx");
    let top = dir.path("top.vhdx");
    create(&base, 16 * MIB, "block_size=1M");
    fill(
        VhdxFormat
            .open(&base, &options(true))
            .expect("base")
            .as_ref(),
        1,
        &[(0, 3 * MIB), (5 * MIB + 100, 700_000), (15 * MIB, MIB)],
    );
    create(&mid, 0, "backing_file=base.vhdx,block_size=1M");
    fill(
        VhdxFormat.open(&mid, &options(true)).expect("mid").as_ref(),
        2,
        &[(MIB + 4096, 8192), (8 * MIB, 2 * MIB)],
    );
    create(
        &top,
        0,
        "backing_file=mid.vhdx,backing_fmt=vhdx,block_size=1M",
    );
    let t = VhdxFormat.open(&top, &options(true)).expect("top");
    fill(t.as_ref(), 3, &[(9 * MIB - 30, 20), (12 * MIB, 4096)]);
    t.write_zeroes(2 * MIB, MIB, vdisk_block::ZeroMode::MayUnmap)
        .expect("zero a whole block");
    t.flush().expect("flush");
    (base, mid, top)
}

#[test]
fn a_differencing_chain_reads_like_its_flattened_copy() {
    let dir = Scratch::new("chain");
    let (base, _mid, top) = chain(&dir);
    // The flattened model: the same writes applied to one plain image.
    let flat = dir.path("flat.vhdx");
    create(&flat, 16 * MIB, "block_size=1M");
    {
        let f = VhdxFormat.open(&flat, &options(true)).expect("flat");
        fill(
            f.as_ref(),
            1,
            &[(0, 3 * MIB), (5 * MIB + 100, 700_000), (15 * MIB, MIB)],
        );
        fill(f.as_ref(), 2, &[(MIB + 4096, 8192), (8 * MIB, 2 * MIB)]);
        fill(f.as_ref(), 3, &[(9 * MIB - 30, 20), (12 * MIB, 4096)]);
        f.write_zeroes(2 * MIB, MIB, vdisk_block::ZeroMode::MayUnmap)
            .expect("zero");
    }
    let top_img = VhdxFormat.open(&top, &options(false)).expect("open chain");
    let flat_img = VhdxFormat.open(&flat, &options(false)).expect("open flat");
    assert_eq!(top_img.size(), 16 * MIB);
    assert!(read_all(top_img.as_ref()) == read_all(flat_img.as_ref()));

    // The split read path agrees with read_at: host ranges are read from their file,
    // zeroes are zeroes, indirect ranges go through read_at.
    let whole = read_all(top_img.as_ref());
    let mut rebuilt = Vec::new();
    let mut pos = 0u64;
    for seg in top_img.resolve_read(0, 16 * MIB).expect("resolve") {
        let n = seg.len() as usize;
        let mut buf = vec![0u8; n];
        match seg {
            vdisk_block::ReadSegment::Host { file, offset, .. } => {
                file.read_at(&mut buf, offset).expect("host read")
            }
            vdisk_block::ReadSegment::Zero { .. } => {}
            vdisk_block::ReadSegment::Indirect { .. } => {
                top_img.read_at(&mut buf, pos).expect("indirect read")
            }
        }
        rebuilt.extend_from_slice(&buf);
        pos += n as u64;
    }
    assert!(rebuilt == whole, "resolve_read disagrees with read_at");

    // Which layer holds each extent: walk block status down the chain.
    let layer_of = |off: u64| -> (usize, bool) {
        let mut dev: Arc<dyn BlockDev> = Arc::clone(&top_img);
        let mut depth = 0;
        loop {
            let st = dev.block_status(off, 1).expect("status");
            if st.allocated {
                return (depth, st.data);
            }
            match dev.backing() {
                Some(b) => {
                    dev = b;
                    depth += 1;
                }
                None => return (depth, false),
            }
        }
    };
    assert_eq!(layer_of(9 * MIB - 25), (0, true), "written in top");
    assert_eq!(
        layer_of(2 * MIB + 5),
        (0, false),
        "zeroed in top hides the base"
    );
    assert_eq!(layer_of(MIB + 5000), (1, true), "written in mid");
    assert_eq!(layer_of(9 * MIB + 5), (1, true));
    assert_eq!(
        layer_of(8 * MIB + 5),
        (0, true),
        "copied up whole by the write in top"
    );
    assert_eq!(layer_of(0), (2, true), "only in base");
    assert_eq!(layer_of(4 * MIB), (2, false), "a hole everywhere");

    // The parent linkage is checked: rewriting the base breaks the chain.
    {
        let b = VhdxFormat.open(&base, &options(true)).expect("base rw");
        b.write_at(&[9u8; 512], 0).expect("write");
    }
    let err = common::must_fail(
        VhdxFormat.open(&top, &options(false)),
        "a changed parent must be refused",
    );
    assert!(err.to_string().contains("DataWriteGuid"), "{err}");
}

#[test]
fn model_test_on_a_differencing_image() {
    let dir = Scratch::new("diff-model");
    let base = dir.path("base.vhdx");
    create(&base, 12 * MIB, "block_size=1M");
    fill(
        VhdxFormat
            .open(&base, &options(true))
            .expect("base")
            .as_ref(),
        5,
        &[(0, 5 * MIB), (7 * MIB + 3, 3 * MIB)],
    );
    let child = dir.path("child.vhdx");
    create(&child, 0, "backing_file=base.vhdx");
    ModelTest::new(12 * MIB)
        .threads(2)
        .ops(150)
        .seed(99)
        .max_io(200 * 1024)
        .large_io(2 * MIB)
        .initial_zero(false)
        .resize_steps(&[9 * MIB, 14 * MIB])
        .reopen(true)
        .run(|| VhdxFormat.open(&child, &options(true)))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_parent_loop_is_refused() {
    use std::os::unix::fs::FileExt;
    use vdisk_vhdx::vhdx::header::{choose_current, HEADER_OFFSETS, HEADER_SIZE};
    let dir = Scratch::new("loop");
    let a = dir.path("a.vhdx");
    let b = dir.path("b.vhdx");
    create(&a, 4 * MIB, "block_size=1M");
    create(&b, 0, "backing_file=a.vhdx");
    let a_guid = vdisk_vhdx::vhdx::parent::data_write_guid(&a).expect("guid");
    // Replace a by a child of b that carries a's old DataWriteGuid: b -> a -> b, with every
    // linkage matching.
    let c = dir.path("c.vhdx");
    create(&c, 0, "backing_file=b.vhdx");
    std::fs::rename(&c, &a).expect("rename");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a)
        .expect("open");
    let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
    for (buf, off) in raw.iter_mut().zip(HEADER_OFFSETS) {
        f.read_exact_at(buf, off).expect("read header");
    }
    let (_, mut h) = choose_current([&raw[0], &raw[1]]).expect("header");
    h.data_write_guid = a_guid;
    for off in HEADER_OFFSETS {
        f.write_all_at(&h.encode(), off).expect("write header");
    }
    drop(f);
    let err = common::must_fail(VhdxFormat.open(&b, &options(false)), "a loop must fail");
    assert!(err.to_string().contains("loop"), "{err}");
}
