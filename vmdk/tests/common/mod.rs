//! Helpers shared by the integration tests: scratch folders, whole-disk hashing, fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};
use vdisk_block::BlockDev;

/// A scratch folder removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vdisk-vmdk-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every guest byte of `dev`, read in 1 MiB pieces.
pub fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut out = vec![0u8; dev.size() as usize];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        dev.read_at(chunk, (i as u64) << 20).expect("read");
    }
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The shared fixtures folder, or `None` (with a loud note) when this machine lacks it.
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("VDISK_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    if dir.join("MANIFEST.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: shared fixtures not found at {} (set VDISK_SHARED_FIXTURES)",
            dir.display()
        );
        None
    }
}

/// Lays out the files of manifest entry `entry` under their own names in `dest`,
/// decompressing what is stored compressed; returns the main file.
pub fn lay_out(fixtures: &Path, entry: &serde_json::Value, dest: &Path) -> PathBuf {
    use std::io::Read;
    for file in entry["files"].as_array().expect("files") {
        let stored = fixtures.join(file["stored"].as_str().expect("stored"));
        let name = file["name"].as_str().expect("name");
        let bytes = std::fs::read(&stored).expect("read fixture");
        let bytes = if stored.extension().is_some_and(|e| e == "gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .expect("gunzip");
            out
        } else {
            bytes
        };
        assert_eq!(
            sha256_hex(&bytes),
            file["sha256"].as_str().expect("sha256"),
            "{name}"
        );
        std::fs::write(dest.join(name), bytes).expect("write fixture copy");
    }
    dest.join(entry["main"].as_str().expect("main"))
}

/// The sha256 of every guest byte of `dev`, read in 1 MiB pieces without holding them all.
pub fn sha256_of(dev: &dyn BlockDev) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < dev.size() {
        let n = (dev.size() - at).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], at).expect("read");
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The sha256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
