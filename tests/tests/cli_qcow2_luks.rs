//! qcow2 with `encrypt.format=luks` (and legacy AES images, read only) on the command line,
//! against the system qemu-img / qemu-io as the oracle.
//!
//! Each shared check runs qemu-img, vdisk under the name `qemu-img` (drop-in mode: exit code,
//! stdout and stderr byte for byte) and vdisk by its own name (exit code and stdout; a
//! failure on one `vdisk: ` line) on the same files. Images are made with `iter-time=10`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const SECRET: &str = "secret,id=sec0,data=hunter2";
const WRONG: &str = "secret,id=sec0,data=hunter3";
const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";

struct Bench {
    scratch: Scratch,
    dropin: PathBuf,
}

impl Bench {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let dropin = dropin_link(&scratch.sub("bin"), Path::new(VDISK));
        Bench { scratch, dropin }
    }

    fn dir(&self) -> &Path {
        self.scratch.dir()
    }

    /// Runs `args` with all three tools and requires them to agree; returns qemu-img's run.
    fn same(&self, args: &[&str]) -> Run {
        let dir = self.dir();
        let name = Path::new("qemu-img");
        let q = run_with_path(dir, None, name, args);
        let d = run_with_path(dir, self.dropin.parent(), name, args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "drop-in vdisk vs qemu-img for {args:?}"
        );
        if q.code == 0 && args.contains(&"--output=json") {
            let qv: Value = serde_json::from_str(&q.stdout).expect("qemu-img JSON");
            let dv: Value = serde_json::from_str(&d.stdout).expect("vdisk JSON");
            assert_eq!(dv, qv, "JSON of {args:?}");
        }
        let v = run_in(dir, Path::new(VDISK), args);
        assert_eq!(
            (v.code, &v.stdout),
            (q.code, &q.stdout),
            "vdisk vs qemu-img for {args:?}: {}",
            v.stderr
        );
        if q.code != 0 {
            let lines: Vec<&str> = v.stderr.lines().collect();
            assert!(
                lines.len() == 1 && lines[0].starts_with("vdisk: "),
                "vdisk {args:?} must fail on one 'vdisk: ' line: {}",
                v.stderr
            );
        }
        q
    }

    fn qemu_ok(&self, args: &[&str]) -> Run {
        let r = qemu_img(self.dir(), args);
        assert_eq!(r.code, 0, "qemu-img {args:?}: {}", r.stderr);
        r
    }

    fn vdisk_ok(&self, args: &[&str]) -> Run {
        let r = run_in(self.dir(), Path::new(VDISK), args);
        assert_eq!(r.code, 0, "vdisk {args:?}: {}", r.stderr);
        r
    }

    fn qemu_io(&self, file: &str, cmds: &[&str]) {
        let o = opts(file);
        let mut args = vec!["--object", SECRET, "--image-opts", &o];
        for c in cmds {
            args.extend(["-c", c]);
        }
        let r = run_in(self.dir(), Path::new("qemu-io"), &args);
        assert_eq!(r.code, 0, "qemu-io {args:?}: {}", r.stderr);
        assert!(
            !r.stdout.contains("failed") && !r.stderr.contains("failed"),
            "qemu-io {args:?}: {r:?}"
        );
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir().join(name)).expect("read file")
    }

    /// `qemu-img check` of `file` with its key finds nothing.
    fn qemu_check_clean(&self, file: &str) {
        let r = self.qemu_ok(&["check", "--object", SECRET, "--image-opts", &opts(file)]);
        assert!(r.stdout.contains("No errors were found"), "{r:?}");
        assert!(!r.stdout.contains("leaked"), "{r:?}");
    }
}

fn opts(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=sec0")
}

/// A raw file with a pattern in some places and holes elsewhere.
fn write_source(b: &Bench, name: &str) -> Vec<u8> {
    let mut data = vec![0u8; 3 << 20];
    for (at, len, v) in [
        (0usize, 70_000usize, 0x11u8),
        (1 << 20, 512, 0x22),
        (2_000_001, 99_999, 0x33),
    ] {
        data[at..at + len].fill(v);
    }
    let canary = b"QCOW2-LUKS-PLAINTEXT-CANARY";
    for k in 0..100 {
        let at = 2_500_000 + k * 1000;
        data[at..at + canary.len()].copy_from_slice(canary);
    }
    std::fs::write(b.dir().join(name), &data).expect("write source");
    data
}

#[test]
fn cli_qcow2_luks_create_info_check_measure_match_qemu_img() {
    let b = Bench::new("qluks-create");
    for o in [
        LUKS.to_string(),
        format!(
            "{LUKS},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1,cluster_size=4096"
        ),
    ] {
        // The last of the three tools to run leaves its image: vdisk's.
        let r = b.same(&["create", "-f", "qcow2", "--object", SECRET, "-o", &o, "a.qcow2", "16M"]);
        assert_eq!(r.code, 0);
        // info needs no key; with --output=json the encrypt object is qemu's.
        b.same(&["info", "--output=json", "a.qcow2"]);
        b.same(&["info", "a.qcow2"]);
        b.same(&["info", "--output=json", "--object", SECRET, "--image-opts", &opts("a.qcow2")]);
        // check needs the key, as in qemu; then it is clean.
        b.same(&["check", "a.qcow2"]);
        b.same(&["check", "--object", SECRET, "--image-opts", &opts("a.qcow2")]);
        b.same(&["check", "--object", WRONG, "--image-opts", &opts("a.qcow2")]);
        b.qemu_check_clean("a.qcow2");
        b.same(&["measure", "--object", SECRET, "-O", "qcow2", "-o", &o, "--size", "16M"]);
    }
    // qemu's refusals, in its words.
    for o in [
        "encrypt.format=luks",
        "encryption=on",
        "encryption=on,encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.cipher-alg=aes-128",
        "encrypt.format=foo,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
    ] {
        let r = b.same(&[
            "create", "-f", "qcow2", "--object", SECRET, "-o", o, "e.qcow2", "1M",
        ]);
        assert_eq!(r.code, 1, "{o}");
    }
    for o in [
        "encrypt.format=luks",
        "encryption=on,encrypt.key-secret=sec0",
    ] {
        b.same(&[
            "measure", "--object", SECRET, "-O", "qcow2", "-o", o, "--size", "16M",
        ]);
    }
    // Legacy AES: qemu-img 10 still makes such images; vdisk refuses to.
    let r = run_in(
        b.dir(),
        Path::new(VDISK),
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encryption=on,encrypt.key-secret=sec0",
            "aes.qcow2",
            "1M",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("encrypt.format=luks"), "{r:?}");
}

#[test]
fn cli_qcow2_luks_convert_both_ways_compare_map() {
    let b = Bench::new("qluks-convert");
    let data = write_source(&b, "in.raw");
    // vdisk makes the encrypted target; qemu reads it back.
    b.vdisk_ok(&[
        "convert", "--object", SECRET, "-O", "qcow2", "-o", LUKS, "in.raw", "v.qcow2",
    ]);
    let bytes = b.read("v.qcow2");
    assert!(
        !bytes
            .windows(27)
            .any(|w| w == b"QCOW2-LUKS-PLAINTEXT-CANARY"),
        "plaintext on disk"
    );
    b.qemu_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts("v.qcow2"),
        "-O",
        "raw",
        "back.raw",
    ]);
    assert!(
        b.read("back.raw") == data,
        "qemu reads vdisk's encrypted image"
    );
    b.qemu_check_clean("v.qcow2");
    // qemu makes one; vdisk reads it back.
    b.qemu_ok(&[
        "convert", "--object", SECRET, "-O", "qcow2", "-o", LUKS, "in.raw", "q.qcow2",
    ]);
    b.vdisk_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts("q.qcow2"),
        "-O",
        "raw",
        "back2.raw",
    ]);
    assert!(
        b.read("back2.raw") == data,
        "vdisk reads qemu's encrypted image"
    );
    // The same allocation as qemu's copy (unwritten ranges stay unallocated).
    let map = |img: &str| {
        b.qemu_ok(&[
            "map",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            &opts(img),
        ])
        .stdout
    };
    assert_eq!(
        map("v.qcow2"),
        map("q.qcow2"),
        "map of vdisk's and qemu's copies"
    );
    assert_eq!(
        b.read("v.qcow2").len(),
        b.read("q.qcow2").len(),
        "file lengths"
    );
    // Both tools agree on compare, map and the failures without the right key.
    for img in ["v.qcow2", "q.qcow2"] {
        b.same(&[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &opts(img),
            "driver=raw,file.filename=in.raw",
        ]);
        b.same(&[
            "map",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            &opts(img),
        ]);
        b.same(&["map", "--object", SECRET, "--image-opts", &opts(img)]);
        b.same(&["convert", "-O", "raw", img, "x.raw"]);
        b.same(&[
            "convert",
            "--object",
            WRONG,
            "--image-opts",
            &opts(img),
            "-O",
            "raw",
            "x.raw",
        ]);
        b.same(&[
            "measure",
            "--output=json",
            "--object",
            SECRET,
            "-O",
            "qcow2",
            "-o",
            LUKS,
            "--image-opts",
            &opts(img),
        ]);
    }
    // Encrypted to encrypted (a re-encryption under a new master key).
    b.vdisk_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts("q.qcow2"),
        "-O",
        "qcow2",
        "-o",
        &format!(
            "{LUKS},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"
        ),
        "re.qcow2",
    ]);
    b.same(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &opts("re.qcow2"),
        "driver=raw,file.filename=in.raw",
    ]);
    b.qemu_check_clean("re.qcow2");
    // Compression cannot be combined with encryption: refused before anything is made.
    let r = b.same(&[
        "convert", "--object", SECRET, "-c", "-O", "qcow2", "-o", LUKS, "in.raw", "c.qcow2",
    ]);
    assert_eq!(r.code, 1);
    assert!(!b.dir().join("c.qcow2").exists());
}

#[test]
fn cli_qcow2_luks_overlay_of_a_backing_file_reads_in_qemu() {
    let b = Bench::new("qluks-backing");
    let data = write_source(&b, "in.raw");
    b.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "3M"]);
    let r = run_in(
        b.dir(),
        Path::new("qemu-io"),
        &["-f", "qcow2", "-c", "write -P 0x5a 0 3M", "base.qcow2"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    // An encrypted overlay of a plain backing file, made and filled by vdisk.
    b.vdisk_ok(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "qcow2",
        "-o",
        LUKS,
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "in.raw",
        "top.qcow2",
    ]);
    b.qemu_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts("top.qcow2"),
        "-O",
        "raw",
        "back.raw",
    ]);
    assert!(
        b.read("back.raw") == data,
        "qemu reads the overlay as the source"
    );
    b.qemu_check_clean("top.qcow2");
    b.same(&["info", "--output=json", "top.qcow2"]);
    b.same(&[
        "map",
        "--output=json",
        "--object",
        SECRET,
        "--image-opts",
        &opts("top.qcow2"),
    ]);
}

#[test]
fn cli_qcow2_luks_legacy_aes_reads_as_qemu_reads_it() {
    let b = Bench::new("qluks-aes");
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encryption=on,encrypt.key-secret=sec0",
        "aes.qcow2",
        "1M",
    ]);
    b.qemu_io(
        "aes.qcow2",
        &["write -P 0xab 0 64k", "write -P 0xcd 70000 1000"],
    );
    b.same(&["info", "--output=json", "aes.qcow2"]);
    b.same(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts("aes.qcow2"),
        "-O",
        "raw",
        "aes.raw",
    ]);
    b.same(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &opts("aes.qcow2"),
        "driver=raw,file.filename=aes.raw",
    ]);
    // Converted to LUKS by vdisk, it reads the same in qemu.
    b.vdisk_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &opts("aes.qcow2"),
        "-O",
        "qcow2",
        "-o",
        LUKS,
        "l.qcow2",
    ]);
    let r = b.qemu_ok(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &opts("l.qcow2"),
        "driver=raw,file.filename=aes.raw",
    ]);
    assert!(r.stdout.contains("Images are identical"), "{r:?}");
    // The wrong passphrase reads as noise in both (legacy AES has no key check): compare
    // reports a mismatch (exit 1) at the same offset.
    let args = [
        "compare",
        "--object",
        WRONG,
        "--image-opts",
        &opts("aes.qcow2"),
        "driver=raw,file.filename=aes.raw",
    ];
    let q = qemu_img(b.dir(), &args);
    let v = run_in(b.dir(), Path::new(VDISK), &args);
    assert_eq!(q.code, 1, "{q:?}");
    assert_eq!((v.code, &v.stdout), (q.code, &q.stdout), "{v:?}");
}

#[test]
fn cli_qcow2_luks_encrypted_backing_file_takes_its_key_as_backing_option() {
    let b = Bench::new("qluks-enc-backing");
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        LUKS,
        "base.qcow2",
        "2M",
    ]);
    b.qemu_io("base.qcow2", &["write -P 0x6b 0 1M"]);
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "2M",
    ]);
    let top = "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=sec0";
    b.same(&["info", "--output=json", "--backing-chain", "top.qcow2"]);
    let r = b.same(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "raw",
        "top.qcow2",
        "t.raw",
    ]);
    assert_eq!(r.code, 1, "the backing file needs its key");
    let r = b.same(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        top,
        "-O",
        "raw",
        "t.raw",
    ]);
    assert_eq!(r.code, 0);
    b.same(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        top,
        &opts("base.qcow2"),
    ]);
    b.same(&[
        "map",
        "--output=json",
        "--object",
        SECRET,
        "--image-opts",
        top,
    ]);
}
