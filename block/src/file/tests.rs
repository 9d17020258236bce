//! Tests of host files: open flags per cache mode, both engines, `O_DIRECT` with aligned and
//! unaligned requests, batches, errors and the io_uring fallback.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::*;
use crate::testing::{Rng, TempDir};

fn scratch(dir: &TempDir, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    let mut data = vec![0u8; len];
    Rng::new(len as u64).fill(&mut data);
    std::fs::write(&path, &data).expect("write scratch file");
    path
}

/// The `flags:` field of `/proc/self/fdinfo/<fd>` (octal), i.e. the open flags the kernel
/// really applied.
fn kernel_flags(file: &HostFile) -> i32 {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.file.as_raw_fd()))
        .expect("read fdinfo");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("fdinfo has flags");
    i32::from_str_radix(line.trim(), 8).expect("octal flags")
}

const ALL_CACHE: [CacheMode; 5] = [
    CacheMode::Writeback,
    CacheMode::None,
    CacheMode::Unsafe,
    CacheMode::Writethrough,
    CacheMode::DirectSync,
];

const ENGINES: [EngineChoice; 2] = [EngineChoice::Sync, EngineChoice::IoUring];

#[test]
fn cache_modes_open_with_the_right_kernel_flags() {
    let dir = TempDir::new("flags").expect("tempdir");
    let path = scratch(&dir, "img", 8192);
    for cache in ALL_CACHE {
        let file = HostFile::open(&path, true, cache, EngineChoice::Sync).expect("open");
        let flags = kernel_flags(&file);
        assert_eq!(
            flags & libc::O_DIRECT != 0,
            matches!(cache, CacheMode::None | CacheMode::DirectSync),
            "O_DIRECT for {cache:?}: flags {flags:o}"
        );
        assert_eq!(
            flags & libc::O_DSYNC != 0,
            matches!(cache, CacheMode::Writethrough | CacheMode::DirectSync),
            "O_DSYNC for {cache:?}: flags {flags:o}"
        );
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR);
        let expect_align = if cache.direct() { 512..=4096 } else { 1..=1 };
        assert!(expect_align.contains(&file.alignment()), "{cache:?}");
    }
}

#[test]
fn unsafe_skips_fsync_and_the_others_call_it() {
    // fdatasync on /dev/null fails with EINVAL: a flush that reaches the kernel shows it.
    let null = Path::new("/dev/null");
    let file = HostFile::open(null, true, CacheMode::Unsafe, EngineChoice::Sync).expect("open");
    file.flush().expect("cache=unsafe never syncs");
    for cache in [CacheMode::Writeback, CacheMode::Writethrough] {
        let file = HostFile::open(null, true, cache, EngineChoice::Sync).expect("open");
        assert!(file.flush().is_err(), "{cache:?} must call fdatasync");
    }
}

#[test]
fn refused_io_uring_falls_back_or_fails_clearly() {
    let dir = TempDir::new("refused").expect("tempdir");
    let path = scratch(&dir, "img", 4096);
    let auto = HostFile::open_with(
        &path,
        true,
        false,
        CacheMode::Writeback,
        EngineChoice::Auto,
        true,
    )
    .expect("auto falls back");
    assert_eq!(auto.engine(), EngineKind::Sync);
    assert!(auto
        .engine_note()
        .is_some_and(|n| n.contains("io_uring unavailable")));
    auto.write_at(b"fallback", 100).expect("write via pwrite");
    let mut back = [0u8; 8];
    auto.read_at(&mut back, 100).expect("read via pread");
    assert_eq!(&back, b"fallback");

    let err = HostFile::open_with(
        &path,
        true,
        false,
        CacheMode::Writeback,
        EngineChoice::IoUring,
        true,
    )
    .expect_err("explicit io_uring must not fall back silently");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("io_uring was requested"), "{err}");
    assert_eq!(err.path(), Some(path.as_path()));
}

#[test]
fn io_uring_is_used_when_the_kernel_allows_it() {
    let dir = TempDir::new("uring").expect("tempdir");
    let path = scratch(&dir, "img", 4096);
    let file = HostFile::open_with(
        &path,
        false,
        false,
        CacheMode::Writeback,
        EngineChoice::Auto,
        false,
    )
    .expect("open");
    // This project's machines allow io_uring; if one ever does not, say why.
    assert_eq!(
        file.engine(),
        EngineKind::IoUring,
        "{:?}",
        file.engine_note()
    );
}

/// Writes random pieces at awkward offsets and lengths, reads them back through the engine
/// and through std, for every cache mode and engine.
#[test]
fn unaligned_and_aligned_requests_work_in_every_mode() {
    let dir = TempDir::new("modes").expect("tempdir");
    let mut rng = Rng::new(11);
    let cases: [(u64, usize); 8] = [
        (0, 4096),
        (4096, 8192),
        (1, 1),
        (511, 2),
        (4095, 4098),
        (12288, 512),
        (513, 70_000),
        (100_000, 3),
    ];
    for cache in ALL_CACHE {
        for engine in ENGINES {
            let path = scratch(&dir, &format!("{cache:?}-{engine:?}"), 200_000);
            let mut expect = std::fs::read(&path).expect("read back");
            let file = HostFile::open(&path, true, cache, engine).expect("open");
            for &(offset, len) in &cases {
                // An aligned buffer, and one deliberately off by one byte.
                for skew in [0usize, 1] {
                    let mut buf = AlignedBuf::zeroed(len + skew, 4096);
                    rng.fill(&mut buf.as_mut_slice()[skew..]);
                    let data = &buf.as_slice()[skew..];
                    file.write_at(data, offset).expect("write");
                    expect[offset as usize..offset as usize + len].copy_from_slice(data);
                    let mut back = AlignedBuf::zeroed(len + skew, 4096);
                    file.read_at(&mut back.as_mut_slice()[skew..], offset)
                        .expect("read");
                    assert!(
                        back.as_slice()[skew..] == *data,
                        "{cache:?}/{engine:?} {offset}+{len} skew {skew}"
                    );
                }
            }
            file.flush().expect("flush");
            assert_eq!(file.len().expect("len"), 200_000, "{cache:?}/{engine:?}");
            drop(file);
            assert!(
                std::fs::read(&path).expect("read back") == expect,
                "{cache:?}/{engine:?}: file contents differ"
            );
        }
    }
}

#[test]
fn direct_writes_at_an_unaligned_end_of_file_keep_its_length() {
    let dir = TempDir::new("tail").expect("tempdir");
    for engine in ENGINES {
        let path = scratch(&dir, &format!("tail-{engine:?}"), 1000);
        let mut expect = std::fs::read(&path).expect("read");
        let file = HostFile::open(&path, true, CacheMode::None, engine).expect("open");
        file.write_at(b"0123456789", 990)
            .expect("write the last bytes");
        expect[990..].copy_from_slice(b"0123456789");
        assert_eq!(file.len().expect("len"), 1000);
        let mut back = [0u8; 10];
        file.read_at(&mut back, 990).expect("read tail");
        assert_eq!(&back, b"0123456789");
        let mut past = [0u8; 20];
        let err = file.read_at(&mut past, 990).expect_err("read past EOF");
        assert_eq!(err.offset(), Some(990));
        // Empty requests past the end change nothing, in a batch or alone.
        let mut empty_ops = [
            IoOp::Write {
                buf: &[],
                offset: 5000,
            },
            IoOp::Read {
                buf: &mut [],
                offset: 7000,
            },
        ];
        file.submit(&mut empty_ops).expect("empty batch");
        assert_eq!(file.len().expect("len"), 1000);
        // Growing the file with an unaligned write sets exactly the length written.
        file.write_at(&[7u8; 100], 1000).expect("append");
        expect.extend_from_slice(&[7u8; 100]);
        assert_eq!(file.len().expect("len"), 1100);
        drop(file);
        assert!(std::fs::read(&path).expect("read") == expect, "{engine:?}");
    }
}

/// Threads write disjoint bytes that share 512-byte blocks; with `O_DIRECT` each write is a
/// read-modify-write of whole blocks, so without the range lock some writes would be lost.
#[test]
fn direct_read_modify_write_loses_no_neighbouring_bytes() {
    let dir = TempDir::new("rmw").expect("tempdir");
    for engine in ENGINES {
        let path = dir.join(format!("rmw-{engine:?}"));
        std::fs::write(&path, vec![0u8; 64 << 10]).expect("create");
        let file = Arc::new(HostFile::open(&path, true, CacheMode::None, engine).expect("open"));
        const THREADS: usize = 4;
        const PIECE: usize = 8;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let file = Arc::clone(&file);
                std::thread::spawn(move || {
                    // Thread t owns bytes [i*32 + t*8, +8) of every 32-byte group.
                    for round in 0..3u8 {
                        for group in 0..(64usize << 10) / (THREADS * PIECE) {
                            let at = (group * THREADS * PIECE + t * PIECE) as u64;
                            let value = [(t as u8 + 1) * 16 + round; PIECE];
                            file.write_at(&value, at).expect("write piece");
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        let data = std::fs::read(&path).expect("read");
        for (i, &b) in data.iter().enumerate() {
            let t = (i / PIECE) % THREADS;
            assert_eq!(b, (t as u8 + 1) * 16 + 2, "{engine:?}: byte {i}");
        }
    }
}

/// A batch deeper than the ring, mixing reads and writes, then a batch that fails in the
/// middle, then the same rings serve further batches.
#[test]
fn deep_batches_partial_failures_and_ring_reuse() {
    let dir = TempDir::new("batch").expect("tempdir");
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let path = dir.join(format!("batch-{cache:?}"));
        let len = 1 << 20;
        std::fs::write(&path, vec![0u8; len]).expect("create");
        let file = HostFile::open(&path, true, cache, EngineChoice::IoUring).expect("open");
        assert_eq!(file.engine(), EngineKind::IoUring);
        let n = (uring::RING_DEPTH as usize) * 3 + 5;
        let mut sources: Vec<AlignedBuf> = (0..n)
            .map(|i| {
                let mut b = AlignedBuf::zeroed(4096, 4096);
                b.as_mut_slice().fill(i as u8);
                b
            })
            .collect();
        let mut ops: Vec<IoOp<'_>> = sources
            .iter()
            .enumerate()
            .map(|(i, b)| IoOp::Write {
                buf: b.as_slice(),
                offset: (i * 4096) as u64,
            })
            .collect();
        file.submit(&mut ops).expect("deep write batch");
        let mut sinks: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::zeroed(4096, 4096)).collect();
        let mut ops: Vec<IoOp<'_>> = sinks
            .iter_mut()
            .enumerate()
            .map(|(i, b)| IoOp::Read {
                buf: b.as_mut_slice(),
                offset: (i * 4096) as u64,
            })
            .collect();
        file.submit(&mut ops).expect("deep read batch");
        for (i, b) in sinks.iter().enumerate() {
            assert!(
                b.as_slice().iter().all(|&v| v == i as u8),
                "{cache:?} op {i}"
            );
        }

        // Request 100 reads past the end of the file; the rest are fine.
        for round in 0..3 {
            let mut ops: Vec<IoOp<'_>> = sinks
                .iter_mut()
                .enumerate()
                .map(|(i, b)| IoOp::Read {
                    buf: b.as_mut_slice(),
                    offset: if i == 100 {
                        len as u64
                    } else {
                        (i * 4096) as u64
                    },
                })
                .collect();
            let err = file
                .submit(&mut ops)
                .expect_err("the batch reports its failure");
            assert_eq!(err.offset(), Some(len as u64), "round {round}: {err}");
            assert_eq!(err.op(), "read");
        }
        // The rings are idle and usable after the failures.
        for b in &mut sources {
            b.as_mut_slice().fill(0xab);
        }
        let mut ops: Vec<IoOp<'_>> = sources
            .iter()
            .enumerate()
            .map(|(i, b)| IoOp::Write {
                buf: b.as_slice(),
                offset: (i * 4096) as u64,
            })
            .collect();
        file.submit(&mut ops).expect("batch after failures");
        drop(ops);
        let data = std::fs::read(&path).expect("read");
        assert!(data[..n * 4096].iter().all(|&v| v == 0xab), "{cache:?}");
    }
}

/// A read that runs into the end of the file gets the short part, then nothing: both engines
/// must report it as an error at the request's offset, not hand back stale bytes.
#[test]
fn short_reads_at_end_of_file_are_errors() {
    let dir = TempDir::new("short").expect("tempdir");
    let path = scratch(&dir, "img", 10_000);
    for cache in [CacheMode::Writeback, CacheMode::None] {
        for engine in ENGINES {
            let file = HostFile::open(&path, false, cache, engine).expect("open");
            let mut buf = AlignedBuf::zeroed(8192, 4096);
            let err = file
                .read_at(buf.as_mut_slice(), 4096)
                .expect_err("short read");
            assert_eq!(err.kind(), ErrorKind::Io, "{cache:?}/{engine:?}: {err}");
            assert!(err.to_string().contains("end of the file"), "{err}");
            assert_eq!(err.op(), "read");
        }
    }
}

/// One request longer than the 1 GiB an io_uring entry carries is split, and each piece
/// lands at the right offset (a sparse file, so this costs little disk).
#[test]
fn requests_over_one_gib_are_split_correctly() {
    let dir = TempDir::new("huge").expect("tempdir");
    let path = dir.join("sparse");
    let total = uring::MAX_TRANSFER + 8192;
    let file =
        HostFile::create(&path, CacheMode::Writeback, EngineChoice::IoUring).expect("create");
    file.set_len(total as u64 + 4096).expect("size");
    // Markers straddling the 1 GiB boundary of the request, which starts at 4096.
    let boundary = 4096 + uring::MAX_TRANSFER as u64;
    file.write_at(b"BEFORE", boundary - 6).expect("marker");
    file.write_at(b"AFTER!", boundary).expect("marker");
    file.write_at(b"END", 4096 + total as u64 - 3)
        .expect("marker");
    let mut buf = vec![0u8; total];
    file.read_at(&mut buf, 4096).expect("huge read");
    let cut = uring::MAX_TRANSFER;
    assert_eq!(&buf[cut - 6..cut + 6], b"BEFOREAFTER!");
    assert_eq!(&buf[total - 3..], b"END");
    assert!(buf[..cut - 6].iter().all(|&b| b == 0));
}

#[test]
fn offsets_the_kernel_would_misread_are_rejected() {
    let dir = TempDir::new("offsets").expect("tempdir");
    let path = scratch(&dir, "img", 4096);
    for engine in ENGINES {
        let file = HostFile::open(&path, true, CacheMode::Writeback, engine).expect("open");
        for offset in [u64::MAX, u64::MAX - 1, i64::MAX as u64, 1 << 63] {
            let mut buf = [0u8; 2];
            assert!(
                file.read_at(&mut buf, offset).is_err(),
                "{engine:?} read {offset}"
            );
            assert!(
                file.write_at(&buf, offset).is_err(),
                "{engine:?} write {offset}"
            );
        }
        assert_eq!(file.len().expect("len"), 4096);
    }
}

#[test]
fn read_only_files_refuse_every_change() {
    let dir = TempDir::new("ro").expect("tempdir");
    let path = scratch(&dir, "img", 8192);
    for engine in ENGINES {
        let file = HostFile::open(&path, false, CacheMode::Writeback, engine).expect("open");
        let kinds = [
            file.write_at(b"x", 0).map_err(|e| e.kind()),
            file.punch_hole(0, 4096).map_err(|e| e.kind()),
            file.zero_range(0, 4096).map_err(|e| e.kind()),
            file.allocate(0, 4096).map_err(|e| e.kind()),
            file.set_len(0).map_err(|e| e.kind()),
        ];
        for k in kinds {
            assert_eq!(k, Err(ErrorKind::ReadOnly), "{engine:?}");
        }
        assert_eq!(file.len().expect("len"), 8192);
    }
}

/// More threads than the pool keeps rings for, each pushing batches that mix aligned and
/// unaligned reads and writes in its own slice of the file; then everything is checked.
#[test]
fn concurrent_mixed_batches_from_many_threads() {
    const THREADS: usize = 12;
    const SLICE: usize = 256 << 10;
    let dir = TempDir::new("threads").expect("tempdir");
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let path = dir.join(format!("threads-{cache:?}"));
        std::fs::write(&path, vec![0u8; THREADS * SLICE]).expect("create");
        let file =
            Arc::new(HostFile::open(&path, true, cache, EngineChoice::IoUring).expect("open"));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let file = Arc::clone(&file);
                std::thread::spawn(move || {
                    let mut rng = Rng::new(t as u64 + 100);
                    let base = (t * SLICE) as u64;
                    let mut model = vec![0u8; SLICE];
                    for _ in 0..20 {
                        // Up to 16 disjoint pieces of 16 KiB slots, some aligned, some not.
                        let mut bufs = Vec::new();
                        for slot in 0..16usize {
                            if rng.chance(30) {
                                continue;
                            }
                            let (skew, len) = if rng.chance(50) {
                                (0, 4096 * (1 + rng.below(3) as usize))
                            } else {
                                (1 + rng.below(511) as usize, 1 + rng.below(12_000) as usize)
                            };
                            let mut b = AlignedBuf::zeroed(len, 4096);
                            rng.fill(b.as_mut_slice());
                            let at = slot * (16 << 10) + skew;
                            model[at..at + len].copy_from_slice(b.as_slice());
                            bufs.push((b, base + at as u64));
                        }
                        let mut ops: Vec<IoOp<'_>> = bufs
                            .iter()
                            .map(|(b, at)| IoOp::Write {
                                buf: b.as_slice(),
                                offset: *at,
                            })
                            .collect();
                        file.submit(&mut ops).expect("write batch");
                        let mut back = vec![0u8; SLICE];
                        let mut ops: Vec<IoOp<'_>> = back
                            .chunks_mut(SLICE / 8)
                            .enumerate()
                            .map(|(i, chunk)| IoOp::Read {
                                buf: chunk,
                                offset: base + (i * SLICE / 8) as u64,
                            })
                            .collect();
                        file.submit(&mut ops).expect("read batch");
                        drop(ops);
                        assert!(back == model, "thread {t}: read back differs");
                    }
                    model
                })
            })
            .collect();
        let models: Vec<Vec<u8>> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        file.flush().expect("flush");
        drop(file);
        let data = std::fs::read(&path).expect("read");
        for (t, model) in models.iter().enumerate() {
            assert!(
                data[t * SLICE..(t + 1) * SLICE] == model[..],
                "{cache:?}: slice {t}"
            );
        }
    }
}

/// A wait that fails while requests are in flight: the call must not return before the
/// kernel is done with every buffer, and the ring must come back clean and reusable.
#[test]
fn a_failed_wait_drains_every_request_before_returning() {
    let dir = TempDir::new("drain").expect("tempdir");
    let path = dir.join("drain");
    let n = uring::RING_DEPTH as usize;
    let pattern: Vec<u8> = (0..n * 4096).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    std::fs::write(&path, &pattern).expect("create");
    let file =
        HostFile::open(&path, false, CacheMode::Writeback, EngineChoice::IoUring).expect("open");
    for drain_failures in [0u32, 5] {
        let mut sinks: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; 4096]).collect();
        let mut ops: Vec<IoOp<'_>> = sinks
            .iter_mut()
            .enumerate()
            .map(|(i, b)| IoOp::Read {
                buf: b,
                offset: (i * 4096) as u64,
            })
            .collect();
        uring::fault::FAIL_NEXT_WAIT.with(|f| f.set(true));
        uring::fault::FAIL_DRAIN_WAITS.with(|f| f.set(drain_failures));
        let err = file.submit(&mut ops).expect_err("the wait failed");
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
        drop(ops);
        // Every request had reached the kernel; the drain waited for all of them.
        for (i, b) in sinks.iter().enumerate() {
            assert!(
                b.iter().all(|&v| v == i as u8 ^ 0x5a),
                "request {i} unfinished"
            );
        }
        let pool = file.uring.expect("io_uring engine");
        assert!(
            pool.all_idle_rings_empty(),
            "a ring went back with work in it"
        );
        let mut again = vec![0u8; n * 4096];
        file.read_at(&mut again, 0)
            .expect("the ring is usable again");
        assert!(again == pattern);
    }
}

fn fifo(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.join(name);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    path
}

/// A pipe hands a read only what has been written so far, so one request completes in many
/// short pieces; the engine must resubmit the remainder each time and keep the order.
#[test]
fn short_transfers_are_resubmitted_for_the_remainder() {
    let dir = TempDir::new("short-pipe").expect("tempdir");
    let path = fifo(&dir, "pipe");
    // Read-write open of a FIFO does not wait for a writer.
    let file = HostFile::open(&path, true, CacheMode::Writeback, EngineChoice::IoUring)
        .expect("open fifo");
    assert_eq!(file.engine(), EngineKind::IoUring);
    let expect: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let (path, data) = (path.clone(), expect.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut w = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open writer");
            for piece in data.chunks(1000) {
                w.write_all(piece).expect("write piece");
                w.flush().expect("flush");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let mut buf = vec![0u8; expect.len()];
    file.read_at(&mut buf, 0)
        .expect("one read, many short completions");
    writer.join().expect("writer");
    assert!(buf == expect);
}

/// Requests that are really pending in the kernel when a wait fails (reads of an empty
/// pipe, which would wait forever): they are cancelled and reaped before the call returns,
/// the drain retries its own failed waits, and no read is left behind in the kernel to
/// swallow data written later.
#[test]
fn a_failed_wait_cancels_and_reaps_pending_requests() {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let dir = TempDir::new("drain-pipe").expect("tempdir");
    let path = fifo(&dir, "pipe");
    let file = HostFile::open(&path, true, CacheMode::Writeback, EngineChoice::IoUring)
        .expect("open fifo");
    // Should cancellation ever not work, feed the reads after a while rather than hang.
    let (returned, rescue_wait) = std::sync::mpsc::channel::<()>();
    let rescue = {
        let path = path.clone();
        std::thread::spawn(move || {
            if rescue_wait
                .recv_timeout(std::time::Duration::from_secs(10))
                .is_err()
            {
                let mut w = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open rescue writer");
                w.write_all(&[1u8; 4 * 4096]).expect("rescue write");
            }
        })
    };
    let mut sinks: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 4096]).collect();
    let mut ops: Vec<IoOp<'_>> = sinks
        .iter_mut()
        .map(|b| IoOp::Read { buf: b, offset: 0 })
        .collect();
    uring::fault::FAIL_NEXT_WAIT.with(|f| f.set(true));
    uring::fault::FAIL_DRAIN_WAITS.with(|f| f.set(3));
    let err = file.submit(&mut ops).expect_err("the wait failed");
    // The rescuer may be gone already if it had to step in; the checks below tell.
    let _ = returned.send(());
    drop(ops);
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(
        sinks.iter().all(|b| b.iter().all(|&v| v == 0)),
        "the pending reads were cancelled, not fed"
    );
    let pool = file.uring.expect("io_uring engine");
    assert!(
        pool.all_idle_rings_empty(),
        "a ring went back with work in it"
    );
    // Nothing of ours still waits in the kernel: everything written now stays in the pipe.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .expect("open reader");
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open writer");
    writer.write_all(&[9u8; 10_000]).expect("write");
    let mut back = vec![0u8; 20_000];
    let n = reader.read(&mut back).expect("read back");
    assert_eq!(n, 10_000, "a forgotten read took part of the data");
    rescue.join().expect("rescue thread");
}

/// Random unaligned and aligned requests against a plain byte vector, on direct files whose
/// length is no multiple of a block and that writes past the end keep growing.
#[test]
fn direct_random_requests_match_a_byte_vector() {
    let dir = TempDir::new("direct-random").expect("tempdir");
    for (engine, seed) in [(EngineChoice::Sync, 1u64), (EngineChoice::IoUring, 2)] {
        let mut rng = Rng::new(seed);
        let path = dir.join(format!("random-{engine:?}"));
        let mut model = vec![0u8; 10_000 + rng.below(5000) as usize];
        rng.fill(&mut model);
        std::fs::write(&path, &model).expect("create");
        let file = HostFile::open(&path, true, CacheMode::None, engine).expect("open");
        for step in 0..400 {
            let limit = if rng.chance(10) { 40_000 } else { 3000 };
            let len = 1 + rng.below(limit) as usize;
            let offset = if rng.chance(50) {
                rng.below(model.len() as u64 + 3000)
            } else {
                rng.below(model.len() as u64 / 512 + 4) * 512
            };
            if rng.chance(50) {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                file.write_at(&data, offset).expect("write");
                let end = offset as usize + len;
                if end > model.len() {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
                assert_eq!(file.len().expect("len"), model.len() as u64, "step {step}");
            } else {
                let mut back = vec![0u8; len];
                let result = file.read_at(&mut back, offset);
                if offset as usize + len <= model.len() {
                    result.expect("read inside the file");
                    assert!(
                        back[..] == model[offset as usize..offset as usize + len],
                        "{engine:?} step {step}: read {offset}+{len}"
                    );
                } else {
                    assert!(result.is_err(), "{engine:?} step {step}: read past the end");
                }
            }
        }
        drop(file);
        assert!(std::fs::read(&path).expect("read") == model, "{engine:?}");
    }
}
