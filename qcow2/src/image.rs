//! An opened qcow2 image as a [`BlockDev`]: the read path.
//!
//! A guest range is resolved in runs: [`Qcow2Image::lookup`] walks L1 → L2 (through the
//! bounded [`L2Cache`]) and returns the longest stretch, inside one L2 table, that reads the
//! same way (falls through, zeroes, contiguous host data, one compressed cluster). Reads,
//! block status and `resolve_read` are all built on those runs, so a long contiguous range
//! costs one host read and no per-cluster work.
//!
//! Locking: `io` orders guest I/O (reads share it, anything that changes metadata takes it
//! exclusively, so a cluster is never freed or reused under a reader); `meta` guards the
//! tables and caches for the short time a lookup or an update takes. Writes live in
//! `write.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use vdisk_block::dev::{FormatSpecific, InfoValue};
use vdisk_block::{
    check_range, BlockDev, BlockStatus, Error, ErrorKind, HostFile, HostLocation, ImageInfo,
    OpenOptions, Preallocation, ReadSegment, Result, SnapshotInfo, ZeroMode,
};

use crate::alloc::Refcounts;
use crate::cache::L2Cache;
use crate::compress;
use crate::entry::{Decoder, Kind};
use crate::header::{self, CryptMethod, Header};
use crate::open::{self, ChainGuard, DataFile};

/// Header offset of `incompatible_features`.
pub(crate) const HEADER_INCOMPAT: u64 = 72;

/// The L2 cache holds at most this many bytes of tables (QEMU's default maximum on Linux).
const L2_CACHE_BYTES: u64 = 32 << 20;
/// ...and at most this many tables, so eviction stays cheap with small clusters.
const L2_CACHE_TABLES: u64 = 1024;

/// An opened qcow2 image.
pub struct Qcow2Image {
    path: PathBuf,
    file: Arc<HostFile>,
    pub(crate) header: Header,
    pub(crate) decoder: Decoder,
    pub(crate) io: RwLock<()>,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) data: DataFile,
    pub(crate) backing: Option<Arc<dyn BlockDev>>,
    pub(crate) writable: bool,
    /// Set when a write was refused for hitting metadata: no further writes.
    pub(crate) marked_corrupt: std::sync::atomic::AtomicBool,
    /// The last decompressed cluster, keyed by its host offset: sequential small reads of a
    /// compressed cluster decompress it once.
    pub(crate) last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
    /// Length of the file holding guest data, refreshed when a read reaches past it.
    pub(crate) data_len: AtomicU64,
    /// Guest-visible size (changes with resize).
    pub(crate) size: AtomicU64,
    /// Whether block status looks through data clusters to host holes (decided at the first
    /// block status, as QEMU does: see [`crate::prealloc`]).
    pub(crate) look_through: std::sync::OnceLock<bool>,
    /// Persistent dirty bitmaps (see `bitmap/live.rs`); never locked while `meta` is held.
    pub(crate) bitmaps: Mutex<crate::bitmap::live::Bitmaps>,
    /// Encryption of guest data (see `crypto.rs`).
    /// Boxed: the key schedules are large, and an image is built on the stack at every
    /// level of a backing chain's open.
    pub(crate) crypto: Option<Box<crate::crypto::Crypto>>,
}

/// The mutable metadata of an image, behind its metadata lock.
#[derive(Debug)]
pub(crate) struct Meta {
    /// The active L1 table.
    pub l1: Vec<u64>,
    /// Host offset of the active L1 table (changes when resize grows it).
    pub l1_offset: u64,
    /// Host offset of the snapshot table (changes when snapshots are made or deleted).
    pub snapshots_offset: u64,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Cached L2 tables.
    pub l2: L2Cache,
    /// Refcounts, loaded only for writable images.
    pub refs: Option<Refcounts>,
    /// Metadata clusters guest data must never overwrite (writable images only).
    pub overlap: crate::overlap::Overlap,
    /// Next free byte of the host cluster compressed clusters are being packed into (0:
    /// none).
    pub compress_cursor: u64,
    /// Host byte ranges whose clusters lose one reference once the tables that stopped
    /// referencing them are durable.
    pub pending_free: Vec<(u64, u64)>,
    /// The bitmaps extension and autoclear bits as stored now (bitmap stores change them).
    pub bitmaps_ext: Option<header::BitmapsExt>,
    /// See `bitmaps_ext`.
    pub autoclear: u64,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("backing", &self.backing.is_some())
            .finish_non_exhaustive()
    }
}

fn read_be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

impl Qcow2Image {
    /// Opens `path`. Backing and data files are opened only as `options.policy` allows.
    ///
    /// A writable open is refused for images marked corrupt and legacy AES-encrypted
    /// images; an encrypted image needs its passphrase (`encrypt.key-secret`) except for a
    /// metadata-only open. A
    /// writable open loads the persistent bitmaps, marks them in use and records every
    /// guest write in the enabled ones; they are stored when the image is dropped.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        Self::open_inner(path, options, false)
    }

    /// A writable open for `check` repair, which changes no guest data and so leaves the
    /// persistent bitmaps as they are on disk.
    pub(crate) fn open_for_repair(path: &Path, options: &OpenOptions) -> Result<Self> {
        Self::open_inner(path, options, true)
    }

    fn open_inner(path: &Path, options: &OpenOptions, repair: bool) -> Result<Self> {
        // Before the chain guard: the rebuild opens this same image itself.
        if options.writable {
            rebuild_if_dirty(path, options)?;
        }
        let _chain = ChainGuard::enter(path)?;
        let file = HostFile::open(path, options.writable, options.cache, options.engine)?;
        let file_len = file.len()?;
        let mut header = read_header(&file, file_len).map_err(|e| e.with_path(path))?;
        let crypto = crate::crypto::Crypto::open(&file, file_len, &header, options)
            .map_err(|e| e.with_path(path))?
            .map(Box::new);
        if options.writable {
            crate::write::prepare_writable(&file, &mut header).map_err(|e| e.with_path(path))?;
        }
        let l1 = read_l1(&file, &header, file_len).map_err(|e| e.with_path(path))?;
        let decoder = Decoder {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            data_file: header.has_data_file(),
        };
        let data = if header.has_data_file() {
            let name = options
                .driver_options
                .get("data-file")
                .cloned()
                .or_else(|| header.extensions.data_file.clone())
                .ok_or_else(|| {
                    Error::invalid(
                        "open",
                        "the image uses an external data file but does not name it (give one with the data-file option)",
                    )
                    .with_path(path)
                })?;
            open::open_data_file(path, &name, options)?
        } else {
            if options.driver_options.contains_key("data-file") {
                return Err(Error::invalid(
                    "open",
                    "'data-file' can only be set for images that use an external data file",
                )
                .with_path(path));
            }
            DataFile::Internal
        };
        let backing = match (&header.backing_file, options.no_backing) {
            (Some(name), false) => Some(open::open_backing(
                path,
                name,
                header.extensions.backing_format.as_deref(),
                options,
            )?),
            _ => None,
        };
        let data_len = match &data {
            DataFile::External(f) => f.len()?,
            // Learnt at the first read (a read past the known length asks the file).
            DataFile::Deferred { .. } => 0,
            _ => file_len,
        };
        let cache_bytes = match options
            .driver_options
            .get("l2-cache-size")
            .or_else(|| options.driver_options.get("cache-size"))
        {
            Some(text) => vdisk_block::size::parse_size(text).map_err(|e| e.with_path(path))?,
            None => L2_CACHE_BYTES,
        };
        let tables = (cache_bytes >> header.cluster_bits).clamp(2, L2_CACHE_TABLES);
        let (refs, overlap) = if options.writable {
            let refs = Refcounts::load(&file, &header).map_err(|e| e.with_path(path))?;
            let overlap = crate::overlap::Overlap::build(&file, &header, &l1, refs.table())
                .map_err(|e| e.with_path(path))?;
            (Some(refs), overlap)
        } else {
            (None, crate::overlap::Overlap::default())
        };
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            file: Arc::new(file),
            decoder,
            io: RwLock::new(()),
            meta: Mutex::new(Meta {
                l1,
                l1_offset: header.l1_table_offset,
                snapshots_offset: header.snapshots_offset,
                nb_snapshots: header.nb_snapshots,
                l2: L2Cache::new(tables as usize),
                refs,
                pending_free: Vec::new(),
                overlap,
                compress_cursor: 0,
                bitmaps_ext: header.extensions.bitmaps,
                autoclear: header.autoclear_features,
            }),
            data,
            backing,
            writable: options.writable,
            marked_corrupt: std::sync::atomic::AtomicBool::new(false),
            look_through: std::sync::OnceLock::new(),
            last_compressed: Mutex::new(None),
            data_len: AtomicU64::new(data_len),
            size: AtomicU64::new(header.size),
            bitmaps: Mutex::new(Default::default()),
            crypto,
            header,
        })
        .and_then(|img| {
            // Before any guest write can happen (a repair changes no guest data and leaves
            // the bitmaps as they are).
            if options.writable && !repair {
                img.open_bitmaps_rw()?;
            }
            Ok(img)
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The path the image was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's own host file.
    pub fn file(&self) -> &Arc<HostFile> {
        &self.file
    }

    /// A copy of the active L1 table.
    pub fn l1(&self) -> Vec<u64> {
        self.meta.lock().l1.clone()
    }

    /// [`Decoder::classify`], signalling corruption on a bad entry (see
    /// [`Self::signal_corruption`]).
    pub(crate) fn classify(&self, entry: u64, bitmap: u64, sc: u32, guest: u64) -> Result<Kind> {
        self.decoder
            .classify(entry, bitmap, sc, guest)
            .map_err(|e| self.signal_corruption(e))
    }

    /// [`Decoder::l2_offset`], signalling corruption on a bad entry.
    pub(crate) fn l2_offset(&self, l1_index: u64, entry: u64) -> Result<u64> {
        self.decoder
            .l2_offset(l1_index, entry)
            .map_err(|e| self.signal_corruption(e))
    }

    /// Handles a corrupt table entry met during I/O the way QEMU's
    /// `qcow2_signal_corruption` does: an image open for writing is marked corrupt (the
    /// incompatible bit in a version 3 header, in memory for version 2, which has none)
    /// and takes no further writes, so a damaged table cannot lead to guest data landing
    /// on metadata; from then on only `check -r all` may write to it. A read-only image is
    /// left untouched and only the request fails. Returns the error to report.
    pub(crate) fn signal_corruption(&self, e: Error) -> Error {
        if e.kind() != ErrorKind::Corrupt || !self.writable {
            return e;
        }
        if self.marked_corrupt.swap(true, Ordering::AcqRel) {
            return e;
        }
        let mut message = format!("{}; the image is now marked corrupt", e.message());
        if self.header.version >= 3 {
            let features = self.header.incompatible_features | header::incompat::CORRUPT;
            let written = self
                .file
                .write_at(&features.to_be_bytes(), HEADER_INCOMPAT)
                .and_then(|()| self.file.flush());
            if let Err(w) = written {
                message = format!(
                    "{}; marking the image corrupt failed: {}",
                    e.message(),
                    w.message()
                );
            }
        }
        let mut out = Error::corrupt(e.op(), message).with_path(e.path().unwrap_or(&self.path));
        if let Some(offset) = e.offset() {
            out = out.at_offset(offset);
        }
        out.with_source(e)
    }

    /// Makes sure the L2 table at host `offset` is in the cache.
    pub(crate) fn load_l2(&self, meta: &mut Meta, offset: u64) -> Result<()> {
        if meta.l2.get(offset).is_some() {
            return Ok(());
        }
        if meta.l2.needs_writeback() {
            self.writeback(meta)?;
        }
        let cs = self.header.cluster_size();
        let end = offset.saturating_add(cs);
        let file_len = self.file.len()?;
        let mut raw = vec![0u8; cs as usize];
        if end > file_len {
            // qemu reads what the file holds and zeroes past its end, so the clusters such a
            // table maps read as unallocated; a writer must not use it: the cluster it
            // claims is free to the allocator, which could hand it out for guest data.
            if self.writable {
                return Err(self.signal_corruption(
                    Error::corrupt(
                        "read metadata",
                        format!("L2 table at {offset:#x} lies past the end of the image file"),
                    )
                    .with_path(&self.path),
                ));
            }
            if offset < file_len {
                let held = (file_len - offset) as usize;
                self.file.read_at(&mut raw[..held], offset)?;
            }
        } else {
            self.file.read_at(&mut raw, offset)?;
        }
        meta.l2.insert(offset, read_be_u64s(&raw), false);
        Ok(())
    }

    /// Resolves guest `offset`: the kind of the run starting there and its length (at most
    /// `max`, never crossing an L2 table). Host offsets in the result point at `offset`
    /// itself, not at the start of its cluster.
    pub fn lookup(&self, offset: u64, max: u64) -> Result<(Kind, u64)> {
        self.lookup_locked(&mut self.meta.lock(), offset, max)
    }

    /// [`Qcow2Image::lookup`] with the metadata lock held.
    pub(crate) fn lookup_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        max: u64,
    ) -> Result<(Kind, u64)> {
        let cb = self.header.cluster_bits;
        let cs = 1u64 << cb;
        let shift = self.header.l1_entry_shift();
        let l1_index = offset >> shift;
        let l1_end = (l1_index + 1) << shift;
        let to_l1_end = (l1_end - offset).min(max);
        let l2_offset = match meta.l1.get(l1_index as usize) {
            None => 0,
            Some(&e) => self
                .l2_offset(l1_index, e)
                .map_err(|e| e.with_path(&self.path))?,
        };
        if l2_offset == 0 {
            return Ok((Kind::Unallocated, to_l1_end));
        }
        self.load_l2(meta, l2_offset)?;
        let table = match meta.l2.get(l2_offset) {
            Some(t) => &t.words,
            None => {
                return Err(Error::corrupt(
                    "read metadata",
                    "an L2 table left the cache while in use",
                ))
            }
        };
        let width = if self.decoder.extended_l2 { 2 } else { 1 };
        let entries = self.header.l2_entries();
        let sc_size = self.decoder.subcluster_size();
        let classify = |guest: u64| -> Result<Kind> {
            let idx = ((guest >> cb) & (entries - 1)) as usize * width;
            let entry = table.get(idx).copied().unwrap_or(0);
            let bitmap = if width == 2 {
                table.get(idx + 1).copied().unwrap_or(0)
            } else {
                0
            };
            let sc = ((guest & (cs - 1)) / sc_size) as u32;
            self.classify(entry, bitmap, sc, guest & !(cs - 1))
                .map_err(|e| e.with_path(&self.path))
        };
        let first = classify(offset)?;
        let start_kind = at_offset(first, offset & (cs - 1));
        if let Kind::Compressed { .. } = first {
            return Ok((first, (cs - (offset & (cs - 1))).min(max)));
        }
        // Extend by subclusters (or clusters) while the run reads the same way.
        let mut pos = (offset / sc_size + 1) * sc_size;
        while pos < offset + to_l1_end {
            let next = at_offset(classify(pos)?, pos & (cs - 1));
            if !continues(start_kind, pos - offset, next) {
                break;
            }
            pos += sc_size;
        }
        Ok((start_kind, (pos - offset).min(to_l1_end)))
    }

    pub(crate) fn data_file(&self) -> Result<&Arc<HostFile>> {
        match &self.data {
            DataFile::Internal => Ok(&self.file),
            DataFile::External(f) => Ok(f),
            DataFile::Deferred {
                path,
                cache,
                engine,
                opened,
            } => {
                let opened = opened.get_or_init(|| {
                    HostFile::open(path, false, *cache, *engine)
                        .map(Arc::new)
                        .map_err(|e| (e.kind(), e.message().to_string()))
                });
                match opened {
                    Ok(f) => Ok(f),
                    Err((kind, message)) => Err(Error::new(
                        *kind,
                        "read",
                        format!(
                            "cannot open the external data file '{}': {message}",
                            path.display()
                        ),
                    )
                    .with_path(&self.path)),
                }
            }
            DataFile::NotOpened { path, reason, kind } => Err(Error::new(
                *kind,
                "read",
                format!(
                    "the external data file '{}' is not open: {reason}",
                    path.display()
                ),
            )
            .with_path(&self.path)),
        }
    }

    /// Reads host bytes; the part past the end of the file reads as zeroes (as QEMU's file
    /// driver does for short reads).
    fn read_host(&self, file: &HostFile, buf: &mut [u8], host: u64) -> Result<()> {
        let end = host.saturating_add(buf.len() as u64);
        let mut len = self.data_len.load(Ordering::Relaxed);
        if end > len {
            len = file.len()?;
            self.data_len.store(len, Ordering::Relaxed);
        }
        let inside = len.saturating_sub(host).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        file.read_at(head, host)?;
        tail.fill(0);
        Ok(())
    }

    pub(crate) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = backing.size();
        let inside = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            backing.read_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn read_compressed(&self, buf: &mut [u8], offset: u64, host: u64, clen: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let whole_cluster = buf.len() as u64 == cs && offset & (cs - 1) == 0;
        if whole_cluster {
            // A copy reads whole clusters: straight into the caller's buffer, no cached copy
            // (the next read is of another cluster).
            let mut input = vec![0u8; clen as usize];
            self.read_host(&self.file, &mut input, host)?;
            return compress::decompress(self.header.compression_type, &input, buf, offset)
                .map_err(|e| e.with_path(&self.path));
        }
        let cached = match &*self.last_compressed.lock() {
            Some((at, data)) if *at == host => Some(Arc::clone(data)),
            _ => None,
        };
        let cluster = match cached {
            Some(c) => c,
            None => {
                // The stored length is bounded by the entry's sector count field, which
                // is at most twice the cluster size plus a sector.
                let mut input = vec![0u8; clen as usize];
                self.read_host(&self.file, &mut input, host)?;
                let mut out = vec![0u8; cs as usize];
                compress::decompress(
                    self.header.compression_type,
                    &input,
                    &mut out,
                    offset & !(cs - 1),
                )
                .map_err(|e| e.with_path(&self.path))?;
                let out: Arc<[u8]> = Arc::from(out);
                *self.last_compressed.lock() = Some((host, Arc::clone(&out)));
                out
            }
        };
        let start = (offset & (cs - 1)) as usize;
        buf.copy_from_slice(&cluster[start..start + buf.len()]);
        Ok(())
    }

    /// Reads guest bytes with the I/O lock already held (shared or exclusive).
    pub(crate) fn read_locked(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (kind, run) = self.lookup(pos, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + run as usize];
            match kind {
                Kind::Unallocated | Kind::UnallocatedAlloc { .. } => {
                    self.read_backing(chunk, pos)?
                }
                Kind::ZeroPlain | Kind::ZeroAlloc { .. } => chunk.fill(0),
                Kind::Normal { host } => {
                    let file = self.data_file()?;
                    self.read_host(file, chunk, host)?;
                    self.decrypt_data(pos, host, chunk)?
                }
                Kind::Compressed { offset: h, len } => self.read_compressed(chunk, pos, h, len)?,
            }
            done += run as usize;
        }
        Ok(())
    }

    pub(crate) fn read_only_error(&self, op: &'static str) -> Error {
        Error::new(ErrorKind::ReadOnly, op, "the image is open read-only").with_path(&self.path)
    }

    /// Whether block status looks through data clusters to host holes.
    fn looks_through(&self) -> Result<bool> {
        if let Some(&known) = self.look_through.get() {
            return Ok(known);
        }
        let found = crate::prealloc::looks_preallocated(&self.file, &self.header)
            .map_err(|e| e.with_path(&self.path))?;
        Ok(*self.look_through.get_or_init(|| found))
    }

    /// Whether `len` bytes at host offset `host` of the data file start with a hole, and
    /// how far that hole (or data) goes. File systems that cannot tell report data.
    fn host_zero_run(&self, host: u64, len: u64) -> Result<(bool, u64)> {
        let Ok(file) = self.data_file() else {
            return Ok((false, len));
        };
        let end = host + len;
        match file.next_data(host) {
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok((false, len)),
            Err(e) => Err(e),
            Ok(None) => Ok((true, len)),
            Ok(Some(data)) if data > host => Ok((true, data.min(end) - host)),
            Ok(Some(_)) => {
                let hole = file.next_hole(host)?.unwrap_or(end);
                Ok((false, hole.clamp(host + 1, end) - host))
            }
        }
    }

    fn data_path(&self) -> PathBuf {
        match &self.data {
            DataFile::External(f) => f.path().to_path_buf(),
            DataFile::NotOpened { path, .. } | DataFile::Deferred { path, .. } => path.clone(),
            DataFile::Internal => self.path.clone(),
        }
    }
}

/// `kind` as seen from `in_cluster` bytes into its cluster.
fn at_offset(kind: Kind, in_cluster: u64) -> Kind {
    match kind {
        Kind::Normal { host } => Kind::Normal {
            host: host + in_cluster,
        },
        Kind::ZeroAlloc { host } => Kind::ZeroAlloc {
            host: host + in_cluster,
        },
        Kind::UnallocatedAlloc { host } => Kind::UnallocatedAlloc {
            host: host + in_cluster,
        },
        other => other,
    }
}

/// True when `next`, found `dist` bytes after the start of a run of `start`, belongs to it.
fn continues(start: Kind, dist: u64, next: Kind) -> bool {
    match (start, next) {
        // An unallocated subcluster of an allocated cluster has a host offset (QEMU's map
        // shows it), so it does not join a run of wholly unallocated clusters.
        (Kind::Unallocated, Kind::Unallocated) | (Kind::ZeroPlain, Kind::ZeroPlain) => true,
        (Kind::UnallocatedAlloc { host: a }, Kind::UnallocatedAlloc { host: b })
        | (Kind::Normal { host: a }, Kind::Normal { host: b })
        | (Kind::ZeroAlloc { host: a }, Kind::ZeroAlloc { host: b }) => {
            a.checked_add(dist) == Some(b)
        }
        _ => false,
    }
}

/// A dirty image (lazy refcounts, not closed cleanly) has stale refcounts: like QEMU, a
/// read/write open recounts them first.
fn rebuild_if_dirty(path: &Path, options: &OpenOptions) -> Result<()> {
    let dirty = {
        let file = HostFile::open(path, false, options.cache, options.engine)?;
        let header = read_header(&file, file.len()?).map_err(|e| e.with_path(path))?;
        header.incompatible_features & header::incompat::DIRTY != 0
            && header.incompatible_features & header::incompat::CORRUPT == 0
    };
    if dirty {
        let report = crate::check::check(path, options, vdisk_block::RepairMode::All)?;
        if report.corruptions > 0 {
            return Err(Error::corrupt(
                "open",
                format!(
                    "the dirty image still has {} corruptions after its refcounts were rebuilt",
                    report.corruptions
                ),
            )
            .with_path(path));
        }
    }
    Ok(())
}

pub(crate) fn read_header(file: &HostFile, file_len: u64) -> Result<Header> {
    let first = file_len.min(u64::from(header::V3_HEADER_LEN)) as usize;
    let mut start = vec![0u8; first];
    file.read_at(&mut start, 0)?;
    let cluster_bits = header::peek_cluster_bits(&start)?;
    let cluster0_len = file_len.min(1u64 << cluster_bits) as usize;
    let mut cluster0 = vec![0u8; cluster0_len];
    file.read_at(&mut cluster0, 0)?;
    Header::parse(&cluster0)
}

fn read_l1(file: &HostFile, h: &Header, file_len: u64) -> Result<Vec<u64>> {
    let bytes = u64::from(h.l1_size) * 8;
    if bytes == 0 {
        return Ok(Vec::new());
    }
    // The header check already capped `bytes` at 32 MiB; the file must also hold the table.
    if h.l1_table_offset + bytes > file_len {
        return Err(Error::corrupt(
            "open",
            format!(
                "Active L1 table offset invalid: the table at {:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)",
                h.l1_table_offset
            ),
        ));
    }
    let mut raw = vec![0u8; bytes as usize];
    file.read_at(&mut raw, h.l1_table_offset)?;
    Ok(read_be_u64s(&raw))
}

impl BlockDev for Qcow2Image {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _io = self.io.read();
        if self.encrypted() && (!offset.is_multiple_of(512) || !buf.len().is_multiple_of(512)) {
            return self.read_unaligned_encrypted(buf, offset);
        }
        self.read_locked(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.note_guest_write(offset, buf.len() as u64)?;
        self.write_impl(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.note_guest_write(offset, len)?;
        self.write_zeroes_impl(offset, len, mode)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.note_guest_write(offset, len)?;
        self.discard_impl(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_impl()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("block status", self.size(), offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range").at_offset(offset));
        }
        let _io = self.io.read();
        // qemu answers at most one L2 table's worth at a time; callers that cut their work
        // by extents (compare's reads, convert's and compare's progress) then cut it where
        // qemu-img does. (Those that print extents, map, merge them as qemu-img's does.)
        let shift = self.header.l1_entry_shift();
        let table_end = ((offset >> shift) + 1)
            .checked_shl(shift)
            .unwrap_or(u64::MAX);
        let len = len.min(table_end - offset);
        let (first, mut run) = self.lookup(offset, len)?;
        while run < len {
            let (next, more) = self.lookup(offset + run, len - run)?;
            let joins = continues(first, run, next)
                || matches!(
                    (first, next),
                    (Kind::Compressed { .. }, Kind::Compressed { .. })
                );
            if !joins {
                break;
            }
            run += more;
        }
        let encrypted = self.encrypted();
        let host = |h: u64| {
            (!encrypted).then(|| HostLocation {
                file: self.data_path(),
                offset: h,
            })
        };
        let mut st = BlockStatus {
            offset,
            len: run,
            data: false,
            zero: false,
            allocated: true,
            compressed: false,
            host: None,
        };
        match first {
            Kind::Unallocated => {
                st.allocated = false;
                st.zero = self.backing.is_none();
            }
            Kind::UnallocatedAlloc { host: h } => {
                // QEMU names the host cluster of an unallocated subcluster too, so its map
                // shows the offset where the image stores nothing.
                st.allocated = false;
                st.zero = self.backing.is_none();
                st.host = host(h);
            }
            Kind::ZeroPlain => st.zero = true,
            Kind::ZeroAlloc { host: h } => {
                st.zero = true;
                st.host = host(h);
            }
            Kind::Normal { host: h } => {
                st.data = true;
                st.host = host(h);
                if !encrypted && self.looks_through()? {
                    // Like QEMU, look through to the host file of a metadata-preallocated
                    // image: a hole there (a sparse preallocated cluster) reads as zeroes.
                    let (zero, len) = self.host_zero_run(h, run)?;
                    st.zero = zero;
                    st.len = len;
                }
            }
            Kind::Compressed { .. } => {
                st.data = true;
                st.compressed = true;
            }
        }
        Ok(st)
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.resize_bitmaps_check()?;
        self.resize_impl(new_size, prealloc)?;
        self.resize_bitmaps(self.size())
    }

    fn info(&self) -> Result<ImageInfo> {
        let h = &self.header;
        Ok(ImageInfo {
            format: "qcow2".into(),
            filename: self.path.clone(),
            virtual_size: self.size(),
            actual_size: Some(self.file.allocated_bytes()?),
            file_length: Some(self.file.len()?),
            cluster_size: Some(h.cluster_size()),
            dirty: h.incompatible_features & header::incompat::DIRTY != 0,
            encrypted: h.crypt_method != CryptMethod::None,
            backing_filename: h.backing_file.clone(),
            full_backing_filename: h
                .backing_file
                .as_deref()
                .and_then(|name| open::resolve(&self.path, name, "backing file").ok()),
            backing_format: h.extensions.backing_format.clone(),
            children: Vec::new(),
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        self.backing.clone()
    }

    fn compressed_unit(&self) -> Option<u64> {
        Some(self.header.cluster_size())
    }

    fn compress_unit(&self, buf: &[u8]) -> Result<Option<Vec<u8>>> {
        self.compress_cluster(buf)
    }

    fn write_compressed_unit(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        self.note_guest_write(offset, buf.len() as u64)?;
        self.write_compressed_cluster(buf, packed, offset)
    }

    fn format_specific(&self) -> Result<Option<FormatSpecific>> {
        let mut specific = self.qcow2_info()?.format_specific();
        if let Some(encrypt) = self.encrypt_info() {
            // qemu's QDict order: after refcount-bits and data-file, before the rest.
            let at = specific
                .data
                .iter()
                .position(|(k, _)| k == "refcount-bits")
                .map_or(specific.data.len(), |i| i + 1);
            let at = if specific.data.get(at).is_some_and(|(k, _)| k == "data-file") {
                at + 1
            } else {
                at
            };
            specific.data.insert(at, ("encrypt".into(), encrypt));
        }
        Ok(Some(specific))
    }

    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let (table, _) = crate::snapshot::read_table(&self.file, &self.current_header())
            .map_err(|e| e.with_path(&self.path))?;
        Ok(table
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                icount: s.icount(),
            })
            .collect())
    }

    fn snapshot_create(&self, name: &str) -> Result<()> {
        self.snapshot_create_as_qemu(name)
    }

    fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        Qcow2Image::snapshot_apply(self, id_or_name)
    }

    fn snapshot_delete(&self, id: &str, name: &str) -> Result<()> {
        self.snapshot_delete_exact(id, name)
    }

    fn load_snapshot(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.load_snapshot_tmp(id, name)
    }

    fn has_zero_init(&self) -> bool {
        // A fresh image without backing or data file reads as zeroes; an external data
        // file may hold anything. An encrypted one does too unless it was preallocated
        // (qemu's test: a first L2 table), whose clusters decrypt to noise.
        self.backing.is_none()
            && self.header.backing_file.is_none()
            && !self.header.has_data_file()
            && (!self.encrypted() || self.meta.lock().l1.first().is_none_or(|&e| e == 0))
    }

    fn resolve_read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        check_range("resolve read", self.size(), offset, len)?;
        // The segments are only valid until the next write; callers that write concurrently
        // must order their own requests, as with any disk.
        let _io = self.io.read();
        let encrypted = self.encrypted();
        let mut out: Vec<ReadSegment> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (kind, run) = self.lookup(pos, len - done)?;
            let seg = match kind {
                Kind::ZeroPlain | Kind::ZeroAlloc { .. } => ReadSegment::Zero { len: run },
                Kind::Unallocated | Kind::UnallocatedAlloc { .. } if self.backing.is_none() => {
                    ReadSegment::Zero { len: run }
                }
                Kind::Normal { host } if !encrypted => match self.data_file() {
                    Ok(file) if host + run <= self.data_len.load(Ordering::Relaxed) => {
                        ReadSegment::Host {
                            file: Arc::clone(file),
                            offset: host,
                            len: run,
                        }
                    }
                    _ => ReadSegment::Indirect { len: run },
                },
                _ => ReadSegment::Indirect { len: run },
            };
            match (out.last_mut(), &seg) {
                (Some(ReadSegment::Indirect { len: a }), ReadSegment::Indirect { len: b })
                | (Some(ReadSegment::Zero { len: a }), ReadSegment::Zero { len: b }) => *a += b,
                _ => out.push(seg),
            }
            done += run;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn dirty_bitmaps(&self) -> Result<Vec<vdisk_block::DirtyBitmapInfo>> {
        self.bitmap_list()
    }

    fn dirty_bitmap_add(&self, name: &str, granularity: Option<u64>, disabled: bool) -> Result<()> {
        self.add_bitmap(name, granularity, disabled)
    }

    fn dirty_bitmap_remove(&self, name: &str) -> Result<()> {
        self.remove_bitmap(name)
    }

    fn dirty_bitmap_clear(&self, name: &str) -> Result<()> {
        self.clear_bitmap(name)
    }

    fn dirty_bitmap_enable(&self, name: &str, enabled: bool) -> Result<()> {
        self.enable_bitmap(name, enabled)
    }

    fn dirty_bitmap_merge(&self, dst: &str, src: &dyn BlockDev, src_name: &str) -> Result<()> {
        self.check_bitmap_usable(dst)?;
        let ranges = src.dirty_bitmap_ranges(src_name)?;
        self.merge_bitmap_ranges(dst, src.size(), &ranges)
    }

    fn dirty_bitmap_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        self.bitmap_ranges(name)
    }

    fn dirty_bitmap_set_range(&self, name: &str, offset: u64, len: u64, dirty: bool) -> Result<()> {
        self.set_bitmap_range(name, offset, len, dirty)
    }

    fn store_dirty_bitmaps(&self) -> Result<()> {
        self.store_bitmaps()
    }
}

/// The qcow2-specific facts `qemu-img info` prints under `format-specific`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `0.10` (version 2) or `1.1` (version 3).
    pub compat: &'static str,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Lazy refcounts (version 3 only).
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The corrupt bit.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// The external data file name, if any.
    pub data_file: Option<String>,
    /// The data file is a valid raw image by itself.
    pub data_file_raw: bool,
    /// Internal snapshots.
    pub snapshots: Vec<crate::snapshot::Snapshot>,
    /// Persistent dirty bitmaps.
    pub bitmaps: Vec<crate::bitmap::Bitmap>,
}

impl Qcow2Info {
    /// The facts in the order `qemu-img info` prints them (version 2 images show only
    /// `compat`, `compression-type` and `refcount-bits`, as qemu does).
    pub fn format_specific(&self) -> FormatSpecific {
        let mut data = vec![
            ("compat".to_string(), InfoValue::Text(self.compat.into())),
            (
                "compression-type".into(),
                InfoValue::Text(self.compression_type.into()),
            ),
        ];
        let v3 = self.compat != "0.10";
        if v3 {
            data.push((
                "lazy-refcounts".into(),
                InfoValue::Bool(self.lazy_refcounts),
            ));
            if !self.bitmaps.is_empty() {
                let list = self
                    .bitmaps
                    .iter()
                    .map(|b| {
                        InfoValue::Map(vec![
                            (
                                "flags".into(),
                                InfoValue::List(
                                    b.flag_names()
                                        .into_iter()
                                        .map(|f| InfoValue::Text(f.into()))
                                        .collect(),
                                ),
                            ),
                            ("name".into(), InfoValue::Text(b.name.clone())),
                            ("granularity".into(), InfoValue::UInt(b.granularity)),
                        ])
                    })
                    .collect();
                data.push(("bitmaps".into(), InfoValue::List(list)));
            }
        }
        data.push((
            "refcount-bits".into(),
            InfoValue::UInt(u64::from(self.refcount_bits)),
        ));
        if v3 {
            if let Some(file) = &self.data_file {
                data.push(("data-file".into(), InfoValue::Text(file.clone())));
                data.push(("data-file-raw".into(), InfoValue::Bool(self.data_file_raw)));
            }
            data.push(("corrupt".into(), InfoValue::Bool(self.corrupt)));
            data.push(("extended-l2".into(), InfoValue::Bool(self.extended_l2)));
        }
        FormatSpecific {
            kind: "qcow2".into(),
            data,
        }
    }
}

impl Qcow2Image {
    /// The header as it stands now (size, L1 and snapshot fields change while open).
    pub fn current_header(&self) -> Header {
        self.header_with(&self.meta.lock())
    }

    /// [`Self::current_header`] with the metadata lock already held.
    pub(crate) fn header_with(&self, meta: &Meta) -> Header {
        let mut h = self.header.clone();
        h.size = self.size();
        h.l1_size = meta.l1.len() as u32;
        h.l1_table_offset = meta.l1_offset;
        h.snapshots_offset = meta.snapshots_offset;
        h.nb_snapshots = meta.nb_snapshots;
        h.extensions.bitmaps = meta.bitmaps_ext;
        h.autoclear_features = meta.autoclear;
        h
    }

    /// The format-specific facts for `info` (the snapshot table is read now).
    pub fn qcow2_info(&self) -> Result<Qcow2Info> {
        let h = &self.current_header();
        let (snapshots, _) =
            crate::snapshot::read_table(&self.file, h).map_err(|e| e.with_path(&self.path))?;
        Ok(Qcow2Info {
            compat: h.compat_str(),
            compression_type: h.compression_type.as_str(),
            lazy_refcounts: h.compatible_features & header::compat::LAZY_REFCOUNTS != 0,
            refcount_bits: h.refcount_bits(),
            corrupt: h.incompatible_features & header::incompat::CORRUPT != 0,
            extended_l2: h.extended_l2(),
            data_file: h
                .has_data_file()
                .then(|| h.extensions.data_file.clone())
                .flatten(),
            data_file_raw: h.data_file_raw(),
            snapshots,
            bitmaps: crate::bitmap::read_directory(&self.file, h)
                .map_err(|e| e.with_path(&self.path))?,
        })
    }
}
