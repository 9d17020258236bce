//! Real qcow2 images from other tools and eras (the shared fixtures folder): every guest
//! byte read through our driver must hash to the golden sha256 recorded in MANIFEST.json,
//! and our `check` must count what `qemu-img check` counted.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};
use vdisk_block::{BlockDev, Format, RepairMode};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    let dir = if dir.exists() {
        dir
    } else {
        PathBuf::from("/work/shared/fixtures")
    };
    dir.join("MANIFEST.json").exists().then_some(dir)
}

/// Decompresses a gzip file, leaving runs of zeroes as holes so a 512 MiB data file costs
/// only what it holds.
fn gunzip_sparse(from: &Path, to: &Path) {
    let input = std::fs::File::open(from).expect("open gz");
    let mut gz = flate2::read::GzDecoder::new(std::io::BufReader::new(input));
    let mut out = std::fs::File::create(to).expect("create");
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = gz.read(&mut buf[filled..]).expect("gunzip");
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(filled as i64)).expect("seek");
        } else {
            out.write_all(&buf[..filled]).expect("write");
        }
        len += filled as u64;
    }
    out.set_len(len).expect("set length");
}

fn materialize(fixtures: &Path, entry: &serde_json::Value, into: &Path) {
    for f in entry["files"].as_array().expect("files") {
        let stored = fixtures.join(f["stored"].as_str().expect("stored"));
        let target = into.join(f["name"].as_str().expect("name"));
        match f["mode"].as_str().expect("mode") {
            "original-gz-blob" => gunzip_sparse(&stored, &target),
            "xz-by-helper" => {
                let out = std::process::Command::new("xz")
                    .arg("-dc")
                    .arg(&stored)
                    .output()
                    .expect("run xz");
                assert!(out.status.success(), "xz -dc {}", stored.display());
                std::fs::write(&target, out.stdout).expect("write");
            }
            _ => {
                std::fs::copy(&stored, &target).expect("copy fixture");
            }
        }
    }
}

fn guest_sha256(dev: &dyn BlockDev) -> String {
    let mut hasher = Sha256::new();
    let size = dev.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        // Skip reading ranges that are known zeroes; hashing them is unavoidable.
        let st = dev.block_status(pos, n as u64).expect("block status");
        let chunk = &mut buf[..n];
        if st.zero && !st.data && st.len >= n as u64 {
            chunk.fill(0);
        } else {
            dev.read_at(chunk, pos).expect("read");
        }
        hasher.update(&chunk[..]);
        pos += n as u64;
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn golden_guest_contents_and_check_counts() {
    let Some(dir) = fixtures() else {
        eprintln!("SKIPPED: the shared fixtures folder is absent; no fixture was checked");
        return;
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).expect("manifest"))
            .expect("manifest json");
    let mut checked = 0;
    for (id, entry) in manifest.as_object().expect("object") {
        if !id.starts_with("qcow2/") {
            continue;
        }
        let s = Scratch::new("fixture");
        materialize(&dir, entry, &s.0);
        let main = s.path(entry["main"].as_str().expect("main"));
        let dev = Qcow2Image::open(&main, &options()).unwrap_or_else(|e| panic!("{id}: open: {e}"));
        let golden = &entry["raw"];
        assert_eq!(dev.size(), golden[1].as_u64().expect("len"), "{id}: size");
        assert_eq!(
            guest_sha256(&dev),
            golden[0].as_str().expect("sha"),
            "{id}: guest contents"
        );
        let report = Qcow2Format
            .check(&main, &options(), RepairMode::None)
            .unwrap_or_else(|e| panic!("{id}: check: {e}"));
        let q = &entry["check_json"];
        let field = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        assert_eq!(report.corruptions, field("corruptions"), "{id}: {report:?}");
        assert_eq!(report.leaks, field("leaks"), "{id}: {report:?}");
        assert_eq!(
            report.image_end_offset,
            Some(field("image-end-offset")),
            "{id}"
        );
        assert_eq!(report.total_clusters, Some(field("total-clusters")), "{id}");
        assert_eq!(
            report.allocated_clusters,
            Some(field("allocated-clusters")),
            "{id}"
        );
        assert_eq!(
            report.fragmented_clusters,
            Some(field("fragmented-clusters")),
            "{id}"
        );
        assert_eq!(
            report.compressed_clusters,
            Some(field("compressed-clusters")),
            "{id}"
        );
        checked += 1;
    }
    assert_eq!(
        checked, 11,
        "every qcow2 fixture of the manifest was checked"
    );
}

#[test]
fn malformed_fixtures_are_refused() {
    let Some(dir) = fixtures() else {
        eprintln!("SKIPPED: the shared fixtures folder is absent");
        return;
    };
    let mut refused = 0;
    let mut not_claimed = 0;
    for entry in std::fs::read_dir(dir.join("malformed")).expect("malformed dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.contains("qcow") {
            continue;
        }
        let header = std::fs::read(&path).expect("read");
        if Qcow2Format.probe(&header[..header.len().min(4096)], &path) == 0 {
            // Some are other formats under a qcow2 name (VMDK, qcow version 1): not ours
            // to claim, and the probe did not.
            not_claimed += 1;
            continue;
        }
        let result = Qcow2Image::open(&path, &options()).and_then(|img| {
            // Images that open must still fail cleanly somewhere, or read consistently.
            let mut buf = vec![0u8; 65536.min(img.size() as usize)];
            img.read_at(&mut buf, 0)?;
            Qcow2Format.check(&path, &options(), RepairMode::None)
        });
        match result {
            Err(e) => eprintln!("{name}: refused: {e}"),
            Ok(report) => assert!(
                report.corruptions > 0 || report.check_errors > 0,
                "{name}: accepted without complaint: {report:?}"
            ),
        }
        refused += 1;
    }
    assert!(
        refused >= 1 && not_claimed >= 1,
        "{refused} refused, {not_claimed} not claimed"
    );
}
