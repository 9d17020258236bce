//! Helpers shared by the qcow2 integration tests: scratch folders, the system qemu-img /
//! qemu-io as oracle, and a tiny opener for backing files (the registry lives in a crate
//! above this one).

#![allow(dead_code)]

pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vdisk_block::format::ImageOpener;
use vdisk_block::{BlockDev, FollowPolicy, Format, OpenOptions, RawFormat, Result};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

/// A scratch folder removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty folder unique to this process and call.
    pub fn new(name: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vdisk-qcow2-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch folder");
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

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-img, failing the test if it fails.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands on a qcow2 image.
pub fn qemu_io(image: &Path, commands: &[&str]) {
    let image = image.to_str().expect("utf-8 path");
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {commands:?}: {out}"
    );
}

/// The guest contents of `image` as qemu-img sees them.
pub fn qemu_contents(image: &Path, scratch: &Scratch) -> Vec<u8> {
    let raw = scratch.path("oracle.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().expect("utf-8"),
        raw.to_str().expect("utf-8"),
    ]);
    let bytes = std::fs::read(&raw).expect("read converted image");
    let _ = std::fs::remove_file(&raw);
    bytes
}

/// Opens backing files as qcow2 or raw (by recorded format, or by magic).
pub struct TestOpener;

impl ImageOpener for TestOpener {
    fn open_image(
        &self,
        path: &Path,
        format: Option<&str>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDev>> {
        let is_qcow2 = match format {
            Some(f) => f == "qcow2",
            None => std::fs::read(path)
                .map(|b| b.starts_with(b"QFI\xfb"))
                .unwrap_or(false),
        };
        if is_qcow2 {
            Qcow2Format.open(path, options)
        } else {
            RawFormat.open(path, options)
        }
    }
}

/// Read-only options that may follow backing files within the image's folder.
pub fn options() -> OpenOptions {
    OpenOptions {
        opener: Some(Arc::new(TestOpener)),
        policy: FollowPolicy::SameFolder,
        ..OpenOptions::read_only()
    }
}

/// Opens `path` with [`options`].
pub fn open(path: &Path) -> Qcow2Image {
    Qcow2Image::open(path, &options()).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads the whole device in uneven chunks (so runs start and end mid-cluster).
pub fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let size = dev.size();
    let mut out = vec![0u8; size as usize];
    let mut pos = 0u64;
    let mut step = 12_345u64;
    while pos < size {
        let n = step.min(size - pos);
        dev.read_at(&mut out[pos as usize..(pos + n) as usize], pos)
            .unwrap_or_else(|e| panic!("read {n} bytes at {pos}: {e}"));
        pos += n;
        step = step * 7 % 300_007 + 1;
    }
    out
}

/// Asserts two byte strings are equal, naming the first difference.
pub fn assert_same(ours: &[u8], oracle: &[u8], what: &str) {
    assert_eq!(ours.len(), oracle.len(), "{what}: length differs");
    if let Some(at) = ours.iter().zip(oracle).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: ours {:#04x}, qemu {:#04x}",
            ours[at], oracle[at]
        );
    }
}

/// Compares our block status with `qemu-img map --output=json` for an image without backing.
pub fn assert_map_matches(image: &Path) {
    let dev = open(image);
    let json = qemu_img(&["map", "--output=json", image.to_str().expect("utf-8")]);
    let extents: serde_json::Value = serde_json::from_str(&json).expect("map json");
    for ext in extents.as_array().expect("array") {
        let start = ext["start"].as_u64().expect("start");
        let length = ext["length"].as_u64().expect("length");
        let mut pos = start;
        while pos < start + length {
            let st = dev
                .block_status(pos, start + length - pos)
                .expect("block status");
            let what = format!("{} at {pos}: ours {st:?}, qemu {ext}", image.display());
            assert_eq!(
                st.allocated,
                ext["present"].as_bool().expect("present"),
                "{what}"
            );
            assert_eq!(st.data, ext["data"].as_bool().expect("data"), "{what}");
            assert_eq!(st.zero, ext["zero"].as_bool().expect("zero"), "{what}");
            assert_eq!(
                st.compressed,
                ext["compressed"].as_bool().expect("c"),
                "{what}"
            );
            if let (Some(off), true) = (ext.get("offset").and_then(|o| o.as_u64()), st.data) {
                let host = st.host.as_ref().expect("host offset").offset;
                assert_eq!(host, off + (pos - start), "{what}");
            }
            pos += st.len;
        }
    }
}
