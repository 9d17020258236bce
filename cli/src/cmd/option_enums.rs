//! The creation options whose values are names from a fixed list, checked where qemu's
//! drivers check them: after `create` printed "Formatting ...", before any semantic check
//! (a missing `key-secret`, an unsupported cipher). qemu words the refusal two ways: its
//! QAPI visitor ("Parameter 'cipher-alg' does not accept value 'foo'", in schema order,
//! naming the member without its `encrypt.` prefix) and `qapi_enum_parse` ("invalid
//! parameter value: foo").

/// One enumerated option of a driver.
struct EnumOption {
    format: &'static str,
    /// The `-o` key.
    key: &'static str,
    /// The name qemu's visitor message uses.
    member: &'static str,
    values: &'static [&'static str],
    /// Worded by the visitor (else by `qapi_enum_parse`).
    visitor: bool,
}

use vdisk_luks::{CIPHER_ALGS, CIPHER_MODES, HASH_ALGS, IVGEN_ALGS};

const PREALLOCATION: &[&str] = &["off", "metadata", "falloc", "full"];

const fn visited(
    format: &'static str,
    key: &'static str,
    member: &'static str,
    values: &'static [&'static str],
) -> EnumOption {
    EnumOption {
        format,
        key,
        member,
        values,
        visitor: true,
    }
}

/// In the order qemu meets them: options a driver parses itself first, then the QAPI
/// schema's member order.
const ENUM_OPTIONS: &[EnumOption] = &[
    visited(
        "qcow2",
        "encrypt.format",
        "format",
        &["qcow", "luks", "aes"],
    ),
    visited("qcow2", "encrypt.cipher-alg", "cipher-alg", CIPHER_ALGS),
    visited("qcow2", "encrypt.cipher-mode", "cipher-mode", CIPHER_MODES),
    visited("qcow2", "encrypt.ivgen-alg", "ivgen-alg", IVGEN_ALGS),
    visited(
        "qcow2",
        "encrypt.ivgen-hash-alg",
        "ivgen-hash-alg",
        HASH_ALGS,
    ),
    visited("qcow2", "encrypt.hash-alg", "hash-alg", HASH_ALGS),
    visited("qcow2", "preallocation", "preallocation", PREALLOCATION),
    visited(
        "qcow2",
        "compression_type",
        "compression-type",
        &["zlib", "zstd"],
    ),
    EnumOption {
        format: "luks",
        key: "preallocation",
        member: "preallocation",
        values: PREALLOCATION,
        visitor: false,
    },
    visited("luks", "cipher-alg", "cipher-alg", CIPHER_ALGS),
    visited("luks", "cipher-mode", "cipher-mode", CIPHER_MODES),
    visited("luks", "ivgen-alg", "ivgen-alg", IVGEN_ALGS),
    visited("luks", "ivgen-hash-alg", "ivgen-hash-alg", HASH_ALGS),
    visited("luks", "hash-alg", "hash-alg", HASH_ALGS),
    EnumOption {
        format: "vmdk",
        key: "adapter_type",
        member: "adapter_type",
        values: &["ide", "buslogic", "lsilogic", "legacyESX"],
        visitor: false,
    },
];

/// qemu's refusal of the first enumerated value it would refuse among `options` (`-o` key
/// and value as typed, the last of a repeated key winning) for a new image of `format`.
pub fn refusal(format: &str, options: &[(&str, &str)]) -> Option<String> {
    let given = |key: &str| {
        options
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    };
    // qcow2's legacy `encryption` becomes `encrypt.format`: "on" means the old AES
    // format, "off" nothing, and any other spelling of a boolean is kept as a format name.
    let legacy = match (format, given("encryption")) {
        ("qcow2", Some("on")) => Some("aes"),
        ("qcow2", Some("off")) | (_, None) => None,
        ("qcow2", Some(other)) => Some(other),
        _ => None,
    };
    let encrypt_format = given("encrypt.format").or(legacy);
    for option in ENUM_OPTIONS.iter().filter(|o| o.format == format) {
        let value = match option.key {
            "encrypt.format" => encrypt_format,
            // The cipher's members are visited only for a LUKS-encrypted image.
            key if key.starts_with("encrypt.") && encrypt_format != Some("luks") => None,
            key => given(key),
        };
        let Some(value) = value else { continue };
        if option.values.contains(&value) {
            continue;
        }
        return Some(match option.visitor {
            true => format!(
                "Parameter '{}' does not accept value '{value}'",
                option.member
            ),
            false => format!("invalid parameter value: {value}"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::refusal;

    #[test]
    fn values_are_refused_in_qemus_order_and_words() {
        assert_eq!(
            refusal(
                "qcow2",
                &[("compression_type", "foo"), ("preallocation", "x")]
            )
            .as_deref(),
            Some("Parameter 'preallocation' does not accept value 'x'")
        );
        assert_eq!(
            refusal("qcow2", &[("encryption", "no")]).as_deref(),
            Some("Parameter 'format' does not accept value 'no'")
        );
        assert_eq!(refusal("qcow2", &[("encryption", "off")]), None);
        assert_eq!(refusal("qcow2", &[("encrypt.cipher-alg", "foo")]), None);
        assert_eq!(
            refusal(
                "qcow2",
                &[("encrypt.format", "luks"), ("encrypt.hash-alg", "foo")]
            )
            .as_deref(),
            Some("Parameter 'hash-alg' does not accept value 'foo'")
        );
        assert_eq!(
            refusal("vmdk", &[("adapter_type", "IDE")]).as_deref(),
            Some("invalid parameter value: IDE")
        );
        assert_eq!(
            refusal("luks", &[("cipher-alg", "des-rfb")]).as_deref(),
            Some("Parameter 'cipher-alg' does not accept value 'des-rfb'")
        );
        assert_eq!(refusal("raw", &[("preallocation", "x")]), None);
    }
}
