//! The sources of a copy seen as one read-only device, each padded to whole sectors.
//!
//! Compressed copies work in whole target clusters, and a cluster may straddle two
//! sources; reading and planning through this view keeps that out of the engine.

use std::sync::Arc;

use vdisk_block::{
    check_range, BlockDev, BlockStatus, Error, ImageInfo, Preallocation, Result, ZeroMode,
};

use super::plan::padded_size;

/// Sources concatenated, each taking its size rounded up to whole sectors.
pub struct Concat {
    sources: Vec<Arc<dyn BlockDev>>,
    /// Where each source starts in the concatenation.
    starts: Vec<u64>,
    size: u64,
}

impl Concat {
    /// The concatenation of `sources`.
    pub fn new(sources: &[Arc<dyn BlockDev>]) -> Result<Self> {
        let mut starts = Vec::with_capacity(sources.len());
        let mut size = 0u64;
        for s in sources {
            starts.push(size);
            size = size.checked_add(padded_size(s.as_ref())).ok_or_else(|| {
                Error::invalid("convert", "the sources' sizes add up past 2^64 bytes")
            })?;
        }
        Ok(Concat {
            sources: sources.to_vec(),
            starts,
            size,
        })
    }

    /// The source holding `offset` (< size), and the offset inside it.
    fn locate(&self, offset: u64) -> (usize, u64) {
        let i = self.starts.partition_point(|&s| s <= offset) - 1;
        (i, offset - self.starts[i])
    }

    fn read_only() -> Error {
        Error::unsupported("write", "the sources of a copy are read-only")
    }
}

impl BlockDev for Concat {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let (i, local) = self.locate(offset + done as u64);
            let source = &self.sources[i];
            let padded = padded_size(source.as_ref());
            let n = ((padded - local) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            // Bytes of the sector padding past the source's end read as zeroes.
            let real = source.size().saturating_sub(local).min(n as u64) as usize;
            if real > 0 {
                source.read_at(&mut piece[..real], local)?;
            }
            piece[real..].fill(0);
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Self::read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _mode: ZeroMode) -> Result<()> {
        Err(Self::read_only())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Self::read_only())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("block status", self.size, offset, len)?;
        let (i, local) = self.locate(offset);
        let source = &self.sources[i];
        let size = source.size();
        let padded = padded_size(source.as_ref());
        let within = len.min(padded - local);
        if local >= size {
            return Ok(BlockStatus {
                offset,
                len: within,
                data: false,
                zero: true,
                allocated: true,
                compressed: false,
                host: None,
            });
        }
        let mut st = source.block_status(local, within.min(size - local))?;
        st.offset = offset;
        Ok(st)
    }

    /// One source's backing device (`convert -B` takes only one source), so that a
    /// compressed copy onto a target with a backing file sees where the source's falls
    /// through.
    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        match self.sources.as_slice() {
            [only] => only.backing(),
            _ => None,
        }
    }

    fn resize(&self, _new_size: u64, _prealloc: Preallocation) -> Result<()> {
        Err(Self::read_only())
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "concat".into(),
            virtual_size: self.size,
            ..ImageInfo::default()
        })
    }

    fn is_read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::MemImage;

    #[test]
    fn reads_and_status_cross_sources_with_sector_padding() {
        let a = MemImage::shared(1000);
        a.write_at(&[7u8; 1000], 0).expect("write");
        let b = MemImage::shared(4096);
        b.write_at(&[9u8; 10], 4000).expect("write");
        let sources: Vec<Arc<dyn BlockDev>> = vec![a, b];
        let c = Concat::new(&sources).expect("concat");
        assert_eq!(c.size(), 1024 + 4096);
        let mut buf = vec![1u8; 2000];
        c.read_at(&mut buf, 500).expect("read");
        assert!(buf[..500].iter().all(|&x| x == 7));
        assert!(
            buf[500..524].iter().all(|&x| x == 0),
            "padding reads as zeroes"
        );
        assert!(buf[524..].iter().all(|&x| x == 0));
        let st = c.block_status(1000, 4000).expect("status");
        assert_eq!((st.offset, st.len, st.zero), (1000, 24, true));
        let st = c.block_status(1024 + 4000, 96).expect("status");
        assert!(st.data && st.offset == 1024 + 4000);
    }
}
