//! `check` of a qcow2 image whose refcount table points a refcount block past the end of
//! the file, against qemu-img 10 on copies of the same image: without `-r` and with
//! `-r leaks` both report "ERROR refcount block N is outside image" and change nothing;
//! `-r all` grows the file to hold the block ("Repairing refcount block N is outside
//! image", one corruption fixed), rebuilding the refcount structure where the block's own
//! refcount is missing, or where the file cannot grow that far ("ERROR could not resize
//! image"). Drop-in vdisk prints what qemu-img prints on both streams, human and JSON,
//! exits alike and leaves the file qemu-img leaves, byte for byte; plain vdisk exits alike
//! and leaves the same file. A repaired image checks clean and holds the same guest data.
//! The same holds for a COPIED flag that only the refcount repair makes wrong (qemu's
//! check_oflag_copied runs after the refcounts are fixed) and for a corruption `-r leaks`
//! may not fix (reported twice by qemu, no more).

use std::fs;
use std::path::{Path, PathBuf};

use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// The damaged images (see `setup` for the edit made to qemu's clean image).
const IMAGES: &[&str] = &[
    "first.qcow2",
    "beyond.qcow2",
    "counted.qcow2",
    "huge.qcow2",
    "shared.qcow2",
];

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A clean 8 MiB image (64 KiB clusters, 16-bit refcounts) written by qemu-io, 8 clusters
/// long: header, refcount table, refcount block, L1, L2, three data clusters.
fn clean(dir: &Path) {
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "qcow2", "clean.qcow2", "8M"]),
        "create",
    );
    let r = run_in(
        dir,
        Path::new("qemu-io"),
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 128k",
            "clean.qcow2",
        ],
    );
    ok(&r, "qemu-io");
    assert!(!r.stdout.contains("failed"), "{r:?}");
}

fn setup(dir: &Path) {
    clean(dir);
    let b = fs::read(dir.join("clean.qcow2")).expect("read");
    assert_eq!(b.len(), 8 << 16, "clean image layout");
    let table = be64(&b, 48);
    let block0 = be64(&b, table);
    let edit = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = b.clone();
        f(&mut b);
        fs::write(dir.join(name), b).expect("write");
    };
    // The only refcount block moves past the end: every refcount reads 0, -r all grows
    // the file and rebuilds.
    edit("first.qcow2", &|b| put64(b, table, 10 << 16));
    // A second block past the end, for clusters the file does not have: -r all grows the
    // file; the new cluster's refcount (in block 0) is 0, so it rebuilds.
    edit("beyond.qcow2", &|b| put64(b, table + 8, 10 << 16));
    // The same with the new cluster's refcount set: growing the file is the whole repair.
    edit("counted.qcow2", &|b| {
        put64(b, table + 8, 10 << 16);
        let at = (block0 + 2 * 10) as usize;
        b[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    });
    // So far past the end that the file cannot grow there (qemu: EINVAL): rebuild.
    edit("huge.qcow2", &|b| {
        put64(b, table + 8, 0x7fff_ffff_ffff_0000)
    });
    // The L1 entry names an L2 table past the end of the file: qemu reads it as zeroes,
    // reports the reference as a corruption and the old L2 table and data as leaks.
    edit("l2past.qcow2", &|b| {
        let l1 = be64(b, 40);
        put64(b, l1, (1 << 63) | (16 << 16));
    });
    // No block outside, but guest cluster 5 shares host cluster 5 with guest cluster 0:
    // refcount 1 for 2 references; the COPIED flags are wrong only once it is 2.
    edit("shared.qcow2", &|b| {
        let l2 = be64(b, be64(b, 40)) & 0x00ff_ffff_ffff_fe00;
        let first = be64(b, l2);
        put64(b, l2 + 5 * 8, first);
    });
}

struct Bench {
    scratch: Scratch,
    bin: PathBuf,
    src: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let scratch = Scratch::new("check-outside");
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let src = scratch.sub("src");
        setup(&src);
        Bench { scratch, bin, src }
    }

    fn copy(&self, name: &str, image: &str) -> PathBuf {
        let dir = self.scratch.dir().join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::copy(self.src.join(image), dir.join(image)).expect("copy");
        dir
    }

    /// Runs `args` with qemu-img, drop-in vdisk and plain vdisk, each on its own copy of
    /// `image`, asserts they agree and returns qemu-img's run and the folder of the
    /// drop-in's copy.
    fn same(&self, tag: &str, args: &[&str], image: &str) -> (Run, PathBuf) {
        let (q, d, p) = (
            self.copy(&format!("{tag}-q"), image),
            self.copy(&format!("{tag}-d"), image),
            self.copy(&format!("{tag}-p"), image),
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
        (qr, d)
    }
}

#[test]
fn refcount_blocks_outside_the_image_are_reported_and_repaired_as_qemu_does() {
    let b = Bench::new();
    for &image in IMAGES {
        let original = fs::read(b.src.join(image)).expect("read");
        let outside = image != "shared.qcow2";
        for (i, args) in [
            vec!["check", image],
            vec!["check", "--output=json", image],
            vec!["check", "-r", "leaks", image],
            vec!["check", "-r", "leaks", "--output=json", image],
        ]
        .iter()
        .enumerate()
        {
            let (r, d) = b.same(&format!("report{i}"), args, image);
            // With every refcount 0, -r leaks stops: only a rebuild could repair it.
            let stops = image == "first.qcow2" && args.contains(&"leaks");
            assert_eq!(r.code, if stops { 1 } else { 2 }, "{args:?}: {r:?}");
            if outside {
                assert!(r.stderr.contains("ERROR refcount block"), "{r:?}");
                assert!(r.stderr.contains("is outside image"), "{r:?}");
                // Reporting and fixing leaks leave such an image as it was.
                let after = fs::read(d.join(image)).expect("read");
                assert!(after == original, "{args:?}: the image changed");
            }
        }
        for (i, args) in [
            vec!["check", "-r", "all", image],
            vec!["check", "-r", "all", "--output=json", image],
            vec!["check", "-r", "all", "-q", image],
        ]
        .iter()
        .enumerate()
        {
            let (r, d) = b.same(&format!("all{i}"), args, image);
            assert_eq!(r.code, 0, "{args:?}: {r:?}");
            if outside {
                assert!(
                    r.stderr.contains("Repairing refcount block"),
                    "{args:?}: {r:?}"
                );
            }
            let check = qemu_img(&d, &["check", image]);
            ok(&check, "qemu-img check of vdisk's repair");
            assert!(check.stdout.contains("No errors were found"), "{check:?}");
            // The guest sees what qemu wrote before the damage.
            let orig = b.src.join("clean.qcow2");
            let orig = orig.to_str().expect("utf-8 path");
            let same = qemu_img(&d, &["compare", "-f", "qcow2", "-F", "qcow2", orig, image]);
            if image == "shared.qcow2" {
                // Guest cluster 5 now reads guest cluster 0's data, by the damage's design.
                assert_eq!(same.code, 1, "{same:?}");
            } else {
                ok(&same, "compare with the undamaged image");
            }
        }
    }
    // An L2 table past the end: the report, and -r leaks freeing (and discarding) the
    // clusters nothing references any more, as qemu does.
    for (i, args) in [
        vec!["check", "l2past.qcow2"],
        vec!["check", "--output=json", "l2past.qcow2"],
        vec!["check", "-r", "leaks", "l2past.qcow2"],
    ]
    .iter()
    .enumerate()
    {
        let (r, _) = b.same(&format!("l2past{i}"), args, "l2past.qcow2");
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }
    // Reading it: the table reads as zeroes, so the clusters it maps read as unallocated.
    for (i, args) in [
        vec!["map", "--output=json", "l2past.qcow2"],
        vec!["map", "l2past.qcow2"],
        vec!["info", "l2past.qcow2"],
        vec!["measure", "-O", "qcow2", "l2past.qcow2"],
        vec!["compare", "l2past.qcow2", "l2past.qcow2"],
    ]
    .iter()
    .enumerate()
    {
        let (r, _) = b.same(&format!("l2read{i}"), args, "l2past.qcow2");
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
    }
    let args = ["convert", "-O", "raw", "l2past.qcow2", "o.raw"];
    let (r, d) = b.same("l2convert", &args, "l2past.qcow2");
    assert_eq!(r.code, 0, "{r:?}");
    let ours = fs::read(d.join("o.raw")).expect("vdisk's output");
    let theirs = fs::read(b.scratch.dir().join("l2convert-q/o.raw")).expect("qemu's output");
    assert!(ours == theirs, "the converted contents differ");
    // The messages that only -r all prints, as qemu prints them.
    let (r, _) = b.same(
        "grow",
        &["check", "-r", "all", "counted.qcow2"],
        "counted.qcow2",
    );
    assert!(
        r.stderr
            .starts_with("Repairing refcount block 1 is outside image\n"),
        "{r:?}"
    );
    assert!(r.stdout.contains("    1 corruptions"), "{r:?}");
    let (r, _) = b.same("huge", &["check", "-r", "all", "huge.qcow2"], "huge.qcow2");
    assert!(
        r.stderr.contains(
            "ERROR could not resize image: Invalid argument\nRebuilding refcount structure\n"
        ),
        "{r:?}"
    );
}
