//! Creation options as qemu-img 10 types and lists them: the one place that knows an
//! option's type (`<size>`, `<bool (on/off)>`, `<num>`, `<str>`), checks a value of that
//! type in qemu's words, and renders `-o help` for `create`, `convert` and `amend`.
//!
//! qemu's texts live here because drop-in mode must print them byte for byte (trailing
//! blanks included); under the vdisk name the drivers' own texts and every option the
//! driver accepts are printed in the same sorted layout.

use vdisk_block::size::{qemu_strtou64, NumberError};
use vdisk_block::Format;

use super::resize::qemu_size_option;
use crate::context::Failure;
use crate::Ctx;

/// How qemu types an option, which decides how its value is checked and printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Size,
    Bool,
    Number,
    Text,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Size => "<size>",
            Kind::Bool => "<bool (on/off)>",
            Kind::Number => "<num>",
            Kind::Text => "<str>",
        }
    }
}

/// One option as qemu-img 10 lists it.
pub(crate) struct QemuOption {
    name: &'static str,
    kind: Kind,
    text: &'static str,
}

const fn q(name: &'static str, kind: Kind, text: &'static str) -> QemuOption {
    QemuOption { name, kind, text }
}

use Kind::{Bool, Number, Size, Text};

const RAW: &[QemuOption] = &[q("size", Size, "Virtual disk size")];

const QCOW2: &[QemuOption] = &[
    q("backing_file", Text, "File name of a base image"),
    q("backing_fmt", Text, "Image format of the base image"),
    q("cluster_size", Size, "qcow2 cluster size"),
    q(
        "compat",
        Text,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    q(
        "compression_type",
        Text,
        "Compression method used for image cluster compression",
    ),
    q("data_file", Text, "File name of an external data file"),
    q(
        "data_file_raw",
        Bool,
        "The external data file must stay valid as a raw image",
    ),
    q(
        "encrypt.cipher-alg",
        Text,
        "Name of encryption cipher algorithm",
    ),
    q(
        "encrypt.cipher-mode",
        Text,
        "Name of encryption cipher mode",
    ),
    q(
        "encrypt.format",
        Text,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    q(
        "encrypt.hash-alg",
        Text,
        "Name of encryption hash algorithm",
    ),
    q(
        "encrypt.iter-time",
        Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    q("encrypt.ivgen-alg", Text, "Name of IV generator algorithm"),
    q(
        "encrypt.ivgen-hash-alg",
        Text,
        "Name of IV generator hash algorithm",
    ),
    q(
        "encrypt.key-secret",
        Text,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    q(
        "encryption",
        Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    q("extended_l2", Bool, "Extended L2 tables"),
    q("lazy_refcounts", Bool, "Postpone refcount updates"),
    q(
        "preallocation",
        Text,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    q(
        "refcount_bits",
        Number,
        "Width of a reference count entry in bits",
    ),
    q("size", Size, "Virtual disk size"),
];

const VMDK: &[QemuOption] = &[
    q(
        "adapter_type",
        Text,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    q("backing_file", Text, "File name of a base image"),
    q("backing_fmt", Text, "Must be 'vmdk' if present"),
    q("compat6", Bool, "VMDK version 6 image"),
    q("hwversion", Text, "VMDK hardware version"),
    q("size", Size, "Virtual disk size"),
    q(
        "subformat",
        Text,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    q("toolsversion", Text, "VMware guest tools version"),
    q(
        "zeroed_grain",
        Bool,
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
];

const VHDX: &[QemuOption] = &[
    q(
        "block_size",
        Size,
        "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    ),
    q(
        "block_state_zero",
        Bool,
        "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.",
    ),
    q("log_size", Size, "Log size; min 1MB."),
    q("size", Size, "Virtual disk size; max of 64TB."),
    q(
        "subformat",
        Text,
        "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    ),
];

const VPC: &[QemuOption] = &[
    q(
        "force_size",
        Bool,
        "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation",
    ),
    q("size", Size, "Virtual disk size"),
    q(
        "subformat",
        Text,
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} ",
    ),
];

const LUKS: &[QemuOption] = &[
    q("cipher-alg", Text, "Name of encryption cipher algorithm"),
    q("cipher-mode", Text, "Name of encryption cipher mode"),
    q("detached-header", Bool, "Create a detached LUKS header"),
    q("hash-alg", Text, "Name of encryption hash algorithm"),
    q(
        "iter-time",
        Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    q("ivgen-alg", Text, "Name of IV generator algorithm"),
    q(
        "ivgen-hash-alg",
        Text,
        "Name of IV generator hash algorithm",
    ),
    q(
        "key-secret",
        Text,
        "ID of the secret that provides the keyslot passphrase",
    ),
    q("size", Size, "Virtual disk size"),
];

/// The file protocol's options, which qemu adds to every format's when a file is named
/// (a format's own option of the same name wins).
const FILE: &[QemuOption] = &[
    q(
        "extent_size_hint",
        Size,
        "Extent size hint for the image file, 0 to disable",
    ),
    q(
        "nocow",
        Bool,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    q(
        "preallocation",
        Text,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
];

/// qemu's own creation options of `format` (without the file protocol's).
fn qemu_format_options(format: &str) -> &'static [QemuOption] {
    match format {
        "raw" => RAW,
        "qcow2" => QCOW2,
        "vmdk" => VMDK,
        "vhdx" => VHDX,
        "vpc" => VPC,
        "luks" => LUKS,
        _ => &[],
    }
}

/// The file protocol's options that `driver` does not take itself, in the order qemu's
/// `Formatting` line shows them. qemu accepts them for every format and, for a format
/// that stores its data in its own layout (vmdk, vhdx, vpc), they change nothing, so vdisk
/// checks them and leaves them out of what the driver sees.
pub(crate) fn protocol_extras(driver: &dyn Format) -> Vec<&'static str> {
    let own = driver.create_options_help();
    ["nocow", "preallocation", "extent_size_hint"]
        .into_iter()
        .filter(|n| own.iter().all(|(o, _)| o != n))
        .collect()
}

/// How qemu types option `name` of `format`; options qemu does not have are text.
pub(crate) fn kind(format: &str, name: &str) -> Kind {
    qemu_format_options(format)
        .iter()
        .chain(FILE)
        .find(|o| o.name == name)
        .map_or(Text, |o| o.kind)
}

/// Renders qemu's option list: `header`, then one line per option sorted as qemu sorts
/// them (by the rendered line, so `name=<type>` decides), then `trailer`.
pub(crate) fn render<'a>(
    header: &str,
    options: impl IntoIterator<Item = (&'a str, Kind, &'a str)>,
    trailer: &str,
) -> String {
    let mut lines: Vec<String> = options
        .into_iter()
        .map(|(name, kind, text)| {
            let left = format!("{name}={}", kind.label());
            format!("  {left:<22} - {text}\n")
        })
        .collect();
    lines.sort();
    lines.dedup();
    let mut out = String::from(header);
    out.push('\n');
    for line in lines {
        out.push_str(&line);
    }
    out.push_str(trailer);
    out
}

/// `-o help` of `create` and `convert`. With a file name qemu lists the format's and the
/// file protocol's options together; without one only the format's, and says so.
pub(crate) fn create_help(ctx: &Ctx, driver: &dyn Format, with_file: bool) -> String {
    let format = driver.name();
    if !ctx.dropin {
        // vdisk has no protocol layer: the driver's list and the file protocol's options
        // it checks and ignores are everything it accepts.
        let options = driver.create_options_help();
        let extras: Vec<(&str, Kind, String)> = protocol_extras(driver)
            .into_iter()
            .filter_map(|n| FILE.iter().find(|f| f.name == n))
            .map(|f| {
                let text = format!("{} (accepted; no effect on {format} images)", f.text);
                (f.name, f.kind, text)
            })
            .collect();
        return render(
            &format!("Supported {format} options:"),
            options
                .iter()
                .map(|(n, t)| (*n, kind(format, n), *t))
                .chain(extras.iter().map(|(n, k, t)| (*n, *k, t.as_str()))),
            "",
        );
    }
    let own = qemu_format_options(format);
    if with_file {
        let file = FILE.iter().filter(|f| own.iter().all(|o| o.name != f.name));
        render(
            "Supported options:",
            own.iter().chain(file).map(|o| (o.name, o.kind, o.text)),
            "",
        )
    } else {
        render(
            &format!("Supported {format} options:"),
            own.iter().map(|o| (o.name, o.kind, o.text)),
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        )
    }
}

/// A `-o` value checked against its type: the text qemu's `Formatting` line shows, and
/// the value handed to the driver (sizes and numbers in decimal, booleans as on/off).
pub(crate) struct Checked {
    pub shown: String,
    pub value: String,
}

/// Checks `value` of option `key` as qemu's option parser does. The failure's qemu text
/// has no prefix (callers add the file name or the trailing lines qemu adds); its vdisk
/// text starts with `option KEY`.
pub(crate) fn check_value(key: &str, kind: Kind, value: &str) -> Result<Checked, Failure> {
    match kind {
        Kind::Size => {
            let bytes = qemu_size_option(key, value).map_err(|mut f| {
                f.vdisk = format!("option {key}: '{value}' is not a size (use e.g. 64k, 1M)");
                f
            })?;
            // qemu's Formatting line prints sizes as signed numbers, too.
            Ok(Checked {
                shown: (bytes as i64).to_string(),
                value: bytes.to_string(),
            })
        }
        Kind::Bool => {
            let on = match value {
                "on" | "yes" | "true" | "y" => "on",
                "off" | "no" | "false" | "n" => "off",
                _ => {
                    return Err(Failure::new(
                        format!("Parameter '{key}' expects 'on' or 'off'"),
                        format!("option {key} takes on or off, not '{value}'"),
                    ))
                }
            };
            Ok(Checked {
                shown: value.to_string(),
                value: on.to_string(),
            })
        }
        Kind::Number => {
            let n = qemu_strtou64(value).map_err(|e| match e {
                NumberError::TooLarge => Failure::new(
                    format!("Value '{value}' is too large for parameter '{key}'"),
                    format!("option {key}: '{value}' does not fit in 64 bits"),
                ),
                NumberError::NotANumber => Failure::new(
                    format!("Parameter '{key}' expects a number"),
                    format!("option {key} takes a number, not '{value}'"),
                ),
            })?;
            // qemu prints the parsed number as a signed value and hands the driver the
            // number itself (so `010` is 8 and `0x10` is 16, as in qemu).
            Ok(Checked {
                shown: (n as i64).to_string(),
                value: n.to_string(),
            })
        }
        Kind::Text => Ok(Checked {
            shown: value.replace(',', ",,"),
            value: value.to_string(),
        }),
    }
}

/// Splits one `-o` item: `key=value`, a bare `noKEY` is `KEY=off` and a bare `KEY` is
/// `KEY=on`, as qemu reads them.
pub(crate) fn key_value(item: &str) -> (String, String) {
    match item.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => match item.strip_prefix("no") {
            Some(rest) => (rest.to_string(), "off".to_string()),
            None => (item.to_string(), "on".to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_tables_are_sorted_as_printed() {
        for format in ["raw", "qcow2", "vmdk", "vhdx", "vpc", "luks"] {
            let names: Vec<&str> = qemu_format_options(format).iter().map(|o| o.name).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "{format}");
        }
    }

    #[test]
    fn types_follow_qemu() {
        assert_eq!(kind("vmdk", "hwversion"), Text);
        assert_eq!(kind("vpc", "force_size"), Bool);
        assert_eq!(kind("vhdx", "log_size"), Size);
        assert_eq!(kind("luks", "iter-time"), Number);
        assert_eq!(kind("vmdk", "nocow"), Bool);
        assert_eq!(kind("vhdx", "backing_file"), Text);
    }
}
