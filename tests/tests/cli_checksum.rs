//! `vdisk checksum` against the oracle: the system qemu-img converts each image to raw, and
//! `sha256sum` of that file must be vdisk's `sha256`; a Python reference computes
//! `blk-sha256` from the same raw bytes. The bundled and the shared real-world fixtures are
//! checked against the goldens in their manifests.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use vdisk_tests::{qemu_img, run_in, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const MIB: u64 = 1 << 20;

/// `blk-sha256` spelled out as `vdisk checksum --help` defines it, over a raw file.
const BLK_SHA256_PY: &str = r#"
import hashlib, struct, sys
B = 65536
outer, n = hashlib.sha256(), 0
with open(sys.argv[1], "rb") as f:
    while block := f.read(B):
        outer.update(hashlib.sha256(block).digest())
        n += len(block)
outer.update(struct.pack("<Q", n))
print(outer.hexdigest())
"#;

fn vdisk(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, Path::new(VDISK), args)
}

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let r = run_in(dir, Path::new("qemu-io"), &args);
    ok(&r, &format!("qemu-io {args:?}"));
    assert!(!r.stdout.contains("failed"), "qemu-io {args:?}: {r:?}");
}

/// The first word of a tool's output.
fn first_word(r: &Run) -> String {
    r.stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `sha256sum FILE`.
fn sha256sum(dir: &Path, file: &Path) -> String {
    let r = run_in(dir, Path::new("sha256sum"), &[&file.to_string_lossy()]);
    ok(&r, "sha256sum");
    first_word(&r)
}

/// The Python reference of `blk-sha256` over a raw file.
fn python_blk(dir: &Path, file: &Path) -> String {
    let r = run_in(
        dir,
        Path::new("python3"),
        &["-c", BLK_SHA256_PY, &file.to_string_lossy()],
    );
    ok(&r, "python3 blk-sha256 reference");
    first_word(&r)
}

/// The oracle: `qemu-img convert -O raw` of `file` into the scratch, with its sha256,
/// blk-sha256 (Python) and length.
struct Oracle {
    sha256: String,
    blk: String,
    len: u64,
}

fn oracle(dir: &Path, format: &str, file: &str) -> Oracle {
    let raw = dir.join(format!("{file}.oracle.raw"));
    let raw_name = raw.to_string_lossy().into_owned();
    ok(
        &qemu_img(
            dir,
            &["convert", "-f", format, "-O", "raw", file, &raw_name],
        ),
        &format!("qemu-img convert {file}"),
    );
    let o = Oracle {
        sha256: sha256sum(dir, &raw),
        blk: python_blk(dir, &raw),
        len: fs::metadata(&raw).expect("stat raw").len(),
    };
    fs::remove_file(&raw).expect("remove oracle raw");
    o
}

/// `vdisk checksum --output=json ARGS`, parsed; the command must succeed.
fn checksum_json(dir: &Path, args: &[&str]) -> Value {
    let mut full = vec!["checksum", "--output=json"];
    full.extend_from_slice(args);
    let r = vdisk(dir, &full);
    ok(&r, &format!("vdisk {full:?}"));
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("vdisk {full:?}: invalid JSON ({e}):\n{}", r.stdout))
}

/// The human line `ALGO:HEX  NAME` split into its digest (with prefix) and name.
fn checksum_human(dir: &Path, args: &[&str]) -> (String, String) {
    let mut full = vec!["checksum"];
    full.extend_from_slice(args);
    let r = vdisk(dir, &full);
    ok(&r, &format!("vdisk {full:?}"));
    let line = r.stdout.strip_suffix('\n').unwrap_or(&r.stdout);
    assert!(!line.contains('\n'), "one line expected: {:?}", r.stdout);
    let (digest, name) = line
        .split_once("  ")
        .unwrap_or_else(|| panic!("not 'DIGEST  NAME': {line:?}"));
    (digest.to_string(), name.to_string())
}

/// Asserts both algorithms of vdisk on `file` against the oracle.
fn assert_matches_oracle(dir: &Path, format: &str, file: &str) {
    let want = oracle(dir, format, file);
    let (digest, name) = checksum_human(dir, &["-f", format, file]);
    assert_eq!(
        digest,
        format!("sha256:{}", want.sha256),
        "sha256 of {file}"
    );
    assert_eq!(name, file);
    let (digest, _) = checksum_human(dir, &["-f", format, "--algorithm", "blk-sha256", file]);
    assert_eq!(
        digest,
        format!("blk-sha256:{}", want.blk),
        "blk-sha256 of {file}"
    );
    let v = checksum_json(dir, &["-f", format, "-U", file]);
    assert_eq!(v["digest"], want.sha256.as_str(), "{file}");
    assert_eq!(v["virtual-size"], want.len, "{file}");
    // Probing finds the same format, except for a fixed VHD: its only footer is at the end,
    // where neither qemu-img nor vdisk looks, so both take it for raw.
    if file != "fixed.vpc" {
        assert_eq!(checksum_json(dir, &[file]), v, "{file} probed");
    }
}

/// A pattern with data, explicit zeroes, an allocated block of zero bytes and a hole, at
/// offsets that do not line up with clusters or 64 KiB blocks.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000k 300k",
    "write -P 0 1536k 64k",
    "write -z 2M 512k",
    "write -P 0x33 3000k 4k",
    "write -P 0x44 4193792 512",
];

fn create(dir: &Path, format: &str, opts: &str, name: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", format];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    ok(&qemu_img(dir, &args), &format!("qemu-img {args:?}"));
}

#[test]
fn every_format_matches_sha256sum_of_qemu_raw_conversion() {
    let s = Scratch::new("cksum-formats");
    let dir = s.dir();
    let specs: &[(&str, &str, &str)] = &[
        ("plain.raw", "raw", ""),
        ("v3.qcow2", "qcow2", ""),
        ("c512.qcow2", "qcow2", "cluster_size=512"),
        ("sparse.vmdk", "vmdk", ""),
        ("dyn.vhdx", "vhdx", ""),
        ("dyn.vpc", "vpc", ""),
        ("fixed.vpc", "vpc", "subformat=fixed"),
    ];
    for (name, format, opts) in specs {
        create(dir, format, opts, name, "4M");
        qemu_io(dir, format, name, WRITES);
    }
    let mut images: Vec<(&str, &str)> = specs.iter().map(|(n, f, _)| (*n, *f)).collect();
    let convert = |args: &[&str]| ok(&qemu_img(dir, args), &format!("qemu-img {args:?}"));
    convert(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "v3.qcow2",
        "compressed.qcow2",
    ]);
    convert(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "v3.qcow2",
        "stream.vmdk",
    ]);
    // A chain: data in the backing file, overwritten, zeroed and left to show through.
    convert(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "v3.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x66 1100k 8k",
            "write -z 0 32k",
            "write -P 0x77 3M 100k",
        ],
    );
    // A raw file that is not a whole number of sectors: its tail reads as zeroes.
    fs::write(dir.join("odd.raw"), vec![0xabu8; 70_000]).expect("write odd.raw");
    images.extend([
        ("compressed.qcow2", "qcow2"),
        ("stream.vmdk", "vmdk"),
        ("top.qcow2", "qcow2"),
        ("odd.raw", "raw"),
    ]);
    for (name, format) in &images {
        assert_matches_oracle(dir, format, name);
    }
    // The raw tail padding is digested, as qemu-img's conversion writes it.
    assert_eq!(
        checksum_json(dir, &["odd.raw"])["virtual-size"],
        70_144,
        "odd.raw"
    );
    // --image-opts names the same contents.
    let v = checksum_json(
        dir,
        &["--image-opts", "driver=qcow2,file.filename=top.qcow2"],
    );
    assert_eq!(
        v["digest"],
        checksum_json(dir, &["top.qcow2"])["digest"],
        "--image-opts"
    );
}

#[test]
fn blk_sha256_of_a_large_sparse_image_reads_only_its_data() {
    // 64 GiB: reading or hashing every block would take minutes; only the two written
    // blocks may be touched.
    let s = Scratch::new("cksum-sparse");
    let dir = s.dir();
    create(dir, "qcow2", "", "big.qcow2", "64G");
    qemu_io(
        dir,
        "qcow2",
        "big.qcow2",
        &["write -P 0x5a 1G 64k", "write -P 0 2G 64k"],
    );
    let script = r#"
import hashlib, struct
B, L = 65536, 64 << 30
zero = hashlib.sha256(bytes(B)).digest()
blocks = [zero] * (L // B)
blocks[(1 << 30) // B] = hashlib.sha256(b"\x5a" * B).digest()
print(hashlib.sha256(b"".join(blocks) + struct.pack("<Q", L)).hexdigest())
"#;
    let r = run_in(dir, Path::new("python3"), &["-c", script]);
    ok(&r, "python3");
    let start = std::time::Instant::now();
    let v = checksum_json(dir, &["--algorithm", "blk-sha256", "big.qcow2"]);
    assert_eq!(v["digest"], first_word(&r).as_str());
    assert_eq!(v["virtual-size"], 64u64 << 30);
    assert!(
        start.elapsed().as_secs() < 30,
        "blk-sha256 of a sparse 64 GiB image took {:?}",
        start.elapsed()
    );
}

#[test]
fn json_output_has_the_documented_fields_in_order() {
    let s = Scratch::new("cksum-json");
    let dir = s.dir();
    create(dir, "qcow2", "", "a.qcow2", "1M");
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 0x11 4k 4k"]);
    for algorithm in ["sha256", "blk-sha256"] {
        let v = checksum_json(dir, &["--algorithm", algorithm, "a.qcow2"]);
        let map = v.as_object().expect("a JSON object");
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["algorithm", "digest", "filename", "virtual-size"]);
        assert_eq!(v["algorithm"], algorithm);
        assert_eq!(v["filename"], "a.qcow2");
        assert_eq!(v["virtual-size"], MIB);
        let digest = v["digest"].as_str().expect("digest is a string");
        assert_eq!(digest.len(), 64);
        assert!(digest
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        // The human form shows the same digest.
        let (human, _) = checksum_human(dir, &["--algorithm", algorithm, "a.qcow2"]);
        assert_eq!(human, format!("{algorithm}:{digest}"));
    }
    // --verify adds "verified" (and a mismatch still exits 1).
    let zeroes = "0".repeat(64);
    let r = vdisk(
        dir,
        &["checksum", "--output=json", "--verify", &zeroes, "a.qcow2"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "algorithm",
            "digest",
            "filename",
            "virtual-size",
            "verified"
        ]
    );
    assert_eq!(v["verified"], false);
}

#[test]
fn verify_exit_codes_and_messages() {
    let s = Scratch::new("cksum-verify");
    let dir = s.dir();
    create(dir, "qcow2", "", "a.qcow2", "2M");
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 0x42 100k 200k"]);
    let sha = oracle(dir, "qcow2", "a.qcow2");
    let verify = |digest: &str, extra: &[&str]| {
        let mut args = vec!["checksum", "--verify", digest];
        args.extend_from_slice(extra);
        args.push("a.qcow2");
        vdisk(dir, &args)
    };
    // Matches, with or without the prefix, in either case; the prefix picks the algorithm.
    for digest in [
        sha.sha256.clone(),
        format!("sha256:{}", sha.sha256),
        sha.sha256.to_ascii_uppercase(),
        format!("blk-sha256:{}", sha.blk),
    ] {
        let r = verify(&digest, &[]);
        assert_eq!(r.code, 0, "{digest}: {r:?}");
        assert_eq!(r.stdout, "a.qcow2: OK\n");
        assert!(r.stderr.is_empty(), "{r:?}");
    }
    let r = verify(&sha.blk, &["--algorithm", "blk-sha256"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "a.qcow2: OK\n"));
    let r = verify(&sha.sha256, &["-q"]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (0, "", ""));
    // A mismatch: 1, FAILED, and both digests named on stderr.
    let r = verify(&sha.blk, &[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stdout, "a.qcow2: FAILED\n");
    assert!(
        r.stderr.contains("digest mismatch")
            && r.stderr.contains(&format!("sha256:{}", sha.sha256))
            && r.stderr.contains(&format!("sha256:{}", sha.blk)),
        "{r:?}"
    );
    let r = verify(&sha.sha256, &["-q", "--algorithm", "blk-sha256"]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (1, "", ""));
    // A missing image: 2, as compare's open failure.
    let r = vdisk(dir, &["checksum", "--verify", &sha.sha256, "missing.qcow2"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
    assert!(r.stderr.contains("missing.qcow2"), "{r:?}");
    let r = vdisk(dir, &["checksum", "missing.qcow2"]);
    assert_eq!(r.code, 2, "{r:?}");
    // Command-line mistakes: 1 with a message, nothing computed.
    for bad in [
        vec!["checksum", "--verify", "abc", "a.qcow2"],
        vec![
            "checksum",
            "--verify",
            &format!("md5:{}", sha.sha256),
            "a.qcow2",
        ],
        vec![
            "checksum",
            "--algorithm",
            "sha256",
            "--verify",
            &format!("blk-sha256:{}", sha.blk),
            "a.qcow2",
        ],
        vec!["checksum", "--algorithm", "crc32", "a.qcow2"],
        vec!["checksum", "--output", "xml", "a.qcow2"],
        vec!["checksum"],
        vec!["checksum", "a.qcow2", "a.qcow2"],
    ] {
        let r = vdisk(dir, &bad);
        assert_eq!(r.code, 1, "{bad:?}: {r:?}");
        assert!(r.stdout.is_empty(), "{bad:?}: {r:?}");
        assert!(r.stderr.contains("checksum"), "{bad:?}: {r:?}");
    }
}

#[test]
fn progress_is_shown_with_p_and_the_digest_still_printed() {
    let s = Scratch::new("cksum-progress");
    let dir = s.dir();
    create(dir, "qcow2", "", "a.qcow2", "8M");
    qemu_io(dir, "qcow2", "a.qcow2", &["write -P 0x42 1M 3M"]);
    let sha = oracle(dir, "qcow2", "a.qcow2");
    for (algorithm, want) in [("sha256", &sha.sha256), ("blk-sha256", &sha.blk)] {
        let r = vdisk(
            dir,
            &["checksum", "-p", "--algorithm", algorithm, "a.qcow2"],
        );
        ok(&r, "checksum -p");
        assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{r:?}");
        assert!(
            r.stdout.ends_with(&format!(
                "    (100.00/100%)\r\n{algorithm}:{want}  a.qcow2\n"
            )),
            "{r:?}"
        );
        // -q silences progress and output alike.
        let r = vdisk(dir, &["checksum", "-p", "-q", "a.qcow2"]);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    }
}

/// The shared real-world fixtures folder; its absence fails the test.
fn shared_fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    assert!(
        dir.join("MANIFEST.json").is_file(),
        "the shared fixtures are missing at {}: see fixtures/README.md",
        dir.display()
    );
    dir
}

/// Copies `stored` to `dest`, decompressing by suffix, leaving 64 KiB runs of zeroes as
/// holes so half-gigabyte images cost little disk.
fn stage(stored: &Path, dest: &Path) {
    let name = stored.to_string_lossy();
    let tool: Option<(&str, &str)> = [
        (".gz", ("gzip", "-dc")),
        (".xz", ("xz", "-dc")),
        (".bz2", ("bzip2", "-dc")),
        (".zip", ("unzip", "-p")),
    ]
    .into_iter()
    .find_map(|(suffix, tool)| name.ends_with(suffix).then_some(tool));
    let mut child = None;
    let mut input: Box<dyn Read> = match tool {
        None => Box::new(fs::File::open(stored).expect("open fixture")),
        Some((prog, arg)) => {
            let mut c = Command::new(prog)
                .arg(arg)
                .arg(stored)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("run {prog}: {e}"));
            let out = c.stdout.take().expect("piped stdout");
            child = Some(c);
            Box::new(out)
        }
    };
    let mut file = fs::File::create(dest).expect("create staged file");
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match input.read(&mut buf[filled..]).expect("read fixture") {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(filled as i64)).expect("seek");
        } else {
            file.write_all(&buf[..filled]).expect("write staged file");
        }
        len += filled as u64;
    }
    file.set_len(len).expect("set staged length");
    if let Some(mut c) = child {
        assert!(
            c.wait().expect("wait").success(),
            "decompressing {} failed",
            stored.display()
        );
    }
}

/// One image with a golden: where it was staged, its format if the manifest names one, and
/// the golden `[sha256, length]`.
struct Golden {
    id: String,
    dir: PathBuf,
    main: String,
    format: Option<String>,
    sha256: String,
    len: u64,
}

fn golden_pair(raw: &Value, id: &str) -> (String, u64) {
    let sha = raw[0].as_str().unwrap_or_else(|| panic!("{id}: raw[0]"));
    let len = raw[1].as_u64().unwrap_or_else(|| panic!("{id}: raw[1]"));
    (sha.to_string(), len)
}

/// Every fixture with a golden, bundled and shared, staged under `scratch` where needed.
fn goldens(scratch: &Scratch) -> Vec<Golden> {
    let mut out = Vec::new();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let text = fs::read_to_string(bundled.join("MANIFEST.json")).expect("bundled manifest");
    let manifest: Value = serde_json::from_str(&text).expect("bundled manifest JSON");
    for (name, entry) in manifest.as_object().expect("manifest object") {
        let (sha256, len) = golden_pair(&entry["raw"], name);
        out.push(Golden {
            id: name.clone(),
            dir: bundled.clone(),
            main: name.clone(),
            format: entry["format"].as_str().map(str::to_string),
            sha256,
            len,
        });
    }
    let shared = shared_fixtures();
    let text = fs::read_to_string(shared.join("MANIFEST.json")).expect("shared manifest");
    let manifest: Value = serde_json::from_str(&text).expect("shared manifest JSON");
    for (id, entry) in manifest.as_object().expect("manifest object") {
        if entry["raw"].is_null() {
            continue;
        }
        let (sha256, len) = golden_pair(&entry["raw"], id);
        let dir = scratch.sub(&id.replace('/', "_"));
        for f in entry["files"].as_array().expect("files") {
            let stored = f["stored"].as_str().expect("stored");
            let name = f["name"].as_str().expect("name");
            stage(&shared.join(stored), &dir.join(name));
        }
        // The goldens were made with the format named (a fixed VHD probes as raw);
        // malformed images are probed.
        let format = match id.split('/').next() {
            Some("vhd") => Some("vpc".to_string()),
            Some(f @ ("qcow2" | "vhdx" | "vmdk")) => Some(f.to_string()),
            _ => None,
        };
        out.push(Golden {
            id: id.clone(),
            dir,
            main: entry["main"].as_str().expect("main").to_string(),
            format,
            sha256,
            len,
        });
    }
    out
}

/// Fixtures up to this length are checked against the Python reference of `blk-sha256`,
/// which reads every byte (about 2.5 s per GiB here); larger ones (mostly holes) against
/// vdisk's `blk-sha256` of qemu-img's sparse raw conversion, whose allocation differs, so
/// the digest must not depend on allocation.
const PYTHON_MAX: u64 = 64 * MIB;

#[test]
fn fixtures_match_their_goldens_and_the_blk_sha256_reference() {
    let s = Scratch::new("cksum-fixtures");
    let goldens = goldens(&s);
    assert!(
        goldens.len() > 20,
        "only {} fixtures with goldens",
        goldens.len()
    );
    let mut failures = Vec::new();
    for g in &goldens {
        let format: Vec<&str> = g.format.iter().flat_map(|f| ["-f", f.as_str()]).collect();
        // sha256 through --verify: the golden, the length, the JSON, exit 0 in one run.
        let want = format!("sha256:{}", g.sha256);
        let mut args = vec!["checksum", "--output=json", "-U"];
        args.extend(&format);
        args.extend(["--verify", &want, &g.main]);
        let r = vdisk(&g.dir, &args);
        let v: Option<Value> = serde_json::from_str(&r.stdout).ok();
        let good = r.code == 0
            && v.as_ref().is_some_and(|v| {
                v["digest"] == g.sha256.as_str()
                    && v["virtual-size"] == g.len
                    && v["verified"] == true
            });
        if !good {
            failures.push(format!("{} sha256: {r:?}", g.id));
        }
        // blk-sha256 against a reference over the raw bytes.
        let raw = s.path(&format!("{}.raw", g.id.replace('/', "_")));
        let raw_name = raw.to_string_lossy().into_owned();
        let want = if g.len <= PYTHON_MAX {
            // Small images are converted by vdisk (qemu-img takes seconds over some hostile
            // ones); sha256sum against the golden proves the bytes are qemu-img's.
            let mut args = vec!["convert", "-U", "-O", "raw"];
            args.extend(&format);
            args.extend([g.main.as_str(), &raw_name]);
            ok(&vdisk(&g.dir, &args), &format!("{}: vdisk {args:?}", g.id));
            assert_eq!(sha256sum(&g.dir, &raw), g.sha256, "{}: raw bytes", g.id);
            python_blk(&g.dir, &raw)
        } else {
            let mut args = vec!["convert", "-U", "-O", "raw"];
            args.extend(&format);
            args.extend([g.main.as_str(), &raw_name]);
            ok(
                &qemu_img(&g.dir, &args),
                &format!("{}: qemu-img {args:?}", g.id),
            );
            let raw_len = fs::metadata(&raw).expect("stat").len();
            assert_eq!(raw_len, g.len, "{}: qemu-img's raw length", g.id);
            let (d, _) = checksum_human(
                &g.dir,
                &["--algorithm", "blk-sha256", "-f", "raw", &raw_name],
            );
            d.trim_start_matches("blk-sha256:").to_string()
        };
        fs::remove_file(&raw).expect("remove raw");
        let mut args = vec!["checksum", "-U", "--algorithm", "blk-sha256"];
        args.extend(&format);
        args.push(&g.main);
        let r = vdisk(&g.dir, &args);
        if r.code != 0 || r.stdout != format!("blk-sha256:{want}  {}\n", g.main) {
            failures.push(format!("{} blk-sha256: want {want}, got {r:?}", g.id));
        }
    }
    assert!(
        failures.is_empty(),
        "fixtures off their goldens or the reference:\n{}",
        failures.join("\n")
    );
}
