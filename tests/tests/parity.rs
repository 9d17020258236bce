//! Parity of drop-in vdisk with qemu-img: the same inputs through both, for every
//! sub-command and format combination both support, and the same exit code, stdout and
//! stderr, byte for byte (JSON also parsed and compared field for field, for readable
//! failures).
//!
//! Both tools run by the bare name `qemu-img` (qemu-img repeats its name in messages): the
//! system one from PATH, and vdisk through a `qemu-img` symlink put first in PATH.
//!
//! Read-only commands run both tools on the same files in the same folder, so nothing at all
//! is normalised. Commands that write run in two copies of the fixture folder; their printed
//! output must still be identical (after replacing the two folders' paths), and each image
//! they wrote is then compared through the oracle: `qemu-img info --output=json` of both,
//! field for field after [`normalise_info`], and `qemu-img compare` of the contents.
//!
//! The matrix is generated below from [`images`] and the per-command option lists. What is
//! left out, and why, is listed in [`NOT_COVERED`] and [`KNOWN_DIFFERENCES`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vdisk_tests::{dropin_link, run_in, run_with_path, settle, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// Sub-commands or cases not in the matrix yet, and why. Move an entry into the matrix
/// once its command works. (LUKS inside qcow2 has its own side-by-side suites:
/// `cli_qcow2_luks.rs` and `cli_qcow2_luks_amend.rs`.)
pub const NOT_COVERED: &[(&str, &str)] = &[];

/// Cases where drop-in vdisk does not (yet) print what qemu-img prints; kept out of the
/// assertions. Deliberate ones are marked so.
pub const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    (
        "map of VHDX (deliberate)",
        "qemu-img reports every VHDX block as data without offsets (its human map then fails \
         with 'File contains external, encrypted or compressed clusters'); vdisk reports the \
         real allocation and host offsets",
    ),
    (
        "resize/amend of VHDX (deliberate)",
        "qemu-img: 'Image format driver does not support resize'; vdisk resizes",
    ),
    (
        "create -f vpc -o subformat=fixed without force_size (deliberate)",
        "vdisk keeps whole-MiB fixed sizes exact (Azure), qemu rounds to a CHS geometry",
    ),
    (
        "qcow2 whose L1 entry points past the end of the file (writes: deliberate)",
        "both read the L2 table as zeroes (map, measure, compare, convert and check agree, \
         tested in cli_check_outside); a write through it: qemu allocates its data cluster \
         behind the table's, vdisk refuses and marks the image corrupt, and check -r all \
         stops ('L2 table at ... lies past the end of the image file')",
    ),
    (
        "resize --shrink of qcow2; amend -o compat=0.10",
        "qemu truncates the file after shrinking / lays out the v2 image more compactly: \
         the host file lengths differ",
    ),
    (
        "writes of part of a new qcow2 cluster (seen with bench -w -s 4k)",
        "qemu zeroes the whole cluster with write-zeroes (a hole in the host file) before \
         writing the data; vdisk writes the zero padding: same contents, but the oracle's \
         map shows 'zero: true' for the padding only in qemu's image",
    ),
    (
        "convert --bitmaps -O qcow2 of a qcow2 with bitmaps",
        "same contents and bitmaps, but where the source has data at 1000k (inside a \
         cluster) the oracle's map of qemu's output shows the cluster's head as a host \
         hole (zero: true, data: true) and vdisk's as written data; plain convert agrees",
    ),
    (
        "bitmap --add on a raw image",
        "qemu names its internal node ('Can't store persistent bitmaps to #block162'), a \
         number that changes from run to run; vdisk prints '#block0'",
    ),
];

/// Data, explicit zeroes and holes at cluster-unaligned offsets, in 8 MiB.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1000k 300k",
    "write -z 3M 1M",
    "write -P 0x33 5M 4k",
    "write -P 0x44 8388096 512",
];

/// An image of the fixture folder: file name and format.
#[derive(Clone, Copy)]
struct Img {
    name: &'static str,
    fmt: &'static str,
}

/// The plain images, one per format and layout, each made by qemu-img and filled with
/// [`WRITES`] by qemu-io.
const PLAIN: &[(&str, &str, &str)] = &[
    ("a.raw", "raw", ""),
    ("v3.qcow2", "qcow2", ""),
    ("v2.qcow2", "qcow2", "compat=0.10"),
    ("sparse.vmdk", "vmdk", ""),
    ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
    ("split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse"),
    ("dyn.vhdx", "vhdx", ""),
    ("fixed.vhdx", "vhdx", "subformat=fixed"),
    ("dyn.vpc", "vpc", ""),
    // force_size keeps the size exact: compare with a.raw then needs no size tolerance.
    ("fixed.vpc", "vpc", "subformat=fixed,force_size=on"),
];

/// Every image of the fixture folder, plain ones first.
fn images() -> Vec<Img> {
    let mut v: Vec<Img> = PLAIN
        .iter()
        .map(|&(name, fmt, _)| Img { name, fmt })
        .collect();
    for (name, fmt) in [
        ("stream.vmdk", "vmdk"),
        ("snap.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
        ("top.qcow2", "qcow2"),
        ("rtop.qcow2", "qcow2"),
        ("diff.qcow2", "qcow2"),
    ] {
        v.push(Img { name, fmt });
    }
    v
}

/// The fixture folder and the drop-in link.
struct Bench {
    scratch: Scratch,
    bin: PathBuf,
    src: PathBuf,
}

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn oracle(dir: &Path, args: &[&str]) -> Run {
    run_with_path(dir, None, Path::new("qemu-img"), args)
}

fn oracle_s(dir: &Path, args: &[String]) -> Run {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    oracle(dir, &args)
}

/// The passphrase of every LUKS image here, as the `--object` both tools take.
const SECRET: &str = "secret,id=sec0,data=parity-pass";

/// The arguments that open `image` of format `fmt` with its key, if it needs one.
fn opened(fmt: &str, image: &str) -> Vec<String> {
    if fmt == "luks" {
        vec![
            "--object".into(),
            SECRET.into(),
            "--image-opts".into(),
            format!("driver=luks,file.filename={image},key-secret=sec0"),
        ]
    } else {
        vec!["-f".into(), fmt.into(), image.into()]
    }
}

/// `qemu-img compare` of two images of format `fmt`.
fn compare_args(fmt: &str, a: &str, b: &str) -> Vec<String> {
    let mut v = vec!["compare".to_string()];
    if fmt == "luks" {
        v.extend(["--object".into(), SECRET.into(), "--image-opts".into()]);
        for x in [a, b] {
            v.push(format!("driver=luks,file.filename={x},key-secret=sec0"));
        }
    } else {
        v.extend(["-f", fmt, "-F", fmt, a, b].map(String::from));
    }
    v
}

fn oracle_ok(dir: &Path, args: &[&str]) -> Run {
    let r = oracle(dir, args);
    ok(&r, &format!("qemu-img {args:?}"));
    r
}

fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let r = run_with_path(dir, None, Path::new("qemu-io"), &args);
    ok(&r, &format!("qemu-io {args:?}"));
    assert!(!r.stdout.contains("failed"), "qemu-io {args:?}: {r:?}");
}

/// Sets one big-endian value in a file (to plant refcount errors).
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for poking");
    f.write_all_at(bytes, offset).expect("poke");
}

fn be64_at(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(a)
}

/// `leak.qcow2` (one leaked cluster, check exit 3) and `bad.qcow2` (a used cluster with
/// refcount 0, check exit 2), both copies of `v3.qcow2` (64 KiB clusters, 16-bit
/// refcounts: the first refcount block covers the whole file).
fn plant_refcount_errors(dir: &Path) {
    let bytes = fs::read(dir.join("v3.qcow2")).expect("read v3.qcow2");
    let reftable = be64_at(&bytes, 48);
    let refblock = be64_at(&bytes, reftable);
    let len = bytes.len() as u64;
    let last = len / 65536 - 1;
    let leak = dir.join("leak.qcow2");
    fs::copy(dir.join("v3.qcow2"), &leak).expect("copy");
    poke(&leak, len + 65535, &[0]);
    poke(&leak, refblock + (last + 1) * 2, &[0, 1]);
    let bad = dir.join("bad.qcow2");
    fs::copy(dir.join("v3.qcow2"), &bad).expect("copy");
    poke(&bad, refblock + last * 2, &[0, 0]);
}

impl Bench {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(&format!("parity-{tag}"));
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let src = scratch.sub("src");
        let dir = src.as_path();
        for (name, fmt, opts) in PLAIN {
            let mut args = vec!["create", "-q", "-f", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([*name, "8M"]);
            oracle_ok(dir, &args);
            qemu_io(dir, fmt, name, WRITES);
        }
        // streamOptimized can only be written in order: qemu-img convert makes it.
        oracle_ok(
            dir,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                "v3.qcow2",
                "stream.vmdk",
            ],
        );
        fs::copy(dir.join("v3.qcow2"), dir.join("snap.qcow2")).expect("copy");
        oracle_ok(dir, &["snapshot", "-c", "first", "snap.qcow2"]);
        qemu_io(dir, "qcow2", "snap.qcow2", &["write -P 0x77 6M 64k"]);
        oracle_ok(dir, &["snapshot", "-c", "second", "snap.qcow2"]);
        // A chain: v2.qcow2 <- mid.qcow2 <- top.qcow2, and a qcow2 over a raw base.
        oracle_ok(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "v2.qcow2",
                "-F",
                "qcow2",
                "mid.qcow2",
            ],
        );
        qemu_io(dir, "qcow2", "mid.qcow2", &["write -P 0x55 2M 128k"]);
        oracle_ok(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        qemu_io(dir, "qcow2", "top.qcow2", &["write -P 0x66 2100k 8k"]);
        oracle_ok(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "a.raw",
                "-F",
                "raw",
                "rtop.qcow2",
            ],
        );
        // Same as v3.qcow2 but for one byte range.
        oracle_ok(dir, &["create", "-q", "-f", "qcow2", "diff.qcow2", "8M"]);
        qemu_io(dir, "qcow2", "diff.qcow2", WRITES);
        qemu_io(dir, "qcow2", "diff.qcow2", &["write -P 0x99 7M 512"]);
        plant_refcount_errors(dir);
        // Persistent dirty bitmaps: b0 enabled, b1 disabled with 128 KiB granularity.
        fs::copy(dir.join("v3.qcow2"), dir.join("bm.qcow2")).expect("copy");
        oracle_ok(dir, &["bitmap", "--add", "bm.qcow2", "b0"]);
        oracle_ok(
            dir,
            &[
                "bitmap",
                "--add",
                "-g",
                "128k",
                "--disable",
                "bm.qcow2",
                "b1",
            ],
        );
        fs::write(dir.join("junk.bin"), b"garbage\n").expect("junk");
        fs::create_dir_all(dir.join("folder")).expect("folder");
        for e in fs::read_dir(dir).expect("list").flatten() {
            if e.path().is_file() {
                settle(&e.path());
            }
        }
        let b = Bench { scratch, bin, src };
        // Guard against comparing qemu-img with itself: the drop-in PATH finds vdisk.
        let (q, d) = b.both(&b.src, &b.src, &["--version"]);
        assert!(q.stdout.starts_with("qemu-img version"), "{q:?}");
        assert!(d.stdout.starts_with("vdisk"), "drop-in PATH runs {d:?}");
        b
    }

    /// qemu-img in `q` and drop-in vdisk in `d`.
    fn both(&self, q: &Path, d: &Path, args: &[&str]) -> (Run, Run) {
        let name = Path::new("qemu-img");
        let qr = run_with_path(q, None, name, args);
        let dr = run_with_path(d, Some(&self.bin), name, args);
        (qr, dr)
    }

    /// A read-only command on the fixtures: everything identical. Returns qemu-img's run.
    fn same(&self, args: &[&str]) -> Run {
        let (q, d) = self.both(&self.src, &self.src, args);
        assert_same(&q, &d, args);
        q
    }

    /// [`Bench::same`], also requiring exit code `code`.
    fn same_code(&self, args: &[&str], code: i32) -> Run {
        let q = self.same(args);
        assert_eq!(q.code, code, "qemu-img {args:?}: {q:?}");
        q
    }

    /// A command that writes: runs in two fresh copies of the fixtures, compares the output
    /// (folder paths replaced), then each of `outputs` (image name, format) through the
    /// oracle. Returns qemu-img's run.
    fn same_write(&self, tag: &str, args: &[&str], outputs: &[(&str, &str)]) -> Run {
        self.same_write_with(tag, args, outputs, |s| s.to_string())
    }

    /// [`Bench::same_write`] with `host` applied to both outputs first, for a command that
    /// prints something host-specific (see its callers).
    fn same_write_with(
        &self,
        tag: &str,
        args: &[&str],
        outputs: &[(&str, &str)],
        host: impl Fn(&str) -> String,
    ) -> Run {
        let q = self.copy_of(&format!("{tag}-q"));
        let d = self.copy_of(&format!("{tag}-d"));
        let (mut qr, mut dr) = self.both(&q, &d, args);
        for (r, dir) in [(&mut qr, &q), (&mut dr, &d)] {
            let dir = dir.to_string_lossy().into_owned();
            // The two folders' paths differ by design.
            r.stdout = host(&r.stdout.replace(&dir, "<scratch>"));
            r.stderr = host(&r.stderr.replace(&dir, "<scratch>"));
        }
        assert_same(&qr, &dr, args);
        for &(image, fmt) in outputs {
            // A LUKS image nothing was written to reads as its zeroed sectors decrypted
            // under its own random master key: noise, different in every new image.
            let (fmt, noise) = match fmt {
                "luks-new" => ("luks", true),
                f => (f, false),
            };
            let qi = oracle(&q, &["info", "--output=json", "-f", fmt, image]);
            let di = oracle(&d, &["info", "--output=json", "-f", fmt, image]);
            assert_eq!(
                di.code, qi.code,
                "{args:?}: qemu-img info of {image}: {di:?} vs {qi:?}"
            );
            if qi.code != 0 {
                assert_eq!(di.stderr, qi.stderr, "{args:?}: info of {image}");
                continue;
            }
            let parse = |r: &Run| -> Value {
                let mut v = serde_json::from_str(&r.stdout).expect("qemu-img info JSON");
                normalise_info(&mut v);
                v
            };
            assert_eq!(
                parse(&di),
                parse(&qi),
                "{args:?}: qemu-img info of vdisk's {image} vs qemu-img's"
            );
            let theirs = q.join(image).to_string_lossy().into_owned();
            let opens = oracle_s(&q, &compare_args(fmt, image, image));
            if opens.code != 0 {
                // Its backing file is missing on purpose (create -u): info is all there is.
                continue;
            }
            same_allocation(&q, &d, image, fmt, args);
            if !noise {
                let cmp = oracle_s(&d, &compare_args(fmt, image, &theirs));
                assert_eq!(cmp.code, 0, "{args:?}: contents of {image}: {cmp:?}");
            }
        }
        for dir in [&q, &d] {
            let _ = fs::remove_dir_all(dir);
        }
        qr
    }

    /// A fresh copy of the fixture folder (holes kept: `cp` preserves sparseness).
    fn copy_of(&self, name: &str) -> PathBuf {
        let dst = self.scratch.path(name);
        let _ = fs::remove_dir_all(&dst);
        let st = Command::new("cp")
            .arg("-a")
            .arg(&self.src)
            .arg(&dst)
            .status()
            .expect("run cp");
        assert!(
            st.success(),
            "cp -a {} {}",
            self.src.display(),
            dst.display()
        );
        dst
    }
}

/// The oracle's map of `image` (host offsets dropped, neighbours that then look alike
/// merged) and, for qcow2, its check counts must be the same for both tools' images.
fn same_allocation(q: &Path, d: &Path, image: &str, fmt: &str, args: &[&str]) {
    let map = |dir: &Path| -> Vec<Value> {
        let mut a = vec!["map".to_string(), "--output=json".into()];
        a.extend(opened(fmt, image));
        let r = oracle_s(dir, &a);
        ok(&r, &format!("qemu-img {a:?}"));
        let v: Value = serde_json::from_str(&r.stdout).expect("map JSON");
        let mut out: Vec<Value> = Vec::new();
        for e in v.as_array().expect("map is a list") {
            let mut e = e.clone();
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
            let key = |x: &Value| {
                let mut x = x.clone();
                if let Some(o) = x.as_object_mut() {
                    o.remove("start");
                    o.remove("length");
                }
                x
            };
            if let Some(prev) = out.last_mut() {
                if key(prev) == key(&e) {
                    let len =
                        prev["length"].as_u64().unwrap_or(0) + e["length"].as_u64().unwrap_or(0);
                    prev["length"] = Value::from(len);
                    continue;
                }
            }
            out.push(e);
        }
        out
    };
    assert_eq!(
        map(d),
        map(q),
        "{args:?}: map of vdisk's {image} vs qemu-img's"
    );
    if fmt == "qcow2" {
        let counts = |dir: &Path| -> (i32, Value, Value) {
            let r = oracle(dir, &["check", "--output=json", "-f", fmt, image]);
            let v: Value = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
            (r.code, v["corruptions"].clone(), v["leaks"].clone())
        };
        assert_eq!(
            counts(d),
            counts(q),
            "{args:?}: check of vdisk's {image} vs qemu-img's"
        );
    }
}

/// Same exit code, stdout and stderr; JSON stdout also compared parsed, for a failure
/// message that points at the field.
fn assert_same(q: &Run, d: &Run, args: &[&str]) {
    let t = q.stdout.trim_start();
    if t.starts_with('{') || t.starts_with('[') {
        let qv: Value = serde_json::from_str(&q.stdout).expect("qemu-img JSON");
        let dv: Value = serde_json::from_str(&d.stdout).unwrap_or_else(|e| {
            panic!("drop-in vdisk {args:?}: invalid JSON ({e}):\n{}", d.stdout)
        });
        assert_eq!(dv, qv, "JSON of {args:?}: vdisk (left) vs qemu-img (right)");
    }
    assert_eq!(
        (d.code, &d.stdout, &d.stderr),
        (q.code, &q.stdout, &q.stderr),
        "drop-in vdisk (left) vs qemu-img (right): {args:?}"
    );
}

/// Removes from `qemu-img info --output=json` of an image two tools wrote what may
/// legitimately differ between them; everything else must be equal.
fn normalise_info(v: &mut Value) {
    let Some(o) = v.as_object_mut() else { return };
    // Host allocation (st_blocks): depends on write sizes and the file system, not on the
    // image's meaning.
    o.remove("actual-size");
    if let Some(children) = o.get_mut("children").and_then(Value::as_array_mut) {
        for child in children {
            let Some(info) = child.get_mut("info") else {
                continue;
            };
            normalise_info(info);
            // The host file's length is where the driver put its metadata and data (VHDX
            // regions, how well streamOptimized grains compressed, where a qcow2 snapshot
            // table went): allocation, not meaning. What the image holds where is compared
            // instead by `same_allocation` and qemu-img compare.
            if let Some(io) = info.as_object_mut() {
                io.remove("virtual-size");
            }
        }
    }
    if let Some(d) = o
        .get_mut("format-specific")
        .and_then(|f| f.get_mut("data"))
        .and_then(Value::as_object_mut)
    {
        // VMDK content IDs are random in both tools.
        d.remove("cid");
        d.remove("parent-cid");
        // A LUKS header's UUID is random; PBKDF iteration counts are calibrated against
        // the host's speed to last iter-time.
        d.remove("uuid");
        d.remove("master-key-iters");
        if let Some(slots) = d.get_mut("slots").and_then(Value::as_array_mut) {
            for s in slots.iter_mut().filter_map(Value::as_object_mut) {
                s.remove("iters");
            }
        }
    }
    if let Some(snaps) = o.get_mut("snapshots").and_then(Value::as_array_mut) {
        for s in snaps {
            if let Some(so) = s.as_object_mut() {
                // Wall-clock time the snapshot was taken.
                so.remove("date-sec");
                so.remove("date-nsec");
            }
        }
    }
}

#[test]
fn info_for_every_format_and_option() {
    let b = Bench::new("info");
    for img in images() {
        let name = img.name;
        for args in [
            vec!["info", name],
            vec!["info", "--output=json", name],
            vec!["info", "--output", "json", "-f", img.fmt, name],
            vec!["info", "--backing-chain", name],
            vec!["info", "--backing-chain", "--output=json", name],
            vec!["info", "-U", "--output=json", name],
            vec!["info", "-U", "-f", img.fmt, name],
        ] {
            b.same_code(&args, 0);
        }
    }
    b.same_code(&["info", "--output=human", "leak.qcow2"], 0);
    // Named by options: by the file name, unless an option changes what the image reads.
    for opts in [
        "driver=qcow2,file.filename=top.qcow2",
        "driver=qcow2,file.driver=file,file.filename=v3.qcow2",
        "file.filename=sparse.vmdk",
        "driver=vpc,file.filename=dyn.vpc,force_size_calc=chs",
        "driver=raw,file.filename=a.raw",
    ] {
        b.same_code(&["info", "--image-opts", opts], 0);
        b.same_code(&["info", "--output=json", "--image-opts", opts], 0);
        b.same_code(&["info", "--backing-chain", "--image-opts", opts], 0);
    }
}

#[test]
fn check_clean_leaky_and_corrupt() {
    let b = Bench::new("check");
    for img in images().iter().filter(|i| i.fmt != "raw") {
        // VPC has no check (63, "does not support checks").
        let code = if img.fmt == "vpc" { 63 } else { 0 };
        for args in [
            vec!["check", img.name],
            vec!["check", "--output=json", img.name],
            vec!["check", "--output", "json", "-f", img.fmt, img.name],
            vec!["check", "-q", img.name],
            vec!["check", "-U", img.name],
        ] {
            b.same_code(&args, code);
        }
    }
    for (name, code) in [("leak.qcow2", 3), ("bad.qcow2", 2)] {
        for args in [
            vec!["check", name],
            vec!["check", "--output=json", name],
            vec!["check", "--output", "human", "-f", "qcow2", name],
            vec!["check", "-q", name],
        ] {
            b.same_code(&args, code);
        }
    }
    b.same_code(&["check", "a.raw"], 63);
    b.same_code(&["check", "--output=json", "-f", "raw", "a.raw"], 63);
    b.same_code(&["check", "missing.qcow2"], 1);
    b.same_code(&["check", "junk.bin"], 63);
    // Repairs of leaks, in copies.
    for (i, args) in [
        vec!["check", "-r", "leaks", "leak.qcow2"],
        vec!["check", "-r", "all", "leak.qcow2"],
        vec!["check", "-r", "leaks", "--output=json", "leak.qcow2"],
        vec!["check", "-r", "all", "v3.qcow2"],
    ]
    .into_iter()
    .enumerate()
    {
        let q = b.same_write(&format!("r{i}"), &args, &[("leak.qcow2", "qcow2")]);
        assert_eq!(q.code, 0, "{args:?}: {q:?}");
    }
}

#[test]
fn map_for_every_format_and_range() {
    let b = Bench::new("map");
    // VHDX maps differ by design (see KNOWN_DIFFERENCES).
    for img in images().iter().filter(|i| i.fmt != "vhdx") {
        let n = img.name;
        let fmt = img.fmt;
        for args in [
            vec!["map", n],
            vec!["map", "--output=json", n],
            vec!["map", "--output", "human", "-f", fmt, n],
            vec!["map", "--start-offset=1M", "--max-length=3M", n],
            vec![
                "map",
                "--output=json",
                "--start-offset",
                "1000k",
                "--max-length",
                "5000k",
                n,
            ],
            vec!["map", "--output=json", "--start-offset=4096", n],
            vec!["map", "--max-length=7", n],
            vec!["map", "-U", "--output=json", n],
        ] {
            // The human map has no way to show compressed clusters: both fail on them.
            let human = !args.contains(&"--output=json");
            let code = if human && n == "stream.vmdk" { 1 } else { 0 };
            b.same_code(&args, code);
        }
    }
    b.same_code(
        &["map", "--output=json", "--start-offset=16M", "v3.qcow2"],
        0,
    );
}

#[test]
fn compare_identical_different_and_strict() {
    let b = Bench::new("compare");
    let all = images();
    // Every plain image holds the same guest contents as a.raw.
    for img in all.iter().filter(|i| PLAIN.iter().any(|p| p.0 == i.name)) {
        // A fixed VHD probes as raw, footer included: its format is named where the
        // answer must be "identical".
        b.same(&["compare", "a.raw", img.name]);
        b.same_code(&["compare", "-F", img.fmt, "a.raw", img.name], 0);
        b.same(&["compare", "-s", "-f", img.fmt, img.name, "a.raw"]);
        b.same_code(&["compare", "-F", img.fmt, "diff.qcow2", img.name], 1);
        b.same_code(&["compare", "-q", "-F", img.fmt, "diff.qcow2", img.name], 1);
        b.same_code(&["compare", "-F", img.fmt, "top.qcow2", img.name], 1);
    }
    // v2 has no zero clusters: the written zeroes are data there, so strict mode differs.
    b.same_code(&["compare", "-s", "v3.qcow2", "v2.qcow2"], 1);
    b.same_code(&["compare", "-s", "v3.qcow2", "diff.qcow2"], 1);
    b.same_code(
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "rtop.qcow2",
            "v3.qcow2",
        ],
        0,
    );
    b.same_code(&["compare", "-U", "snap.qcow2", "v3.qcow2"], 1);
    b.same_code(&["compare", "-p", "v3.qcow2", "a.raw"], 0);
    b.same_code(&["compare", "a.raw", "missing.raw"], 2);
    b.same_code(&["compare", "-f", "qcow2", "a.raw", "v3.qcow2"], 2);
}

#[test]
fn measure_from_every_format() {
    let b = Bench::new("measure");
    for img in images() {
        for out in ["qcow2", "raw"] {
            b.same_code(&["measure", "-O", out, img.name], 0);
            b.same_code(&["measure", "--output=json", "-O", out, img.name], 0);
        }
        b.same_code(
            &[
                "measure",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-f",
                img.fmt,
                img.name,
            ],
            0,
        );
    }
    // An internal snapshot by name, by id, by snapshot.* options; one that is not there.
    for (snap, code) in [
        ("first", 0),
        ("2", 0),
        ("snapshot.id=1", 0),
        ("snapshot.name=second", 0),
        ("snapshot.id=1,snapshot.name=second", 1),
        ("nosuch", 1),
        ("snapshot.foo=1", 1),
    ] {
        for out in ["qcow2", "raw"] {
            b.same_code(&["measure", "-O", out, "-l", snap, "snap.qcow2"], code);
            b.same_code(
                &[
                    "measure",
                    "--output=json",
                    "-O",
                    out,
                    "-l",
                    snap,
                    "snap.qcow2",
                ],
                code,
            );
        }
    }
    b.same_code(
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-l",
            "first",
            "snap.qcow2",
        ],
        0,
    );
    b.same_code(&["measure", "-O", "qcow2", "-l", "first", "a.raw"], 1);
    for size in ["0", "1M", "100G", "1T"] {
        b.same_code(&["measure", "-O", "qcow2", "--size", size], 0);
        b.same_code(
            &["measure", "--output=json", "-O", "raw", "--size", size],
            0,
        );
        b.same_code(
            &[
                "measure",
                "-O",
                "qcow2",
                "-o",
                "preallocation=full",
                "--size",
                size,
            ],
            0,
        );
    }
}

#[test]
fn create_with_each_formats_options() {
    let b = Bench::new("create");
    let cases: &[(&str, &str, &str)] = &[
        ("raw", "", "1M"),
        ("raw", "preallocation=falloc", "1M"),
        ("raw", "preallocation=full", "1M"),
        ("qcow2", "", "64M"),
        ("qcow2", "compat=0.10", "64M"),
        (
            "qcow2",
            "cluster_size=4k,lazy_refcounts=on,refcount_bits=8",
            "64M",
        ),
        ("qcow2", "preallocation=metadata", "4M"),
        ("qcow2", "preallocation=full", "4M"),
        ("qcow2", "extended_l2=on,compression_type=zstd", "64M"),
        ("qcow2", "cluster_size=2M", "1G"),
        ("vmdk", "", "64M"),
        ("vmdk", "subformat=streamOptimized", "64M"),
        ("vmdk", "subformat=monolithicFlat", "4M"),
        ("vmdk", "subformat=twoGbMaxExtentSparse", "3G"),
        ("vmdk", "subformat=twoGbMaxExtentFlat", "3M"),
        (
            "vmdk",
            "adapter_type=lsilogic,hwversion=6,zeroed_grain=on",
            "64M",
        ),
        ("vmdk", "compat6=on", "1M"),
        ("vhdx", "", "64M"),
        ("vhdx", "subformat=fixed", "8M"),
        ("vhdx", "block_size=1M,log_size=2M", "64M"),
        ("vpc", "", "64M"),
        ("vpc", "subformat=fixed,force_size=on", "8M"),
        ("vpc", "force_size=on", "64M"),
    ];
    for (i, (fmt, opts, size)) in cases.iter().enumerate() {
        let name = format!("n.{fmt}");
        for quiet in [false, true] {
            let mut args = vec!["create", "-f", fmt];
            if quiet {
                args.push("-q");
            }
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([name.as_str(), size]);
            let q = b.same_write(&format!("c{i}{quiet}"), &args, &[(&name, fmt)]);
            assert_eq!(q.code, 0, "{args:?}: {q:?}");
            assert_eq!(q.stdout.starts_with("Formatting '"), !quiet, "{q:?}");
        }
    }
    // Backing files, size from the options, a refused size and refused options.
    for (i, args) in [
        &[
            "create", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", "n.qcow2",
        ][..],
        &[
            "create", "-f", "qcow2", "-b", "a.raw", "-F", "raw", "n.qcow2", "16M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "n.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "size=1M", "n.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=n.data",
            "n.qcow2",
            "1M",
        ],
    ]
    .iter()
    .enumerate()
    {
        let q = b.same_write(&format!("b{i}"), args, &[("n.qcow2", "qcow2")]);
        assert_eq!(q.code, 0, "{args:?}: {q:?}");
    }
    for (i, args) in [
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "n.qcow2",
            "1M",
        ][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "n.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "n.qcow2",
        ][..],
        &["create", "-f", "qcow2", "-b", "v3.qcow2", "n.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "n.qcow2",
            "1M",
        ],
    ]
    .iter()
    .enumerate()
    {
        let q = b.same_write(&format!("e{i}"), args, &[]);
        assert_eq!(q.code, 1, "{args:?}: {q:?}");
    }
}

#[test]
fn convert_between_formats() {
    let b = Bench::new("convert");
    let targets: &[(&str, &str)] = &[
        ("raw", ""),
        ("qcow2", ""),
        ("qcow2", "compat=0.10"),
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vmdk", "subformat=monolithicFlat"),
        ("vmdk", "subformat=twoGbMaxExtentSparse"),
        ("vhdx", ""),
        ("vhdx", "subformat=fixed"),
        ("vpc", ""),
        ("vpc", "subformat=fixed,force_size=on"),
    ];
    let all = images();
    // Every source to raw and qcow2, and one source of each format to every target: each
    // format pair is covered in at least one direction without the full square's run time.
    let mut pairs: Vec<(Img, usize)> = Vec::new();
    for img in &all {
        pairs.push((*img, 0));
        pairs.push((*img, 1));
    }
    for src in [
        "v2.qcow2",
        "sparse.vmdk",
        "dyn.vhdx",
        "fixed.vpc",
        "a.raw",
        "top.qcow2",
    ] {
        let img = *all.iter().find(|i| i.name == src).expect("fixture");
        for t in 2..targets.len() {
            pairs.push((img, t));
        }
    }
    for (n, (img, t)) in pairs.into_iter().enumerate() {
        let (fmt, opts) = targets[t];
        let out = format!("out.{fmt}");
        let mut args = vec!["convert", "-f", img.fmt, "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.name, out.as_str()]);
        let q = b.same_write(&format!("v{n}"), &args, &[(&out, fmt)]);
        assert_eq!(q.code, 0, "{args:?}: {q:?}");
    }
    for (n, args) in [
        &["convert", "-c", "-O", "qcow2", "v3.qcow2", "out.qcow2"][..],
        &[
            "convert",
            "-O",
            "qcow2",
            "-l",
            "first",
            "snap.qcow2",
            "out.qcow2",
        ],
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            "out.qcow2",
        ],
    ]
    .iter()
    .enumerate()
    {
        let q = b.same_write(&format!("o{n}"), args, &[("out.qcow2", "qcow2")]);
        assert_eq!(q.code, 0, "{args:?}: {q:?}");
    }
}

/// A command that writes, the images to compare after it, and its exit code.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], i32);

/// `convert -B` / `-o backing_file` (the target becomes an overlay: only what the source's
/// top layer holds is written, zeroes past the backing file's end are left out), with -n,
/// -c and -S 0, qemu-img's refusals; and `convert -S 0`, which writes every byte as data
/// (holes and zero clusters of the source too, even with -c or --target-is-zero).
#[test]
fn convert_backing_and_fully_allocated() {
    let b = Bench::new("convert-backing");
    // A backing file half the size of the sources: the top's zeroes past 4M need no write.
    oracle_ok(
        &b.src,
        &["create", "-q", "-f", "qcow2", "small.qcow2", "4M"],
    );
    // A top with zero clusters inside and past 4M, over v2.qcow2.
    oracle_ok(
        &b.src,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "v2.qcow2",
            "-F",
            "qcow2",
            "ztop.qcow2",
        ],
    );
    qemu_io(
        &b.src,
        "qcow2",
        "ztop.qcow2",
        &["write -z 0 64k", "write -P 0x5a 2M 64k", "write -z 6M 128k"],
    );
    settle(&b.src.join("ztop.qcow2"));
    let out = [("out.qcow2", "qcow2")];
    let cases: &[Case] = &[
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-B",
                "v2.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "ztop.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-B",
                "small.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "ztop.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-B",
                "a.raw",
                "-F",
                "raw",
                "-O",
                "qcow2",
                "rtop.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        // A source without a backing file: its holes become zero clusters over the backing.
        (
            &[
                "convert",
                "-B",
                "v3.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "a.raw",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-B",
                "small.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "v3.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-c",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-S",
                "0",
                "-B",
                "small.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "ztop.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "backing_file=mid.qcow2,backing_fmt=qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        // -B wins over -o backing_file, -F over -o backing_fmt.
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "backing_file=v2.qcow2,backing_fmt=raw",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-B",
                "sparse.vmdk",
                "-F",
                "vmdk",
                "-O",
                "vmdk",
                "top.qcow2",
                "out.vmdk",
            ],
            &[("out.vmdk", "vmdk")],
            0,
        ),
        // An existing target keeps its own (no) backing file; only the top is written.
        (
            &[
                "convert",
                "-n",
                "-B",
                "mid.qcow2",
                "-O",
                "qcow2",
                "ztop.qcow2",
                "diff.qcow2",
            ],
            &[("diff.qcow2", "qcow2")],
            0,
        ),
        // qemu-img 10 prints this error, copies nothing and exits 0.
        (
            &[
                "convert",
                "-n",
                "--target-is-zero",
                "-B",
                "mid.qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "diff.qcow2",
            ],
            &[("diff.qcow2", "qcow2")],
            0,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            1,
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "backing_file=mid.qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "raw",
                "top.qcow2",
                "out.raw",
            ],
            &[("out.raw", "raw")],
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "vhdx",
                "top.qcow2",
                "out.vhdx",
            ],
            &[("out.vhdx", "vhdx")],
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "vpc",
                "top.qcow2",
                "out.vpc",
            ],
            &[("out.vpc", "vpc")],
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "vmdk",
                "top.qcow2",
                "out.vmdk",
            ],
            &[("out.vmdk", "vmdk")],
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "a.raw",
                "out.qcow2",
            ],
            &out,
            1,
        ),
        (
            &[
                "convert",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            1,
        ),
        (
            &[
                "convert",
                "-F",
                "qcow2",
                "-O",
                "raw",
                "top.qcow2",
                "out.raw",
            ],
            &[("out.raw", "raw")],
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "bogus",
                "-O",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &out,
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "nothere.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "out.qcow2",
            ],
            &[],
            1,
        ),
        (
            &[
                "convert",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "nothere.qcow2",
                "out.qcow2",
            ],
            &out,
            1,
        ),
        // -S 0: fully allocated, whatever the source holds.
        (
            &["convert", "-S", "0", "-O", "raw", "v3.qcow2", "out.raw"],
            &[("out.raw", "raw")],
            0,
        ),
        (
            &["convert", "-S", "0", "-O", "raw", "top.qcow2", "out.raw"],
            &[("out.raw", "raw")],
            0,
        ),
        (
            &["convert", "-S", "0", "-O", "qcow2", "a.raw", "out.qcow2"],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-S",
                "0",
                "-O",
                "qcow2",
                "ztop.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-S",
                "0",
                "-c",
                "-O",
                "qcow2",
                "v3.qcow2",
                "out.qcow2",
            ],
            &out,
            0,
        ),
        (
            &[
                "convert",
                "-S",
                "0",
                "-O",
                "vmdk",
                "sparse.vmdk",
                "out.vmdk",
            ],
            &[("out.vmdk", "vmdk")],
            0,
        ),
        (
            &[
                "convert",
                "-S",
                "0",
                "-n",
                "--target-is-zero",
                "-O",
                "qcow2",
                "v3.qcow2",
                "diff.qcow2",
            ],
            &[("diff.qcow2", "qcow2")],
            0,
        ),
    ];
    for (n, (args, outputs, code)) in cases.iter().enumerate() {
        let q = b.same_write(&format!("b{n}"), args, outputs);
        assert_eq!(q.code, *code, "{args:?}: {q:?}");
    }
}

#[test]
fn snapshot_resize_amend_rebase() {
    let b = Bench::new("modify");
    for img in images() {
        b.same_code(&["snapshot", "-l", img.name], 0);
    }
    b.same_code(&["snapshot", "-l", "-U", "snap.qcow2"], 0);
    let q2 = ("snap.qcow2", "qcow2");
    let cases: &[Case] = &[
        (&["snapshot", "-c", "third", "snap.qcow2"], &[q2], 0),
        (&["snapshot", "-d", "first", "snap.qcow2"], &[q2], 0),
        (&["snapshot", "-a", "first", "snap.qcow2"], &[q2], 0),
        (&["snapshot", "-d", "nosuch", "snap.qcow2"], &[q2], 1),
        (&["snapshot", "-a", "nosuch", "snap.qcow2"], &[q2], 1),
        (&["snapshot", "-c", "s", "sparse.vmdk"], &[], 1),
        (&["resize", "v3.qcow2", "16M"], &[("v3.qcow2", "qcow2")], 0),
        (&["resize", "v2.qcow2", "+1M"], &[("v2.qcow2", "qcow2")], 0),
        (&["resize", "v3.qcow2", "4M"], &[("v3.qcow2", "qcow2")], 1),
        (
            &["resize", "-f", "raw", "a.raw", "10M"],
            &[("a.raw", "raw")],
            0,
        ),
        (
            &["resize", "--shrink", "a.raw", "4M"],
            &[("a.raw", "raw")],
            0,
        ),
        (&["resize", "a.raw", "-1M"], &[("a.raw", "raw")], 1),
        (
            &["resize", "--shrink", "-f", "raw", "a.raw", "-1M"],
            &[("a.raw", "raw")],
            0,
        ),
        (
            &["resize", "--preallocation=full", "a.raw", "12M"],
            &[("a.raw", "raw")],
            0,
        ),
        (&["resize", "dyn.vpc", "16M"], &[("dyn.vpc", "vpc")], 1),
        (
            &["resize", "sparse.vmdk", "16M"],
            &[("sparse.vmdk", "vmdk")],
            1,
        ),
        (
            &["resize", "-q", "v3.qcow2", "9M"],
            &[("v3.qcow2", "qcow2")],
            0,
        ),
        (
            &["amend", "-o", "compat=1.1", "v2.qcow2"],
            &[("v2.qcow2", "qcow2")],
            0,
        ),
        (
            &["amend", "-o", "lazy_refcounts=on", "v3.qcow2"],
            &[("v3.qcow2", "qcow2")],
            0,
        ),
        (&["amend", "-o", "refcount_bits=8", "snap.qcow2"], &[q2], 0),
        (&["amend", "-o", "cluster_size=4k", "v3.qcow2"], &[], 1),
        (&["amend", "-o", "compat=0.10", "a.raw"], &[], 1),
        (&["amend", "v3.qcow2"], &[], 1),
        (
            &["rebase", "-u", "-b", "a.raw", "-F", "raw", "v3.qcow2"],
            &[("v3.qcow2", "qcow2")],
            0,
        ),
        (
            &["rebase", "-u", "-b", "", "top.qcow2"],
            &[("top.qcow2", "qcow2")],
            0,
        ),
    ];
    for (n, (args, outputs, code)) in cases.iter().enumerate() {
        let q = b.same_write(&format!("m{n}"), args, outputs);
        assert_eq!(q.code, *code, "{args:?}: {q:?}");
    }
}

#[test]
fn errors_of_every_command() {
    let b = Bench::new("errors");
    let cmds: &[(&[&str], i32)] = &[
        (&["info"], 1),
        (&["info", "--output=json"], 1),
        (&["map"], 1),
        (&["map", "--output=json"], 1),
        (&["check"], 1),
        (&["measure", "-O", "qcow2"], 1),
        (&["snapshot", "-l"], 1),
        (&["compare", "a.raw"], 2),
    ];
    for (head, code) in cmds {
        // Missing file, a folder, a corrupt-header file named with a wrong format.
        for tail in [
            &["missing.img"][..],
            &["folder"],
            &["-f", "qcow2", "a.raw"],
            &["-f", "qcow2", "junk.bin"],
        ] {
            let mut args = head.to_vec();
            args.extend_from_slice(tail);
            b.same_code(&args, *code);
        }
        // An option no command knows.
        let mut args = head.to_vec();
        args.extend(["--bogus", "a.raw"]);
        b.same_code(&args, 1);
        let mut args = head.to_vec();
        args.extend(["-f", "qcow9", "a.raw"]);
        b.same_code(&args, *code);
    }
    // Every format named for a file of another format, VHDX on files shorter than its
    // 1 MiB header section included.
    let files = [
        ("a.raw", "raw"),
        ("v3.qcow2", "qcow2"),
        ("sparse.vmdk", "vmdk"),
        ("dyn.vhdx", "vhdx"),
        ("dyn.vpc", "vpc"),
        ("junk.bin", "junk"),
    ];
    for fmt in ["qcow2", "vmdk", "vhdx", "vpc"] {
        for (file, own) in files.iter().filter(|(_, own)| *own != fmt) {
            let what = format!("-f {fmt} on {own}");
            assert_eq!(b.same(&["info", "-f", fmt, file]).code, 1, "{what}");
            assert_eq!(b.same(&["map", "-f", fmt, file]).code, 1, "{what}");
            assert_eq!(b.same(&["check", "-f", fmt, file]).code, 1, "{what}");
            let cmp = b.same(&["compare", "-f", fmt, file, "a.raw"]);
            assert_eq!(cmp.code, 2, "{what}");
        }
    }
    b.same_code(
        &["convert", "-f", "qcow2", "-O", "raw", "a.raw", "o.raw"],
        1,
    );
    b.same_code(&["info", "-f", "raw", "--output=json", "v3.qcow2"], 0);
    // Corrupt: a refcount error does not stop reading commands.
    b.same_code(&["info", "bad.qcow2"], 0);
    b.same_code(&["map", "--output=json", "bad.qcow2"], 0);
    b.same_code(&["compare", "bad.qcow2", "v3.qcow2"], 0);
    // Unsupported options, unknown options, bad sizes; in copies since some would write.
    let writes: &[&[&str]] = &[
        &["create", "-f", "raw", "-o", "nosuch=1", "n.raw", "1M"],
        &["create", "-f", "qcow2", "-o", "nosuch=1", "n.qcow2", "1M"],
        &["create", "-f", "vmdk", "-o", "nosuch=1", "n.vmdk", "1M"],
        &["create", "-f", "vhdx", "-o", "nosuch=1", "n.vhdx", "1M"],
        &["create", "-f", "vpc", "-o", "nosuch=1", "n.vpc", "1M"],
        &["create", "-f", "qcow2", "n.qcow2", "12Q"],
        &["create", "-f", "raw", "n.raw", "1.5x"],
        &["create", "-f", "qcow2", "n.qcow2", "-1"],
        &["create", "--bogus", "-f", "qcow2", "n.qcow2", "1M"],
        &["create", "-f", "qcow9", "n.qcow2", "1M"],
        &[
            "convert", "-O", "qcow2", "-o", "nosuch=1", "a.raw", "o.qcow2",
        ],
        &["convert", "-O", "nosuchfmt", "a.raw", "o.x"],
        &["convert", "--bogus", "-O", "raw", "a.raw", "o.raw"],
        &["convert", "-O", "raw", "missing.img", "o.raw"],
        &["measure", "-O", "qcow2", "-o", "nosuch=1", "a.raw"],
        &["measure", "--size", "2Y", "-O", "qcow2"],
        &["measure", "-O", "vmdk", "a.raw"],
        &["resize", "a.raw", "3x"],
        &["resize", "missing.img", "1M"],
        &["resize", "--bogus", "a.raw", "1M"],
        &["resize", "v3.qcow2"],
        &["resize", "-f", "qcow2", "a.raw", "1M"],
        &["amend", "-o", "nosuch=1", "v3.qcow2"],
        &["amend", "-f", "qcow2", "-o", "compat=0.10", "missing.img"],
        &["amend", "--bogus", "v3.qcow2"],
        &["snapshot", "--bogus", "v3.qcow2"],
        &["snapshot", "-c", "x", "missing.img"],
        &["rebase", "-u", "-b", "a.raw", "missing.img"],
        &["rebase", "--bogus", "v3.qcow2"],
    ];
    for (n, args) in writes.iter().enumerate() {
        let q = b.same_write(&format!("w{n}"), args, &[]);
        assert_eq!(q.code, 1, "{args:?}: {q:?}");
    }
}

/// `bench` reports how long the run took: wall-clock time, host-specific.
fn without_run_time(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("Run completed in ") {
                "Run completed in <time> seconds."
            } else {
                l
            }
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn commit_rebase_dd_bench() {
    let b = Bench::new("jobs");
    let (top, mid, v2) = (
        ("top.qcow2", "qcow2"),
        ("mid.qcow2", "qcow2"),
        ("v2.qcow2", "qcow2"),
    );
    let cases: &[Case] = &[
        (&["commit", "top.qcow2"], &[top, mid, v2], 0),
        (
            &["commit", "-b", "v2.qcow2", "top.qcow2"],
            &[top, mid, v2],
            0,
        ),
        (&["commit", "-d", "mid.qcow2"], &[mid, v2], 0),
        (&["commit", "-q", "-p", "top.qcow2"], &[mid], 0),
        (&["commit", "v3.qcow2"], &[("v3.qcow2", "qcow2")], 1),
        (&["commit", "missing.qcow2"], &[], 1),
        (&["commit", "--bogus", "top.qcow2"], &[], 1),
        (&["commit", "-f", "raw", "top.qcow2"], &[top], 1),
        (
            &["rebase", "-b", "v2.qcow2", "-F", "qcow2", "top.qcow2"],
            &[top],
            0,
        ),
        (&["rebase", "-b", "", "top.qcow2"], &[top], 0),
        (
            &[
                "rebase",
                "-f",
                "qcow2",
                "-b",
                "a.raw",
                "-F",
                "raw",
                "mid.qcow2",
            ],
            &[mid],
            0,
        ),
        (
            &["rebase", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2"],
            &[top],
            1,
        ),
        (
            &["dd", "if=v3.qcow2", "of=o.raw", "-O", "raw", "bs=64k"],
            &[("o.raw", "raw")],
            0,
        ),
        (
            &[
                "dd",
                "if=v3.qcow2",
                "of=o.qcow2",
                "-O",
                "qcow2",
                "bs=1M",
                "count=3",
            ],
            &[("o.qcow2", "qcow2")],
            0,
        ),
        (
            &["dd", "if=a.raw", "of=o.raw", "skip=2", "bs=1M"],
            &[("o.raw", "raw")],
            0,
        ),
        (
            &[
                "dd",
                "-f",
                "qcow2",
                "if=mid.qcow2",
                "of=o.vmdk",
                "-O",
                "vmdk",
                "bs=512",
                "count=300",
            ],
            &[("o.vmdk", "vmdk")],
            0,
        ),
        (&["dd", "if=missing", "of=o.raw"], &[], 1),
        (&["dd", "if=a.raw", "of=o.raw", "bs=3x"], &[], 1),
        (&["dd", "--bogus"], &[], 1),
        (&["dd", "if=a.raw"], &[], 1),
    ];
    for (n, (args, outputs, code)) in cases.iter().enumerate() {
        let q = b.same_write(&format!("j{n}"), args, outputs);
        assert_eq!(q.code, *code, "{args:?}: {q:?}");
    }
    let benches: &[Case] = &[
        (&["bench", "-c", "100", "v3.qcow2"], &[], 0),
        (
            &[
                "bench", "-w", "-c", "100", "-s", "4k", "-d", "4", "-f", "raw", "a.raw",
            ],
            // Not a qcow2 image: see KNOWN_DIFFERENCES on partial-cluster writes.
            &[("a.raw", "raw")],
            0,
        ),
        (
            &["bench", "-c", "50", "-t", "none", "-f", "raw", "a.raw"],
            &[],
            0,
        ),
        (&["bench", "-c", "10", "missing.qcow2"], &[], 1),
        (&["bench", "-c", "1x", "v3.qcow2"], &[], 1),
    ];
    for (n, (args, outputs, code)) in benches.iter().enumerate() {
        let q = b.same_write_with(&format!("b{n}"), args, outputs, without_run_time);
        assert_eq!(q.code, *code, "{args:?}: {q:?}");
    }
}

#[test]
fn luks_images_and_passphrases() {
    let b = Bench::new("luks");
    let dir = b.src.as_path();
    // A qemu-made LUKS image holding a.raw's contents (a short iter-time keeps opening it
    // quick in a debug build).
    oracle_ok(
        dir,
        &[
            "convert",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            "a.raw",
            "l.luks",
        ],
    );
    let opts = "driver=luks,file.filename=l.luks,key-secret=sec0";
    let dd_in = format!("if={opts}");
    let wrong = "secret,id=sec0,data=not-the-passphrase";
    for args in [
        &["info", "l.luks"][..],
        &["info", "--output=json", "l.luks"],
        &["info", "-f", "luks", "l.luks"],
        &[
            "measure",
            "--object",
            SECRET,
            "-O",
            "qcow2",
            "--image-opts",
            opts,
        ],
        &[
            "measure",
            "--output=json",
            "--object",
            SECRET,
            "-O",
            "raw",
            "--image-opts",
            opts,
        ],
        &[
            "map",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            opts,
        ],
        // Named by options with a key-secret, qemu names the image json:{...}.
        &["info", "--object", SECRET, "--image-opts", opts],
        &[
            "info",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            opts,
        ],
        &[
            "info",
            "--image-opts",
            "file.filename=l.luks,key-secret=sec0",
        ],
        &["info", "--image-opts", "driver=luks,file.filename=l.luks"],
        &[
            "info",
            "--output=json",
            "--backing-chain",
            "--image-opts",
            opts,
        ],
    ] {
        b.same_code(args, 0);
    }
    b.same_code(
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            opts,
            "driver=raw,file.filename=a.raw",
        ],
        0,
    );
    // Wrong passphrase, missing secret, no key at all; and the human map, which cannot
    // show encrypted data.
    for args in [
        &["map", "--object", SECRET, "--image-opts", opts][..],
        &["map", "--object", wrong, "--image-opts", opts],
        &["map", "--image-opts", opts],
        &["map", "l.luks"],
        &[
            "measure",
            "--object",
            wrong,
            "-O",
            "raw",
            "--image-opts",
            opts,
        ],
        &["measure", "-O", "raw", "--image-opts", opts],
        &["measure", "--image-opts", "-O", "raw", "--size", "1M"],
    ] {
        b.same_code(args, 1);
    }
    b.same_code(
        &[
            "compare",
            "--object",
            wrong,
            "--image-opts",
            opts,
            "driver=raw,file.filename=a.raw",
        ],
        2,
    );
    let cases: &[Case] = &[
        (
            &[
                "create",
                "--object",
                SECRET,
                "-f",
                "luks",
                "-o",
                "key-secret=sec0,iter-time=10",
                "n.luks",
                "4M",
            ],
            &[("n.luks", "luks-new")],
            0,
        ),
        (
            &[
                "convert",
                "--object",
                SECRET,
                "-O",
                "luks",
                "-o",
                "key-secret=sec0,iter-time=10,cipher-alg=aes-128,hash-alg=sha1",
                "v3.qcow2",
                "n.luks",
            ],
            &[("n.luks", "luks")],
            0,
        ),
        (
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                opts,
                "-O",
                "qcow2",
                "n.qcow2",
            ],
            &[("n.qcow2", "qcow2")],
            0,
        ),
        (
            &[
                "convert",
                "--object",
                wrong,
                "--image-opts",
                opts,
                "-O",
                "raw",
                "n.raw",
            ],
            &[],
            1,
        ),
        (&["create", "-f", "luks", "n.luks", "4M"], &[], 1),
        (
            &[
                "create",
                "--object",
                SECRET,
                "-f",
                "luks",
                "-o",
                "key-secret=nosuch",
                "n.luks",
                "4M",
            ],
            &[],
            1,
        ),
        // dd takes --object: the decrypted blocks come out.
        (
            &[
                "dd",
                "--object",
                SECRET,
                "--image-opts",
                "bs=64k",
                "count=40",
                &dd_in,
                "of=n.raw",
            ],
            &[("n.raw", "raw")],
            0,
        ),
        (
            &[
                "dd",
                "--object",
                SECRET,
                "--image-opts",
                "-O",
                "qcow2",
                "bs=1M",
                &dd_in,
                "of=n.qcow2",
            ],
            &[("n.qcow2", "qcow2")],
            0,
        ),
        (
            &["dd", "--object", wrong, "--image-opts", &dd_in, "of=n.raw"],
            &[],
            1,
        ),
        (&["dd", "--image-opts", &dd_in, "of=n.raw"], &[], 1),
        (
            &["dd", "--object", "secret,id=sec0", "if=l.luks", "of=n.raw"],
            &[],
            1,
        ),
    ];
    for (n, (args, outputs, code)) in cases.iter().enumerate() {
        let q = b.same_write(&format!("l{n}"), args, outputs);
        assert_eq!(q.code, *code, "{args:?}: {q:?}");
    }
    // qemu-img 10's bench has no --object: a drop-in refuses it the same way.
    b.same_code(
        &[
            "bench",
            "--object",
            SECRET,
            "--image-opts",
            "-c",
            "10",
            opts,
        ],
        1,
    );
    b.same_code(
        &["bench", &format!("--object={SECRET}"), "-c", "10", "l.luks"],
        1,
    );
    // Under its own name vdisk benchmarks a LUKS image: a write test lands encrypted.
    let dir = b.copy_of("bench-native");
    let bench = |args: &[&str]| run_in(&dir, Path::new(VDISK), args);
    let r = bench(&[
        "bench",
        "--object",
        SECRET,
        "--image-opts",
        "-c",
        "10",
        opts,
    ]);
    ok(&r, "vdisk bench of a LUKS image");
    assert!(r.stdout.starts_with("Sending 10 read requests"), "{r:?}");
    let r = bench(&[
        "bench",
        "--object",
        SECRET,
        "--image-opts",
        "-w",
        "--pattern",
        "90",
        "-s",
        "64k",
        "-c",
        "16",
        "-d",
        "4",
        opts,
    ]);
    ok(&r, "vdisk bench -w of a LUKS image");
    let check = run_with_path(
        &dir,
        None,
        Path::new("qemu-io"),
        &[
            "--object",
            SECRET,
            "--image-opts",
            "-c",
            "read -P 90 0 1M",
            "-c",
            "read -P 0x22 1M 64k",
            opts,
        ],
    );
    ok(&check, "qemu-io read-back");
    assert!(
        !check.stdout.contains("fail"),
        "bench wrote other bytes: {check:?}"
    );
    let r = bench(&["bench", "--object", wrong, "--image-opts", "-c", "10", opts]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("Invalid password"), "{r:?}");
}

#[test]
fn bitmaps() {
    let b = Bench::new("bitmap");
    for args in [
        &["info", "bm.qcow2"][..],
        &["info", "--output=json", "bm.qcow2"],
        &["check", "bm.qcow2"],
        &["measure", "-O", "qcow2", "bm.qcow2"],
    ] {
        b.same_code(args, 0);
    }
    let bm = ("bm.qcow2", "qcow2");
    let cases: &[Case] = &[
        (&["bitmap", "--add", "bm.qcow2", "b2"], &[bm], 0),
        (
            &[
                "bitmap",
                "--add",
                "-g",
                "128k",
                "--disable",
                "bm.qcow2",
                "b2",
            ],
            &[bm],
            0,
        ),
        (&["bitmap", "--clear", "bm.qcow2", "b0"], &[bm], 0),
        (&["bitmap", "--merge", "b0", "bm.qcow2", "b1"], &[bm], 0),
        (&["bitmap", "--disable", "bm.qcow2", "b0"], &[bm], 0),
        (&["bitmap", "--enable", "bm.qcow2", "b1"], &[bm], 0),
        (&["bitmap", "--remove", "bm.qcow2", "b1"], &[bm], 0),
        (&["bitmap", "--add", "bm.qcow2", "b0"], &[bm], 1),
        (&["bitmap", "--remove", "bm.qcow2", "nosuch"], &[bm], 1),
        (&["bitmap", "--add", "missing.qcow2", "b0"], &[], 1),
        (&["bitmap", "--bogus", "bm.qcow2", "b0"], &[], 1),
        (&["bitmap", "--add", "-g", "3k", "bm.qcow2", "b2"], &[bm], 1),
    ];
    for (n, (args, outputs, code)) in cases.iter().enumerate() {
        let q = b.same_write(&format!("k{n}"), args, outputs);
        assert_eq!(q.code, *code, "{args:?}: {q:?}");
    }
}

/// Number options as qemu's option parser reads them: hex, octal, white space, a sign, and
/// its two refusals (not a number, too large), before anything is formatted.
#[test]
fn create_number_options_parse_as_qemu_parses_them() {
    let b = Bench::new("create-numbers");
    for (i, value) in [
        "0x10",
        "010",
        " 16",
        "-16",
        "16abc",
        "",
        "08",
        "99999999999999999999",
    ]
    .iter()
    .enumerate()
    {
        let opt = format!("refcount_bits={value}");
        let args = ["create", "-f", "qcow2", "-o", &opt, "n.qcow2", "1M"];
        let r = b.same_write(&format!("num{i}"), &args, &[]);
        if ["0x10", "010", " 16"].contains(value) {
            assert_eq!(r.code, 0, "{opt}: {}", r.stderr);
        }
    }
}
