//! The text descriptor: the header keys, the extent lines and the disk database (DDB).
//!
//! A descriptor is either a file of its own (flat, split and ESXi disks) or embedded in a
//! sparse extent at `descriptorOffset` (monolithicSparse, streamOptimized). Parsing is strict
//! where a lenient reading would change the disk: an extent line with an access mode or type
//! this parser does not know is an error naming it, never a line skipped (qemu skips such lines
//! and presents a shorter disk). Every size is bounded before anything is allocated.

use vdisk_block::{Error, Result};

/// The largest descriptor accepted (qemu's limit too).
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// The longest line accepted; real lines are under 200 bytes, file names under `PATH_MAX`.
pub const MAX_LINE_BYTES: usize = 8192;
/// The most extent lines accepted: a 62 TiB twoGbMaxExtent disk has 31744, so this leaves room
/// while bounding the files one descriptor can make us open.
pub const MAX_EXTENTS: usize = 65536;
/// The `parentCID` of a disk without a parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

const OP: &str = "parse vmdk descriptor";

/// How the disk may use an extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write.
    ReadWrite,
    /// Read only.
    ReadOnly,
    /// Neither: the extent occupies guest space but must not be read.
    NoAccess,
}

impl Access {
    /// The descriptor spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }

    fn parse(word: &str, line_no: usize) -> Result<Self> {
        match word {
            "RW" => Ok(Access::ReadWrite),
            "RDONLY" => Ok(Access::ReadOnly),
            "NOACCESS" => Ok(Access::NoAccess),
            other => Err(Error::corrupt(
                OP,
                format!(
                    "line {line_no}: unknown extent access mode '{}' (expected RW, RDONLY or NOACCESS)",
                    printable(other)
                ),
            )),
        }
    }
}

/// The kind of an extent as its descriptor line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Raw data in a file, from an offset (sectors).
    Flat,
    /// A hosted sparse (VMDK4 `KDMV`) file.
    Sparse,
    /// No file: reads as zeroes.
    Zero,
    /// An ESXi flat file (the `-flat.vmdk` of a `vmfs` disk).
    Vmfs,
    /// An ESXi COW delta (VMDK3 `COWD`).
    VmfsSparse,
    /// An ESXi space-efficient delta.
    SeSparse,
    /// An ESXi raw device mapping.
    VmfsRdm,
    /// An ESXi raw device.
    VmfsRaw,
}

impl ExtentType {
    /// The descriptor spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }

    fn parse(word: &str, line_no: usize) -> Result<Self> {
        Ok(match word {
            "FLAT" => ExtentType::Flat,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            other => {
                return Err(Error::corrupt(
                    OP,
                    format!(
                        "line {line_no}: unknown extent type '{}' (expected FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, SESPARSE, VMFSRDM or VMFSRAW)",
                        printable(other)
                    ),
                ))
            }
        })
    }
}

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// How the disk may use the extent.
    pub access: Access,
    /// Guest sectors (512 bytes) the extent covers; never zero.
    pub sectors: u64,
    /// The extent's kind.
    pub kind: ExtentType,
    /// The file, relative to the descriptor's folder unless absolute; `None` only for ZERO.
    pub file: Option<String>,
    /// Start of the data inside the file in sectors (FLAT; VMFS may give one).
    pub offset: Option<u64>,
}

impl ExtentLine {
    /// The line as a descriptor spells it.
    pub fn to_line(&self) -> String {
        let mut line = format!(
            "{} {} {}",
            self.access.as_str(),
            self.sectors,
            self.kind.as_str()
        );
        if let Some(file) = &self.file {
            line.push_str(&format!(" \"{file}\""));
            if let Some(offset) = self.offset {
                line.push_str(&format!(" {offset}"));
            }
        }
        line
    }
}

/// A parsed descriptor. Keys this parser has no field for are kept, in order, so writing a
/// parsed descriptor back loses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `version` (1, 2 or 3).
    pub version: u32,
    /// `CID`: the content id, changed on every first write after open.
    pub cid: u32,
    /// `parentCID`: the parent's CID when this disk was made, [`NO_PARENT_CID`] without one.
    pub parent_cid: u32,
    /// `createType` (`monolithicSparse`, `vmfs`, ...).
    pub create_type: String,
    /// `parentFileNameHint`: the parent of a delta disk.
    pub parent_file_name_hint: Option<String>,
    /// Other header keys (`encoding`, `isNativeSnapshot`, ...), values unquoted.
    pub other: Vec<(String, String)>,
    /// The extent lines, in guest order.
    pub extents: Vec<ExtentLine>,
    /// The disk database, keys with their `ddb.` prefix, values unquoted.
    pub ddb: Vec<(String, String)>,
}

impl Descriptor {
    /// A descriptor with no extents and no DDB entries.
    pub fn new(create_type: &str, cid: u32) -> Self {
        Descriptor {
            version: 1,
            cid,
            parent_cid: NO_PARENT_CID,
            create_type: create_type.to_string(),
            parent_file_name_hint: None,
            other: Vec::new(),
            extents: Vec::new(),
            ddb: Vec::new(),
        }
    }

    /// Parses descriptor text. Bytes after the first NUL are ignored (an embedded descriptor
    /// is padded with NULs to its sector count).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let bytes = match bytes.iter().position(|&b| b == 0) {
            Some(end) => &bytes[..end],
            None => bytes,
        };
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(Error::corrupt(
                OP,
                format!(
                    "the descriptor is {} bytes, more than the {MAX_DESCRIPTOR_BYTES} allowed",
                    bytes.len()
                ),
            ));
        }
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut parent_hint = None;
        let mut other = Vec::new();
        let mut extents = Vec::new();
        let mut ddb = Vec::new();
        let text = decode(bytes)?;
        for (index, raw) in text.split('\n').enumerate() {
            let line_no = index + 1;
            if raw.len() > MAX_LINE_BYTES {
                return Err(Error::corrupt(
                    OP,
                    format!(
                        "line {line_no} is {} bytes long, more than the {MAX_LINE_BYTES} allowed",
                        raw.len()
                    ),
                ));
            }
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((key, value)) = key_value(line) {
                let value = unquote(value);
                match key {
                    "version" => version = Some(parse_version(value, line_no)?),
                    "CID" => cid = Some(parse_cid(key, value, line_no)?),
                    "parentCID" => parent_cid = Some(parse_cid(key, value, line_no)?),
                    "createType" => create_type = Some(value.to_string()),
                    "parentFileNameHint" => parent_hint = Some(value.to_string()),
                    k if k.starts_with("ddb.") => ddb.push((k.to_string(), value.to_string())),
                    k => other.push((k.to_string(), value.to_string())),
                }
                continue;
            }
            if extents.len() >= MAX_EXTENTS {
                return Err(Error::corrupt(
                    OP,
                    format!("more than {MAX_EXTENTS} extent lines"),
                ));
            }
            extents.push(parse_extent_line(line, line_no)?);
        }
        let version = version.ok_or_else(|| Error::corrupt(OP, "no 'version' line"))?;
        let create_type = create_type.ok_or_else(|| Error::corrupt(OP, "no 'createType' line"))?;
        Ok(Descriptor {
            version,
            // A descriptor without CIDs is a disk without a parent and an unknown content id.
            cid: cid.unwrap_or(0),
            parent_cid: parent_cid.unwrap_or(NO_PARENT_CID),
            create_type,
            parent_file_name_hint: parent_hint,
            other,
            extents,
            ddb,
        })
    }

    /// The value of DDB key `key` (with its `ddb.` prefix).
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of header key `key` kept in [`Descriptor::other`].
    pub fn other(&self, key: &str) -> Option<&str> {
        self.other
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or adds) DDB key `key`.
    pub fn set_ddb(&mut self, key: &str, value: &str) {
        match self.ddb.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => self.ddb.push((key.to_string(), value.to_string())),
        }
    }

    /// True when the disk is a delta on a parent.
    pub fn has_parent(&self) -> bool {
        self.parent_cid != NO_PARENT_CID || self.parent_file_name_hint.is_some()
    }

    /// Guest sectors of all extents together; `None` if the sum overflows.
    pub fn total_sectors(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |sum, e| sum.checked_add(e.sectors))
    }

    /// The descriptor as the bytes to store: Windows-1252 when its `encoding` says so and
    /// every character has a byte there, UTF-8 otherwise (the `encoding` key then says UTF-8).
    pub fn to_bytes(&self) -> Vec<u8> {
        let cp1252 = self.other("encoding").is_some_and(names_cp1252);
        if cp1252 {
            let text = self.to_text();
            let encoded: Option<Vec<u8>> = text.chars().map(encode_cp1252).collect();
            if let Some(bytes) = encoded {
                return bytes;
            }
            let mut utf8 = self.clone();
            for (k, v) in &mut utf8.other {
                if k == "encoding" {
                    *v = "UTF-8".into();
                }
            }
            return utf8.to_text().into_bytes();
        }
        self.to_text().into_bytes()
    }

    /// The descriptor as text, laid out as VMware and qemu write it.
    pub fn to_text(&self) -> String {
        let mut out = String::from("# Disk DescriptorFile\n");
        out.push_str(&format!("version={}\n", self.version));
        if let Some(enc) = self.other("encoding") {
            out.push_str(&format!("encoding=\"{enc}\"\n"));
        }
        out.push_str(&format!("CID={:08x}\n", self.cid));
        out.push_str(&format!("parentCID={:08x}\n", self.parent_cid));
        for (key, value) in self.other.iter().filter(|(k, _)| k != "encoding") {
            out.push_str(&format!("{key}=\"{value}\"\n"));
        }
        out.push_str(&format!("createType=\"{}\"\n", self.create_type));
        if let Some(hint) = &self.parent_file_name_hint {
            out.push_str(&format!("parentFileNameHint=\"{hint}\"\n"));
        }
        out.push_str("\n# Extent description\n");
        for extent in &self.extents {
            out.push_str(&extent.to_line());
            out.push('\n');
        }
        out.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (key, value) in &self.ddb {
            out.push_str(&format!("{key} = \"{value}\"\n"));
        }
        out
    }
}

/// Characters of Windows code page 1252 for bytes 0x80..=0x9f (the rest is Latin-1); the
/// five bytes the code page leaves undefined map to the C1 control of the same number.
const CP1252_HIGH: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

/// The descriptor as text: Windows-1252 when it says `encoding="windows-1252"` (what VMware
/// writes on Windows hosts) or is not UTF-8, UTF-8 otherwise, so a file name with accents
/// names the same file it names on the host it was copied from. Bytes no text
/// holds (controls other than tab and line ends) mean this is not a descriptor at all.
fn decode(bytes: &[u8]) -> Result<std::borrow::Cow<'_, str>> {
    // The declaration wins: Windows-1252 bytes can happen to form valid UTF-8. It is read
    // with the parser's own key and quote rules, so that `to_bytes` (which sees the parsed
    // value) writes back in the code page this read in: a looser match here once read
    // `encoding="windows-1252` (no closing quote) as Windows-1252 while the writer wrote
    // UTF-8, and the reparsed file names differed.
    let declared_cp1252 = bytes.split(|&b| b == b'\n').any(|line| {
        std::str::from_utf8(line)
            .ok()
            .and_then(|line| key_value(line.trim()))
            .is_some_and(|(key, value)| key == "encoding" && names_cp1252(unquote(value)))
    });
    if !declared_cp1252 {
        if let Ok(text) = std::str::from_utf8(bytes) {
            return Ok(std::borrow::Cow::Borrowed(text));
        }
    }
    if let Some(at) = bytes
        .iter()
        .position(|&b| b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n'))
    {
        return Err(Error::corrupt(
            OP,
            format!("byte {at} is a control character: this is not a text descriptor"),
        ));
    }
    Ok(std::borrow::Cow::Owned(
        bytes
            .iter()
            .map(|&b| match b {
                0x80..=0x9f => CP1252_HIGH[usize::from(b - 0x80)],
                _ => char::from(b),
            })
            .collect(),
    ))
}

/// True when the (unquoted) value of an `encoding` key declares Windows-1252; the one rule
/// both reading and writing a descriptor follow.
fn names_cp1252(value: &str) -> bool {
    value.eq_ignore_ascii_case("windows-1252")
}

/// The Windows-1252 byte of `c`, if the code page has one.
fn encode_cp1252(c: char) -> Option<u8> {
    match u32::from(c) {
        v @ (0..=0x7f | 0xa0..=0xff) => u8::try_from(v).ok(),
        _ => CP1252_HIGH
            .iter()
            .position(|&h| h == c)
            .and_then(|i| u8::try_from(0x80 + i).ok()),
    }
}

/// Splits `key = value` when the part before `=` is a plain key; an extent line (which may
/// hold `=` inside its quoted file name) never has one.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    plain.then(|| (key, value.trim()))
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

fn parse_version(value: &str, line_no: usize) -> Result<u32> {
    match value.parse::<u32>() {
        Ok(v @ 1..=3) => Ok(v),
        _ => Err(Error::unsupported(
            OP,
            format!(
                "line {line_no}: descriptor version '{}' is not supported (expected 1, 2 or 3)",
                printable(value)
            ),
        )),
    }
}

fn parse_cid(key: &str, value: &str, line_no: usize) -> Result<u32> {
    u32::from_str_radix(value, 16).map_err(|_| {
        Error::corrupt(
            OP,
            format!(
                "line {line_no}: {key} '{}' is not a 32-bit hexadecimal number",
                printable(value)
            ),
        )
    })
}

fn parse_extent_line(line: &str, line_no: usize) -> Result<ExtentLine> {
    let invalid = |why: &str| {
        Error::corrupt(
            OP,
            format!(
                "line {line_no}: invalid extent line '{}': {why}",
                printable(line)
            ),
        )
    };
    let mut rest = line;
    let mut word = || -> Option<&str> {
        let trimmed = rest.trim_start();
        let end = trimmed
            .find(|c: char| c.is_ascii_whitespace())
            .unwrap_or(trimmed.len());
        let (w, r) = trimmed.split_at(end);
        rest = r;
        (!w.is_empty()).then_some(w)
    };
    let access = Access::parse(word().ok_or_else(|| invalid("empty"))?, line_no)?;
    let sectors_word = word().ok_or_else(|| invalid("no sector count"))?;
    let kind_word = word().ok_or_else(|| invalid("no extent type"))?;
    let sectors: u64 = sectors_word
        .parse()
        .map_err(|_| invalid("the sector count is not a number"))?;
    if sectors == 0 {
        return Err(invalid("the sector count is zero"));
    }
    let kind = ExtentType::parse(kind_word, line_no)?;
    let tail = rest.trim();
    let (file, tail) = if tail.is_empty() {
        (None, "")
    } else {
        let quoted = tail
            .strip_prefix('"')
            .ok_or_else(|| invalid("the file name is not in double quotes"))?;
        let close = quoted
            .find('"')
            .ok_or_else(|| invalid("the file name has no closing quote"))?;
        let name = &quoted[..close];
        if name.is_empty() {
            return Err(invalid("the file name is empty"));
        }
        (Some(name.to_string()), quoted[close + 1..].trim())
    };
    let offset = if tail.is_empty() {
        None
    } else {
        let mut parts = tail.split_ascii_whitespace();
        let value = parts
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| invalid("the offset is not a number"))?;
        if parts.next().is_some() {
            return Err(invalid("unexpected text after the offset"));
        }
        Some(value)
    };
    match kind {
        ExtentType::Zero => {
            if file.is_some() {
                return Err(invalid("a ZERO extent names no file"));
            }
        }
        ExtentType::Flat => {
            if file.is_none() || offset.is_none() {
                return Err(invalid("a FLAT extent needs a file and an offset"));
            }
        }
        ExtentType::Vmfs | ExtentType::VmfsRdm | ExtentType::VmfsRaw => {
            if file.is_none() {
                return Err(invalid("the extent needs a file"));
            }
        }
        ExtentType::Sparse | ExtentType::VmfsSparse | ExtentType::SeSparse => {
            if file.is_none() {
                return Err(invalid("the extent needs a file"));
            }
            if offset.is_some() {
                return Err(invalid("a sparse extent takes no offset"));
            }
        }
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

/// Text from a hostile file, cut short and stripped of control characters for messages.
pub(crate) fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > 80 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::ErrorKind;

    const ESXI: &str = "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=0172e8a4\n\
parentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 4096 VMFS \"vmfs_thick-flat.vmdk\"\n\n\
# The Disk Data Base \n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"2\"\n";

    #[test]
    fn parses_an_esxi_descriptor() {
        let d = Descriptor::parse(ESXI.as_bytes()).expect("parse");
        assert_eq!(d.version, 1);
        assert_eq!(d.cid, 0x0172e8a4);
        assert_eq!(d.parent_cid, NO_PARENT_CID);
        assert_eq!(d.create_type, "vmfs");
        assert_eq!(d.other("encoding"), Some("UTF-8"));
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
        assert_eq!(
            d.extents,
            vec![ExtentLine {
                access: Access::ReadWrite,
                sectors: 4096,
                kind: ExtentType::Vmfs,
                file: Some("vmfs_thick-flat.vmdk".into()),
                offset: None,
            }]
        );
        assert!(!d.has_parent());
    }

    #[test]
    fn parses_the_libvmdk_fragment() {
        let dir = std::path::Path::new("../../shared/fixtures/fragments/libvmdk");
        let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = manifest_dir.join(dir).join("descriptor_file.1");
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!("SKIPPED: shared fixtures absent at {}", path.display());
            return;
        };
        let d = Descriptor::parse(&bytes).expect("parse");
        assert_eq!(d.create_type, "monolithicSparse");
        assert_eq!(d.cid, 0xfffffffe);
        assert_eq!(d.other("isNativeSnapshot"), Some("no"));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].sectors, 16777216);
        assert_eq!(d.extents[0].file.as_deref(), Some("test1.vmdk"));
        assert_eq!(d.ddb("ddb.geometry.cylinders"), Some("16383"));

        let line = std::fs::read(path.with_file_name("extent_values.1")).expect("fragment");
        let text = std::str::from_utf8(&line).expect("utf8").trim();
        let e = parse_extent_line(text, 1).expect("extent");
        assert_eq!(e.kind, ExtentType::Sparse);
        assert_eq!(e.to_line(), text);
    }

    #[test]
    fn round_trips_through_text() {
        let mut d = Descriptor::new("monolithicFlat", 0x1234abcd);
        d.extents.push(ExtentLine {
            access: Access::ReadWrite,
            sectors: 2048,
            kind: ExtentType::Flat,
            file: Some("with space=odd-flat.vmdk".into()),
            offset: Some(0),
        });
        d.extents.push(ExtentLine {
            access: Access::ReadOnly,
            sectors: 100,
            kind: ExtentType::Zero,
            file: None,
            offset: None,
        });
        d.parent_file_name_hint = Some("base.vmdk".into());
        d.parent_cid = 7;
        d.set_ddb("ddb.adapterType", "ide");
        d.set_ddb("ddb.geometry.heads", "16");
        let text = d.to_text();
        let back = Descriptor::parse(text.as_bytes()).expect("parse");
        assert_eq!(back, d);
        assert_eq!(back.total_sectors(), Some(2148));
    }

    fn err_of(text: &str) -> Error {
        Descriptor::parse(text.as_bytes()).expect_err("must be refused")
    }

    const HEAD: &str = "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n";

    #[test]
    fn unknown_access_and_types_are_named() {
        let e = err_of(&format!("{HEAD}RWX 10 FLAT \"a\" 0\n"));
        assert!(e.message().contains("access mode 'RWX'"), "{e}");
        let e = err_of(&format!("{HEAD}RW 10 FLUFFY \"a\" 0\n"));
        assert!(e.message().contains("extent type 'FLUFFY'"), "{e}");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn malformed_extent_lines_are_refused() {
        for bad in [
            "RW 0 FLAT \"a\" 0",
            "RW -5 FLAT \"a\" 0",
            "RW 10 FLAT \"a\"",
            "RW 10 FLAT a 0",
            "RW 10 FLAT \"a 0",
            "RW 10 SPARSE \"a\" 5",
            "RW 10 SPARSE",
            "RW 10 ZERO \"a\"",
            "RW 10 FLAT \"a\" 0 junk",
            "RW 10",
        ] {
            let e = err_of(&format!("{HEAD}{bad}\n"));
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{bad}: {e}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long = format!("{HEAD}RW 10 FLAT \"{}\" 0\n", "a".repeat(MAX_LINE_BYTES));
        assert!(err_of(&long).message().contains("allowed"));
        let huge = format!("{HEAD}{}", "#\n".repeat(MAX_DESCRIPTOR_BYTES / 2 + 1));
        assert!(err_of(&huge).message().contains("allowed"));
        let many = format!("{HEAD}{}", "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1));
        assert!(err_of(&many).message().contains("extent lines"));
        assert!(err_of("version=1\nCID=1\n")
            .message()
            .contains("createType"));
        assert!(err_of("createType=\"vmfs\"\n")
            .message()
            .contains("version"));
        assert_eq!(
            err_of("version=9\ncreateType=\"vmfs\"\n").kind(),
            ErrorKind::Unsupported
        );
        assert!(err_of("version=1\nCID=xyz\ncreateType=\"vmfs\"\n")
            .message()
            .contains("CID"));
        assert!(err_of("version=1\ncreateType=\"vmfs\"\n\u{1}\u{2}\u{ff}")
            .message()
            .contains("access mode"));
        let binary = b"version=1\ncreateType=\"vmfs\"\n\xff\x01\n";
        assert!(Descriptor::parse(binary).is_err());
    }

    #[test]
    fn windows_1252_names_become_unicode() {
        let mut bytes = format!("{HEAD}encoding=\"windows-1252\"\nRW 10 FLAT \"Fran").into_bytes();
        bytes.extend_from_slice(b"\xe7ais \x80.vmdk\" 0\n");
        let d = Descriptor::parse(&bytes).expect("parse");
        assert_eq!(d.extents[0].file.as_deref(), Some("Français €.vmdk"));
        // Written back in the code page it came in, byte for byte where it was.
        let again = d.to_bytes();
        assert!(again.windows(7).any(|w| w == b"Fran\xe7ai"));
        assert_eq!(Descriptor::parse(&again).expect("reparse"), d);
        let mut wide = d.clone();
        wide.extents[0].file = Some("日本.vmdk".into());
        let utf8 = wide.to_bytes();
        let back = Descriptor::parse(&utf8).expect("reparse");
        assert_eq!(back.other("encoding"), Some("UTF-8"));
        assert_eq!(back.extents[0].file.as_deref(), Some("日本.vmdk"));
        // UTF-8 stays UTF-8.
        let d = Descriptor::parse(format!("{HEAD}RW 10 FLAT \"Français.vmdk\" 0\n").as_bytes())
            .expect("parse");
        assert_eq!(d.extents[0].file.as_deref(), Some("Français.vmdk"));
    }

    #[test]
    fn a_malformed_encoding_reads_and_writes_the_same_way() {
        // Found by the vmdk_descriptor fuzz target: the encoding value lacks its closing
        // quote, so it is not a declaration, and the name is read as Windows-1252 only
        // because it is not UTF-8. Writing it back must give the same name.
        let bytes = b"version=1\nencoding=\"windows-1252\ncreateType=\nRW 1 SPARSE \"\x87\"";
        let d = Descriptor::parse(bytes).expect("parse");
        assert_eq!(d.extents[0].file.as_deref(), Some("\u{2021}"));
        let again = Descriptor::parse(&d.to_bytes()).expect("reparse");
        assert_eq!(again.extents, d.extents);
        // A well-formed declaration in any case and spacing still wins over valid UTF-8.
        let bytes =
            b"version=1\nencoding = \"Windows-1252\"\ncreateType=\"x\"\nRW 1 FLAT \"\xc3\xa9\" 0\n";
        let d = Descriptor::parse(bytes).expect("parse");
        assert_eq!(d.extents[0].file.as_deref(), Some("\u{c3}\u{a9}"));
        assert_eq!(Descriptor::parse(&d.to_bytes()).expect("reparse"), d);
    }

    #[test]
    fn nul_padding_ends_an_embedded_descriptor() {
        let mut bytes = format!("{HEAD}RW 10 ZERO\n").into_bytes();
        bytes.extend_from_slice(&[0u8; 600]);
        bytes.extend_from_slice(b"garbage after the padding");
        let d = Descriptor::parse(&bytes).expect("parse");
        assert_eq!(d.extents.len(), 1);
    }
}
