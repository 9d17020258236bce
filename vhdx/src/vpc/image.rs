//! An opened VHD image: footer, dynamic header, BAT and the read path.
//!
//! Reads follow qemu for dynamic images (an allocated block is read whole; its sector
//! bitmap is not consulted) so our bytes match qemu's, and follow the VHD specification for
//! differencing images, which qemu does not support: a sector whose bitmap bit (most
//! significant bit first) is clear, or whose block is unallocated, comes from the parent.
//!
//! Every kind is writable (see [`crate::vpc::write`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use vdisk_block::{
    check_range, BlockDev, BlockStatus, CacheMode, EngineChoice, Error, ErrorKind, HostFile,
    HostLocation, ImageInfo, OpenOptions, Preallocation, ReadSegment, Result, ZeroMode,
};

use crate::bytes::utf16le;
use crate::guid::Guid;
use crate::vpc::dynamic::{DynamicHeader, HEADER_SIZE};
use crate::vpc::footer::{Footer, FOOTER_SIZE, TYPE_DIFFERENCING, TYPE_DYNAMIC, TYPE_FIXED};

pub(crate) const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Parent paths longer than this are not paths.
const MAX_LOCATOR_LEN: u32 = 64 * 1024;
/// The driver option carrying the canonical paths of the children above an image.
const CHAIN_OPTION: &str = "x-vpc-chain";
const MAX_DEPTH: usize = 64;

/// An opened VHD image, shared by many threads.
pub struct VpcImage {
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<HostFile>,
    footer: Footer,
    pub(crate) size: u64,
    pub(crate) dynamic: Option<Dynamic>,
    pub(crate) parent: Option<Arc<dyn BlockDev>>,
    parent_path: Option<String>,
    /// Where the parent was found (or would be looked for first).
    parent_file: Option<PathBuf>,
    pub(crate) writable: bool,
    /// Serialises block allocation (the footer moves with every new block); holds the
    /// blocks of a differencing image already completed from the parent.
    pub(crate) alloc: Mutex<std::collections::HashSet<u64>>,
}

pub(crate) struct Dynamic {
    pub(crate) header: DynamicHeader,
    /// Readers copy an entry out and drop the lock before any I/O.
    pub(crate) bat: RwLock<Vec<u32>>,
    pub(crate) differencing: bool,
}

impl std::fmt::Debug for VpcImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpcImage")
            .field("path", &self.path)
            .field("footer", &self.footer)
            .field("size", &self.size)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Data(u64),
    Hole,
    Parent,
}

fn corrupt(path: &Path, why: impl Into<String>) -> Error {
    Error::corrupt("open", why).with_path(path)
}

/// Reads the footer the way qemu does: the copy at offset 0 when there is one, else the
/// last 512 bytes.
pub(crate) fn read_footer(file: &HostFile, path: &Path) -> Result<Footer> {
    let len = file.len()?;
    if len < FOOTER_SIZE as u64 {
        return Err(corrupt(
            path,
            "invalid VPC image (the file is too short for a VHD footer)",
        ));
    }
    let mut buf = vec![0u8; FOOTER_SIZE];
    file.read_at(&mut buf, 0)?;
    if !Footer::has_cookie(&buf) {
        file.read_at(&mut buf, len - FOOTER_SIZE as u64)?;
    }
    Footer::parse(&buf).map_err(|w| corrupt(path, w))
}

impl VpcImage {
    /// Whether the host range `[host, host + len)` starts in a hole of the file, and how
    /// far that answer holds (at least one byte). File systems that cannot tell report data.
    fn host_hole(&self, host: u64, len: u64) -> Result<(bool, u64)> {
        let end = host + len;
        match self.file.next_data(host) {
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok((false, len)),
            Err(e) => Err(e),
            Ok(None) => Ok((true, len)),
            Ok(Some(data)) if data > host => Ok((true, data.min(end) - host)),
            Ok(Some(_)) => {
                let hole = self.file.next_hole(host)?.unwrap_or(end);
                Ok((false, hole.clamp(host + 1, end) - host))
            }
        }
    }

    /// Opens `path`; a differencing image's parent is opened through `options.opener`
    /// within `options.policy`. Driver option `force_size_calc` (`chs` or `current_size`)
    /// overrides the size rule, as in qemu.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self> {
        let force = match options
            .driver_options
            .get("force_size_calc")
            .map(String::as_str)
        {
            None => None,
            Some("chs") => Some(true),
            Some("current_size") => Some(false),
            Some(other) => {
                return Err(Error::invalid(
                    "open",
                    format!("Invalid force_size_calc '{other}': expected chs or current_size"),
                ))
            }
        };
        let file = Arc::new(HostFile::open(
            path,
            options.writable,
            options.cache,
            options.engine,
        )?);
        let file_len = file.len()?;
        let footer = read_footer(&file, path)?;
        let size = footer.virtual_size(force).map_err(|w| corrupt(path, w))?;
        let mut image = VpcImage {
            path: path.to_path_buf(),
            file,
            footer: footer.clone(),
            size,
            dynamic: None,
            parent: None,
            parent_path: None,
            parent_file: None,
            writable: options.writable,
            alloc: Mutex::new(Default::default()),
        };
        match footer.disk_type {
            TYPE_FIXED => {
                if size > file_len.saturating_sub(FOOTER_SIZE as u64) {
                    return Err(corrupt(
                        path,
                        format!("fixed image of {size} bytes is truncated (file has {file_len})"),
                    ));
                }
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => {
                image.dynamic = Some(image.read_dynamic(file_len)?);
                if footer.disk_type == TYPE_DIFFERENCING {
                    image.open_parent(options)?;
                }
            }
            other => {
                return Err(Error::unsupported(
                    "open",
                    format!("unsupported VHD disk type {other}"),
                )
                .with_path(path))
            }
        }
        Ok(image)
    }

    fn read_dynamic(&self, file_len: u64) -> Result<Dynamic> {
        let path = &self.path;
        let at = self.footer.data_offset;
        if at
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|e| e > file_len)
        {
            return Err(corrupt(
                path,
                format!("dynamic header offset {at} lies past the end of the file"),
            ));
        }
        let mut buf = vec![0u8; HEADER_SIZE];
        self.file.read_at(&mut buf, at)?;
        let header = DynamicHeader::parse(&buf).map_err(|w| corrupt(path, w))?;
        let bs = header.block_size as u64;
        if self.size / bs > u32::MAX as u64 {
            return Err(corrupt(path, "Too many blocks"));
        }
        if (header.max_table_entries as u64) * bs < self.size {
            return Err(corrupt(path, "Page table too small"));
        }
        let bat_bytes = header.max_table_entries as u64 * 4;
        if header
            .table_offset
            .checked_add(bat_bytes)
            .is_none_or(|e| e > file_len)
        {
            return Err(corrupt(
                path,
                format!(
                    "the BAT ({} entries at {}) lies past the end of the file",
                    header.max_table_entries, header.table_offset
                ),
            ));
        }
        // Bounded by the file length just checked.
        let mut raw = vec![0u8; bat_bytes as usize];
        self.file.read_at(&mut raw, header.table_offset)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let span = header.bitmap_size() + bs;
        for (i, &e) in bat.iter().enumerate() {
            if e != UNALLOCATED && (e as u64 * 512 + span) > file_len {
                return Err(corrupt(
                    path,
                    format!(
                        "BAT entry {i} points past the end of the file: the image has been truncated"
                    ),
                ));
            }
        }
        Ok(Dynamic {
            header,
            bat: RwLock::new(bat),
            differencing: self.footer.disk_type == TYPE_DIFFERENCING,
        })
    }

    /// The stored parent paths, as `(platform code, path)`, best first.
    pub fn parent_locators(&self) -> Result<Vec<(String, String)>> {
        let Some(d) = &self.dynamic else {
            return Ok(Vec::new());
        };
        let file_len = self.file.len()?;
        let mut out = Vec::new();
        for l in &d.header.locators {
            let code = String::from_utf8_lossy(&l.code).into_owned();
            if l.data_length == 0 || l.data_length > MAX_LOCATOR_LEN {
                continue;
            }
            if l.data_offset
                .checked_add(l.data_length as u64)
                .is_none_or(|e| e > file_len)
            {
                return Err(corrupt(
                    &self.path,
                    format!("parent locator '{code}' lies past the end of the file"),
                ));
            }
            let mut raw = vec![0u8; l.data_length as usize];
            self.file.read_at(&mut raw, l.data_offset)?;
            let text = match &l.code {
                b"W2ru" | b"W2ku" => utf16le(&raw),
                _ => String::from_utf8_lossy(&raw)
                    .trim_end_matches('\0')
                    .to_string(),
            };
            out.push((code, text));
        }
        out.sort_by_key(|(c, _)| match c.as_str() {
            "W2ru" => 0,
            "W2ku" => 1,
            _ => 2,
        });
        if !d.header.parent_name.is_empty() {
            out.push(("name".into(), d.header.parent_name.clone()));
        }
        Ok(out)
    }

    fn open_parent(&mut self, options: &OpenOptions) -> Result<()> {
        let locators = self.parent_locators()?;
        self.parent_path = locators.first().map(|(_, p)| p.clone());
        let dir = self
            .path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .to_path_buf();
        let mut candidates: Vec<PathBuf> = Vec::new();
        for (code, text) in &locators {
            let unix = text.replace('\\', "/");
            let unix = unix.strip_prefix("file://").unwrap_or(&unix).to_string();
            let p = match code.as_str() {
                "W2ru" | "Wi2r" => Some(dir.join(unix.trim_start_matches("./"))),
                _ if unix.starts_with('/') => Some(PathBuf::from(&unix)),
                _ => None,
            };
            candidates.extend(p);
            if let Some(name) = unix.rsplit('/').next().filter(|n| !n.is_empty()) {
                candidates.push(dir.join(name));
            }
        }
        candidates.dedup();
        self.parent_file = candidates
            .iter()
            .find(|p| p.is_file())
            .or(candidates.first())
            .cloned();
        if options.no_backing {
            return Ok(());
        }
        let Some(found) = candidates.iter().find(|p| p.is_file()).cloned() else {
            let stored = locators
                .iter()
                .map(|(c, p)| format!("{c} '{p}'"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Error::new(
                ErrorKind::NotFound,
                "open",
                format!(
                    "could not find the parent image ({stored}); looked for {}",
                    candidates
                        .iter()
                        .map(|p| format!("'{}'", p.display()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .with_path(&self.path));
        };
        options.policy.allows(&self.path, &found)?;
        let canonical = |p: &Path| {
            p.canonicalize()
                .map_err(|e| Error::io("open", e).with_path(p))
        };
        let mut chain: Vec<String> = options
            .driver_options
            .get(CHAIN_OPTION)
            .map(|c| c.split('\n').map(str::to_string).collect())
            .unwrap_or_default();
        chain.push(canonical(&self.path)?.display().to_string());
        let target = canonical(&found)?;
        if chain.iter().any(|c| Path::new(c) == target) {
            return Err(corrupt(
                &self.path,
                format!(
                    "parent '{}' is already part of the chain: the chain loops",
                    found.display()
                ),
            ));
        }
        if chain.len() >= MAX_DEPTH {
            return Err(corrupt(
                &self.path,
                format!("the differencing chain is deeper than {MAX_DEPTH} images"),
            ));
        }
        let parent_file = HostFile::open(&found, false, CacheMode::Writeback, EngineChoice::Sync)?;
        let parent_footer = read_footer(&parent_file, &found)?;
        let expected: Guid = self
            .dynamic
            .as_ref()
            .map(|d| d.header.parent_unique_id)
            .unwrap_or_default();
        if parent_footer.unique_id != expected {
            return Err(corrupt(
                &self.path,
                format!(
                    "parent '{}' has unique ID {{{}}}, but the image was made against {{{expected}}}",
                    found.display(),
                    parent_footer.unique_id
                ),
            ));
        }
        let opener = options.opener.as_ref().ok_or_else(|| {
            Error::unsupported(
                "open",
                format!(
                    "the image has a parent ('{}') but the caller gave no way to open it",
                    found.display()
                ),
            )
            .with_path(&self.path)
        })?;
        let mut parent_options = options.clone();
        parent_options.writable = false;
        parent_options
            .driver_options
            .insert(CHAIN_OPTION.into(), chain.join("\n"));
        self.parent = Some(opener.open_image(&found, Some("vpc"), &parent_options)?);
        Ok(())
    }

    /// The parsed footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The block size of a dynamic or differencing image.
    pub fn block_size(&self) -> Option<u32> {
        self.dynamic.as_ref().map(|d| d.header.block_size)
    }

    fn map(&self, offset: u64, max: u64) -> Result<(Source, u64)> {
        let Some(d) = &self.dynamic else {
            return Ok((Source::Data(offset), max));
        };
        let bs = d.header.block_size as u64;
        let block = offset / bs;
        let in_block = offset % bs;
        let len = max.min(bs - in_block);
        let entry = usize::try_from(block)
            .ok()
            .and_then(|b| {
                d.bat
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(b)
                    .copied()
            })
            .ok_or_else(|| {
                Error::corrupt("read", format!("block {block} has no BAT entry"))
                    .with_path(&self.path)
            })?;
        if entry == UNALLOCATED {
            return Ok((
                if d.differencing {
                    Source::Parent
                } else {
                    Source::Hole
                },
                len,
            ));
        }
        let base = entry as u64 * 512;
        let data = base + d.header.bitmap_size() + in_block;
        if !d.differencing {
            return Ok((Source::Data(data), len));
        }
        let first = in_block / 512;
        let last = (in_block + len - 1) / 512;
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        self.file.read_at(&mut bits, base + first / 8)?;
        let bit = |s: u64| bits[(s / 8 - first / 8) as usize] & (0x80 >> (s % 8)) != 0;
        let present = bit(first);
        let mut end = first + 1;
        while end <= last && bit(end) == present {
            end += 1;
        }
        let run = (end * 512 - in_block).min(len);
        Ok((
            if present {
                Source::Data(data)
            } else {
                Source::Parent
            },
            run,
        ))
    }

    pub(crate) fn read_only(&self, op: &'static str) -> Error {
        Error::new(ErrorKind::ReadOnly, op, "the image is open read-only").with_path(&self.path)
    }
}

impl BlockDev for VpcImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", self.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (source, len) = self.map(pos, (buf.len() - done) as u64)?;
            let out = &mut buf[done..done + len as usize];
            match (source, &self.parent) {
                (Source::Data(host), _) => self.file.read_at(out, host)?,
                (Source::Parent, Some(parent)) => {
                    let inside = parent.size().saturating_sub(pos).min(len) as usize;
                    parent.read_at(&mut out[..inside], pos)?;
                    out[inside..].fill(0);
                }
                _ => out.fill(0),
            }
            done += len as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode) -> Result<()> {
        self.zero_impl(offset, len, true)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_impl(offset, len, false)
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            self.file.flush()
        } else {
            Ok(())
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("block status", self.size, offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block status", "empty range").at_offset(offset));
        }
        let (source, mut run) = self.map(offset, len)?;
        while run < len {
            let (next, n) = self.map(offset + run, len - run)?;
            let same = match (source, next) {
                (Source::Data(a), Source::Data(b)) => a + run == b,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            run += n;
        }
        let mut st = BlockStatus {
            offset,
            len: run,
            data: false,
            zero: false,
            allocated: false,
            compressed: false,
            host: None,
        };
        match source {
            Source::Data(host) => {
                st.data = true;
                st.allocated = true;
                st.host = Some(HostLocation {
                    file: self.path.clone(),
                    offset: host,
                });
                // qemu passes a fixed VHD's ranges through to the host file (raw), so a
                // hole in the file reads as zeroes there; a dynamic block is plain data.
                if self.dynamic.is_none() {
                    let (zero, n) = self.host_hole(host, run)?;
                    st.zero = zero;
                    st.len = n;
                }
            }
            // A dynamic disk without a parent decides its own unallocated blocks: they are
            // zeroes of this layer, which is how qemu-img map reports them (present).
            Source::Hole => {
                st.zero = true;
                st.allocated = true;
            }
            Source::Parent => st.zero = self.parent.is_none(),
        }
        Ok(st)
    }

    fn resize(&self, _new_size: u64, _prealloc: Preallocation) -> Result<()> {
        if !self.writable {
            return Err(self.read_only("resize"));
        }
        Err(
            Error::unsupported("resize", "resizing VHD images is not implemented yet")
                .with_path(&self.path),
        )
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: "vpc".into(),
            filename: self.path.clone(),
            virtual_size: self.size,
            actual_size: Some(self.file.allocated_bytes()?),
            file_length: Some(self.file.len()?),
            cluster_size: self.block_size().map(u64::from),
            backing_filename: self.parent_path.clone(),
            full_backing_filename: self.parent_file.clone(),
            ..ImageInfo::default()
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        self.parent.clone()
    }

    fn resolve_read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        check_range("resolve read", self.size, offset, len)?;
        let mut out: Vec<ReadSegment> = Vec::new();
        let mut done = 0;
        while done < len {
            let (source, n) = self.map(offset + done, len - done)?;
            let seg = match (source, &self.parent) {
                (Source::Data(host), _) => ReadSegment::Host {
                    file: Arc::clone(&self.file),
                    offset: host,
                    len: n,
                },
                (Source::Parent, Some(_)) => ReadSegment::Indirect { len: n },
                _ => ReadSegment::Zero { len: n },
            };
            match (out.last_mut(), &seg) {
                (
                    Some(ReadSegment::Host {
                        offset: o, len: l, ..
                    }),
                    ReadSegment::Host {
                        offset: o2,
                        len: l2,
                        ..
                    },
                ) if *o + *l == *o2 => *l += l2,
                (Some(ReadSegment::Zero { len: l }), ReadSegment::Zero { len: l2 }) => *l += l2,
                (Some(ReadSegment::Indirect { len: l }), ReadSegment::Indirect { len: l2 }) => {
                    *l += l2
                }
                _ => out.push(seg),
            }
            done += n;
        }
        Ok(out)
    }

    fn has_zero_init(&self) -> bool {
        // A new fixed VHD is a sparse file with a footer: it reads as zeroes, as qemu's
        // vpc_has_zero_init says by asking the file.
        self.dynamic.as_ref().is_none_or(|d| !d.differencing)
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }
}
