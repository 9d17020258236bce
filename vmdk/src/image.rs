//! An opened VMDK disk: its descriptor, its extents laid end to end, and its parent.
//!
//! Reads split a guest range at extent boundaries and hand each piece to its extent; ranges
//! a sparse extent does not hold come from the parent, or read as zeroes without one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::Arc;

use parking_lot::Mutex;

use vdisk_block::{
    check_range, BlockDev, BlockStatus, Error, ErrorKind, HostFile, ImageInfo, Preallocation,
    ReadSegment, Result, ZeroMode,
};

use crate::descriptor::Descriptor;
use crate::extent::{Extent, ExtentData};

/// An opened VMDK image (read-only for now).
pub struct VmdkImage {
    pub(crate) path: PathBuf,
    pub(crate) descriptor: Descriptor,
    pub(crate) extents: Vec<Extent>,
    pub(crate) size: u64,
    pub(crate) backing: Option<Arc<dyn BlockDev>>,
    /// The parent as the descriptor names it, resolved against the image's folder.
    pub(crate) parent_path: Option<PathBuf>,
    /// Where the descriptor lives, when the image is writable.
    pub(crate) desc_store: Option<DescriptorStore>,
    /// Serialises writers: allocation and table updates happen under it; reads never take it.
    pub(crate) write_lock: Mutex<()>,
    /// The CID has been changed for this open (done before the first write, as VMware and
    /// qemu do, so a delta taken earlier no longer matches).
    pub(crate) cid_bumped: AtomicBool,
    /// For a disk of an appliance: which one, and what else the appliance holds.
    pub(crate) appliance: Option<ApplianceDisk>,
}

impl ApplianceDisk {
    /// The appliance's disks for `info` (qemu has no such section: it cannot read
    /// appliances), the opened one marked.
    pub fn info_value(&self) -> vdisk_block::dev::InfoValue {
        use vdisk_block::dev::InfoValue;
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut m = vec![
                    ("disk".to_string(), InfoValue::UInt(i as u64)),
                    ("id".to_string(), InfoValue::Text(d.id.clone())),
                ];
                if let Some(href) = &d.href {
                    m.push(("file".to_string(), InfoValue::Text(href.clone())));
                }
                if let Some(c) = d.capacity {
                    m.push(("capacity".to_string(), InfoValue::UInt(c)));
                }
                if let Some(c) = &d.compression {
                    m.push(("compression".to_string(), InfoValue::Text(c.clone())));
                }
                InfoValue::Map(m)
            })
            .collect();
        InfoValue::Map(vec![
            (
                "opened-disk".to_string(),
                InfoValue::UInt(self.index as u64),
            ),
            ("disks".to_string(), InfoValue::List(disks)),
        ])
    }
}

/// Where a disk opened from an `.ova`/`.ovf` sits in its appliance.
#[derive(Debug, Clone)]
pub struct ApplianceDisk {
    /// The disk's number (from 0), as `disk=N` selects it.
    pub index: usize,
    /// Every disk the appliance lists, in order.
    pub disks: Vec<crate::ovf::OvfDisk>,
}

/// Where a writable image's descriptor is kept.
#[derive(Debug)]
pub(crate) enum DescriptorStore {
    /// Embedded in a sparse file: at most `capacity` bytes at `offset`.
    Embedded {
        /// The sparse file.
        file: Arc<HostFile>,
        /// Byte offset of the descriptor.
        offset: u64,
        /// Bytes reserved for it.
        capacity: u64,
    },
    /// A text file of its own.
    Text(Arc<HostFile>),
}

impl DescriptorStore {
    /// Replaces the stored descriptor with `descriptor`.
    pub(crate) fn store(&self, descriptor: &Descriptor) -> Result<()> {
        let text = descriptor.to_bytes();
        match self {
            DescriptorStore::Embedded {
                file,
                offset,
                capacity,
            } => {
                if text.len() as u64 > *capacity {
                    return Err(Error::invalid(
                        "write vmdk descriptor",
                        format!(
                            "the descriptor ({} bytes) does not fit the {capacity} bytes reserved for it",
                            text.len()
                        ),
                    )
                    .with_path(file.path()));
                }
                let mut padded = text;
                padded.resize(*capacity as usize, 0);
                file.write_at(&padded, *offset)?;
                file.flush()
            }
            DescriptorStore::Text(file) => {
                file.write_at(&text, 0)?;
                file.set_len(text.len() as u64)?;
                file.flush()
            }
        }
    }
}

/// A content id nobody else has: qemu and VMware use a random one.
pub(crate) fn new_cid() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ u64::from(COUNTER.fetch_add(1, AtomicOrdering::Relaxed))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let cid = (z ^ (z >> 31)) as u32;
    // 0xffffffff means "no parent" in parentCID; never hand it out as a CID.
    if cid == u32::MAX {
        0xfffffffe
    } else {
        cid
    }
}

impl std::fmt::Debug for VmdkImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("extents", &self.extents)
            .field("parent", &self.parent_path)
            .finish()
    }
}

impl VmdkImage {
    /// The descriptor (embedded or separate) the disk was opened with.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The extents in guest order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The index of the extent holding guest byte `offset` (which must be below the size).
    fn extent_at(&self, offset: u64) -> usize {
        self.extents
            .partition_point(|e| e.start + e.len <= offset)
            .min(self.extents.len().saturating_sub(1))
    }

    /// The stream writer, when the image is one streamOptimized extent open for writing.
    fn stream(&self) -> Option<&crate::stream::StreamWriter> {
        match self.extents.as_slice() {
            [Extent {
                data: ExtentData::Stream(stream),
                ..
            }] => Some(stream),
            _ => None,
        }
    }

    fn read_only(&self, op: &'static str) -> Error {
        Error::new(ErrorKind::ReadOnly, op, "the image is open read-only").with_path(&self.path)
    }

    /// Changes the CID once per open, before the first change to the guest's contents.
    fn before_write(&self, op: &'static str) -> Result<()> {
        let Some(store) = &self.desc_store else {
            return Err(self.read_only(op));
        };
        if !self.cid_bumped.load(AtomicOrdering::Acquire) {
            let mut descriptor = self.descriptor.clone();
            descriptor.cid = new_cid();
            store.store(&descriptor)?;
            self.cid_bumped.store(true, AtomicOrdering::Release);
        }
        Ok(())
    }

    /// Runs `each(extent, offset within it, guest offset, length)` over the extents that
    /// `offset..offset + len` touches.
    fn for_extents(
        &self,
        offset: u64,
        len: u64,
        mut each: impl FnMut(&Extent, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let extent = &self.extents[self.extent_at(at)];
            let within = at - extent.start;
            let n = (extent.len - within).min(end - at);
            each(extent, within, at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Refuses a change to `offset..offset + len` before any of it is made when part of the
    /// range lies in a RDONLY or NOACCESS extent: a write spanning a RW and a RDONLY extent
    /// must not land half, and the CID must not change for a write that cannot happen.
    fn check_extents_writable(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if self.desc_store.is_none() {
            return Err(self.read_only(op));
        }
        self.for_extents(offset, len, |extent, within, _, _| {
            extent.check_writable(op, within)
        })
    }

    /// Fills `buf` from guest offset `offset` with what the parent (or nothing) holds.
    fn read_fallthrough(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(parent) => {
                // A parent smaller than the child reads as zeroes past its end.
                let parent_size = parent.size();
                let in_parent = parent_size.saturating_sub(offset).min(buf.len() as u64) as usize;
                let (head, tail) = buf.split_at_mut(in_parent);
                if !head.is_empty() {
                    parent.read_at(head, offset)?;
                }
                tail.fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

impl BlockDev for VmdkImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let extent = &self.extents[self.extent_at(at)];
            let within = at - extent.start;
            let n = ((extent.len - within) as usize).min(buf.len() - done);
            let start = extent.start;
            extent.read(
                &mut buf[done..done + n],
                within,
                &mut |piece: &mut [u8], off: u64| self.read_fallthrough(piece, start + off),
            )?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range("write", self.size, offset, buf.len() as u64)?;
        if let [Extent {
            data: ExtentData::Stream(stream),
            ..
        }] = self.extents.as_slice()
        {
            // The stream keeps its own lock and compresses outside it: writers run in parallel.
            {
                let _guard = self.write_lock.lock();
                self.before_write("write")?;
            }
            return stream.write(buf, offset);
        }
        let _guard = self.write_lock.lock();
        self.check_extents_writable("write", offset, buf.len() as u64)?;
        self.before_write("write")?;
        self.for_extents(offset, buf.len() as u64, |extent, within, at, n| {
            let piece = &buf[(at - offset) as usize..(at - offset + n) as usize];
            let start = extent.start;
            extent.write(piece, within, &mut |fill: &mut [u8], off: u64| {
                self.read_fallthrough(fill, start + off)
            })
        })
    }

    fn compressed_unit(&self) -> Option<u64> {
        self.stream().map(|s| s.reader().grain_bytes())
    }

    fn compresses_every_write(&self) -> bool {
        self.stream().is_some()
    }

    fn compress_unit(&self, buf: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.stream() {
            Some(stream) => stream.compress_grain(buf),
            None => Err(Error::unsupported(
                "write compressed",
                "Operation not supported",
            )),
        }
    }

    fn write_compressed_unit(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        let Some(stream) = self.stream() else {
            return Err(Error::unsupported(
                "write compressed",
                "Operation not supported",
            ));
        };
        // The end of a compressed copy: the closing block is written at the flush.
        if buf.is_empty() {
            return Ok(());
        }
        check_range("write", self.size, offset, buf.len() as u64)?;
        {
            let _guard = self.write_lock.lock();
            self.before_write("write")?;
        }
        stream.write_packed(buf, packed, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        check_range("write zeroes", self.size, offset, len)?;
        let _guard = self.write_lock.lock();
        self.check_extents_writable("write zeroes", offset, len)?;
        self.before_write("write zeroes")?;
        let has_backing = self.backing.is_some();
        self.for_extents(offset, len, |extent, within, _, n| {
            let start = extent.start;
            extent.write_zeroes(
                within,
                n,
                mode,
                has_backing,
                &mut |fill: &mut [u8], off: u64| self.read_fallthrough(fill, start + off),
            )
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range("discard", self.size, offset, len)?;
        if self.desc_store.is_none() {
            return Err(self.read_only("discard"));
        }
        // Discard is advisory and VMDK has no way to free a grain in place (qemu does not
        // implement it either): the data stays.
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.desc_store.is_none() {
            return Ok(());
        }
        let _guard = self.write_lock.lock();
        for extent in &self.extents {
            match &extent.data {
                ExtentData::Stream(stream) => stream.flush()?,
                _ => {
                    if let Some(file) = extent.host_file() {
                        file.flush()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("block status", self.size, offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range").at_offset(offset));
        }
        let extent = &self.extents[self.extent_at(offset)];
        let within = offset - extent.start;
        let len = len.min(extent.len - within);
        extent.status(within, len, self.backing.is_some())
    }

    fn resize(&self, _new_size: u64, _prealloc: Preallocation) -> Result<()> {
        if self.desc_store.is_none() {
            return Err(self.read_only("resize"));
        }
        Err(
            Error::unsupported("resize", "Image format driver does not support resize")
                .with_path(&self.path),
        )
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut files: Vec<&Arc<vdisk_block::HostFile>> = Vec::new();
        for extent in &self.extents {
            if let Some(file) = extent.host_file() {
                if !files.iter().any(|f| f.path() == file.path()) {
                    files.push(file);
                }
            }
        }
        let mut actual = std::fs::metadata(&self.path)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .map_err(|e| Error::io("stat", e).with_path(&self.path))?;
        for file in files.iter().filter(|f| f.path() != self.path) {
            actual += file.allocated_bytes()?;
        }
        let file_length = std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|e| Error::io("stat", e).with_path(&self.path))?;
        let cluster_size = self.extents.iter().find_map(|e| match &e.data {
            ExtentData::Sparse(s) => Some(s.grain_bytes()),
            _ => None,
        });
        Ok(ImageInfo {
            format: "vmdk".into(),
            filename: self.path.clone(),
            virtual_size: self.size,
            actual_size: Some(actual),
            file_length: Some(file_length),
            cluster_size,
            backing_filename: self.descriptor.parent_file_name_hint.clone(),
            full_backing_filename: self.parent_path.clone(),
            backing_format: self.parent_path.as_ref().map(|_| "vmdk".to_string()),
            // qemu opens every extent in a file of its own as child `extents.N`.
            children: self
                .extents
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    let file = e.host_file()?;
                    (file.path() != self.path)
                        .then(|| (format!("extents.{i}"), file.path().to_path_buf()))
                })
                .collect(),
            ..ImageInfo::default()
        })
    }

    fn format_specific(&self) -> Result<Option<vdisk_block::dev::FormatSpecific>> {
        let mut specific = self.details().format_specific();
        if let Some(a) = &self.appliance {
            specific.data.push(("appliance".into(), a.info_value()));
        }
        Ok(Some(specific))
    }

    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        self.backing.clone()
    }

    fn resolve_read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        check_range("resolve read", self.size, offset, len)?;
        let mut out: Vec<ReadSegment> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let st = self.block_status(at, end - at)?;
            let seg = match (&st.host, st.compressed, st.allocated, st.data, st.zero) {
                (Some(host), false, true, true, _) => {
                    let extent = &self.extents[self.extent_at(at)];
                    match extent.host_file() {
                        Some(file) => ReadSegment::Host {
                            file: Arc::clone(file),
                            offset: host.offset,
                            len: st.len,
                        },
                        None => ReadSegment::Indirect { len: st.len },
                    }
                }
                (_, _, _, false, true) => ReadSegment::Zero { len: st.len },
                _ => ReadSegment::Indirect { len: st.len },
            };
            at += st.len;
            match (out.last_mut(), &seg) {
                (Some(ReadSegment::Zero { len: a }), ReadSegment::Zero { len: b }) => *a += b,
                (Some(ReadSegment::Indirect { len: a }), ReadSegment::Indirect { len: b }) => {
                    *a += b
                }
                _ => out.push(seg),
            }
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.desc_store.is_none()
    }

    fn has_zero_init(&self) -> bool {
        // Sparse extents start unallocated and flat files start as holes; a parent breaks it.
        self.backing.is_none()
            && self
                .extents
                .iter()
                .all(|e| !matches!(e.data, ExtentData::NoAccess))
    }
}
