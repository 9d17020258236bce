//! The disks an OVF descriptor lists: its `References/File` elements (file names) and its
//! `DiskSection/Disk` elements (which file each disk is, and its capacity). Only start tags
//! and their attributes are read; namespace prefixes are ignored.

use vdisk_block::{Error, Result};

use crate::descriptor::printable;

/// The largest OVF descriptor accepted.
pub const MAX_OVF_BYTES: usize = 16 << 20;
/// The most disks accepted.
const MAX_DISKS: usize = 4096;

const OP: &str = "parse ovf descriptor";

/// One disk of an appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// `ovf:diskId`.
    pub id: String,
    /// The file (`ovf:href` of the referenced `File`); `None` for a disk the importer creates
    /// empty.
    pub href: Option<String>,
    /// The referenced file's compression (`gzip`), if any.
    pub compression: Option<String>,
    /// The disk's capacity in bytes, when stated.
    pub capacity: Option<u64>,
    /// `ovf:format`: the disk format's URI.
    pub format: Option<String>,
}

/// True when `header` (the first bytes of a file) looks like an OVF descriptor.
pub fn looks_like_ovf(header: &[u8]) -> bool {
    let text = String::from_utf8_lossy(header);
    text.trim_start().starts_with('<')
        && text.contains("Envelope")
        && text.contains("schemas.dmtf.org/ovf/envelope")
}

fn unescape(value: &str) -> String {
    value
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The start tags of `xml` as (local name, attributes by local name).
fn start_tags(xml: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        if rest.starts_with('/') || rest.starts_with('?') || rest.starts_with('!') {
            continue;
        }
        let Some(close) = rest.find('>') else { break };
        let tag = &rest[..close];
        rest = &rest[close + 1..];
        let name_end = tag
            .find(|c: char| c.is_whitespace() || c == '/')
            .unwrap_or(tag.len());
        let name = &tag[..name_end];
        let local = name.rsplit(':').next().unwrap_or(name).to_string();
        let mut attrs = Vec::new();
        let mut a = &tag[name_end..];
        while let Some(eq) = a.find('=') {
            let key = a[..eq].trim();
            let key = key.rsplit(':').next().unwrap_or(key).to_string();
            let after = a[eq + 1..].trim_start();
            let Some(quote) = after.chars().next().filter(|c| *c == '"' || *c == '\'') else {
                break;
            };
            let Some(end) = after[1..].find(quote) else {
                break;
            };
            attrs.push((key, unescape(&after[1..1 + end])));
            a = &after[end + 2..];
        }
        out.push((local, attrs));
    }
    out
}

fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The multiplier of `ovf:capacityAllocationUnits` (`byte * 2^30`, `byte * 1024 * 1024`, ...).
fn units(text: &str) -> Option<u64> {
    let mut factor: u64 = 1;
    for part in text.split('*').map(str::trim) {
        if part == "byte" || part.is_empty() {
            continue;
        }
        let v = if let Some((base, exp)) = part.split_once('^') {
            base.trim()
                .parse::<u64>()
                .ok()?
                .checked_pow(exp.trim().parse().ok()?)?
        } else {
            part.parse::<u64>().ok()?
        };
        factor = factor.checked_mul(v)?;
    }
    Some(factor)
}

/// The disks `xml` lists, in the order of its disk section.
pub fn disks(xml: &[u8]) -> Result<Vec<OvfDisk>> {
    if xml.len() > MAX_OVF_BYTES {
        return Err(Error::corrupt(
            OP,
            format!("the descriptor is larger than {MAX_OVF_BYTES} bytes"),
        ));
    }
    let text = std::str::from_utf8(xml)
        .map_err(|_| Error::corrupt(OP, "the descriptor is not UTF-8 XML"))?;
    let tags = start_tags(text);
    let files: Vec<&Vec<(String, String)>> = tags
        .iter()
        .filter(|(name, _)| name == "File")
        .map(|(_, a)| a)
        .collect();
    let mut out = Vec::new();
    for (name, attrs) in &tags {
        if name != "Disk" {
            continue;
        }
        if out.len() >= MAX_DISKS {
            return Err(Error::corrupt(OP, format!("more than {MAX_DISKS} disks")));
        }
        let id = attr(attrs, "diskId").unwrap_or_default().to_string();
        let file =
            match attr(attrs, "fileRef") {
                None => None,
                Some(r) => Some(files.iter().find(|f| attr(f, "id") == Some(r)).ok_or_else(
                    || {
                        Error::corrupt(
                            OP,
                            format!(
                                "disk '{}' names file '{}', which References does not list",
                                printable(&id),
                                printable(r)
                            ),
                        )
                    },
                )?),
            };
        let capacity = match attr(attrs, "capacity") {
            None => None,
            Some(c) => {
                let n: u64 = c.trim().parse().map_err(|_| {
                    Error::corrupt(
                        OP,
                        format!("disk '{}' has capacity '{}'", printable(&id), printable(c)),
                    )
                })?;
                let unit = attr(attrs, "capacityAllocationUnits").map_or(Some(1), units);
                Some(unit.and_then(|u| n.checked_mul(u)).ok_or_else(|| {
                    Error::corrupt(
                        OP,
                        format!("disk '{}' has an unreadable capacity", printable(&id)),
                    )
                })?)
            }
        };
        out.push(OvfDisk {
            id,
            href: file.and_then(|f| attr(f, "href")).map(str::to_string),
            compression: file
                .and_then(|f| attr(f, "compression"))
                .map(str::to_string),
            capacity,
            format: attr(attrs, "format").map(str::to_string),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="vm-disk1.vmdk" ovf:id="file1" ovf:size="68096"/>
    <File ovf:href="vm-disk2.vmdk" ovf:id="file2" ovf:size="1024" ovf:compression="gzip"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="16" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="1048576" ovf:diskId="vmdisk2" ovf:fileRef="file2"/>
    <Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 1024 * 1024" ovf:diskId="blank"/>
  </DiskSection>
</Envelope>"#;

    #[test]
    fn lists_disks_in_order() {
        assert!(looks_like_ovf(OVF.as_bytes()));
        let d = disks(OVF.as_bytes()).expect("parse");
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].href.as_deref(), Some("vm-disk1.vmdk"));
        assert_eq!(d[0].capacity, Some(16 << 30));
        assert!(d[0]
            .format
            .as_deref()
            .is_some_and(|f| f.ends_with("streamOptimized")));
        assert_eq!(d[1].compression.as_deref(), Some("gzip"));
        assert_eq!(d[2].href, None);
        assert_eq!(d[2].capacity, Some(1 << 20));
    }

    #[test]
    fn dangling_references_are_errors() {
        let xml = OVF.replace("ovf:id=\"file1\"", "ovf:id=\"other\"");
        assert!(disks(xml.as_bytes()).is_err());
        assert!(!looks_like_ovf(b"<html>"));
    }
}
