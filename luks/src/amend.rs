//! Key-slot management, qemu's LUKS `amend` options: `state=active` with `new-secret` adds
//! a passphrase (to the first free slot or to `keyslot`), `state=inactive` erases the slots
//! `old-secret` opens, or slot `keyslot`. The checks, their order and their words are
//! qemu 10's; `force` is qemu-img's `--force` (erase the last active slot, overwrite an
//! active one).
//!
//! Standalone luks takes the options by their bare names; qcow2 by `encrypt.` names
//! ([`AmendOptions::take`] with that prefix). Both then call [`amend_slots`] with the
//! header region and the master key of the opened image.

use vdisk_block::{CreateOptions, Error, Result};

use crate::header::{Header, NUM_SLOTS};
use crate::keys::{add_slot, erase_slot, slot_opens, Region};
use crate::{secret, DEFAULT_ITER_TIME_MS};

const OP: &str = "amend luks";

/// The state the affected key slots get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Add a passphrase.
    Active,
    /// Erase passphrases.
    Inactive,
}

/// qemu's `QCryptoBlockAmendOptionsLUKS`, as the `-o` options give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmendOptions {
    /// `state`.
    pub state: SlotState,
    /// `new-secret`: the id of the passphrase to add.
    pub new_secret: Option<String>,
    /// `old-secret`: the id of the passphrase whose slots to erase.
    pub old_secret: Option<String>,
    /// `keyslot`, as qemu's C code holds it (a 32-bit int, so `4294967296` is slot 0 and
    /// `-1` reads as 4294967295).
    pub keyslot: Option<u32>,
    /// `iter-time` in milliseconds (qemu's default when absent).
    pub iter_time_ms: u64,
}

/// qemu's `qemu_strtoi64` with base 0, as its option visitor reads a number (the sign and
/// digits as [`vdisk_block::size::qemu_number_parts`] reads them, then the `i64` range).
fn parse_i64(text: &str) -> Option<i64> {
    let (negative, magnitude) = vdisk_block::size::qemu_number_parts(text).ok()?;
    let magnitude = i128::from(magnitude);
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

impl AmendOptions {
    /// Takes `{prefix}state`, `{prefix}new-secret`, `{prefix}old-secret`, `{prefix}keyslot`
    /// and `{prefix}iter-time` out of `options` (names and types already checked by the
    /// command line; this is qemu's second look, which types them for the driver). Its
    /// messages name the options without the prefix, as qemu's do for qcow2 too
    /// (`Parameter 'state' is missing` for `encrypt.state`).
    pub fn take(options: &mut CreateOptions, prefix: &str) -> Result<Self> {
        let mut take = |name: &str| options.take(&format!("{prefix}{name}"));
        let state = take("state");
        let new_secret = take("new-secret");
        let old_secret = take("old-secret");
        let keyslot = take("keyslot");
        let iter_time = take("iter-time");
        let state = match state.as_deref() {
            Some("active") => SlotState::Active,
            Some("inactive") => SlotState::Inactive,
            Some(other) => {
                return Err(Error::invalid(
                    OP,
                    format!("Parameter 'state' does not accept value '{other}'"),
                ))
            }
            None => return Err(Error::invalid(OP, "Parameter 'state' is missing")),
        };
        let number = |name: &str, value: Option<String>| -> Result<Option<i64>> {
            value
                .map(|v| {
                    parse_i64(&v).ok_or_else(|| {
                        Error::invalid(OP, format!("Parameter '{name}' expects integer"))
                    })
                })
                .transpose()
        };
        // qemu's C code keeps the slot in an int: the low 32 bits count.
        let keyslot = number("keyslot", keyslot)?.map(|k| k as u32);
        let iter_time_ms = match number("iter-time", iter_time)? {
            None => DEFAULT_ITER_TIME_MS,
            // A negative time is a huge one to qemu too (it multiplies as unsigned).
            Some(t) => t as u64,
        };
        Ok(AmendOptions {
            state,
            new_secret,
            old_secret,
            keyslot,
            iter_time_ms,
        })
    }
}

fn refuse(message: impl Into<String>) -> Error {
    Error::invalid(OP, message)
}

/// The slot `keyslot` names, refused past the last slot.
fn slot_index(keyslot: Option<u32>) -> Result<Option<usize>> {
    match keyslot {
        Some(k) if k as usize >= NUM_SLOTS => Err(refuse(format!(
            "Invalid keyslot {k} specified, must be between 0 and {}",
            NUM_SLOTS - 1
        ))),
        Some(k) => Ok(Some(k as usize)),
        None => Ok(None),
    }
}

/// Applies `options` to the key slots of `header` (kept up to date with what is written),
/// whose region is `region` and whose master key is `master_key`.
pub fn amend_slots(
    region: &mut dyn Region,
    header: &mut Header,
    master_key: &[u8],
    options: &AmendOptions,
    force: bool,
) -> Result<()> {
    match options.state {
        SlotState::Active => activate(region, header, master_key, options, force),
        SlotState::Inactive => deactivate(region, header, options, force),
    }
}

fn activate(
    region: &mut dyn Region,
    header: &mut Header,
    master_key: &[u8],
    options: &AmendOptions,
    force: bool,
) -> Result<()> {
    let Some(new_secret) = options.new_secret.as_deref() else {
        return Err(refuse("'new-secret' is required to activate a keyslot"));
    };
    if options.old_secret.is_some() {
        return Err(refuse(
            "'old-secret' must not be given when activating keyslots",
        ));
    }
    let slot = match slot_index(options.keyslot)? {
        Some(i) if header.slots[i].active && !force => {
            return Err(refuse(format!(
                "Refusing to overwrite active keyslot {i} - please erase it first"
            )))
        }
        Some(i) => i,
        None => header
            .slots
            .iter()
            .position(|s| !s.active)
            .ok_or_else(|| refuse("Can't add a keyslot - all keyslots are in use"))?,
    };
    let passphrase = secret::lookup(new_secret)?;
    add_slot(
        region,
        header,
        master_key,
        &passphrase,
        slot,
        options.iter_time_ms,
    )
}

fn deactivate(
    region: &mut dyn Region,
    header: &mut Header,
    options: &AmendOptions,
    force: bool,
) -> Result<()> {
    if options.new_secret.is_some() {
        return Err(refuse(
            "'new-secret' must not be given when erasing keyslots",
        ));
    }
    let old = options
        .old_secret
        .as_deref()
        .map(secret::lookup)
        .transpose()?;
    let active = header.slots.iter().filter(|s| s.active).count();
    if let Some(i) = slot_index(options.keyslot)? {
        if !header.slots[i].active {
            // qemu's message ends in a space.
            return Err(refuse(format!(
                "Given keyslot {i} is already erased (inactive) "
            )));
        }
        if let Some(old) = &old {
            if !slot_opens(header, i, old, region)? {
                return Err(refuse(format!(
                    "Given keyslot {i} doesn't contain the given old password for erase operation"
                )));
            }
        }
        if !force && active == 1 {
            return Err(refuse(format!(
                "Attempt to erase the only active keyslot {i} which will erase all the data in the image irreversibly - refusing operation"
            )));
        }
        return erase_slot(region, header, i);
    }
    let Some(old) = old else {
        return Err(refuse(
            "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
        ));
    };
    let mut matching = Vec::new();
    for i in 0..NUM_SLOTS {
        if slot_opens(header, i, &old, region)? {
            matching.push(i);
        }
    }
    if matching.is_empty() {
        return Err(refuse(
            "No keyslots match given (old) password for erase operation",
        ));
    }
    if !force && matching.len() == active {
        return Err(refuse(
            "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
        ));
    }
    for i in matching {
        erase_slot(region, header, i)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_qemus_option_visitor_reads_them() {
        for (text, want) in [
            ("3", Some(3)),
            (" 3", Some(3)),
            ("+2", Some(2)),
            ("-0", Some(0)),
            ("-2", Some(-2)),
            ("0x3", Some(3)),
            ("0X2", Some(2)),
            ("010", Some(8)),
            ("07", Some(7)),
            ("0", Some(0)),
            ("99999999999", Some(99_999_999_999)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-18446744073709551615", None),
            ("08", None),
            ("0x", None),
            ("3 ", None),
            ("7x", None),
            ("", None),
            ("-", None),
        ] {
            assert_eq!(parse_i64(text), want, "{text:?}");
        }
    }

    #[test]
    fn keyslots_keep_the_low_32_bits_as_qemu_does() {
        let mut o = CreateOptions::default();
        o.options.insert("state".into(), "active".into());
        o.options.insert("keyslot".into(), "4294967296".into());
        assert_eq!(
            AmendOptions::take(&mut o, "").expect("take").keyslot,
            Some(0)
        );
        let mut o = CreateOptions::default();
        o.options.insert("encrypt.state".into(), "inactive".into());
        o.options.insert("encrypt.keyslot".into(), "-2".into());
        let a = AmendOptions::take(&mut o, "encrypt.").expect("take");
        assert_eq!(a.keyslot, Some(4_294_967_294));
        let mut o = CreateOptions::default();
        o.options.insert("encrypt.new-secret".into(), "s".into());
        assert_eq!(
            AmendOptions::take(&mut o, "encrypt.")
                .expect_err("no state")
                .message(),
            "Parameter 'state' is missing"
        );
        assert_eq!(
            slot_index(a.keyslot).expect_err("range").message(),
            "Invalid keyslot 4294967294 specified, must be between 0 and 7"
        );
    }
}
