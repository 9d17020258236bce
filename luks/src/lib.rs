//! LUKS1 encryption for vdisk: the standalone `luks` format (qemu's `-f luks`) and the
//! pieces qcow2's `encrypt.format=luks` shares with it.
//!
//! - [`header`]: the LUKS1 header, parsed with qemu's checks and vdisk's bounds;
//! - [`keys`]: master-key recovery from a passphrase, new volumes and adding or erasing key
//!   slots, over [`af`] (the anti-forensic splitter) and [`kdf`] (PBKDF2 and its timing);
//! - [`amend`]: qemu's key-slot options of `amend` (`state`, `new-secret`, `old-secret`,
//!   `keyslot`, `iter-time`) and their checks;
//! - [`cipher`]: sector encryption ([`algo`] names what is implemented);
//! - [`secret`]: qemu-style secrets by id;
//! - [`LuksFormat`] / [`LuksImage`]: the format driver;
//! - [`fuzzing`]: the entry point of the `luks_header` cargo-fuzz target.
//!
//! For a LUKS header inside another container (qcow2's encryption region), the pieces work
//! on offsets relative to the header: [`Header::parse`] and
//! [`Header::check_key_material_within`], [`keys::unlock`] with a reader of the region,
//! [`keys::new_volume`] for a new header and slot 0, [`NewVolumeOptions::take`] with the
//! `encrypt.` prefix, [`amend::AmendOptions::take`] (same prefix) and [`amend::amend_slots`]
//! over a [`keys::Region`] for key-slot changes, [`SectorCipher`] for the data (with qcow2's own sector numbers) and
//! [`format_specific_data`] for `info`.
#![forbid(unsafe_code)]

pub mod af;
pub mod algo;
pub mod amend;
pub mod cipher;
mod format;
pub mod fuzzing;
pub mod header;
mod image;
pub mod kdf;
pub mod keys;
pub mod random;
pub mod secret;

pub use algo::{CipherAlg, CipherMode, CipherSpec, HashAlg, IvGen};
pub use cipher::SectorCipher;
pub use format::{
    LuksFormat, NewVolumeOptions, CIPHER_ALGS, CIPHER_MODES, DEFAULT_ITER_TIME_MS, HASH_ALGS,
    IVGEN_ALGS,
};
pub use header::Header;
pub use image::{format_specific_data, LuksImage, KEY_REQUIRED};
