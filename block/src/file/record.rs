//! Recording the stream of changes a host file goes through, for crash tests.
//!
//! A crash test needs the exact sequence of writes and flushes a format driver issued, so it
//! can rebuild the file as a power cut at any point of that sequence would have left it. The
//! driver opens its own files by path, so the recorder is attached by file identity rather
//! than handed in:
//!
//! 1. the test calls [`Recording::start`] on an existing file;
//! 2. every [`HostFile`](super::HostFile) opened *writable* on that file (same device and
//!    inode, whatever path names it) while the recording is alive appends each change it
//!    makes — writes, flushes, length changes, fallocate — as a [`FileOp`], in the order the
//!    changes happened; files opened before `start`, or read-only, are not recorded;
//! 3. the test takes [`Recording::ops`] and replays any prefix of them onto a copy of the
//!    file as it was at `start` with [`FileOp::apply`], tearing the last write if it likes
//!    with [`FileOp::sectors`].
//!
//! What production pays when nothing records: one atomic load per writable open, one
//! `Option` test per write batch, flush, truncate and fallocate. While a recording is
//! attached its file's changes are serialised (so the recorded order is the order the
//! kernel saw them), and every written byte is copied: tests only.
//!
//! A flush is recorded only when it reached the disk: in cache mode `unsafe` flushes are
//! no-ops, so none appear, and a crash test then sees (correctly) that nothing is durable.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::sys::Falloc;
use crate::error::{Error, Result};

/// One change to a recorded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// `data` written at `offset`.
    Write {
        /// Host offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// Everything before this is durable (`fdatasync` returned).
    Flush,
    /// The file's length was set.
    SetLen(u64),
    /// A range was deallocated (reads as zeroes; the length is unchanged).
    PunchHole {
        /// Host offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A range was zeroed (`FALLOC_FL_ZERO_RANGE`; may grow the file).
    ZeroRange {
        /// Host offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// A range was reserved (`fallocate` mode 0; may grow the file, contents unchanged).
    Allocate {
        /// Host offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl FileOp {
    /// Performs the change on `file` (a plain copy of the recorded file).
    pub fn apply(&self, file: &File) -> io::Result<()> {
        match self {
            FileOp::Write { offset, data } => file.write_all_at(data, *offset),
            FileOp::Flush => Ok(()),
            FileOp::SetLen(len) => file.set_len(*len),
            FileOp::PunchHole { offset, len } => {
                // A hole reads as zeroes; writing them keeps replay independent of the
                // file system's support for punching.
                let end = (*offset).saturating_add(*len).min(file.metadata()?.len());
                zero_bytes(file, *offset, end.saturating_sub(*offset))
            }
            FileOp::ZeroRange { offset, len } => zero_bytes(file, *offset, *len),
            FileOp::Allocate { offset, len } => {
                let end = offset.saturating_add(*len);
                if file.metadata()?.len() < end {
                    file.set_len(end)?;
                }
                Ok(())
            }
        }
    }

    /// A write cut at `sector`-aligned host offsets into its pieces (one piece when it lies
    /// inside one sector, which a disk writes whole); other changes come back as they are.
    /// A torn write is a subset of the pieces.
    pub fn sectors(&self, sector: u64) -> Vec<FileOp> {
        let FileOp::Write { offset, data } = self else {
            return vec![self.clone()];
        };
        let sector = sector.max(1);
        let mut pieces = Vec::new();
        let mut at = 0usize;
        while at < data.len() {
            let host = offset + at as u64;
            let room = (sector - host % sector) as usize;
            let n = room.min(data.len() - at);
            pieces.push(FileOp::Write {
                offset: host,
                data: data[at..at + n].to_vec(),
            });
            at += n;
        }
        pieces
    }
}

fn zero_bytes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        file.write_all_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// The changes made to one file since [`Recording::start`]; recording stops when this is
/// dropped (files opened meanwhile stay open and simply stop recording).
pub struct Recording {
    log: Arc<Log>,
}

/// What recorded files append to.
pub(super) struct Log {
    /// Device and inode of the recorded file.
    id: (u64, u64),
    /// Cleared (under the lock) when the [`Recording`] is dropped.
    ops: Mutex<Option<Vec<FileOp>>>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("id", &self.id).finish()
    }
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("id", &self.log.id)
            .field("ops", &self.len())
            .finish()
    }
}

/// Live recordings; `ACTIVE` counts them so opens skip the registry when there are none.
static REGISTRY: Mutex<Vec<Weak<Log>>> = Mutex::new(Vec::new());
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn registry() -> MutexGuard<'static, Vec<Weak<Log>>> {
    // A panic elsewhere while holding the lock leaves the list itself intact.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, Option<Vec<FileOp>>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log, locked, while its recording is alive: a file holds it across a change so
    /// that changes are recorded in the order they were made.
    pub(super) fn live(&self) -> Option<LiveLog<'_>> {
        let guard = self.lock();
        guard.is_some().then_some(LiveLog(guard))
    }

    fn is_live(&self) -> bool {
        self.lock().is_some()
    }
}

/// A locked, live log.
pub(super) struct LiveLog<'a>(MutexGuard<'a, Option<Vec<FileOp>>>);

impl LiveLog<'_> {
    /// Appends changes that were just made.
    pub(super) fn extend(&mut self, ops: impl IntoIterator<Item = FileOp>) {
        if let Some(v) = self.0.as_mut() {
            v.extend(ops);
        }
    }

    /// Appends one change that was just made.
    pub(super) fn push(&mut self, op: FileOp) {
        self.extend([op]);
    }
}

impl Recording {
    /// Starts recording every writable [`HostFile`](super::HostFile) opened on the file at
    /// `path` from now on. Fails when the file does not exist or is already recorded.
    pub fn start(path: &Path) -> Result<Recording> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io("start recording", e).with_path(path))?;
        let id = (meta.dev(), meta.ino());
        let mut list = registry();
        list.retain(|w| w.upgrade().is_some_and(|log| log.is_live()));
        if list
            .iter()
            .filter_map(Weak::upgrade)
            .any(|log| log.id == id)
        {
            return Err(
                Error::invalid("start recording", "the file is already being recorded")
                    .with_path(path),
            );
        }
        let log = Arc::new(Log {
            id,
            ops: Mutex::new(Some(Vec::new())),
        });
        list.push(Arc::downgrade(&log));
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        Ok(Recording { log })
    }

    /// How many changes were recorded so far.
    pub fn len(&self) -> usize {
        self.log.lock().as_ref().map_or(0, Vec::len)
    }

    /// True when nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the changes recorded so far, oldest first.
    pub fn ops(&self) -> Vec<FileOp> {
        self.log.lock().clone().unwrap_or_default()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        *self.log.lock() = None;
        registry().retain(|w| w.upgrade().is_some_and(|log| log.is_live()));
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The live recording of the file `meta` describes, if any.
pub(super) fn recording_for(meta: &std::fs::Metadata) -> Option<Arc<Log>> {
    if ACTIVE.load(Ordering::SeqCst) == 0 {
        return None;
    }
    let id = (meta.dev(), meta.ino());
    registry()
        .iter()
        .filter_map(Weak::upgrade)
        .find(|log| log.id == id && log.is_live())
}

/// The fallocate mode as a recorded change.
pub(super) fn falloc_op(what: Falloc, offset: u64, len: u64) -> FileOp {
    match what {
        Falloc::PunchHole => FileOp::PunchHole { offset, len },
        Falloc::ZeroRange => FileOp::ZeroRange { offset, len },
        Falloc::Allocate => FileOp::Allocate { offset, len },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{CacheMode, EngineChoice, HostFile};

    #[test]
    fn records_the_changes_of_writable_opens_in_order_and_replays_them() {
        let dir = crate::testing::TempDir::new("record").expect("temp dir");
        let path = dir.join("f");
        std::fs::write(&path, vec![7u8; 4096]).expect("seed");
        let before = HostFile::open(&path, true, CacheMode::Writeback, EngineChoice::Sync)
            .expect("open before start");
        let rec = Recording::start(&path).expect("start");
        assert!(Recording::start(&path).is_err(), "one recording per file");
        before.write_at(b"unrecorded", 0).expect("write");
        let ro = HostFile::open(&path, false, CacheMode::Writeback, EngineChoice::Sync)
            .expect("open read-only");
        ro.flush().expect("read-only flush");
        let f =
            HostFile::open(&path, true, CacheMode::Writeback, EngineChoice::Auto).expect("open");
        f.write_at(&[1; 1000], 300).expect("write");
        f.flush().expect("flush");
        f.set_len(8192).expect("grow");
        f.write_at(&[2; 10], 8000).expect("write");
        let ops = rec.ops();
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert_eq!(ops[1], FileOp::Flush);
        assert_eq!(ops[2], FileOp::SetLen(8192));
        // Replaying onto the file as it was at start gives the file as it is.
        let copy = dir.join("copy");
        let mut start = vec![7u8; 4096];
        start[..10].copy_from_slice(b"unrecorded");
        std::fs::write(&copy, &start).expect("copy");
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .expect("open copy");
        for op in &ops {
            op.apply(&out).expect("apply");
        }
        assert_eq!(
            std::fs::read(&copy).expect("read"),
            std::fs::read(&path).expect("read")
        );
        // 1000 bytes at 300 touch sectors 0, 1 and 2.
        let pieces = ops[0].sectors(512);
        let spans: Vec<(u64, usize)> = pieces
            .iter()
            .map(|p| match p {
                FileOp::Write { offset, data } => (*offset, data.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(spans, [(300, 212), (512, 512), (1024, 276)]);
        drop(rec);
        let g = HostFile::open(&path, true, CacheMode::Writeback, EngineChoice::Sync)
            .expect("open after stop");
        g.write_at(&[3], 0).expect("write");
        assert!(
            Recording::start(&path).is_ok(),
            "stopped recordings free the file"
        );
    }
}
