//! Entry points for the cargo-fuzz target `luks_header` (in `fuzz/`, outside the workspace
//! build): the input is a LUKS header region (header, key material, payload). Any panic, hang
//! or unbounded allocation is a bug; errors are expected.
//!
//! One input is parsed and checked as qcow2's encryption region would be, unlocked with
//! [`PASSPHRASE`] (fuzzing builds cap PBKDF2 at [`crate::kdf::FUZZING_MAX_ITERATIONS`], so
//! seeds made with `iter-time=0` unlock and a mutated count costs nothing), and when it
//! unlocks, a key slot is added and erased in memory with the checks that must then hold.
//! Finally the bytes are opened as a file by the luks driver.

use std::path::Path;

use vdisk_block::{BlockDev, CreateOptions, EngineChoice, Error, OpenOptions, Result};
use zeroize::Zeroizing;

use crate::amend::{amend_slots, AmendOptions};
use crate::header::{Header, HEADER_LEN};
use crate::keys::{self, Region};
use crate::{format_specific_data, secret, LuksImage};

/// The passphrase fuzz seeds are made with (`secret,id=...,data=fuzz`).
pub const PASSPHRASE: &[u8] = b"fuzz";
/// The passphrase a successful unlock adds in a new slot.
const NEW_PASSPHRASE: &[u8] = b"fuzz-new";
const KEY_ID: &str = "fuzzing-key";
const NEW_ID: &str = "fuzzing-new";

/// The longest payload read through the driver.
const READ_LIMIT: usize = 64 << 10;

/// A region held in memory; it never grows.
struct MemRegion<'a>(&'a mut [u8]);

impl MemRegion<'_> {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| Some(s..s.checked_add(len)?)) {
            Some(r) if r.end <= self.0.len() => Ok(r),
            _ => Err(Error::corrupt("fuzz region", "access past the end")),
        }
    }
}

impl Region for MemRegion<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let r = self.range(offset, buf.len())?;
        self.0[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

fn define_secrets() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Only this process defines them; a failure would only make unlocks fail.
        let _ = secret::define(KEY_ID, Zeroizing::new(PASSPHRASE.to_vec()));
        let _ = secret::define(NEW_ID, Zeroizing::new(NEW_PASSPHRASE.to_vec()));
    });
}

fn unlock_in(header: &Header, passphrase: &[u8], bytes: &mut [u8]) -> Result<Zeroizing<Vec<u8>>> {
    let mut region = MemRegion(bytes);
    keys::unlock(header, passphrase, &mut |off, buf| region.read_at(off, buf))
}

/// The header and key slots of `data`, as a region in memory.
pub fn header_region(data: &[u8]) {
    define_secrets();
    let Ok(header) = Header::parse(data) else {
        return;
    };
    // What parses is written back as it was read.
    let again = Header::parse(&header.to_bytes());
    assert_eq!(again.as_ref().ok(), Some(&header), "header round trip");
    let _ = format_specific_data(&header, true);
    if header.check_key_material_within(data.len() as u64).is_err() {
        return;
    }
    let mut bytes = data.to_vec();
    let Ok(master) = unlock_in(&header, PASSPHRASE, &mut bytes) else {
        return;
    };
    // A slot added with the master key opens with its passphrase, then erasing it (by that
    // passphrase) leaves the passphrase refused; no other slot changes.
    let mut header = header;
    let mut add = CreateOptions::default();
    add.options.insert("state".into(), "active".into());
    add.options.insert("new-secret".into(), NEW_ID.into());
    add.options.insert("iter-time".into(), "0".into());
    let Ok(request) = AmendOptions::take(&mut add, "") else {
        return;
    };
    let before = header.clone();
    if amend_slots(
        &mut MemRegion(&mut bytes),
        &mut header,
        &master,
        &request,
        false,
    )
    .is_err()
    {
        return;
    }
    let reread = Header::parse(&bytes[..HEADER_LEN]);
    assert_eq!(reread.as_ref().ok(), Some(&header), "stored header");
    let changed: Vec<usize> = (0..header.slots.len())
        .filter(|&i| header.slots[i] != before.slots[i])
        .collect();
    assert_eq!(changed.len(), 1, "one slot changed");
    let slot = changed[0];
    // That slot itself: an unlock could stop earlier at another slot's refused count.
    let opens = keys::slot_opens(&header, slot, NEW_PASSPHRASE, &mut MemRegion(&mut bytes));
    assert_eq!(opens.ok(), Some(true), "the added slot");
    let mut erase = CreateOptions::default();
    erase.options.insert("state".into(), "inactive".into());
    erase.options.insert("old-secret".into(), NEW_ID.into());
    let Ok(request) = AmendOptions::take(&mut erase, "") else {
        return;
    };
    if amend_slots(
        &mut MemRegion(&mut bytes),
        &mut header,
        &master,
        &request,
        false,
    )
    .is_ok()
    {
        assert!(!header.slots[slot].active, "the erased slot");
        let opens = keys::slot_opens(&header, slot, NEW_PASSPHRASE, &mut MemRegion(&mut bytes));
        assert_eq!(opens.ok(), Some(false), "an erased passphrase");
        let reread = Header::parse(&bytes[..HEADER_LEN]);
        assert_eq!(
            reread.as_ref().ok(),
            Some(&header),
            "stored header after erase"
        );
    }
}

/// Opens the file at `path` with the luks driver: metadata only (as `info`), then for data
/// with [`PASSPHRASE`], reading the start of the payload.
pub fn open_file(path: &Path) {
    define_secrets();
    let mut options = OpenOptions {
        engine: EngineChoice::Sync,
        metadata_only: true,
        ..OpenOptions::default()
    };
    options
        .driver_options
        .insert("key-secret".into(), KEY_ID.into());
    if let Ok(image) = LuksImage::open(path, &options) {
        let _ = image.info();
        let _ = image.format_specific();
    }
    options.metadata_only = false;
    if let Ok(image) = LuksImage::open(path, &options) {
        let len = (image.size() as usize).min(READ_LIMIT);
        let mut buf = vec![0u8; len];
        let _ = image.read_at(&mut buf, 0);
    }
}

/// Exercises `data` as a header region, then (written to `scratch`) as a luks file.
pub fn fuzz_bytes(data: &[u8], scratch: &Path) {
    header_region(data);
    if std::fs::write(scratch, data).is_ok() {
        open_file(scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_unlocks_gains_and_loses_a_slot() {
        define_secrets();
        let v = keys::new_volume(
            crate::CipherSpec::DEFAULT,
            crate::HashAlg::Sha256,
            0,
            PASSPHRASE,
        )
        .expect("volume");
        let mut bytes = vec![0u8; v.header.payload_bytes() as usize];
        bytes[..HEADER_LEN].copy_from_slice(&v.header.to_bytes());
        let at = v.header.key_material_offset(0) as usize;
        bytes[at..at + v.material.len()].copy_from_slice(&v.material);
        header_region(&bytes);
        let dir = vdisk_block::testing::TempDir::new("luks-fuzzing").expect("tmp");
        fuzz_bytes(&bytes, &dir.join("scratch"));
        // Malformed inputs are errors, never panics.
        fuzz_bytes(&bytes[..HEADER_LEN], &dir.join("scratch"));
        fuzz_bytes(b"LUKS\xba\xbe\x00\x01", &dir.join("scratch"));
        fuzz_bytes(&[], &dir.join("scratch"));
    }
}
