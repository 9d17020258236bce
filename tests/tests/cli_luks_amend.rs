//! `amend` of `-f luks` images (key slots: `state`, `new-secret`, `old-secret`, `keyslot`,
//! `iter-time`, `--force`) against the system qemu-img as the oracle.
//!
//! Each case copies one image three times and runs the same command line on the copies with
//! qemu-img, vdisk under the name `qemu-img` (drop-in mode: exit code, stdout and stderr byte
//! for byte) and vdisk by its own name (exit code and stdout; a failure on one `vdisk: `
//! line); the key slots left active must be the same. The copies sit in folders of their
//! own under one name, so messages naming the file compare as they are. Then the images each
//! tool changed are opened by the other tool with every passphrase.

use std::path::{Path, PathBuf};

use vdisk_tests::{dropin_link, qemu_img, run_in, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const SECRETS: &[&str] = &[
    "secret,id=s0,data=first",
    "secret,id=s1,data=second",
    "secret,id=s2,data=third",
];
const IMG: &str = "img.luks";

struct Bench {
    scratch: Scratch,
    dropin: PathBuf,
    base: PathBuf,
}

/// Which slots of the luks image at `path` are active, from its header.
fn active(path: &Path) -> Vec<bool> {
    let bytes = std::fs::read(path).expect("read image");
    (0..8)
        .map(|i| bytes[208 + 48 * i..212 + 48 * i] == [0x00, 0xac, 0x71, 0xf3])
        .collect()
}

fn opts(key: &str) -> String {
    format!("driver=luks,file.filename={IMG},key-secret={key}")
}

/// `amend` with every secret defined, `extra` before the image, on `IMG` with `key`.
fn amend_args(extra: &[&str], key: &str, options: &str) -> Vec<String> {
    let mut args = vec!["amend".to_string()];
    for s in SECRETS {
        args.extend(["--object".to_string(), s.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([
        "--image-opts".into(),
        opts(key),
        "-o".into(),
        options.to_string(),
    ]);
    args
}

/// `convert` of `IMG` opened with `key` to a raw file: what a data open says.
fn convert_args(key: &str) -> Vec<String> {
    let mut args = vec!["convert".to_string()];
    for s in SECRETS {
        args.extend(["--object".to_string(), s.to_string()]);
    }
    args.extend([
        "--image-opts".into(),
        opts(key),
        "-O".into(),
        "raw".into(),
        "out.raw".into(),
    ]);
    args
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

impl Bench {
    /// A 4 MiB image with `first` in slot 0 (made by vdisk, `iter-time=10`), then the
    /// amends `setup` (option lists, key s0) applied by qemu-img.
    fn new(tag: &str, setup: &[&str]) -> Self {
        let scratch = Scratch::new(tag);
        let dropin = dropin_link(&scratch.sub("bin"), Path::new(VDISK));
        let base = scratch.sub("base");
        let r = run_in(
            &base,
            Path::new(VDISK),
            &[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                SECRETS[0],
                "-o",
                "key-secret=s0,iter-time=10",
                IMG,
                "4M",
            ],
        );
        assert_eq!(r.code, 0, "create: {}", r.stderr);
        for o in setup {
            let r = qemu_img(&base, &refs(&amend_args(&[], "s0", o)));
            assert_eq!(r.code, 0, "qemu-img amend -o {o}: {}", r.stderr);
        }
        Bench {
            scratch,
            dropin,
            base,
        }
    }

    /// A fresh copy of the base image in folder `name`.
    fn copy(&self, name: &str) -> PathBuf {
        let dir = self.scratch.sub(name);
        std::fs::copy(self.base.join(IMG), dir.join(IMG)).expect("copy image");
        dir
    }

    /// Runs `args` with qemu-img, drop-in vdisk and vdisk, each on its own copy, requires
    /// them to agree (output and the slots left active); returns qemu-img's run and the
    /// three folders (qemu, drop-in, vdisk).
    fn same(&self, args: &[String]) -> (Run, [PathBuf; 3]) {
        let args = refs(args);
        let name = Path::new("qemu-img");
        let (qd, dd, vd) = (self.copy("q"), self.copy("d"), self.copy("v"));
        let q = run_with_path(&qd, None, name, &args);
        let d = run_with_path(&dd, self.dropin.parent(), name, &args);
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "drop-in vdisk vs qemu-img for {args:?}"
        );
        let v = run_in(&vd, Path::new(VDISK), &args);
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
        let slots = active(&qd.join(IMG));
        assert_eq!(active(&dd.join(IMG)), slots, "drop-in slots for {args:?}");
        assert_eq!(active(&vd.join(IMG)), slots, "vdisk slots for {args:?}");
        (q, [qd, dd, vd])
    }

    /// Opens `IMG` in `dir` for data with `key` in qemu-img and drop-in vdisk: both must
    /// give the same result; true when it opened.
    fn opens(&self, dir: &Path, key: &str) -> bool {
        let args = convert_args(key);
        let args = refs(&args);
        let name = Path::new("qemu-img");
        let q = run_with_path(dir, None, name, &args);
        let d = run_with_path(dir, self.dropin.parent(), name, &args);
        assert_eq!(d, q, "drop-in vdisk vs qemu-img for {args:?} in {dir:?}");
        q.code == 0
    }
}

#[test]
fn refusals_match_qemu_img() {
    // Slot 0 holds s0, slot 2 s1.
    let b = Bench::new(
        "luks-amend-refuse",
        &["state=active,new-secret=s1,keyslot=2,iter-time=0"],
    );
    let cases: &[(&str, &str)] = &[
        ("s0", "state=active,new-secret=s2,keyslot=2"),
        ("s0", "state=active,new-secret=s2,keyslot=8"),
        ("s0", "state=active,new-secret=s2,keyslot=-1"),
        ("s0", "state=active,new-secret=s2,keyslot=99999999999"),
        ("s0", "state=active"),
        ("s0", "state=active,keyslot=3"),
        ("s0", "new-secret=s2"),
        ("s0", "state=foo"),
        ("s0", "state"),
        ("s0", "state=inactive,old-secret=s2"),
        ("s0", "state=inactive"),
        ("s0", "state=inactive,keyslot=3"),
        ("s0", "state=inactive,keyslot=2,old-secret=s0"),
        ("s0", "state=inactive,new-secret=s1"),
        ("s0", "state=inactive,old-secret=s9"),
        ("s0", "state=active,new-secret=s9"),
        ("s0", "state=active,new-secret="),
        ("s0", "state=active,new-secret=s1,old-secret=s0"),
        ("s0", "state=active,new-secret=s1,keyslot="),
        ("s0", "state=active,new-secret=s2,iter-time="),
        ("s0", "state=inactive,keyslot=010"),
        ("s0", "state=inactive,keyslot=08"),
        ("s0", "state=inactive,keyslot=99999999999999999999"),
        ("s0", "state=inactive,keyslot=3 "),
        ("s0", "state=inactive,keyslot=-18446744073709551615"),
        ("s0", "size=8M"),
        ("s0", "size=abc"),
        ("s0", "state=active,size=8M"),
        ("s0", "cipher-alg=aes-128"),
        ("s0", "key-secret=s0"),
        ("s0", "detached-header=on"),
        ("s0", "preallocation=off"),
        ("s0", "foo=1"),
        ("s9", "state=inactive,keyslot=2"),
        ("s2", "state=inactive,keyslot=2"),
    ];
    for (key, o) in cases {
        let (q, _) = b.same(&amend_args(&[], key, o));
        assert_ne!(q.code, 0, "qemu-img accepted -o {o} with {key}");
        assert_eq!(
            active(&b.scratch.path("q").join(IMG)),
            active(&b.base.join(IMG))
        );
    }
    // Without --image-opts there is no way to give the key: qemu refuses at the open.
    for form in [&["-f", "luks"][..], &[][..]] {
        let mut args = vec!["amend".to_string()];
        for s in SECRETS {
            args.extend(["--object".to_string(), s.to_string()]);
        }
        args.extend(form.iter().map(|s| s.to_string()));
        args.extend([
            IMG.to_string(),
            "-o".into(),
            "state=active,new-secret=s2".into(),
        ]);
        let (q, _) = b.same(&args);
        assert_eq!(q.code, 1);
    }
    // -o help, with the image and without.
    let (q, _) = b.same(&amend_args(&[], "s0", "help"));
    assert!(q.stdout.starts_with("Amend options for 'luks':\n"));
    b.same(&["amend", "-f", "luks", "-o", "help"].map(String::from));
}

#[test]
fn the_last_slot_needs_force_and_full_headers_are_refused() {
    let b = Bench::new(
        "luks-amend-force",
        &["state=active,new-secret=s1,keyslot=1,iter-time=0"],
    );
    // Erasing the only slot s0 (or s1) opens is fine; erasing every active slot is not.
    for (key, o) in [
        ("s1", "state=inactive,keyslot=0"),
        ("s0", "state=inactive,old-secret=s1"),
    ] {
        let (q, _) = b.same(&amend_args(&[], key, o));
        assert_eq!(q.code, 0, "-o {o}: {}", q.stderr);
    }
    let once = Bench::new("luks-amend-force1", &[]);
    for o in ["state=inactive,keyslot=0", "state=inactive,old-secret=s0"] {
        let (q, _) = once.same(&amend_args(&[], "s0", o));
        assert_eq!(q.code, 1, "-o {o}");
        let (q, dirs) = once.same(&amend_args(&["--force"], "s0", o));
        assert_eq!(q.code, 0, "--force -o {o}: {}", q.stderr);
        assert_eq!(active(&dirs[2].join(IMG)), [false; 8]);
        for dir in &dirs {
            assert!(!once.opens(dir, "s0"));
        }
    }
    // --force overwrites an active slot: s2 replaces s1 in slot 1.
    let (q, dirs) = b.same(&amend_args(
        &["--force"],
        "s0",
        "state=active,new-secret=s2,keyslot=1,iter-time=0",
    ));
    assert_eq!(q.code, 0, "{}", q.stderr);
    for dir in &dirs {
        assert!(b.opens(dir, "s2"));
        assert!(!b.opens(dir, "s1"));
        assert!(b.opens(dir, "s0"));
    }
    // A header whose eight slots are in use refuses another key.
    let full = Bench::new(
        "luks-amend-full",
        &["state=active,new-secret=s1,iter-time=0"; 7],
    );
    let (q, _) = full.same(&amend_args(&[], "s0", "state=active,new-secret=s2"));
    assert_eq!(q.code, 1);
    assert!(q.stderr.contains("all keyslots are in use"), "{}", q.stderr);
}

#[test]
fn keys_added_and_erased_by_one_tool_open_in_the_other() {
    let b = Bench::new("luks-amend-interop", &[]);
    // Add s1 to the first free slot and s2 to slot 6; -p prints qemu's progress lines.
    let (q, dirs) = b.same(&amend_args(
        &["-p"],
        "s0",
        "state=active,new-secret=s1,iter-time=0",
    ));
    assert_eq!(q.code, 0, "{}", q.stderr);
    assert_eq!(
        active(&dirs[0].join(IMG)),
        [true, true, false, false, false, false, false, false]
    );
    // Each copy (changed by qemu-img, drop-in vdisk, vdisk) opens with both keys in both
    // tools; the third key does not open.
    for dir in &dirs {
        assert!(b.opens(dir, "s0"), "{dir:?}");
        assert!(b.opens(dir, "s1"), "{dir:?}");
        assert!(!b.opens(dir, "s2"), "{dir:?}");
    }
    // Then keyslot 6 from the copies' own state, by each tool on its own copy.
    let name = Path::new("qemu-img");
    let add = amend_args(
        &[],
        "s1",
        "state=active,new-secret=s2,keyslot=6,iter-time=0",
    );
    let erase = amend_args(&[], "s2", "state=inactive,old-secret=s0");
    for (i, dir) in dirs.iter().enumerate() {
        let bin = (i == 1).then(|| b.dropin.parent()).flatten();
        let program = if i == 2 { Path::new(VDISK) } else { name };
        for args in [&add, &erase] {
            let r = run_with_path(dir, bin, program, &refs(args));
            assert_eq!(r.code, 0, "{args:?} in {dir:?}: {}", r.stderr);
        }
        assert_eq!(
            active(&dir.join(IMG)),
            [false, true, false, false, false, false, true, false]
        );
        // The erased key is refused by both tools in qemu's words.
        assert!(!b.opens(dir, "s0"), "{dir:?}");
        assert!(b.opens(dir, "s1"), "{dir:?}");
        assert!(b.opens(dir, "s2"), "{dir:?}");
    }
    let r = run_with_path(&dirs[2], None, name, &refs(&convert_args("s0")));
    assert_eq!(
        r.stderr,
        format!(
            "qemu-img: Could not open '{}': Invalid password, cannot unlock any keyslot\n",
            opts("s0")
        )
    );
}
