//! Golden fixtures: VMDKs written by VMware tools, ESXi, qemu-img and third-party converters
//! must read to exactly the guest contents the shared manifest records, and the malformed
//! ones must be refused with a clear error.

mod common;

use std::path::Path;

use common::{fixtures_dir, lay_out, read_all, sha256_hex, Scratch};
use vdisk_block::{Format, OpenOptions};
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
