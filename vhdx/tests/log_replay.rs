//! A VHDX whose log holds an unreplayed entry (as a crash between the log write and the
//! metadata update leaves it) opens read-only with the log replayed in memory: reads show
//! the post-replay contents, exactly what qemu-img shows after `check -r all` replays it,
//! and the file is left byte-for-byte unmodified.

mod common;

use std::process::Command;

use common::{have_qemu, read_all, run, Scratch};
use vdisk_block::{BlockDev, OpenOptions};
use vdisk_vhdx::guid::Guid;
use vdisk_vhdx::vhdx::bat;
use vdisk_vhdx::vhdx::header::HEADER_OFFSETS;
use vdisk_vhdx::vhdx::log::{encode_entry, LogWrite};
use vdisk_vhdx::VhdxImage;

const MIB: u64 = 1 << 20;

fn file_sha(path: &std::path::Path) -> String {
    String::from_utf8_lossy(&run(Command::new("sha256sum").arg(path)))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn write_at(path: &std::path::Path, data: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, offset).expect("write");
}

#[test]
fn a_dirty_log_is_replayed_in_memory_on_read_only_open() {
    if !have_qemu() {
        return;
    }
    let dir = Scratch::new("log");
    let image = dir.path("dirty.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&image)
        .arg("16M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "vhdx",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 2M 1M",
        ])
        .arg(&image));

    let (header, regions, block2) = {
        let img = VhdxImage::open(&image, &OpenOptions::read_only()).expect("open clean");
        assert!(img.replayed().is_none());
        let st = img.block_status(2 * MIB, MIB).expect("status");
        let host = st.host.expect("block 2 is allocated").offset;
        (img.header().clone(), *img.regions(), host)
    };
    // The data of a new block 5 reaches the file first (write-ahead order), then the crash
    // leaves only the log entry that maps it: block 0 becomes ZERO, block 5 points at the
    // new data, and 8 KiB of block 2 are zeroed by a zero descriptor.
    let file_len = std::fs::metadata(&image).expect("stat").len();
    let new_block = file_len.next_multiple_of(MIB);
    write_at(&image, &vec![0x77u8; MIB as usize], new_block);
    let bat_sector_at = regions.bat.offset;
    let mut bat_sector = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&image)
            .expect("open")
            .read_exact_at(&mut bat_sector, bat_sector_at)
            .expect("read BAT");
    }
    bat_sector[..8].copy_from_slice(&bat::make_entry(2, 0).to_le_bytes());
    bat_sector[5 * 8..6 * 8].copy_from_slice(&bat::make_entry(6, new_block).to_le_bytes());
    let log_guid = Guid::parse("{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}").expect("guid");
    let entry = encode_entry(
        log_guid,
        1,
        0,
        new_block + MIB,
        new_block + MIB,
        &[
            LogWrite::Data {
                offset: bat_sector_at,
                data: bat_sector,
            },
            LogWrite::Zero {
                offset: block2 + 4096,
                len: 8192,
            },
        ],
    );
    write_at(&image, &entry, header.log_offset);
    let mut dirty = header.clone();
    dirty.sequence += 1;
    dirty.log_guid = log_guid;
    // Both header slots carry the dirty header, so whichever is current names the log.
    for off in HEADER_OFFSETS {
        write_at(&image, &dirty.encode(), off);
    }

    let before = file_sha(&image);
    let ours = {
        let img = VhdxImage::open(&image, &OpenOptions::read_only()).expect("open dirty");
        assert_eq!(img.replayed().map(|r| r.entries), Some(1));
        let data = read_all(&img);
        assert!(
            data[..MIB as usize].iter().all(|&b| b == 0),
            "block 0 is ZERO after replay"
        );
        assert!(data[5 * MIB as usize..6 * MIB as usize]
            .iter()
            .all(|&b| b == 0x77));
        let b2 = &data[2 * MIB as usize..3 * MIB as usize];
        assert!(b2[..4096].iter().all(|&b| b == 0x22));
        assert!(b2[4096..12288].iter().all(|&b| b == 0));
        assert!(b2[12288..].iter().all(|&b| b == 0x22));
        data
    };
    assert_eq!(
        file_sha(&image),
        before,
        "a read-only open must not write the file"
    );

    // qemu refuses the dirty image read-only; after its own replay it reads what we read.
    let info = Command::new("qemu-img")
        .args(["info", "-f", "vhdx"])
        .arg(&image)
        .output()
        .expect("qemu-img");
    assert!(!info.status.success(), "qemu opens a dirty log read-only?");
    let copy = dir.path("replayed-by-qemu.vhdx");
    std::fs::copy(&image, &copy).expect("copy");
    let _ = Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&copy)
        .output()
        .expect("qemu-img check");
    let raw = dir.path("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&copy)
        .arg(&raw));
    let oracle = std::fs::read(&raw).expect("oracle");
    assert!(
        ours == oracle,
        "our in-memory replay differs from qemu's replay"
    );

    // A writable open replays into the file and clears the log: qemu then opens it
    // read-only and reads the same bytes.
    let ours_rw = dir.path("replayed-by-us.vhdx");
    std::fs::copy(&image, &ours_rw).expect("copy");
    {
        let img = VhdxImage::open(&ours_rw, &OpenOptions::read_write()).expect("open rw");
        assert!(
            img.header().log_guid.is_zero(),
            "the log is retired after replay"
        );
    }
    let raw2 = dir.path("ours.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&ours_rw)
        .arg(&raw2));
    assert!(std::fs::read(&raw2).expect("raw") == ours);
}
