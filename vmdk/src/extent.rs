//! One extent of an opened disk: where a slice of the guest's bytes comes from.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vdisk_block::{BlockStatus, Error, ErrorKind, HostFile, HostLocation, Result, ZeroMode};

use crate::descriptor::{Access, ExtentType};
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
        /// The file's length (kept up to date by writes that extend it).
        file_len: AtomicU64,
    },
    /// Reads as zeroes, stores nothing.
    Zero,
    /// A sparse extent (boxed: it is much larger than the other variants).
    Sparse(Box<SparseExtent>),
    /// A streamOptimized extent opened for appending.
    Stream(Box<crate::stream::StreamWriter>),
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
    /// How the disk may use it.
    pub access: Access,
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
                let file_len = file_len.load(Ordering::Acquire);
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
            ExtentData::Stream(stream) => stream.read(buf, offset),
            ExtentData::NoAccess => Err(self.no_access("read", offset)),
        }
    }

    /// Refuses a change at extent offset `offset` unless the extent is RW.
    pub(crate) fn check_writable(&self, op: &'static str, offset: u64) -> Result<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::NoAccess => Err(self.no_access(op, offset)),
            Access::ReadOnly => Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                format!(
                    "the guest byte {} lies in a RDONLY extent",
                    self.start + offset
                ),
            )
            .at_offset(self.start + offset)),
        }
    }

    /// Writes `buf` at extent offset `offset`; `unallocated` supplies the rest of a grain a
    /// sparse extent allocates.
    pub fn write(
        &self,
        buf: &[u8],
        offset: u64,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        self.check_writable("write", offset)?;
        match &self.data {
            ExtentData::Flat {
                file,
                offset: base,
                file_len,
            } => {
                file.write_at(buf, base + offset)?;
                file_len.fetch_max(base + offset + buf.len() as u64, Ordering::AcqRel);
                Ok(())
            }
            ExtentData::Sparse(sparse) => sparse.write(buf, offset, unallocated),
            ExtentData::Stream(stream) => stream.write(buf, offset),
            ExtentData::Zero => Err(Error::unsupported(
                "write",
                "a ZERO extent stores nothing and cannot be written",
            )
            .at_offset(self.start + offset)),
            ExtentData::NoAccess => Err(self.no_access("write", offset)),
        }
    }

    /// Makes `len` bytes at extent offset `offset` read as zeroes.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        has_backing: bool,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        self.check_writable("write zeroes", offset)?;
        match &self.data {
            ExtentData::Flat {
                file,
                offset: base,
                file_len,
            } => {
                // Past the end of the file the bytes already read as zeroes.
                let end = file_len.load(Ordering::Acquire);
                let len = end.saturating_sub(base + offset).min(len);
                if len == 0 {
                    return Ok(());
                }
                match file.zero_range(base + offset, len) {
                    Ok(()) => Ok(()),
                    Err(_) => file.write_zero_bytes(base + offset, len),
                }
            }
            ExtentData::Sparse(sparse) => {
                sparse.write_zeroes(offset, len, mode, has_backing, unallocated)
            }
            ExtentData::Stream(stream) => stream.write_zeroes(offset, len),
            ExtentData::Zero => Ok(()),
            ExtentData::NoAccess => Err(self.no_access("write zeroes", offset)),
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
                let file_len = file_len.load(Ordering::Acquire);
                if host >= file_len {
                    st.zero = true;
                } else {
                    let end = host + len.min(file_len - host);
                    // Holes in a flat file read as zeroes: say so, as qemu does through its
                    // file layer, so a copy can skip them.
                    let (data, run_end) = match file.next_data(host) {
                        Err(e) if e.kind() == ErrorKind::Unsupported => (true, end),
                        Err(e) => return Err(e),
                        Ok(None) => (false, end),
                        Ok(Some(d)) if d > host => (false, d.min(end)),
                        Ok(Some(_)) => {
                            let hole = file.next_hole(host)?.unwrap_or(end);
                            (true, hole.clamp(host + 1, end))
                        }
                    };
                    st.len = run_end - host;
                    // A flat extent maps every byte, so qemu calls a hole in it data that
                    // reads as zeroes (data and zero), not a hole of the image.
                    st.data = true;
                    st.zero = !data;
                    st.host = Some(HostLocation {
                        file: file.path().to_path_buf(),
                        offset: host,
                    });
                }
            }
            ExtentData::Zero => st.zero = true,
            ExtentData::NoAccess => return Err(self.no_access("block status", offset)),
            ExtentData::Stream(stream) => return Ok(stream.status(offset, len, st)),
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
                            offset: sparse.file().base() + host,
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
            ExtentData::Sparse(sparse) => Some(sparse.file().host()),
            ExtentData::Stream(stream) => Some(stream.reader().file().host()),
            ExtentData::Zero | ExtentData::NoAccess => None,
        }
    }
}
