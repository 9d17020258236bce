//! Failures of the vdisk commands, against the system qemu-img as the oracle.
//!
//! Every case runs in two identical folders, once with qemu-img and once with vdisk under
//! the name `qemu-img` (drop-in mode), and requires the same exit code, the same stdout and
//! the same stderr, byte for byte. The same case then runs under the name vdisk, which must
//! exit with the same code, print the same stdout, and explain itself on one stderr line
//! that starts with `vdisk: `; never a panic.
//!
//! The permission cases run both as root (where permission bits do not stop anyone, and
//! both tools succeed) and as a user; either way the two tools must agree.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use vdisk_tests::{dropin_link, is_root, qemu_img, run_with_path, Run, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// Builds the same starting files in `dir`.
fn setup(dir: &Path) {
    let r = qemu_img(dir, &["create", "-q", "-f", "raw", "a.raw", "1M"]);
    assert_eq!(r.code, 0, "{r:?}");
    fs::create_dir_all(dir.join("folder")).expect("folder");
    let ro_dir = dir.join("ro-dir");
    fs::create_dir_all(&ro_dir).expect("ro-dir");
    fs::set_permissions(&ro_dir, fs::Permissions::from_mode(0o555)).expect("chmod");
    fs::write(dir.join("ro.raw"), vec![0u8; 4096]).expect("ro.raw");
    fs::set_permissions(dir.join("ro.raw"), fs::Permissions::from_mode(0o444)).expect("chmod");
    // Shorter than a VHDX header section, with and without the VHDX signature.
    let mut signed = b"vhdxfile".to_vec();
    signed.resize(70_000, 0);
    fs::write(dir.join("signed.vhdx"), signed).expect("signed.vhdx");
    fs::write(dir.join("short.vhdx"), vec![0u8; 100]).expect("short.vhdx");
    // Chains whose last backing file is missing: one layer, and two in a sub-folder (so the
    // missing file's name is resolved against the folder of the image naming it).
    fs::create_dir_all(dir.join("chain")).expect("chain");
    for args in [
        &["-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["-b", "missing.qcow2", "-F", "qcow2", "chain/mid.qcow2"],
        &["-b", "mid.qcow2", "-F", "qcow2", "chain/top.qcow2"],
    ] {
        let mut full = vec!["create", "-q", "-f", "qcow2", "-u"];
        full.extend_from_slice(args);
        full.push("1M");
        let r = qemu_img(dir, &full);
        assert_eq!(r.code, 0, "{r:?}");
    }
}

struct Bench {
    scratch: Scratch,
    dropin: std::path::PathBuf,
}

impl Bench {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let dropin = dropin_link(&scratch.sub("bin"), Path::new(VDISK));
        Bench { scratch, dropin }
    }

    /// Runs `args` with qemu-img, drop-in vdisk and plain vdisk, each in a fresh folder, and
    /// checks they agree. Returns qemu-img's result.
    fn check(&self, args: &[&str]) -> Run {
        self.check_as(None, args)
    }

    /// Like [`Bench::check`], run as the unprivileged user `nobody` through `setpriv` when
    /// `as_nobody` is given (so permission bits apply even when the tests run as root).
    fn check_as(&self, as_nobody: Option<&Path>, args: &[&str]) -> Run {
        // Both qemu-img and drop-in vdisk run by the bare name, found through PATH, since
        // qemu-img repeats the name it was invoked by.
        let run = |dir: &Path, bin: Option<&Path>, program: &Path| match as_nobody {
            None => run_with_path(dir, bin, program, args),
            Some(setpriv) => {
                let program = program.to_string_lossy().into_owned();
                let mut full = vec!["--reuid=65534", "--regid=65534", "--clear-groups", &program];
                full.extend_from_slice(args);
                run_with_path(dir, bin, setpriv, &full)
            }
        };
        let fresh = |name: &str| {
            let d = self.scratch.sub(name);
            for e in fs::read_dir(&d).expect("read dir").flatten() {
                let p = e.path();
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o755));
                if p.is_dir() {
                    fs::remove_dir_all(&p).expect("clean");
                } else {
                    fs::remove_file(&p).expect("clean");
                }
            }
            setup(&d);
            d
        };
        let name = Path::new("qemu-img");
        let q = run(&fresh("q"), None, name);
        let d = run(&fresh("d"), self.dropin.parent(), name);
        assert_eq!(
            d.code, q.code,
            "exit code of {args:?}\nvdisk: {d:?}\nqemu: {q:?}"
        );
        assert_eq!(d.stdout, q.stdout, "stdout of {args:?}");
        assert_eq!(d.stderr, q.stderr, "stderr of {args:?}");
        let v = run(&fresh("v"), None, Path::new(VDISK));
        assert_eq!(v.code, q.code, "exit code of vdisk {args:?}: {v:?}");
        assert_eq!(v.stdout, q.stdout, "stdout of vdisk {args:?}");
        assert!(
            !v.stderr.contains("panicked"),
            "vdisk {args:?} panicked: {}",
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
}

#[test]
fn missing_files_and_folders() {
    let b = Bench::new("err-open");
    for args in [
        vec!["info", "missing.raw"],
        vec!["info", "--output=json", "missing.raw"],
        vec!["info", "folder"],
        vec!["map", "missing.raw"],
        vec!["map", "--output=json", "folder"],
        vec!["measure", "-O", "raw", "missing.raw"],
        vec!["check", "missing.raw"],
        vec!["check", "folder"],
        vec!["info", "file:missing.raw"],
        vec!["info", "-f", "raw", "file:folder"],
    ] {
        assert_eq!(b.check(&args).code, 1, "{args:?}");
    }
    assert_eq!(b.check(&["compare", "a.raw", "missing.raw"]).code, 2);
    assert_eq!(b.check(&["compare", "folder", "a.raw"]).code, 2);
}

#[test]
fn files_too_short_for_vhdx() {
    let b = Bench::new("err-short-vhdx");
    for file in ["signed.vhdx", "short.vhdx"] {
        for args in [
            vec!["info", "-f", "vhdx", file],
            vec!["info", file],
            vec!["check", "-f", "vhdx", file],
            vec!["convert", "-f", "vhdx", file, "o.raw"],
        ] {
            let r = b.check(&args);
            // Probing finds raw in the short file and the signature in the other.
            let probed_raw = args.len() == 2 && file == "short.vhdx";
            assert_eq!(r.code, i32::from(!probed_raw), "{args:?}");
        }
    }
}

#[test]
fn missing_backing_files() {
    let b = Bench::new("err-backing");
    for args in [
        vec!["info", "--backing-chain", "top.qcow2"],
        vec!["info", "--backing-chain", "--output=json", "top.qcow2"],
        vec!["info", "--backing-chain", "chain/top.qcow2"],
        vec!["info", "--backing-chain", "-U", "chain/mid.qcow2"],
        vec![
            "info",
            "--backing-chain",
            "--image-opts",
            "driver=qcow2,file.filename=chain/top.qcow2",
        ],
        vec!["map", "chain/top.qcow2"],
        vec!["convert", "-O", "raw", "top.qcow2", "o.raw"],
        vec!["check", "chain/top.qcow2"],
    ] {
        assert_eq!(b.check(&args).code, 1, "{args:?}");
    }
    // Without --backing-chain info opens no backing file at all.
    assert_eq!(b.check(&["info", "chain/top.qcow2"]).code, 0);
}

#[test]
fn unwritable_targets() {
    let b = Bench::new("err-write");
    // Refused for a user, allowed for root: the tools must agree either way.
    b.check(&["create", "-f", "raw", "ro-dir/x.raw", "1M"]);
    b.check(&["create", "-f", "raw", "ro.raw", "1M"]);
    // As root the permission bits above stop nobody; run them again as an ordinary user.
    let setpriv = Path::new("/usr/bin/setpriv");
    if is_root() && setpriv.exists() {
        let bench = b.scratch.dir();
        let _ = fs::set_permissions(bench, fs::Permissions::from_mode(0o755));
        for args in [
            ["create", "-f", "raw", "ro-dir/x.raw", "1M"],
            ["create", "-f", "raw", "ro.raw", "1M"],
        ] {
            let q = b.check_as(Some(setpriv), &args);
            assert_eq!(q.code, 1, "{args:?} as nobody: {q:?}");
            assert!(q.stderr.contains("Permission denied"), "{q:?}");
        }
    }
    // Refused for everyone.
    assert_eq!(
        b.check(&["create", "-f", "raw", "nodir/x.raw", "1M"]).code,
        1
    );
    assert_eq!(b.check(&["create", "-f", "raw", "folder", "1M"]).code, 1);
    assert_eq!(
        b.check(&["create", "-f", "raw", "file:nodir/x.raw", "1M"])
            .code,
        1
    );
    assert_eq!(
        b.check(&["create", "-f", "raw", "/proc/vdisk-no-such.raw", "1M"])
            .code,
        1
    );
}

#[test]
fn sizes_that_overflow_or_do_not_parse() {
    let b = Bench::new("err-size");
    for size in [
        "99999999999999999999",
        "16E",
        "8E",
        "12x",
        "0.5",
        "1.5",
        "-5",
        "9223372036854775807",
    ] {
        assert_eq!(
            b.check(&["create", "-f", "raw", "x.raw", size]).code,
            1,
            "{size}"
        );
    }
    for args in [
        vec!["measure", "-O", "raw", "--size", "16E"],
        vec!["measure", "-O", "raw", "--size", "1x"],
        vec!["map", "--start-offset", "-1", "a.raw"],
        vec!["map", "--start-offset", "1x", "a.raw"],
        vec!["map", "--max-length", "16E", "a.raw"],
        vec!["create", "-f", "raw", "x.raw"],
        vec!["create", "-f", "raw", "-o", "size=5k", "x.raw", "6k"],
        vec!["create", "-f", "raw", "-o", "size=1x", "x.raw"],
    ] {
        assert_eq!(b.check(&args).code, 1, "{args:?}");
    }
}

#[test]
fn unknown_options_and_bad_values() {
    let b = Bench::new("err-opt");
    for args in [
        vec!["info", "--bogus", "a.raw"],
        vec!["info", "-z", "a.raw"],
        vec!["map", "--nope", "a.raw"],
        vec!["create", "--bogus", "x.raw", "1M"],
        vec!["info", "--output=xml", "a.raw"],
        vec!["map", "--output", "yaml", "a.raw"],
        vec!["check", "-r", "bogus", "a.raw"],
        vec!["create", "-f", "raw", "-o", "foo=bar", "x.raw", "1M"],
        vec!["create", "-f", "raw", "-o", "nocow=maybe", "x.raw", "1M"],
        vec![
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=bogus",
            "x.raw",
            "1M",
        ],
        vec![
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "x.raw",
            "1M",
        ],
        vec!["create", "-f", "raw", "-b", "a.raw", "x.raw", "1M"],
        vec!["measure", "-O", "raw", "-o", "foo=bar", "--size", "1M"],
        vec!["measure", "-O", "raw"],
        vec!["measure", "-O", "raw", "--size", "1M", "a.raw"],
        vec!["info"],
        vec!["info", "a.raw", "a.raw"],
        vec!["create", "-f", "raw", "x.raw", "1M", "extra"],
        vec!["compare", "a.raw"],
        // A missing value: getopt names a short option by its letter, a long one by name.
        vec!["convert", "-f", "raw", "-O"],
        vec!["bench", "-c"],
        vec!["info", "-qf"],
        vec!["map", "--start-offset"],
    ] {
        assert_eq!(b.check(&args).code, 1, "{args:?}");
    }
}

#[test]
fn unknown_formats() {
    let b = Bench::new("err-fmt");
    for args in [
        vec!["info", "-f", "qcow9", "a.raw"],
        vec!["map", "-f", "qcow9", "a.raw"],
        vec!["create", "-f", "qcow9", "x.raw", "1M"],
        vec!["measure", "-O", "qcow9", "--size", "1M"],
    ] {
        assert_eq!(b.check(&args).code, 1, "{args:?}");
    }
    assert_eq!(
        b.check(&["compare", "-f", "qcow9", "a.raw", "a.raw"]).code,
        2
    );
}

#[test]
fn raw_images_cannot_be_checked() {
    let b = Bench::new("err-check");
    assert_eq!(b.check(&["check", "a.raw"]).code, 63);
    assert_eq!(
        b.check(&["check", "-f", "raw", "--output=json", "a.raw"])
            .code,
        63
    );
    assert_eq!(b.check(&["check", "-q", "-f", "raw", "a.raw"]).code, 63);
}

#[test]
fn commands_that_do_not_exist() {
    let b = Bench::new("err-cmd");
    // qemu-img's wording in drop-in mode; vdisk's own help otherwise.
    for args in [vec!["bogus"], vec![]] {
        let q = qemu_img(b.scratch.dir(), &args);
        let d = run_with_path(
            b.scratch.dir(),
            b.dropin.parent(),
            Path::new("qemu-img"),
            &args,
        );
        assert_eq!(
            (d.code, &d.stdout, &d.stderr),
            (q.code, &q.stdout, &q.stderr),
            "{args:?}"
        );
        let v = run_with_path(b.scratch.dir(), None, Path::new(VDISK), &args);
        assert_eq!(v.code, q.code, "{args:?}");
    }
}

/// qemu-img reads its options with getopt: a repeated option overrides the earlier one, and
/// the accumulating ones (`-o`) collect. Scripts that append options rely on both.
#[test]
fn repeated_options_override_like_getopt() {
    let b = Bench::new("err-repeat");
    for args in [
        vec!["info", "-f", "qcow2", "-f", "raw", "a.raw"],
        vec!["info", "--output=human", "--output=json", "a.raw"],
        vec!["info", "-U", "-U", "a.raw"],
        vec!["map", "-f", "raw", "-f", "raw", "--output=json", "a.raw"],
        vec!["compare", "-f", "raw", "-f", "raw", "a.raw", "a.raw"],
        vec![
            "measure", "-O", "raw", "-O", "qcow2", "--size", "1M", "--size", "2M",
        ],
        vec!["convert", "-O", "qcow2", "-O", "raw", "a.raw", "b.raw"],
        vec!["create", "-f", "qcow2", "-f", "raw", "c.raw", "1M"],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "lazy_refcounts=on",
            "d.qcow2",
            "1M",
        ],
        vec!["resize", "-q", "-q", "-f", "raw", "a.raw", "2M"],
    ] {
        assert_eq!(b.check(&args).code, 0, "{args:?}");
    }
    // Raw has no checks (exit 63 in both tools); the doubled -q must not be the failure.
    let r = b.check(&["check", "-q", "-q", "-f", "raw", "a.raw"]);
    assert_eq!(r.code, 63, "{r:?}");
}
