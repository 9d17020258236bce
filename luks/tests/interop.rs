//! The luks driver against the system qemu-img and qemu-io (the oracle): images qemu made
//! with each cipher combination read and written by vdisk, images vdisk made read by qemu,
//! `info`'s format-specific block, passphrases, and hostile headers.
//!
//! qemu-img spends about three seconds benchmarking PBKDF2 per create whatever the
//! `iter-time`, so the qemu-made images are created on parallel threads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vdisk_block::dev::InfoValue;
use vdisk_block::testing::{ModelTest, TempDir};
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, ZeroMode};
use vdisk_luks::keys::INVALID_PASSWORD;
use vdisk_luks::LuksFormat;
use zeroize::Zeroizing;

const PASSWORD: &str = "correct horse";
const SIZE: u64 = 1 << 20;

/// Cipher options qemu accepts, one combination of each mode, IV generator, key size and
/// hash family. (aes-192 outside xts is left out: its key material ends in a partial
/// sector, on which qemu-img 10 fails an assertion; vdisk refuses to create it.)
const COMBOS: &[&str] = &[
    "",
    "cipher-alg=aes-128,ivgen-alg=plain",
    "cipher-alg=aes-192,hash-alg=sha1",
    "cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=aes-128,cipher-mode=ecb,hash-alg=sha512",
    "cipher-mode=ctr,hash-alg=sha224",
    "ivgen-alg=essiv,hash-alg=sha384",
];

/// Defines the test passphrase once, under an id only this test binary uses.
fn secret_id() -> &'static str {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        vdisk_luks::secret::define("interop-pw", Zeroizing::new(PASSWORD.as_bytes().to_vec()))
            .expect("define secret");
        vdisk_luks::secret::define("interop-wrong", Zeroizing::new(b"wrong".to_vec()))
            .expect("define secret");
    });
    "interop-pw"
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (the oracle must be installed): {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn secret_arg(pw: &str) -> String {
    format!("secret,id=s,data={pw}")
}

fn image_opts(path: &Path) -> String {
    format!("driver=luks,key-secret=s,file.filename={}", path.display())
}

fn qemu_create(path: &Path, opts: &str) {
    let mut o = "key-secret=s,iter-time=10".to_string();
    if !opts.is_empty() {
        o = format!("{o},{opts}");
    }
    let p = path.to_string_lossy();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &secret_arg(PASSWORD),
            "-o",
            &o,
            &p,
            "1M",
        ],
    );
}

/// Runs qemu-io commands on a luks image; fails on any error or pattern mismatch.
fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = vec![
        "--object".to_string(),
        secret_arg(PASSWORD),
        "--image-opts".to_string(),
        image_opts(path),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
}

/// The guest contents as qemu reads them.
fn qemu_contents(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.qemu.raw",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &secret_arg(PASSWORD),
            "--image-opts",
            &image_opts(path),
            "-O",
            "raw",
            &out.to_string_lossy(),
        ],
    );
    std::fs::read(&out).expect("read qemu's copy")
}

fn options(writable: bool, key: Option<&str>) -> OpenOptions {
    let mut o = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    if let Some(k) = key {
        o.driver_options.insert("key-secret".into(), k.into());
    }
    o
}

/// The error of an open that must fail.
fn open_err(path: &Path, o: &OpenOptions) -> vdisk_block::Error {
    match LuksFormat.open(path, o) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn open(path: &Path, writable: bool) -> Arc<dyn BlockDev> {
    LuksFormat
        .open(path, &options(writable, Some(secret_id())))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).expect("read");
    buf
}

fn to_json(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => json!(b),
        InfoValue::Int(i) => json!(i),
        InfoValue::UInt(u) => json!(u),
        InfoValue::Text(t) => json!(t),
        InfoValue::List(l) => Value::Array(l.iter().map(to_json).collect()),
        InfoValue::Map(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

/// Requires vdisk's format-specific block to equal qemu-img's, keys in qemu's order.
fn assert_same_info(path: &Path) {
    let q: Value = serde_json::from_str(&run_ok(
        "qemu-img",
        &["info", "--output=json", &path.to_string_lossy()],
    ))
    .expect("qemu-img JSON");
    // Without the key, as qemu-img info.
    let mut o = options(false, None);
    o.metadata_only = true;
    let dev = LuksFormat.open(path, &o).expect("open without key");
    let fs = dev
        .format_specific()
        .expect("info")
        .expect("format specific");
    let ours = json!({"type": fs.kind, "data": Value::Object(
        fs.data.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())});
    let theirs = &q["format-specific"];
    assert_eq!(&ours, theirs, "{}", path.display());
    let keys = |v: &Value| -> Vec<String> {
        v["data"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(keys(&ours), keys(theirs), "key order");
    assert_eq!(q["virtual-size"], json!(dev.size()));
    assert!(dev.info().expect("info").encrypted);
}

fn create_ours(path: &Path, opts: &str) {
    let mut options = CreateOptions {
        size: SIZE,
        options: CreateOptions::parse_options(opts).expect("options"),
    };
    options
        .options
        .insert("key-secret".into(), secret_id().into());
    options.options.insert("iter-time".into(), "10".into());
    LuksFormat.create(path, options).expect("create");
}

#[test]
fn qemu_images_of_every_cipher_read_and_written_by_vdisk() {
    let dir = TempDir::new("luks-q2v").expect("temp dir");
    let images: Vec<PathBuf> = (0..COMBOS.len())
        .map(|i| dir.join(format!("q{i}.luks")))
        .collect();
    std::thread::scope(|s| {
        for (path, opts) in images.iter().zip(COMBOS) {
            s.spawn(move || {
                qemu_create(path, opts);
                qemu_io(
                    path,
                    &[
                        "write -P 0x5a 0 64k",
                        "write -P 0x33 1000 3000",
                        "write -P 0x44 1040384 8192",
                    ],
                );
            });
        }
    });
    for (path, opts) in images.iter().zip(COMBOS) {
        assert_same_info(path);
        let dev = open(path, true);
        // The whole disk, unwritten sectors (qemu's noise) included, so every sector's IV
        // and the cipher are checked, not just the patterns.
        assert!(
            read_all(dev.as_ref()) == qemu_contents(path, dir.path()),
            "{opts}: vdisk reads what qemu reads"
        );
        dev.write_at(&[0x77; 5000], 100_000).expect("write");
        dev.write_zeroes(200_001, 10_000, ZeroMode::MayUnmap)
            .expect("zeroes");
        dev.flush().expect("flush");
        drop(dev);
        qemu_io(
            path,
            &[
                "read -P 0x77 100000 5000",
                "read -P 0 200001 10000",
                "read -P 0x33 1000 3000",
                "read -P 0x5a 0 1000",
                "read -P 0x44 1040384 8192",
            ],
        );
    }
}

#[test]
fn vdisk_images_of_every_cipher_open_in_qemu() {
    let dir = TempDir::new("luks-v2q").expect("temp dir");
    for (i, opts) in COMBOS.iter().enumerate() {
        let path = dir.join(format!("v{i}.luks"));
        create_ours(&path, opts);
        let dev = open(&path, true);
        let mut model = vec![0u8; SIZE as usize];
        for (j, b) in model[..SIZE as usize / 2].iter_mut().enumerate() {
            *b = (j % 251) as u8;
        }
        model[700_000..700_100].fill(0x5a);
        dev.write_at(&model[..SIZE as usize / 2], 0).expect("write");
        dev.write_zeroes(SIZE / 2, SIZE / 2, ZeroMode::KeepAllocated)
            .expect("zeroes");
        dev.write_at(&model[700_000..700_100], 700_000)
            .expect("write");
        dev.flush().expect("flush");
        assert!(read_all(dev.as_ref()) == model, "{opts}: reads back");
        drop(dev);
        let raw = dir.join(format!("v{i}.raw"));
        std::fs::write(&raw, &model).expect("model");
        run_ok(
            "qemu-img",
            &[
                "compare",
                "--object",
                &secret_arg(PASSWORD),
                "--image-opts",
                &image_opts(&path),
                &format!("driver=raw,file.filename={}", raw.display()),
            ],
        );
        // Neither the pattern nor a zero sector appears in the file's payload.
        let bytes = std::fs::read(&path).expect("read image");
        let header = vdisk_luks::Header::parse(&bytes).expect("header");
        let payload = &bytes[header.payload_bytes() as usize..];
        assert_eq!(payload.len() as u64, SIZE);
        assert!(
            !payload.windows(32).any(|w| w == [0x5a; 32]),
            "{opts}: plaintext"
        );
        assert!(
            !payload.chunks(512).any(|c| c.iter().all(|&b| b == 0)),
            "{opts}: a zero sector was stored plainly"
        );
        assert!(
            !payload.windows(64).any(|w| w == &model[64..128]),
            "{opts}: plaintext"
        );
        assert_same_info(&path);
    }
}

#[test]
fn wrong_passphrase_is_refused_by_both_with_qemus_words() {
    let dir = TempDir::new("luks-pw").expect("temp dir");
    let path = dir.join("p.luks");
    create_ours(&path, "");
    let err = open_err(&path, &options(false, Some("interop-wrong")));
    assert_eq!(err.message(), INVALID_PASSWORD);
    let out = run(
        "qemu-io",
        &[
            "--object",
            &secret_arg("wrong"),
            "--image-opts",
            &image_opts(&path),
            "-c",
            "read 0 512",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(INVALID_PASSWORD),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An undefined secret and a missing key-secret, in qemu's words.
    let err = open_err(&path, &options(false, Some("no-such-secret")));
    assert_eq!(err.message(), "No secret with id 'no-such-secret'");
    let err = open_err(&path, &options(true, None));
    assert_eq!(
        err.message(),
        "Parameter 'key-secret' is required for cipher"
    );
}

#[test]
fn huge_iteration_counts_show_in_info_but_are_not_run() {
    let dir = TempDir::new("luks-iter").expect("temp dir");
    let good = pristine(&dir);
    for (name, at) in [("digest", 164), ("slot", 208 + 4)] {
        let mut bytes = good.clone();
        be32(&mut bytes, at, u32::MAX);
        let path = dir.join("iter.luks");
        std::fs::write(&path, &bytes).expect("write");
        // info shows it (as qemu-img info does) ...
        let mut o = options(false, Some(secret_id()));
        o.metadata_only = true;
        let dev = LuksFormat.open(&path, &o).expect("metadata-only open");
        let start = Instant::now();
        let err = dev.read_at(&mut [0u8; 512], 0).expect_err("unlock");
        assert!(err.message().contains("limit"), "{name}: {}", err.message());
        // ... and unlocking refuses before spending 2^32 iterations.
        let err = open_err(&path, &options(true, Some(secret_id())));
        assert!(err.message().contains("limit"), "{name}: {}", err.message());
        assert!(start.elapsed() < Duration::from_secs(2), "{name}");
        let out = run(
            "qemu-img",
            &["info", "--output=json", &path.to_string_lossy()],
        );
        assert!(out.status.success(), "{name}: qemu-img info refused it");
    }
}

#[test]
fn key_material_of_partial_sectors_is_not_created() {
    let dir = TempDir::new("luks-192").expect("temp dir");
    let mut options = CreateOptions {
        size: SIZE,
        options: CreateOptions::parse_options("cipher-alg=aes-192,cipher-mode=cbc").expect("o"),
    };
    options
        .options
        .insert("key-secret".into(), secret_id().into());
    let err = LuksFormat
        .create(&dir.join("c.luks"), options)
        .expect_err("aes-192-cbc");
    assert!(err.message().contains("whole sectors"), "{}", err.message());
}

#[test]
fn info_needs_no_key_and_data_does() {
    let dir = TempDir::new("luks-info").expect("temp dir");
    let path = dir.join("i.luks");
    create_ours(&path, "cipher-mode=cbc,ivgen-alg=essiv");
    let mut o = options(false, None);
    o.metadata_only = true;
    let dev = LuksFormat.open(&path, &o).expect("metadata-only open");
    assert_eq!(dev.size(), SIZE);
    let err = dev.read_at(&mut [0u8; 512], 0).expect_err("no key");
    assert_eq!(
        err.message(),
        "Parameter 'key-secret' is required for cipher"
    );
    // With a key, a metadata-only open unlocks when data is read after all.
    let mut o = options(false, Some(secret_id()));
    o.metadata_only = true;
    let dev = LuksFormat.open(&path, &o).expect("open");
    dev.read_at(&mut [0u8; 512], 0).expect("deferred unlock");
}

#[test]
fn behaves_like_the_model_under_concurrent_random_io() {
    let dir = TempDir::new("luks-model").expect("temp dir");
    let path = dir.join("m.luks");
    let mut options = CreateOptions {
        size: 4 << 20,
        options: Default::default(),
    };
    options
        .options
        .insert("key-secret".into(), secret_id().into());
    options.options.insert("iter-time".into(), "10".into());
    LuksFormat.create(&path, options).expect("create");
    ModelTest::new(4 << 20)
        .threads(2)
        .ops(200)
        .seed(11)
        .initial_zero(false)
        .reopen(true)
        .run(|| Ok(open(&path, true)))
        .unwrap_or_else(|e| panic!("{e}"));
    // Grown space exists and takes writes; qemu reads them.
    let dev = open(&path, true);
    dev.resize(5 << 20, vdisk_block::Preallocation::Off)
        .expect("grow");
    dev.write_at(&[0x61; 4096], (5 << 20) - 4096)
        .expect("write");
    dev.flush().expect("flush");
    drop(dev);
    qemu_io(&path, &["read -P 0x61 5238784 4096"]);
}

/// A vdisk-made image's bytes, for mutating.
fn pristine(dir: &TempDir) -> Vec<u8> {
    let path = dir.join("pristine.luks");
    create_ours(&path, "");
    std::fs::read(&path).expect("read")
}

fn be32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn hostile_headers_are_refused_quickly() {
    let dir = TempDir::new("luks-hostile").expect("temp dir");
    let good = pristine(&dir);
    type Mutation = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Mutation, &str, bool)> = vec![
        ("magic", |b| b[0] = b'X', "not in LUKS format", true),
        (
            "version 2",
            |b| b[7] = 2,
            "LUKS version 2 is not supported",
            true,
        ),
        (
            "short file",
            |b| b.truncate(300),
            "not in LUKS format",
            true,
        ),
        (
            "cipher name",
            |b| b[8..16].copy_from_slice(b"twofish\0"),
            "not supported",
            false,
        ),
        (
            "cipher mode",
            |b| b[40..52].copy_from_slice(b"gcm-plain64\0"),
            "not supported",
            false,
        ),
        (
            "hash",
            |b| b[72..82].copy_from_slice(b"whirlpool\0"),
            "not supported",
            false,
        ),
        (
            "no NUL",
            |b| b[8..40].fill(b'a'),
            "not NUL terminated",
            true,
        ),
        (
            "key bytes huge",
            |b| be32(b, 108, u32::MAX),
            "overlapping with the encrypted payload",
            true,
        ),
        (
            "key bytes odd",
            |b| be32(b, 108, 16),
            "with key size 8 bytes not supported",
            true,
        ),
        (
            "stripes",
            |b| be32(b, 208 + 3 * 48 + 44, 0xffff_ffff),
            "stripes",
            true,
        ),
        (
            "key offset past payload",
            |b| be32(b, 208 + 40, 0x7fff_ffff),
            "overlapping with the encrypted payload",
            true,
        ),
        (
            "key offset in header",
            |b| be32(b, 208 + 40, 0),
            "overlapping with the LUKS header",
            true,
        ),
        (
            "slots overlap",
            |b| {
                let v = u32::from_be_bytes([b[208 + 40], b[209 + 40], b[210 + 40], b[211 + 40]]);
                be32(b, 208 + 48 + 40, v + 1)
            },
            "overlapping",
            true,
        ),
        (
            "payload past EOF",
            |b| be32(b, 104, 0xffff_ffff),
            "past the end",
            false,
        ),
        (
            "payload in header",
            |b| be32(b, 104, 0),
            "overlapping with the header",
            true,
        ),
        (
            "key material past EOF",
            |b| b.truncate(100_000),
            "past the end",
            false,
        ),
        (
            "mk iterations zero",
            |b| be32(b, 164, 0),
            "iteration count is zero",
            false,
        ),
        (
            "slot iterations zero",
            |b| be32(b, 208 + 4, 0),
            "iteration count is zero",
            false,
        ),
    ];
    for (name, mutate, expect, qemu_refuses) in cases {
        let mut bytes = good.clone();
        mutate(&mut bytes);
        let path = dir.join("hostile.luks");
        std::fs::write(&path, &bytes).expect("write");
        for (writable, key) in [(false, None), (true, Some(secret_id()))] {
            let mut o = options(writable, key);
            o.metadata_only = !writable;
            let start = Instant::now();
            let err = match LuksFormat.open(&path, &o) {
                Ok(_) => panic!("{name}: opened"),
                Err(e) => e,
            };
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{name}: took {:?}",
                start.elapsed()
            );
            assert!(
                err.message().contains(expect),
                "{name}: {:?} lacks {expect:?}",
                err.message()
            );
        }
        if qemu_refuses {
            let out = run("qemu-img", &["info", "-f", "luks", &path.to_string_lossy()]);
            assert!(!out.status.success(), "{name}: qemu-img opened it");
        }
    }
}
