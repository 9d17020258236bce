//! `vdisk snapshot` and `vdisk convert -l/-s` against the system qemu-img.
//!
//! The sequences run on twin copies of one image (made by qemu-img or by vdisk): qemu-img
//! changes snapshots on one copy, vdisk on the other, qemu-io writes the same patterns to
//! both. After every vdisk operation `qemu-img check` must find nothing wrong with vdisk's
//! copy; both tools must list its snapshots alike (and like qemu-img's copy, dates aside);
//! the current contents and every snapshot, read by `qemu-img convert -l`, must equal the
//! patterns written before it (a model kept here) and qemu-img's copy; and `vdisk convert
//! -l`/`-s` must produce the bytes `qemu-img convert -l` produces. Failures are compared
//! with vdisk run as `qemu-img` (drop-in mode): same stdout, stderr and exit code.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn vdisk(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, Path::new(VDISK), args)
}

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn qemu_io(dir: &Path, file: &str, cmd: &str) {
    let r = run_in(dir, Path::new("qemu-io"), &["-f", "qcow2", "-c", cmd, file]);
    ok(&r, &format!("qemu-io {cmd} {file}"));
    assert!(!r.stdout.contains("failed"), "qemu-io {cmd}: {r:?}");
}

/// Zero errors and zero leaks, as qemu-img counts them.
fn check_clean(dir: &Path, file: &str, after: &str) {
    let r = qemu_img(dir, &["check", "--output=json", file]);
    assert_eq!(r.code, 0, "qemu-img check {file} after {after}: {r:?}");
    let v: Value = serde_json::from_str(&r.stdout).expect("check JSON");
    for key in ["check-errors", "corruptions", "leaks"] {
        let n = v.get(key).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(n, 0, "{key} of {file} after {after}: {}", r.stdout);
    }
}

/// The guest contents as `qemu-img convert` reads them, optionally at a snapshot.
fn qemu_contents(dir: &Path, file: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join("contents.raw");
    let _ = fs::remove_file(&out);
    let mut args = vec!["convert", "-O", "raw"];
    if let Some(s) = snapshot {
        args.extend(["-l", s]);
    }
    let target = out.to_string_lossy().into_owned();
    args.extend([file, &target]);
    ok(&qemu_img(dir, &args), &format!("qemu-img {args:?}"));
    fs::read(&out).expect("read converted contents")
}

/// `vdisk convert` of a snapshot, with the selection arguments given.
fn vdisk_contents(dir: &Path, file: &str, select: &[&str]) -> Vec<u8> {
    let out = dir.join("vdisk-contents.raw");
    let _ = fs::remove_file(&out);
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(select);
    let target = out.to_string_lossy().into_owned();
    args.extend([file, &target]);
    ok(&vdisk(dir, &args), &format!("vdisk {args:?}"));
    fs::read(&out).expect("read converted contents")
}

/// The snapshot table as `qemu-img info` reports it: (id, name) in order, and the JSON.
fn snapshot_table(dir: &Path, file: &str) -> (Vec<(String, String)>, Value) {
    let r = qemu_img(dir, &["info", "--output=json", file]);
    ok(&r, "qemu-img info");
    let v: Value = serde_json::from_str(&r.stdout).expect("info JSON");
    let list = v
        .get("snapshots")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let pairs = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                    (field("id"), field("name"))
                })
                .collect()
        })
        .unwrap_or_default();
    (pairs, list)
}

/// Replaces every `YYYY-MM-DD HH:MM:SS` with a placeholder: twin images made at other
/// moments legitimately differ there, and only there.
fn without_dates(text: &str) -> String {
    let b = text.as_bytes();
    let shape = b"dddd-dd-dd dd:dd:dd";
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let fits = i + shape.len() <= b.len()
            && shape.iter().zip(&b[i..]).all(|(&s, &c)| match s {
                b'd' => c.is_ascii_digit(),
                _ => c == s,
            });
        if fits {
            out.push_str("<date>");
            i += shape.len();
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// JSON snapshot entries without their creation times.
fn without_times(list: &Value) -> Value {
    let mut list = list.clone();
    if let Some(a) = list.as_array_mut() {
        for s in a {
            if let Some(m) = s.as_object_mut() {
                m.remove("date-sec");
                m.remove("date-nsec");
            }
        }
    }
    list
}

/// One step of a sequence.
#[derive(Debug, Clone)]
enum Step {
    /// qemu-io `write -P pattern offset len` (`-c` when compressed) on both copies.
    Write(u8, usize, usize, bool),
    /// qemu-io `write -z offset len` on both copies.
    Zero(usize, usize),
    /// `qemu-img resize` of both copies (`--shrink` when smaller).
    Resize(usize),
    /// `snapshot -c NAME`.
    Create(&'static str),
    /// `snapshot -a ID_OR_NAME`.
    Apply(&'static str),
    /// `snapshot -d NAME`.
    Delete(&'static str),
}

/// Twin copies of an image and the model of what they hold.
struct Twins {
    dir: PathBuf,
    /// The copy qemu-img changes.
    q: &'static str,
    /// The copy vdisk changes.
    v: &'static str,
    /// The current guest contents.
    model: Vec<u8>,
    /// The contents of each snapshot, by id.
    snapshots: BTreeMap<String, Vec<u8>>,
}

impl Twins {
    fn new(dir: &Path, made: &str, model: Vec<u8>) -> Self {
        fs::copy(dir.join(made), dir.join("q.qcow2")).expect("copy q");
        fs::copy(dir.join(made), dir.join("v.qcow2")).expect("copy v");
        Twins {
            dir: dir.to_path_buf(),
            q: "q.qcow2",
            v: "v.qcow2",
            model,
            snapshots: BTreeMap::new(),
        }
    }

    fn step(&mut self, step: &Step) {
        let what = format!("{step:?}");
        let d = self.dir.clone();
        match *step {
            Step::Write(p, off, len, compressed) => {
                let c = if compressed { "-c " } else { "" };
                let cmd = format!("write {c}-P {p:#x} {off} {len}");
                qemu_io(&d, self.q, &cmd);
                qemu_io(&d, self.v, &cmd);
                self.model[off..off + len].fill(p);
            }
            Step::Zero(off, len) => {
                let cmd = format!("write -z {off} {len}");
                qemu_io(&d, self.q, &cmd);
                qemu_io(&d, self.v, &cmd);
                self.model[off..off + len].fill(0);
            }
            Step::Resize(size) => {
                let shrink = size < self.model.len();
                for f in [self.q, self.v] {
                    let mut args = vec!["resize", "-q"];
                    if shrink {
                        args.push("--shrink");
                    }
                    let s = size.to_string();
                    args.extend([f, &s]);
                    ok(&qemu_img(&d, &args), &format!("qemu-img {args:?}"));
                }
                self.model.resize(size, 0);
            }
            Step::Create(name) => {
                let q = qemu_img(&d, &["snapshot", "-c", name, self.q]);
                let v = vdisk(&d, &["snapshot", "-c", name, self.v]);
                ok(&q, &what);
                ok(&v, &what);
                assert!(v.stdout.is_empty() && v.stderr.is_empty(), "{what}: {v:?}");
                let (table, _) = snapshot_table(&d, self.v);
                let (id, _) = table.last().expect("the new snapshot is listed").clone();
                self.snapshots.insert(id, self.model.clone());
            }
            Step::Apply(which) => {
                let q = qemu_img(&d, &["snapshot", "-a", which, self.q]);
                let v = vdisk(&d, &["snapshot", "-a", which, self.v]);
                assert_eq!(
                    (v.code, &v.stdout),
                    (q.code, &q.stdout),
                    "{what}: {v:?} {q:?}"
                );
                if q.code == 0 {
                    let (table, _) = snapshot_table(&d, self.v);
                    let id = table
                        .iter()
                        .find(|(id, _)| id == which)
                        .or_else(|| table.iter().find(|(_, n)| n == which))
                        .map(|(id, _)| id.clone())
                        .expect("applied snapshot exists");
                    self.model = self.snapshots[&id].clone();
                }
            }
            Step::Delete(name) => {
                let before = snapshot_table(&d, self.v).0;
                let q = qemu_img(&d, &["snapshot", "-d", name, self.q]);
                let v = vdisk(&d, &["snapshot", "-d", name, self.v]);
                assert_eq!(
                    (v.code, &v.stdout),
                    (q.code, &q.stdout),
                    "{what}: {v:?} {q:?}"
                );
                let after = snapshot_table(&d, self.v).0;
                for (id, _) in before.iter().filter(|e| !after.contains(e)) {
                    self.snapshots.remove(id);
                }
            }
        }
        self.verify(&what);
    }

    /// Everything the module comment promises, after `what`.
    fn verify(&self, what: &str) {
        let d = &self.dir;
        check_clean(d, self.v, what);
        check_clean(d, self.q, what);
        // The same listing from both tools on vdisk's copy, and qemu's copy alike.
        let ql = qemu_img(d, &["snapshot", "-l", self.v]);
        let vl = vdisk(d, &["snapshot", "-l", self.v]);
        ok(&vl, "vdisk snapshot -l");
        assert_eq!(vl.stdout, ql.stdout, "snapshot -l after {what}");
        let qq = qemu_img(d, &["snapshot", "-l", self.q]);
        assert_eq!(
            without_dates(&vl.stdout),
            without_dates(&qq.stdout),
            "vdisk's and qemu-img's copies list differently after {what}"
        );
        // info shows the snapshots as qemu-img does.
        let (table, json) = snapshot_table(d, self.v);
        let vi = vdisk(d, &["info", "--output=json", self.v]);
        ok(&vi, "vdisk info");
        let vi: Value = serde_json::from_str(&vi.stdout).expect("vdisk info JSON");
        let vlist = vi
            .get("snapshots")
            .cloned()
            .unwrap_or(Value::Array(Vec::new()));
        assert_eq!(vlist, json, "info snapshots after {what}");
        assert_eq!(
            without_times(&json),
            without_times(&snapshot_table(d, self.q).1),
            "the twins' tables after {what}"
        );
        let qh = qemu_img(d, &["info", self.v]);
        let vh = vdisk(d, &["info", self.v]);
        assert_eq!(vh.stdout, qh.stdout, "human info after {what}");
        // Contents: now and at every snapshot, against the model and qemu's twin.
        let now = qemu_contents(d, self.v, None);
        assert!(now == self.model, "current contents after {what}");
        assert!(
            now == qemu_contents(d, self.q, None),
            "twins differ after {what}"
        );
        assert_eq!(
            table.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            self.snapshots.keys().cloned().collect::<Vec<_>>(),
            "snapshot ids after {what}"
        );
        for (i, (id, name)) in table.iter().enumerate() {
            let sel = format!("snapshot.id={id}");
            let q = qemu_contents(d, self.v, Some(&sel));
            let expected = &self.snapshots[id];
            // Reads keep the current size: the snapshot's data, cut or padded with zeroes.
            let mut shaped = expected.clone();
            shaped.resize(self.model.len(), 0);
            assert!(q == shaped, "snapshot {id} ({name}) contents after {what}");
            assert!(
                vdisk_contents(d, self.v, &["-l", &sel]) == q,
                "vdisk convert -l {sel} after {what}"
            );
            // The other spellings and the twin for the newest snapshot only, to keep the
            // test quick; every snapshot gets its turn as the newest.
            if i + 1 < table.len() {
                continue;
            }
            assert!(
                q == qemu_contents(d, self.q, Some(&sel)),
                "twins' snapshot {id} differ after {what}"
            );
            let both = format!("snapshot.id={id},snapshot.name={name}");
            assert!(
                vdisk_contents(d, self.v, &["-l", &both]) == q,
                "vdisk convert -l {both} after {what}"
            );
            // By name (or an id), as qemu-img resolves `-l NAME`.
            let q = qemu_contents(d, self.v, Some(name));
            assert!(vdisk_contents(d, self.v, &["-l", name]) == q, "-l {name}");
            assert!(vdisk_contents(d, self.v, &["-s", name]) == q, "-s {name}");
        }
    }
}

fn run_sequence(dir: &Path, made: &str, size: usize, steps: &[Step]) {
    run_sequence_over(dir, made, vec![0; size], steps);
}

/// [`run_sequence`] on an image whose unwritten clusters read as `model` (its backing file).
fn run_sequence_over(dir: &Path, made: &str, model: Vec<u8>, steps: &[Step]) {
    let mut twins = Twins::new(dir, made, model);
    twins.verify("the start");
    for step in steps {
        twins.step(step);
    }
}

/// Writes, snapshots over them, reverts and deletes, with repeated names and names that
/// look like ids; everything lies in the first 61 clusters.
fn main_sequence(cluster: usize) -> Vec<Step> {
    use Step::*;
    let c = cluster;
    vec![
        Write(0x11, 0, 3 * c, false),
        Write(0x12, 40 * c, c / 2, false),
        Create("base"),
        Write(0x21, c, c, false),
        Write(0x22, 20 * c, 2 * c, false),
        Zero(40 * c, c),
        Create("base"),
        Create("1"),
        Write(0x31, 10 * c, 2 * c, true),
        Write(0x32, 60 * c, c, false),
        Apply("base"),
        Write(0x41, 2 * c, c, false),
        Create("after-apply"),
        Apply("2"),
        Apply("1"),
        Delete("base"),
        Write(0x51, 5 * c, 3 * c, false),
        Delete("1"),
        Apply("after-apply"),
        Delete("after-apply"),
        Delete("base"),
        Create("last"),
        Delete("last"),
    ]
}

#[test]
fn sequences_on_qemu_made_images() {
    let s = Scratch::new("snap-qemu");
    let d = s.dir();
    for (opts, cluster) in [
        ("cluster_size=65536", 64 * KIB),
        ("compat=0.10,cluster_size=4096", 4 * KIB),
    ] {
        ok(
            &qemu_img(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    opts,
                    "made.qcow2",
                    "4M",
                ],
            ),
            "qemu-img create",
        );
        run_sequence(d, "made.qcow2", 4 * MIB, &main_sequence(cluster));
    }
}

#[test]
fn sequences_on_vdisk_made_images() {
    let s = Scratch::new("snap-vdisk");
    let d = s.dir();
    for (opts, cluster) in [
        (
            "cluster_size=65536,extended_l2=on,refcount_bits=4",
            64 * KIB,
        ),
        ("cluster_size=512,refcount_bits=64", 512),
    ] {
        ok(
            &vdisk(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    opts,
                    "made.qcow2",
                    "4M",
                ],
            ),
            "vdisk create",
        );
        run_sequence(d, "made.qcow2", 4 * MIB, &main_sequence(cluster));
    }
}

/// Over a backing file: snapshots keep reading through to it where nothing was written.
#[test]
fn sequence_over_a_backing_file() {
    let s = Scratch::new("snap-backing");
    let d = s.dir();
    ok(
        &qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "4M"]),
        "create base",
    );
    let r = run_in(
        d,
        Path::new("qemu-io"),
        &["-f", "raw", "-c", "write -P 0x77 512k 3M", "base.raw"],
    );
    ok(&r, "qemu-io base");
    let mut model = vec![0u8; 4 * MIB];
    model[512 * KIB..512 * KIB + 3 * MIB].fill(0x77);
    ok(
        &qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "made.qcow2",
            ],
        ),
        "create overlay",
    );
    run_sequence_over(d, "made.qcow2", model, &main_sequence(64 * KIB));
}

/// Snapshots taken at other sizes: applying one brings its size back, and `convert -l`
/// reads any of them at the current size, as qemu-img does.
#[test]
fn snapshots_across_resizes() {
    use Step::*;
    let s = Scratch::new("snap-resize");
    let d = s.dir();
    ok(
        &qemu_img(d, &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"]),
        "create",
    );
    let steps = [
        Write(0x61, 0, 64 * KIB, false),
        Write(0x62, MIB - 4 * KIB, 4 * KIB, false),
        Create("small"),
        Resize(3 * MIB),
        Write(0x63, 2 * MIB, 128 * KIB, false),
        Create("big"),
        Resize(512 * KIB),
        Write(0x64, 0, 4 * KIB, false),
        Create("tiny"),
        Apply("big"),
        Write(0x65, 3 * MIB - 64 * KIB, 64 * KIB, false),
        Apply("small"),
        Delete("big"),
        Apply("tiny"),
        Delete("small"),
    ];
    run_sequence(d, "small.qcow2", MIB, &steps);
}

/// Runs `args` in fresh copies of the template folder with qemu-img, with vdisk as
/// `qemu-img`, and with vdisk by its own name: the first two must agree byte for byte,
/// the third in exit code and stdout, explaining itself on one `vdisk: ` line.
struct Bench {
    scratch: Scratch,
    bin: PathBuf,
}

impl Bench {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let t = scratch.sub("template");
        let q = |args: &[&str]| ok(&qemu_img(&t, args), &format!("{args:?}"));
        q(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
        qemu_io(&t, "a.qcow2", "write -P 0x11 0 64k");
        q(&["snapshot", "-c", "one", "a.qcow2"]);
        qemu_io(&t, "a.qcow2", "write -P 0x22 0 64k");
        q(&["snapshot", "-c", "one", "a.qcow2"]);
        q(&["snapshot", "-c", "1", "a.qcow2"]);
        q(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.raw",
            "df.qcow2",
            "1M",
        ]);
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            "r1.qcow2",
            "1M",
        ]);
        qemu_io(&t, "r1.qcow2", "write 0 64k");
        Bench { scratch, bin }
    }

    fn fresh(&self, name: &str) -> PathBuf {
        let dir = self.scratch.path(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("fresh dir");
        for e in fs::read_dir(self.scratch.path("template"))
            .expect("template")
            .flatten()
        {
            fs::copy(e.path(), dir.join(e.file_name())).expect("copy template file");
        }
        dir
    }

    fn check(&self, args: &[&str]) -> Run {
        let name = Path::new("qemu-img");
        let qd = self.fresh("q");
        let q = run_with_path(&qd, None, name, args);
        let dd = self.fresh("d");
        let d = run_with_path(&dd, Some(&self.bin), name, args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "drop-in vdisk vs qemu-img: {args:?}"
        );
        // The files the command left behind agree too.
        for f in ["a.qcow2", "o.raw"] {
            let (a, b) = (qd.join(f), dd.join(f));
            if a.exists() || b.exists() {
                let both = qemu_img(
                    &qd,
                    &["compare", "-q", &a.to_string_lossy(), &b.to_string_lossy()],
                );
                assert_eq!(both.code, 0, "{f} differs after {args:?}: {both:?}");
            }
        }
        let vd = self.fresh("v");
        let v = vdisk(&vd, args);
        assert_eq!((v.code, &v.stdout), (q.code, &q.stdout), "vdisk: {args:?}");
        if q.code != 0 {
            let lines: Vec<&str> = v.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "vdisk {args:?}: one line: {}", v.stderr);
            assert!(lines[0].starts_with("vdisk: "), "{args:?}: {}", v.stderr);
        }
        q
    }
}

#[test]
fn errors_match_qemu_img() {
    let b = Bench::new("snap-errors");
    let failing: &[&[&str]] = &[
        &["snapshot", "-c", "x", "r.raw"],
        &["snapshot", "-a", "x", "r.raw"],
        &["snapshot", "-d", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-a", "one", "a.qcow2"],
        &["snapshot", "-l", "missing.qcow2"],
        &["snapshot", "-c", "x", "missing.qcow2"],
        &["snapshot"],
        &["snapshot", "-l"],
        &["snapshot", "-l", "-c", "x", "a.qcow2"],
        &["snapshot", "-c", "x", "-a", "y", "a.qcow2"],
        &["snapshot", "-c", "x", "-c", "y", "a.qcow2"],
        &["snapshot", "-l", "-l", "a.qcow2"],
        &["snapshot", "-l", "a.qcow2", "r.raw"],
        &["snapshot", "-a", "nope", "a.qcow2"],
        &["snapshot", "-q", "-a", "nope", "a.qcow2"],
        &["snapshot", "-d", "nope", "a.qcow2"],
        // Deleting goes by name only.
        &["snapshot", "-d", "2", "a.qcow2"],
        &["snapshot", "-U", "-c", "u", "a.qcow2"],
        &["snapshot", "-f", "qcow2", "-l", "r.raw"],
        &["snapshot", "-f", "foo", "-l", "a.qcow2"],
        &["snapshot", "--image-opts", "-l", "a.qcow2"],
        &["snapshot", "-f", "qcow2", "--image-opts", "-l", "a.qcow2"],
        &["snapshot", "-c", "x", "df.qcow2"],
        &["snapshot", "-a", "x", "df.qcow2"],
        &["snapshot", "-c", "x", "r1.qcow2"],
        &["convert", "-l", "nope", "a.qcow2", "o.raw"],
        &["convert", "-l", "snapshot.id=9", "a.qcow2", "o.raw"],
        &[
            "convert",
            "-l",
            "snapshot.id=1,snapshot.name=1",
            "a.qcow2",
            "o.raw",
        ],
        &["convert", "-l", "snapshot.id=", "a.qcow2", "o.raw"],
        &["convert", "-l", "snapshot.foo=1", "a.qcow2", "o.raw"],
        &["convert", "-l", "snapshot.id=1,foo=2", "a.qcow2", "o.raw"],
        &["convert", "-l", "snapshot.foo=1", "missing", "o.raw"],
        &["convert", "-l", "snapshot.id=1,,x", "a.qcow2", "o.raw"],
        &["convert", "-l", "one", "r.raw", "o.raw"],
        &["convert", "-l", "snapshot.id=1", "r.raw", "o.raw"],
        &["convert", "-l", "one", "-f", "raw", "a.qcow2", "o.raw"],
        &["convert", "-l", "one", "a.qcow2", "a.qcow2", "o.raw"],
        &["convert", "-l", "one", "missing", "o.raw"],
        &["convert", "-l", "nope", "a.qcow2", "a.qcow2"],
    ];
    for args in failing {
        let q = b.check(args);
        assert_ne!(q.code, 0, "qemu-img {args:?} was expected to fail");
    }
    // Drop-in mode only: qemu-img 10 warns about short-form booleans and has no -s.
    for args in [
        &["convert", "-l", "snapshot.name", "a.qcow2", "o.raw"][..],
        &["convert", "-l", "snapshot.", "a.qcow2", "o.raw"],
        &["convert", "-s", "one", "a.qcow2", "o.raw"],
    ] {
        let name = Path::new("qemu-img");
        let q = run_with_path(&b.fresh("q"), None, name, args);
        let d = run_with_path(&b.fresh("d"), Some(&b.bin), name, args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "{args:?}"
        );
        assert_ne!(q.code, 0, "{args:?}");
    }
    let succeeding: &[&[&str]] = &[
        &["snapshot", "-l", "r.raw"],
        &["snapshot", "r.raw"],
        &["snapshot", "a.qcow2"],
        &["snapshot", "-q", "-l", "a.qcow2"],
        &["snapshot", "-U", "-l", "a.qcow2"],
        &["snapshot", "--list", "a.qcow2"],
        &["snapshot", "-f", "raw", "-l", "a.qcow2"],
        &[
            "snapshot",
            "--image-opts",
            "-l",
            "driver=qcow2,file.filename=a.qcow2",
        ],
        &["snapshot", "-a", "2", "a.qcow2"],
        &["snapshot", "-a", "1", "a.qcow2"],
        &["snapshot", "-d", "one", "a.qcow2"],
        &["snapshot", "-d", "1", "a.qcow2"],
        &["convert", "-l", "one", "a.qcow2", "o.raw"],
        &["convert", "-l", "1", "a.qcow2", "o.raw"],
        &["convert", "-l", "3", "a.qcow2", "o.raw"],
        &["convert", "-l", "snapshot.name=one", "a.qcow2", "o.raw"],
        &[
            "convert",
            "-l",
            "snapshot.id=2,snapshot.name=one",
            "a.qcow2",
            "o.raw",
        ],
        &[
            "convert",
            "-l",
            "snapshot.id=1,snapshot.id=3",
            "a.qcow2",
            "o.raw",
        ],
        &["convert", "-l", "one", "-l", "2", "a.qcow2", "o.raw"],
        &[
            "convert",
            "-l",
            "snapshot.id=2",
            "-l",
            "one",
            "a.qcow2",
            "o.raw",
        ],
        &[
            "convert",
            "-l",
            "snapshot.id=3",
            "a.qcow2",
            "a.qcow2",
            "o.raw",
        ],
    ];
    for args in succeeding {
        let q = b.check(args);
        assert_eq!(q.code, 0, "qemu-img {args:?}: {q:?}");
    }
}

/// Names as qemu-img takes them: empty, repeated, and cut at 255 bytes.
#[test]
fn unusual_names_list_as_qemu_img_lists_them() {
    let s = Scratch::new("snap-names");
    let d = s.dir();
    for f in ["q.qcow2", "v.qcow2"] {
        ok(
            &qemu_img(d, &["create", "-q", "-f", "qcow2", f, "1M"]),
            "create",
        );
    }
    let long = "n".repeat(300);
    for name in ["", "same", "same", "2", long.as_str(), "-dash"] {
        ok(
            &qemu_img(d, &["snapshot", "-c", name, "q.qcow2"]),
            "qemu-img -c",
        );
        ok(&vdisk(d, &["snapshot", "-c", name, "v.qcow2"]), "vdisk -c");
        check_clean(d, "v.qcow2", name);
    }
    let q = qemu_img(d, &["snapshot", "-l", "q.qcow2"]);
    let v = vdisk(d, &["snapshot", "-l", "v.qcow2"]);
    assert_eq!(without_dates(&v.stdout), without_dates(&q.stdout));
    let (qt, _) = snapshot_table(d, "q.qcow2");
    let (vt, _) = snapshot_table(d, "v.qcow2");
    assert_eq!(vt, qt);
    assert_eq!(vt[4].1.len(), 255, "long names are cut at 255 bytes");
    for name in ["", "same", "-dash"] {
        ok(
            &qemu_img(d, &["snapshot", "-d", name, "q.qcow2"]),
            "qemu-img -d",
        );
        ok(&vdisk(d, &["snapshot", "-d", name, "v.qcow2"]), "vdisk -d");
        check_clean(d, "v.qcow2", name);
        assert_eq!(
            snapshot_table(d, "v.qcow2").0,
            snapshot_table(d, "q.qcow2").0
        );
    }
}

/// qemu-img refuses to revert an image that has persistent bitmaps (enabled or not): they
/// would not record what the revert changes. vdisk refuses the same way, and the guest
/// contents stay as they were.
#[test]
fn apply_is_refused_while_bitmaps_exist() {
    let scratch = Scratch::new("snapshot-apply-bitmaps");
    let dropin = dropin_link(&scratch.sub("bin"), Path::new(VDISK));
    let base = scratch.sub("base");
    ok(
        &qemu_img(&base, &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"]),
        "create",
    );
    ok(
        &qemu_img(&base, &["snapshot", "-c", "s1", "img.qcow2"]),
        "snapshot",
    );
    ok(
        &qemu_img(&base, &["bitmap", "--add", "--disable", "img.qcow2", "b0"]),
        "bitmap",
    );
    qemu_io(&base, "img.qcow2", "write -P 0x33 0 64k");
    let args = ["snapshot", "-a", "s1", "img.qcow2"];
    let mut runs = Vec::new();
    for (tag, bin) in [("q", None), ("d", dropin.parent())] {
        let dir = scratch.sub(tag);
        fs::copy(base.join("img.qcow2"), dir.join("img.qcow2")).expect("copy");
        runs.push(run_with_path(&dir, bin, Path::new("qemu-img"), &args));
        // qemu rewrites the bitmap directory when it opens the image read-write, so the
        // bytes may change; the guest contents must not.
        assert!(
            qemu_contents(&dir, "img.qcow2", None) == qemu_contents(&base, "img.qcow2", None),
            "a refused apply changed the contents ({tag})"
        );
    }
    assert_eq!(runs[0].code, 1, "{:?}", runs[0]);
    assert_eq!(
        runs[0].stderr,
        "qemu-img: Could not apply snapshot 's1': Device has active dirty bitmaps\n"
    );
    assert_eq!(
        (runs[1].code, &runs[1].stdout, &runs[1].stderr),
        (runs[0].code, &runs[0].stdout, &runs[0].stderr)
    );
    let own = vdisk(&scratch.sub("d"), &args);
    assert_eq!(own.code, 1);
    assert!(own.stderr.contains("vdisk bitmap --remove"), "{own:?}");
}
