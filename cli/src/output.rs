//! Printers that reproduce qemu-img's output byte for byte.
//!
//! qemu prints JSON with its own pretty-printer: four spaces per level, `"key": value`,
//! an empty array as `[` newline `]` and an empty object likewise, and strings escaped with
//! upper-case `\uXXXX` for anything outside printable ASCII. Objects keep the key order the
//! caller built (serde_json's `preserve_order`), which is how we follow qemu's order.

use serde_json::Value;

use vdisk_blockjobs::map::MapEntry;

/// Whether to print for people or for programs (`--output human|json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// qemu-img's human-readable text.
    Human,
    /// qemu-img's JSON.
    Json,
}

impl OutputFormat {
    /// Parses the value of `--output`; `Err` carries qemu-img's complaint.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            other => Err(format!("--output expects 'human' or 'json' not '{other}'")),
        }
    }
}

/// `value` as qemu's pretty-printer writes it (no trailing newline).
pub fn qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => quote(out, s),
        Value::Array(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            if !items.is_empty() {
                out.push('\n');
            }
            indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            out.push_str("{\n");
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(",\n");
                }
                indent(out, level + 1);
                quote(out, key);
                out.push_str(": ");
                write_value(out, item, level + 1);
            }
            if !map.is_empty() {
                out.push('\n');
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// A JSON string with qemu's escapes.
fn quote(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) > 0xFFFF => {
                let v = c as u32 - 0x10000;
                out.push_str(&format!(
                    "\\u{:04X}\\u{:04X}",
                    0xD800 + (v >> 10),
                    0xDC00 + (v & 0x3FF)
                ));
            }
            c if (c as u32) < 0x20 || (c as u32) >= 0x7F => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `%#-16x`: `0x` before anything but zero, left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let text = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{text:<16}")
}

/// The header line of human `map` output.
pub const MAP_HUMAN_HEADER: &str = "Offset          Length          Mapped to       File\n";

/// One map entry in human form, or `Err` when the format cannot show it (data without a host
/// offset: compressed, encrypted or external). May adjust `next` so more entries merge,
/// since this format does not tell zero, hole and zero-data apart.
pub fn map_entry_human(e: &MapEntry, next: Option<&mut MapEntry>) -> Result<String, String> {
    if e.data && e.offset.is_none() {
        return Err("File contains external, encrypted or compressed clusters.".into());
    }
    let mut line = String::new();
    if e.data && !e.zero {
        line = format!(
            "{}{}{}{}\n",
            hex16(e.start),
            hex16(e.length),
            hex16(e.offset.unwrap_or(0)),
            e.filename
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        );
    }
    if let Some(next) = next {
        if !next.data || next.zero {
            next.data = false;
            next.zero = true;
        }
    }
    Ok(line)
}

/// One map entry in qemu's JSON line form (`{ "start": ...}`), followed by `,\n` when more
/// entries come.
pub fn map_entry_json(e: &MapEntry, more: bool) -> String {
    let mut line = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(offset) = e.offset {
        line.push_str(&format!(", \"offset\": {offset}"));
    }
    line.push('}');
    if more {
        line.push_str(",\n");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_containers_break_lines_like_qemu() {
        let v = json!({"children": [], "format-specific": {"type": "file", "data": {}}});
        assert_eq!(
            qemu_json(&v),
            "{\n    \"children\": [\n    ],\n    \"format-specific\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
    }

    #[test]
    fn strings_escape_like_qemu() {
        let v = json!("a\"b\\c\u{1}\u{e9}\u{1F600}");
        assert_eq!(qemu_json(&v), "\"a\\\"b\\\\c\\u0001\\u00E9\\uD83D\\uDE00\"");
    }

    #[test]
    fn hex_columns() {
        assert_eq!(hex16(0), "0               ");
        assert_eq!(hex16(4096), "0x1000          ");
    }
}
