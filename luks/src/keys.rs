//! The master key: recovering it from a passphrase through the key slots, making a new one
//! with its header and first key slot, and adding or erasing key slots of an existing header,
//! as qemu does.
//!
//! Changing slots works on a [`Region`]: the header and its key material at offsets counted
//! from the header start (the whole file for `-f luks`, the encryption region for qcow2).
//! Writes go in qemu's crash-safe order: the key material first, then the slot's entry in
//! the header, each flushed, so a crash in between leaves either the old slot or the new one.

use vdisk_block::{Error, ErrorKind, Result};
use zeroize::Zeroizing;

use crate::algo::{CipherSpec, HashAlg};
use crate::cipher::{SectorCipher, SECTOR_SIZE};
use crate::header::{
    check_iteration_limit, new_layout, Header, KeySlot, DIGEST_LEN, HEADER_LEN, MAX_ITERATIONS,
    NUM_SLOTS, SALT_LEN, STRIPES,
};
use crate::kdf::{iterations_for, pbkdf2, MIN_ITERATIONS};
use crate::{af, random};

/// qemu's words for a passphrase no slot accepts.
pub const INVALID_PASSWORD: &str = "Invalid password, cannot unlock any keyslot";

/// Reads `buf.len()` bytes at an offset counted from the start of the LUKS header.
pub type ReadFn<'a> = dyn FnMut(u64, &mut [u8]) -> Result<()> + 'a;

/// True when `key` is the master key `header` describes.
fn is_master_key(header: &Header, key: &[u8]) -> bool {
    let mut digest = Zeroizing::new([0u8; DIGEST_LEN]);
    pbkdf2(
        header.hash,
        key,
        &header.mk_salt,
        header.mk_iterations,
        &mut digest[..],
    );
    // Not secret-dependent timing worth hiding: the digest is public in the header.
    digest[..] == header.mk_digest[..]
}

/// Tries `passphrase` on slot `i`: the master key if it opens the slot.
fn try_slot(
    header: &Header,
    i: usize,
    passphrase: &[u8],
    read: &mut ReadFn<'_>,
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let slot = &header.slots[i];
    let key_len = header.key_bytes as usize;
    let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
    pbkdf2(
        header.hash,
        passphrase,
        &slot.salt,
        slot.iterations,
        &mut slot_key,
    );
    // Bounded: key_bytes is at most 64 (checked with the cipher), stripes exactly 4000.
    let mut material = Zeroizing::new(vec![0u8; header.split_key_len()]);
    read(header.key_material_offset(i), &mut material)?;
    SectorCipher::new(&header.cipher, &slot_key)?.decrypt(0, &mut material)?;
    let candidate = af::merge(&material, key_len, header.hash)?;
    Ok(is_master_key(header, &candidate).then_some(candidate))
}

/// Recovers the master key with `passphrase`, trying every active slot in order.
pub fn unlock(
    header: &Header,
    passphrase: &[u8],
    read: &mut ReadFn<'_>,
) -> Result<Zeroizing<Vec<u8>>> {
    check_iteration_limit(header.mk_iterations, "key")?;
    for i in 0..NUM_SLOTS {
        if !header.slots[i].active {
            continue;
        }
        check_iteration_limit(header.slots[i].iterations, &format!("keyslot {i}"))?;
        if let Some(key) = try_slot(header, i, passphrase, read)? {
            return Ok(key);
        }
    }
    Err(Error::new(
        ErrorKind::PermissionDenied,
        "unlock luks",
        INVALID_PASSWORD,
    ))
}

/// What a new image needs: its header, the encrypted key material of slot 0 and the
/// master key.
pub struct NewVolume {
    /// The header, slot 0 active.
    pub header: Header,
    /// Slot 0's key material, encrypted, to be written at its key offset.
    pub material: Zeroizing<Vec<u8>>,
    /// The master key (for encrypting the payload).
    pub master_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for NewVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewVolume")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// The bytes of a LUKS header and its key material, addressed from the header start.
pub trait Region {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Makes what was written durable.
    fn flush(&mut self) -> Result<()>;
}

/// A [`Region`] inside a host file, starting `base` bytes into it.
#[derive(Debug)]
pub struct FileRegion<'a> {
    file: &'a vdisk_block::HostFile,
    base: u64,
}

impl<'a> FileRegion<'a> {
    /// The region of `file` whose header starts at byte `base`.
    pub fn new(file: &'a vdisk_block::HostFile, base: u64) -> Self {
        FileRegion { file, base }
    }

    fn at(&self, offset: u64) -> Result<u64> {
        self.base
            .checked_add(offset)
            .ok_or_else(|| Error::corrupt("luks key slots", "key material offset overflows"))
    }
}

impl Region for FileRegion<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.at(offset)?;
        self.file.read_at(buf, at)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let at = self.at(offset)?;
        self.file.write_at(buf, at)
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush()
    }
}

/// Whether `passphrase` opens active slot `i` (qemu's test of an `old-secret`).
pub fn slot_opens(
    header: &Header,
    i: usize,
    passphrase: &[u8],
    region: &mut dyn Region,
) -> Result<bool> {
    if i >= NUM_SLOTS || !header.slots[i].active {
        return Ok(false);
    }
    check_iteration_limit(header.mk_iterations, "key")?;
    check_iteration_limit(header.slots[i].iterations, &format!("keyslot {i}"))?;
    let mut read = |off: u64, buf: &mut [u8]| region.read_at(off, buf);
    Ok(try_slot(header, i, passphrase, &mut read)?.is_some())
}

/// Where slot `i`'s entry lies in the header: only those 48 bytes are rewritten, so a torn
/// write cannot damage another slot.
fn slot_entry(i: usize) -> std::ops::Range<usize> {
    let start = 208 + i * 48;
    start..start + 48
}

fn check_slot_index(i: usize) -> Result<()> {
    if i >= NUM_SLOTS {
        return Err(Error::invalid(
            "luks key slots",
            format!(
                "Invalid keyslot {i} specified, must be between 0 and {}",
                NUM_SLOTS - 1
            ),
        ));
    }
    Ok(())
}

/// Writes slot `i`'s entry of `header` and flushes.
fn store_slot_entry(header: &Header, i: usize, region: &mut dyn Region) -> Result<()> {
    let bytes = header.to_bytes();
    debug_assert_eq!(bytes.len(), HEADER_LEN);
    let range = slot_entry(i);
    region.write_at(range.start as u64, &bytes[range])?;
    region.flush()
}

/// Puts `passphrase` into slot `slot` for `master_key` (which the caller recovered with
/// [`unlock`]): new salt, PBKDF2 iterations for `iter_time_ms` (at least qemu's 1000), the
/// key split and encrypted into the slot's key material, then the slot marked active. An
/// active slot is overwritten: refusing that (unless forced) is the caller's choice, as in
/// qemu.
pub fn add_slot(
    region: &mut dyn Region,
    header: &mut Header,
    master_key: &[u8],
    passphrase: &[u8],
    slot: usize,
    iter_time_ms: u64,
) -> Result<()> {
    check_slot_index(slot)?;
    if master_key.len() != header.key_bytes as usize {
        return Err(Error::invalid(
            "luks key slots",
            format!(
                "master key of {} bytes for a header of {}-byte keys",
                master_key.len(),
                header.key_bytes
            ),
        ));
    }
    let iterations = scaled_iterations(header.hash, master_key.len(), iter_time_ms, 1)?;
    let mut salt = [0u8; SALT_LEN];
    random::fill(&mut salt)?;
    let mut slot_key = Zeroizing::new(vec![0u8; master_key.len()]);
    pbkdf2(header.hash, passphrase, &salt, iterations, &mut slot_key);
    let mut material = af::split(master_key, STRIPES, header.hash)?;
    SectorCipher::new(&header.cipher, &slot_key)?.encrypt(0, &mut material)?;
    // The material goes where no active slot points yet (or over the slot being replaced);
    // only the header entry written after it makes it count.
    region.write_at(header.key_material_offset(slot), &material)?;
    region.flush()?;
    let old = &header.slots[slot];
    header.slots[slot] = KeySlot {
        active: true,
        iterations,
        salt,
        key_offset: old.key_offset,
        stripes: STRIPES,
    };
    store_slot_entry(header, slot, region)
}

/// Erases slot `slot`: its key material is overwritten with random bytes (which destroys
/// the key, the AF split needing every stripe), then its header entry is cleared as qemu
/// clears it (inactive, no iterations, zero salt; offset and stripes kept). One pass: on a
/// file, more passes would not reach older copies of the blocks anyway.
pub fn erase_slot(region: &mut dyn Region, header: &mut Header, slot: usize) -> Result<()> {
    check_slot_index(slot)?;
    let mut garbage = vec![0u8; header.split_key_len()];
    random::fill(&mut garbage)?;
    region.write_at(header.key_material_offset(slot), &garbage)?;
    region.flush()?;
    let old = &header.slots[slot];
    header.slots[slot] = KeySlot {
        active: false,
        iterations: 0,
        salt: [0u8; SALT_LEN],
        key_offset: old.key_offset,
        stripes: old.stripes,
    };
    store_slot_entry(header, slot, region)
}

/// Iterations for `iter_time_ms`, refused when vdisk could not open the result.
fn scaled_iterations(hash: HashAlg, out_len: usize, iter_time_ms: u64, divide: u64) -> Result<u32> {
    let n = (iterations_for(hash, out_len, iter_time_ms)? / divide).max(u64::from(MIN_ITERATIONS));
    u32::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_ITERATIONS)
        .ok_or_else(|| {
            Error::invalid(
                "create luks",
                format!(
                    "PBKDF iterations {n} for an iter-time of {iter_time_ms} ms are more than vdisk opens ({MAX_ITERATIONS})"
                ),
            )
        })
}

/// Makes a new master key and a header for it with `passphrase` in slot 0. PBKDF2
/// iterations take about `iter_time_ms` for the slot and an eighth of it for the
/// master-key digest, as in qemu (and cryptsetup).
pub fn new_volume(
    cipher: CipherSpec,
    hash: HashAlg,
    iter_time_ms: u64,
    passphrase: &[u8],
) -> Result<NewVolume> {
    cipher.check_new()?;
    let key_bytes = cipher.key_bytes();
    let mut master_key = Zeroizing::new(vec![0u8; key_bytes]);
    random::fill(&mut master_key)?;
    let mut mk_salt = [0u8; SALT_LEN];
    random::fill(&mut mk_salt)?;
    let mk_iterations = scaled_iterations(hash, DIGEST_LEN, iter_time_ms, 8)?;
    let mut mk_digest = [0u8; DIGEST_LEN];
    pbkdf2(hash, &master_key, &mk_salt, mk_iterations, &mut mk_digest);

    let (offsets, payload_offset) = new_layout(key_bytes as u32);
    let mut slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|i| KeySlot {
        active: false,
        iterations: 0,
        salt: [0u8; SALT_LEN],
        key_offset: offsets[i],
        stripes: STRIPES,
    });
    let slot_iterations = scaled_iterations(hash, key_bytes, iter_time_ms, 1)?;
    let mut salt = [0u8; SALT_LEN];
    random::fill(&mut salt)?;
    let mut slot_key = Zeroizing::new(vec![0u8; key_bytes]);
    pbkdf2(hash, passphrase, &salt, slot_iterations, &mut slot_key);
    let mut material = af::split(&master_key, STRIPES, hash)?;
    SectorCipher::new(&cipher, &slot_key)?.encrypt(0, &mut material)?;
    slots[0] = KeySlot {
        active: true,
        iterations: slot_iterations,
        salt,
        key_offset: offsets[0],
        stripes: STRIPES,
    };
    let header = Header {
        cipher,
        hash,
        payload_offset,
        key_bytes: key_bytes as u32,
        mk_digest,
        mk_salt,
        mk_iterations,
        uuid: {
            let text = random::uuid()?;
            let mut field = [0u8; crate::header::UUID_LEN];
            field[..text.len()].copy_from_slice(text.as_bytes());
            field
        },
        slots,
    };
    debug_assert_eq!(material.len() % 16, 0);
    debug_assert!(material.len() <= (offsets[1] - offsets[0]) as usize * SECTOR_SIZE);
    Ok(NewVolume {
        header,
        material,
        master_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::{CipherAlg, CipherMode, IvGen};

    #[test]
    fn a_new_volume_unlocks_with_its_passphrase_only() {
        let spec = CipherSpec {
            alg: CipherAlg::Aes192,
            mode: CipherMode::Xts,
            ivgen: IvGen::Plain64,
        };
        let v = new_volume(spec, HashAlg::Sha256, 1, b"hunter2").expect("create");
        let bytes = v.header.to_bytes();
        let header = Header::parse(&bytes).expect("parse");
        assert_eq!(header, v.header);
        let at = header.key_material_offset(0);
        let material = v.material.clone();
        let mut read = |off: u64, buf: &mut [u8]| -> Result<()> {
            let start = (off - at) as usize;
            buf.copy_from_slice(&material[start..start + buf.len()]);
            Ok(())
        };
        let key = unlock(&header, b"hunter2", &mut read).expect("unlock");
        assert_eq!(&key[..], &v.master_key[..]);
        let err = unlock(&header, b"hunter3", &mut read).expect_err("wrong passphrase");
        assert_eq!(err.message(), INVALID_PASSWORD);
    }
}
