//! `convert --salvage`, `-r`, `-C`, `-m` and `--target-image-opts`, with qemu-img as the
//! oracle and vdisk under the name `qemu-img`: both streams, the exit code and the files
//! they leave must be the same.

use std::os::unix::fs::FileExt;
use std::path::Path;

use vdisk_tests::{dropin_link, qemu_img, run_twins, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// A 1 MiB qcow2 of 4 KiB zlib-compressed clusters (each of random letters, so each
/// stays compressed) with 100 bytes of one compressed cluster overwritten: that cluster
/// (guest offset 118784) no longer inflates.
fn damaged_image(dir: &Path) {
    let mut state = 0x2545_f491_u32;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            b"abcd"[(state & 3) as usize]
        })
        .collect();
    std::fs::write(dir.join("src.raw"), &data).expect("write source");
    let r = qemu_img(
        dir,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "src.raw",
            "c.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let map = qemu_img(dir, &["map", "--output=json", "c.qcow2"]);
    assert!(map.stdout.contains("\"compressed\": true"), "{map:?}");
    // The file offset of guest cluster 29 (118784), from qemu's own view of the L2 table.
    let cluster = 118_784u64;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("c.qcow2"))
        .expect("open");
    let host = compressed_host_offset(&file, cluster);
    file.write_all_at(&[0xff; 100], host + 20).expect("damage");
}

/// The host offset of the compressed cluster at guest `offset` of a 4 KiB-cluster qcow2.
fn compressed_host_offset(file: &std::fs::File, offset: u64) -> u64 {
    let mut header = [0u8; 48];
    file.read_exact_at(&mut header, 0).expect("header");
    let l1 = u64::from_be_bytes(header[40..48].try_into().expect("8 bytes"));
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, l1).expect("L1");
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    file.read_exact_at(&mut entry, l2 + (offset / 4096) * 8)
        .expect("L2");
    let l2e = u64::from_be_bytes(entry);
    assert_ne!(l2e & (1 << 62), 0, "cluster is compressed");
    // 4 KiB clusters: the host offset takes the low 62 - (12 - 8) = 58 bits.
    l2e & ((1 << 58) - 1)
}

/// Runs `args` with qemu-img and drop-in vdisk, each in a fresh folder with the damaged
/// image (and `prepare` run there), and requires the same exit code and streams.
fn same(s: &Scratch, dropin: &Path, args: &[&str], prepare: impl Fn(&Path)) -> (Run, Run) {
    let (q, d) = run_twins(s, dropin, Path::new("qemu-img"), args, |d| {
        damaged_image(d);
        prepare(d);
    });
    assert_eq!(
        d.code, q.code,
        "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
    );
    assert_eq!(d.stdout, q.stdout, "stdout of {args:?}");
    assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
    (q, d)
}

fn read(s: &Scratch, dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(s.sub(dir).join(name)).unwrap_or_else(|e| panic!("{dir}/{name}: {e}"))
}

#[test]
fn salvage_zero_fills_what_cannot_be_read_as_qemu_img_does() {
    let s = Scratch::new("salvage");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    let (q, _) = same(
        &s,
        &dropin,
        &["convert", "-O", "raw", "c.qcow2", "o.raw"],
        |_| {},
    );
    assert_eq!(q.code, 1, "{q:?}");
    assert_eq!(
        q.stderr,
        "qemu-img: error while reading at byte 118784: Input/output error\n"
    );

    let (q, _) = same(
        &s,
        &dropin,
        &["convert", "--salvage", "-O", "raw", "c.qcow2", "o.raw"],
        |_| {},
    );
    assert_eq!(q.code, 0, "{q:?}");
    let warnings: Vec<&str> = q.stderr.lines().collect();
    assert_eq!(warnings.len(), 8, "one warning per 512-byte sector: {q:?}");
    assert_eq!(
        warnings[0],
        "qemu-img: warning: error while reading offset 118784: Input/output error"
    );
    let ours = read(&s, "d", "o.raw");
    assert_eq!(ours, read(&s, "q", "o.raw"), "salvaged contents");
    let source = read(&s, "d", "src.raw");
    assert!(ours[118_784..122_880].iter().all(|&b| b == 0));
    assert_eq!(ours[..118_784], source[..118_784]);
    assert_eq!(ours[122_880..], source[122_880..]);

    // -q silences the warnings; into qcow2 the same zeroes land.
    let (q, _) = same(
        &s,
        &dropin,
        &[
            "convert",
            "-q",
            "--salvage",
            "-O",
            "raw",
            "c.qcow2",
            "o.raw",
        ],
        |_| {},
    );
    assert_eq!((q.code, q.stderr.as_str()), (0, ""), "{q:?}");
    same(
        &s,
        &dropin,
        &["convert", "--salvage", "-O", "qcow2", "c.qcow2", "o.qcow2"],
        |_| {},
    );
    let r = qemu_img(&s.sub("d"), &["compare", "o.qcow2", "../q/o.qcow2"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn copy_options_are_read_and_refused_as_qemu_img_does() {
    let s = Scratch::new("convert-opts");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    for args in [
        &["convert", "-r", "1x", "src.raw", "o.raw"][..],
        &["convert", "-r", "-1", "src.raw", "o.raw"],
        &["convert", "-r", "9223372036854775808", "src.raw", "o.raw"],
        &["convert", "-C", "-c", "-O", "qcow2", "src.raw", "o.qcow2"],
        &["convert", "-C", "-S", "0", "src.raw", "o.raw"],
        &["convert", "-C", "--salvage", "src.raw", "o.raw"],
        &["convert", "-m", "17", "src.raw", "o.raw"],
        &["convert", "-m", "0", "src.raw", "o.raw"],
        &["convert", "--target-image-opts", "src.raw", "o.raw"],
        &["convert", "-C", "-c"],
        &["convert", "-n", "-o", "cluster_size=4k", "--target-is-zero"],
    ] {
        let (q, _) = same(&s, &dropin, args, |_| {});
        assert_eq!(q.code, 1, "{args:?}: {q:?}");
    }
    // Options that only change how the copy goes leave the same file.
    for args in [
        &["convert", "-r", "1G", "-m", "16", "-W", "src.raw", "o.raw"][..],
        &["convert", "-C", "-O", "qcow2", "src.raw", "o.raw"],
        &[
            "convert",
            "--source-format=raw",
            "--parallel=4",
            "--oob-writes",
            "--force-share",
            "src.raw",
            "o.raw",
        ],
    ] {
        let (q, _) = same(&s, &dropin, args, |_| {});
        assert_eq!(q.code, 0, "{args:?}: {q:?}");
        let r = qemu_img(&s.sub("d"), &["compare", "src.raw", "o.raw"]);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
    }
}

#[test]
fn target_image_opts_name_an_existing_target() {
    let s = Scratch::new("target-opts");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    let make_target = |d: &Path| {
        let r = qemu_img(d, &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
        assert_eq!(r.code, 0, "{r:?}");
    };
    for (args, code) in [
        (
            &[
                "convert",
                "--target-image-opts",
                "-n",
                "src.raw",
                "driver=qcow2,file.filename=t.qcow2",
            ][..],
            0,
        ),
        // No driver: probed from the file.
        (
            &[
                "convert",
                "--target-image-opts",
                "-n",
                "src.raw",
                "file.filename=t.qcow2",
            ],
            0,
        ),
        (
            &[
                "convert",
                "--target-image-opts",
                "-n",
                "-O",
                "qcow2",
                "src.raw",
                "driver=qcow2,file.filename=t.qcow2",
            ],
            1,
        ),
        (
            &[
                "convert",
                "--target-image-opts",
                "-n",
                "src.raw",
                "driver=foo,file.filename=t.qcow2",
            ],
            1,
        ),
        (
            &["convert", "--target-image-opts", "-n", "src.raw", "t.qcow2"],
            1,
        ),
    ] {
        let (q, _) = same(&s, &dropin, args, make_target);
        assert_eq!(q.code, code, "{args:?}: {q:?}");
        if code == 0 {
            for dir in ["q", "d"] {
                let r = qemu_img(
                    &s.sub(dir),
                    &["compare", "-f", "raw", "-F", "qcow2", "src.raw", "t.qcow2"],
                );
                assert_eq!(r.code, 0, "{dir}: {args:?}: {r:?}");
                let r = qemu_img(&s.sub(dir), &["check", "t.qcow2"]);
                assert_eq!(r.code, 0, "{dir}: {args:?}: {r:?}");
            }
        }
    }
}

/// Runs `args` with qemu-img and drop-in vdisk with stderr joined to stdout on one pipe
/// (`2>&1`, as test suites capture qemu-img), each in a fresh folder with the damaged
/// image, and requires the same exit code and the same combined stream: qemu-img's stdout
/// is fully buffered off a terminal, so an error after some output comes first.
fn same_combined(s: &Scratch, dropin: &Path, args: &[&str], prepare: impl Fn(&Path)) -> Run {
    let mut full = vec!["-c", "qemu-img \"$@\" 2>&1", "sh"];
    full.extend_from_slice(args);
    let (q, d) = run_twins(s, dropin, Path::new("sh"), &full, |d| {
        damaged_image(d);
        prepare(d);
    });
    assert_eq!(
        d.code, q.code,
        "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
    );
    assert_eq!(d.stdout, q.stdout, "combined output of {args:?}");
    q
}

#[test]
fn damaged_compressed_clusters_read_as_qemu_img_reads_them() {
    let s = Scratch::new("damaged-reads");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    // An undamaged copy of the same 4 KiB-cluster compressed image.
    let intact = |d: &Path| {
        let r = qemu_img(
            d,
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "src.raw",
                "ok.qcow2",
            ],
        );
        assert_eq!(r.code, 0, "{r:?}");
    };
    for (args, code) in [
        // qemu's block status answers compressed data a cluster at a time: reads fail at the
        // damaged cluster, and progress moves in clusters.
        (&["compare", "-p", "c.qcow2", "src.raw"][..], 4),
        (&["compare", "c.qcow2", "src.raw"], 4),
        (&["compare", "-p", "ok.qcow2", "src.raw"], 0),
        (&["convert", "-p", "-O", "raw", "ok.qcow2", "o.raw"], 0),
        (&["convert", "-O", "raw", "c.qcow2", "o.raw"], 1),
        (&["dd", "if=c.qcow2", "of=o.raw"], 1),
        // Output printed before the failure comes after its message, as from qemu-img.
        (&["bench", "-c", "300", "c.qcow2"], 1),
        (&["map", "c.qcow2"], 1),
    ] {
        let r = same_combined(&s, &dropin, args, intact);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
    }
    let r = same_combined(&s, &dropin, &["map", "c.qcow2"], |_| {});
    assert!(
        r.stdout
            .starts_with("qemu-img: File contains external, encrypted or compressed clusters.\n"),
        "{r:?}"
    );
}
