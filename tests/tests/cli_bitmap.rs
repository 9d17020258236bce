//! `vdisk bitmap` (and `convert --bitmaps`) against the system qemu-img.
//!
//! Each sequence runs on twin folders holding the same images: qemu-img runs each command
//! in one, vdisk under the name `qemu-img` (drop-in mode) in the other. Both must exit with
//! the same code and print the same stdout and stderr (qemu's node names, `#blockNNN`,
//! differ from run to run in qemu itself and are compared as `#blockN`). After every
//! command `qemu-img info --output=json` must list the same bitmaps in both folders and
//! `qemu-img check` must find vdisk's image clean (no errors, no leaks); the bitmaps'
//! contents are compared through qemu's own view of them, a `qemu-nbd` export of the
//! bitmap, whose dirty extents qemu's NBD client maps as `"data": false`. The same
//! failures under the name vdisk exit alike, say `vdisk: ` on one stderr line, never panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

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

/// The bitmaps `qemu-img info --output=json` lists (null when none).
fn bitmaps(dir: &Path, file: &str) -> Value {
    let r = qemu_img(dir, &["info", "--output=json", file]);
    ok(&r, "qemu-img info");
    let v: Value = serde_json::from_str(&r.stdout).expect("info JSON");
    v["format-specific"]["data"]
        .get("bitmaps")
        .cloned()
        .unwrap_or(Value::Null)
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter(|b| {
                    !b["flags"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == "in-use"))
                })
                .filter_map(|b| b["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Stops the qemu-nbd it started, on every path out of a test.
struct Nbd(PathBuf);

impl Drop for Nbd {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(&self.0) {
            stop(pid.trim());
        }
    }
}

/// Kills process `pid` and waits (up to 10 s) until it is gone, so its image lock is free.
fn stop(pid: &str) {
    let _ = Command::new("kill").arg(pid).status();
    for _ in 0..1000 {
        if gone(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = Command::new("kill").args(["-9", pid]).status();
}

/// The dirty ranges of bitmap `name` of `dir/file` as qemu sees them.
fn qemu_dirty(dir: &Path, file: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = dir.join("nbd.sock");
    let pid = dir.join("nbd.pid");
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(&pid);
    let status = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--fork",
            "-f",
            "qcow2",
            "-r",
            "-x",
            "",
            "-B",
            name,
        ])
        .arg(format!("--pid-file={}", pid.display()))
        .arg(format!("--socket={}", sock.display()))
        .arg(dir.join(file))
        .status()
        .expect("run qemu-nbd");
    let _guard = Nbd(pid);
    assert!(status.success(), "qemu-nbd -B {name} {file}");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let r = qemu_img(dir, &["map", "--output=json", "--image-opts", &opts]);
    ok(&r, "qemu-img map of the NBD export");
    let v: Value = serde_json::from_str(&r.stdout).expect("map JSON");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("map array") {
        if e["data"].as_bool() == Some(false) {
            let (s, l) = (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
            );
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => out.push((s, l)),
            }
        }
    }
    out
}

/// qemu numbers its anonymous nodes per run (`#block123`); compare them as `#blockN`.
fn normalise(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at + 6]);
        out.push('N');
        rest = rest[at + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

struct Twins {
    _scratch: Scratch,
    q: PathBuf,
    d: PathBuf,
    v: PathBuf,
    bin: PathBuf,
}

impl Twins {
    fn new(tag: &str, setup: impl Fn(&Path)) -> Twins {
        let scratch = Scratch::new(tag);
        let (q, d, v) = (scratch.sub("q"), scratch.sub("d"), scratch.sub("v"));
        for dir in [&q, &d, &v] {
            setup(dir);
        }
        let link = dropin_link(&scratch.sub("bin"), Path::new(VDISK));
        let bin = link.parent().expect("bin").to_path_buf();
        Twins {
            _scratch: scratch,
            q,
            d,
            v,
            bin,
        }
    }

    /// Runs `qemu-img args` with both tools and compares everything; returns qemu's run.
    fn both(&self, args: &[&str]) -> Run {
        let q = qemu_img(&self.q, args);
        let d = run_with_path(&self.d, Some(&self.bin), Path::new("qemu-img"), args);
        assert_eq!(
            (d.code, d.stdout.as_str(), normalise(&d.stderr)),
            (q.code, q.stdout.as_str(), normalise(&q.stderr)),
            "drop-in vdisk vs qemu-img for {args:?}"
        );
        // Plain vdisk: same exit code and stdout, its own one-line wording.
        let v = run_in(&self.v, Path::new(VDISK), args);
        assert_eq!(
            (v.code, v.stdout.as_str()),
            (q.code, q.stdout.as_str()),
            "vdisk {args:?}: {v:?}"
        );
        if q.code != 0 {
            assert!(v.stderr.starts_with("vdisk: "), "vdisk {args:?}: {v:?}");
            assert!(!v.stderr.contains("panicked"), "vdisk {args:?}: {v:?}");
        }
        q
    }

    /// The same qemu-io command on every copy.
    fn io(&self, file: &str, cmd: &str) {
        for dir in [&self.q, &self.d, &self.v] {
            qemu_io(dir, file, cmd);
        }
    }

    /// Both copies list the same bitmaps with the same contents, and vdisk's are clean.
    fn same(&self, file: &str, after: &str, contents: bool) {
        check_clean(&self.d, file, after);
        check_clean(&self.v, file, after);
        let (q, d, v) = (
            bitmaps(&self.q, file),
            bitmaps(&self.d, file),
            bitmaps(&self.v, file),
        );
        assert_eq!(d, q, "bitmaps of {file} after {after}");
        assert_eq!(v, q, "bitmaps of {file} (vdisk mode) after {after}");
        if contents {
            for name in names(&q) {
                assert_eq!(
                    qemu_dirty(&self.d, file, &name),
                    qemu_dirty(&self.q, file, &name),
                    "contents of bitmap {name} of {file} after {after}"
                );
            }
        }
    }
}

fn setup(dir: &Path) {
    for (file, size) in [
        ("a.qcow2", "32M"),
        ("src.qcow2", "32M"),
        ("small.qcow2", "16M"),
    ] {
        ok(
            &qemu_img(dir, &["create", "-q", "-f", "qcow2", file, size]),
            "create",
        );
    }
    ok(
        &qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "1M",
            ],
        ),
        "create v2",
    );
    ok(
        &qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]),
        "create raw",
    );
    ok(
        &qemu_img(dir, &["bitmap", "--add", "src.qcow2", "s"]),
        "add s",
    );
    qemu_io(dir, "src.qcow2", "write 20M 100k");
    ok(
        &qemu_img(dir, &["bitmap", "--add", "small.qcow2", "t"]),
        "add t",
    );
}

#[test]
fn sequences_match_qemu_img() {
    let t = Twins::new("bitmap-seq", setup);
    let steps: &[&[&str]] = &[
        &["bitmap", "--add", "a.qcow2", "b0"],
        &["bitmap", "--add", "-g", "4k", "--disable", "a.qcow2", "b1"],
        &["bitmap", "--add", "-g", "512", "a.qcow2", "fine"],
        &["bitmap", "--disable", "a.qcow2", "b0"],
        &["bitmap", "--enable", "a.qcow2", "b1"],
        &[
            "bitmap",
            "--merge",
            "s",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "b0",
        ],
        &["bitmap", "--merge", "b0", "a.qcow2", "fine"],
        &["bitmap", "--clear", "a.qcow2", "b1"],
        // Several operations in one call, in order.
        &[
            "bitmap",
            "--add",
            "--merge",
            "b0",
            "--disable",
            "a.qcow2",
            "multi",
        ],
        &[
            "bitmap", "--add", "-g", "64k", "--remove", "a.qcow2", "gone",
        ],
        &["bitmap", "--remove", "a.qcow2", "b1"],
        &["bitmap", "--add", "-g", "2G", "a.qcow2", "huge"],
        &["bitmap", "--add", "-g", "6G", "a.qcow2", "wrapped"],
        &["bitmap", "--add", "-g", "0", "a.qcow2", "zero-gran"],
        &[
            "bitmap",
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "by-opts",
        ],
    ];
    for (i, args) in steps.iter().enumerate() {
        let r = t.both(args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        // Writes between the steps give the enabled bitmaps something to record.
        t.io("a.qcow2", &format!("write {}M 70k", i * 2 + 1));
        t.same(
            "a.qcow2",
            &format!("{args:?}"),
            i % 4 == 3 || i + 1 == steps.len(),
        );
    }
    // Writes by vdisk itself (through another command) are recorded as qemu's are.
    for dir in [&t.q, &t.d] {
        let prog = if dir == &t.q {
            PathBuf::from("qemu-img")
        } else {
            PathBuf::from(VDISK)
        };
        let r = run_in(dir, &prog, &["resize", "a.qcow2", "40M"]);
        ok(&r, "resize");
    }
    assert_eq!(
        bitmaps(&t.d, "a.qcow2"),
        bitmaps(&t.q, "a.qcow2"),
        "after resize"
    );
    check_clean(&t.d, "a.qcow2", "resize");
}

#[test]
fn failures_match_qemu_img() {
    let t = Twins::new("bitmap-fail", setup);
    t.both(&["bitmap", "--add", "a.qcow2", "b0"]);
    let long = "n".repeat(1024);
    let max = "m".repeat(1023);
    let cases: Vec<Vec<&str>> = vec![
        vec!["bitmap", "a.qcow2", "b0"],
        vec!["bitmap", "--add", "a.qcow2"],
        vec!["bitmap", "--add", "a.qcow2", "x", "y"],
        vec!["bitmap", "-g", "64k", "--clear", "a.qcow2", "b0"],
        vec!["bitmap", "-F", "qcow2", "--merge", "b0", "a.qcow2", "b0"],
        vec!["bitmap", "-b", "src.qcow2", "--add", "a.qcow2", "x"],
        vec!["bitmap", "--add", "a.qcow2", "b0"],
        vec!["bitmap", "--add", "a.qcow2", ""],
        vec!["bitmap", "--add", "-g", "1000", "a.qcow2", "x"],
        vec!["bitmap", "--add", "-g", "256", "a.qcow2", "x"],
        vec!["bitmap", "--add", "-g", "4G", "a.qcow2", "x"],
        vec!["bitmap", "--add", "-g", "abc", "a.qcow2", "x"],
        vec!["bitmap", "--add", "-g", "-1", "a.qcow2", "x"],
        vec!["bitmap", "--add", "a.qcow2", &long],
        vec!["bitmap", "--add", "a.qcow2", &max],
        vec!["bitmap", "--remove", "a.qcow2", "nope"],
        vec!["bitmap", "--clear", "a.qcow2", "nope"],
        vec!["bitmap", "--enable", "a.qcow2", "nope"],
        vec!["bitmap", "--disable", "a.qcow2", "nope"],
        vec!["bitmap", "--merge", "nope", "a.qcow2", "b0"],
        vec!["bitmap", "--merge", "b0", "a.qcow2", "nope"],
        vec![
            "bitmap",
            "--merge",
            "t",
            "-b",
            "small.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "b0",
        ],
        vec![
            "bitmap", "--merge", "s", "-b", "nofile", "-F", "qcow2", "a.qcow2", "b0",
        ],
        // The first failure stops the rest; what came before it is kept.
        vec!["bitmap", "--add", "--add", "a.qcow2", "twice"],
        vec!["bitmap", "--add", "nofile.qcow2", "x"],
        vec!["bitmap", "--add", "v2.qcow2", "x"],
        vec!["bitmap", "--add", "-f", "raw", "r.raw", "x"],
        vec!["bitmap", "--add", "r.raw", "x"],
        vec!["bitmap", "--remove", "-f", "raw", "r.raw", "x"],
        vec!["bitmap", "--bogus", "a.qcow2", "x"],
    ];
    for args in &cases {
        t.both(args);
        t.same("a.qcow2", &format!("{args:?}"), false);
    }
}

/// Sets the in_use flag of the first bitmap of `path` by hand (what a crash leaves).
fn set_first_in_use(path: &Path) {
    use std::os::unix::fs::FileExt;
    let data = fs::read(path).expect("read");
    let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().expect("4"));
    let mut at = 112usize;
    loop {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let dir = u64::from_be_bytes(data[at + 24..at + 32].try_into().expect("8"));
            let f = fs::OpenOptions::new().write(true).open(path).expect("open");
            f.write_all_at(&[0, 0, 0, 3], dir + 12).expect("poke");
            return;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn an_in_use_bitmap_as_qemu_treats_it() {
    let t = Twins::new("bitmap-inuse", |dir| {
        ok(
            &qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]),
            "create",
        );
        ok(
            &qemu_img(dir, &["bitmap", "--add", "a.qcow2", "bad"]),
            "add",
        );
        ok(
            &qemu_img(dir, &["bitmap", "--add", "a.qcow2", "good"]),
            "add",
        );
        set_first_in_use(&dir.join("a.qcow2"));
    });
    for args in [
        &["info", "a.qcow2"][..],
        &["info", "--output=json", "a.qcow2"],
        &["bitmap", "--clear", "a.qcow2", "bad"],
        &["bitmap", "--enable", "a.qcow2", "bad"],
        &["bitmap", "--merge", "bad", "a.qcow2", "good"],
        &["bitmap", "--merge", "good", "a.qcow2", "bad"],
        &["resize", "a.qcow2", "16M"],
        &["check", "a.qcow2"],
        &["bitmap", "--clear", "a.qcow2", "good"],
    ] {
        t.both(args);
        t.same("a.qcow2", &format!("{args:?}"), false);
    }
    // qemu's repair leaves the in-use bitmap as it is, and so does vdisk's. (Where the
    // stores placed the bitmaps, and so the image end offset, depends on each allocator's
    // history; only the verdict is compared.)
    let q = qemu_img(&t.q, &["check", "-r", "all", "a.qcow2"]);
    let d = run_with_path(
        &t.d,
        Some(&t.bin),
        Path::new("qemu-img"),
        &["check", "-r", "all", "a.qcow2"],
    );
    assert_eq!(
        (d.code, d.stdout.lines().next()),
        (q.code, q.stdout.lines().next()),
        "check -r all"
    );
    assert_eq!(q.code, 0, "{q:?}");
    let v = run_in(&t.v, Path::new(VDISK), &["check", "-r", "all", "a.qcow2"]);
    assert_eq!(v.code, 0, "{v:?}");
    t.same("a.qcow2", "check -r all", false);
    // Writes by qemu-io between (the image stays usable), then the only repair.
    t.io("a.qcow2", "write 0 4k");
    t.both(&["bitmap", "--remove", "a.qcow2", "bad"]);
    t.same("a.qcow2", "remove", true);
}

/// True when process `pid` has exited (a zombie left for a reaper counts: it holds no
/// locks any more).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn convert_copies_bitmaps_as_qemu_img() {
    let t = Twins::new("bitmap-convert", |dir| {
        setup(dir);
        ok(
            &qemu_img(
                dir,
                &[
                    "bitmap",
                    "--add",
                    "-g",
                    "4k",
                    "--disable",
                    "src.qcow2",
                    "off",
                ],
            ),
            "add",
        );
        ok(
            &qemu_img(dir, &["bitmap", "--add", "-g", "512", "src.qcow2", "fine"]),
            "add",
        );
        qemu_io(dir, "src.qcow2", "write 1M 3000");
        qemu_io(dir, "src.qcow2", "write -z 7M 1M");
        ok(
            &qemu_img(dir, &["bitmap", "--add", "small.qcow2", "bad"]),
            "add",
        );
        set_first_in_use(&dir.join("small.qcow2"));
    });
    let r = t.both(&[
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        "src.qcow2",
        "out.qcow2",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    t.same("out.qcow2", "convert --bitmaps", true);
    assert_eq!(
        names(&bitmaps(&t.d, "out.qcow2")),
        ["s", "off", "fine"],
        "copied bitmaps"
    );
    // Into an existing target (-n): its own bitmaps stay, a clash is refused as qemu does.
    t.both(&[
        "convert",
        "--bitmaps",
        "-n",
        "-O",
        "qcow2",
        "small.qcow2",
        "a.qcow2",
    ]);
    t.both(&[
        "convert",
        "--bitmaps",
        "--skip-broken-bitmaps",
        "-O",
        "qcow2",
        "small.qcow2",
        "skip.qcow2",
    ]);
    t.same("skip.qcow2", "skip broken", true);
    t.both(&[
        "convert",
        "--bitmaps",
        "-n",
        "-O",
        "qcow2",
        "src.qcow2",
        "out.qcow2",
    ]);
    for args in [
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "x1.qcow2",
        ][..],
        &["convert", "--bitmaps", "-O", "qcow2", "r.raw", "x2.qcow2"],
        &["convert", "--bitmaps", "-O", "raw", "src.qcow2", "x3.raw"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "src.qcow2",
            "x4.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            "src.qcow2",
            "x5.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "small.qcow2",
            "x6.qcow2",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "v2.qcow2",
            "x7.qcow2",
        ],
    ] {
        let r = t.both(args);
        assert_ne!(r.code, 0, "{args:?}");
        for f in [
            "x1.qcow2", "x2.qcow2", "x3.raw", "x4.qcow2", "x5.qcow2", "x6.qcow2", "x7.qcow2",
        ] {
            assert_eq!(
                t.q.join(f).exists(),
                t.d.join(f).exists(),
                "{args:?}: {f} made by one tool only"
            );
        }
    }
    t.same("out.qcow2", "failures", true);
}
