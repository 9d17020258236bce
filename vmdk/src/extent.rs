//! One extent of an opened disk: where a slice of the guest's bytes comes from.

use std::path::PathBuf;
use std::sync::Arc;

use vdisk_block::{BlockStatus, Error, ErrorKind, HostFile, HostLocation, Result};

use crate::descriptor::ExtentType;
use crate::sparse::{Grain, SparseExtent};

/// The storage behind an extent.
#[derive(Debug)]
pub enum ExtentData {
    /// Raw bytes in `file` from byte `offset` (FLAT and VMFS). Bytes past the end of the
    /// file read as zeroes, as qemu reads them.
    Flat {
        /// The file.
        file: Arc<HostFile>,
        /// Byte offset of the extent's first byte in the file.
        offset: u64,
        /// The file's length when opened.
        file_len: u64,
    },
    /// Reads as zeroes, stores nothing.
    Zero,
    /// A sparse extent (boxed: it is much larger than the other variants).
    Sparse(Box<SparseExtent>),
    /// A NOACCESS extent: it occupies guest space but must not be read.
    NoAccess,
}

/// One extent placed in the guest address space.
#[derive(Debug)]
pub struct Extent {
    /// Guest byte where the extent starts.
    pub start: u64,
    /// Guest bytes it covers.
    pub len: u64,
    /// The type its descriptor line gave (SPARSE for a monolithic file).
    pub kind: ExtentType,
    /// The file, when there is one.
    pub path: Option<PathBuf>,
    /// The storage.
    pub data: ExtentData,
}

impl Extent {
    fn no_access(&self, op: &'static str, offset: u64) -> Error {
        Error::new(
            ErrorKind::PermissionDenied,
            op,
            format!(
                "the guest range at byte {} lies in a NOACCESS extent",
                self.start + offset
            ),
        )
        .at_offset(self.start + offset)
    }

    /// Fills `buf` from extent offset `offset`; `unallocated` supplies ranges a sparse
    /// extent does not hold (with extent offsets).
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        match &self.data {
            ExtentData::Flat {
                file,
                offset: base,
                file_len,
            } => {
                let host = base + offset;
                let in_file = file_len.saturating_sub(host).min(buf.len() as u64) as usize;
                let (head, tail) = buf.split_at_mut(in_file);
                file.read_at(head, host)?;
                tail.fill(0);
                Ok(())
            }
            ExtentData::Zero => {
                buf.fill(0);
                Ok(())
            }
            ExtentData::Sparse(sparse) => sparse.read(buf, offset, unallocated),
            ExtentData::NoAccess => Err(self.no_access("read", offset)),
        }
    }

    /// The status of the run starting at extent offset `offset`, at most `len` bytes.
    /// `has_backing` decides whether unallocated ranges read as zeroes.
    pub fn status(&self, offset: u64, len: u64, has_backing: bool) -> Result<BlockStatus> {
        let mut st = BlockStatus {
            offset: self.start + offset,
            len,
            data: false,
            zero: false,
            allocated: true,
            compressed: false,
            host: None,
        };
        match &self.data {
            ExtentData::Flat {
                file,
                offset: base,
                file_len,
            } => {
                let host = base + offset;
                if host >= *file_len {
                    st.zero = true;
                } else {
                    st.len = len.min(file_len - host);
                    st.data = true;
                    st.host = Some(HostLocation {
                        file: file.path().to_path_buf(),
                        offset: host,
                    });
                }
            }
            ExtentData::Zero => st.zero = true,
            ExtentData::NoAccess => return Err(self.no_access("block status", offset)),
            ExtentData::Sparse(sparse) => {
                let (grain, run) = sparse.status(offset, len)?;
                st.len = run;
                match grain {
                    Grain::Unallocated => {
                        st.allocated = false;
                        st.zero = !has_backing;
                    }
                    Grain::Zero => st.zero = true,
                    Grain::Data(host) => {
                        st.data = true;
                        st.host = Some(HostLocation {
                            file: sparse.file().path().to_path_buf(),
                            offset: host,
                        });
                    }
                    Grain::Compressed(_) => {
                        st.data = true;
                        st.compressed = true;
                    }
                }
            }
        }
        Ok(st)
    }

    /// The host files this extent reads (for `info`'s actual size).
    pub fn host_file(&self) -> Option<&Arc<HostFile>> {
        match &self.data {
            ExtentData::Flat { file, .. } => Some(file),
            ExtentData::Sparse(sparse) => Some(sparse.file()),
            ExtentData::Zero | ExtentData::NoAccess => None,
        }
    }
}
