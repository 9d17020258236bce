//! Secrets by id, as qemu's `--object secret,id=ID,...` defines them for the whole process:
//! the command line adds them, drivers look them up by the id an option (`key-secret`)
//! names. Values are zeroed when removed and when replaced.

use std::collections::BTreeMap;
use std::sync::RwLock;

use vdisk_block::{Error, ErrorKind, Result};
use zeroize::Zeroizing;

static SECRETS: RwLock<BTreeMap<String, Zeroizing<Vec<u8>>>> = RwLock::new(BTreeMap::new());

/// Defines secret `id`. An id may be defined once, as qemu refuses a second object of the
/// same id.
pub fn define(id: &str, value: Zeroizing<Vec<u8>>) -> Result<()> {
    let mut map = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if map.contains_key(id) {
        return Err(Error::invalid(
            "object",
            format!("attempt to add duplicate property '{id}' to object (type 'container')"),
        ));
    }
    map.insert(id.to_string(), value);
    Ok(())
}

/// Removes secret `id` (zeroing it); true when it existed.
pub fn remove(id: &str) -> bool {
    let mut map = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    map.remove(id).is_some()
}

/// A copy of secret `id`, or qemu's error when no such secret exists.
pub fn lookup(id: &str) -> Result<Zeroizing<Vec<u8>>> {
    let map = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    map.get(id)
        .map(|v| Zeroizing::new(v.to_vec()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "secret",
                format!("No secret with id '{id}'"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_lookup_remove() {
        define("secret-test-a", Zeroizing::new(b"pw".to_vec())).expect("define");
        assert!(define("secret-test-a", Zeroizing::new(b"x".to_vec())).is_err());
        assert_eq!(&lookup("secret-test-a").expect("lookup")[..], b"pw");
        assert!(remove("secret-test-a"));
        assert_eq!(
            lookup("secret-test-a").expect_err("gone").message(),
            "No secret with id 'secret-test-a'"
        );
    }
}
