//! The `luks` format driver: probe by magic, open with `key-secret`, create as qemu-img
//! does (aes-256-xts-plain64 and sha256 unless told otherwise), and amend key slots
//! ([`crate::amend`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use vdisk_block::{
    format::Measurement, BlockDev, CreateOptions, EngineChoice, Error, ErrorKind, Format, HostFile,
    OpenOptions, Preallocation, Result,
};

use crate::algo::{CipherAlg, CipherMode, CipherSpec, HashAlg, IvGen};
use crate::amend::{amend_slots, AmendOptions};
use crate::header::{has_magic, new_layout};
use crate::image::{read_header, LuksImage, KEY_REQUIRED};
use crate::keys::FileRegion;
use crate::{keys, secret};

/// qemu's default `iter-time`, in milliseconds.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// The luks format driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct LuksFormat;

/// What the encryption options of a new volume (`-o` for luks, `encrypt.*` for qcow2) ask
/// for.
#[derive(Debug)]
pub struct NewVolumeOptions {
    /// The passphrase of slot 0.
    pub passphrase: zeroize::Zeroizing<Vec<u8>>,
    /// Cipher, mode and IVs.
    pub cipher: CipherSpec,
    /// PBKDF2 and AF hash.
    pub hash: HashAlg,
    /// Milliseconds of PBKDF2 per unlock.
    pub iter_time_ms: u64,
}

/// The names qemu's `cipher-alg` enum takes.
pub const CIPHER_ALGS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];
/// The names qemu's `cipher-mode` enum takes.
pub const CIPHER_MODES: &[&str] = &["ecb", "cbc", "xts", "ctr"];
/// The names qemu's `ivgen-alg` enum takes.
pub const IVGEN_ALGS: &[&str] = &["plain", "plain64", "essiv"];
/// The names qemu's hash enum (`ivgen-hash-alg`, `hash-alg`) takes.
pub const HASH_ALGS: &[&str] = &[
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "ripemd160",
    "sm3",
];

/// The values qemu's enums take for each encryption option.
fn qemu_enum(option: &str) -> &'static [&'static str] {
    match option {
        "cipher-alg" => CIPHER_ALGS,
        "cipher-mode" => CIPHER_MODES,
        "ivgen-alg" => IVGEN_ALGS,
        _ => HASH_ALGS,
    }
}

impl NewVolumeOptions {
    /// Takes the encryption options named `{prefix}key-secret`, `{prefix}cipher-alg`, ...
    /// out of `options` (prefix `""` for luks, `"encrypt."` for qcow2).
    pub fn take(options: &mut CreateOptions, prefix: &str) -> Result<Self> {
        let mut take = |name: &str| options.take(&format!("{prefix}{name}"));
        let key_secret = take("key-secret");
        let alg = take("cipher-alg");
        let mode = take("cipher-mode");
        let ivgen = take("ivgen-alg");
        let ivgen_hash = take("ivgen-hash-alg");
        let hash = take("hash-alg");
        let iter_time = take("iter-time");
        // qemu's QAPI visitor refuses unknown names first, in its own words and naming the
        // member without its `encrypt.` prefix; a name qemu knows but vdisk does not
        // implement (twofish, md5, ...) gets vdisk's words below, after the key's check.
        for (name, value) in [
            ("cipher-alg", &alg),
            ("cipher-mode", &mode),
            ("ivgen-alg", &ivgen),
            ("ivgen-hash-alg", &ivgen_hash),
            ("hash-alg", &hash),
        ] {
            if let Some(v) = value {
                if !qemu_enum(name).contains(&v.as_str()) {
                    return Err(Error::invalid(
                        "create luks",
                        format!("Parameter '{name}' does not accept value '{v}'"),
                    ));
                }
            }
        }
        let id = key_secret.ok_or_else(|| {
            Error::invalid(
                "create luks",
                KEY_REQUIRED.replace("'key-secret'", &format!("'{prefix}key-secret'")),
            )
        })?;
        let passphrase = secret::lookup(&id)?;
        let alg = alg
            .as_deref()
            .map_or(Ok(CipherAlg::Aes256), CipherAlg::parse)?;
        let mode = mode
            .as_deref()
            .map_or(Ok(CipherMode::Xts), CipherMode::parse)?;
        let ivgen = match ivgen.as_deref().unwrap_or("plain64") {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv(
                ivgen_hash
                    .as_deref()
                    .map_or(Ok(HashAlg::Sha256), HashAlg::parse)?,
            ),
            other => {
                return Err(Error::unsupported(
                    "create luks",
                    format!("IV generator '{other}' is not supported (plain, plain64 or essiv)"),
                ))
            }
        };
        let hash = hash
            .as_deref()
            .map_or(Ok(HashAlg::Sha256), HashAlg::parse)?;
        let iter_time_ms = match iter_time {
            None => DEFAULT_ITER_TIME_MS,
            Some(t) => t.parse::<u64>().map_err(|_| {
                Error::invalid(
                    "create luks",
                    format!("Parameter '{prefix}iter-time' expects a number"),
                )
            })?,
        };
        let cipher = CipherSpec { alg, mode, ivgen };
        cipher.check_new()?;
        Ok(NewVolumeOptions {
            passphrase,
            cipher,
            hash,
            iter_time_ms,
        })
    }
}

impl Format for LuksFormat {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn probe(&self, header: &[u8], _path: &Path) -> u32 {
        if has_magic(header) {
            100
        } else {
            0
        }
    }

    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        Ok(Arc::new(LuksImage::open(path, options)?))
    }

    fn open_option_names(&self) -> &'static [&'static str] {
        &["key-secret"]
    }

    fn create(&self, path: &Path, mut options: CreateOptions) -> Result<()> {
        if options.take("detached-header").is_some() {
            return Err(Error::invalid(
                "create luks",
                "Parameter 'detached-header' is unexpected",
            ));
        }
        let prealloc = options.take_preallocation()?;
        if prealloc == Preallocation::Metadata {
            return Err(Error::invalid(
                "create luks",
                "Unsupported preallocation mode: metadata (luks images have no metadata; use off, falloc or full)",
            ));
        }
        // Accepted for compatibility; they tune host file systems vdisk does not touch.
        options.take("extent_size_hint");
        options.take("nocow");
        let volume = NewVolumeOptions::take(&mut options, "")?;
        options.reject_leftovers("luks")?;
        if !options.size.is_multiple_of(512) {
            return Err(Error::invalid(
                "create luks",
                "The size of a LUKS image must be a multiple of 512 bytes",
            ));
        }
        let new = keys::new_volume(
            volume.cipher,
            volume.hash,
            volume.iter_time_ms,
            &volume.passphrase,
        )?;
        let total = new
            .header
            .payload_bytes()
            .checked_add(options.size)
            .ok_or_else(|| Error::invalid("create luks", "image size too large"))?;
        let file = HostFile::create(path, vdisk_block::CacheMode::Writeback, EngineChoice::Sync)?;
        // As qemu: preallocation covers the whole file, header area included, and `full`
        // writes plain zeroes (which read back as noise, as in qemu).
        match prealloc {
            Preallocation::Falloc => match file.allocate(0, total) {
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    return Err(Error::unsupported(
                        "preallocate",
                        "the file system does not support fallocate: use preallocation=full",
                    )
                    .with_path(path))
                }
                other => other?,
            },
            Preallocation::Full => {
                file.set_len(total)?;
                file.write_zero_bytes(0, total)?;
            }
            _ => file.set_len(total)?,
        }
        file.write_at(&new.header.to_bytes(), 0)?;
        file.write_at(&new.material, new.header.key_material_offset(0))?;
        file.flush()
    }

    fn measure(
        &self,
        mut options: CreateOptions,
        source: Option<&dyn BlockDev>,
    ) -> Result<Measurement> {
        // The file protocol's options change nothing here; the encryption options decide
        // the header's size (and, as in qemu, the secret must exist).
        for name in [
            "preallocation",
            "extent_size_hint",
            "nocow",
            "detached-header",
        ] {
            options.take(name);
        }
        let volume = NewVolumeOptions::take(&mut options, "")?;
        let (_, payload) = new_layout(volume.cipher.key_bytes() as u32);
        let size = source.map_or(options.size, |dev| dev.size());
        let total = (u64::from(payload) * 512)
            .checked_add(size)
            .ok_or_else(|| Error::invalid("measure", "image size too large"))?;
        Ok(Measurement {
            required: total,
            fully_allocated: total,
            bitmaps: None,
        })
    }

    fn amend(&self, path: &Path, options: CreateOptions) -> Result<()> {
        self.amend_with(path, &BTreeMap::new(), false, options)
    }

    /// qemu's luks amend: `state`, `new-secret`, `old-secret`, `keyslot`, `iter-time`
    /// change key slots; the image's `key-secret` (a driver option, as for opening) gives
    /// the master key.
    fn amend_with(
        &self,
        path: &Path,
        driver_options: &BTreeMap<String, String>,
        force: bool,
        mut options: CreateOptions,
    ) -> Result<()> {
        let file = HostFile::open(
            path,
            true,
            vdisk_block::CacheMode::Writeback,
            EngineChoice::Sync,
        )?;
        let len = file.len()?;
        let mut header = read_header(&file, len)?;
        let id = driver_options
            .get("key-secret")
            .ok_or_else(|| Error::invalid("amend luks", KEY_REQUIRED).with_path(path))?;
        let passphrase = secret::lookup(id)?;
        let master_key = keys::unlock(&header, &passphrase, &mut |off, buf| file.read_at(buf, off))
            .map_err(|e| e.with_path(path))?;
        // qemu types the options only once the image is open with its key.
        let request = AmendOptions::take(&mut options, "")?;
        options.reject_leftovers("luks")?;
        amend_slots(
            &mut FileRegion::new(&file, 0),
            &mut header,
            &master_key,
            &request,
            force,
        )
    }

    fn create_options_help(&self) -> Vec<(&'static str, &'static str)> {
        // qemu-img's texts, in the order its `-o help` prints them.
        vec![
            ("cipher-alg", "Name of encryption cipher algorithm"),
            ("cipher-mode", "Name of encryption cipher mode"),
            ("detached-header", "Create a detached LUKS header"),
            ("hash-alg", "Name of encryption hash algorithm"),
            ("iter-time", "Time to spend in PBKDF in milliseconds"),
            ("ivgen-alg", "Name of IV generator algorithm"),
            ("ivgen-hash-alg", "Name of IV generator hash algorithm"),
            (
                "key-secret",
                "ID of the secret that provides the keyslot passphrase",
            ),
            ("size", "Virtual disk size"),
            // The file protocol's, as for raw images.
            (
                "preallocation",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            (
                "extent_size_hint",
                "Extent size hint for the image file, 0 to disable (accepted, not used)",
            ),
            (
                "nocow",
                "Turn off copy-on-write (valid only on btrfs; accepted, not used)",
            ),
        ]
    }

    fn create_options_shown(&self) -> Vec<(&'static str, Option<&'static str>)> {
        // qemu's option table order (the luks format's, then the file protocol's).
        [
            "size",
            "key-secret",
            "cipher-alg",
            "cipher-mode",
            "ivgen-alg",
            "ivgen-hash-alg",
            "hash-alg",
            "iter-time",
            "detached-header",
            "nocow",
            "preallocation",
            "extent_size_hint",
        ]
        .into_iter()
        .map(|n| (n, None))
        .collect()
    }
}
