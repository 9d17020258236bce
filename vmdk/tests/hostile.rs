//! Hostile and damaged inputs: extent paths escaping the image's folder, broken grain
//! directories and tables, bad markers and deflate streams. Each must be an `Err` that says
//! what is wrong, never a panic, a hang or a huge allocation.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{read_all, Scratch};
use vdisk_block::{BlockDev, ErrorKind, FollowPolicy, Format, OpenOptions};
use vdisk_vmdk::header::SparseHeader;
use vdisk_vmdk::VmdkFormat;

fn open_with(
    image: &Path,
    policy: FollowPolicy,
) -> vdisk_block::Result<std::sync::Arc<dyn BlockDev>> {
    let options = OpenOptions {
        policy,
        ..OpenOptions::read_only()
    };
    VmdkFormat.open(image, &options)
}

fn open(image: &Path) -> vdisk_block::Result<std::sync::Arc<dyn BlockDev>> {
    open_with(image, FollowPolicy::SameFolder)
}

/// The error of an operation that must fail (the `Ok` side need not be `Debug`).
fn fail<T>(result: vdisk_block::Result<T>, what: &str) -> vdisk_block::Error {
    match result {
        Ok(_) => panic!("{what}: unexpectedly succeeded"),
        Err(e) => e,
    }
}

fn descriptor(extents: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n{extents}\n#DDB\nddb.adapterType = \"ide\"\n"
    )
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write test file");
}

#[test]
fn extents_outside_the_folder_need_permission() {
    let inside = Scratch::new("policy-in");
    let outside = Scratch::new("policy-out");
    let secret = outside.path("secret.raw");
    write(&secret, &[0x5a; 4096]);
    let image = inside.path("evil.vmdk");
    write(
        &image,
        descriptor(&format!("RW 8 FLAT \"{}\" 0", secret.display())).as_bytes(),
    );
    let err = fail(open(&image), "absolute path outside the folder");
    assert_eq!(err.kind(), ErrorKind::PolicyDenied, "{err}");
    assert!(err.to_string().contains("secret.raw"), "{err}");

    let allowed =
        open_with(&image, FollowPolicy::Folders(vec![outside.0.clone()])).expect("allowed folder");
    let data = read_all(allowed.as_ref());
    assert_eq!(data, vec![0x5a; 4096]);
    open_with(&image, FollowPolicy::Anything).expect("anything");

    // Climbing out with ../ is the same attack.
    let rel = format!(
        "../{}/secret.raw",
        outside.0.file_name().expect("name").to_string_lossy()
    );
    write(
        &image,
        descriptor(&format!("RW 8 FLAT \"{rel}\" 0")).as_bytes(),
    );
    assert_eq!(fail(open(&image), "climb").kind(), ErrorKind::PolicyDenied);

    // So is a symlink inside the folder that points outside.
    std::os::unix::fs::symlink(&secret, inside.path("link.raw")).expect("symlink");
    write(&image, descriptor("RW 8 FLAT \"link.raw\" 0").as_bytes());
    assert_eq!(
        fail(open(&image), "symlink").kind(),
        ErrorKind::PolicyDenied
    );

    // FollowPolicy::Nothing refuses even a neighbour.
    write(&inside.path("data.raw"), &[1u8; 4096]);
    write(&image, descriptor("RW 8 FLAT \"data.raw\" 0").as_bytes());
    assert_eq!(
        fail(open_with(&image, FollowPolicy::Nothing), "nothing").kind(),
        ErrorKind::PolicyDenied
    );
    open(&image).expect("a neighbour is fine by default");

    write(&image, descriptor("RW 8 FLAT \"missing.raw\" 0").as_bytes());
    assert_eq!(fail(open(&image), "missing").kind(), ErrorKind::NotFound);
}

#[test]
fn mixed_extents_lay_out_end_to_end() {
    let dir = Scratch::new("mixed");
    let mut flat = vec![0u8; 8192];
    flat[..4096].fill(0x11);
    flat[4096..].fill(0x22);
    write(&dir.path("a.raw"), &flat);
    // Short flat file: bytes past its end read as zeroes (as in qemu).
    write(&dir.path("short.raw"), &[0x33; 1000]);
    let image = dir.path("mixed.vmdk");
    write(
        &image,
        descriptor(
            "RW 8 FLAT \"a.raw\" 8\nRDONLY 4 ZERO\nRW 4 FLAT \"short.raw\" 0\nRW 8 FLAT \"a.raw\" 0",
        )
        .as_bytes(),
    );
    let dev = open(&image).expect("open");
    assert_eq!(dev.size(), 24 * 512);
    let data = read_all(dev.as_ref());
    let mut want = vec![0x22u8; 4096];
    want.extend_from_slice(&[0u8; 2048]);
    want.extend_from_slice(&[0x33; 1000]);
    want.extend_from_slice(&[0u8; 1048]);
    want.extend_from_slice(&flat[..4096]);
    assert_eq!(data, want);
    let st = dev
        .block_status(4096, 100_000.min(dev.size() - 4096))
        .expect("status");
    assert!(st.zero && !st.data && st.len == 2048, "{st:?}");
    let st = dev.block_status(0, dev.size()).expect("status");
    assert!(st.data && st.len == 4096 && st.host.as_ref().map(|h| h.offset) == Some(4096));
}

#[test]
fn noaccess_extents_keep_their_space_but_refuse_reads() {
    let dir = Scratch::new("noaccess");
    write(&dir.path("a.raw"), &[7u8; 4096]);
    let image = dir.path("n.vmdk");
    write(
        &image,
        descriptor("RW 8 FLAT \"a.raw\" 0\nNOACCESS 8 FLAT \"nowhere.raw\" 0").as_bytes(),
    );
    let dev = open(&image).expect("a NOACCESS extent opens no file");
    assert_eq!(dev.size(), 8192);
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 0).expect("accessible part");
    assert!(dev.read_at(&mut buf, 4096).is_err());
}

#[test]
fn unsupported_kinds_are_named_not_skipped() {
    let dir = Scratch::new("unsupported");
    write(&dir.path("a.raw"), &[7u8; 4096]);
    let image = dir.path("u.vmdk");
    for (line, needle) in [
        ("RW 8 VMFSRDM \"a.raw\"", "VMFSRDM"),
        ("RW 8 WEIRD \"a.raw\" 0", "WEIRD"),
        ("WO 8 FLAT \"a.raw\" 0", "WO"),
    ] {
        write(&image, descriptor(line).as_bytes());
        let err = fail(open(&image), line);
        assert!(err.to_string().contains(needle), "{line}: {err}");
    }
    let text = descriptor("RW 8 FLAT \"a.raw\" 0").replace("monolithicFlat", "fullDevice");
    write(&image, text.as_bytes());
    assert_eq!(fail(open(&image), "device").kind(), ErrorKind::Unsupported);
    write(&image, descriptor("").as_bytes());
    assert!(fail(open(&image), "no extents")
        .message()
        .contains("no extents"));
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qemu-made 64 MiB monolithicSparse with its first grain written, and its header.
fn sparse_image(dir: &Scratch) -> (PathBuf, SparseHeader, Vec<u8>) {
    let image = dir.path("s.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        image.to_str().expect("utf8"),
        "64M",
    ]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "vmdk",
            "-c",
            "write -P 0x61 0 64k",
            image.to_str().expect("utf8"),
        ])
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    let bytes = std::fs::read(&image).expect("read");
    let header = SparseHeader::decode(&bytes).expect("header");
    (image, header, bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn patched(dir: &Scratch, bytes: &[u8], at: usize, value: &[u8]) -> PathBuf {
    let mut copy = bytes.to_vec();
    copy[at..at + value.len()].copy_from_slice(value);
    let path = dir.path("patched.vmdk");
    write(&path, &copy);
    path
}

fn read_everything(dev: &dyn BlockDev) -> vdisk_block::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < dev.size() {
        dev.read_at(&mut buf, at)?;
        at += buf.len() as u64;
    }
    Ok(())
}

#[test]
fn damaged_sparse_tables_are_errors() {
    let dir = Scratch::new("sparse-damage");
    let (image, h, bytes) = sparse_image(&dir);
    read_everything(open(&image).expect("intact").as_ref()).expect("intact reads");
    let gd = (h.gd_offset * 512) as usize;
    let gt = u32_at(&bytes, gd) as usize * 512;

    // Grain directory past the end of the file.
    let p = patched(&dir, &bytes, 56, &(1u64 << 40).to_le_bytes());
    let err = fail(open(&p), "gd past eof");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.message().contains("grain directory"), "{err}");

    // A grain table past the end of the file.
    let p = patched(&dir, &bytes, gd, &0x7fff_ffffu32.to_le_bytes());
    let err = read_everything(open(&p).expect("opens").as_ref()).expect_err("gt past eof");
    assert!(err.message().contains("past the end"), "{err}");

    // A grain past the end, and a grain inside the metadata.
    let p = patched(&dir, &bytes, gt, &0x7fff_0000u32.to_le_bytes());
    let err = read_everything(open(&p).expect("opens").as_ref()).expect_err("grain past eof");
    assert!(err.message().contains("past the end"), "{err}");
    let p = patched(&dir, &bytes, gt, &2u32.to_le_bytes());
    let err = read_everything(open(&p).expect("opens").as_ref()).expect_err("grain in metadata");
    assert!(err.message().contains("metadata"), "{err}");

    // Header fields that would size huge tables.
    let p = patched(&dir, &bytes, 12, &(u64::MAX / 256).to_le_bytes());
    assert!(open(&p).is_err());
    let p = patched(&dir, &bytes, 44, &100_000u32.to_le_bytes());
    assert!(fail(open(&p), "gtes").message().contains("L2 table"));
    let p = patched(&dir, &bytes, 20, &0u64.to_le_bytes());
    assert!(fail(open(&p), "grain 0").message().contains("granularity"));

    // Truncation inside the grain area.
    let path = dir.path("cut.vmdk");
    write(&path, &bytes[..bytes.len() - 1000]);
    let err = read_everything(open(&path).expect("opens").as_ref()).expect_err("cut grain");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

/// A qemu-made streamOptimized with one compressed grain at LBA 0.
fn stream_image(dir: &Scratch) -> (PathBuf, Vec<u8>, usize) {
    let raw = dir.path("src.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(1 << 20))
        .expect("raw");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 64k",
            raw.to_str().expect("utf8"),
        ])
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    let image = dir.path("so.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().expect("utf8"),
        image.to_str().expect("utf8"),
    ]);
    let bytes = std::fs::read(&image).expect("read");
    let h = SparseHeader::decode(&bytes).expect("header");
    let gd = (h.gd_offset * 512) as usize;
    let gt = u32_at(&bytes, gd) as usize * 512;
    let marker = u32_at(&bytes, gt) as usize * 512;
    (image, bytes, marker)
}

#[test]
fn damaged_stream_grains_are_errors() {
    let dir = Scratch::new("stream-damage");
    let (image, bytes, marker) = stream_image(&dir);
    let dev = open(&image).expect("intact");
    let mut buf = vec![0u8; 65536];
    dev.read_at(&mut buf, 0).expect("intact grain");
    assert_eq!(buf, vec![0x61; 65536]);

    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        // The marker claims the grain is for another LBA.
        (marker, 128u64.to_le_bytes().to_vec(), "sector 128"),
        // A compressed size of zero, and one past the end of the file.
        (marker + 8, 0u32.to_le_bytes().to_vec(), "compressed size"),
        (
            marker + 8,
            0x7fff_ffffu32.to_le_bytes().to_vec(),
            "compressed size",
        ),
        // A broken deflate stream.
        (marker + 12, vec![0xff; 16], "deflate"),
    ];
    for (at, value, needle) in cases {
        let p = patched(&dir, &bytes, at, &value);
        let dev = open(&p).expect("opens");
        let err = dev.read_at(&mut buf, 0).expect_err(needle);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{needle}: {err}");
        assert!(err.message().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_grain_that_inflates_past_its_size_is_an_error() {
    use flate2::{Compress, Compression, FlushCompress};
    let dir = Scratch::new("bomb");
    let (_, bytes, marker) = stream_image(&dir);
    // 1 MiB of zeroes compresses to about 1 KiB; the grain holds 64 KiB.
    let mut c = Compress::new(Compression::best(), true);
    let mut bomb = vec![0u8; 8192];
    c.compress(&vec![0u8; 1 << 20], &mut bomb, FlushCompress::Finish)
        .expect("compress");
    bomb.truncate(c.total_out() as usize);
    let mut copy = bytes.clone();
    let mut piece = 0u64.to_le_bytes().to_vec();
    piece.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
    piece.extend_from_slice(&bomb);
    copy[marker..marker + piece.len()].copy_from_slice(&piece);
    let path = dir.path("bomb.vmdk");
    write(&path, &copy);
    let dev = open(&path).expect("opens");
    // Both read paths: a piece of the grain (through the grain cache) and the whole grain
    // (inflated straight into the caller's buffer).
    for len in [4096, 65536] {
        let mut buf = vec![0u8; len];
        let err = dev.read_at(&mut buf, 0).expect_err("bomb");
        assert!(err.message().contains("more than a grain"), "{len}: {err}");
    }
}

#[test]
fn a_stream_with_a_bad_footer_is_refused() {
    let dir = Scratch::new("footer");
    let (_, bytes, _) = stream_image(&dir);
    // Claim the grain directory is at the end while the tail holds no footer.
    let p = patched(&dir, &bytes, 56, &u64::MAX.to_le_bytes());
    let err = fail(open(&p), "no footer");
    assert!(err.message().contains("Invalid footer"), "{err}");
}

/// qemu-img check's exit code and stderr.
fn qemu_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vmdk"])
        .arg(path)
        .output()
        .expect("qemu-img");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_finds_what_qemu_finds() {
    use vdisk_block::RepairMode;
    let dir = Scratch::new("check");
    let (image, h, bytes) = sparse_image(&dir);
    let report = VmdkFormat
        .check(&image, &OpenOptions::read_only(), RepairMode::None)
        .expect("check");
    assert_eq!(report.corruptions, 0, "{:?}", report.messages);
    let gt = u32_at(&bytes, (h.gd_offset * 512) as usize) as usize * 512;
    // Two grains past the end of the file.
    let mut copy = bytes.clone();
    copy[gt + 4..gt + 8].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    copy[gt + 40..gt + 44].copy_from_slice(&0x7fff_1000u32.to_le_bytes());
    let path = dir.path("bad.vmdk");
    write(&path, &copy);
    let report = VmdkFormat
        .check(&path, &OpenOptions::read_only(), RepairMode::None)
        .expect("check runs");
    assert_eq!(report.corruptions, 2, "{:?}", report.messages);
    assert_eq!(
        report.messages[0],
        "ERROR: cluster offset for sector 128 points after EOF"
    );
    // qemu-img 10 stops at the first such grain ("Check failed", exit 1); we report every
    // one. The first finding is worded the same.
    let (rc, stderr) = qemu_check(&path);
    assert_eq!(rc, 1);
    assert!(stderr.contains(&report.messages[0]), "{stderr}");
}

fn open_rw(image: &Path) -> vdisk_block::Result<std::sync::Arc<dyn BlockDev>> {
    VmdkFormat.open(image, &OpenOptions::read_write())
}

fn qemu_io_fails_rw(image: &Path) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write 0 512"])
        .arg(image)
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("can't open"),
        "qemu-io wrote to {}: {text}",
        image.display()
    );
    text
}

/// Version 3 (VMware's changed-block tracking) is read-only, as in qemu: a writer that does
/// not keep the tracking would leave it lying. Both as a monolithic file and as an extent.
#[test]
fn a_version_3_sparse_extent_is_refused_for_writing() {
    let dir = Scratch::new("v3");
    let (_, _, bytes) = sparse_image(&dir);
    let v3 = patched(&dir, &bytes, 4, &3u32.to_le_bytes());
    let err = fail(open_rw(&v3), "v3 read-write");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.message().contains("version 3"), "{err}");
    assert!(qemu_io_fails_rw(&v3).contains("version 3"));
    let dev = open(&v3).expect("v3 reads");
    let mut buf = vec![0u8; 65536];
    dev.read_at(&mut buf, 0).expect("read");
    assert!(buf.iter().all(|&b| b == 0x61));

    let split = dir.path("split.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        split.to_str().expect("utf8"),
        "1M",
    ]);
    let extent = dir.path("split-s001.vmdk");
    let mut ext = std::fs::read(&extent).expect("extent");
    ext[4..8].copy_from_slice(&3u32.to_le_bytes());
    write(&extent, &ext);
    let before = std::fs::read(&split).expect("descriptor");
    let err = fail(open_rw(&split), "v3 extent read-write");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("split-s001.vmdk"), "{err}");
    assert_eq!(
        std::fs::read(&split).expect("descriptor"),
        before,
        "nothing was changed (no new CID)"
    );
    open(&split).expect("reads");
}

/// A grain size that is not a power of two (VMware's format requires one) is refused, in
/// hosted sparse and vmfsSparse headers alike. qemu 10 reads such a file; no VMware tool
/// writes one.
#[test]
fn grain_sizes_that_are_not_powers_of_two_are_refused() {
    let dir = Scratch::new("grain96");
    let (_, _, bytes) = sparse_image(&dir);
    for grain in [96u64, 129, 3] {
        let bad = patched(&dir, &bytes, 20, &grain.to_le_bytes());
        let err = fail(open(&bad), "odd grain");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.message().contains("power of two"), "{grain}: {err}");
    }
    let mut cowd = vec![0u8; 8 * 512];
    cowd[..4].copy_from_slice(b"COWD");
    for (i, v) in [1u32, 3, 4096, 12, 4, 1, 8, 16, 63, 16].iter().enumerate() {
        cowd[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    let path = dir.path("cowd.vmdk");
    write(&path, &cowd);
    let err = fail(open(&path), "odd COWD grain");
    assert!(err.message().contains("power of two"), "{err}");
}

/// Opens parents as VMDK, standing in for the registry of `vdisk_blockjobs`.
struct VmdkOpener;

impl vdisk_block::format::ImageOpener for VmdkOpener {
    fn open_image(
        &self,
        path: &Path,
        _format: Option<&str>,
        options: &OpenOptions,
    ) -> vdisk_block::Result<std::sync::Arc<dyn BlockDev>> {
        VmdkFormat.open(path, options)
    }
}

/// parentFileNameHint is a file name from the image like an extent's: a parent outside the
/// image's folder (absolute, or climbing with ../) is refused under the default policy and
/// followed when the caller allows anything.
#[test]
fn a_parent_outside_the_folder_needs_permission() {
    let inside = Scratch::new("parent-in");
    let outside = Scratch::new("parent-out");
    let base = outside.path("base.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        base.to_str().expect("utf8"),
        "1M",
    ]);
    let out = Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write -P 0x3c 0 64k"])
        .arg(&base)
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    let climb = format!(
        "../{}/base.vmdk",
        outside.0.file_name().expect("name").to_string_lossy()
    );
    for hint in [base.to_str().expect("utf8").to_string(), climb] {
        let top = inside.path("top.vmdk");
        let _ = std::fs::remove_file(&top);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            &hint,
            "-F",
            "vmdk",
            top.to_str().expect("utf8"),
        ]);
        let default = OpenOptions {
            opener: Some(std::sync::Arc::new(VmdkOpener)),
            ..OpenOptions::read_only()
        };
        assert_eq!(default.policy, FollowPolicy::default());
        let err = fail(VmdkFormat.open(&top, &default), &hint);
        assert_eq!(err.kind(), ErrorKind::PolicyDenied, "{hint}: {err}");
        assert!(err.to_string().contains("base.vmdk"), "{err}");
        let anything = OpenOptions {
            policy: FollowPolicy::Anything,
            ..default
        };
        let dev = VmdkFormat.open(&top, &anything).expect("allowed");
        let mut buf = vec![0u8; 65536];
        dev.read_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 0x3c), "{hint}: reads the parent");
    }
}

/// A createType this driver does not know is refused with its name, not opened as
/// something else.
#[test]
fn an_unknown_create_type_is_named() {
    let dir = Scratch::new("createtype");
    write(&dir.path("a.raw"), &[7u8; 4096]);
    let image = dir.path("t.vmdk");
    let text = descriptor("RW 8 FLAT \"a.raw\" 0").replace("monolithicFlat", "hyperSparseX");
    write(&image, text.as_bytes());
    let err = fail(open(&image), "unknown createType");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.message().contains("'hyperSparseX'"), "{err}");
}

/// Writes into a RDONLY extent are refused, before any byte of the write lands (a write
/// that spans a RW and a RDONLY extent changes neither), and the RDONLY file is opened
/// read-only in the first place.
#[test]
fn writes_to_a_rdonly_extent_are_refused() {
    let dir = Scratch::new("rdonly");
    write(&dir.path("rw.raw"), &[1u8; 4096]);
    write(&dir.path("ro.raw"), &[2u8; 4096]);
    let image = dir.path("r.vmdk");
    write(
        &image,
        descriptor("RW 8 FLAT \"rw.raw\" 0\nRDONLY 8 FLAT \"ro.raw\" 0").as_bytes(),
    );
    let before = std::fs::read(&image).expect("descriptor");
    let dev = open_rw(&image).expect("open read-write");
    assert!(!dev.is_read_only());
    for (what, result) in [
        ("write", dev.write_at(&[9u8; 4096], 4096)),
        ("spanning write", dev.write_at(&[9u8; 4096], 2048)),
        (
            "write zeroes",
            dev.write_zeroes(4096, 512, vdisk_block::ZeroMode::KeepAllocated),
        ),
    ] {
        let err = result.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::ReadOnly, "{what}: {err}");
        assert!(err.message().contains("RDONLY"), "{what}: {err}");
    }
    assert!(
        std::fs::read(dir.path("rw.raw")).expect("rw") == vec![1u8; 4096],
        "the RW half of a refused spanning write did not land"
    );
    assert!(
        std::fs::read(dir.path("ro.raw")).expect("ro") == vec![2u8; 4096],
        "the RDONLY file is unchanged"
    );
    assert!(
        std::fs::read(&image).expect("descriptor") == before,
        "no CID change for refused writes"
    );
    dev.write_at(&[5u8; 512], 0)
        .expect("the RW extent takes writes");
    dev.flush().expect("flush");
    let mut buf = vec![0u8; 8192];
    dev.read_at(&mut buf, 0).expect("read");
    assert!(buf[..512].iter().all(|&b| b == 5));
    assert!(buf[4096..].iter().all(|&b| b == 2));
}
