//! Golden fixtures: VMDKs written by VMware tools, ESXi, qemu-img and third-party converters
//! must read to exactly the guest contents the shared manifest records, and the malformed
//! ones must be refused with a clear error.

mod common;

use std::path::Path;

use common::{fixtures_dir, lay_out, read_all, sha256_hex, sha256_of, Scratch};
use vdisk_block::{BlockDev, Format, OpenOptions};
use vdisk_vmdk::VmdkFormat;

fn manifest(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("MANIFEST.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

#[test]
fn every_vmdk_fixture_reads_to_its_golden_sha256() {
    let Some(dir) = fixtures_dir() else { return };
    let mut checked = 0;
    for (key, entry) in manifest(&dir) {
        if !key.starts_with("vmdk/") || entry["raw"].is_null() {
            continue;
        }
        let scratch = Scratch::new("golden");
        let main = lay_out(&dir, &entry, &scratch.0);
        let dev = VmdkFormat
            .open(&main, &OpenOptions::read_only())
            .unwrap_or_else(|e| panic!("{key}: open failed: {e}"));
        let want_len = entry["raw"][1].as_u64().expect("length");
        assert_eq!(dev.size(), want_len, "{key}: size");
        let data = read_all(dev.as_ref());
        assert_eq!(
            sha256_hex(&data),
            entry["raw"][0].as_str().expect("sha"),
            "{key}: contents"
        );
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} vmdk fixtures were checked");
}

#[test]
fn malformed_vmdk_fixtures_are_refused_clearly() {
    let Some(dir) = fixtures_dir() else { return };
    let mut checked = 0;
    for (key, entry) in manifest(&dir) {
        let is_vmdk = entry["files"][0]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with(".vmdk"));
        if !key.starts_with("malformed/") || !is_vmdk {
            continue;
        }
        let scratch = Scratch::new("malformed");
        let main = lay_out(&dir, &entry, &scratch.0);
        // Opening may succeed when the damage lies in the data; then reading everything
        // must fail instead.
        let outcome = VmdkFormat
            .open(&main, &OpenOptions::read_only())
            .and_then(|dev| {
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0;
                while at < dev.size() {
                    let n = (dev.size() - at).min(buf.len() as u64) as usize;
                    dev.read_at(&mut buf[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            });
        let err = outcome.expect_err(&key);
        eprintln!("{key}: {err}");
        assert!(!err.message().is_empty());
        checked += 1;
    }
    assert_eq!(checked, 2, "expected the govmdk and govmomi fixtures");
}

/// The manifest's seSparse extent is bare (qemu-img would probe it as raw); behind a
/// descriptor of createType seSparse, qemu-img reads it, so qemu-img is the oracle here.
#[test]
fn esxi_sesparse_extent_reads_as_qemu_reads_it() {
    let Some(dir) = fixtures_dir() else { return };
    let manifest = manifest(&dir);
    let entry = &manifest["vmdk/esxi-sesparse-extent"];
    let scratch = Scratch::new("sesparse");
    let extent = lay_out(&dir, entry, &scratch.0);
    let image = scratch.path("sesparse-disk.vmdk");
    std::fs::write(
        &image,
        // The "# Extent description" comment matters to qemu 10.0.2: without it (the extent
        // line right after the blank line) qemu-img counts the extent twice and reads 1 GiB.
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"seSparse\"\n\n\
# Extent description\nRW 1048576 SESPARSE \"sesparse.vmdk\"\n\n#DDB\n",
    )
    .expect("descriptor");
    let dev = VmdkFormat
        .open(&image, &OpenOptions::read_only())
        .expect("open seSparse");
    assert_eq!(dev.size(), 512 << 20);
    // What the image's origin asserts: the first 16 MiB read as 'a'.
    let mut head = vec![0u8; 16 << 20];
    dev.read_at(&mut head, 0).expect("read");
    assert!(head.iter().all(|&b| b == b'a'));
    let st = dev.block_status(0, 32 << 20).expect("status");
    assert!(st.data && st.allocated && st.len == 16 << 20, "{st:?}");
    let st = dev.block_status(16 << 20, 32 << 20).expect("status");
    assert!(!st.allocated && !st.data, "{st:?}");

    let raw = scratch.path("oracle.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "vmdk", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_of(dev.as_ref()), common::sha256_file(&raw));
    drop(extent);
}

fn info_json(v: &vdisk_block::dev::InfoValue) -> serde_json::Value {
    use vdisk_block::dev::InfoValue;
    match v {
        InfoValue::Bool(b) => (*b).into(),
        InfoValue::Int(n) => (*n).into(),
        InfoValue::UInt(n) => (*n).into(),
        InfoValue::Text(t) => t.as_str().into(),
        InfoValue::List(items) => serde_json::Value::Array(items.iter().map(info_json).collect()),
        InfoValue::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), info_json(v)))
                .collect(),
        ),
    }
}

/// `VmdkImage::details` (and the `format-specific` section built from it) gives what `qemu-img info` printed for each fixture.
#[test]
fn details_match_qemu_img_info() {
    let Some(dir) = fixtures_dir() else { return };
    let mut checked = 0;
    for (key, entry) in manifest(&dir) {
        if !key.starts_with("vmdk/") || entry["raw"].is_null() {
            continue;
        }
        let scratch = Scratch::new("details");
        let main = lay_out(&dir, &entry, &scratch.0);
        let image = vdisk_vmdk::open::open(&main, &OpenOptions::read_only()).expect("open");
        let got = image.details();
        let again =
            vdisk_vmdk::details::details_of(&main, &OpenOptions::read_only()).expect("details_of");
        assert_eq!(got, again, "{key}");
        let want = &entry["info"]["format-specific"]["data"];
        assert_eq!(Some(u64::from(got.cid)), want["cid"].as_u64(), "{key}: cid");
        assert_eq!(
            Some(u64::from(got.parent_cid)),
            want["parent-cid"].as_u64(),
            "{key}"
        );
        assert_eq!(
            Some(got.create_type.as_str()),
            want["create-type"].as_str(),
            "{key}"
        );
        // The section the CLI prints carries the same facts (key order is checked against
        // a live qemu-img in tests/info.rs; the manifest's keys are sorted).
        let mut section = image
            .format_specific()
            .expect("format_specific")
            .expect("a vmdk has a section");
        assert_eq!(section.kind, "vmdk", "{key}");
        for (name, value) in &mut section.data {
            if name != "extents" {
                continue;
            }
            let vdisk_block::dev::InfoValue::List(items) = value else {
                panic!("{key}: extents is not a list");
            };
            for item in items {
                let vdisk_block::dev::InfoValue::Map(fields) = item else {
                    panic!("{key}: an extent is not an object");
                };
                for (field, v) in fields.iter_mut() {
                    if field.as_str() != "filename" {
                        continue;
                    }
                    if let vdisk_block::dev::InfoValue::Text(t) = v {
                        // qemu ran in the fixture's folder; we opened a scratch copy.
                        let base = Path::new(t.as_str())
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        *t = base;
                    }
                }
            }
        }
        assert_eq!(
            &info_json(&vdisk_block::dev::InfoValue::Map(section.data)),
            want,
            "{key}: format-specific"
        );
        let extents = want["extents"].as_array().expect("extents");
        assert_eq!(got.extents.len(), extents.len(), "{key}: extents");
        for (g, w) in got.extents.iter().zip(extents) {
            let name = g
                .filename
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned());
            assert_eq!(name.as_deref(), w["filename"].as_str(), "{key}: filename");
            assert_eq!(
                Some(g.format.as_str()),
                w["format"].as_str(),
                "{key}: format"
            );
            assert_eq!(
                Some(g.virtual_size),
                w["virtual-size"].as_u64(),
                "{key}: size"
            );
            assert_eq!(g.cluster_size, w["cluster-size"].as_u64(), "{key}: cluster");
            assert_eq!(
                g.compressed,
                w["compressed"].as_bool().unwrap_or(false),
                "{key}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 9);
}
