//! The raw driver's `offset` and `size` open options (`--image-opts driver=raw,offset=N,
//! size=N,file.filename=F`): a window into a file, such as a partition of a whole-disk image.
//! qemu-img is the oracle; vdisk runs under the name `qemu-img`, and both streams, the exit
//! code and the files left behind must be the same.

use std::path::Path;

use vdisk_tests::{dropin_link, qemu_img, qemu_io_raw, run_twins, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// A 1 MiB raw file: 0x11 everywhere but a hole at 256 KiB..512 KiB and 0x22 in the
/// first 4 KiB, so a window shows data, a hole and where it starts in the file.
fn source(dir: &Path) {
    let r = qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "1M"]);
    assert_eq!(r.code, 0, "{r:?}");
    qemu_io_raw(
        dir,
        "src.raw",
        &[
            "write -P 0x11 0 256k",
            "write -P 0x11 512k 512k",
            "write -P 0x22 0 4k",
        ],
    );
}

/// Runs `args` with qemu-img and drop-in vdisk, each in a fresh folder holding the
/// source, and requires the same exit code and streams.
fn same(s: &Scratch, dropin: &Path, args: &[&str]) -> Run {
    let (q, d) = run_twins(s, dropin, Path::new("qemu-img"), args, source);
    assert_eq!(
        d.code, q.code,
        "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
    );
    assert_eq!(d.stdout, q.stdout, "stdout of {args:?}");
    assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
    q
}

fn read(s: &Scratch, dir: &str, name: &str) -> Vec<u8> {
    std::fs::read(s.sub(dir).join(name)).unwrap_or_else(|e| panic!("{dir}/{name}: {e}"))
}

const WINDOW: &str = "driver=raw,offset=4k,size=512k,file.filename=src.raw";

#[test]
fn a_window_reads_maps_and_converts_as_qemu_img_does() {
    let s = Scratch::new("raw-window");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    for args in [
        &["info", "--image-opts", WINDOW][..],
        &["info", "--output=json", "--image-opts", WINDOW],
        &["map", "--image-opts", WINDOW],
        &["map", "--output=json", "--image-opts", WINDOW],
        &[
            "info",
            "--image-opts",
            "driver=raw,offset=4095,file.filename=src.raw",
        ],
        &[
            "info",
            "--image-opts",
            "driver=raw,offset=1M,file.filename=src.raw",
        ],
        // qemu's size syntax: hexadecimal, fractions before a suffix.
        &[
            "info",
            "--image-opts",
            "driver=raw,offset=0x1000,size=1.5k,file.filename=src.raw",
        ],
        &["compare", "--image-opts", WINDOW, WINDOW],
    ] {
        let q = same(&s, &dropin, args);
        assert_eq!(q.code, 0, "{args:?}: {q:?}");
    }
    let q = same(
        &s,
        &dropin,
        &["map", "--output=json", "--image-opts", WINDOW],
    );
    assert!(q.stdout.contains("\"offset\": 4096"), "host offsets: {q:?}");

    same(&s, &dropin, &["convert", "--image-opts", WINDOW, "o.raw"]);
    let out = read(&s, "d", "o.raw");
    assert_eq!(out, read(&s, "q", "o.raw"));
    assert_eq!(out[..], read(&s, "d", "src.raw")[4096..4096 + 512 * 1024]);
    same(
        &s,
        &dropin,
        &["convert", "-O", "qcow2", "--image-opts", WINDOW, "o.qcow2"],
    );
    let r = qemu_img(&s.sub("d"), &["compare", "o.qcow2", "../q/o.qcow2"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_window_is_written_and_resized_as_qemu_img_does() {
    let s = Scratch::new("raw-window-write");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    // A fixed size cannot change; without one the file grows past the window's start.
    let q = same(&s, &dropin, &["resize", "--image-opts", WINDOW, "1M"]);
    assert_eq!(q.code, 1, "{q:?}");
    let open = "driver=raw,offset=4k,file.filename=src.raw";
    for size in ["2M", "64k"] {
        let q = same(
            &s,
            &dropin,
            &["resize", "--shrink", "--image-opts", open, size],
        );
        assert_eq!(q.code, 0, "{q:?}");
        assert_eq!(read(&s, "d", "src.raw"), read(&s, "q", "src.raw"), "{size}");
    }
    // Converting into the window (-n) writes only its bytes of the file.
    for dir in ["q", "d"] {
        std::fs::write(s.sub(dir).join("pattern.raw"), vec![0x5a_u8; 8192]).expect("pattern");
    }
    let target = "driver=raw,offset=8k,size=8k,file.filename=src.raw";
    let mut files = Vec::new();
    for (dir, bin) in [("q", None), ("d", dropin.parent())] {
        let d = s.sub(dir);
        let r = run_with_path(
            &d,
            bin,
            Path::new("qemu-img"),
            &[
                "convert",
                "-n",
                "--target-image-opts",
                "pattern.raw",
                target,
            ],
        );
        assert_eq!(r.code, 0, "{dir}: {r:?}");
        files.push(read(&s, dir, "src.raw"));
    }
    assert_eq!(files[0], files[1], "the file after writing the window");
    assert!(files[1][8192..16384].iter().all(|&b| b == 0x5a));
    assert!(files[1][..4096].iter().all(|&b| b == 0x22));
    assert!(files[1][16384..20480].iter().all(|&b| b == 0x11));
}

#[test]
fn bad_windows_are_refused_as_qemu_img_refuses_them() {
    let s = Scratch::new("raw-window-bad");
    let dropin = dropin_link(&s.sub("bin"), Path::new(VDISK));
    for opts in [
        "driver=raw,offset=abc,file.filename=src.raw",
        "driver=raw,size=-1,file.filename=src.raw",
        "driver=raw,size=-1k,file.filename=src.raw",
        "driver=raw,size=1000,file.filename=src.raw",
        "driver=raw,offset=2M,file.filename=src.raw",
        "driver=raw,offset=4k,size=1M,file.filename=src.raw",
        "driver=raw,offsett=4k,file.filename=src.raw",
    ] {
        for args in [
            &["info", "--image-opts", opts][..],
            &["info", "--output=json", "--image-opts", opts],
            &["convert", "--image-opts", opts, "o.raw"],
        ] {
            let q = same(&s, &dropin, args);
            assert_eq!(q.code, 1, "{args:?}: {q:?}");
            assert!(!s.sub("d").join("o.raw").exists(), "{args:?} left a target");
        }
    }
}
