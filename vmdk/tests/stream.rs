//! The streamOptimized writer: what it writes must pass `qemu-img check`, read back through
//! qemu-img byte for byte, and have VMware's layout (grain markers, GT/GD markers, footer,
//! end-of-stream marker), checked structurally here.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{read_all, Scratch};
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, Format, OpenOptions, ZeroMode};
use vdisk_vmdk::header::{Marker, SparseHeader, GD_AT_END};
use vdisk_vmdk::VmdkFormat;

fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn create(path: &Path, size: u64) {
    let options = CreateOptions {
        size,
        options: CreateOptions::parse_options("subformat=streamOptimized,adapter_type=lsilogic")
            .expect("options"),
    };
    VmdkFormat.create(path, options).expect("create");
}

fn open(path: &Path, writable: bool) -> Arc<dyn BlockDev> {
    let options = OpenOptions {
        writable,
        ..OpenOptions::default()
    };
    VmdkFormat
        .open(path, &options)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// qemu-img checks the image and reads exactly `want`; so do we.
fn agrees(path: &Path, want: &[u8], scratch: &Scratch) {
    let p = path.to_str().expect("utf8");
    let check = qemu(&["check", "-f", "vmdk", p]);
    assert!(check.contains("No errors were found"), "{check}");
    let raw = scratch.path("oracle.raw");
    qemu(&[
        "convert",
        "-f",
        "vmdk",
        "-O",
        "raw",
        p,
        raw.to_str().expect("utf8"),
    ]);
    let theirs = std::fs::read(&raw).expect("oracle output");
    std::fs::remove_file(&raw).expect("remove");
    assert_eq!(theirs.len(), want.len());
    assert!(theirs == want, "qemu-img reads other contents");
    assert!(
        read_all(open(path, false).as_ref()) == want,
        "we read other contents"
    );
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// What a walk over a marker stream found.
struct Walk {
    header: SparseHeader,
    /// (grain LBA, sector of its marker), in file order.
    grains: Vec<(u64, u64)>,
    /// Sector of each grain table (after its marker), in file order.
    tables: Vec<u64>,
    /// Some grain lies after some grain table: tables were written as the stream went
    /// (after each table's grains), not all at the end.
    interleaved: bool,
}

/// Walks a streamOptimized file with markers from its first grain to the end-of-stream
/// marker and checks what every such stream must satisfy, whichever writer made it: grain
/// markers and GT markers (interleaved or not), then the GD marker and directory, the footer
/// marker and footer (the header with the real gdOffset), and the end-of-stream marker that
/// ends the file; every grain is in its table, every table in the directory, and every table
/// follows the grains it points at (a streaming reader meets data before its metadata).
fn walk_stream(bytes: &[u8]) -> Walk {
    let header = SparseHeader::decode(bytes).expect("header");
    assert_eq!(header.version, 3);
    assert_eq!(
        header.flags, 0x30001,
        "newline test, compressed, markers; no redundant GD"
    );
    assert_eq!(header.compress_algorithm, 1);
    let mut at = (header.overhead * 512) as usize;
    let mut grains = Vec::new();
    let mut tables = Vec::new();
    let mut interleaved = false;
    let gd_marker = loop {
        let m = Marker::decode(&bytes[at..]).expect("marker");
        if m.size != 0 {
            assert_eq!(
                m.val % header.grain_sectors,
                0,
                "grain markers carry grain LBAs"
            );
            assert_eq!(&bytes[at + 12..at + 14], &[0x78, 0x9c], "zlib streams");
            interleaved |= !tables.is_empty();
            grains.push((m.val, at as u64 / 512));
            at += (12 + m.size as usize).div_ceil(512) * 512;
            continue;
        }
        if m.kind != 1 {
            break m;
        }
        assert_eq!(m.val, 4, "a grain table is 4 sectors");
        tables.push(at as u64 / 512 + 1);
        at += 512 * 5;
    };
    assert_eq!((gd_marker.size, gd_marker.kind), (0, 2), "GD marker");
    let gd_at = at + 512;
    at = gd_at + gd_marker.val as usize * 512;
    let footer_marker = Marker::decode(&bytes[at..]).expect("footer marker");
    assert_eq!(
        (footer_marker.val, footer_marker.size, footer_marker.kind),
        (1, 0, 3)
    );
    let footer = SparseHeader::decode(&bytes[at + 512..]).expect("footer");
    assert_eq!(
        footer.gd_offset,
        gd_at as u64 / 512,
        "the footer points at the GD"
    );
    assert!(
        header.gd_offset == GD_AT_END || header.gd_offset == footer.gd_offset,
        "the header defers to the footer or agrees with it"
    );
    assert_eq!(
        SparseHeader {
            gd_offset: header.gd_offset,
            ..footer.clone()
        },
        header,
        "the footer is the header with the real gdOffset"
    );
    let eos = &bytes[at + 1024..at + 1536];
    assert!(eos.iter().all(|&b| b == 0), "end-of-stream marker");
    assert_eq!(at + 1536, bytes.len(), "the stream ends the file");
    let mut listed = 0;
    for index in 0..header.gd_entries() as usize {
        let entry = u64::from(u32_at(bytes, gd_at + index * 4));
        if entry != 0 {
            assert!(
                tables.contains(&entry),
                "directory entry {index} is a written table"
            );
            listed += 1;
        }
    }
    assert_eq!(
        listed,
        tables.len(),
        "every written table is in the directory"
    );
    for &(lba, sector) in &grains {
        let grain = lba / header.grain_sectors;
        let gd_entry = u64::from(u32_at(bytes, gd_at + (grain / 512) as usize * 4));
        assert!(
            tables.contains(&gd_entry),
            "grain {grain}'s table is one of the written ones"
        );
        let gte = u64::from(u32_at(
            bytes,
            (gd_entry * 512) as usize + (grain % 512) as usize * 4,
        ));
        assert_eq!(gte, sector, "grain {grain}");
        assert!(gd_entry > sector, "grain {grain}'s table follows it");
    }
    Walk {
        header,
        grains,
        tables,
        interleaved,
    }
}

/// The layout vdisk's writer produces: a stream (above) whose first header defers to the
/// footer, with every grain table after the last grain (the writer accepts grains in any
/// order, so a table is complete only when the stream is closed).
fn check_layout(path: &Path) -> Walk {
    let bytes = std::fs::read(path).expect("read");
    let walk = walk_stream(&bytes);
    assert_eq!(
        walk.header.gd_offset, GD_AT_END,
        "the first header defers to the footer"
    );
    assert!(!walk.interleaved, "vdisk writes its tables at the close");
    walk
}

#[test]
fn a_new_stream_is_valid_and_empty() {
    let scratch = Scratch::new("stream-empty");
    let path = scratch.path("s.vmdk");
    create(&path, (64 << 20) + 1000);
    check_layout(&path);
    let size = open(&path, false).size();
    assert_eq!(size, (64 << 20) + 1024, "sizes round up to sectors");
    agrees(&path, &vec![0u8; size as usize], &scratch);
}

#[test]
fn written_streams_read_back_and_keep_vmwares_layout() {
    let scratch = Scratch::new("stream-write");
    let path = scratch.path("s.vmdk");
    let size = (40u64 << 20) + 3 * 512;
    create(&path, size);
    let mut model = vec![0u8; size as usize];
    let dev = open(&path, true);
    // Whole grains from several threads, partial grains pieced together, a write in the last
    // partial grain, and zeroes over unwritten space.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = &dev;
            s.spawn(move || {
                for i in 0..40u64 {
                    let grain = t * 40 + i;
                    let data = vec![(grain % 250) as u8 + 1; 65536];
                    dev.write_at(&data, grain * 65536).expect("whole grain");
                }
            });
        }
    });
    for grain in 0..160u64 {
        let at = (grain * 65536) as usize;
        model[at..at + 65536].fill((grain % 250) as u8 + 1);
    }
    let base = 33u64 << 20;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    dev.write_at(&data[100_000..], base + 100_000)
        .expect("second half first");
    dev.write_at(&data[..100_000], base)
        .expect("then the first half");
    model[base as usize..base as usize + 200_000].copy_from_slice(&data);
    dev.write_at(&[0xee; 1000], size - 1200)
        .expect("tail grain");
    model[(size - 1200) as usize..(size - 200) as usize].fill(0xee);
    dev.write_zeroes(20 << 20, 1 << 20, ZeroMode::MayUnmap)
        .expect("zeroes");
    // Reads see pending and written grains before any flush.
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, size - 4096).expect("read pending");
    assert!(buf[..] == model[(size - 4096) as usize..]);
    dev.flush().expect("flush");
    let err = dev.write_at(&[1; 512], 0).expect_err("append-only");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    drop(dev);
    check_layout(&path);
    agrees(&path, &model, &scratch);

    // Reopen and append more, including grains of tables that already exist.
    let dev = open(&path, true);
    dev.write_at(&vec![0x42; 131072], 36 << 20)
        .expect("append after reopen");
    model[(36 << 20) as usize..(36 << 20) as usize + 131072].fill(0x42);
    dev.flush().expect("flush");
    drop(dev);
    check_layout(&path);
    agrees(&path, &model, &scratch);
}

#[test]
fn an_unflushed_writer_still_leaves_a_complete_stream() {
    let scratch = Scratch::new("stream-drop");
    let path = scratch.path("s.vmdk");
    create(&path, 1 << 20);
    let dev = open(&path, true);
    dev.write_at(&[7u8; 3000], 5000).expect("partial grain");
    drop(dev);
    check_layout(&path);
    let mut model = vec![0u8; 1 << 20];
    model[5000..8000].fill(7);
    agrees(&path, &model, &scratch);
}

#[test]
fn qemu_streams_cannot_be_appended_to() {
    let scratch = Scratch::new("stream-qemu");
    let path = scratch.path("q.vmdk");
    qemu(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        path.to_str().expect("utf8"),
        "1M",
    ]);
    let options = OpenOptions::read_write();
    let err = VmdkFormat
        .open(&path, &options)
        .map(|_| ())
        .expect_err("qemu layout");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}

#[test]
fn grains_of_zeroes_are_not_stored() {
    let scratch = Scratch::new("stream-zero");
    let path = scratch.path("s.vmdk");
    create(&path, 4 << 20);
    let dev = open(&path, true);
    dev.write_at(&vec![0u8; 2 << 20], 0).expect("zeroes");
    dev.write_at(&vec![9u8; 65536], 2 << 20).expect("data");
    dev.flush().expect("flush");
    let st = dev.block_status(0, 4 << 20).expect("status");
    assert!(!st.allocated && st.len == 2 << 20, "{st:?}");
    drop(dev);
    check_layout(&path);
    let mut model = vec![0u8; 4 << 20];
    model[2 << 20..(2 << 20) + 65536].fill(9);
    agrees(&path, &model, &scratch);
}

#[test]
fn a_stream_whose_tables_alias_is_not_appended_to() {
    let scratch = Scratch::new("stream-alias");
    let path = scratch.path("s.vmdk");
    create(&path, 64 << 20);
    let dev = open(&path, true);
    dev.write_at(&[1u8; 65536], 0).expect("grain in table 0");
    dev.write_at(&[2u8; 65536], 40 << 20)
        .expect("grain in table 1");
    dev.flush().expect("flush");
    drop(dev);
    let mut bytes = std::fs::read(&path).expect("read");
    let len = bytes.len();
    let footer = SparseHeader::decode(&bytes[len - 1024..]).expect("footer");
    let gd = (footer.gd_offset * 512) as usize;
    let first = u32_at(&bytes, gd);
    bytes[gd + 4..gd + 8].copy_from_slice(&first.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let err = VmdkFormat
        .open(&path, &OpenOptions::read_write())
        .map(|_| ())
        .expect_err("aliased tables");
    assert!(err.message().contains("share"), "{err}");
}

fn fixture(name: &str) -> Option<Vec<u8>> {
    let dir = common::fixtures_dir()?;
    Some(std::fs::read(dir.join("vmdk").join(name)).expect("fixture"))
}

/// The "VMDK stream converter" fixture (a third-party tool, imcleod/VMDK-stream-converter,
/// written to satisfy vSphere's import; not VMware's own code) is a marker stream of the
/// shape `walk_stream` checks, with one difference from vdisk's: its first header already
/// holds the real gdOffset. That tool writes each grain table right after the last grain
/// it covers (every 512 grains) and skips tables with no grain, which is what
/// `walk_stream` accepts; this 1 MiB fixture has 16 grains and so one table, and cannot
/// show the interleaving itself (`interleaved_tables_are_a_valid_stream` does).
#[test]
fn the_stream_converter_fixture_has_the_marker_layout() {
    let Some(bytes) = fixture("streamconverter-markers--streamOptimizedWithMarkers.vmdk") else {
        return;
    };
    let walk = walk_stream(&bytes);
    assert_ne!(
        walk.header.gd_offset, GD_AT_END,
        "its header holds the real GD"
    );
    assert_eq!(walk.grains.len(), 16);
    assert_eq!(walk.tables.len(), 1);
    assert!(!walk.interleaved);
    let lbas: Vec<u64> = walk.grains.iter().map(|g| g.0).collect();
    assert!(
        lbas.windows(2).all(|w| w[0] < w[1]),
        "grains in guest order"
    );
}

/// VMware Virtual Disk Manager's stream (and VMware's open-vmdk writer, whose source puts
/// the directory and every table in the header area) is the other layout: grain directory
/// and tables inside the overhead, pointed at by the first header; grain markers from the
/// overhead on; no GT, GD or footer markers; an end-of-stream marker last. Neither VMware
/// writer interleaves tables with grains.
#[test]
fn the_vdiskmanager_fixture_keeps_its_tables_up_front() {
    let Some(bytes) = fixture("vdiskmanager-streamOptimized--streamOptimized.vmdk") else {
        return;
    };
    let header = SparseHeader::decode(&bytes).expect("header");
    assert_eq!((header.version, header.flags), (3, 0x30001));
    assert!(header.gd_offset < header.overhead, "GD inside the overhead");
    let mut at = (header.overhead * 512) as usize;
    let mut grains = 0;
    loop {
        let m = Marker::decode(&bytes[at..]).expect("marker");
        if m.size == 0 {
            assert_eq!(
                (m.val, m.kind),
                (0, 0),
                "only an end-of-stream marker follows grains"
            );
            break;
        }
        grains += 1;
        at += (12 + m.size as usize).div_ceil(512) * 512;
    }
    assert_eq!(
        at + 512,
        bytes.len(),
        "the end-of-stream marker ends the file"
    );
    let gt = u32_at(&bytes, (header.gd_offset * 512) as usize) as usize;
    assert!(
        (gt as u64) < header.overhead,
        "the table is in the overhead too"
    );
    let used = (0..512)
        .filter(|i| u32_at(&bytes, gt * 512 + i * 4) != 0)
        .count();
    assert_eq!(used, grains, "the table lists exactly the streamed grains");
}

/// A stream whose tables follow their own grains (the converter's order, which vSphere
/// accepts): our walker accepts it, qemu-img and we read the same contents, and appending to
/// it is refused cleanly (vdisk appends only where all metadata lies after all grains).
#[test]
fn interleaved_tables_are_a_valid_stream() {
    use vdisk_vmdk::stream::stream_header;
    let scratch = Scratch::new("stream-interleaved");
    let path = scratch.path("i.vmdk");
    let size = 64u64 << 20;
    let header = stream_header(size / 512);
    let mut file = vec![0u8; 128 * 512];
    file[..512].copy_from_slice(&header.encode());
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
# Extent description\nRW {} SPARSE \"i.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n",
        size / 512
    );
    file[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
    let mut model = vec![0u8; size as usize];
    let mut gd = vec![0u32; 128];
    // Table 0 gets grains 0 and 511, table 1 grains 512 and 1000; each table is written
    // after its grains, before the next table's grains.
    for (table, grains) in [(0usize, [0u64, 511]), (1, [512, 1000])] {
        let mut gt = vec![0u32; 512];
        for grain in grains {
            let data: Vec<u8> = (0..65536u32)
                .map(|i| (i as u64 * 7 + grain) as u8)
                .collect();
            model[(grain * 65536) as usize..((grain + 1) * 65536) as usize].copy_from_slice(&data);
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut z, &data).expect("deflate");
            let compressed = z.finish().expect("deflate");
            gt[(grain % 512) as usize] = (file.len() / 512) as u32;
            file.extend_from_slice(&(grain * 128).to_le_bytes());
            file.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            file.extend_from_slice(&compressed);
            file.resize(file.len().div_ceil(512) * 512, 0);
        }
        file.extend_from_slice(&Marker::metadata_sector(1, 4));
        gd[table] = (file.len() / 512) as u32;
        for e in gt {
            file.extend_from_slice(&e.to_le_bytes());
        }
    }
    file.extend_from_slice(&Marker::metadata_sector(2, 1));
    let gd_offset = (file.len() / 512) as u64;
    for e in gd {
        file.extend_from_slice(&e.to_le_bytes());
    }
    file.extend_from_slice(&Marker::metadata_sector(3, 1));
    file.extend_from_slice(
        &SparseHeader {
            gd_offset,
            ..header.clone()
        }
        .encode(),
    );
    file.extend_from_slice(&[0u8; 512]);
    std::fs::write(&path, &file).expect("write");

    let walk = walk_stream(&file);
    assert!(walk.interleaved, "the test built what it meant to");
    assert_eq!(walk.tables.len(), 2);
    agrees(&path, &model, &scratch);
    let err = VmdkFormat
        .open(&path, &OpenOptions::read_write())
        .map(|_| ())
        .expect_err("append to an interleaved stream");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

/// A small deterministic generator (xorshift64*), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Guest contents with every shape a converter meets: incompressible and compressible
/// grains, whole-grain holes, holes inside a grain, data runs that start and end inside
/// grains, and a partial last grain.
fn mixed_contents(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; size];
    let mut at = 0usize;
    while at < size {
        let len = (1 + rng.below(300_000) as usize).min(size - at);
        match rng.below(4) {
            0 => {} // a hole
            1 => data[at..at + len].fill(rng.next() as u8 | 1),
            _ => {
                for b in &mut data[at..at + len] {
                    *b = rng.next() as u8;
                }
            }
        }
        at += len;
    }
    data
}

/// raw → streamOptimized → raw through the library alone: a raw file with holes is copied
/// into a new stream by several threads in unaligned chunks (zero chunks skipped, as
/// `convert` skips them), the stream is read back into a new raw image, and both raw files
/// and the stream agree byte for byte; qemu-img checks the stream and compares all three.
#[test]
fn raw_to_stream_to_raw_round_trips() {
    use vdisk_block::RawFormat;
    let scratch = Scratch::new("stream-roundtrip");
    let size = (48usize << 20) + 7 * 512;
    let source = scratch.path("source.raw");
    let contents = mixed_contents(size, 0x5eed_1234);
    RawFormat
        .create(
            &source,
            CreateOptions {
                size: size as u64,
                options: Default::default(),
            },
        )
        .expect("create raw");
    {
        let raw = RawFormat
            .open(&source, &OpenOptions::read_write())
            .expect("open raw");
        for (i, chunk) in contents.chunks(1 << 20).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                raw.write_at(chunk, (i as u64) << 20).expect("raw write");
            }
        }
        raw.flush().expect("flush raw");
    }

    let stream_path = scratch.path("s.vmdk");
    create(&stream_path, size as u64);
    {
        let src = RawFormat
            .open(&source, &OpenOptions::read_only())
            .expect("open source");
        let dst = open(&stream_path, true);
        // 200 KiB chunks: most writes start or end inside a grain, and neighbouring pieces
        // of one grain come from different threads.
        let chunk = 200 << 10;
        let next = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut buf = vec![0u8; chunk];
                    loop {
                        let at = next.fetch_add(chunk as u64, std::sync::atomic::Ordering::Relaxed);
                        if at >= size as u64 {
                            break;
                        }
                        let n = (size as u64 - at).min(chunk as u64) as usize;
                        src.read_at(&mut buf[..n], at).expect("read source");
                        if buf[..n].iter().any(|&b| b != 0) {
                            dst.write_at(&buf[..n], at).expect("write stream");
                        }
                    }
                });
            }
        });
        dst.flush().expect("flush stream");
    }
    // Each grain with data is stored once; grains of zeroes are not stored at all.
    let mut stored: Vec<u64> = check_layout(&stream_path)
        .grains
        .iter()
        .map(|g| g.0 / 128)
        .collect();
    stored.sort_unstable();
    let with_data: Vec<u64> = contents
        .chunks(65536)
        .enumerate()
        .filter(|(_, g)| g.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect();
    assert!(
        with_data.len() < contents.len().div_ceil(65536),
        "the contents have holes"
    );
    assert_eq!(stored, with_data, "grains stored");

    let back = scratch.path("back.raw");
    RawFormat
        .create(
            &back,
            CreateOptions {
                size: size as u64,
                options: Default::default(),
            },
        )
        .expect("create target");
    {
        let src = open(&stream_path, false);
        assert_eq!(src.size(), size as u64);
        let dst = RawFormat
            .open(&back, &OpenOptions::read_write())
            .expect("open target");
        let mut at = 0u64;
        while at < size as u64 {
            let st = src.block_status(at, size as u64 - at).expect("status");
            if st.data {
                let mut buf = vec![0u8; st.len as usize];
                src.read_at(&mut buf, at).expect("read stream");
                dst.write_at(&buf, at).expect("write target");
            }
            at += st.len;
        }
        dst.flush().expect("flush target");
    }
    let got = std::fs::read(&back).expect("read back");
    assert!(got == contents, "raw -> stream -> raw changed the contents");

    let s = stream_path.to_str().expect("utf8");
    let check = qemu(&["check", "-f", "vmdk", s]);
    assert!(check.contains("No errors were found"), "{check}");
    let src = source.to_str().expect("utf8");
    let compare = qemu(&["compare", "-f", "raw", "-F", "vmdk", src, s]);
    assert!(compare.contains("Images are identical"), "{compare}");
    let compare = qemu(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src,
        back.to_str().expect("utf8"),
    ]);
    assert!(compare.contains("Images are identical"), "{compare}");
}
