//! `vdisk info`: what an image is (format, sizes, backing file), as qemu-img prints it.

use std::sync::Arc;

use clap::Args;
use serde_json::{json, Map, Value};
use vdisk_block::dev::{FormatSpecific, InfoValue};
use vdisk_block::size::human_size;
use vdisk_block::{BlockDev, ImageInfo, OpenOptions, SnapshotInfo};

use super::{print, sectors, OpenSpec};
use crate::context::Failure;
use crate::output::{qemu_json, OutputFormat};
use crate::Ctx;

/// The long `--help` text of `info`.
pub const LONG_ABOUT: &str =
    "Display information about an image: its format, virtual size, the space it \
                  takes on the host, its backing file, and the host file below it.\n\n\
                  Example: vdisk info --output=json disk.raw";

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Format of the image (default: probed; give it for raw images to avoid probing)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json", default_value = "human")]
    pub output: String,
    /// Show every image of the backing chain, top first (JSON becomes an array)
    #[arg(short = 'b', long = "backing-chain")]
    pub backing_chain: bool,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH and
    /// driver options (e.g. disk=N to pick a disk of an OVA appliance)
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the image in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
}

/// Runs `info`; returns the exit code.
pub fn run(ctx: &Ctx, args: InfoArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let output = match OutputFormat::parse(&args.output) {
        Ok(o) => o,
        Err(msg) => return ctx.usage("info", &msg),
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("info", "Expecting one image file name");
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        force_share: args.force_share,
        image_opts: args.image_opts,
        no_backing: !args.backing_chain,
        ..OpenSpec::default()
    };
    // qemu-img info opens with BDRV_O_NO_IO: encrypted images show without their key.
    let metadata = OpenOptions {
        metadata_only: true,
        ..OpenOptions::read_only()
    };
    let dev = match super::open_with(name, &spec, metadata.clone()) {
        Ok(d) => d,
        Err(f) => {
            let f = match args.backing_chain {
                true => chain_member_failure(name, &spec, &metadata).unwrap_or(f),
                false => f,
            };
            ctx.fail(&f);
            return 1;
        }
    };
    // Named by options, the image is shown by its file name, as qemu-img shows it.
    let shown = match args.image_opts {
        true => {
            let format = dev.info().map(|i| i.format).unwrap_or_default();
            super::parse_image_opts(name).map_or_else(|_| name.clone(), |o| opts_name(&o, &format))
        }
        false => name.clone(),
    };
    let chain = match collect(&dev, &shown, args.backing_chain) {
        Ok(c) => c,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let text = match output {
        OutputFormat::Json => {
            let nodes: Vec<Value> = chain.iter().map(node_json).collect();
            let value = if args.backing_chain {
                Value::Array(nodes)
            } else {
                nodes.into_iter().next().unwrap_or(Value::Null)
            };
            format!("{}\n", qemu_json(&value))
        }
        OutputFormat::Human => chain.iter().map(node_human).collect::<Vec<_>>().join("\n"),
    };
    print(&text);
    0
}

/// Why a chain failed to open, as qemu-img's `info --backing-chain` reports it: qemu opens
/// each image on its own, without its backing file, and fails on the first that does not
/// open, naming that file (`Could not open 'base.qcow2': ...`) rather than the top image.
/// `None` when every member opens alone (the chain's own failure then stands).
fn chain_member_failure(
    name: &str,
    spec: &OpenSpec<'_>,
    metadata: &OpenOptions,
) -> Option<Failure> {
    let alone = OpenSpec {
        no_backing: true,
        ..spec.clone()
    };
    let mut dev = match super::open_with(name, &alone, metadata.clone()) {
        Ok(d) => d,
        Err(f) => return Some(f),
    };
    // A chain deeper than this loops; the chain's open reports that.
    for _ in 0..MAX_CHAIN_MEMBERS {
        let info = dev.info().ok()?;
        let path = info.full_backing_filename?;
        let member = path.to_string_lossy().into_owned();
        let member_spec = OpenSpec {
            format: info.backing_format.as_deref(),
            no_backing: true,
            force_share: spec.force_share,
            ..OpenSpec::default()
        };
        dev = match super::open_with(&member, &member_spec, metadata.clone()) {
            Ok(d) => d,
            Err(f) => return Some(f),
        };
    }
    None
}

/// More backing files than any real chain has (qemu's own bound is far higher; a chain this
/// deep is a loop).
const MAX_CHAIN_MEMBERS: usize = 1000;

/// The options of each format that change what the image reads (qemu's
/// `strong_runtime_opts`): given one of them, qemu can no longer name the image by its
/// file alone and names it by a JSON description instead.
const STRONG_OPTIONS: &[(&str, &[&str])] = &[
    ("luks", &["key-secret"]),
    ("qcow2", &["encrypt.key-secret"]),
    ("raw", &["offset", "size"]),
    ("vpc", &["force_size_calc"]),
];

/// How qemu names an image opened by options (`bdrv_refresh_filename`): its file name,
/// unless a strong option is given; then `json:{...}` with the driver, those options and
/// the file child, in the order qemu's QDict hash table lists keys.
fn opts_name(o: &super::ImageOpts, format: &str) -> String {
    let driver = o.driver.as_deref().unwrap_or(format);
    let strong = STRONG_OPTIONS
        .iter()
        .find(|(f, _)| *f == driver)
        .map_or(&[][..], |(_, names)| *names);
    let given: Vec<(&str, &String)> = strong
        .iter()
        .filter_map(|k| o.options.get(*k).map(|v| (*k, v)))
        .collect();
    if given.is_empty() {
        return o.filename.clone();
    }
    let file = qdict_json(&[("driver", json!("file")), ("filename", json!(o.filename))]);
    let mut entries = vec![("driver", json!(driver).to_string()), ("file", file)];
    entries.extend(given.into_iter().map(|(k, v)| (k, json!(v).to_string())));
    format!("json:{}", qdict_text(entries))
}

/// `{"k": v, ...}` of plain values in QDict order.
fn qdict_json(entries: &[(&str, Value)]) -> String {
    qdict_text(entries.iter().map(|(k, v)| (*k, v.to_string())).collect())
}

/// `{"k": TEXT, ...}` of values already in JSON, in the order qemu lists a QDict's keys.
fn qdict_text(mut entries: Vec<(&str, String)>) -> String {
    // Within a bucket qemu lists the last key inserted first; these keys never share one.
    entries.sort_by_key(|(k, _)| qdict_bucket(k));
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}: {v}", json!(k)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// The bucket of `key` in qemu's QDict (512 buckets, the TDB hash), which decides the order
/// qemu prints a dictionary's keys in.
fn qdict_bucket(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, byte) in key.bytes().enumerate() {
        value = value.wrapping_add(u32::from(byte) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// What `info` shows about one image of the chain.
struct Node {
    info: ImageInfo,
    specific: Option<FormatSpecific>,
    snapshots: Vec<SnapshotInfo>,
    /// The name to print: the user's spelling for the top image.
    name: String,
    /// The guest size qemu shows (whole sectors).
    virtual_size: u64,
}

fn collect(top: &Arc<dyn BlockDev>, name: &str, chain: bool) -> Result<Vec<Node>, Failure> {
    let mut nodes = Vec::new();
    let mut dev = Some(Arc::clone(top));
    while let Some(d) = dev {
        let info = d.info().map_err(|e| {
            Failure::new(
                e.message().to_string(),
                format!("cannot read facts about '{name}': {}", e.message()),
            )
        })?;
        let specific = d.format_specific().map_err(|e| {
            Failure::new(
                e.message().to_string(),
                format!("cannot read facts about '{name}': {}", e.message()),
            )
        })?;
        let snapshots = d.snapshots().map_err(|e| {
            Failure::new(
                e.message().to_string(),
                format!("cannot list the snapshots of '{name}': {}", e.message()),
            )
        })?;
        let shown = if nodes.is_empty() {
            crate::context::host_path(name).to_string()
        } else {
            info.filename.display().to_string()
        };
        nodes.push(Node {
            virtual_size: vdisk_blockjobs::map::visible_len(d.as_ref()),
            info,
            specific,
            snapshots,
            name: shown,
        });
        dev = if chain { d.backing() } else { None };
    }
    Ok(nodes)
}

/// qemu's name for the driver of a host file: `host_device` for device nodes, `file` for
/// everything else.
fn protocol(path: &std::path::Path) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() || m.file_type().is_char_device() => "host_device",
        _ => "file",
    }
}

/// A protocol node below an image: one of its host files.
struct HostNode {
    /// The child name (`file`, `extents.0`, ...).
    role: String,
    /// The name to print.
    shown: String,
    path: std::path::PathBuf,
    length: u64,
    actual: Option<u64>,
}

/// The host files below an image, in qemu's order: extents in files of their own, then the
/// image's own file. With extents elsewhere, the image's total disk size is not its own
/// file's, so each file is measured by itself.
fn host_nodes(node: &Node) -> Vec<HostNode> {
    use std::os::unix::fs::MetadataExt;
    let measure = |path: &std::path::Path| {
        std::fs::metadata(path)
            .map(|m| (m.len(), Some(m.blocks() * 512)))
            .unwrap_or((0, None))
    };
    let mut out: Vec<HostNode> = node
        .info
        .children
        .iter()
        .map(|(role, path)| {
            let (length, actual) = measure(path);
            HostNode {
                role: role.clone(),
                shown: path.display().to_string(),
                path: path.clone(),
                length,
                actual,
            }
        })
        .collect();
    let own_actual = if out.is_empty() {
        node.info.actual_size
    } else {
        measure(&node.info.filename).1
    };
    out.push(HostNode {
        role: "file".into(),
        // An image named by JSON options still shows its file by the file's name.
        shown: match node.name.starts_with("json:") {
            true => node.info.filename.display().to_string(),
            false => node.name.clone(),
        },
        path: node.info.filename.clone(),
        length: node.info.file_length.unwrap_or(0),
        actual: own_actual,
    });
    out
}

fn host_json(h: &HostNode) -> Value {
    let mut m = Map::new();
    m.insert("children".into(), json!([]));
    m.insert("virtual-size".into(), json!(sectors(h.length)));
    m.insert("filename".into(), json!(h.shown));
    m.insert("format".into(), json!(protocol(&h.path)));
    if let Some(actual) = h.actual {
        m.insert("actual-size".into(), json!(actual));
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "file", "data": {}}),
    );
    m.insert("dirty-flag".into(), json!(false));
    json!({"name": h.role, "info": Value::Object(m)})
}

/// One image as qemu's `BlockGraphInfo`, keys in the order qemu-img prints them.
fn node_json(node: &Node) -> Value {
    let i = &node.info;
    let mut m = Map::new();
    m.insert(
        "children".into(),
        Value::Array(host_nodes(node).iter().map(host_json).collect()),
    );
    if let Some(f) = &i.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    if !node.snapshots.is_empty() {
        m.insert(
            "snapshots".into(),
            Value::Array(node.snapshots.iter().map(snapshot_json).collect()),
        );
    }
    m.insert("virtual-size".into(), json!(node.virtual_size));
    m.insert("filename".into(), json!(node.name));
    if let Some(c) = i.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    m.insert("format".into(), json!(i.format));
    if let Some(actual) = i.actual_size {
        m.insert("actual-size".into(), json!(actual));
    }
    if let Some(spec) = &node.specific {
        m.insert(
            "format-specific".into(),
            json!({"type": spec.kind, "data": map_json(&spec.data)}),
        );
    }
    if let Some(full) = &i.full_backing_filename {
        m.insert(
            "full-backing-filename".into(),
            json!(full.display().to_string()),
        );
    }
    // qemu-img prints it here, after format-specific (seen with luks and qcow2).
    if i.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = &i.backing_filename {
        m.insert("backing-filename".into(), json!(b));
    }
    m.insert("dirty-flag".into(), json!(i.dirty));
    Value::Object(m)
}

/// One snapshot as qemu's `SnapshotInfo`, keys in the order qemu-img prints them.
fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    if let Some(icount) = s.icount {
        m.insert("icount".into(), json!(icount));
    }
    m.insert("vm-clock-nsec".into(), json!(s.vm_clock_nsec % NANOS));
    m.insert("name".into(), json!(s.name));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert("vm-clock-sec".into(), json!(s.vm_clock_nsec / NANOS));
    m.insert("id".into(), json!(s.id));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    Value::Object(m)
}

const NANOS: u64 = 1_000_000_000;

/// qemu's snapshot table: the header line, or one snapshot (`bdrv_snapshot_dump`), with the
/// date in local time.
pub fn snapshot_line(s: Option<&SnapshotInfo>) -> String {
    let Some(s) = s else {
        return format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
    };
    let date = chrono::DateTime::from_timestamp(i64::from(s.date_sec), 0)
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default();
    let secs = s.vm_clock_nsec / NANOS;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = s.icount.map(|n| n.to_string()).unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        human_size(s.vm_state_size),
        date,
        clock,
        icount
    )
}

fn size_line(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", human_size(bytes))
}

fn disk_size(actual: Option<u64>) -> String {
    actual.map_or_else(|| "unavailable".to_string(), human_size)
}

/// One image in qemu-img's human form.
fn node_human(node: &Node) -> String {
    let i = &node.info;
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {}\ndisk size: {}\n",
        node.name,
        i.format,
        size_line(node.virtual_size),
        disk_size(i.actual_size)
    );
    if i.encrypted {
        s.push_str("encrypted: yes\n");
    }
    if let Some(c) = i.cluster_size {
        s.push_str(&format!("cluster_size: {c}\n"));
    }
    if i.dirty {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &i.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        match &i.full_backing_filename {
            None => s.push_str(" (cannot determine actual path)"),
            Some(full) => {
                let full = full.display().to_string();
                if &full != b {
                    s.push_str(&format!(" (actual path: {full})"));
                }
            }
        }
        s.push('\n');
    }
    if let Some(f) = &i.backing_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if !node.snapshots.is_empty() {
        s.push_str("Snapshot list:\n");
        s.push_str(&snapshot_line(None));
        s.push('\n');
        for snap in &node.snapshots {
            s.push_str(&snapshot_line(Some(snap)));
            s.push('\n');
        }
    }
    if let Some(spec) = node.specific.as_ref().filter(|spec| !spec.data.is_empty()) {
        s.push_str("Format specific information:\n");
        dump_map(&mut s, 1, &spec.data);
    }
    for h in host_nodes(node) {
        s.push_str(&format!(
            "Child node '/{}':\n    filename: {}\n    protocol type: {}\n    file length: {}\n    disk size: {}\n",
            h.role,
            h.shown,
            protocol(&h.path),
            size_line(sectors(h.length)),
            disk_size(h.actual)
        ));
    }
    s
}

/// Format-specific facts as JSON, keys in the driver's (qemu's) order.
fn value_json(v: &InfoValue) -> Value {
    match v {
        InfoValue::Bool(b) => json!(b),
        InfoValue::Int(n) => json!(n),
        InfoValue::UInt(n) => json!(n),
        InfoValue::Text(t) => json!(t),
        InfoValue::List(items) => Value::Array(items.iter().map(value_json).collect()),
        InfoValue::Map(entries) => map_json(entries),
    }
}

fn map_json(entries: &[(String, InfoValue)]) -> Value {
    Value::Object(
        entries
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn is_composite(v: &InfoValue) -> bool {
    matches!(v, InfoValue::List(_) | InfoValue::Map(_))
}

/// qemu's human dump of a value: scalars inline, objects and lists on the following lines,
/// four spaces deeper.
fn dump_value(out: &mut String, level: usize, v: &InfoValue) {
    match v {
        InfoValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        InfoValue::Int(n) => out.push_str(&n.to_string()),
        InfoValue::UInt(n) => out.push_str(&n.to_string()),
        InfoValue::Text(t) => out.push_str(t),
        InfoValue::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let sep = if is_composite(item) { '\n' } else { ' ' };
                out.push_str(&format!("{:width$}[{i}]:{sep}", "", width = level * 4));
                dump_value(out, level + 1, item);
                if !is_composite(item) {
                    out.push('\n');
                }
            }
        }
        InfoValue::Map(entries) => dump_map(out, level, entries),
    }
}

/// qemu's human dump of an object: `key: value`, dashes in keys shown as spaces.
fn dump_map(out: &mut String, level: usize, entries: &[(String, InfoValue)]) {
    for (key, v) in entries {
        let sep = if is_composite(v) { '\n' } else { ' ' };
        let key = key.replace('-', " ");
        out.push_str(&format!("{:width$}{key}:{sep}", "", width = level * 4));
        dump_value(out, level + 1, v);
        if !is_composite(v) {
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a VMDK's facts, printed as qemu-img 10.0.2 prints them.
    #[test]
    fn format_specific_dumps_like_qemu() {
        let data = vec![
            ("cid".to_string(), InfoValue::UInt(1143185952)),
            ("parent-cid".to_string(), InfoValue::UInt(4294967295)),
            (
                "create-type".to_string(),
                InfoValue::Text("monolithicSparse".into()),
            ),
            (
                "extents".to_string(),
                InfoValue::List(vec![InfoValue::Map(vec![
                    ("virtual-size".to_string(), InfoValue::UInt(67108864)),
                    ("filename".to_string(), InfoValue::Text("t.vmdk".into())),
                    ("cluster-size".to_string(), InfoValue::UInt(65536)),
                    ("format".to_string(), InfoValue::Text("".into())),
                ])]),
            ),
        ];
        let mut out = String::new();
        dump_map(&mut out, 1, &data);
        assert_eq!(
            out,
            "    cid: 1143185952\n    parent cid: 4294967295\n    create type: monolithicSparse\n    extents:\n        [0]:\n            virtual size: 67108864\n            filename: t.vmdk\n            cluster size: 65536\n            format: \n"
        );
    }
}
