//! The LUKS1 partition header (592 bytes, big-endian): parsing with every check qemu makes
//! and the bounds vdisk adds, serialising, and the key-slot layout qemu gives new images.
//!
//! A parsed [`Header`] is safe to act on: every slot's key material has a fixed, small size
//! (at most 64 × 4000 bytes), lies after the header and before the payload and overlaps no
//! other slot, so no hostile header makes vdisk allocate much; iteration counts are bounded
//! where they are spent, by [`check_iteration_limit`] before each PBKDF2 of an unlock.

use vdisk_block::{Error, Result};

use crate::algo::{CipherSpec, HashAlg};
use crate::cipher::SECTOR_SIZE;

/// `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the header proper (key material follows).
pub const HEADER_LEN: usize = 592;
/// Key slots of a LUKS1 header.
pub const NUM_SLOTS: usize = 8;
/// The only stripe count qemu accepts and writes.
pub const STRIPES: u32 = 4000;
/// Bytes of the master-key digest.
pub const DIGEST_LEN: usize = 20;
/// Bytes of the UUID field.
pub const UUID_LEN: usize = 40;
/// Bytes of a salt.
pub const SALT_LEN: usize = 32;
/// A slot's `active` value when it holds a key.
pub const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// A slot's `active` value when it is free.
pub const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Where qemu puts the first key slot: the header padded to 4 KiB.
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// Alignment of key material areas in new images.
const SLOT_ALIGN: u64 = 4096;
/// The most PBKDF2 iterations vdisk runs for one digest or slot: about 20 times what
/// qemu's default iteration time gives on a current machine, so any real image opens,
/// while a hostile count (up to 2^32) cannot keep an open busy for hours.
pub const MAX_ITERATIONS: u32 = 200_000_000;

const OP: &str = "open luks";

/// One key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations deriving the slot key from the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the header start.
    pub key_offset: u32,
    /// AF stripes (always [`STRIPES`]).
    pub stripes: u32,
}

/// A parsed and checked LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cipher, mode and IV generator of the payload (and of the key material).
    pub cipher: CipherSpec,
    /// Hash of PBKDF2 and of the AF diffuser.
    pub hash: HashAlg,
    /// Start of the payload, in 512-byte sectors.
    pub payload_offset: u32,
    /// Bytes of the master key.
    pub key_bytes: u32,
    /// PBKDF2 of the master key, to recognise it.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_iterations: u32,
    /// The volume UUID field as stored (text, NUL-padded; kept as bytes so a header written
    /// back is the header read).
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub slots: [KeySlot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

/// The text of a NUL-terminated field, or qemu's complaint when there is no NUL.
fn c_string<'a>(field: &'a [u8], what: &str) -> Result<&'a str> {
    let end = field
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| Error::corrupt(OP, format!("LUKS header {what} is not NUL terminated")))?;
    std::str::from_utf8(&field[..end])
        .map_err(|_| Error::corrupt(OP, format!("LUKS {what} is not valid text")))
}

fn put_string(out: &mut [u8], text: &str) {
    let len = text.len().min(out.len() - 1);
    out[..len].copy_from_slice(&text.as_bytes()[..len]);
}

/// True when `bytes` start with the LUKS magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// Sectors of one slot's key material: `key_bytes * stripes`, rounded up to a sector.
fn split_key_sectors(key_bytes: u32, stripes: u32) -> u64 {
    (u64::from(key_bytes) * u64::from(stripes)).div_ceil(SECTOR_SIZE as u64)
}

impl Header {
    /// Parses and checks the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        if bytes.len() < HEADER_LEN || !has_magic(bytes) {
            return Err(Error::corrupt(OP, "Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([bytes[6], bytes[7]]);
        if version != 1 {
            return Err(Error::unsupported(
                OP,
                format!("LUKS version {version} is not supported"),
            ));
        }
        let cipher_name = c_string(&bytes[8..40], "cipher name")?;
        let cipher_mode = c_string(&bytes[40..72], "cipher mode")?;
        let hash_spec = c_string(&bytes[72..104], "hash spec")?;
        let payload_offset = be32(bytes, 104);
        let key_bytes = be32(bytes, 108);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&bytes[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&bytes[132..164]);
        let mk_iterations = be32(bytes, 164);
        let mut uuid = [0u8; UUID_LEN];
        uuid.copy_from_slice(&bytes[168..208]);
        let slots = std::array::from_fn(|i| {
            let b = &bytes[208 + i * 48..208 + (i + 1) * 48];
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&b[8..40]);
            KeySlot {
                active: be32(b, 0) == SLOT_ACTIVE,
                iterations: be32(b, 4),
                salt,
                key_offset: be32(b, 40),
                stripes: be32(b, 44),
            }
        });
        // qemu's order: the layout first, then the algorithms, then the digest.
        check_layout(payload_offset, key_bytes, &slots)?;
        let cipher = CipherSpec::from_header(cipher_name, cipher_mode, key_bytes)?;
        let hash = HashAlg::parse(hash_spec)?;
        check_iterations(mk_iterations, "key")?;
        let header = Header {
            cipher,
            hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
        };
        Ok(header)
    }

    /// The UUID as text: up to the first NUL.
    pub fn uuid_text(&self) -> String {
        let end = self.uuid.iter().position(|&c| c == 0).unwrap_or(UUID_LEN);
        String::from_utf8_lossy(&self.uuid[..end]).into_owned()
    }

    /// Bytes of one slot's (split) key material.
    pub fn split_key_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }

    /// Byte offset of slot `i`'s key material from the header start.
    pub fn key_material_offset(&self, i: usize) -> u64 {
        u64::from(self.slots[i].key_offset) * SECTOR_SIZE as u64
    }

    /// Byte offset of the payload.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR_SIZE as u64
    }

    /// Checks that the key material of every active slot lies inside the first `len` bytes
    /// of the file (or of the qcow2 encryption region), so reading it cannot come up short.
    pub fn check_key_material_within(&self, len: u64) -> Result<()> {
        for i in 0..NUM_SLOTS {
            if !self.slots[i].active {
                continue;
            }
            let end = self.key_material_offset(i) + self.split_key_len() as u64;
            if end > len {
                return Err(Error::corrupt(
                    OP,
                    format!(
                        "Keyslot {i} key material ends at byte {end}, past the end of the LUKS header area ({len} bytes)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The 592 header bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_string(&mut b[8..40], "aes");
        put_string(&mut b[40..72], &self.cipher.mode_string());
        put_string(&mut b[72..104], self.hash.name());
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, slot) in self.slots.iter().enumerate() {
            let s = &mut b[208 + i * 48..208 + (i + 1) * 48];
            let state = if slot.active {
                SLOT_ACTIVE
            } else {
                SLOT_INACTIVE
            };
            s[0..4].copy_from_slice(&state.to_be_bytes());
            s[4..8].copy_from_slice(&slot.iterations.to_be_bytes());
            s[8..40].copy_from_slice(&slot.salt);
            s[40..44].copy_from_slice(&slot.key_offset.to_be_bytes());
            s[44..48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        b
    }
}

/// qemu's layout checks: the payload after the header, every slot of 4000 stripes
/// between the header and the payload, no two slots overlapping; active slots iterate.
fn check_layout(payload_offset: u32, key_bytes: u32, slots: &[KeySlot; NUM_SLOTS]) -> Result<()> {
    let header_sectors = (HEADER_LEN as u64).div_ceil(SECTOR_SIZE as u64);
    let payload = u64::from(payload_offset);
    if payload < header_sectors {
        return Err(Error::corrupt(
            OP,
            "LUKS payload is overlapping with the header",
        ));
    }
    for (i, slot) in slots.iter().enumerate() {
        if slot.stripes != STRIPES {
            // qemu prints the count signed; the last parenthesis is vdisk's hint.
            let message = format!(
                "Keyslot {i} is corrupted (stripes {} != {STRIPES}) (a LUKS1 key slot has {STRIPES} stripes)",
                slot.stripes as i32
            );
            return Err(Error::corrupt(OP, message));
        }
        if slot.active && slot.iterations == 0 {
            return Err(Error::corrupt(
                OP,
                format!("Keyslot {i} iteration count is zero"),
            ));
        }
        let (start, len) = slot_sectors(key_bytes, slot);
        if start < header_sectors {
            return Err(Error::corrupt(
                OP,
                format!("Keyslot {i} is overlapping with the LUKS header"),
            ));
        }
        if start + len > payload {
            return Err(Error::corrupt(
                OP,
                format!("Keyslot {i} is overlapping with the encrypted payload"),
            ));
        }
        for (j, other) in slots.iter().enumerate().skip(i + 1) {
            let (start2, len2) = slot_sectors(key_bytes, other);
            if start + len > start2 && start2 + len2 > start {
                return Err(Error::corrupt(
                    OP,
                    format!("Keyslots {i} and {j} are overlapping in the header"),
                ));
            }
        }
    }
    Ok(())
}

/// Start and length of a slot's key material, in sectors.
fn slot_sectors(key_bytes: u32, slot: &KeySlot) -> (u64, u64) {
    (
        u64::from(slot.key_offset),
        split_key_sectors(key_bytes, slot.stripes),
    )
}

fn check_iterations(n: u32, what: &str) -> Result<()> {
    if n == 0 {
        return Err(Error::corrupt(
            OP,
            format!("LUKS {what} iteration count is zero"),
        ));
    }
    Ok(())
}

/// Refuses an iteration count over [`MAX_ITERATIONS`] before PBKDF2 runs it. Only unlocking
/// runs PBKDF2, so `info` still shows such a header, as qemu-img does.
pub fn check_iteration_limit(n: u32, what: &str) -> Result<()> {
    if n > MAX_ITERATIONS {
        return Err(Error::unsupported(
            "unlock luks",
            format!("LUKS {what} iteration count {n} is over vdisk's limit of {MAX_ITERATIONS}"),
        ));
    }
    Ok(())
}

/// qemu's layout for a new image with `key_bytes`-byte keys: the slot offsets (sectors)
/// and the payload offset (sectors). Slots start after the header padded to 4 KiB, each
/// 4 KiB aligned.
pub fn new_layout(key_bytes: u32) -> ([u32; NUM_SLOTS], u32) {
    let split = (u64::from(key_bytes) * u64::from(STRIPES)).next_multiple_of(SLOT_ALIGN)
        / SECTOR_SIZE as u64;
    let first = KEY_SLOT_OFFSET / SECTOR_SIZE as u64;
    // key_bytes is at most 64, so these are far below u32::MAX.
    let offsets = std::array::from_fn(|i| (first + i as u64 * split) as u32);
    (offsets, (first + NUM_SLOTS as u64 * split) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_corruption_never_panics_and_bounds_hold() {
        let v = crate::keys::new_volume(CipherSpec::DEFAULT, HashAlg::Sha256, 1, b"pw")
            .expect("volume");
        let good = v.header.to_bytes();
        let mut rng = vdisk_block::testing::Rng::new(5);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut b = good;
            for _ in 0..=rng.below(4) {
                let at = rng.below(HEADER_LEN as u64) as usize;
                b[at] = rng.next_u64() as u8;
            }
            if let Ok(h) = Header::parse(&b) {
                accepted += 1;
                // What an accepted header lets an open allocate stays small.
                assert!(h.split_key_len() <= 64 * STRIPES as usize);
                assert!(h.mk_iterations > 0);
                assert!(h.slots.iter().all(|s| !s.active || s.iterations > 0));
                assert_eq!(Header::parse(&h.to_bytes()).expect("round trip"), h);
            }
        }
        // Salts, digests and the UUID take any bytes, so some survive.
        assert!(accepted > 0);
    }

    #[test]
    fn layout_is_qemus() {
        let (slots, payload) = new_layout(64);
        assert_eq!(u64::from(slots[1]) * 512, 262144);
        assert_eq!(u64::from(payload) * 512, 2068480);
        assert_eq!(u64::from(new_layout(32).1) * 512, 1052672);
        assert_eq!(u64::from(new_layout(48).1) * 512, 1544192);
        assert_eq!(u64::from(new_layout(16).1) * 512, 528384);
    }
}
