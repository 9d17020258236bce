//! Every VHDX and VHD image of the shared fixture manifest, written by Hyper-V, Windows,
//! FreeBSD mkimg and qemu, reads to exactly the sha256 of its guest contents; the orphan
//! differencing images fail naming their missing parent and still report their locator.

mod common;

use std::path::Path;

use common::json::Json;
use common::{fixtures, must_fail, sha256_of, stage, Scratch};
use vdisk_block::{ErrorKind, Format, OpenOptions};
use vdisk_vhdx::{VhdxFormat, VpcFormat};

fn driver(kind: &str) -> &'static dyn Format {
    if kind == "vhdx" {
        &VhdxFormat
    } else {
        &VpcFormat
    }
}

/// Stages every file of `entry` into `dir` under its expected name; returns the main file.
fn stage_entry(fixtures: &Path, entry: &Json, dir: &Scratch) -> std::path::PathBuf {
    for f in entry.get("files").map(Json::items).unwrap_or_default() {
        let stored = f.get("stored").and_then(Json::as_str).expect("stored");
        let name = f.get("name").and_then(Json::as_str).expect("name");
        stage(&fixtures.join(stored), &dir.path(name));
    }
    dir.path(entry.get("main").and_then(Json::as_str).expect("main"))
}

#[test]
fn every_manifest_image_reads_to_its_golden_checksum() {
    let Some(fixtures) = fixtures() else { return };
    let text = std::fs::read_to_string(fixtures.join("MANIFEST.json")).expect("manifest");
    let manifest = Json::parse(&text);
    let Json::Obj(entries) = &manifest else {
        panic!("manifest is not an object")
    };
    let mut checked = 0;
    let mut orphans = 0;
    for (id, entry) in entries {
        let kind = id.split('/').next().unwrap_or_default();
        if kind != "vhdx" && kind != "vhd" {
            continue;
        }
        let dir = Scratch::new("golden");
        let main = stage_entry(&fixtures, entry, &dir);
        let fmt = driver(kind);
        match entry.get("raw").map(Json::items) {
            Some([sha, len]) => {
                let img = fmt
                    .open(&main, &OpenOptions::read_only())
                    .unwrap_or_else(|e| panic!("{id}: open failed: {e}"));
                assert_eq!(img.size(), len.as_u64().expect("len"), "{id}: size");
                assert_eq!(
                    sha256_of(img.as_ref()),
                    sha.as_str().expect("sha"),
                    "{id}: guest contents differ from the golden"
                );
                checked += 1;
            }
            _ if id.contains("orphan") => {
                let err = must_fail(
                    fmt.open(&main, &OpenOptions::read_only()),
                    "an orphan differencing image must not open",
                );
                assert_eq!(err.kind(), ErrorKind::NotFound, "{id}: {err}");
                let shown = OpenOptions {
                    no_backing: true,
                    ..OpenOptions::read_only()
                };
                let img = fmt
                    .open(&main, &shown)
                    .unwrap_or_else(|e| panic!("{id}: open without backing failed: {e}"));
                let info = img.info().expect("info");
                let parent = info
                    .backing_filename
                    .expect("the parent locator is reported");
                let name = parent.rsplit(['\\', '/']).next().expect("file name");
                assert!(
                    err.to_string().contains(name),
                    "{id}: error '{err}' does not name the parent '{parent}'"
                );
                eprintln!("{id}: parent '{parent}'; open error: {err}");
                orphans += 1;
            }
            _ => panic!("{id}: no golden and not an orphan: extend this test"),
        }
    }
    assert!(checked >= 9, "only {checked} goldens checked");
    assert_eq!(orphans, 2);
}

#[test]
fn malformed_vhds_are_refused_with_the_checksum_error() {
    let Some(fixtures) = fixtures() else { return };
    for name in [
        "dfvfs-doctored-vhd-dynamic--image.vhd",
        "dfvfs-doctored-vhd-differential--image-differential.vhd",
    ] {
        let err = must_fail(
            VpcFormat.open(
                &fixtures.join("malformed").join(name),
                &OpenOptions::read_only(),
            ),
            "a doctored VHD must be refused",
        );
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        assert!(err.to_string().contains("checksum"), "{name}: {err}");
    }
}
