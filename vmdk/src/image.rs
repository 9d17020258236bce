//! An opened VMDK disk: its descriptor, its extents laid end to end, and its parent.
//!
//! Reads split a guest range at extent boundaries and hand each piece to its extent; ranges
//! a sparse extent does not hold come from the parent, or read as zeroes without one.

use std::path::PathBuf;
use std::sync::Arc;

use vdisk_block::{
    check_range, BlockDev, BlockStatus, Error, ErrorKind, ImageInfo, Preallocation, ReadSegment,
    Result, ZeroMode,
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

    fn read_only(&self, op: &'static str) -> Error {
        Error::new(
            ErrorKind::ReadOnly,
            op,
            "the image is open read-only (writing VMDK is not implemented yet)",
        )
        .with_path(&self.path)
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

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(self.read_only("write"))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _mode: ZeroMode) -> Result<()> {
        Err(self.read_only("write zeroes"))
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(self.read_only("discard"))
    }

    fn flush(&self) -> Result<()> {
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
        Err(self.read_only("resize"))
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
            ..ImageInfo::default()
        })
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
        true
    }
}
