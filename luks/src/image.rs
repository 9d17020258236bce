//! An opened standalone LUKS image: the payload after the header, encrypted in 512-byte
//! sectors numbered from the payload start.
//!
//! Opening for data unlocks the master key at once, so a bad or missing passphrase fails the
//! open as in qemu. A metadata-only open ([`OpenOptions::metadata_only`], what `info` does,
//! qemu's `BDRV_O_NO_IO`) needs no passphrase: it shows the header, and unlocks only if
//! data is read after all.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use vdisk_block::dev::FormatSpecific;
use vdisk_block::dev::InfoValue;
use vdisk_block::{
    check_range, BlockDev, BlockStatus, Error, ErrorKind, HostFile, ImageInfo, OpenOptions,
    Preallocation, Result, ZeroMode,
};
use zeroize::Zeroizing;

use crate::cipher::{SectorCipher, SECTOR_SIZE};
use crate::header::{Header, HEADER_LEN};
use crate::{keys, secret};

/// qemu's words when data is needed and no passphrase was named.
pub const KEY_REQUIRED: &str = "Parameter 'key-secret' is required for cipher";

/// Bytes encrypted or decrypted per step: bounds the buffer of a large request.
const CHUNK: usize = 1 << 20;
const SECTOR: u64 = SECTOR_SIZE as u64;

/// An opened LUKS image.
pub struct LuksImage {
    file: Arc<HostFile>,
    path: PathBuf,
    header: Header,
    payload: u64,
    size: AtomicU64,
    read_only: bool,
    cipher: OnceLock<SectorCipher>,
    /// The passphrase of a deferred unlock (metadata-only opens).
    passphrase: Mutex<Option<Zeroizing<Vec<u8>>>>,
    /// Serialises read-modify-write of partial sectors.
    rmw: Mutex<()>,
}

impl std::fmt::Debug for LuksImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksImage")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("unlocked", &self.cipher.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Reads and checks the header of `file` (of `len` bytes).
pub(crate) fn read_header(file: &HostFile, len: u64) -> Result<Header> {
    if len < HEADER_LEN as u64 {
        return Err(
            Error::corrupt("open luks", "Volume is not in LUKS format").with_path(file.path())
        );
    }
    let mut bytes = [0u8; HEADER_LEN];
    file.read_at(&mut bytes, 0)?;
    let header = Header::parse(&bytes).map_err(|e| e.with_path(file.path()))?;
    header
        .check_key_material_within(len)
        .map_err(|e| e.with_path(file.path()))?;
    if header.payload_bytes() > len {
        return Err(Error::corrupt(
            "open luks",
            format!(
                "LUKS payload offset {} lies past the end of the file ({len} bytes)",
                header.payload_bytes()
            ),
        )
        .with_path(file.path()));
    }
    Ok(header)
}

impl LuksImage {
    /// Opens `path`; the passphrase comes from the secret named by the driver option
    /// `key-secret`.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        let file = HostFile::open(path, options.writable, options.cache, options.engine)?;
        let len = file.len()?;
        let header = read_header(&file, len)?;
        let payload = header.payload_bytes();
        let metadata_only = options.metadata_only && !options.writable;
        let passphrase = match options.driver_options.get("key-secret") {
            // qemu looks the secret up only when it unlocks.
            Some(id) if metadata_only => secret::lookup(id).ok(),
            Some(id) => Some(secret::lookup(id).map_err(|e| e.with_path(path))?),
            None if metadata_only => None,
            None => {
                return Err(Error::invalid("open luks", KEY_REQUIRED).with_path(path));
            }
        };
        let image = LuksImage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            header,
            payload,
            // A partial last sector cannot be encrypted; qemu's size counts whole sectors.
            size: AtomicU64::new((len - payload) / SECTOR * SECTOR),
            read_only: !options.writable,
            cipher: OnceLock::new(),
            passphrase: Mutex::new(passphrase),
            rmw: Mutex::new(()),
        };
        if !metadata_only {
            image.cipher()?;
        }
        Ok(image)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        if let Some(c) = self.cipher.get() {
            return Ok(c);
        }
        let mut pass = self.passphrase.lock();
        if let Some(c) = self.cipher.get() {
            return Ok(c);
        }
        let Some(passphrase) = pass.as_ref() else {
            return Err(Error::invalid("read luks", KEY_REQUIRED).with_path(&self.path));
        };
        let file = &self.file;
        let key = keys::unlock(&self.header, passphrase, &mut |off, buf| {
            file.read_at(buf, off)
        })
        .map_err(|e| e.with_path(&self.path))?;
        let cipher = SectorCipher::new(&self.header.cipher, &key)?;
        *pass = None;
        Ok(self.cipher.get_or_init(|| cipher))
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            Err(
                Error::new(ErrorKind::ReadOnly, op, "the image is open read-only")
                    .with_path(&self.path),
            )
        } else {
            Ok(())
        }
    }

    /// Reads and decrypts whole sectors: `buf` at sector-aligned payload offset `offset`.
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cipher = self.cipher()?;
        self.file.read_at(buf, self.payload + offset)?;
        cipher.decrypt(offset / SECTOR, buf)
    }

    /// Encrypts and writes whole sectors from `plain` at sector-aligned `offset`.
    fn write_sectors(&self, plain: &[u8], offset: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let mut buf = Zeroizing::new(Vec::with_capacity(plain.len().min(CHUNK)));
        let mut done = 0usize;
        while done < plain.len() {
            let n = (plain.len() - done).min(CHUNK);
            buf.clear();
            buf.extend_from_slice(&plain[done..done + n]);
            let at = offset + done as u64;
            cipher.encrypt(at / SECTOR, &mut buf)?;
            self.file.write_at(&buf, self.payload + at)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, keeping the bytes of partial sectors outside the range.
    fn write_range(&self, offset: u64, data: Source<'_>) -> Result<()> {
        let end = offset + data.len();
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            return self.write_source(offset, data, 0, end - offset);
        }
        let _guard = self.rmw.lock();
        let mut pos = offset;
        if !offset.is_multiple_of(SECTOR) {
            let start = offset / SECTOR * SECTOR;
            pos = end.min(start + SECTOR);
            self.patch_sector(start, offset, pos, data, offset)?;
        }
        let tail = end / SECTOR * SECTOR;
        if tail > pos {
            self.write_source(pos, data, pos - offset, tail - pos)?;
            pos = tail;
        }
        if pos < end {
            self.patch_sector(pos, pos, end, data, offset)?;
        }
        Ok(())
    }

    /// Read-modify-write of the sector at `sector`: bytes `[from, to)` (payload offsets)
    /// come from `data`, which starts at `data_at`.
    fn patch_sector(
        &self,
        sector: u64,
        from: u64,
        to: u64,
        data: Source<'_>,
        data_at: u64,
    ) -> Result<()> {
        let mut buf = Zeroizing::new(vec![0u8; SECTOR_SIZE]);
        self.read_sectors(&mut buf, sector)?;
        data.copy_to(
            &mut buf[(from - sector) as usize..(to - sector) as usize],
            from - data_at,
        );
        self.write_sectors(&buf, sector)
    }

    /// Writes the aligned piece `[skip, skip + len)` of `data` at aligned `offset`.
    fn write_source(&self, offset: u64, data: Source<'_>, skip: u64, len: u64) -> Result<()> {
        match data {
            Source::Bytes(b) => {
                self.write_sectors(&b[skip as usize..(skip + len) as usize], offset)
            }
            Source::Zeroes(_) => {
                let zeroes = vec![0u8; (len as usize).min(CHUNK)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    self.write_sectors(&zeroes[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

/// Plaintext to write: caller bytes or zeroes.
#[derive(Clone, Copy)]
enum Source<'a> {
    Bytes(&'a [u8]),
    Zeroes(u64),
}

impl Source<'_> {
    fn len(&self) -> u64 {
        match self {
            Source::Bytes(b) => b.len() as u64,
            Source::Zeroes(n) => *n,
        }
    }

    fn copy_to(&self, dst: &mut [u8], from: u64) {
        match self {
            Source::Bytes(b) => dst.copy_from_slice(&b[from as usize..from as usize + dst.len()]),
            Source::Zeroes(_) => dst.fill(0),
        }
    }
}

fn text(s: &str) -> InfoValue {
    InfoValue::Text(s.to_string())
}

impl BlockDev for LuksImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut scratch = Zeroizing::new(Vec::new());
        while pos < end {
            let start_al = pos / SECTOR * SECTOR;
            let chunk_end = (start_al + CHUNK as u64).min(end.div_ceil(SECTOR) * SECTOR);
            let n = (chunk_end - start_al) as usize;
            scratch.resize(n, 0);
            self.read_sectors(&mut scratch[..n], start_al)?;
            let from = (pos - start_al) as usize;
            let take = ((chunk_end.min(end)) - pos) as usize;
            let dst = (pos - offset) as usize;
            buf[dst..dst + take].copy_from_slice(&scratch[from..from + take]);
            pos += take as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        check_range("write", self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.write_range(offset, Source::Bytes(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode) -> Result<()> {
        self.check_writable("write zeroes")?;
        check_range("write zeroes", self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Zeroes must be encrypted like any data: a hole in the file would decrypt to noise.
        self.write_range(offset, Source::Zeroes(len))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("discard")?;
        check_range("discard", self.size(), offset, len)?;
        // Advisory; freeing host blocks would make the range decrypt to noise, and writing
        // encrypted zeroes would allocate rather than free, so the data stays.
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("block status", self.size(), offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range").at_offset(offset));
        }
        // Every byte of an encrypted payload is data, and no host range holds it plainly.
        Ok(BlockStatus {
            offset,
            len,
            data: true,
            zero: false,
            allocated: true,
            compressed: false,
            host: None,
        })
    }

    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
        self.check_writable("resize")?;
        if !new_size.is_multiple_of(SECTOR) {
            return Err(Error::invalid(
                "resize",
                "The new size must be a multiple of 512 bytes for a LUKS image",
            ));
        }
        let old = self.size();
        let end = self.payload + new_size;
        match prealloc {
            Preallocation::Off => self.file.set_len(end)?,
            Preallocation::Metadata => {
                return Err(Error::invalid(
                    "resize",
                    "Unsupported preallocation mode: metadata (luks images have no metadata)",
                ))
            }
            _ if new_size < old => {
                return Err(Error::invalid(
                    "resize",
                    "Preallocation can only be used when growing an image",
                ))
            }
            Preallocation::Falloc => self.file.allocate(self.payload + old, new_size - old)?,
            Preallocation::Full => {
                self.file.set_len(end)?;
                self.file
                    .write_zero_bytes(self.payload + old, new_size - old)?;
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "luks".into(),
            filename: self.path.clone(),
            virtual_size: self.size(),
            actual_size: Some(self.file.allocated_bytes()?),
            file_length: Some(self.file.len()?),
            encrypted: true,
            ..ImageInfo::default()
        })
    }

    fn format_specific(&self) -> Result<Option<FormatSpecific>> {
        Ok(Some(FormatSpecific {
            kind: "luks".into(),
            data: format_specific_data(&self.header, false),
        }))
    }

    fn request_alignment(&self) -> u64 {
        SECTOR
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// qemu's `QCryptoBlockInfoLUKS` for `header`, keys in the order qemu-img prints them
/// (`with_format` adds the leading `"format": "luks"` qcow2 shows).
pub fn format_specific_data(header: &Header, with_format: bool) -> Vec<(String, InfoValue)> {
    let slots = header
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let mut m = vec![("active".to_string(), InfoValue::Bool(slot.active))];
            if slot.active {
                m.push(("iters".into(), InfoValue::UInt(u64::from(slot.iterations))));
            }
            m.push((
                "key-offset".into(),
                InfoValue::UInt(header.key_material_offset(i)),
            ));
            if slot.active {
                m.push(("stripes".into(), InfoValue::UInt(u64::from(slot.stripes))));
            }
            InfoValue::Map(m)
        })
        .collect();
    let mut data = Vec::new();
    if with_format {
        data.push(("format".to_string(), text("luks")));
    }
    data.push(("ivgen-alg".to_string(), text(header.cipher.ivgen.name())));
    data.push(("detached-header".into(), InfoValue::Bool(false)));
    data.push(("hash-alg".into(), text(header.hash.name())));
    data.push(("cipher-alg".into(), text(header.cipher.alg.name())));
    data.push(("uuid".into(), text(&header.uuid_text())));
    if let crate::algo::IvGen::Essiv(h) = header.cipher.ivgen {
        data.push(("ivgen-hash-alg".into(), text(h.name())));
    }
    data.push(("cipher-mode".into(), text(header.cipher.mode.name())));
    data.push(("slots".into(), InfoValue::List(slots)));
    data.push((
        "payload-offset".into(),
        InfoValue::UInt(header.payload_bytes()),
    ));
    data.push((
        "master-key-iters".into(),
        InfoValue::UInt(u64::from(header.mk_iterations)),
    ));
    data
}
