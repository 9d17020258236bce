//! Encryption of 512-byte sectors with a key and a [`CipherSpec`]: the payload of an image
//! (sector numbers count from the payload start) and the key material of a slot (from 0).
//!
//! XTS, CBC, ECB and CTR are written here on top of the AES block function; with whole
//! sectors of whole blocks, none of them needs padding or ciphertext stealing.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use vdisk_block::{Error, Result};
use zeroize::Zeroizing;

use crate::algo::{CipherAlg, CipherMode, CipherSpec, IvGen};
use crate::kdf::digest;

/// The LUKS1 sector size: IVs count sectors of this many bytes.
pub const SECTOR_SIZE: usize = 512;

const BLOCK: usize = 16;
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE / BLOCK;

type Blocks = [aes::Block; BLOCKS_PER_SECTOR];

/// A sector's worth of cipher blocks, cleared on drop (they hold plaintext or keystream).
#[derive(Default)]
struct Scratch(Blocks);

impl Drop for Scratch {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            zeroize::Zeroize::zeroize(b.as_mut_slice());
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Blocks;
    fn deref(&self) -> &Blocks {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Blocks {
        &mut self.0
    }
}

/// One AES instance of any key size. The `aes` crate clears its key schedule on drop.
enum Aes {
    A128(Box<Aes128>),
    A192(Box<Aes192>),
    A256(Box<Aes256>),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Self> {
        let bad = |_| Error::invalid("luks cipher", format!("bad AES key length {}", key.len()));
        Ok(match CipherAlg::aes_with_key_len(key.len()) {
            Some(CipherAlg::Aes128) => {
                Self::A128(Box::new(Aes128::new_from_slice(key).map_err(bad)?))
            }
            Some(CipherAlg::Aes192) => {
                Self::A192(Box::new(Aes192::new_from_slice(key).map_err(bad)?))
            }
            Some(CipherAlg::Aes256) => {
                Self::A256(Box::new(Aes256::new_from_slice(key).map_err(bad)?))
            }
            None => {
                return Err(Error::invalid(
                    "luks cipher",
                    format!("bad AES key length {}", key.len()),
                ))
            }
        })
    }

    fn encrypt_blocks(&self, blocks: &mut [aes::Block]) {
        match self {
            Self::A128(c) => c.encrypt_blocks(blocks),
            Self::A192(c) => c.encrypt_blocks(blocks),
            Self::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt_blocks(&self, blocks: &mut [aes::Block]) {
        match self {
            Self::A128(c) => c.decrypt_blocks(blocks),
            Self::A192(c) => c.decrypt_blocks(blocks),
            Self::A256(c) => c.decrypt_blocks(blocks),
        }
    }

    fn encrypt_one(&self, block: &mut [u8; BLOCK]) {
        let mut b = [*GenericArray::from_slice(block)];
        self.encrypt_blocks(&mut b);
        block.copy_from_slice(&b[0]);
        zeroize::Zeroize::zeroize(&mut b[0][..]);
    }
}

/// Encrypts and decrypts sectors with one key.
pub struct SectorCipher {
    mode: CipherMode,
    ivgen: IvGen,
    main: Aes,
    /// XTS's tweak key.
    tweak: Option<Aes>,
    /// essiv's IV key: the hash of the whole master key.
    essiv: Option<Aes>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("mode", &self.mode)
            .field("ivgen", &self.ivgen)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// A cipher for `spec` keyed with `key` (`spec.key_bytes()` long).
    pub fn new(spec: &CipherSpec, key: &[u8]) -> Result<Self> {
        if key.len() != spec.key_bytes() {
            return Err(Error::invalid(
                "luks cipher",
                format!(
                    "key of {} bytes for a cipher that takes {}",
                    key.len(),
                    spec.key_bytes()
                ),
            ));
        }
        let (main, tweak) = match spec.mode {
            CipherMode::Xts => {
                let (a, b) = key.split_at(key.len() / 2);
                (Aes::new(a)?, Some(Aes::new(b)?))
            }
            _ => (Aes::new(key)?, None),
        };
        let essiv = match spec.ivgen {
            IvGen::Essiv(hash) => Some(Aes::new(&digest(hash, &[key]))?),
            _ => None,
        };
        Ok(SectorCipher {
            mode: spec.mode,
            ivgen: spec.ivgen,
            main,
            tweak,
            essiv,
        })
    }

    fn iv(&self, sector: u64) -> [u8; BLOCK] {
        let mut iv = [0u8; BLOCK];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(essiv) = &self.essiv {
            essiv.encrypt_one(&mut iv);
        }
        iv
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.each_sector(sector, buf, true)
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) -> Result<()> {
        self.each_sector(sector, buf, false)
    }

    fn each_sector(&self, first: u64, buf: &mut [u8], encrypt: bool) -> Result<()> {
        // Key material of some key sizes (aes-192 outside xts: 96000 bytes) ends in a
        // partial sector, which qemu encrypts as a short sector of whole blocks.
        if !buf.len().is_multiple_of(BLOCK) {
            return Err(Error::invalid(
                "luks cipher",
                format!("{} bytes are no whole number of cipher blocks", buf.len()),
            ));
        }
        let mut store = Scratch::default();
        for (i, sector) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            let number = first.wrapping_add(i as u64);
            let iv = self.iv(number);
            let blocks = &mut store[..sector.len() / BLOCK];
            for (b, src) in blocks.iter_mut().zip(sector.chunks_exact(BLOCK)) {
                b.copy_from_slice(src);
            }
            match (self.mode, encrypt) {
                (CipherMode::Xts, _) => self.xts(&iv, blocks, encrypt),
                (CipherMode::Ecb, true) => self.main.encrypt_blocks(blocks),
                (CipherMode::Ecb, false) => self.main.decrypt_blocks(blocks),
                (CipherMode::Cbc, true) => self.cbc_encrypt(&iv, blocks),
                (CipherMode::Cbc, false) => self.cbc_decrypt(&iv, blocks),
                (CipherMode::Ctr, _) => self.ctr(&iv, blocks),
            }
            for (dst, b) in sector.chunks_exact_mut(BLOCK).zip(blocks.iter()) {
                dst.copy_from_slice(b);
            }
        }
        Ok(())
    }

    fn xts(&self, iv: &[u8; BLOCK], blocks: &mut [aes::Block], encrypt: bool) {
        let mut t = *iv;
        if let Some(tweak) = &self.tweak {
            tweak.encrypt_one(&mut t);
        }
        let mut tweaks = Zeroizing::new([[0u8; BLOCK]; BLOCKS_PER_SECTOR]);
        for (slot, b) in tweaks.iter_mut().zip(blocks.iter_mut()) {
            *slot = t;
            xor(b, &t);
            t = gf_double(&t);
        }
        if encrypt {
            self.main.encrypt_blocks(blocks);
        } else {
            self.main.decrypt_blocks(blocks);
        }
        for (b, t) in blocks.iter_mut().zip(tweaks.iter()) {
            xor(b, t);
        }
    }

    fn cbc_encrypt(&self, iv: &[u8; BLOCK], blocks: &mut [aes::Block]) {
        let mut prev = *iv;
        for b in blocks.iter_mut() {
            xor(b, &prev);
            self.main.encrypt_blocks(std::slice::from_mut(b));
            prev.copy_from_slice(b);
        }
    }

    fn cbc_decrypt(&self, iv: &[u8; BLOCK], blocks: &mut [aes::Block]) {
        let mut cipher_text = Scratch::default();
        cipher_text[..blocks.len()].copy_from_slice(blocks);
        self.main.decrypt_blocks(blocks);
        xor(&mut blocks[0], iv);
        for (b, prev) in blocks[1..].iter_mut().zip(cipher_text.iter()) {
            let prev: [u8; BLOCK] = (*prev).into();
            xor(b, &prev);
        }
    }

    fn ctr(&self, iv: &[u8; BLOCK], blocks: &mut [aes::Block]) {
        let start = u128::from_be_bytes(*iv);
        let mut stream = Scratch::default();
        for (i, s) in stream.iter_mut().enumerate() {
            s.copy_from_slice(&start.wrapping_add(i as u128).to_be_bytes());
        }
        let stream = &mut stream[..blocks.len()];
        self.main.encrypt_blocks(stream);
        for (b, s) in blocks.iter_mut().zip(stream.iter()) {
            let s: [u8; BLOCK] = (*s).into();
            xor(b, &s);
        }
    }
}

fn xor(block: &mut aes::Block, with: &[u8; BLOCK]) {
    for (a, b) in block.iter_mut().zip(with) {
        *a ^= b;
    }
}

/// Multiplies an XTS tweak by x in GF(2^128), little-endian as IEEE 1619 stores it.
fn gf_double(t: &[u8; BLOCK]) -> [u8; BLOCK] {
    let v = u128::from_le_bytes(*t);
    let carry = (v >> 127) as u8;
    let mut out = (v << 1).to_le_bytes();
    out[0] ^= 0x87 * carry;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::HashAlg;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn xts_matches_ieee_1619_vector_4() {
        // IEEE 1619-2007 XTS-AES-128 vector 4: keys 2718..., 3141..., data unit 0, bytes
        // 00..ff twice; the first 512-byte data unit.
        let key = unhex("2718281828459045235360287471352631415926535897932384626433832795");
        let spec = CipherSpec {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
        };
        let c = SectorCipher::new(&spec, &key).expect("cipher");
        let mut buf: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.encrypt(0, &mut buf).expect("encrypt");
        assert_eq!(
            &buf[..32],
            &unhex("27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c")[..]
        );
        c.decrypt(0, &mut buf).expect("decrypt");
        assert!(buf.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn every_mode_round_trips_and_depends_on_the_sector() {
        for mode in [
            CipherMode::Xts,
            CipherMode::Cbc,
            CipherMode::Ecb,
            CipherMode::Ctr,
        ] {
            for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::Essiv(HashAlg::Sha256)] {
                let spec = CipherSpec {
                    alg: CipherAlg::Aes256,
                    mode,
                    ivgen,
                };
                let key = vec![7u8; spec.key_bytes()];
                let c = SectorCipher::new(&spec, &key).expect("cipher");
                let plain = vec![0x5au8; 1024];
                let mut a = plain.clone();
                c.encrypt(3, &mut a).expect("encrypt");
                assert_ne!(a, plain);
                if mode != CipherMode::Ecb {
                    assert_ne!(a[..512], a[512..], "{mode:?} {ivgen:?}");
                }
                c.decrypt(3, &mut a).expect("decrypt");
                assert_eq!(a, plain);
            }
        }
    }

    #[test]
    fn refuses_partial_sectors_and_bad_keys() {
        let c = SectorCipher::new(&CipherSpec::DEFAULT, &[1u8; 64]).expect("cipher");
        assert!(c.encrypt(0, &mut [0u8; 100]).is_err());
        let mut short = [3u8; 512 + 256];
        c.encrypt(0, &mut short).expect("short last sector");
        c.decrypt(0, &mut short).expect("short last sector");
        assert_eq!(short, [3u8; 512 + 256]);
        assert!(SectorCipher::new(&CipherSpec::DEFAULT, &[1u8; 32]).is_err());
    }
}
