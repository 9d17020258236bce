//! The VMDK facts `qemu-img info` prints under `format-specific` (`cid`, `parent-cid`,
//! `create-type`, and per extent its file, format, size, grain size and compression), for
//! front ends that print them.

use std::path::PathBuf;

use vdisk_block::dev::{FormatSpecific, InfoValue};

use crate::descriptor::ExtentType;
use crate::extent::ExtentData;
use crate::image::VmdkImage;

/// One extent as `qemu-img info` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentDetails {
    /// The extent's file (`None` for ZERO and NOACCESS extents, which qemu does not list).
    pub filename: Option<PathBuf>,
    /// `""` for a sparse file opened directly, else the descriptor's type (`FLAT`, `SPARSE`,
    /// `VMFS`, ...).
    pub format: String,
    /// Bytes the extent covers.
    pub virtual_size: u64,
    /// Grain size of sparse extents.
    pub cluster_size: Option<u64>,
    /// Grains are compressed.
    pub compressed: bool,
}

/// The `format-specific` data of a VMDK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkDetails {
    /// `CID`.
    pub cid: u32,
    /// `parentCID`.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// The extents in guest order.
    pub extents: Vec<ExtentDetails>,
}

impl ExtentDetails {
    /// The extent as one element of qemu's `extents` list. qemu prints its info objects in
    /// the iteration order of its hash table, not the schema's order; the keys here follow
    /// what `qemu-img info` 10 prints (JSON and human alike), and `compressed` appears only
    /// when true, as qemu's optional field does.
    fn info_value(&self) -> InfoValue {
        let mut map = Vec::with_capacity(5);
        if self.compressed {
            map.push(("compressed".to_string(), InfoValue::Bool(true)));
        }
        map.push((
            "virtual-size".to_string(),
            InfoValue::UInt(self.virtual_size),
        ));
        if let Some(name) = &self.filename {
            map.push((
                "filename".to_string(),
                InfoValue::Text(name.to_string_lossy().into_owned()),
            ));
        }
        if let Some(cluster) = self.cluster_size {
            map.push(("cluster-size".to_string(), InfoValue::UInt(cluster)));
        }
        map.push(("format".to_string(), InfoValue::Text(self.format.clone())));
        InfoValue::Map(map)
    }
}

impl VmdkDetails {
    /// These facts as the `format-specific` section `qemu-img info` prints, keys in its
    /// order.
    pub fn format_specific(&self) -> FormatSpecific {
        FormatSpecific {
            kind: "vmdk".to_string(),
            data: vec![
                ("cid".to_string(), InfoValue::UInt(u64::from(self.cid))),
                (
                    "parent-cid".to_string(),
                    InfoValue::UInt(u64::from(self.parent_cid)),
                ),
                (
                    "create-type".to_string(),
                    InfoValue::Text(self.create_type.clone()),
                ),
                (
                    "extents".to_string(),
                    InfoValue::List(self.extents.iter().map(ExtentDetails::info_value).collect()),
                ),
            ],
        }
    }
}

impl VmdkImage {
    /// The facts `qemu-img info` prints for this image.
    pub fn details(&self) -> VmdkDetails {
        let direct =
            self.extents.len() == 1 && self.extents[0].path.as_deref() == Some(self.path.as_path());
        let extents = self
            .extents
            .iter()
            .filter(|e| !matches!(e.data, ExtentData::Zero | ExtentData::NoAccess))
            .map(|e| {
                let (cluster_size, compressed, virtual_size) = match &e.data {
                    ExtentData::Sparse(s) => (
                        Some(s.grain_bytes()),
                        s.header().compressed(),
                        s.capacity_bytes(),
                    ),
                    ExtentData::Stream(s) => (
                        Some(s.reader().grain_bytes()),
                        true,
                        s.reader().capacity_bytes(),
                    ),
                    _ => (None, false, e.len),
                };
                ExtentDetails {
                    filename: e.path.clone(),
                    format: if direct && e.kind == ExtentType::Sparse {
                        String::new()
                    } else {
                        e.kind.as_str().to_string()
                    },
                    virtual_size,
                    cluster_size,
                    compressed,
                }
            })
            .collect();
        VmdkDetails {
            cid: self.descriptor.cid,
            parent_cid: self.descriptor.parent_cid,
            create_type: self.descriptor.create_type.clone(),
            extents,
        }
    }
}

/// The `format-specific` facts of the VMDK at `path`, for front ends that hold the image as
/// a `dyn BlockDev`: opens it again read-only, without its parent and without reading data.
pub fn details_of(
    path: &std::path::Path,
    options: &vdisk_block::OpenOptions,
) -> vdisk_block::Result<VmdkDetails> {
    let options = vdisk_block::OpenOptions {
        writable: false,
        no_backing: true,
        ..options.clone()
    };
    Ok(crate::open::open(path, &options)?.details())
}
