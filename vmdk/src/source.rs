//! The bytes a sparse extent lives in: a whole host file, or one member of an OVA archive
//! (a range of the tar file, read in place without unpacking).

use std::path::Path;
use std::sync::Arc;

use vdisk_block::{Error, ErrorKind, HostFile, Result};

/// A host file, or a read-only range of one.
#[derive(Debug)]
pub struct Source {
    file: Arc<HostFile>,
    /// Where the range starts in the file.
    base: u64,
    /// The range's length; `None` for a whole file (whose length can change).
    len: Option<u64>,
}

impl Source {
    /// The whole of `file`.
    pub fn whole(file: Arc<HostFile>) -> Self {
        Source {
            file,
            base: 0,
            len: None,
        }
    }

    /// `len` bytes of `file` from `base` (read-only).
    pub fn range(file: Arc<HostFile>, base: u64, len: u64) -> Self {
        Source {
            file,
            base,
            len: Some(len),
        }
    }

    /// The host file.
    pub fn host(&self) -> &Arc<HostFile> {
        &self.file
    }

    /// Where offset 0 of the source lies in the host file.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The host file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// True when writes are possible (a whole file opened for writing).
    pub fn is_writable(&self) -> bool {
        self.len.is_none() && self.file.is_writable()
    }

    /// The source's length.
    pub fn len(&self) -> Result<u64> {
        match self.len {
            Some(len) => Ok(len),
            None => self.file.len(),
        }
    }

    /// True when the source holds no bytes.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `buf` from offset `at` of the source.
    pub fn read_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        if let Some(len) = self.len {
            if at.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    "read",
                    format!("a read at {at} runs past the end of the {len}-byte archive member"),
                )
                .with_path(self.path()));
            }
        }
        self.file.read_at(buf, self.base + at)
    }

    fn whole_only(&self, op: &'static str) -> Result<()> {
        if self.len.is_some() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                op,
                "a disk inside an archive is read-only",
            )
            .with_path(self.path()));
        }
        Ok(())
    }

    /// Writes `buf` at `at` (whole files only).
    pub fn write_at(&self, buf: &[u8], at: u64) -> Result<()> {
        self.whole_only("write")?;
        self.file.write_at(buf, at)
    }

    /// Writes `len` zero bytes at `at` (whole files only).
    pub fn write_zero_bytes(&self, at: u64, len: u64) -> Result<()> {
        self.whole_only("write")?;
        self.file.write_zero_bytes(at, len)
    }

    /// Sets the file's length (whole files only).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.whole_only("truncate")?;
        self.file.set_len(len)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<()> {
        self.file.flush()
    }
}
