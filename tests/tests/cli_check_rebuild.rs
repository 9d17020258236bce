//! `check -r leaks` / `-r all` of a qcow2 image whose refcounts cannot be set in place (a
//! used cluster with a refcount of 0, a refcount block missing from the table), against
//! qemu-img 10 on copies of the same image: drop-in vdisk prints what qemu-img prints on
//! both streams, human and JSON, exits alike, and leaves the file qemu-img leaves, byte for
//! byte (`-r leaks` stops with "need to rebuild refcount structures"; `-r all` writes a new
//! refcount structure after the last cluster in use and frees the old one). Plain vdisk
//! exits alike and leaves the same file too.

use std::fs;
use std::path::{Path, PathBuf};

use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn qemu_io(dir: &Path, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(image);
    let r = run_in(dir, Path::new("qemu-io"), &args);
    ok(&r, "qemu-io");
    assert!(!r.stdout.contains("failed"), "qemu-io {cmds:?}: {r:?}");
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Sets the 16-bit refcount of `cluster` to 0 in `bytes`.
fn zero_refcount(bytes: &mut [u8], cluster: u64) {
    let cs = 1u64 << be32(bytes, 20);
    assert_eq!(be32(bytes, 96), 4, "16-bit refcounts");
    let per_block = cs * 8 / 16;
    let block = be64(bytes, be64(bytes, 48) + 8 * (cluster / per_block));
    let at = (block + 2 * (cluster % per_block)) as usize;
    bytes[at..at + 2].fill(0);
}

/// The damaged images of the test, made by qemu and then edited.
fn setup(dir: &Path) {
    // The last cluster of the file (data) loses its refcount.
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "qcow2", "zero.qcow2", "8M"]),
        "create",
    );
    qemu_io(
        dir,
        "zero.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1000k 300k",
            "write -z 3M 1M",
            "write -P 0x44 8388096 512",
        ],
    );
    let mut b = fs::read(dir.join("zero.qcow2")).expect("read");
    let last = b.len() as u64 / 65536 - 1;
    zero_refcount(&mut b, last);
    fs::write(dir.join("zero.qcow2"), b).expect("write");

    // Snapshots and 512-byte clusters (a refcount block covers 128 KiB of file): one
    // refcount block in the middle is cut out of the refcount table, and a cluster the
    // active layer shares with the snapshot loses its refcount.
    ok(
        &qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "block.qcow2",
                "4M",
            ],
        ),
        "create",
    );
    qemu_io(dir, "block.qcow2", &["write -P 0x11 0 200k"]);
    ok(
        &qemu_img(dir, &["snapshot", "-c", "s1", "block.qcow2"]),
        "snapshot",
    );
    qemu_io(
        dir,
        "block.qcow2",
        &["write -P 0x22 100k 300k", "write -P 0x33 3M 64k"],
    );
    let mut b = fs::read(dir.join("block.qcow2")).expect("read");
    let table = be64(&b, 48);
    let entries = b.len() as u64 / 512 / 256;
    assert!(entries >= 4, "{entries} refcount blocks");
    let at = (table + 8 * (entries / 2)) as usize;
    assert_ne!(be64(&b, at as u64), 0);
    b[at..at + 8].fill(0);
    zero_refcount(&mut b, 200);
    fs::write(dir.join("block.qcow2"), b).expect("write");
}

struct Bench {
    _scratch: Scratch,
    bin: PathBuf,
    src: PathBuf,
    root: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let scratch = Scratch::new("check-rebuild");
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let src = scratch.sub("src");
        setup(&src);
        let root = scratch.dir().to_path_buf();
        Bench {
            _scratch: scratch,
            bin,
            src,
            root,
        }
    }

    /// A fresh copy of the damaged images in folder `name`.
    fn copy(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        for image in ["zero.qcow2", "block.qcow2"] {
            fs::copy(self.src.join(image), dir.join(image)).expect("copy");
        }
        dir
    }

    /// Runs `args` with qemu-img, drop-in vdisk and plain vdisk, each on its own copy, and
    /// asserts they agree; returns qemu-img's run.
    fn same(&self, tag: &str, args: &[&str], image: &str) -> Run {
        let (q, d, p) = (
            self.copy(&format!("{tag}-q")),
            self.copy(&format!("{tag}-d")),
            self.copy(&format!("{tag}-p")),
        );
        let qr = run_with_path(&q, None, Path::new("qemu-img"), args);
        let dr = run_with_path(&d, Some(&self.bin), Path::new("qemu-img"), args);
        let pr = run_in(&p, Path::new(VDISK), args);
        assert_eq!(dr.code, qr.code, "{args:?}: drop-in {dr:?}, qemu {qr:?}");
        assert_eq!(dr.stdout, qr.stdout, "{args:?}: stdout");
        assert_eq!(dr.stderr, qr.stderr, "{args:?}: stderr");
        assert_eq!(pr.code, qr.code, "{args:?}: plain vdisk {pr:?}");
        let theirs = fs::read(q.join(image)).expect("read");
        for (who, dir) in [("drop-in", &d), ("plain", &p)] {
            let ours = fs::read(dir.join(image)).expect("read");
            assert_eq!(ours.len(), theirs.len(), "{args:?}: {who} file length");
            if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
                panic!("{args:?}: {who} file differs from qemu's at byte {at:#x}");
            }
        }
        qr
    }
}

#[test]
fn repairs_that_need_a_new_refcount_structure_match_qemu() {
    let b = Bench::new();
    for image in ["zero.qcow2", "block.qcow2"] {
        let r = b.same("plain", &["check", image], image);
        assert_eq!(r.code, 2, "{image}: {r:?}");
        for (i, args) in [
            vec!["check", "-r", "leaks", image],
            vec!["check", "-r", "leaks", "--output=json", image],
            vec!["check", "-r", "leaks", "-q", image],
        ]
        .iter()
        .enumerate()
        {
            let r = b.same(&format!("leaks{i}"), args, image);
            assert_eq!(r.code, 1, "{args:?}: {r:?}");
            assert!(
                r.stderr
                    .contains("ERROR need to rebuild refcount structures"),
                "{r:?}"
            );
        }
        for (i, args) in [
            vec!["check", "-r", "all", image],
            vec!["check", "-r", "all", "--output=json", image],
            vec!["check", "-r", "all", "-q", image],
        ]
        .iter()
        .enumerate()
        {
            let r = b.same(&format!("all{i}"), args, image);
            assert_eq!(r.code, 0, "{args:?}: {r:?}");
            assert!(r.stderr.contains("Rebuilding refcount structure"), "{r:?}");
        }
    }
}
