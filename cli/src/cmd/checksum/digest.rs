//! The two digests of `vdisk checksum`, computed from an opened image without writing a file.
//!
//! Both cover the same bytes: the image's guest-visible contents through its whole backing
//! chain, `len` bytes long where `len` is the image size rounded up to a whole 512-byte sector
//! (exactly what `qemu-img convert -O raw` writes). Ranges that the allocation map of the chain
//! says read as zeroes are never read from the disk.
//!
//! - `sha256`: SHA-256 of those bytes, equal to `sha256sum` of the raw conversion. Zero ranges
//!   are fed to the hasher from a static zero buffer; one thread reads ahead while the caller's
//!   thread hashes, since a single SHA-256 stream cannot be split.
//! - `blk-sha256`: cut the bytes into blocks of [`BLOCK`] (64 KiB) bytes, the last one shorter
//!   when `len` is not a multiple; `h_i = SHA-256(block_i)`; the digest is
//!   `SHA-256(h_0 || h_1 || ... || h_{n-1} || u64_le(len))` (an empty image hashes only the
//!   eight length bytes). Blocks are independent, so they are hashed on every core; a block
//!   the map says is zero takes a precomputed digest of a zero block and is neither read nor
//!   hashed. Because `h_i` depends only on the bytes, an allocated block of zeroes gives the
//!   same digest as a hole: the result does not depend on how the image is allocated.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use vdisk_block::{BlockDev, Error};
use vdisk_blockjobs::convert::zero::is_zero;
use vdisk_blockjobs::convert::Progress;
use vdisk_blockjobs::map::{chain_status, visible_len};

/// The block size of `blk-sha256`; part of the digest's definition, never to be changed.
pub const BLOCK: u64 = 64 * 1024;

/// The most bytes asked of the allocation map at once (qemu-img map's step too).
const STATUS_STEP: u64 = 1 << 30;

/// Data is read in pieces of this size: large enough for few system calls, small enough
/// that the read-ahead of `sha256` and every worker of `blk-sha256` hold little memory.
const READ_PIECE: u64 = 1 << 20;

/// How many pieces `sha256` reads ahead of the hasher.
const READ_AHEAD: usize = 4;

/// `blk-sha256` classifies and hashes this many blocks (256 MiB of guest data) per round;
/// it bounds the memory for block digests whatever the image size.
const WINDOW_BLOCKS: u64 = 4096;

/// Zeroes that zero ranges are hashed from, so they cost no read and no allocation.
static ZEROES: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// A digest algorithm of `vdisk checksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// SHA-256 of the raw contents.
    Sha256,
    /// SHA-256 over the SHA-256 digests of 64 KiB blocks and the length (see the module doc).
    BlkSha256,
}

impl Algorithm {
    /// Every algorithm, in the order `--help` lists them.
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::BlkSha256];

    /// The name used on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::BlkSha256 => "blk-sha256",
        }
    }

    /// The algorithm called `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// Why a digest could not be computed.
#[derive(Debug)]
pub enum DigestError {
    /// The allocation map could not be read.
    Status(Error),
    /// Reading guest data at this offset failed.
    Read(u64, Error),
}

/// The length a digest covers: the image size rounded up to a whole sector.
pub fn digest_len(dev: &dyn BlockDev) -> u64 {
    visible_len(dev)
}

/// Computes `algorithm` over the contents of `dev`, reporting bytes done to `progress`.
pub fn compute(
    dev: &Arc<dyn BlockDev>,
    algorithm: Algorithm,
    progress: &dyn Progress,
) -> Result<[u8; 32], DigestError> {
    match algorithm {
        Algorithm::Sha256 => sha256(dev, progress),
        Algorithm::BlkSha256 => blk_sha256(dev, progress, workers()),
    }
}

/// One worker per core the process may use.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Walks the allocation map of `dev` (through its backing chain) over `[0, len)`, in order.
struct Extents<'a> {
    dev: &'a Arc<dyn BlockDev>,
    len: u64,
    offset: u64,
}

impl<'a> Extents<'a> {
    fn new(dev: &'a Arc<dyn BlockDev>, len: u64) -> Self {
        Extents {
            dev,
            len,
            offset: 0,
        }
    }

    /// The next extent as `(start, length, reads_as_zero)`, or `None` at the end.
    fn next_extent(&mut self) -> Result<Option<(u64, u64, bool)>, DigestError> {
        if self.offset >= self.len {
            return Ok(None);
        }
        let asked = (self.len - self.offset).min(STATUS_STEP);
        let entry = chain_status(self.dev, self.offset, asked).map_err(DigestError::Status)?;
        // chain_status refuses empty or overlong answers from a driver, but the walk's
        // termination must not rest on that alone.
        if entry.length == 0 || entry.length > asked {
            return Err(DigestError::Status(
                Error::corrupt(
                    "block status",
                    format!(
                        "an extent of {} bytes was described when {asked} were asked",
                        entry.length
                    ),
                )
                .at_offset(self.offset),
            ));
        }
        let start = self.offset;
        self.offset += entry.length;
        Ok(Some((start, entry.length, entry.zero)))
    }
}

/// Reads `buf.len()` guest bytes of `dev` at `offset`; bytes past the device's end (the
/// padding up to a whole sector) read as zeroes.
fn read_padded(dev: &dyn BlockDev, buf: &mut [u8], offset: u64) -> Result<(), DigestError> {
    let size = dev.size();
    let readable = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(readable);
    if !head.is_empty() {
        dev.read_at(head, offset)
            .map_err(|e| DigestError::Read(offset, e))?;
    }
    tail.fill(0);
    Ok(())
}

/// What the read-ahead thread of [`sha256`] hands the hasher, in guest order.
enum Piece {
    /// This many bytes of zeroes.
    Zero(u64),
    /// Bytes read from the image (the whole buffer).
    Data(Vec<u8>),
    /// The walk failed here; nothing follows.
    Failed(DigestError),
}

/// Plain SHA-256 of the contents.
fn sha256(dev: &Arc<dyn BlockDev>, progress: &dyn Progress) -> Result<[u8; 32], DigestError> {
    let len = digest_len(dev.as_ref());
    let (piece_tx, piece_rx) = sync_channel::<Piece>(READ_AHEAD);
    // Spent buffers go back to the reader, so at most READ_AHEAD + 2 ever exist.
    let (spare_tx, spare_rx) = sync_channel::<Vec<u8>>(READ_AHEAD + 2);
    std::thread::scope(|scope| {
        scope.spawn(move || read_ahead(dev, len, &piece_tx, &spare_rx));
        let mut hasher = Sha256::new();
        // The reader ends the stream by dropping its sender, or with Failed.
        for piece in piece_rx {
            match piece {
                Piece::Zero(mut n) => {
                    let mut unreported = 0;
                    while n > 0 {
                        let step = n.min(BLOCK);
                        hasher.update(&ZEROES[..step as usize]);
                        n -= step;
                        unreported += step;
                        // Progress in whole read pieces: often enough, cheap enough.
                        if unreported >= READ_PIECE || n == 0 {
                            progress.advance(unreported);
                            unreported = 0;
                        }
                    }
                }
                Piece::Data(buf) => {
                    hasher.update(&buf);
                    progress.advance(buf.len() as u64);
                    // The reader may be gone (it finished); the buffer is then just dropped.
                    let _ = spare_tx.try_send(buf);
                }
                Piece::Failed(e) => return Err(e),
            }
        }
        Ok(hasher.finalize().into())
    })
}

/// The read-ahead side of [`sha256`]: walks the map and reads data ranges in order.
fn read_ahead(
    dev: &Arc<dyn BlockDev>,
    len: u64,
    out: &SyncSender<Piece>,
    spare: &Receiver<Vec<u8>>,
) {
    let mut extents = Extents::new(dev, len);
    loop {
        let (start, length, zero) = match extents.next_extent() {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                let _ = out.send(Piece::Failed(e));
                return;
            }
        };
        if zero {
            if out.send(Piece::Zero(length)).is_err() {
                return;
            }
            continue;
        }
        let end = start + length;
        let mut offset = start;
        while offset < end {
            let n = (end - offset).min(READ_PIECE) as usize;
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(n, 0);
            let piece = match read_padded(dev.as_ref(), &mut buf, offset) {
                Ok(()) => Piece::Data(buf),
                Err(e) => Piece::Failed(e),
            };
            let failed = matches!(piece, Piece::Failed(_));
            // A closed channel means the hasher stopped; there is nobody to read for.
            if out.send(piece).is_err() || failed {
                return;
            }
            offset += n as u64;
        }
    }
}

/// The SHA-256 of `n` zero bytes (`n` at most [`BLOCK`]).
fn zero_digest(n: u64) -> [u8; 32] {
    Sha256::digest(&ZEROES[..n.min(BLOCK) as usize]).into()
}

/// A run of blocks that must be read: blocks `first..first + count`.
#[derive(Debug, Clone, Copy)]
struct Task {
    first: u64,
    count: u64,
}

/// Block digests of `blk-sha256`, computed `workers` at a time.
fn blk_sha256(
    dev: &Arc<dyn BlockDev>,
    progress: &dyn Progress,
    workers: usize,
) -> Result<[u8; 32], DigestError> {
    let len = digest_len(dev.as_ref());
    let blocks = len.div_ceil(BLOCK);
    let full_zero = zero_digest(BLOCK);
    let last_len = len - blocks.saturating_sub(1) * BLOCK;
    let last_zero = zero_digest(last_len);
    let block_len = |b: u64| if b + 1 == blocks { last_len } else { BLOCK };

    let mut outer = Sha256::new();
    let mut extents = Extents::new(dev, len);
    // The extent the previous window stopped inside: (start, end, zero).
    let mut pending: Option<(u64, u64, bool)> = None;
    let mut window_start = 0;
    while window_start < blocks {
        let window_end = (window_start + WINDOW_BLOCKS).min(blocks);
        let end_byte = (window_end * BLOCK).min(len);
        // A block is read unless zero extents cover all of it.
        let mut data = vec![false; (window_end - window_start) as usize];
        loop {
            let (start, end, zero) = match pending.take() {
                Some(e) => e,
                None => match extents.next_extent()? {
                    Some((s, l, z)) => (s, s + l, z),
                    None => break,
                },
            };
            if !zero {
                let first = start.max(window_start * BLOCK) / BLOCK;
                let last = (end.min(end_byte) - 1) / BLOCK;
                for b in first..=last {
                    data[(b - window_start) as usize] = true;
                }
            }
            if end > end_byte {
                pending = Some((start, end, zero));
                break;
            }
            if end == end_byte {
                break;
            }
        }
        let tasks = plan_tasks(&data, window_start);
        let mut digests: Vec<Option<[u8; 32]>> = vec![None; data.len()];
        for (block, digest) in hash_tasks(dev, &tasks, block_len, progress, workers)? {
            if let Some(slot) = digests.get_mut((block - window_start) as usize) {
                *slot = Some(digest);
            }
        }
        for (i, digest) in digests.iter().enumerate() {
            let block = window_start + i as u64;
            match digest {
                Some(d) => outer.update(d),
                None => {
                    outer.update(if block_len(block) == BLOCK {
                        &full_zero
                    } else {
                        &last_zero
                    });
                    progress.advance(block_len(block));
                }
            }
        }
        window_start = window_end;
    }
    outer.update(len.to_le_bytes());
    Ok(outer.finalize().into())
}

/// Groups the data blocks of a window into runs of at most one read piece.
fn plan_tasks(data: &[bool], window_start: u64) -> Vec<Task> {
    let per_task = READ_PIECE / BLOCK;
    let mut tasks: Vec<Task> = Vec::new();
    for (i, &is_data) in data.iter().enumerate() {
        if !is_data {
            continue;
        }
        let block = window_start + i as u64;
        match tasks.last_mut() {
            Some(t) if t.first + t.count == block && t.count < per_task => t.count += 1,
            _ => tasks.push(Task {
                first: block,
                count: 1,
            }),
        }
    }
    tasks
}

/// Reads and hashes every block of `tasks` on up to `workers` threads; returns the block
/// digests in no particular order.
fn hash_tasks(
    dev: &Arc<dyn BlockDev>,
    tasks: &[Task],
    block_len: impl Fn(u64) -> u64 + Sync,
    progress: &dyn Progress,
    workers: usize,
) -> Result<Vec<(u64, [u8; 32])>, DigestError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let next = AtomicUsize::new(0);
    let full_zero = zero_digest(BLOCK);
    let work = || -> Result<Vec<(u64, [u8; 32])>, DigestError> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let Some(task) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(out);
            };
            let offset = task.first * BLOCK;
            let last = task.first + task.count - 1;
            let n = (task.count - 1) * BLOCK + block_len(last);
            buf.resize(n as usize, 0);
            if let Err(e) = read_padded(dev.as_ref(), &mut buf, offset) {
                // Stop the other workers too: the digest cannot be finished.
                next.store(tasks.len(), Ordering::Relaxed);
                return Err(e);
            }
            for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                // Checking for zeroes is far cheaper than hashing them.
                let digest = if block.len() as u64 == BLOCK && is_zero(block) {
                    full_zero
                } else {
                    Sha256::digest(block).into()
                };
                out.push((task.first + i as u64, digest));
            }
            progress.advance(n);
        }
    };
    let workers = workers.clamp(1, tasks.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
        let mut all = Vec::new();
        let mut failure = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok(part)) => all.extend(part),
                Ok(Err(e)) => failure = failure.or(Some(e)),
                // A worker panicked: that is a bug, and it should surface as one.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(all),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::{MemImage, ZeroMode};
    use vdisk_blockjobs::convert::NoProgress;

    /// The construction of `blk-sha256` spelled out over the bytes themselves.
    fn reference_blk(bytes: &[u8]) -> [u8; 32] {
        let mut outer = Sha256::new();
        for block in bytes.chunks(BLOCK as usize) {
            outer.update(Sha256::digest(block));
        }
        outer.update((bytes.len() as u64).to_le_bytes());
        outer.finalize().into()
    }

    /// Every byte a digest covers, read the slow way.
    fn contents(dev: &Arc<dyn BlockDev>) -> Vec<u8> {
        let mut out = vec![0u8; digest_len(dev.as_ref()) as usize];
        read_padded(dev.as_ref(), &mut out, 0).expect("read all");
        out
    }

    fn check(dev: &Arc<dyn BlockDev>) {
        let bytes = contents(dev);
        let plain: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(sha256(dev, &NoProgress).expect("sha256"), plain);
        for workers in [1, 3] {
            assert_eq!(
                blk_sha256(dev, &NoProgress, workers).expect("blk-sha256"),
                reference_blk(&bytes),
                "{workers} workers"
            );
        }
    }

    #[test]
    fn digests_match_the_bytes_for_odd_sizes_and_layouts() {
        for size in [0, 1000, 512, BLOCK, BLOCK + 1, 3 * BLOCK + 4096, 5 << 20] {
            let dev = MemImage::shared(size);
            if size > 100 {
                dev.write_at(&[7u8; 50], size / 2).expect("write");
                dev.write_at(&[9u8; 3], size - 3).expect("write tail");
            }
            if size > 2 * BLOCK {
                // Allocated zeroes must hash like a hole.
                dev.write_at(&vec![0u8; BLOCK as usize], BLOCK)
                    .expect("write zeroes");
                dev.write_zeroes(0, 4096, ZeroMode::KeepAllocated)
                    .expect("zero");
            }
            let dev: Arc<dyn BlockDev> = dev;
            check(&dev);
        }
    }

    #[test]
    fn blocks_across_windows_and_extents_spanning_them() {
        let window = WINDOW_BLOCKS * BLOCK;
        let dev = MemImage::shared(window + 5 * BLOCK + 700);
        // One data extent that crosses the window edge, and a byte in the last, short block.
        dev.write_at(&vec![0x5a; 3 * BLOCK as usize], window - BLOCK - 10)
            .expect("write across");
        dev.write_at(&[1], window + 5 * BLOCK + 100)
            .expect("write last");
        let dev: Arc<dyn BlockDev> = dev;
        check(&dev);
    }

    #[test]
    fn allocation_does_not_change_blk_sha256() {
        let size = 40 * BLOCK;
        let sparse = MemImage::shared(size);
        let dense = MemImage::shared(size);
        sparse.write_at(&[3u8; 10], 20 * BLOCK).expect("write");
        dense
            .write_at(&vec![0u8; size as usize], 0)
            .expect("fill zeroes");
        dense.write_at(&[3u8; 10], 20 * BLOCK).expect("write");
        let sparse: Arc<dyn BlockDev> = sparse;
        let dense: Arc<dyn BlockDev> = dense;
        assert_eq!(
            blk_sha256(&sparse, &NoProgress, 2).expect("sparse"),
            blk_sha256(&dense, &NoProgress, 2).expect("dense")
        );
    }

    /// A device that counts the bytes read from it and can be made to fail.
    struct Probe {
        inner: MemImage,
        read: std::sync::atomic::AtomicU64,
        fail_read_at: Option<u64>,
        fail_status: bool,
    }

    impl Probe {
        fn new(inner: MemImage) -> Self {
            Probe {
                inner,
                read: 0.into(),
                fail_read_at: None,
                fail_status: false,
            }
        }
    }

    impl BlockDev for Probe {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk_block::Result<()> {
            if let Some(bad) = self.fail_read_at {
                if (offset..offset + buf.len() as u64).contains(&bad) {
                    return Err(Error::corrupt("read", "injected").at_offset(offset));
                }
            }
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> vdisk_block::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> vdisk_block::Result<()> {
            self.inner.write_zeroes(offset, len, mode)
        }
        fn discard(&self, offset: u64, len: u64) -> vdisk_block::Result<()> {
            self.inner.discard(offset, len)
        }
        fn flush(&self) -> vdisk_block::Result<()> {
            self.inner.flush()
        }
        fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> vdisk_block::Result<vdisk_block::BlockStatus> {
            if self.fail_status {
                return Err(Error::corrupt("block status", "injected"));
            }
            self.inner.block_status(offset, len)
        }
        fn resize(&self, size: u64, p: vdisk_block::Preallocation) -> vdisk_block::Result<()> {
            self.inner.resize(size, p)
        }
        fn info(&self) -> vdisk_block::Result<vdisk_block::ImageInfo> {
            self.inner.info()
        }
        fn is_read_only(&self) -> bool {
            self.inner.is_read_only()
        }
    }

    #[test]
    fn zero_ranges_are_never_read() {
        let inner = MemImage::new(64 << 20);
        inner.write_at(&[1u8; 100], 10 << 20).expect("write");
        inner
            .write_at(&vec![2u8; BLOCK as usize], 40 << 20)
            .expect("write block");
        let probe = Arc::new(Probe::new(inner));
        let dev: Arc<dyn BlockDev> = probe.clone();
        sha256(&dev, &NoProgress).expect("sha256");
        let by_sha256 = probe.read.swap(0, Ordering::Relaxed);
        blk_sha256(&dev, &NoProgress, 2).expect("blk-sha256");
        let by_blk = probe.read.load(Ordering::Relaxed);
        // Only the extents holding data are read; blk-sha256 reads the two blocks they lie in.
        let mut data = 0;
        let mut extents = Extents::new(&dev, dev.size());
        while let Some((_, len, zero)) = extents.next_extent().expect("map") {
            data += if zero { 0 } else { len };
        }
        assert!(
            data > 0 && data <= 2 * BLOCK,
            "{data} bytes of data extents"
        );
        assert_eq!(by_sha256, data);
        assert_eq!(by_blk, 2 * BLOCK);
    }

    #[test]
    fn failures_name_their_kind_and_offset() {
        let inner = MemImage::new(8 << 20);
        inner.write_at(&[1u8; 4096], 3 << 20).expect("write");
        let mut probe = Probe::new(inner);
        probe.fail_read_at = Some((3 << 20) + 10);
        let dev: Arc<dyn BlockDev> = Arc::new(probe);
        for algorithm in Algorithm::ALL {
            match compute(&dev, algorithm, &NoProgress) {
                Err(DigestError::Read(offset, _)) => {
                    assert!(offset <= (3 << 20) + 10, "{algorithm:?} at {offset}")
                }
                other => panic!("{algorithm:?}: {other:?}"),
            }
        }
        let mut probe = Probe::new(MemImage::new(1 << 20));
        probe.fail_status = true;
        let dev: Arc<dyn BlockDev> = Arc::new(probe);
        for algorithm in Algorithm::ALL {
            assert!(
                matches!(
                    compute(&dev, algorithm, &NoProgress),
                    Err(DigestError::Status(_))
                ),
                "{algorithm:?}"
            );
        }
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.name()), Some(a));
        }
        assert_eq!(Algorithm::parse("md5"), None);
    }
}
