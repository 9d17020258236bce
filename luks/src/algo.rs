//! The algorithm names a LUKS1 header and qemu's options use, and the combinations vdisk
//! implements: AES (128, 192, 256 bits) in xts, cbc, ecb or ctr mode, IVs from plain,
//! plain64 or essiv, and the SHA family for PBKDF2, the AF diffuser and essiv.

use vdisk_block::{Error, Result};

/// A block cipher and its key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// qemu's spelling (`aes-256`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes128 => "aes-128",
            Self::Aes192 => "aes-192",
            Self::Aes256 => "aes-256",
        }
    }

    /// Parses qemu's spelling.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "aes-128" => Ok(Self::Aes128),
            "aes-192" => Ok(Self::Aes192),
            "aes-256" => Ok(Self::Aes256),
            other => Err(unsupported(format!(
                "Cipher algorithm '{other}' is not supported (vdisk implements aes-128, aes-192 and aes-256)"
            ))),
        }
    }

    /// Key length in bytes of one cipher instance.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes128 => 16,
            Self::Aes192 => 24,
            Self::Aes256 => 32,
        }
    }

    /// The AES variant with a `len`-byte key.
    pub fn aes_with_key_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(Self::Aes128),
            24 => Some(Self::Aes192),
            32 => Some(Self::Aes256),
            _ => None,
        }
    }
}

/// How the block cipher covers a sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// XTS: two keys, the IV is the tweak.
    Xts,
    /// CBC: the IV starts the chain of each sector.
    Cbc,
    /// ECB: no IV at all.
    Ecb,
    /// CTR: the IV is the first counter block, counted big-endian.
    Ctr,
}

impl CipherMode {
    /// qemu's spelling (`xts`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Xts => "xts",
            Self::Cbc => "cbc",
            Self::Ecb => "ecb",
            Self::Ctr => "ctr",
        }
    }

    /// Parses qemu's spelling.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "xts" => Ok(Self::Xts),
            "cbc" => Ok(Self::Cbc),
            "ecb" => Ok(Self::Ecb),
            "ctr" => Ok(Self::Ctr),
            other => Err(unsupported(format!(
                "Cipher mode '{other}' not supported (vdisk implements xts, cbc, ecb and ctr)"
            ))),
        }
    }
}

/// How a sector's IV is derived from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits of the sector number, little-endian.
    Plain,
    /// The 64-bit sector number, little-endian.
    Plain64,
    /// plain64 encrypted with a key that is the hash of the master key.
    Essiv(HashAlg),
}

impl IvGen {
    /// qemu's spelling of the generator (`plain64`, `essiv`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Plain64 => "plain64",
            Self::Essiv(_) => "essiv",
        }
    }
}

/// A hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// qemu's and the header's spelling (`sha256`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha224 => "sha224",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    /// Parses qemu's spelling.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "sha1" => Ok(Self::Sha1),
            "sha224" => Ok(Self::Sha224),
            "sha256" => Ok(Self::Sha256),
            "sha384" => Ok(Self::Sha384),
            "sha512" => Ok(Self::Sha512),
            other => Err(unsupported(format!(
                "Hash algorithm '{other}' not supported (vdisk implements sha1, sha224, sha256, sha384 and sha512)"
            ))),
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha224 => 28,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }
}

/// Everything that decides how sectors are encrypted: the header's cipher name and mode
/// string, together with the key size the header's `key_bytes` implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    /// The block cipher.
    pub alg: CipherAlg,
    /// The mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGen,
}

impl CipherSpec {
    /// qemu's default: aes-256 in xts mode with plain64 IVs.
    pub const DEFAULT: CipherSpec = CipherSpec {
        alg: CipherAlg::Aes256,
        mode: CipherMode::Xts,
        ivgen: IvGen::Plain64,
    };

    /// Bytes of the master key (xts needs two cipher keys).
    pub fn key_bytes(&self) -> usize {
        match self.mode {
            CipherMode::Xts => 2 * self.alg.key_len(),
            _ => self.alg.key_len(),
        }
    }

    /// The header's `cipher_mode` string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_string(&self) -> String {
        match self.ivgen {
            IvGen::Essiv(h) => format!("{}-essiv:{}", self.mode.name(), h.name()),
            other => format!("{}-{}", self.mode.name(), other.name()),
        }
    }

    /// Builds the spec from the header's cipher name, mode string and key length, refusing
    /// what vdisk does not implement and what qemu would refuse (a key length that fits no
    /// AES variant, an essiv hash whose digest is no AES key).
    pub fn from_header(name: &str, mode: &str, key_bytes: u32) -> Result<Self> {
        if name != "aes" {
            return Err(unsupported(format!(
                "Cipher name '{name}' is not supported (vdisk implements aes)"
            )));
        }
        let (mode_name, ivgen_name) = mode.split_once('-').unwrap_or((mode, "plain"));
        let mode = CipherMode::parse(mode_name)?;
        let ivgen = match ivgen_name.split_once(':') {
            Some(("essiv", hash)) => IvGen::Essiv(HashAlg::parse(hash)?),
            None if ivgen_name == "plain" => IvGen::Plain,
            None if ivgen_name == "plain64" => IvGen::Plain64,
            // qemu refuses essiv without a hash too.
            _ => {
                return Err(unsupported(format!(
                    "IV generator '{ivgen_name}' is not supported (plain, plain64 or essiv:HASH)"
                )))
            }
        };
        let per_cipher = match mode {
            CipherMode::Xts => key_bytes / 2,
            _ => key_bytes,
        };
        let alg = CipherAlg::aes_with_key_len(per_cipher as usize)
            .filter(|_| mode != CipherMode::Xts || key_bytes.is_multiple_of(2))
            .ok_or_else(|| {
                Error::corrupt(
                    "open luks",
                    format!("Algorithm 'aes' with key size {per_cipher} bytes not supported"),
                )
            })?;
        let spec = CipherSpec { alg, mode, ivgen };
        spec.check()?;
        Ok(spec)
    }

    /// Refuses what vdisk must not create: combinations that cannot work, and key material
    /// that does not fill whole sectors (aes-192 outside xts), which qemu cannot open.
    pub fn check_new(&self) -> Result<()> {
        self.check()?;
        if !(self.key_bytes() * crate::header::STRIPES as usize)
            .is_multiple_of(crate::cipher::SECTOR_SIZE)
        {
            return Err(Error::unsupported(
                "create luks",
                format!(
                    "{} in {} mode gives key material that is not whole sectors, which qemu cannot open; use xts or another key size",
                    self.alg.name(),
                    self.mode.name()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses combinations that cannot work.
    pub fn check(&self) -> Result<()> {
        if let IvGen::Essiv(h) = self.ivgen {
            if CipherAlg::aes_with_key_len(h.digest_len()).is_none() {
                return Err(Error::invalid(
                    "luks",
                    format!("No AES cipher with key size {} available", h.digest_len()),
                ));
            }
        }
        Ok(())
    }
}

fn unsupported(message: String) -> Error {
    Error::unsupported("luks", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_strings_round_trip() {
        for (mode, bytes) in [
            ("xts-plain64", 64),
            ("xts-plain", 32),
            ("cbc-essiv:sha256", 16),
            ("cbc-plain64", 32),
            ("ecb-plain64", 24),
            ("ctr-plain64", 32),
            ("xts-essiv:sha256", 64),
        ] {
            let spec = CipherSpec::from_header("aes", mode, bytes).expect(mode);
            assert_eq!(spec.mode_string(), mode);
            assert_eq!(spec.key_bytes(), bytes as usize);
        }
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(CipherSpec::from_header("twofish", "xts-plain64", 64).is_err());
        assert!(CipherSpec::from_header("aes", "xts-plain64", 63).is_err());
        assert!(CipherSpec::from_header("aes", "xts-plain64", 0).is_err());
        assert!(CipherSpec::from_header("aes", "cbc-essiv:sha1", 32).is_err());
        assert!(CipherSpec::from_header("aes", "cbc-essiv", 32).is_err());
        assert!(CipherSpec::from_header("aes", "gcm-plain64", 32).is_err());
        assert!(CipherSpec::from_header("aes", "xts-plain64", u32::MAX).is_err());
    }
}
