//! Shared helpers of the integration tests: scratch folders, the fixture manifest, hashing
//! and the system qemu tools.
#![allow(dead_code)]

pub mod json;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use vdisk_block::BlockDev;

/// A scratch folder removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty folder under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vdisk-vhdx-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// A path inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared fixtures folder, or `None` (with a loud note) when absent.
pub fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    if dir.join("MANIFEST.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "NOTE: shared fixtures not found at {}: golden tests did not run",
            dir.display()
        );
        None
    }
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Copies fixture `stored` to `dest`, decompressing `.gz`, `.xz`, `.bz2` and `.zip`.
pub fn stage(stored: &Path, dest: &Path) {
    let name = stored.to_string_lossy();
    let tool: Option<(&str, &[&str])> = if name.ends_with(".gz") {
        Some(("gzip", &["-dc"]))
    } else if name.ends_with(".xz") {
        Some(("xz", &["-dc"]))
    } else if name.ends_with(".bz2") {
        Some(("bzip2", &["-dc"]))
    } else if name.ends_with(".zip") {
        Some(("unzip", &["-p"]))
    } else {
        None
    };
    match tool {
        None => {
            std::fs::copy(stored, dest).expect("copy fixture");
        }
        Some((prog, args)) => {
            let file = std::fs::File::create(dest).expect("create staged file");
            let status = Command::new(prog)
                .args(args)
                .arg(stored)
                .stdout(file)
                .status()
                .unwrap_or_else(|e| panic!("run {prog}: {e}"));
            assert!(status.success(), "{prog} failed on {}", stored.display());
        }
    }
}

/// The sha256 (hex) of every byte of `dev`, read in 1 MiB pieces.
pub fn sha256_of(dev: &dyn BlockDev) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < dev.size() {
            let n = (dev.size() - off).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], off).expect("read image");
            stdin.write_all(&buf[..n]).expect("hash");
            off += n as u64;
        }
    }
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Every byte of `dev`.
pub fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut out = vec![0u8; dev.size() as usize];
    dev.read_at(&mut out, 0).expect("read image");
    out
}

/// True when the system qemu-img and qemu-io are present.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    if !ok {
        eprintln!("NOTE: qemu-img/qemu-io not installed: interop tests did not run");
    }
    ok
}

/// The error of a result that must have failed.
pub fn must_fail<T>(r: vdisk_block::Result<T>, why: &str) -> vdisk_block::Error {
    match r {
        Ok(_) => panic!("{why}"),
        Err(e) => e,
    }
}
