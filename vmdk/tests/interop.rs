//! Interop with the system qemu-img (the oracle): every VMDK sub-format qemu-img creates,
//! with data written by qemu-io, reads byte for byte as `qemu-img convert -O raw` reads it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{read_all, Scratch};
use vdisk_block::{BlockDev, Format, OpenOptions};
use vdisk_vmdk::VmdkFormat;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for interop tests: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(image: &Path, fmt: &str, commands: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let path = image.to_str().expect("utf8 path");
    args.push(path);
    run("qemu-io", &args);
}

/// Converts `image` to raw with qemu-img; the caller reads what it needs from the result.
fn qemu_raw_file(image: &Path, scratch: &Scratch) -> std::path::PathBuf {
    let raw = scratch.path("oracle.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vmdk",
            "-O",
            "raw",
            image.to_str().expect("utf8"),
            raw.to_str().expect("utf8"),
        ],
    );
    raw
}

fn qemu_raw(image: &Path, scratch: &Scratch) -> Vec<u8> {
    let raw = qemu_raw_file(image, scratch);
    let data = std::fs::read(&raw).expect("read oracle output");
    std::fs::remove_file(&raw).expect("remove oracle output");
    data
}

fn open(image: &Path) -> std::sync::Arc<dyn BlockDev> {
    VmdkFormat
        .open(image, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("open {}: {e}", image.display()))
}

/// Writes that cover: a whole first grain, a partial grain, a run across a grain table
/// boundary (32 MiB at 64 KiB grains), zeroes over data, and the last sector.
const WRITES: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0x12 1000k 100k",
    "write -P 0x77 31m 2m",
    "write -z 31m 64k",
    "write -P 0x5e 47m 3m",
    "write -P 0xee 63m 1m",
];

fn check_whole(image: &Path, scratch: &Scratch) {
    let want = qemu_raw(image, scratch);
    let dev = open(image);
    assert_eq!(dev.size(), want.len() as u64);
    let got = read_all(dev.as_ref());
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "{}: first difference at byte {first_diff:?}",
        image.display()
    );
    // Unaligned small reads through the same code paths.
    for (offset, len) in [
        (1000u64, 3000usize),
        (31 * 1024 * 1024 - 7, 70_000),
        (64 * 1024 * 1024 - 512, 512),
    ] {
        let mut buf = vec![0u8; len];
        dev.read_at(&mut buf, offset).expect("small read");
        assert_eq!(&buf[..], &want[offset as usize..offset as usize + len]);
    }
}

fn create(scratch: &Scratch, name: &str, options: &str, size: &str) -> std::path::PathBuf {
    let image = scratch.path(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            options,
            image.to_str().expect("utf8"),
            size,
        ],
    );
    image
}

#[test]
fn qemu_monolithic_sparse_reads_identically() {
    let scratch = Scratch::new("interop-ms");
    let image = create(&scratch, "ms.vmdk", "subformat=monolithicSparse", "64M");
    qemu_io(&image, "vmdk", WRITES);
    check_whole(&image, &scratch);
}

#[test]
fn qemu_zeroed_grains_read_as_zero() {
    let scratch = Scratch::new("interop-zg");
    let image = create(
        &scratch,
        "zg.vmdk",
        "subformat=monolithicSparse,zeroed_grain=on",
        "64M",
    );
    qemu_io(&image, "vmdk", WRITES);
    // A zeroed grain in the middle of nothing else.
    qemu_io(&image, "vmdk", &["write -z 10m 128k"]);
    check_whole(&image, &scratch);
    let dev = open(&image);
    let st = dev.block_status(10 << 20, 128 << 10).expect("status");
    assert!(st.zero && st.allocated && !st.data, "{st:?}");
}

#[test]
fn qemu_monolithic_flat_reads_identically() {
    let scratch = Scratch::new("interop-mf");
    let image = create(&scratch, "mf.vmdk", "subformat=monolithicFlat", "64M");
    qemu_io(&image, "vmdk", WRITES);
    check_whole(&image, &scratch);
    // A hole of the flat file reads as zeroes and says so (data that reads as zeroes, as
    // qemu reports it); written data says data.
    let dev = open(&image);
    let st = dev.block_status(10 << 20, 1 << 20).expect("status");
    assert!(st.zero && st.data && st.allocated, "{st:?}");
    let st = dev.block_status(47 << 20, 1 << 20).expect("status");
    assert!(st.data && st.host.is_some(), "{st:?}");
}

#[test]
fn qemu_stream_optimized_reads_identically() {
    let scratch = Scratch::new("interop-so");
    let raw = scratch.path("src.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(64 << 20))
        .expect("raw source");
    qemu_io(&raw, "raw", WRITES);
    let image = scratch.path("so.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            raw.to_str().expect("utf8"),
            image.to_str().expect("utf8"),
        ],
    );
    check_whole(&image, &scratch);
    let dev = open(&image);
    let st = dev.block_status(0, 64 << 10).expect("status");
    assert!(st.data && st.compressed && st.host.is_none(), "{st:?}");
    let st = dev.block_status(10 << 20, 64 << 10).expect("status");
    assert!(!st.allocated && st.zero && !st.data, "{st:?}");
}

/// Split disks larger than one 2 GiB extent: compare the windows the writes touched, the
/// extent boundary, and a stride of samples elsewhere (a whole 2.5 GiB compare would make
/// the suite slow for no more coverage).
fn check_split(subformat: &str) {
    let scratch = Scratch::new("interop-split");
    let image = create(
        &scratch,
        "split.vmdk",
        &format!("subformat={subformat}"),
        "2560M",
    );
    let two_g: u64 = 2 << 30;
    let cross = format!("write -P 0x3c {} 1m", two_g - 512 * 1024);
    let late = format!("write -P 0x91 {} 300k", two_g + (300 << 20) + 4096);
    let last = format!("write -P 0x42 {} 64k", (2560u64 << 20) - (64 << 10));
    qemu_io(
        &image,
        "vmdk",
        &["write -P 0xab 0 64k", &cross, &late, &last],
    );
    let extents = std::fs::read_dir(&scratch.0)
        .expect("list")
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().starts_with("split-"))
                .unwrap_or(false)
        })
        .count();
    assert!(
        extents >= 2,
        "{subformat}: expected several extent files, found {extents}"
    );
    let want = std::fs::File::open(qemu_raw_file(&image, &scratch)).expect("oracle output");
    let dev = open(&image);
    assert_eq!(dev.size(), want.metadata().expect("stat").len());
    let mut windows: Vec<(u64, u64)> = vec![
        (0, 128 << 10),
        (two_g - (1 << 20), 2 << 20),
        (two_g + (300 << 20), 1 << 20),
        ((2560u64 << 20) - (1 << 20), 1 << 20),
    ];
    windows.extend((0..2560u64).step_by(97).map(|mib| (mib << 20, 64 << 10)));
    for (offset, len) in windows {
        let mut buf = vec![0u8; len as usize];
        dev.read_at(&mut buf, offset).expect("read");
        let mut expected = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&want, &mut expected, offset).expect("oracle");
        assert!(buf == expected, "{subformat}: window at {offset} differs");
    }
}

#[test]
fn qemu_two_gb_max_extent_sparse_reads_identically() {
    check_split("twoGbMaxExtentSparse");
}

#[test]
fn qemu_two_gb_max_extent_flat_reads_identically() {
    check_split("twoGbMaxExtentFlat");
}

/// Opens parents as VMDK, standing in for the registry in `vdisk_blockjobs`.
struct VmdkOpener;

impl vdisk_block::format::ImageOpener for VmdkOpener {
    fn open_image(
        &self,
        path: &Path,
        format: Option<&str>,
        options: &OpenOptions,
    ) -> vdisk_block::Result<std::sync::Arc<dyn BlockDev>> {
        assert_eq!(
            format,
            Some("vmdk"),
            "a VMDK parent is opened as vmdk, never probed"
        );
        VmdkFormat.open(path, options)
    }
}

fn with_opener() -> OpenOptions {
    OpenOptions {
        opener: Some(std::sync::Arc::new(VmdkOpener)),
        ..OpenOptions::read_only()
    }
}

#[test]
fn qemu_delta_chains_read_through_their_parents() {
    let scratch = Scratch::new("interop-chain");
    let base = create(&scratch, "base.vmdk", "subformat=monolithicSparse", "64M");
    qemu_io(&base, "vmdk", WRITES);
    let mid = scratch.path("mid.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            mid.to_str().expect("utf8"),
        ],
    );
    qemu_io(
        &mid,
        "vmdk",
        &["write -P 0xcd 32k 64k", "write -P 0x01 47m 512"],
    );
    let top = scratch.path("top.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "mid.vmdk",
            "-F",
            "vmdk",
            top.to_str().expect("utf8"),
        ],
    );
    qemu_io(&top, "vmdk", &["write -P 0x02 63m 4k"]);

    let want = qemu_raw(&top, &scratch);
    let dev = VmdkFormat.open(&top, &with_opener()).expect("open chain");
    let got = read_all(dev.as_ref());
    assert!(got == want, "the chain reads differently from qemu-img");
    let info = dev.info().expect("info");
    assert_eq!(info.backing_filename.as_deref(), Some("mid.vmdk"));
    assert!(dev.backing().is_some());
    // Unallocated in the top layer: status says the parent decides.
    let st = dev.block_status(0, 4096).expect("status");
    assert!(!st.allocated && !st.zero, "{st:?}");

    // Without an opener the chain cannot be followed: say so instead of reading zeroes.
    let err = VmdkFormat
        .open(&top, &OpenOptions::read_only())
        .map(|_| ())
        .expect_err("no opener");
    assert!(err.message().contains("opener"), "{err}");
    // no_backing opens the layer alone.
    let alone = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    let dev = VmdkFormat.open(&top, &alone).expect("alone");
    assert!(dev.backing().is_none());

    // A parent written after the delta was taken no longer matches the delta's parentCID.
    qemu_io(&mid, "vmdk", &["write -P 0x09 0 512"]);
    let err = VmdkFormat
        .open(&top, &with_opener())
        .map(|_| ())
        .expect_err("cid mismatch");
    assert!(err.message().contains("parentCID"), "{err}");
}

/// qemu-img cannot create vmfsSparse (COWD) extents and no fixture has one, so this builds
/// one by hand (header, two grain tables of 4096 entries, three grains) and lets qemu-img,
/// reading it through a descriptor, say what it contains.
#[test]
fn hand_built_vmfs_sparse_reads_as_qemu_reads_it() {
    let scratch = Scratch::new("cowd");
    let grain_sectors = 8u32;
    let capacity = 65536u32;
    let mut file = vec![0u8; 90 * 512];
    let header: [u32; 10] = [1, 3, capacity, grain_sectors, 1, 2, 90, 65, 16, 63];
    file[..4].copy_from_slice(b"COWD");
    for (i, v) in header.iter().enumerate() {
        file[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    let put =
        |file: &mut Vec<u8>, at: usize, v: u32| file[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut file, 512, 2); // GD[0] -> GT at sector 2
    put(&mut file, 516, 34); // GD[1] -> GT at sector 34
    for (grain, sector, fill) in [(0usize, 66u32, 0x11u8), (5, 74, 0x22), (4096 + 3, 82, 0x33)] {
        let gt = if grain < 4096 { 2 } else { 34 };
        put(&mut file, gt * 512 + (grain % 4096) * 4, sector);
        let at = sector as usize * 512;
        file[at..at + 4096].fill(fill);
        file[at] = grain as u8;
    }
    std::fs::write(scratch.path("delta.vmdk"), &file).expect("extent");
    let image = scratch.path("disk.vmdk");
    std::fs::write(
        &image,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\n\n\
# Extent description\nRW {capacity} VMFSSPARSE \"delta.vmdk\"\n\n#DDB\n"
        ),
    )
    .expect("descriptor");
    let want = qemu_raw(&image, &scratch);
    assert_eq!(
        want[4096 * 5 + 1],
        0x22,
        "qemu reads the layout this test meant to build"
    );
    let dev = open(&image);
    assert_eq!(read_all(dev.as_ref()), want);
    let st = dev.block_status(4096, 1 << 20).expect("status");
    assert!(!st.allocated && st.len == 4 * 4096, "{st:?}");
    // A COWD file opened directly is its own single extent.
    let direct = open(&scratch.path("delta.vmdk"));
    assert_eq!(read_all(direct.as_ref()), want);
}

/// An ESXi snapshot: a vmfs base (descriptor + flat file) and a vmfsSparse delta naming it
/// with parentFileNameHint; grains the delta lacks come from the base, as qemu-img reads it.
#[test]
fn esxi_snapshot_chain_reads_as_qemu_reads_it() {
    let scratch = Scratch::new("esx-chain");
    let sectors = 65536u32;
    let flat: Vec<u8> = (0..sectors as usize * 512)
        .map(|i| (i / 4096 % 200) as u8 + 1)
        .collect();
    std::fs::write(scratch.path("base-flat.vmdk"), &flat).expect("flat");
    std::fs::write(
        scratch.path("base.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=0172e8a4\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n\
# Extent description\nRW {sectors} VMFS \"base-flat.vmdk\"\n\n#DDB\nddb.adapterType = \"lsilogic\"\n"
        ),
    )
    .expect("base descriptor");
    // The delta: grains of 8 sectors, one table in use, two grains written.
    let mut delta = vec![0u8; 60 * 512];
    let header: [u32; 10] = [1, 3, sectors, 8, 1, 2, 60, 65, 16, 63];
    delta[..4].copy_from_slice(b"COWD");
    for (i, v) in header.iter().enumerate() {
        delta[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    delta[512..516].copy_from_slice(&2u32.to_le_bytes());
    for (grain, sector) in [(1usize, 42u32), (7, 50)] {
        delta[1024 + grain * 4..1028 + grain * 4].copy_from_slice(&sector.to_le_bytes());
        delta[sector as usize * 512..sector as usize * 512 + 4096].fill(0xd0 + grain as u8);
    }
    std::fs::write(scratch.path("snap-delta.vmdk"), &delta).expect("delta");
    let image = scratch.path("snap.vmdk");
    std::fs::write(
        &image,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=0172e8a4\ncreateType=\"vmfsSparse\"\n\
parentFileNameHint=\"base.vmdk\"\n\n# Extent description\nRW {sectors} VMFSSPARSE \"snap-delta.vmdk\"\n\n#DDB\n"
        ),
    )
    .expect("delta descriptor");
    let want = qemu_raw(&image, &scratch);
    assert_eq!(want[4096], 0xd1, "qemu reads the delta's grain");
    assert_eq!(want[0], 1, "qemu reads the base beneath");
    let dev = VmdkFormat.open(&image, &with_opener()).expect("open chain");
    assert!(read_all(dev.as_ref()) == want);
}

/// A delta copied off an ESXi host names its parent by a datastore path that no longer
/// exists; the parent of that name beside the delta is used (and must pass the CID check).
#[test]
fn a_moved_parent_is_found_beside_the_delta() {
    let scratch = Scratch::new("moved-parent");
    let base = create(&scratch, "base.vmdk", "subformat=monolithicSparse", "4M");
    qemu_io(&base, "vmdk", &["write -P 0x44 0 64k"]);
    let top = scratch.path("top.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            top.to_str().expect("utf8"),
        ],
    );
    // Rewrite the embedded hint as ESXi would have written it.
    let mut bytes = std::fs::read(&top).expect("read");
    let text = String::from_utf8_lossy(&bytes[512..512 * 21]).into_owned();
    let moved = text.replace(
        "parentFileNameHint=\"base.vmdk\"",
        "parentFileNameHint=\"/vmfs/volumes/datastore1/vm/base.vmdk\"",
    );
    assert_ne!(moved, text);
    let mut area = moved.into_bytes();
    area.resize(512 * 20, 0);
    bytes[512..512 * 21].copy_from_slice(&area);
    std::fs::write(&top, &bytes).expect("write");
    let dev = VmdkFormat.open(&top, &with_opener()).expect("open");
    let mut buf = vec![0u8; 65536];
    dev.read_at(&mut buf, 0).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0x44),
        "reads through the parent beside it"
    );
}

/// qemu-img's CID of `image`, from `info --output=json`.
fn qemu_cid(image: &Path) -> u32 {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vmdk"])
        .arg(image)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let cid = info["format-specific"]["data"]["cid"]
        .as_u64()
        .expect("cid");
    u32::try_from(cid).expect("32-bit cid")
}

/// A seSparse grain table entry for data in grain number `n` of the grain region: type 3,
/// the low 12 bits of `n` in bits 48..60 and the rest in bits 0..48 (qemu's decoding).
fn sesparse_data_entry(n: u64) -> u64 {
    (3 << 60) | ((n & 0xfff) << 48) | (n >> 12)
}

/// No tool here writes seSparse, so this builds a delta by hand in the layout of the ESXi
/// fixture (constant header, volatile header, journal, directory, tables, bitmap, backmap,
/// grains; 4 KiB grains, 4096-entry tables of u64) over a qemu-made parent: allocated grains
/// (one of them past grain number 4095, where the entry's bits are shuffled), unmapped and
/// zeroed grains (zeroes, never the parent), and unallocated ones (the parent). qemu-img,
/// following the same parentFileNameHint, is the oracle.
#[test]
fn sesparse_delta_reads_through_its_parent_as_qemu_reads_it() {
    use std::os::unix::fs::FileExt;
    let scratch = Scratch::new("sesparse-chain");
    let base = create(&scratch, "base.vmdk", "subformat=monolithicSparse", "64M");
    qemu_io(
        &base,
        "vmdk",
        &["write -P 0x5a 0 20m", "write -P 0x6b 40m 8m"],
    );
    let parent_cid = qemu_cid(&base);
    let sectors = 131072u64;
    let grain_bytes = 4096u64;
    let grains_region = 4098u64;
    // (offset, size) in sectors of the eight regions, in header order.
    let regions: [(u64, u64); 8] = [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
        (8, 128),
        (136, 1),
        (137, 1),
        (144, grains_region * 8),
    ];
    let mut head = vec![0u8; 144 * 512];
    let mut put = |at: usize, v: u64| head[at..at + 8].copy_from_slice(&v.to_le_bytes());
    for (i, v) in [0xcafe_babe, 0x2_0000_0001, sectors, 8, 64]
        .into_iter()
        .enumerate()
    {
        put(i * 8, v);
    }
    for (i, (off, size)) in regions.iter().enumerate() {
        put((10 + 2 * i) * 8, *off);
        put((11 + 2 * i) * 8, *size);
    }
    put(512, 0xcafe_cafe);
    // Directory: entry 0 -> table 0, entry 2 -> table 1 (guest 32..48 MiB).
    put(4 * 512, 0x1000_0000_0000_0000);
    put(4 * 512 + 16, 0x1000_0000_0000_0001);
    let table = |t: usize, i: usize| 8 * 512 + t * 32768 + i * 8;
    // (guest grain, grain number in the region) of the data grains.
    let data = [(0u64, 0u64), (2 * 4096 + 5, 4097), (3, 1)];
    put(table(0, 0), sesparse_data_entry(0));
    put(table(0, 1), 0x1000_0000_0000_0000); // unmapped
    put(table(0, 2), 0x2000_0000_0000_0000); // zeroed
    put(table(0, 3), sesparse_data_entry(1));
    put(table(0, 4), 0); // unallocated: the parent
    put(table(1, 5), sesparse_data_entry(4097));
    let extent = scratch.path("snap-sesparse.vmdk");
    let file = std::fs::File::create(&extent).expect("extent");
    file.write_all_at(&head, 0).expect("head");
    file.set_len((144 + grains_region * 8) * 512)
        .expect("length");
    let mut model = vec![0u8; (sectors * 512) as usize];
    let parent = qemu_raw(&base, &scratch);
    model.copy_from_slice(&parent);
    for (guest, number) in data {
        let bytes: Vec<u8> = (0..grain_bytes)
            .map(|i| (i % 251) as u8 ^ (guest as u8).wrapping_add(0x80))
            .collect();
        file.write_all_at(&bytes, (144 * 512) + number * grain_bytes)
            .expect("grain");
        let at = (guest * grain_bytes) as usize;
        model[at..at + grain_bytes as usize].copy_from_slice(&bytes);
    }
    model[4096..3 * 4096].fill(0);
    drop(file);
    let image = scratch.path("snap.vmdk");
    std::fs::write(
        &image,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID={parent_cid:08x}\ncreateType=\"seSparse\"\n\
parentFileNameHint=\"base.vmdk\"\n\n# Extent description\nRW {sectors} SESPARSE \"snap-sesparse.vmdk\"\n\n#DDB\n"
        ),
    )
    .expect("delta descriptor");

    let want = qemu_raw(&image, &scratch);
    assert!(
        want == model,
        "qemu reads the delta this test meant to build"
    );
    let dev = VmdkFormat.open(&image, &with_opener()).expect("open chain");
    assert!(
        read_all(dev.as_ref()) == want,
        "we read other contents than qemu"
    );
    assert!(dev.backing().is_some());
    let st = dev.block_status(4 * 4096, 4096).expect("status");
    assert!(
        !st.allocated && !st.zero,
        "an unallocated grain defers to the parent: {st:?}"
    );
    let st = dev.block_status(4096, 2 * 4096).expect("status");
    assert!(
        st.zero && !st.data && st.len == 2 * 4096,
        "unmapped and zeroed: {st:?}"
    );

    // The parent changes after the delta was taken: its CID no longer matches.
    qemu_io(&base, "vmdk", &["write -P 0x01 0 512"]);
    assert_ne!(
        qemu_cid(&base),
        parent_cid,
        "qemu-io gave the parent a new CID"
    );
    let err = VmdkFormat
        .open(&image, &with_opener())
        .map(|_| ())
        .expect_err("cid mismatch");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::Corrupt, "{err}");
    assert!(err.message().contains("parentCID"), "{err}");
}
