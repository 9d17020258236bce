//! `vdisk convert` on raw images, checked against the system qemu-img as the oracle.
//!
//! Every case converts the same input with both tools and requires `qemu-img compare` to
//! call the results identical; where allocation matters, the targets' allocated sizes
//! (st_blocks) must agree within 1% (plus one 4 KiB block of file-system bookkeeping, which
//! ext4's delayed allocation accounts differently between two otherwise equal files).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A temporary folder removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vdisk-convert-raw-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic generator (xorshift64*), so inputs are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes a raw image of `size` bytes mixing holes, zero blocks written as data, random data,
/// compressible data, data with short zero gaps, at sizes from 512 bytes to 3 MiB, so the
/// extents are not all 4 KiB aligned.
fn mixed_image(path: &Path, size: u64, seed: u64) {
    let file = File::create(path).expect("create input");
    file.set_len(size).expect("size input");
    let mut rng = Rng(seed | 1);
    let lengths = [
        512,
        1536,
        4 * KIB,
        8 * KIB,
        12 * KIB,
        64 * KIB,
        MIB,
        3 * MIB,
    ];
    let mut offset = 0u64;
    while offset < size {
        let len = rng.pick(&lengths).min(size - offset);
        let mut buf = vec![0u8; len as usize];
        match rng.next() % 6 {
            0 => {} // hole: leave unwritten
            1 => file.write_all_at(&buf, offset).expect("write zero data"),
            2 | 3 => {
                rng.fill(&mut buf);
                file.write_all_at(&buf, offset).expect("write random data");
            }
            4 => {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (i % 251) as u8 | 1;
                }
                file.write_all_at(&buf, offset).expect("write pattern");
            }
            _ => {
                // Data with zero gaps shorter and longer than 4 KiB.
                rng.fill(&mut buf);
                let mut at = 0usize;
                while at < buf.len() {
                    let gap = rng.pick(&[100usize, 2048, 4096, 9000]);
                    let end = (at + gap).min(buf.len());
                    buf[at..end].fill(0);
                    at = end + rng.pick(&[512usize, 4096, 20000]);
                }
                file.write_all_at(&buf, offset).expect("write gappy data");
            }
        }
        offset += len;
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Runs `vdisk convert ARGS` and requires success.
fn vdisk_convert(args: &[&str]) {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    let out = run(VDISK, &all);
    assert!(
        out.status.success(),
        "vdisk convert {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `qemu-img convert ARGS` and requires success.
fn qemu_convert(args: &[&str]) {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    let out = run("qemu-img", &all);
    assert!(
        out.status.success(),
        "qemu-img convert {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requires `qemu-img compare` to find the two raw images identical.
fn assert_identical(a: &Path, b: &Path) {
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(a), s(b)],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

/// Requires the allocated sizes of two files to agree within 1% (+ 4 KiB, see the top).
fn assert_alloc_close(ours: &Path, theirs: &Path) {
    let (a, b) = (allocated(ours), allocated(theirs));
    let slack = a.max(b) / 100 + 4 * KIB;
    assert!(
        a.abs_diff(b) <= slack,
        "allocated size of {} is {a} bytes, qemu-img's {} is {b} bytes",
        ours.display(),
        theirs.display()
    );
}

/// Converts `input` with both tools using `extra` options and checks contents and allocation.
fn both_agree(dir: &Scratch, input: &Path, extra: &[&str], tag: &str) {
    let ours = dir.path(&format!("vdisk-{tag}.raw"));
    let theirs = dir.path(&format!("qemu-{tag}.raw"));
    let mut args: Vec<&str> = extra.to_vec();
    args.extend_from_slice(&["-f", "raw", "-O", "raw", s(input), s(&ours)]);
    vdisk_convert(&args);
    let mut args: Vec<&str> = extra.to_vec();
    args.extend_from_slice(&["-f", "raw", "-O", "raw", s(input), s(&theirs)]);
    qemu_convert(&args);
    assert_identical(&ours, input);
    assert_identical(&ours, &theirs);
    assert_alloc_close(&ours, &theirs);
    assert_same_length(&ours, &theirs);
}

/// qemu-img sees raw files padded to whole 512-byte sectors; so must the target's length.
fn assert_same_length(ours: &Path, theirs: &Path) {
    let len = |p: &Path| fs::metadata(p).expect("stat").len();
    assert_eq!(len(ours), len(theirs), "target lengths differ");
}

/// The bytes of `path` followed by zeroes up to a whole sector.
fn padded_contents(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).expect("read input");
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    bytes
}

#[test]
fn mixed_sparse_image_matches_qemu_img() {
    let dir = Scratch::new("mixed");
    let input = dir.path("in.raw");
    // Not a multiple of 4 KiB or even 512: the tail is a partial block.
    mixed_image(&input, 24 * MIB + 1234, 7);
    both_agree(&dir, &input, &[], "default");
    // The result is sparse: holes and zero blocks written as data did not become data.
    assert!(allocated(&dir.path("vdisk-default.raw")) < allocated(&input));
}

#[test]
fn sparse_size_options_match_qemu_img() {
    let dir = Scratch::new("sparse");
    let input = dir.path("in.raw");
    mixed_image(&input, 16 * MIB, 11);
    both_agree(&dir, &input, &["-S", "64k"], "s64k");
    both_agree(&dir, &input, &["-S", "512"], "s512");
    // Not a power of two, and larger than the 2 MiB copy chunk.
    both_agree(&dir, &input, &["-S", "12k"], "s12k");
    both_agree(&dir, &input, &["-S", "4M"], "s4m");
    both_agree(&dir, &input, &["-S", "0"], "s0");
    // -S 0: every block of the target is allocated.
    let full = dir.path("vdisk-s0.raw");
    assert!(
        allocated(&full) >= 16 * MIB,
        "-S 0 left holes: {} of {} bytes allocated",
        allocated(&full),
        16 * MIB
    );
}

#[test]
fn tiny_and_empty_images() {
    let dir = Scratch::new("tiny");
    for (i, size) in [0u64, 1, 511, 512, 4095, 4097, 70000]
        .into_iter()
        .enumerate()
    {
        let input = dir.path(&format!("in{i}.raw"));
        mixed_image(&input, size, 3 + i as u64);
        // One non-zero byte at the very end, so the tail cannot be dropped silently.
        if size > 0 {
            let f = OpenOptions::new()
                .write(true)
                .open(&input)
                .expect("open input");
            f.write_all_at(&[0x5a], size - 1).expect("write tail");
        }
        both_agree(&dir, &input, &[], &format!("t{i}"));
        let ours = dir.path(&format!("vdisk-t{i}.raw"));
        let bytes = fs::read(&ours).expect("read output");
        assert_eq!(bytes, padded_contents(&input), "size {size}");
    }
}

#[test]
fn existing_target_is_overwritten_including_zero_ranges() {
    let dir = Scratch::new("existing");
    let input = dir.path("in.raw");
    mixed_image(&input, 12 * MIB + 4096, 21);
    // Targets full of 0xff: every hole and zero run of the source must be zeroed in them.
    let filled = |name: &str, size: u64| -> PathBuf {
        let p = dir.path(name);
        fs::write(&p, vec![0xffu8; size as usize]).expect("fill target");
        p
    };
    let ours = filled("ours.raw", 12 * MIB + 4096);
    let theirs = filled("theirs.raw", 12 * MIB + 4096);
    vdisk_convert(&["-n", "-f", "raw", "-O", "raw", s(&input), s(&ours)]);
    qemu_convert(&["-n", "-f", "raw", "-O", "raw", s(&input), s(&theirs)]);
    assert_identical(&ours, &input);
    assert_identical(&ours, &theirs);
    assert_alloc_close(&ours, &theirs);

    // A larger target keeps its tail; the copied part equals the source.
    let big = filled("big.raw", 14 * MIB);
    vdisk_convert(&["-n", "-f", "raw", "-O", "raw", s(&input), s(&big)]);
    let src = fs::read(&input).expect("read input");
    let out = fs::read(&big).expect("read target");
    assert_eq!(&out[..src.len()], &src[..]);
    assert!(out[src.len()..].iter().all(|&b| b == 0xff));
}

#[test]
fn target_is_zero_skips_zero_ranges_like_qemu_img() {
    let dir = Scratch::new("tiz");
    let input = dir.path("in.raw");
    mixed_image(&input, 10 * MIB, 5);
    // A target that really is zero: the copy is exact.
    let zeroed = dir.path("zeroed.raw");
    File::create(&zeroed)
        .and_then(|f| f.set_len(10 * MIB))
        .expect("create zero target");
    vdisk_convert(&[
        "-n",
        "--target-is-zero",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&input),
        s(&zeroed),
    ]);
    assert_identical(&zeroed, &input);

    // A target that lies: zero ranges are not written, exactly as qemu-img leaves them.
    let ours = dir.path("ours.raw");
    let theirs = dir.path("theirs.raw");
    for p in [&ours, &theirs] {
        fs::write(p, vec![0xeeu8; (10 * MIB) as usize]).expect("fill target");
    }
    let args = |t: &Path| {
        vec![
            "-n".to_string(),
            "--target-is-zero".to_string(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            s(&input).to_string(),
            s(t).to_string(),
        ]
    };
    let a = args(&ours);
    vdisk_convert(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let b = args(&theirs);
    qemu_convert(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_identical(&ours, &theirs);
    let out = fs::read(&ours).expect("read target");
    assert!(
        out.contains(&0xee),
        "zero ranges were written despite --target-is-zero"
    );
}

#[test]
fn two_sources_are_concatenated() {
    let dir = Scratch::new("concat");
    let a = dir.path("a.raw");
    let b = dir.path("b.raw");
    // Unaligned sizes: qemu-img pads each source to whole sectors, and so must we.
    mixed_image(&a, 5 * MIB + 1000, 31);
    mixed_image(&b, 3 * MIB + 700, 32);
    for (p, size) in [(&a, 5 * MIB + 1000), (&b, 3 * MIB + 700)] {
        let f = OpenOptions::new().write(true).open(p).expect("open input");
        f.write_all_at(&[0x77], size - 1).expect("write tail");
    }
    let ours = dir.path("ours.raw");
    let theirs = dir.path("theirs.raw");
    vdisk_convert(&["-f", "raw", s(&a), s(&b), s(&ours)]);
    qemu_convert(&["-f", "raw", s(&a), s(&b), s(&theirs)]);
    assert_identical(&ours, &theirs);
    assert_alloc_close(&ours, &theirs);
    assert_same_length(&ours, &theirs);
    let mut expected = padded_contents(&a);
    expected.extend(padded_contents(&b));
    assert_eq!(fs::read(&ours).expect("read output"), expected);
}

#[test]
fn parallelism_and_write_order_options() {
    let dir = Scratch::new("parallel");
    let input = dir.path("in.raw");
    mixed_image(&input, 20 * MIB + 3000, 41);
    both_agree(&dir, &input, &["-m", "1"], "m1");
    both_agree(&dir, &input, &["-m", "16"], "m16");
    both_agree(&dir, &input, &["-W"], "w");
    both_agree(&dir, &input, &["-m", "16", "-W"], "m16w");
}

#[test]
fn direct_io_cache_modes() {
    let dir = Scratch::new("direct");
    let input = dir.path("in.raw");
    mixed_image(&input, 12 * MIB + 1536, 51);
    both_agree(&dir, &input, &["-t", "none"], "tnone");
    both_agree(&dir, &input, &["-T", "none"], "Tnone");
    both_agree(
        &dir,
        &input,
        &["-t", "none", "-T", "none", "-m", "16"],
        "both",
    );
    both_agree(&dir, &input, &["-t", "unsafe"], "unsafe");
    both_agree(&dir, &input, &["-t", "writethrough"], "wt");
}

/// Runs both tools with the same arguments; both must fail with the same exit code, and
/// vdisk started under the name `qemu-img` (drop-in mode) must print qemu-img's exact
/// message unless `same_words` is false.
fn both_fail(dropin: &Path, args: &[&str], same_words: bool) -> Output {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    let ours = run(VDISK, &all);
    let theirs = run("qemu-img", &all);
    assert!(!theirs.status.success(), "qemu-img accepted {args:?}");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "exit codes for {args:?}: vdisk said {}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let as_qemu = run(s(dropin), &all);
    assert_eq!(as_qemu.status.code(), theirs.status.code());
    if same_words {
        assert_eq!(
            String::from_utf8_lossy(&as_qemu.stderr),
            String::from_utf8_lossy(&theirs.stderr),
            "drop-in wording for {args:?}"
        );
    }
    ours
}

fn stderr_has(out: &Output, text: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(text), "expected {text:?} in {err:?}");
}

#[test]
fn error_cases_match_qemu_img() {
    let dir = Scratch::new("errors");
    let dropin = dir.path("qemu-img");
    std::os::unix::fs::symlink(VDISK, &dropin).expect("drop-in symlink");
    let input = dir.path("in.raw");
    mixed_image(&input, MIB, 61);
    let missing = dir.path("missing.raw");
    let out = dir.path("out.raw");
    let ours = both_fail(&dropin, &["-f", "raw", s(&missing), s(&out)], true);
    stderr_has(&ours, "missing.raw");
    stderr_has(&ours, "No such file or directory");
    assert!(!out.exists(), "a target was created for a missing source");

    let small = dir.path("small.raw");
    File::create(&small)
        .and_then(|f| f.set_len(MIB / 2))
        .expect("create small target");
    let ours = both_fail(&dropin, &["-n", "-f", "raw", s(&input), s(&small)], true);
    stderr_has(&ours, "output file is smaller than input file");

    let no_dir = dir.path("no-such-dir").join("out.raw");
    let ours = both_fail(&dropin, &["-f", "raw", s(&input), s(&no_dir)], true);
    stderr_has(&ours, "No such file or directory");
    // A regular file where a folder should be.
    let under_file = input.join("out.raw");
    both_fail(&dropin, &["-f", "raw", s(&input), s(&under_file)], true);

    let ours = both_fail(&dropin, &["--target-is-zero", s(&input), s(&out)], true);
    stderr_has(&ours, "--target-is-zero requires use of -n flag");
    let ours = both_fail(&dropin, &["-S", "100", s(&input), s(&out)], true);
    stderr_has(&ours, "Invalid buffer size for sparse output");
    both_fail(&dropin, &["-S", "32M", s(&input), s(&out)], true);
    both_fail(&dropin, &["-S", "abc", s(&input), s(&out)], true);
    // We accept up to 64 parallel requests where qemu-img stops at 16: same code, other words.
    both_fail(&dropin, &["-m", "0", s(&input), s(&out)], false);
    both_fail(&dropin, &["-t", "bogus", s(&input), s(&out)], true);
    both_fail(&dropin, &["-O", "bogus", s(&input), s(&out)], true);
    both_fail(&dropin, &[s(&input)], true);
    let ours = both_fail(
        &dropin,
        &["-n", "-o", "preallocation=off", s(&input), s(&small)],
        true,
    );
    stderr_has(&ours, "-o has no effect when skipping image creation");
    both_fail(&dropin, &["-o", "foo=bar", s(&input), s(&out)], true);
    both_fail(
        &dropin,
        &["-o", "preallocation=metadata", s(&input), s(&out)],
        true,
    );
    // -n with a target that does not exist, and a folder given as the source.
    let ours = both_fail(&dropin, &["-n", s(&input), s(&missing)], true);
    stderr_has(&ours, "missing.raw");
    both_fail(&dropin, &[s(&dir.0), s(&out)], true);

    // The target is one of the sources: refused, and the source is left intact.
    let before = fs::read(&input).expect("read input");
    let alias = dir.path("alias.raw");
    fs::hard_link(&input, &alias).expect("hard link");
    both_fail(&dropin, &[s(&input), s(&input)], true);
    both_fail(&dropin, &["-n", s(&input), s(&alias)], true);
    let ours = both_fail(&dropin, &[s(&small), s(&input), s(&alias)], false);
    stderr_has(&ours, "onto itself");
    assert_eq!(fs::read(&input).expect("read input"), before);
}

#[test]
fn progress_without_a_terminal_prints_qemu_percentages() {
    let dir = Scratch::new("progress");
    let input = dir.path("in.raw");
    mixed_image(&input, 8 * MIB, 71);
    let out = dir.path("out.raw");
    let result = run(VDISK, &["convert", "-p", s(&input), s(&out)]);
    assert!(result.status.success());
    let text = String::from_utf8_lossy(&result.stdout);
    assert!(text.starts_with("    (0.00/100%)\r"), "{text:?}");
    assert!(text.ends_with("    (100.00/100%)\r\n"), "{text:?}");
    let quiet = run(VDISK, &["convert", "-p", "-q", s(&input), s(&out)]);
    assert!(quiet.status.success());
    assert!(quiet.stdout.is_empty());
    assert_identical(&out, &input);
}
