//! The host file as seen after an in-memory log replay.
//!
//! A read-only open must see the image as if its VHDX log had been replayed, without writing
//! the file. The replayed writes live here as non-overlapping extents (data or zeroes) over the
//! host file; every metadata read, and data reads that touch an extent, go through it. An
//! image without a pending log has an empty overlay and reads the file directly.

use std::collections::BTreeMap;
use std::sync::Arc;

use vdisk_block::{Error, HostFile, Result};

/// What an overlay extent holds.
#[derive(Debug, Clone)]
enum Content {
    /// Reads as zeroes.
    Zero,
    /// Reads from `data[skip..]`.
    Data { data: Arc<[u8]>, skip: usize },
}

#[derive(Debug, Clone)]
struct Extent {
    len: u64,
    content: Content,
}

/// A host file plus replayed writes that have not reached it.
#[derive(Debug)]
pub struct Overlaid {
    file: Arc<HostFile>,
    extents: BTreeMap<u64, Extent>,
    /// The file length after replay (replay may extend the file).
    len: u64,
    /// Nothing was replayed: every read goes straight to the file, whatever its length now.
    direct: bool,
}

impl Overlaid {
    /// The file as it is, with nothing replayed.
    pub fn new(file: Arc<HostFile>) -> Result<Self> {
        let len = file.len()?;
        Ok(Overlaid {
            file,
            extents: BTreeMap::new(),
            len,
            direct: true,
        })
    }

    /// The host file underneath.
    pub fn file(&self) -> &Arc<HostFile> {
        &self.file
    }

    /// The file length as replay left it (as it was at open when nothing was replayed).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the visible file has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when nothing was replayed (reads go straight to the file).
    pub fn is_clean(&self) -> bool {
        self.direct
    }

    /// Writes every replayed change into the host file and flushes it (a writable open
    /// replays for real). Afterwards the view reads the file directly.
    pub fn apply_to_file(&mut self) -> Result<()> {
        if self.direct {
            return Ok(());
        }
        for (at, ext) in &self.extents {
            match &ext.content {
                Content::Zero => self.file.write_zero_bytes(*at, ext.len)?,
                Content::Data { data, skip } => self
                    .file
                    .write_at(&data[*skip..*skip + ext.len as usize], *at)?,
            }
        }
        if self.file.len()? < self.len {
            self.file.set_len(self.len)?;
        }
        self.file.flush()?;
        self.extents.clear();
        self.direct = true;
        Ok(())
    }

    /// True when `offset..offset+len` is exactly what the host file holds.
    pub fn untouched(&self, offset: u64, len: u64) -> bool {
        if self.direct {
            return true;
        }
        let end = offset.saturating_add(len);
        if end > self.file.len().unwrap_or(0) {
            return false;
        }
        !self.overlapping(offset, end).any(|_| true)
    }

    /// Extends the visible file to at least `len` bytes (the extension reads as zeroes).
    pub fn extend_to(&mut self, len: u64) {
        if len > self.len {
            self.direct = false;
        }
        self.len = self.len.max(len);
    }

    /// Records a replayed write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: Arc<[u8]>) {
        let len = data.len() as u64;
        if len == 0 {
            return;
        }
        self.direct = false;
        self.carve(offset, offset + len);
        self.extents.insert(
            offset,
            Extent {
                len,
                content: Content::Data { data, skip: 0 },
            },
        );
        self.len = self.len.max(offset + len);
    }

    /// Records a replayed zeroing of `len` bytes at `offset`.
    pub fn zero(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.direct = false;
        let end = offset.saturating_add(len);
        self.carve(offset, end);
        self.extents.insert(
            offset,
            Extent {
                len: end - offset,
                content: Content::Zero,
            },
        );
        self.len = self.len.max(end);
    }

    /// Removes `[start, end)` from every extent, keeping the parts outside it.
    fn carve(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, Extent)> = self
            .overlapping(start, end)
            .map(|(o, e)| (o, e.clone()))
            .collect();
        for (at, ext) in hit {
            self.extents.remove(&at);
            let ext_end = at + ext.len;
            if at < start {
                let keep = start - at;
                self.extents.insert(
                    at,
                    Extent {
                        len: keep,
                        content: ext.content.clone(),
                    },
                );
            }
            if ext_end > end {
                let cut = end - at;
                let content = match &ext.content {
                    Content::Zero => Content::Zero,
                    Content::Data { data, skip } => Content::Data {
                        data: Arc::clone(data),
                        skip: skip + cut as usize,
                    },
                };
                self.extents.insert(
                    end,
                    Extent {
                        len: ext_end - end,
                        content,
                    },
                );
            }
        }
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &Extent)> + '_ {
        // The extent starting before `start` may reach into the range.
        let first = self
            .extents
            .range(..start)
            .next_back()
            .filter(|(o, e)| **o + e.len > start)
            .map(|(o, _)| *o)
            .unwrap_or(start);
        self.extents
            .range(first..end)
            .map(|(o, e)| (*o, e))
            .filter(move |(o, e)| *o < end && o + e.len > start)
    }

    /// Fills `buf` from `offset` as the replayed file reads. Bytes past the visible length are
    /// an error; bytes between the host file's end and the visible length read as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.direct {
            return self.file.read_at(buf, offset);
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                Error::corrupt(
                    "read",
                    format!(
                        "{} bytes at host offset {offset} lie past the end of the file ({} bytes)",
                        buf.len(),
                        self.len
                    ),
                )
                .with_path(self.file.path())
                .at_offset(offset)
            })?;
        let mut pos = offset;
        while pos < end {
            let out = &mut buf[(pos - offset) as usize..];
            // The extent covering `pos`, or the start of the next one.
            let covering = self.overlapping(pos, end).next();
            match covering {
                Some((at, ext)) if at <= pos => {
                    let n = (at + ext.len).min(end) - pos;
                    let dst = &mut out[..n as usize];
                    match &ext.content {
                        Content::Zero => dst.fill(0),
                        Content::Data { data, skip } => {
                            let from = skip + (pos - at) as usize;
                            dst.copy_from_slice(&data[from..from + n as usize]);
                        }
                    }
                    pos += n;
                }
                other => {
                    let stop = other.map(|(at, _)| at).unwrap_or(end);
                    let n = stop - pos;
                    self.read_file(&mut out[..n as usize], pos)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Reads the host file, with zeroes past its real end.
    fn read_file(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let file_len = self.file.len()?;
        let real = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file.read_at(&mut buf[..real], offset)?;
        buf[real..].fill(0);
        Ok(())
    }
}
