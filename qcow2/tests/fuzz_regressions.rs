//! Regressions found by the cargo-fuzz targets in `fuzz/` (see fuzz/README.md).

use std::path::Path;
use std::process::Command;

use vdisk_block::testing::TempDir;
use vdisk_block::{EngineChoice, FollowPolicy, OpenOptions};
use vdisk_qcow2::Qcow2Image;

fn qemu(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (the oracle must be installed): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// qcow2_snapshot_bitmap: a snapshot whose tree names a cluster far past the end of the file
/// made `snapshot_apply` raise refcounts out there, growing the refcount structures (and the
/// file, to 4 GiB) before it failed; `check` then walked every cluster of the grown file.
#[test]
fn applying_a_snapshot_whose_tree_points_past_the_file_changes_nothing() {
    let dir = TempDir::new("qcow2-fuzz-apply").expect("tmp");
    let path = dir.join("wild.qcow2");
    let p = path.to_string_lossy().into_owned();
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            &p,
            "1M",
        ],
    );
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 512", &p]);
    qemu("qemu-img", &["snapshot", "-c", "s", &p]);
    // The snapshot's (shared) L2 table gains an entry for a cluster 1 TiB in.
    let mut bytes = std::fs::read(&path).expect("read");
    let snapshots = be64(&bytes, 64) as usize;
    let l1 = be64(&bytes, snapshots) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    bytes[l2 + 8..l2 + 16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&path, &bytes).expect("write");

    let options = OpenOptions {
        writable: true,
        policy: FollowPolicy::Nothing,
        no_backing: true,
        engine: EngineChoice::Sync,
        ..OpenOptions::default()
    };
    let image = Qcow2Image::open(Path::new(&path), &options).expect("open");
    let err = image.snapshot_apply("s").expect_err("a wild tree");
    assert!(err.message().contains("past the end of the file"), "{err}");
    drop(image);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        bytes.len() as u64
    );
}
