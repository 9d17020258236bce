//! The member list of a tar archive (an `.ova` is one), read from its headers only, so a disk
//! inside can be read in place. Handles ustar, GNU long names (`L`) and pax `path`/`size`
//! records; every header checksum is verified and every member must fit in the file.

use vdisk_block::{Error, Result};

use crate::source::Source;

/// The most members read from one archive.
pub const MAX_MEMBERS: usize = 65536;
/// The longest long name or pax header accepted.
const MAX_META_BYTES: u64 = 1 << 20;

const OP: &str = "read ova archive";

/// One regular file inside the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name in the archive.
    pub name: String,
    /// Where its data starts in the archive file.
    pub offset: u64,
    /// Its length.
    pub size: u64,
}

/// True when `block` (the first 512 bytes of a file) is a tar header.
pub fn is_tar(block: &[u8]) -> bool {
    block.len() >= 512 && block[257..262] == *b"ustar" && checksum_ok(block)
}

fn checksum_ok(block: &[u8]) -> bool {
    let Some(stored) = octal(&block[148..156]) else {
        return false;
    };
    let sum: u64 = block[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == stored
}

/// An octal field (NUL/space terminated), or a base-256 one (high bit set).
fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Reads the member list of the archive in `source`.
pub fn members(source: &Source) -> Result<Vec<Member>> {
    let bad = |why: String| Error::corrupt(OP, why).with_path(source.path());
    let len = source.len()?;
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let mut block = [0u8; 512];
    while at + 512 <= len {
        source.read_at(&mut block, at)?;
        if block.iter().all(|&b| b == 0) {
            break;
        }
        if !checksum_ok(&block) {
            return Err(bad(format!("bad tar header checksum at byte {at}")));
        }
        let size = match pax_size.take() {
            Some(s) => s,
            None => octal(&block[124..136])
                .ok_or_else(|| bad(format!("bad member size at byte {at}")))?,
        };
        let data = at + 512;
        let next = size
            .div_ceil(512)
            .checked_mul(512)
            .and_then(|s| data.checked_add(s))
            .ok_or_else(|| bad(format!("member size overflows at byte {at}")))?;
        if data + size > len {
            return Err(bad(format!(
                "the member at byte {at} needs {size} bytes, past the end of the archive (truncated?)"
            )));
        }
        let kind = block[156];
        let read_meta = |size: u64| -> Result<String> {
            if size > MAX_META_BYTES {
                return Err(bad(format!(
                    "a {size}-byte tar metadata record is too large"
                )));
            }
            let mut buf = vec![0u8; size as usize];
            source.read_at(&mut buf, data)?;
            Ok(cstr(&buf))
        };
        match kind {
            b'L' => long_name = Some(read_meta(size)?),
            b'x' => {
                for record in read_meta(size)?.lines() {
                    let Some((_, kv)) = record.split_once(' ') else {
                        continue;
                    };
                    match kv.split_once('=') {
                        Some(("path", v)) => pax_path = Some(v.to_string()),
                        Some(("size", v)) => {
                            pax_size = Some(v.parse().map_err(|_| bad("bad pax size".into()))?)
                        }
                        _ => {}
                    }
                }
            }
            b'0' | 0 | b'7' => {
                let name = match (long_name.take(), pax_path.take()) {
                    (_, Some(p)) | (Some(p), None) => p,
                    (None, None) => {
                        let prefix = cstr(&block[345..500]);
                        let name = cstr(&block[..100]);
                        if prefix.is_empty() || block[257..263] != *b"ustar\0" {
                            name
                        } else {
                            format!("{prefix}/{name}")
                        }
                    }
                };
                if out.len() >= MAX_MEMBERS {
                    return Err(bad(format!("more than {MAX_MEMBERS} members")));
                }
                out.push(Member {
                    name,
                    offset: data,
                    size,
                });
            }
            _ => {
                long_name = None;
                pax_path = None;
            }
        }
        at = next;
    }
    Ok(out)
}

/// Builds a tar archive in memory (tests and tools that make small OVAs).
pub fn build(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in members {
        let mut h = [0u8; 512];
        h[..name.len().min(100)].copy_from_slice(&name.as_bytes()[..name.len().min(100)]);
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_fields() {
        assert_eq!(octal(b"00000001750\0"), Some(1000));
        assert_eq!(octal(b"     17 \0"), Some(15));
        assert_eq!(octal(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(octal(b"12x"), None);
    }

    #[test]
    fn built_archives_are_tar() {
        let tar = build(&[("a.ovf", b"<x/>"), ("b.vmdk", &[1u8; 700])]);
        assert!(is_tar(&tar));
        let mut bad = tar.clone();
        bad[0] ^= 1;
        assert!(!is_tar(&bad));
    }
}
