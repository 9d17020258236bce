//! Encrypted qcow2 images: LUKS (`crypt_method` 2) and the legacy AES method 1.
//!
//! - **LUKS**: a LUKS1 header and its key material live in a cluster-aligned region of the
//!   image file that the crypto header extension (0x0537be77) names; offsets inside the
//!   LUKS header count from the region's start and its payload offset is ignored. Guest
//!   data clusters are encrypted in 512-byte sectors whose IV is the sector's **host**
//!   offset (qemu's `crypt_physical_offset`), so data moved to another cluster is
//!   re-encrypted there.
//! - **AES** (method 1, read only here): AES-128-CBC, the key being the passphrase's
//!   bytes zero-padded or cut to 16, IVs plain64 of the **guest** sector number. It has no
//!   key check: a wrong passphrase reads as noise, in qemu too.
//!
//! Metadata and compressed clusters are never encrypted; zero and unallocated clusters
//! read as zeroes without decryption. The passphrase comes from the secret named by the
//! `encrypt.key-secret` driver option; opening for data unlocks at once (a wrong or missing
//! passphrase fails the open, in qemu's words), a metadata-only open (`info`) unlocks only
//! if data is read after all.

use std::path::Path;
use std::sync::OnceLock;

use parking_lot::Mutex;
use vdisk_block::{Error, ErrorKind, HostFile, OpenOptions, Result};
use vdisk_luks::header::HEADER_LEN;
use vdisk_luks::{keys, secret, CipherAlg, CipherMode, CipherSpec, IvGen, SectorCipher};
use zeroize::Zeroizing;

use crate::header::{CryptMethod, CryptoExt, Header};
use crate::image::Qcow2Image;

/// The driver option naming the passphrase's secret.
pub const KEY_SECRET: &str = "encrypt.key-secret";
/// The driver option naming the expected encryption format.
pub const FORMAT: &str = "encrypt.format";
/// qemu's words when data is needed and no passphrase was named.
pub const KEY_REQUIRED: &str = "Parameter 'encrypt.key-secret' is required for cipher";

const SECTOR: u64 = 512;
/// Bytes encrypted per step of a large write: bounds the ciphertext copy.
const CHUNK: usize = 1 << 20;

/// The encryption of an opened image.
pub(crate) struct Crypto {
    method: CryptMethod,
    /// The LUKS header and its region (LUKS only).
    luks: Option<(vdisk_luks::Header, CryptoExt)>,
    cipher: OnceLock<SectorCipher>,
    /// The passphrase of a deferred unlock (metadata-only opens).
    passphrase: Mutex<Option<Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto")
            .field("method", &self.method)
            .field("unlocked", &self.cipher.get().is_some())
            .finish_non_exhaustive()
    }
}

fn method_name(m: CryptMethod) -> &'static str {
    match m {
        CryptMethod::Aes => "aes",
        CryptMethod::Luks => "luks",
        CryptMethod::None => "none",
    }
}

/// Reads and checks the LUKS header of the region `ext` names in `file` (`file_len`
/// bytes long); `header` is the image's qcow2 header, whose other metadata the region
/// must not overlap.
pub fn read_luks_header(
    file: &HostFile,
    file_len: u64,
    header: &Header,
    ext: CryptoExt,
) -> Result<vdisk_luks::Header> {
    let bad = |m: String| Error::corrupt("open", m);
    let end = ext
        .offset
        .checked_add(ext.length)
        .ok_or_else(|| bad("the encryption header region overflows".into()))?;
    if ext.length < HEADER_LEN as u64 {
        return Err(bad(format!(
            "the encryption header region ({} bytes) is too small for a LUKS header ({HEADER_LEN} bytes)",
            ext.length
        )));
    }
    if end > file_len {
        return Err(bad(format!(
            "the encryption header region {:#x}+{:#x} lies past the end of the file ({file_len} bytes)",
            ext.offset, ext.length
        )));
    }
    let cs = header.cluster_size();
    let l1 = (
        header.l1_table_offset,
        u64::from(header.l1_size).saturating_mul(8),
    );
    let reftable = (
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters).saturating_mul(cs),
    );
    for (what, (at, len)) in [
        ("the header cluster", (0, cs)),
        ("the L1 table", l1),
        ("the refcount table", reftable),
    ] {
        if len > 0 && at < end && ext.offset < at.saturating_add(len) {
            return Err(bad(format!(
                "the encryption header region {:#x}+{:#x} overlaps {what}",
                ext.offset, ext.length
            )));
        }
    }
    let mut bytes = vec![0u8; HEADER_LEN];
    file.read_at(&mut bytes, ext.offset)?;
    let luks = vdisk_luks::Header::parse(&bytes)?;
    luks.check_key_material_within(ext.length)?;
    Ok(luks)
}

impl Crypto {
    /// The encryption of the image `header` describes, or `None` when it has none. Checks
    /// the `encrypt.format` option against the header and finds the passphrase.
    // Not inlined: its frame would sit in every level of a deep backing chain's open.
    #[inline(never)]
    pub(crate) fn open(
        file: &HostFile,
        file_len: u64,
        header: &Header,
        options: &OpenOptions,
    ) -> Result<Option<Crypto>> {
        let method = header.crypt_method;
        if let Some(fmt) = options.driver_options.get(FORMAT) {
            if method == CryptMethod::None {
                return Err(Error::invalid(
                    "open",
                    format!("No encryption in image header, but options specified format '{fmt}'"),
                ));
            }
            if fmt != method_name(method) {
                return Err(Error::invalid(
                    "open",
                    format!(
                        "Header reported '{}' encryption format but options specify '{fmt}'",
                        method_name(method)
                    ),
                ));
            }
        }
        let luks = match method {
            CryptMethod::None => return Ok(None),
            CryptMethod::Aes => None,
            CryptMethod::Luks => {
                let ext = header.extensions.crypto.ok_or_else(|| {
                    Error::corrupt("open", "Missing CRYPTO header for crypt method 2 (LUKS)")
                })?;
                Some((read_luks_header(file, file_len, header, ext)?, ext))
            }
        };
        let metadata_only = options.metadata_only && !options.writable;
        let passphrase = match options.driver_options.get(KEY_SECRET) {
            // qemu looks the secret up only when it unlocks.
            Some(id) if metadata_only => secret::lookup(id).ok(),
            Some(id) => Some(secret::lookup(id)?),
            None if metadata_only => None,
            None => return Err(Error::invalid("open", KEY_REQUIRED)),
        };
        let crypto = Crypto {
            method,
            luks,
            cipher: OnceLock::new(),
            passphrase: Mutex::new(passphrase),
        };
        if !metadata_only {
            crypto.cipher(file)?;
        }
        Ok(Some(crypto))
    }

    /// The parsed LUKS header (LUKS images only).
    pub(crate) fn luks_header(&self) -> Option<&vdisk_luks::Header> {
        self.luks.as_ref().map(|(h, _)| h)
    }

    /// The method.
    pub(crate) fn method(&self) -> CryptMethod {
        self.method
    }

    /// The sector cipher, unlocking with the pending passphrase first if needed.
    fn cipher(&self, file: &HostFile) -> Result<&SectorCipher> {
        if let Some(c) = self.cipher.get() {
            return Ok(c);
        }
        let mut pending = self.passphrase.lock();
        if let Some(c) = self.cipher.get() {
            return Ok(c);
        }
        let Some(passphrase) = pending.as_ref() else {
            return Err(Error::invalid("read", KEY_REQUIRED));
        };
        let cipher = match &self.luks {
            Some((luks, ext)) => {
                let key = unlock_region(file, luks, *ext, passphrase)?;
                SectorCipher::new(&luks.cipher, &key)?
            }
            None => {
                let mut key = Zeroizing::new([0u8; 16]);
                let n = passphrase.len().min(16);
                key[..n].copy_from_slice(&passphrase[..n]);
                SectorCipher::new(&legacy_aes_spec(), &key[..])?
            }
        };
        *pending = None;
        Ok(self.cipher.get_or_init(|| cipher))
    }

    /// The sector number of the IV for data at guest `guest`, host `host`.
    fn sector(&self, guest: u64, host: u64) -> u64 {
        match self.method {
            CryptMethod::Aes => guest / SECTOR,
            _ => host / SECTOR,
        }
    }

    /// Decrypts `buf` (whole sectors), read from host offset `host` for guest `guest`.
    pub(crate) fn decrypt(
        &self,
        file: &HostFile,
        guest: u64,
        host: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        aligned(guest, host, buf.len())?;
        self.cipher(file)?.decrypt(self.sector(guest, host), buf)
    }

    /// Writes `plain` (whole sectors) encrypted to host offset `host` of `target`; `file`
    /// is the image file (for a deferred unlock).
    pub(crate) fn write(
        &self,
        file: &HostFile,
        target: &HostFile,
        plain: &[u8],
        guest: u64,
        host: u64,
    ) -> Result<()> {
        if self.method != CryptMethod::Luks {
            return Err(Error::unsupported(
                "write",
                "legacy AES-encrypted qcow2 images are read only here (convert them to LUKS)",
            ));
        }
        aligned(guest, host, plain.len())?;
        let cipher = self.cipher(file)?;
        let mut buf = Zeroizing::new(Vec::with_capacity(plain.len().min(CHUNK)));
        for (i, piece) in plain.chunks(CHUNK).enumerate() {
            let at = host + (i * CHUNK) as u64;
            buf.clear();
            buf.extend_from_slice(piece);
            cipher.encrypt(at / SECTOR, &mut buf)?;
            target.write_at(&buf, at)?;
        }
        Ok(())
    }
}

/// qcow2's legacy AES: AES-128-CBC with plain64 IVs.
/// The master key of the LUKS header `luks` in region `ext` of `file`, unlocked with
/// `passphrase`.
pub(crate) fn unlock_region(
    file: &HostFile,
    luks: &vdisk_luks::Header,
    ext: CryptoExt,
    passphrase: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    keys::unlock(luks, passphrase, &mut |off, buf| {
        // qemu's reader of the region refuses anything outside it.
        if off.saturating_add(buf.len() as u64) > ext.length {
            return Err(Error::corrupt(
                "unlock luks",
                "Request for data outside of extension header",
            ));
        }
        file.read_at(buf, ext.offset + off)
    })
}

pub(crate) fn legacy_aes_spec() -> CipherSpec {
    CipherSpec {
        alg: CipherAlg::Aes128,
        mode: CipherMode::Cbc,
        ivgen: IvGen::Plain64,
    }
}

fn aligned(guest: u64, host: u64, len: usize) -> Result<()> {
    if !guest.is_multiple_of(SECTOR)
        || !host.is_multiple_of(SECTOR)
        || !(len as u64).is_multiple_of(SECTOR)
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "encrypt",
            format!(
                "encrypted data must be whole 512-byte sectors (guest {guest:#x}, host {host:#x}, {len} bytes)"
            ),
        ));
    }
    Ok(())
}

impl Qcow2Image {
    /// The host offset and length of the LUKS header region (LUKS images only), for
    /// key-slot changes (`amend`) that rewrite it in place.
    pub fn encryption_region(&self) -> Option<(u64, u64)> {
        self.header
            .extensions
            .crypto
            .filter(|_| self.header.crypt_method == CryptMethod::Luks)
            .map(|c| (c.offset, c.length))
    }

    /// The LUKS header of a LUKS-encrypted image.
    pub fn luks_header(&self) -> Option<&vdisk_luks::Header> {
        self.crypto.as_deref().and_then(Crypto::luks_header)
    }

    /// Decrypts guest data just read from host `host` for guest `guest` (no-op for
    /// unencrypted images).
    pub(crate) fn decrypt_data(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<()> {
        match &self.crypto {
            Some(c) => c
                .decrypt(self.file(), guest, host, buf)
                .map_err(|e| e.with_path(self.path())),
            None => Ok(()),
        }
    }

    /// Writes guest data for guest `guest` at host `host` of `target`, encrypted when the
    /// image is.
    pub(crate) fn put_data(
        &self,
        target: &HostFile,
        data: &[u8],
        guest: u64,
        host: u64,
    ) -> Result<()> {
        match &self.crypto {
            Some(c) => c
                .write(self.file(), target, data, guest, host)
                .map_err(|e| e.with_path(self.path())),
            None => target.write_at(data, host),
        }
    }

    /// Whether guest data is encrypted.
    pub(crate) fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// The `encrypt` object of `info`'s format-specific data, as qemu-img prints it.
    pub(crate) fn encrypt_info(&self) -> Option<vdisk_block::dev::InfoValue> {
        use vdisk_block::dev::InfoValue;
        let c = self.crypto.as_ref()?;
        let format = (
            "format".to_string(),
            InfoValue::Text(method_name(c.method()).into()),
        );
        Some(InfoValue::Map(match c.luks_header() {
            None => vec![format],
            Some(h) => {
                let mut data = vdisk_luks::format_specific_data(h, false);
                // qemu's QDict order puts "format" just before "cipher-mode".
                let at = data
                    .iter()
                    .position(|(k, _)| k == "cipher-mode")
                    .unwrap_or(data.len());
                data.insert(at, format);
                data
            }
        }))
    }
}

/// For `check`: an encrypted image opens only with its key, as in qemu (which opens the
/// image before checking it).
pub(crate) fn require_key(path: &Path, options: &OpenOptions) -> Result<()> {
    let file = HostFile::open(path, false, options.cache, options.engine)?;
    let len = file.len()?;
    let Ok(header) = crate::image::read_header(&file, len) else {
        // A header that does not parse is check's to report.
        return Ok(());
    };
    let opts = OpenOptions {
        writable: false,
        metadata_only: false,
        ..options.clone()
    };
    Crypto::open(&file, len, &header, &opts)
        .map(drop)
        .map_err(|e| e.with_path(path))
}

impl Qcow2Image {
    /// A write inside an allocated cluster of an encrypted image that the image alone
    /// references: the sectors it touches are read (decrypted), patched and written back
    /// encrypted, so the bytes around a partial sector survive. The caller holds the I/O
    /// lock exclusively and not the metadata lock.
    pub(crate) fn write_sectors_in_place(&self, data: &[u8], guest: u64, host: u64) -> Result<()> {
        let head = guest % SECTOR;
        let len = data.len() as u64;
        if head == 0 && len.is_multiple_of(SECTOR) {
            return self.put_data(self.data_file()?, data, guest, host);
        }
        let span = (head + len).next_multiple_of(SECTOR);
        let mut whole = Zeroizing::new(vec![0u8; span as usize]);
        self.read_locked(&mut whole, guest - head)?;
        whole[head as usize..(head + len) as usize].copy_from_slice(data);
        self.put_data(self.data_file()?, &whole, guest - head, host - head)
    }
}

/// The encryption a new image asks for.
#[derive(Debug)]
pub enum NewEncryption {
    /// None.
    None,
    /// Legacy AES (`encrypt.format=aes`, or the old `encryption=on`), with its secret.
    Aes,
    /// LUKS, with the new volume's options.
    Luks(vdisk_luks::NewVolumeOptions),
}

/// Takes the encryption options of `create` and `measure` out of `options`, checked as
/// qemu checks them (the secret must exist).
pub fn take_new_encryption(options: &mut vdisk_block::CreateOptions) -> Result<NewEncryption> {
    let invalid = |m: String| Error::invalid("create", m);
    let alias = match options.take("encryption") {
        Some(v) => vdisk_block::format::parse_bool("encryption", &v)?,
        None => false,
    };
    let mut format = options.take(FORMAT);
    if alias {
        if format.is_some() {
            return Err(invalid(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            ));
        }
        format = Some("aes".into());
    }
    let Some(format) = format else {
        if options.options.keys().any(|k| k.starts_with("encrypt.")) {
            return Err(invalid("Parameter 'encrypt.format' is missing".into()));
        }
        return Ok(NewEncryption::None);
    };
    match format.as_str() {
        "luks" => Ok(NewEncryption::Luks(vdisk_luks::NewVolumeOptions::take(
            options, "encrypt.",
        )?)),
        "aes" => {
            if let Some(k) = options
                .options
                .keys()
                .find(|k| k.starts_with("encrypt.") && k.as_str() != KEY_SECRET)
            {
                return Err(invalid(format!("Parameter '{k}' is unexpected")));
            }
            let id = options
                .take(KEY_SECRET)
                .ok_or_else(|| invalid(KEY_REQUIRED.into()))?;
            secret::lookup(&id)?;
            Ok(NewEncryption::Aes)
        }
        other => Err(invalid(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

/// Writes the LUKS header region of a new image: `clusters` zeroed from host `at` (whole
/// clusters, as qemu zeroes them), then the header and slot 0's key material.
pub(crate) fn write_new_region(
    file: &HostFile,
    at: u64,
    cluster_size: u64,
    volume: &keys::NewVolume,
) -> Result<()> {
    let len = volume.header.payload_bytes().next_multiple_of(cluster_size);
    file.write_zero_bytes(at, len)?;
    file.write_at(&volume.header.to_bytes(), at)?;
    file.write_at(&volume.material, at + volume.header.key_material_offset(0))
}

/// [`take_new_encryption`] for `create`, which makes LUKS images only: legacy AES is
/// refused once qemu's own checks of it passed.
pub fn take_create_options(
    options: &mut vdisk_block::CreateOptions,
) -> Result<Option<vdisk_luks::NewVolumeOptions>> {
    match take_new_encryption(options)? {
        NewEncryption::None => Ok(None),
        NewEncryption::Luks(v) => Ok(Some(v)),
        NewEncryption::Aes => Err(Error::unsupported(
            "create",
            "vdisk does not create legacy AES-encrypted qcow2 images (AES-CBC keyed by the bare \
             passphrase, no key check; qemu-img 10 still can): use encrypt.format=luks",
        )),
    }
}

impl Qcow2Image {
    /// A read of an encrypted image that does not cover whole sectors: the sectors are
    /// read and decrypted whole (qemu's request alignment). Apart from the read path so
    /// its buffer is not in the frame of every level of a backing chain's read.
    #[inline(never)]
    pub(crate) fn read_unaligned_encrypted(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = offset / SECTOR * SECTOR;
        let end = (offset + buf.len() as u64).next_multiple_of(SECTOR);
        let mut whole = Zeroizing::new(vec![0u8; (end - start) as usize]);
        self.read_locked(&mut whole, start)?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&whole[from..from + buf.len()]);
        Ok(())
    }
}
