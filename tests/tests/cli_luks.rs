//! `-f luks` images and `--object secret` on the command line, against the system qemu-img
//! as the oracle.
//!
//! Each check runs qemu-img, vdisk under the name `qemu-img` (drop-in mode: exit code,
//! stdout and stderr byte for byte) and vdisk by its own name (exit code and stdout; a
//! failure on one `vdisk: ` line), on the same files. qemu-img spends about three seconds
//! per luks create whatever the `iter-time`, so few images are made by it.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const SECRET: &str = "secret,id=sec0,data=hunter2";
const WRONG: &str = "secret,id=sec0,data=hunter3";

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

    /// Only qemu-img and drop-in vdisk, for output vdisk's own mode words differently.
    fn same_dropin(&self, args: &[&str]) {
        let name = Path::new("qemu-img");
        let q = run_with_path(self.dir(), None, name, args);
        let d = run_with_path(self.dir(), self.dropin.parent(), name, args);
        assert_eq!(d, q, "drop-in vdisk vs qemu-img for {args:?}");
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
        let opts = format!("driver=luks,key-secret=sec0,file.filename={file}");
        let mut args = vec!["--object", SECRET, "--image-opts", &opts];
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
}

fn opts(file: &str) -> String {
    format!("driver=luks,key-secret=sec0,file.filename={file}")
}

#[test]
fn create_and_its_errors_match_qemu_img() {
    let b = Bench::new("luks-create");
    let create = |opts: &str, file: &str| {
        vec![
            "create".to_string(),
            "-f".into(),
            "luks".into(),
            "--object".into(),
            SECRET.into(),
            "-o".into(),
            opts.into(),
            file.into(),
            "1M".into(),
        ]
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        b.same(&args)
    };
    // Success: the Formatting line; then each tool's image opens in the other.
    let ok = run(create(
        "key-secret=sec0,iter-time=10,cipher-mode=cbc,ivgen-alg=essiv,preallocation=falloc",
        "a.luks",
    ));
    assert_eq!(ok.code, 0);
    b.qemu_io("a.luks", &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
    // Refusals before and after the Formatting line, in qemu's words.
    for o in [
        "iter-time=10",
        "key-secret=nope,iter-time=10",
        "key-secret=sec0,detached-header=on",
        "key-secret=sec0,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha1",
        "key-secret=sec0,bogus=1",
    ] {
        let r = run(create(o, "e.luks"));
        assert_eq!(r.code, 1, "{o}: {r:?}");
    }
    // qemu-img's option lists, without and with a file name.
    b.same_dropin(&["create", "-f", "luks", "-o", "help"]);
    b.same_dropin(&["create", "-f", "luks", "-o", "help", "a.luks"]);
    // measure: the header's size depends on the cipher; the secret must exist. (qemu-img
    // builds a whole header for it, PBKDF2 timing included: a few seconds each.)
    for (o, json) in [
        ("iter-time=10", false),
        ("key-secret=nope", true),
        ("key-secret=sec0,iter-time=10", false),
        (
            "key-secret=sec0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc",
            true,
        ),
    ] {
        let mut args = vec![
            "measure", "-O", "luks", "--object", SECRET, "-o", o, "--size", "1000",
        ];
        if json {
            args.insert(1, "--output=json");
        }
        b.same(&args);
    }
    // --object errors.
    for object in [
        "secret,data=x",
        "secret,id=sec0",
        "foo,id=a",
        "secret,id=a,data=x,bogus=1",
        "secret,id=a,data=@@,format=base64",
    ] {
        let r = b.same(&["info", "--object", object, "a.luks"]);
        assert_eq!(r.code, 1, "{object}");
    }
    let r = b.same(&["info", "--object", SECRET, "--object", SECRET, "a.luks"]);
    assert_eq!(r.code, 1);
}

#[test]
fn info_map_compare_convert_check_match_qemu_img() {
    let b = Bench::new("luks-cmds");
    b.qemu_ok(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        "key-secret=sec0,iter-time=10",
        "q.luks",
        "4M",
    ]);
    b.qemu_io(
        "q.luks",
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x33 1000 3000",
            "write -z 2M 512k",
        ],
    );
    // info needs no key, in both forms.
    b.same(&["info", "q.luks"]);
    b.same(&["info", "--output=json", "q.luks"]);
    b.same(&["info", "-f", "luks", "--output=json", "q.luks"]);
    b.same(&["info", "--backing-chain", "q.luks"]);
    // Named by options with a key-secret (even an undefined one: info never unlocks), qemu
    // names the image by JSON.
    let unknown = "driver=luks,key-secret=nope,file.filename=q.luks";
    b.same(&["info", "--image-opts", unknown]);
    b.same(&["info", "--output=json", "--image-opts", unknown]);
    // Data needs the key: refused without it, with a wrong one, or with an unknown id.
    let o = opts("q.luks");
    for r in [
        b.same(&["convert", "-O", "raw", "q.luks", "out.raw"]),
        b.same(&[
            "convert",
            "--object",
            WRONG,
            "--image-opts",
            &o,
            "-O",
            "raw",
            "out.raw",
        ]),
        b.same(&[
            "convert",
            "--image-opts",
            "driver=luks,key-secret=nope,file.filename=q.luks",
            "-O",
            "raw",
            "out.raw",
        ]),
        b.same(&["map", "--output=json", "q.luks"]),
    ] {
        assert_eq!(r.code, 1, "{r:?}");
    }
    assert!(b
        .same(&[
            "map",
            "--output=json",
            "--object",
            WRONG,
            "--image-opts",
            &o
        ])
        .stderr
        .contains("Invalid password, cannot unlock any keyslot"));
    // With the key.
    b.same(&[
        "map",
        "--output=json",
        "--object",
        SECRET,
        "--image-opts",
        &o,
    ]);
    b.same(&["map", "--object", SECRET, "--image-opts", &o]);
    assert_eq!(
        b.same(&["check", "--object", SECRET, "--image-opts", &o])
            .code,
        63
    );
    b.qemu_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &o,
        "-O",
        "raw",
        "q.raw",
    ]);
    b.vdisk_ok(&[
        "convert",
        "--object",
        SECRET,
        "--image-opts",
        &o,
        "-O",
        "raw",
        "v.raw",
    ]);
    let q = std::fs::read(b.dir().join("q.raw")).expect("q.raw");
    assert!(q == std::fs::read(b.dir().join("v.raw")).expect("v.raw"));
    assert!(q[..1000].iter().all(|&x| x == 0x5a) && q[1000..4000].iter().all(|&x| x == 0x33));
    let r = b.same(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &o,
        "driver=raw,file.filename=q.raw",
    ]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "Images are identical.\n"));
    // A secret from a file (its bytes as they are) and in base64.
    std::fs::write(b.dir().join("pw"), "hunter2").expect("pw");
    for object in [
        "secret,id=sec0,file=pw",
        "secret,id=sec0,data=aHVudGVyMg==,format=base64",
    ] {
        let r = b.same(&[
            "compare",
            "--object",
            object,
            "--image-opts",
            &o,
            "driver=raw,file.filename=q.raw",
        ]);
        assert_eq!(r.code, 0, "{object}");
    }
    // A trailing newline is part of the passphrase: compare's error exit.
    std::fs::write(b.dir().join("pw"), "hunter2\n").expect("pw");
    let r = b.same(&[
        "compare",
        "--object",
        "secret,id=sec0,file=pw",
        "--image-opts",
        &o,
        "driver=raw,file.filename=q.raw",
    ]);
    assert_eq!(r.code, 2);
    assert!(r
        .stderr
        .contains("Invalid password, cannot unlock any keyslot"));
}

#[test]
fn convert_to_luks_opens_in_qemu() {
    let b = Bench::new("luks-convert");
    let mut data = vec![0u8; 3 << 20];
    for (i, x) in data.iter_mut().enumerate().take(2 << 20) {
        *x = (i * 31 % 253) as u8 | 1;
    }
    std::fs::write(b.dir().join("src.raw"), &data).expect("src");
    b.vdisk_ok(&[
        "convert",
        "--object",
        SECRET,
        "-O",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10,cipher-alg=aes-128",
        "src.raw",
        "t.luks",
    ]);
    let r = b.qemu_ok(&[
        "compare",
        "--object",
        SECRET,
        "--image-opts",
        &opts("t.luks"),
        "driver=raw,file.filename=src.raw",
    ]);
    assert_eq!(r.stdout, "Images are identical.\n");
    // The zero tail was written encrypted: no plain data and no plain zero sector.
    let file = std::fs::read(b.dir().join("t.luks")).expect("image");
    let payload = &file[file.len() - data.len()..];
    assert!(!payload.windows(64).any(|w| w == &data[4096..4160]));
    assert!(!payload.chunks(512).any(|c| c.iter().all(|&x| x == 0)));
    // Same info as qemu-img shows for it.
    b.same(&["info", "--output=json", "t.luks"]);
    // Without -o key-secret, refused as qemu-img refuses it.
    let r = b.same(&["convert", "-O", "luks", "src.raw", "u.luks"]);
    assert_eq!(r.code, 1);
}

#[test]
fn hostile_headers_are_refused_in_qemus_words() {
    let b = Bench::new("luks-hostile");
    b.vdisk_ok(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        "key-secret=sec0,iter-time=10",
        "good.luks",
        "1M",
    ]);
    let good = std::fs::read(b.dir().join("good.luks")).expect("image");
    let be32 = |bytes: &mut Vec<u8>, at: usize, v: u32| {
        bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
    };
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("version", Box::new(|b| b[7] = 2)),
        ("magic", Box::new(|b| b[0] = b'X')),
        (
            "mode",
            Box::new(|b| b[40..52].copy_from_slice(b"gcm-plain64\0")),
        ),
        (
            "hash",
            Box::new(|b| b[72..82].copy_from_slice(b"whirlpool\0")),
        ),
        ("no NUL", Box::new(|b| b[72..104].fill(b'a'))),
        ("key bytes", Box::new(move |b| be32(b, 108, u32::MAX))),
        ("key size", Box::new(move |b| be32(b, 108, 16))),
        (
            "stripes",
            Box::new(move |b| be32(b, 208 + 3 * 48 + 44, u32::MAX)),
        ),
        ("slot in header", Box::new(move |b| be32(b, 208 + 40, 0))),
        (
            "slots overlap",
            Box::new(move |b| be32(b, 208 + 48 + 40, 9)),
        ),
        ("payload in header", Box::new(move |b| be32(b, 104, 0))),
        ("digest iterations", Box::new(move |b| be32(b, 164, 0))),
    ];
    for (name, mutate) in cases {
        let mut bytes = good.clone();
        mutate(&mut bytes);
        std::fs::write(b.dir().join("bad.luks"), &bytes).expect("write");
        let r = b.same(&[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts("bad.luks"),
            "-O",
            "raw",
            "out.raw",
        ]);
        assert_eq!(r.code, 1, "{name}");
    }
}

/// The commands that change an image take `--object` too: resize of a LUKS image through
/// `--image-opts` with its key, and the refusal of a wrong or missing secret, as qemu-img.
#[test]
fn resize_takes_secrets_like_qemu_img() {
    let b = Bench::new("luks-resize");
    for name in ["q.luks", "d.luks"] {
        b.qemu_ok(&[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET,
            "-o",
            "key-secret=sec0,iter-time=10",
            name,
            "4M",
        ]);
    }
    let (q, d) = (opts("q.luks"), opts("d.luks"));
    let name = Path::new("qemu-img");
    for (secret, size) in [
        (WRONG, "8M"),
        ("secret,id=other,data=x", "8M"),
        (SECRET, "8M"),
    ] {
        let rq = run_with_path(
            b.dir(),
            None,
            name,
            &["resize", "--object", secret, "--image-opts", &q, size],
        );
        let rd = run_with_path(
            b.dir(),
            b.dropin.parent(),
            name,
            &["resize", "--object", secret, "--image-opts", &d, size],
        );
        assert_eq!(
            (rd.code, &rd.stdout, rd.stderr.replace("d.luks", "q.luks")),
            (rq.code, &rq.stdout, rq.stderr.clone()),
            "resize with {secret}"
        );
    }
    let info = |f: &str| -> Value {
        let r = b.qemu_ok(&["info", "--output=json", f]);
        serde_json::from_str(&r.stdout).expect("info JSON")
    };
    assert_eq!(
        info("d.luks")["virtual-size"],
        info("q.luks")["virtual-size"]
    );
    assert_eq!(info("d.luks")["virtual-size"], 8 << 20);
    b.qemu_io("d.luks", &["write -P 0x3c 7m 1m", "read -P 0x3c 7m 1m"]);
}
