//! `BlockDev::format_specific` of a VMDK is what `qemu-img info --output=json` prints under
//! `format-specific`: same keys, same values, same key order (the CLI prints them in the
//! order given), for every sub-format qemu-img and vdisk create and every shared fixture.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures_dir, lay_out, Scratch};
use serde_json::Value;
use vdisk_block::dev::{FormatSpecific, InfoValue};
use vdisk_block::{CreateOptions, Format, OpenOptions};
use vdisk_vmdk::VmdkFormat;

fn value_json(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => Value::from(*b),
        InfoValue::Int(n) => Value::from(*n),
        InfoValue::UInt(n) => Value::from(*n),
        InfoValue::Text(t) => Value::from(t.as_str()),
        InfoValue::List(items) => Value::Array(items.iter().map(value_json).collect()),
        InfoValue::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect(),
        ),
    }
}

/// The section as qemu's JSON shapes it: `{"type": .., "data": {..}}`.
fn section_json(fs: &FormatSpecific) -> Value {
    let data = InfoValue::Map(fs.data.clone());
    serde_json::json!({ "type": fs.kind, "data": value_json(&data) })
}

/// qemu-img's `format-specific` for `image`, keys in the order it printed them.
fn qemu_section(image: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vmdk"])
        .arg(image)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).expect("qemu-img json");
    info["format-specific"].clone()
}

/// Compares the serialised texts, not the values: `Value`'s equality ignores key order,
/// and the order is part of what the CLI must reproduce. The parent of a delta is not
/// opened: the section describes the named image alone.
fn assert_matches_qemu(image: &Path, what: &str) {
    let options = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    let dev = VmdkFormat
        .open(image, &options)
        .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let ours = dev
        .format_specific()
        .unwrap_or_else(|e| panic!("{what}: format_specific: {e}"))
        .unwrap_or_else(|| panic!("{what}: no format-specific section"));
    let ours = serde_json::to_string(&section_json(&ours)).expect("json");
    let theirs = serde_json::to_string(&qemu_section(image)).expect("json");
    assert_eq!(ours, theirs, "{what}");
}

fn qemu_create(scratch: &Scratch, name: &str, options: &str, size: &str) -> PathBuf {
    let image = scratch.path(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk", "-o", options])
        .arg(&image)
        .arg(size)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

#[test]
fn qemu_made_sub_formats_match_qemu_img_info() {
    let scratch = Scratch::new("info-qemu");
    for sub in SUBFORMATS {
        // 3 GiB: the split sub-formats get two extents of different sizes.
        let image = qemu_create(
            &scratch,
            &format!("{sub}.vmdk"),
            &format!("subformat={sub}"),
            "3G",
        );
        assert_matches_qemu(&image, sub);
    }
    let zeroed = qemu_create(
        &scratch,
        "zeroed.vmdk",
        "subformat=monolithicSparse,zeroed_grain=on",
        "1M",
    );
    assert_matches_qemu(&zeroed, "zeroed_grain");
    // A delta: its parent-cid is the parent's CID, not 0xffffffff.
    let parent = qemu_create(&scratch, "parent.vmdk", "subformat=monolithicSparse", "64M");
    let child = qemu_create(
        &scratch,
        "child.vmdk",
        &format!("backing_file={},backing_fmt=vmdk", parent.display()),
        "64M",
    );
    assert_matches_qemu(&child, "delta");
}

#[test]
fn vdisk_made_sub_formats_match_qemu_img_info() {
    let scratch = Scratch::new("info-vdisk");
    for sub in SUBFORMATS {
        let image = scratch.path(&format!("{sub}.vmdk"));
        let options = CreateOptions {
            size: 3 << 30,
            options: CreateOptions::parse_options(&format!("subformat={sub}")).expect("options"),
        };
        VmdkFormat
            .create(&image, options)
            .unwrap_or_else(|e| panic!("{sub}: create: {e}"));
        assert_matches_qemu(&image, sub);
    }
}

#[test]
fn fixtures_match_qemu_img_info() {
    let Some(dir) = fixtures_dir() else { return };
    let text = std::fs::read_to_string(dir.join("MANIFEST.json")).expect("manifest");
    let manifest: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("json");
    let mut checked = 0;
    for (key, entry) in &manifest {
        if !key.starts_with("vmdk/") {
            continue;
        }
        let scratch = Scratch::new("info-fixture");
        let main = lay_out(&dir, entry, &scratch.0);
        if entry["entry"]["sesparse"].as_bool() == Some(true) {
            // A bare seSparse extent: qemu reads it only behind a descriptor.
            let image = scratch.path("sesparse-disk.vmdk");
            let name = main.file_name().expect("name").to_string_lossy();
            std::fs::write(
                &image,
                format!(
                    "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"seSparse\"\n\n\
# Extent description\nRW 1048576 SESPARSE \"{name}\"\n\n#DDB\n"
                ),
            )
            .expect("descriptor");
            assert_matches_qemu(&image, key);
        } else {
            assert_matches_qemu(&main, key);
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} vmdk fixtures were checked");
}

/// The CLI prints a relative name as the user typed it; qemu joins an extent's name to the
/// descriptor's folder as typed, so a relative open gives relative extent names.
#[test]
fn relative_paths_are_kept_as_given() {
    let scratch = Scratch::new("info-relative");
    qemu_create(
        &scratch,
        "split.vmdk",
        "subformat=twoGbMaxExtentSparse",
        "3G",
    );
    let cwd = std::env::current_dir().expect("cwd");
    let rel = pathdiff(&scratch.path("split.vmdk"), &cwd);
    let dev = VmdkFormat
        .open(&rel, &OpenOptions::read_only())
        .expect("open");
    let fs = dev.format_specific().expect("fs").expect("some");
    let json = section_json(&fs);
    let first = json["data"]["extents"][0]["filename"]
        .as_str()
        .expect("filename");
    assert_eq!(
        Path::new(first),
        rel.parent().expect("parent").join("split-s001.vmdk")
    );
}

/// `target` relative to `base` by climbing to the root: enough for a test, both absolute.
fn pathdiff(target: &Path, base: &Path) -> PathBuf {
    let mut rel = PathBuf::new();
    for _ in base.components().skip(1) {
        rel.push("..");
    }
    rel.join(target.strip_prefix("/").expect("absolute"))
}
