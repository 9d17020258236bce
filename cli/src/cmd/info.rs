//! `vdisk info`: what an image is (format, sizes, backing file), as qemu-img prints it.

use std::sync::Arc;

use clap::Args;
use serde_json::{json, Map, Value};
use vdisk_block::size::human_size;
use vdisk_block::{BlockDev, ImageInfo};

use super::{open, print, sectors, OpenSpec};
use crate::context::Failure;
use crate::output::{qemu_json, OutputFormat};
use crate::Ctx;

/// Arguments of `info`.
#[derive(Debug, Args)]
#[command(
    about = "Display information about an image",
    long_about = "Display information about an image: its format, virtual size, the space it \
                  takes on the host, its backing file, and the host file below it.\n\n\
                  Example: vdisk info --output=json disk.raw"
)]
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
    /// Open the image in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Runs `info`; returns the exit code.
pub fn run(ctx: &Ctx, args: InfoArgs) -> i32 {
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
        ..OpenSpec::default()
    };
    let dev = match open(name, &spec) {
        Ok(d) => d,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let chain = match collect(&dev, name, args.backing_chain) {
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

/// What `info` shows about one image of the chain.
struct Node {
    info: ImageInfo,
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
        let shown = if nodes.is_empty() {
            name.to_string()
        } else {
            info.filename.display().to_string()
        };
        nodes.push(Node {
            virtual_size: vdisk_blockjobs::map::visible_len(d.as_ref()),
            info,
            name: shown,
        });
        dev = if chain { d.backing() } else { None };
    }
    Ok(nodes)
}

/// The protocol node below an image: the host file itself.
fn file_json(node: &Node) -> Value {
    let mut m = Map::new();
    m.insert("children".into(), json!([]));
    m.insert(
        "virtual-size".into(),
        json!(sectors(node.info.file_length.unwrap_or(0))),
    );
    m.insert("filename".into(), json!(node.name));
    m.insert("format".into(), json!("file"));
    if let Some(actual) = node.info.actual_size {
        m.insert("actual-size".into(), json!(actual));
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "file", "data": {}}),
    );
    m.insert("dirty-flag".into(), json!(false));
    Value::Object(m)
}

/// One image as qemu's `BlockGraphInfo`, keys in the order qemu-img prints them.
fn node_json(node: &Node) -> Value {
    let i = &node.info;
    let mut m = Map::new();
    m.insert(
        "children".into(),
        json!([{"name": "file", "info": file_json(node)}]),
    );
    if let Some(f) = &i.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
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
    if i.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(full) = &i.full_backing_filename {
        m.insert(
            "full-backing-filename".into(),
            json!(full.display().to_string()),
        );
    }
    if let Some(b) = &i.backing_filename {
        m.insert("backing-filename".into(), json!(b));
    }
    m.insert("dirty-flag".into(), json!(i.dirty));
    Value::Object(m)
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
    if let Some(c) = i.cluster_size {
        s.push_str(&format!("cluster_size: {c}\n"));
    }
    if i.encrypted {
        s.push_str("encrypted: yes\n");
    }
    if let Some(b) = &i.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        if let Some(full) = &i.full_backing_filename {
            let full = full.display().to_string();
            if &full != b {
                s.push_str(&format!(" (actual path: {full})"));
            }
        }
        s.push('\n');
    }
    if let Some(f) = &i.backing_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if i.dirty {
        s.push_str("cleanly shut down: no\n");
    }
    s.push_str(&format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {}\n    disk size: {}\n",
        node.name,
        size_line(sectors(i.file_length.unwrap_or(0))),
        disk_size(i.actual_size)
    ));
    s
}
