//! Helpers shared by the cross-crate tests: scratch folders, running a tool in a folder, and
//! running the vdisk binary under the name `qemu-img` (drop-in mode).
//!
//! This is a library, so it cannot see `CARGO_BIN_EXE_vdisk-under-test`; test files pass the
//! binary's path in.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A temporary folder, removed when dropped.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty folder under the system temp dir, unique to this process and `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vdisk-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// The folder itself.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// A path inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sub-folder, created if needed.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::create_dir_all(&p).expect("create sub folder");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Read-only folders made by a test must become writable again to be removed.
        if let Ok(entries) = fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = make_writable(&e.path());
            }
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn make_writable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path)?;
    let mode = meta.permissions().mode() | 0o700;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if meta.is_dir() {
        for e in fs::read_dir(path)?.flatten() {
            let _ = make_writable(&e.path());
        }
    }
    Ok(())
}

/// What a finished command printed and returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
}

/// Runs `program args` with `dir` as the working folder.
pub fn run_in(dir: &Path, program: &Path, args: &[&str]) -> Run {
    run_with_path(dir, None, program, args)
}

/// Runs `program args` in `dir`, with `bin` (if any) searched first for programs named
/// without a folder. qemu-img repeats its name as invoked in some messages, so a drop-in
/// test runs both tools by the bare name `qemu-img`.
pub fn run_with_path(dir: &Path, bin: Option<&Path>, program: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(program);
    if let Some(bin) = bin {
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.to_path_buf()];
        paths.extend(std::env::split_paths(&old));
        cmd.env("PATH", std::env::join_paths(paths).expect("join PATH"));
    }
    let out = cmd
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}

/// Runs `program args` twice by the bare name lookup of PATH: in the fresh folder `q` of `s`
/// with the system qemu-img, and in `d` with the drop-in link `dropin` first in PATH, each
/// folder set up by `prepare` first. Returns (qemu-img's run, vdisk's run).
pub fn run_twins(
    s: &Scratch,
    dropin: &Path,
    program: &Path,
    args: &[&str],
    prepare: impl Fn(&Path),
) -> (Run, Run) {
    let mut runs = Vec::new();
    for (dir, bin) in [("q", None), ("d", dropin.parent())] {
        let d = s.sub(dir);
        let _ = fs::remove_dir_all(&d);
        let d = s.sub(dir);
        prepare(&d);
        runs.push(run_with_path(&d, bin, program, args));
    }
    let d = runs.pop().expect("drop-in run");
    let q = runs.pop().expect("qemu run");
    (q, d)
}

/// Runs the system qemu-img (the oracle) in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, Path::new("qemu-img"), args)
}

/// Runs the system qemu-io on a raw image in `dir`, each of `cmds` as one `-c`, and fails
/// the test if it does not succeed.
pub fn qemu_io_raw(dir: &Path, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    let r = run_in(dir, Path::new("qemu-io"), &args);
    assert_eq!(r.code, 0, "qemu-io {args:?} failed: {}", r.stderr);
    assert!(
        !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io {args:?}: {r:?}"
    );
}

/// Makes `bin_dir/qemu-img` a link to the vdisk binary, so running it selects drop-in mode.
pub fn dropin_link(bin_dir: &Path, vdisk: &Path) -> PathBuf {
    fs::create_dir_all(bin_dir).expect("create bin dir");
    let link = bin_dir.join("qemu-img");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(vdisk, &link).expect("link vdisk as qemu-img");
    link
}

/// Length and allocated bytes (`st_blocks * 512`) of a file.
pub fn size_and_allocation(path: &Path) -> (u64, u64) {
    let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.len(), m.blocks() * 512)
}

/// True when the process runs as root (permission bits then do not stop it).
pub fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Flushes `path` to disk, so the file system's allocation (and `st_blocks`) is settled
/// before two tools are asked about it: ext4 may add an extent-tree block when delayed
/// allocation is written back, which would otherwise change the answer between runs.
pub fn settle(path: &Path) {
    let file = fs::OpenOptions::new()
        .read(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.sync_all()
        .unwrap_or_else(|e| panic!("sync {}: {e}", path.display()));
}
