//! The VHDX parent locator (MS-VHDX 2.6.2.6): where a differencing image's parent is.
//!
//! The locator is a list of UTF-16LE key/value pairs. `parent_linkage` names the parent's
//! DataWriteGuid; `relative_path`, `volume_path` and `absolute_win32_path` say where to
//! look, tried in that order.

use std::path::{Path, PathBuf};

use crate::bytes::{le16, le32, put_le16, put_le32, utf16le};
use crate::guid::Guid;

/// The locator type of a VHDX parent.
pub const VHDX_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// A parsed parent locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// The locator type (only [`VHDX_LOCATOR_TYPE`] is understood).
    pub locator_type: Guid,
    /// Every key/value pair, in stored order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Parses a locator item, rejecting pairs that lie outside it.
    pub fn parse(raw: &[u8]) -> std::result::Result<Self, String> {
        if raw.len() < 20 {
            return Err("parent locator is shorter than its header".into());
        }
        let locator_type = Guid::from_slice(&raw[..16]);
        let count = le16(raw, 18) as usize;
        if 20 + count * 12 > raw.len() {
            return Err(format!(
                "parent locator claims {count} entries, more than its {} bytes hold",
                raw.len()
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = 20 + i * 12;
            let (ko, vo) = (le32(raw, at) as usize, le32(raw, at + 4) as usize);
            let (kl, vl) = (le16(raw, at + 8) as usize, le16(raw, at + 10) as usize);
            let field = |o: usize, l: usize| -> std::result::Result<String, String> {
                o.checked_add(l)
                    .and_then(|end| raw.get(o..end))
                    .map(utf16le)
                    .ok_or_else(|| format!("parent locator entry {i} lies outside the locator"))
            };
            entries.push((field(ko, kl)?, field(vo, vl)?));
        }
        let locator = ParentLocator {
            locator_type,
            entries,
        };
        if locator_type != VHDX_LOCATOR_TYPE {
            return Err(format!("unknown parent locator type {locator_type}"));
        }
        if locator.linkage().is_none() {
            return Err("parent locator has no valid parent_linkage".into());
        }
        if locator.paths().is_empty() {
            return Err("parent locator names no parent path".into());
        }
        Ok(locator)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parent's DataWriteGuid the image was made against.
    pub fn linkage(&self) -> Option<Guid> {
        self.get("parent_linkage").and_then(Guid::parse)
    }

    /// The alternative linkage, valid while a parent is being rewritten.
    pub fn linkage2(&self) -> Option<Guid> {
        self.get("parent_linkage2").and_then(Guid::parse)
    }

    /// The stored paths, in the order they are tried: `(key, value)`.
    pub fn paths(&self) -> Vec<(&'static str, &str)> {
        ["relative_path", "volume_path", "absolute_win32_path"]
            .into_iter()
            .filter_map(|k| self.get(k).map(|v| (k, v)))
            .collect()
    }

    /// The path to show as the backing file name (the first stored path).
    pub fn display_path(&self) -> Option<&str> {
        self.paths().first().map(|(_, v)| *v)
    }

    /// Host paths to try for the parent of the image at `image`, in order.
    pub fn candidates(&self, image: &Path) -> Vec<PathBuf> {
        let dir = image.parent().unwrap_or_else(|| Path::new("."));
        let mut out = Vec::new();
        for (key, value) in self.paths() {
            let unix = value.replace('\\', "/");
            match key {
                "relative_path" => out.push(dir.join(unix.trim_start_matches("./"))),
                // `\\?\Volume{...}\dir\file` and `C:\dir\file` mean nothing on this host
                // except when they are already a host path.
                _ if unix.starts_with('/') && !unix.starts_with("//") => {
                    out.push(PathBuf::from(unix))
                }
                _ => {}
            }
        }
        // A parent moved alongside its child is still found by its file name.
        for (_, value) in self.paths() {
            if let Some(name) = value.rsplit(['\\', '/']).next().filter(|n| !n.is_empty()) {
                let p = dir.join(name);
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
        out
    }
}

/// Encodes a locator holding `entries` (used by differencing creation and tests).
pub fn encode(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut head = vec![0u8; 20 + entries.len() * 12];
    head[..16].copy_from_slice(&VHDX_LOCATOR_TYPE.0);
    put_le16(&mut head, 18, entries.len() as u16);
    let mut data = Vec::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        let mut place = |text: &str| -> (u32, u16) {
            let at = head.len() + data.len();
            let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
            data.extend_from_slice(&bytes);
            (at as u32, bytes.len() as u16)
        };
        let (ko, kl) = place(k);
        let (vo, vl) = place(v);
        let at = 20 + i * 12;
        put_le32(&mut head, at, ko);
        put_le32(&mut head, at + 4, vo);
        put_le16(&mut head, at + 8, kl);
        put_le16(&mut head, at + 10, vl);
    }
    head.extend_from_slice(&data);
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_linkage() {
        let raw = encode(&[
            ("parent_linkage", "{83ba4d3f-5a47-4c4c-a1a6-1f7e1b2a4c01}"),
            ("relative_path", ".\\base.vhdx"),
            ("absolute_win32_path", "C:\\vms\\base.vhdx"),
        ]);
        let loc = ParentLocator::parse(&raw).expect("valid");
        assert_eq!(
            loc.linkage().map(|g| g.to_string()).as_deref(),
            Some("83ba4d3f-5a47-4c4c-a1a6-1f7e1b2a4c01")
        );
        let c = loc.candidates(Path::new("/img/child.vhdx"));
        assert_eq!(c, vec![PathBuf::from("/img/base.vhdx")]);
    }

    #[test]
    fn rejects_broken_locators() {
        assert!(ParentLocator::parse(&[0u8; 10]).is_err());
        let no_link = encode(&[("relative_path", "a.vhdx")]);
        assert!(ParentLocator::parse(&no_link).is_err());
        let no_path = encode(&[("parent_linkage", "{83ba4d3f-5a47-4c4c-a1a6-1f7e1b2a4c01}")]);
        assert!(ParentLocator::parse(&no_path).is_err());
        let mut outside = encode(&[
            ("parent_linkage", "{83ba4d3f-5a47-4c4c-a1a6-1f7e1b2a4c01}"),
            ("relative_path", "a.vhdx"),
        ]);
        put_le32(&mut outside, 20, 60_000);
        assert!(ParentLocator::parse(&outside).is_err());
        let mut many = encode(&[]);
        put_le16(&mut many, 18, 500);
        assert!(ParentLocator::parse(&many).is_err());
    }

    #[test]
    fn libvhdi_fragment_header_is_a_vhdx_locator() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/fragments/libvhdi/parent_locator_header.1");
        let Ok(raw) = std::fs::read(&path) else {
            eprintln!("shared fixtures absent: skipping fragment test");
            return;
        };
        assert_eq!(Guid::from_slice(&raw[..16]), VHDX_LOCATOR_TYPE);
        assert_eq!(le16(&raw, 18), 5);
    }
}
