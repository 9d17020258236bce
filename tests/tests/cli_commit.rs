//! `vdisk commit` against `qemu-img commit` of qemu 10, on twin copies of the same chains.
//!
//! Each scenario builds a chain with qemu-img and qemu-io (patterns, zero writes and
//! discards at every level) in one folder and copies it into two more: qemu-img commits in
//! the first, vdisk under the name `qemu-img` (drop-in mode) in the second and vdisk under
//! its own name in the third. Drop-in vdisk must print what qemu-img prints and exit alike;
//! plain vdisk must exit alike with the same stdout, failing on one `vdisk: ` line. Then
//! every image of vdisk's chains must read as qemu-img's twin (`qemu-img compare`), every
//! qcow2 must pass `qemu-img check` with no errors and no leaks, and `qemu-img map` of the
//! committed (or emptied) top must equal the map of qemu-img's twin, the base's allocation
//! included.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

fn qemu(dir: &Path, args: &[&str]) -> Run {
    let r = qemu_img(dir, args);
    ok(&r, &format!("qemu-img {args:?}"));
    r
}

/// Runs qemu-io on `file` with each of `cmds` as one `-c`.
fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(file);
    let r = run_in(dir, Path::new("qemu-io"), &args);
    ok(&r, &format!("qemu-io {args:?}"));
    assert!(!r.stdout.contains("failed"), "qemu-io {args:?}: {r:?}");
}

/// Three folders with the same files: qemu-img's, drop-in vdisk's and plain vdisk's.
struct Trio {
    _scratch: Scratch,
    bin: PathBuf,
    q: PathBuf,
    d: PathBuf,
    v: PathBuf,
}

impl Trio {
    /// Builds the same files in each folder with `build` (qemu-img and qemu-io are
    /// deterministic, and unlike a file copy they keep raw files sparse).
    fn new(tag: &str, build: impl Fn(&Path)) -> Trio {
        let scratch = Scratch::new(&format!("commit-{tag}"));
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let (q, d, v) = (scratch.sub("q"), scratch.sub("d"), scratch.sub("v"));
        for dir in [&q, &d, &v] {
            build(dir);
        }
        Trio {
            _scratch: scratch,
            bin,
            q,
            d,
            v,
        }
    }

    /// Runs `qemu-img args` in all three folders and checks the tools agree; returns
    /// qemu-img's result.
    fn run(&self, args: &[&str]) -> Run {
        let name = Path::new("qemu-img");
        let q = run_with_path(&self.q, None, name, args);
        let d = run_with_path(&self.d, Some(&self.bin), name, args);
        let v = run_in(&self.v, Path::new(VDISK), args);
        assert_eq!(
            d.code, q.code,
            "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
        );
        assert_eq!(
            progress_shape(&d.stdout),
            progress_shape(&q.stdout),
            "stdout of {args:?}"
        );
        assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
        assert_eq!(v.code, q.code, "exit code of vdisk {args:?}: {v:?}");
        assert_eq!(
            progress_shape(&v.stdout),
            progress_shape(&q.stdout),
            "stdout of vdisk {args:?}"
        );
        assert!(
            !v.stderr.contains("panicked"),
            "vdisk {args:?}: {}",
            v.stderr
        );
        if q.code != 0 {
            let lines: Vec<&str> = v.stderr.lines().collect();
            assert_eq!(
                lines.len(),
                1,
                "vdisk {args:?} must fail on one line: {}",
                v.stderr
            );
            assert!(
                lines[0].starts_with("vdisk: "),
                "vdisk {args:?}: {}",
                v.stderr
            );
        }
        q
    }

    /// vdisk's images read as qemu-img's twins, pass check, and `top` maps alike.
    fn same_results(&self, files: &[(&str, &str)], top: (&str, &str)) {
        for dir in [&self.d, &self.v] {
            for &(file, fmt) in files {
                let twin = self.q.join(file);
                let twin = twin.to_string_lossy();
                let r = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, file, twin.as_ref()]);
                assert_eq!(r.code, 0, "{file} in {}: {r:?}", dir.display());
                if fmt == "qcow2" {
                    check_clean(dir, file);
                }
            }
            let (ours, theirs) = (map(dir, top.0, top.1), map(&self.q, top.0, top.1));
            if ours != theirs {
                // Tell apart what commit decides from what the qcow2 write path decides.
                eprintln!(
                    "note: map of {} in {} differs from qemu-img's only where the qcow2 \
                     write path places clusters or marks zeroes:\nvdisk: {ours}\nqemu:  {theirs}",
                    top.0,
                    dir.display()
                );
            }
            assert_eq!(
                shape(&ours),
                shape(&theirs),
                "map of {} in {}\nvdisk: {ours}\nqemu:  {theirs}",
                top.0,
                dir.display()
            );
        }
    }
}

/// Progress lines depend on timing; the shape does not: qemu-img's first line, its last
/// `(100.00/100%)` and whatever follows.
fn progress_shape(stdout: &str) -> String {
    let Some(last) = stdout.rfind("(100.00/100%)") else {
        return stdout.to_string();
    };
    let first = stdout.split('\r').next().unwrap_or_default();
    format!("{first}\r...{}", &stdout[last..])
}

/// `qemu-img check` finds no errors and no leaks.
fn check_clean(dir: &Path, file: &str) {
    let r = qemu_img(dir, &["check", "--output=json", file]);
    assert_eq!(r.code, 0, "check {file} in {}: {r:?}", dir.display());
    let v: Value = serde_json::from_str(&r.stdout).expect("check JSON");
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(
            v.get(key).and_then(Value::as_u64).unwrap_or(0),
            0,
            "{key} of {file} in {}: {}",
            dir.display(),
            r.stdout
        );
    }
}

/// The parts of a `qemu-img map --output=json` that commit decides, extent by extent:
/// which ranges each layer holds, as data or as zeroes; the top's own host offsets too.
///
/// Two things are the qcow2 write path's, not commit's, and differ from QEMU in vdisk's
/// qcow2 driver today, so they are left out for the layers below the top:
/// - where a base cluster lands in its file: QEMU's qcow2 allocates the clusters of one
///   multi-cluster write as one contiguous run and its mirror job completes requests out
///   of order; vdisk allocates cluster by cluster, in guest order;
/// - QEMU's qcow2 write-zeroes marks an unallocated cluster of an image without a backing
///   file as a zero cluster (`present: true`), vdisk's leaves it unallocated (`present:
///   false`); both read as zeroes.
///
/// Neighbours that become equal are merged again, as `qemu-img map` would have merged them.
fn shape(map_json: &str) -> Vec<Value> {
    let entries: Value = serde_json::from_str(map_json).expect("map JSON");
    let mut out: Vec<Value> = Vec::new();
    for mut e in entries.as_array().cloned().unwrap_or_default() {
        let below_top = e["depth"].as_u64().unwrap_or(0) > 0;
        if below_top {
            if let Some(obj) = e.as_object_mut() {
                obj.remove("offset");
                if obj.get("zero") == Some(&Value::Bool(true))
                    && obj.get("data") == Some(&Value::Bool(false))
                {
                    obj.insert("present".into(), Value::Bool(false));
                }
            }
        }
        let key = |v: &Value| {
            let mut v = v.clone();
            if let Some(obj) = v.as_object_mut() {
                obj.remove("start");
                obj.remove("length");
            }
            v
        };
        match out.last_mut() {
            Some(last) if below_top && key(last) == key(&e) => {
                let len = last["length"].as_u64().unwrap_or(0) + e["length"].as_u64().unwrap_or(0);
                last["length"] = Value::from(len);
            }
            _ => out.push(e),
        }
    }
    out
}

fn map(dir: &Path, file: &str, fmt: &str) -> String {
    qemu(dir, &["map", "--output=json", "-f", fmt, file]).stdout
}

fn create(dir: &Path, fmt: &str, file: &str, size: u64, backing: Option<(&str, &str)>) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if let Some((b, bf)) = backing {
        args.extend(["-b", b, "-F", bf]);
    }
    args.extend([file, size.as_str()]);
    qemu(dir, &args);
}

/// qemu-io commands: a pattern, a zero write and a discard at offsets `salt` shifts, plus
/// sub-cluster writes, so every layer has data, zeroes and holes in other places.
fn layer_ops(salt: u64, pattern: u8) -> Vec<String> {
    let at = |o: u64| o + salt * 192 * KIB;
    vec![
        format!("write -P {pattern} {} {}", at(0), 640 * KIB),
        format!("write -P {} {} 4k", pattern + 1, at(MIB + 12 * KIB)),
        format!("write -z {} {}", at(2 * MIB), 128 * KIB),
        format!("discard {} {}", at(256 * KIB), 128 * KIB),
        format!("write -z {} 64k", at(3 * MIB)),
        format!("write -P {} {} 512", pattern + 2, at(5 * MIB) + 512),
    ]
}

fn two_layers(dir: &Path) {
    create(dir, "qcow2", "base.qcow2", 8 * MIB, None);
    qemu_io(dir, "qcow2", "base.qcow2", &layer_ops(0, 0x10));
    create(
        dir,
        "qcow2",
        "top.qcow2",
        8 * MIB,
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(dir, "qcow2", "top.qcow2", &layer_ops(1, 0x20));
}

fn three_layers(dir: &Path) {
    create(dir, "qcow2", "base.qcow2", 8 * MIB, None);
    qemu_io(dir, "qcow2", "base.qcow2", &layer_ops(0, 0x10));
    create(
        dir,
        "qcow2",
        "mid.qcow2",
        8 * MIB,
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(dir, "qcow2", "mid.qcow2", &layer_ops(2, 0x30));
    create(
        dir,
        "qcow2",
        "top.qcow2",
        8 * MIB,
        Some(("mid.qcow2", "qcow2")),
    );
    qemu_io(dir, "qcow2", "top.qcow2", &layer_ops(5, 0x50));
}

const THREE: [(&str, &str); 3] = [
    ("base.qcow2", "qcow2"),
    ("mid.qcow2", "qcow2"),
    ("top.qcow2", "qcow2"),
];

#[test]
fn commit_two_qcow2_layers_and_empty_the_top() {
    let t = Trio::new("two", two_layers);
    let r = t.run(&["commit", "top.qcow2"]);
    assert_eq!(r.stdout, "Image committed.\n");
    t.same_results(
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
        ("top.qcow2", "qcow2"),
    );
    // The emptied top holds nothing of its own.
    let m: Value = serde_json::from_str(&map(&t.d, "top.qcow2", "qcow2")).expect("map JSON");
    assert!(m
        .as_array()
        .expect("map list")
        .iter()
        .all(|e| e["depth"].as_u64() == Some(1)));
}

#[test]
fn commit_with_drop_keeps_the_top() {
    let t = Trio::new("drop", two_layers);
    t.run(&["commit", "-q", "-d", "top.qcow2"]);
    t.same_results(
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
        ("top.qcow2", "qcow2"),
    );
}

#[test]
fn commit_three_layers_into_the_middle_then_the_base() {
    let t = Trio::new("three", three_layers);
    t.run(&["commit", "top.qcow2"]);
    t.same_results(&THREE, ("top.qcow2", "qcow2"));
    // Then the middle (holding both upper layers now) into the base.
    t.run(&["commit", "-p", "mid.qcow2"]);
    t.same_results(&THREE, ("top.qcow2", "qcow2"));
}

#[test]
fn commit_over_two_layers_with_base() {
    let t = Trio::new("base", three_layers);
    // -b names the base relative to the image that names it; it implies -d.
    t.run(&["commit", "-b", "base.qcow2", "top.qcow2"]);
    t.same_results(&THREE, ("top.qcow2", "qcow2"));
    t.same_results(&THREE, ("mid.qcow2", "qcow2"));
}

#[test]
fn commit_into_a_shorter_base_grows_it() {
    let t = Trio::new("grow", |dir| {
        create(dir, "qcow2", "base.qcow2", 2 * MIB, None);
        qemu_io(dir, "qcow2", "base.qcow2", &layer_ops(0, 0x10)[..2]);
        create(
            dir,
            "qcow2",
            "top.qcow2",
            6 * MIB,
            Some(("base.qcow2", "qcow2")),
        );
        qemu_io(dir, "qcow2", "top.qcow2", &layer_ops(1, 0x20));
    });
    t.run(&["commit", "top.qcow2"]);
    t.same_results(
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
        ("top.qcow2", "qcow2"),
    );
    let info = qemu(&t.d, &["info", "--output=json", "base.qcow2"]).stdout;
    let v: Value = serde_json::from_str(&info).expect("info JSON");
    assert_eq!(v["virtual-size"].as_u64(), Some(6 * MIB));
}

#[test]
fn commit_into_a_raw_base() {
    let t = Trio::new("raw", |dir| {
        create(dir, "raw", "base.raw", 4 * MIB, None);
        qemu_io(dir, "raw", "base.raw", &layer_ops(0, 0x10)[..2]);
        create(
            dir,
            "qcow2",
            "top.qcow2",
            4 * MIB,
            Some(("base.raw", "raw")),
        );
        qemu_io(dir, "qcow2", "top.qcow2", &layer_ops(1, 0x20)[..5]);
    });
    t.run(&["commit", "-f", "qcow2", "top.qcow2"]);
    t.same_results(
        &[("base.raw", "raw"), ("top.qcow2", "qcow2")],
        ("top.qcow2", "qcow2"),
    );
}

#[test]
fn commit_a_vmdk_top_leaves_it_as_qemu_img_does() {
    let t = Trio::new("vmdk", |dir| {
        create(dir, "vmdk", "base.vmdk", 4 * MIB, None);
        qemu_io(dir, "vmdk", "base.vmdk", &layer_ops(0, 0x10)[..2]);
        create(
            dir,
            "vmdk",
            "top.vmdk",
            4 * MIB,
            Some(("base.vmdk", "vmdk")),
        );
        qemu_io(dir, "vmdk", "top.vmdk", &layer_ops(1, 0x20)[..3]);
    });
    let before: Vec<Vec<u8>> = [&t.d, &t.v]
        .iter()
        .map(|dir| fs::read(dir.join("top.vmdk")).expect("top"))
        .collect();
    let r = t.run(&["commit", "top.vmdk"]);
    assert_eq!(r.stdout, "Image committed.\n");
    t.same_results(&[("base.vmdk", "vmdk")], ("top.vmdk", "vmdk"));
    // VMDK has no "make empty": the top stays byte for byte what it was. The base got a new
    // CID with its first write, so qemu no longer reads the top (its parentCID is stale);
    // both tools leave the chain in that same state.
    let read_top = |dir: &Path| {
        run_in(
            dir,
            Path::new("qemu-io"),
            &["-f", "vmdk", "-c", "read 0 4k", "top.vmdk"],
        )
    };
    let q = read_top(&t.q);
    for (dir, before) in [&t.d, &t.v].into_iter().zip(before) {
        assert_eq!(fs::read(dir.join("top.vmdk")).expect("top"), before);
        let r = read_top(dir);
        assert_eq!((r.stdout, r.stderr), (q.stdout.clone(), q.stderr.clone()));
    }
}

#[test]
fn commit_failures_match_qemu_img() {
    let t = Trio::new("errors", |dir| {
        three_layers(dir);
        create(dir, "raw", "plain.raw", MIB, None);
    });
    for args in [
        vec!["commit", "base.qcow2"],
        vec!["commit", "plain.raw"],
        vec!["commit", "-b", "nope.qcow2", "top.qcow2"],
        vec!["commit", "-b", "top.qcow2", "top.qcow2"],
        vec!["commit", "-r", "1x", "top.qcow2"],
        vec!["commit", "-r", "-5", "top.qcow2"],
        vec!["commit", "top.qcow2", "extra"],
        vec!["commit"],
        vec!["commit", "-t", "bogus", "top.qcow2"],
        vec!["commit", "missing.qcow2"],
        vec![
            "commit",
            "-f",
            "raw",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
        ],
    ] {
        assert_eq!(t.run(&args).code, 1, "{args:?}");
    }
    // Nothing was changed by the failures.
    t.same_results(&THREE, ("top.qcow2", "qcow2"));
}

#[test]
fn commit_with_image_opts_and_progress() {
    let t = Trio::new("opts", two_layers);
    let r = t.run(&[
        "commit",
        "-p",
        "--image-opts",
        "driver=qcow2,file.filename=top.qcow2",
    ]);
    assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{r:?}");
    assert!(
        r.stdout.ends_with("(100.00/100%)\r\nImage committed.\n"),
        "{r:?}"
    );
    t.same_results(
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
        ("top.qcow2", "qcow2"),
    );
}

#[test]
fn rate_limit_spaces_the_copy() {
    let t = Trio::new("rate", |dir| {
        create(dir, "qcow2", "base.qcow2", 4 * MIB, None);
        create(
            dir,
            "qcow2",
            "top.qcow2",
            4 * MIB,
            Some(("base.qcow2", "qcow2")),
        );
        qemu_io(dir, "qcow2", "top.qcow2", &["write -P 7 0 3M".to_string()]);
    });
    // 3 MiB in 1 MiB requests at 4 MiB/s: the last may start only at 0.5 s.
    let started = Instant::now();
    let r = run_in(&t.d, Path::new(VDISK), &["commit", "-r", "4M", "top.qcow2"]);
    ok(&r, "vdisk commit -r");
    assert!(
        started.elapsed() >= Duration::from_millis(480),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    ok(
        &qemu_img(&t.q, &["commit", "-r", "4M", "top.qcow2"]),
        "qemu-img commit -r",
    );
    assert!(
        started.elapsed() >= Duration::from_millis(480),
        "qemu-img too"
    );
    let r = run_in(
        &t.v,
        Path::new(VDISK),
        &["commit", "-q", "-r", "4M", "top.qcow2"],
    );
    ok(&r, "vdisk commit -q -r");
    assert_eq!(r.stdout, "");
    t.same_results(
        &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
        ("top.qcow2", "qcow2"),
    );
}

/// A variant of the top: its name, its create options, what is done to it afterwards.
type Variant<'a> = (&'a str, &'a [&'a str], &'a dyn Fn(&Path));

/// A two-layer chain whose top is made with `top_options` and then changed by `after`.
fn two_layers_with(dir: &Path, top_options: &[&str], after: &dyn Fn(&Path)) {
    create(dir, "qcow2", "base.qcow2", 8 * MIB, None);
    qemu_io(dir, "qcow2", "base.qcow2", &layer_ops(0, 0x10));
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(top_options);
    args.extend(["-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "8M"]);
    qemu(dir, &args);
    qemu_io(dir, "qcow2", "top.qcow2", &layer_ops(1, 0x20));
    after(dir);
}

#[test]
fn tops_qemu_empties_cluster_by_cluster() {
    // Version 2, internal snapshots, persistent bitmaps: QEMU discards every cluster
    // instead of rewriting the image; compressed clusters must be freed whole.
    let snapshot_then_write = |dir: &Path| {
        qemu(dir, &["snapshot", "-c", "s1", "top.qcow2"]);
        qemu_io(
            dir,
            "qcow2",
            "top.qcow2",
            &["write -P 0x66 0 8M".to_string()],
        );
    };
    let snapshot = |dir: &Path| {
        qemu(dir, &["snapshot", "-c", "s1", "top.qcow2"]);
    };
    let bitmap = |dir: &Path| {
        qemu(dir, &["bitmap", "--add", "top.qcow2", "b0"]);
    };
    let compressed = |dir: &Path| {
        let cmds = ["write -c -P 0x77 4M 128k".to_string()];
        qemu_io(dir, "qcow2", "top.qcow2", &cmds);
    };
    let nothing = |_: &Path| {};
    let cases: [Variant; 6] = [
        ("v2", &["-o", "compat=0.10"], &nothing),
        ("snap", &[], &snapshot_then_write),
        // Every L2 table shared with the snapshot.
        ("snap-shared", &[], &snapshot),
        ("bitmap", &[], &bitmap),
        ("compressed", &[], &compressed),
        ("ext-l2", &["-o", "extended_l2=on"], &nothing),
    ];
    for (tag, options, after) in cases {
        let t = Trio::new(tag, |dir| two_layers_with(dir, options, after));
        t.run(&["commit", "top.qcow2"]);
        t.same_results(
            &[("base.qcow2", "qcow2"), ("top.qcow2", "qcow2")],
            ("top.qcow2", "qcow2"),
        );
        let info = |dir: &Path| qemu(dir, &["info", "--output=json", "top.qcow2"]).stdout;
        let keep = |text: String| {
            let mut v: Value = serde_json::from_str(&text).expect("info JSON");
            for key in ["actual-size", "filename", "children"] {
                v.as_object_mut().map(|o| o.remove(key));
            }
            // Each folder built its chain at its own moment.
            for snap in v["snapshots"].as_array_mut().into_iter().flatten() {
                for key in ["date-sec", "date-nsec"] {
                    snap.as_object_mut().map(|o| o.remove(key));
                }
            }
            v
        };
        // Snapshots and bitmaps stay as qemu-img leaves them.
        assert_eq!(keep(info(&t.d)), keep(info(&t.q)), "{tag}");
        if tag.starts_with("snap") {
            let saved = |dir: &Path| {
                qemu(
                    dir,
                    &["convert", "-l", "s1", "-O", "raw", "top.qcow2", "s1.raw"],
                );
                fs::read(dir.join("s1.raw")).expect("snapshot contents")
            };
            assert!(saved(&t.d) == saved(&t.q), "snapshot s1 of {tag}");
        }
    }
}
