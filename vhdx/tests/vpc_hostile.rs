//! Targeted hostile VHDs, each one damage with every checksum made right again so the
//! parser reaches the field under test: a zero and a non-power-of-two block size (a
//! division by zero and a misaligned BAT in a naive reader), a BAT entry past the end of
//! the file, a differencing chain that loops back on itself, and a bad footer checksum as
//! opposed to a bad dynamic header checksum. Each is refused with a `Corrupt` error that
//! says what is wrong; where qemu-img refuses the same image it is checked to do so.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{have_qemu, must_fail, Scratch};
use vdisk_block::format::ImageOpener;
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, Format, OpenOptions, Result};
use vdisk_vhdx::VpcFormat;

const MIB: u64 = 1 << 20;
/// The dynamic header of a vdisk- or qemu-made dynamic VHD follows the footer copy.
const DYN: u64 = 512;

struct VpcOpener;

impl ImageOpener for VpcOpener {
    fn open_image(&self, p: &Path, _f: Option<&str>, o: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        VpcFormat.open(p, o)
    }
}

fn opts() -> OpenOptions {
    OpenOptions {
        opener: Some(Arc::new(VpcOpener)),
        ..OpenOptions::default()
    }
}

fn create(path: &Path, size: u64, o: &str) {
    VpcFormat
        .create(
            path,
            CreateOptions {
                size,
                options: CreateOptions::parse_options(o).expect("options"),
            },
        )
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

fn poke(path: &Path, data: &[u8], at: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .write_all_at(data, at)
        .expect("write");
}

fn peek(path: &Path, len: usize, at: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, at)
        .expect("read");
    buf
}

fn be32(path: &Path, at: u64) -> u32 {
    u32::from_be_bytes(peek(path, 4, at).try_into().expect("4 bytes"))
}

/// Recomputes the checksum (at `field`) of the `len`-byte structure at `at`.
fn fix_sum(path: &Path, at: u64, len: usize, field: usize) {
    let mut buf = peek(path, len, at);
    buf[field..field + 4].fill(0);
    let sum = !buf.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    poke(path, &sum.to_be_bytes(), at + field as u64);
}

fn fix_dynamic_sum(path: &Path) {
    fix_sum(path, DYN, 1024, 36);
}

/// A dynamic 8 MiB VHD with data in its first block.
fn sample(dir: &Scratch, name: &str) -> PathBuf {
    let path = dir.path(name);
    create(&path, 8 * MIB, "force_size=on");
    let img = VpcFormat
        .open(&path, &OpenOptions::read_write())
        .expect("open");
    img.write_at(&[0x11u8; 4096], 0).expect("write");
    img.flush().expect("flush");
    path
}

fn refused(path: &Path, what: &str, expect: &str) -> vdisk_block::Error {
    let err = must_fail(
        VpcFormat.open(path, &opts()),
        &format!("{what}: a hostile image opened"),
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
    assert!(
        err.to_string().contains(expect),
        "{what}: '{err}' lacks '{expect}'"
    );
    err
}

/// qemu-img refuses the image too, with a message containing `expect`.
fn qemu_refuses(path: &Path, what: &str, expect: &str) {
    if !have_qemu() {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(path)
        .output()
        .expect("qemu-img");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(expect),
        "{what}: qemu-img should refuse the image with '{expect}': {out:?}"
    );
}

#[test]
fn zero_and_non_power_of_two_block_sizes_are_refused() {
    let dir = Scratch::new("vpc-hostile-bs");
    for (name, bs) in [
        ("zero.vhd", 0u32),
        ("three-mib.vhd", 3 << 20),
        ("odd.vhd", 4097),
        ("tiny.vhd", 256),
    ] {
        let p = sample(&dir, name);
        poke(&p, &bs.to_be_bytes(), DYN + 32);
        fix_dynamic_sum(&p);
        let what = format!("block size {bs}");
        refused(&p, &what, &format!("Invalid block size {bs}"));
        qemu_refuses(&p, &what, &format!("Invalid block size {bs}"));
    }
}

#[test]
fn a_bat_entry_past_the_end_of_the_file_is_refused() {
    let dir = Scratch::new("vpc-hostile-bat");
    let p = sample(&dir, "bat.vhd");
    let table = u64::from_be_bytes(peek(&p, 8, DYN + 16).try_into().expect("8 bytes"));
    assert_ne!(be32(&p, table), u32::MAX, "block 0 is allocated");
    // Sector 0x00ff_ffff is 8 GiB into a file of a few MiB.
    poke(&p, &0x00ff_ffffu32.to_be_bytes(), table + 4);
    let err = refused(&p, "BAT entry past EOF", "BAT entry 1 points past the end");
    assert!(err.to_string().contains("truncated"), "{err}");
    qemu_refuses(&p, "BAT entry past EOF", "truncated");
}

#[test]
fn a_differencing_chain_that_loops_is_refused() {
    let dir = Scratch::new("vpc-hostile-loop");
    sample(&dir, "base.vhd");
    let a = dir.path("a.vhd");
    create(&a, 0, "backing_file=base.vhd,backing_fmt=vpc");
    let b = dir.path("b.vhd");
    create(&b, 0, "backing_file=a.vhd,backing_fmt=vpc");
    // a names base.vhd; put b there and make a's parent ID b's unique ID: a -> b -> a, and
    // every link passes its parent ID check, so only the loop check stops the recursion.
    std::fs::rename(&b, dir.path("base.vhd")).expect("rename");
    let b_id = peek(&dir.path("base.vhd"), 16, 68);
    poke(&a, &b_id, DYN + 40);
    fix_dynamic_sum(&a);
    let err = refused(&a, "a -> b -> a", "the chain loops");
    assert!(err.to_string().contains("base.vhd"), "{err}");

    // The shortest loop: an image that is its own parent.
    let c = dir.path("c.vhd");
    create(&c, 0, "backing_file=a.vhd,backing_fmt=vpc");
    std::fs::remove_file(&a).expect("remove");
    std::fs::rename(&c, &a).expect("rename");
    let own = peek(&a, 16, 68);
    poke(&a, &own, DYN + 40);
    fix_dynamic_sum(&a);
    refused(&a, "a -> a", "the chain loops");
}

#[test]
fn footer_and_dynamic_header_checksums_are_told_apart() {
    let dir = Scratch::new("vpc-hostile-sum");
    let good = sample(&dir, "good.vhd");
    let len = std::fs::metadata(&good).expect("stat").len();

    // A changed byte of the footer (creator version) without a new checksum, in both
    // copies: qemu refuses it too.
    let p = dir.path("footer.vhd");
    std::fs::copy(&good, &p).expect("copy");
    for at in [0, len - 512] {
        let v = peek(&p, 1, at + 32);
        poke(&p, &[v[0] ^ 1], at + 32);
    }
    let err = refused(&p, "bad footer checksum", "Incorrect header checksum");
    assert!(err.to_string().contains("footer"), "{err}");
    qemu_refuses(&p, "bad footer checksum", "Incorrect header checksum");

    // A changed byte of the dynamic header without a new checksum. qemu does not verify
    // this checksum (it opens the image); we follow the specification and refuse it,
    // naming the dynamic header so it is not mistaken for a bad footer.
    let p = dir.path("dynamic.vhd");
    std::fs::copy(&good, &p).expect("copy");
    let v = peek(&p, 1, DYN + 24);
    poke(&p, &[v[0] ^ 1], DYN + 24);
    refused(
        &p,
        "bad dynamic header checksum",
        "Incorrect dynamic header checksum",
    );

    // Fixing the checksum makes the same image open again: the refusals were the checksums.
    fix_dynamic_sum(&p);
    VpcFormat
        .open(&p, &opts())
        .expect("repaired dynamic header opens");
}
