//! Three folders with the same starting files: qemu-img runs in `q`, vdisk under the name
//! `qemu-img` (drop-in mode) in `d`, and vdisk under its own name in `v`. Every step runs in
//! all three; drop-in vdisk must print exactly what qemu-img prints and exit the same way,
//! plain vdisk must exit the same way with the same stdout and explain failures on lines
//! that start with `vdisk: `. The folders then hold images whose state can be compared.

// Each test crate that includes this module uses only some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

/// The vdisk binary under test.
pub const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// The three folders and the drop-in link.
pub struct Twins {
    _scratch: Scratch,
    bin: PathBuf,
    /// qemu-img's folder.
    pub q: PathBuf,
    /// Drop-in vdisk's folder.
    pub d: PathBuf,
    /// Plain vdisk's folder.
    pub v: PathBuf,
}

/// Fails the test unless `r` succeeded.
pub fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what} failed: {}{}", r.stdout, r.stderr);
}

/// Runs qemu-img in `dir`, which must succeed.
pub fn qemu(dir: &Path, args: &[&str]) -> Run {
    let r = qemu_img(dir, args);
    ok(&r, &format!("qemu-img {args:?} in {}", dir.display()));
    r
}

/// Runs qemu-io on `file` (format `fmt`) in `dir`, each of `cmds` as one `-c`.
pub fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let r = run_in(dir, Path::new("qemu-io"), &args);
    ok(&r, &format!("qemu-io {args:?}"));
    assert!(!r.stdout.contains("failed"), "qemu-io {args:?}: {r:?}");
}

impl Twins {
    /// Three fresh folders, each set up by `setup`.
    pub fn new(tag: &str, setup: impl Fn(&Path)) -> Self {
        let scratch = Scratch::new(tag);
        let bin = scratch.sub("bin");
        dropin_link(&bin, Path::new(VDISK));
        let q = scratch.sub("q");
        let d = scratch.sub("d");
        let v = scratch.sub("v");
        for dir in [&q, &d, &v] {
            setup(dir);
        }
        Twins {
            _scratch: scratch,
            bin,
            q,
            d,
            v,
        }
    }

    /// Runs `args` in the three folders and checks the tools agree; returns qemu-img's run.
    pub fn step(&self, args: &[&str]) -> Run {
        let name = Path::new("qemu-img");
        let q = run_with_path(&self.q, None, name, args);
        let d = run_with_path(&self.d, Some(&self.bin), name, args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "drop-in vdisk vs qemu-img: {args:?}"
        );
        let v = run_in(&self.v, Path::new(VDISK), args);
        assert_eq!(v.code, q.code, "exit code of vdisk {args:?}: {v:?}");
        assert_eq!(v.stdout, q.stdout, "stdout of vdisk {args:?}");
        assert!(!v.stderr.contains("panicked"), "vdisk {args:?}: {v:?}");
        if q.code != 0 {
            let last = v.stderr.lines().last().unwrap_or("");
            assert!(
                last.starts_with("vdisk: "),
                "vdisk {args:?} must say what failed: {}",
                v.stderr
            );
        }
        q
    }

    /// [`Twins::step`] for a command that must succeed.
    pub fn step_ok(&self, args: &[&str]) -> Run {
        let r = self.step(args);
        ok(&r, &format!("qemu-img {args:?}"));
        r
    }

    /// The same command in each folder without comparing (to prepare a state).
    pub fn each(&self, f: impl Fn(&Path)) {
        for dir in [&self.q, &self.d, &self.v] {
            f(dir);
        }
    }

    /// Checks `image` (format `fmt`) is in the same state in the three folders: the same
    /// virtual size and backing fields in `qemu-img info`, the same guest contents by
    /// `qemu-img compare`, and for qcow2 a clean `qemu-img check` of vdisk's images.
    pub fn same_image(&self, image: &str, fmt: &str) {
        let info = |dir: &Path| -> Value {
            let r = qemu(dir, &["info", "--output=json", "-f", fmt, image]);
            serde_json::from_str(&r.stdout).expect("qemu-img info JSON")
        };
        let q = info(&self.q);
        for dir in [&self.d, &self.v] {
            let other = info(dir);
            for key in [
                "virtual-size",
                "backing-filename",
                "backing-filename-format",
                "full-backing-filename",
                "cluster-size",
            ] {
                let strip = |v: &Value| match v.get(key) {
                    // The full name carries the folder, which differs by design.
                    Some(Value::String(s)) if key == "full-backing-filename" => Value::String(
                        Path::new(s)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    ),
                    Some(v) => v.clone(),
                    None => Value::Null,
                };
                assert_eq!(
                    strip(&other),
                    strip(&q),
                    "{key} of {image} in {}",
                    dir.display()
                );
            }
            if fmt == "qcow2" {
                assert_eq!(
                    other.pointer("/format-specific/data"),
                    q.pointer("/format-specific/data"),
                    "qcow2 features of {image} in {}",
                    dir.display()
                );
                let c = qemu_img(dir, &["check", "-f", fmt, image]);
                assert_eq!(
                    c.code,
                    0,
                    "qemu-img check {image} in {}: {c:?}",
                    dir.display()
                );
            }
            let theirs = self.q.join(image);
            let cmp = qemu_img(
                dir,
                &[
                    "compare",
                    "-f",
                    fmt,
                    "-F",
                    fmt,
                    image,
                    &theirs.to_string_lossy(),
                ],
            );
            assert_eq!(
                cmp.code,
                0,
                "{image} in {} vs qemu-img's: {cmp:?}",
                dir.display()
            );
        }
    }

    /// `qemu-img info` of `image` agrees on size and backing fields in the three folders
    /// (for images whose backing file cannot be opened).
    pub fn same_info(&self, image: &str) {
        let info = |dir: &Path| -> Value {
            let r = qemu(dir, &["info", "--output=json", image]);
            let v: Value = serde_json::from_str(&r.stdout).expect("qemu-img info JSON");
            let keys = [
                "virtual-size",
                "backing-filename",
                "backing-filename-format",
            ];
            keys.iter()
                .map(|k| v.get(*k).cloned().unwrap_or(Value::Null))
                .collect()
        };
        let q = info(&self.q);
        for dir in [&self.d, &self.v] {
            assert_eq!(info(dir), q, "info of {image} in {}", dir.display());
        }
    }

    /// `qemu-img map --output=json` of `image` in each folder must agree (the same ranges
    /// allocated, zero, data or compressed in the image itself).
    pub fn same_map(&self, image: &str, fmt: &str) {
        let map = |dir: &Path| -> Vec<Value> {
            let r = qemu(dir, &["map", "--output=json", "-f", fmt, image]);
            let v: Value = serde_json::from_str(&r.stdout).expect("map JSON");
            // Where clusters landed in the file is the drivers' business: merge neighbours
            // that differ only in their host offset.
            let mut out: Vec<Value> = Vec::new();
            for e in v.as_array().expect("map array") {
                let mut e = e.clone();
                if let Some(o) = e.as_object_mut() {
                    o.remove("offset");
                }
                let len = e["length"].as_u64().unwrap_or(0);
                if let Some(prev) = out.last_mut() {
                    let mut a = prev.clone();
                    let mut b = e.clone();
                    for x in [&mut a, &mut b] {
                        if let Some(o) = x.as_object_mut() {
                            o.remove("start");
                            o.remove("length");
                        }
                    }
                    if a == b {
                        let total = prev["length"].as_u64().unwrap_or(0) + len;
                        prev["length"] = Value::from(total);
                        continue;
                    }
                }
                out.push(e);
            }
            out
        };
        let q = map(&self.q);
        for dir in [&self.d, &self.v] {
            assert_eq!(map(dir), q, "map of {image} in {}", dir.display());
        }
    }
}
