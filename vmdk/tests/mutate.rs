//! Seeded mutation runs over real images (the shared fixtures and images qemu-img makes):
//! flipped bytes in headers, descriptors, grain directories, tables and markers must give
//! an `Err` or a readable disk, never a panic, and every open and whole-disk read must finish
//! quickly (the inputs are small, so a hang or a huge allocation shows as a slow test).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures_dir, lay_out, Scratch};
use vdisk_block::testing::Rng;
use vdisk_block::{Format, OpenOptions};
use vdisk_vmdk::VmdkFormat;

/// Opens and reads `path` completely, in pieces; any outcome but a panic is fine.
fn exercise(path: &Path) {
    let Ok(dev) = VmdkFormat.open(path, &OpenOptions::read_only()) else {
        return;
    };
    // Bounded: the seeds below only ever produce small disks or fail early.
    let size = dev.size().min(64 << 20);
    let mut buf = vec![0u8; 256 << 10];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        if dev.read_at(&mut buf[..n], at).is_err() {
            break;
        }
        let _ = dev.block_status(at, n as u64);
        at += n as u64;
    }
}

/// Positions worth mutating: the header, the descriptor, and table/marker areas.
fn hot_spots(bytes: &[u8]) -> Vec<usize> {
    let mut spots: Vec<usize> = (0..512.min(bytes.len())).collect();
    let gd = if bytes.len() >= 64 && &bytes[..4] == b"KDMV" {
        let v = u64::from_le_bytes(bytes[56..64].try_into().expect("8 bytes"));
        if v == u64::MAX {
            bytes.len().saturating_sub(1536)
        } else {
            (v as usize).saturating_mul(512)
        }
    } else {
        0
    };
    for base in [gd, 512, 65536, bytes.len().saturating_sub(2048)] {
        spots.extend((base..base.saturating_add(2048)).filter(|&p| p < bytes.len()));
    }
    spots
}

fn mutate_and_run(name: &str, original: &[u8], dir: &Path, rounds: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let spots = hot_spots(original);
    let path = dir.join(name);
    for _ in 0..rounds {
        let mut bytes = original.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = spots[rng.below(spots.len() as u64) as usize];
            bytes[at] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => bytes[at] ^ (1 << rng.below(8)),
                _ => rng.next_u64() as u8,
            };
        }
        std::fs::write(&path, &bytes).expect("write mutant");
        exercise(&path);
    }
}

fn qemu_images(dir: &Path) -> Vec<PathBuf> {
    let raw = dir.join("src.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(2 << 20))
        .expect("raw");
    let ok = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 200k",
            "-c",
            "write -P 0x62 1m 64k",
        ])
        .arg(&raw)
        .output()
        .expect("qemu-io")
        .status
        .success();
    assert!(ok);
    let mut out = Vec::new();
    for (name, sub) in [
        ("ms.vmdk", "monolithicSparse"),
        ("so.vmdk", "streamOptimized"),
    ] {
        let image = dir.join(name);
        let ok = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
            .arg(format!("subformat={sub}"))
            .arg(&raw)
            .arg(&image)
            .output()
            .expect("qemu-img")
            .status
            .success();
        assert!(ok);
        out.push(image);
    }
    // Our own stream (GD at the end behind a footer).
    let ours = dir.join("ours.vmdk");
    let options = vdisk_block::CreateOptions {
        size: 2 << 20,
        options: vdisk_block::CreateOptions::parse_options("subformat=streamOptimized")
            .expect("options"),
    };
    VmdkFormat.create(&ours, options).expect("create");
    let dev = VmdkFormat
        .open(&ours, &OpenOptions::read_write())
        .expect("open");
    dev.write_at(&vec![0x33; 200 << 10], 0).expect("write");
    dev.flush().expect("flush");
    drop(dev);
    out.push(ours);
    out
}

#[test]
fn mutated_images_never_panic() {
    let scratch = Scratch::new("mutate");
    let work = Scratch::new("mutate-work");
    let mut inputs: Vec<(String, Vec<u8>)> = qemu_images(&scratch.0)
        .into_iter()
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read"))
        })
        .collect();
    if let Some(dir) = fixtures_dir() {
        let text = std::fs::read_to_string(dir.join("MANIFEST.json")).expect("manifest");
        let manifest: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).expect("json");
        for (key, entry) in &manifest {
            let single = entry["files"].as_array().is_some_and(|f| f.len() == 1);
            let small = entry["files"][0]["size"]
                .as_u64()
                .is_some_and(|s| s <= 4 << 20);
            if key.starts_with("vmdk/") && single && small {
                let main = lay_out(&dir, entry, &scratch.0);
                let name = main
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned();
                inputs.push((name, std::fs::read(&main).expect("read")));
            }
        }
    }
    assert!(inputs.len() >= 3);
    for (i, (name, bytes)) in inputs.iter().enumerate() {
        // VMDK_MUTATE_ROUNDS raises the count for a longer hunt by hand.
        let rounds = std::env::var("VMDK_MUTATE_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        mutate_and_run(name, bytes, &work.0, rounds, 1000 + i as u64);
    }
}

#[test]
fn mutated_descriptors_never_panic() {
    let scratch = Scratch::new("mutate-desc");
    std::fs::write(scratch.path("a.raw"), vec![5u8; 8192]).expect("extent");
    let text = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
createType=\"monolithicFlat\"\n\n# Extent description\nRW 8 FLAT \"a.raw\" 0\nRW 4 ZERO\n\
RDONLY 4 FLAT \"a.raw\" 8\n\n#DDB\nddb.adapterType = \"ide\"\n";
    let mut rng = Rng::new(77);
    let path = scratch.path("d.vmdk");
    for round in 0..2000 {
        let mut bytes = text.as_bytes().to_vec();
        if round % 2 == 1 {
            bytes.splice(0..0, b"encoding=\"windows-1252\"\n".iter().copied());
        }
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bytes.len() as u64) as usize;
            match rng.below(3) {
                0 => bytes[at] = rng.next_u64() as u8,
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, b"0123456789\"= \n-\xc3\xa9\x80"[rng.below(18) as usize]),
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        exercise(&path);
        // A descriptor that parses writes back to one that parses to the same extents.
        vdisk_vmdk::fuzzing::descriptor(&bytes);
    }
}
