//! qemu-img's `--object` option: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
//! (optionally `format=base64`), defining secrets that image options name by id
//! (`key-secret=ID`, `encrypt.key-secret=ID`). Every command that opens or creates images
//! calls [`define_all`] before anything else, as qemu-img creates its objects first.

use vdisk_block::format::split_option_list;
use zeroize::Zeroizing;

use crate::context::Failure;

/// One parsed `--object` definition.
pub struct Object {
    /// The object's id.
    pub id: String,
    /// The secret's bytes.
    pub value: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The secrets one command line defined; dropping it removes (and zeroes) them, so a
/// command run twice in one process starts from no secrets, as a new qemu-img would.
#[derive(Debug, Default)]
#[must_use = "the secrets are removed when this is dropped"]
pub struct Secrets(Vec<String>);

impl Drop for Secrets {
    fn drop(&mut self) {
        for id in &self.0 {
            vdisk_luks::secret::remove(id);
        }
    }
}

/// Parses and defines every `--object` of a command line, in order; they stay defined
/// while the returned [`Secrets`] lives.
pub fn define_all(objects: &[String]) -> Result<Secrets, Failure> {
    let mut defined = Secrets::default();
    for text in objects {
        let object = parse(text)?;
        vdisk_luks::secret::define(&object.id, object.value)
            .map_err(|e| Failure::same(e.message()))?;
        defined.0.push(object.id);
    }
    Ok(defined)
}

fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Parses one `--object` definition (only `secret` objects exist in vdisk).
pub fn parse(text: &str) -> Result<Object, Failure> {
    let mut qom_type = None;
    let mut id = None;
    let mut data: Option<Zeroizing<String>> = None;
    let mut file = None;
    let mut base64 = false;
    for (i, item) in split_option_list(text).into_iter().enumerate() {
        let item = Zeroizing::new(item);
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 => ("qom-type", item.as_str()),
            None => (item.as_str(), "on"),
        };
        match key {
            "qom-type" => qom_type = Some(value.to_string()),
            "id" => id = Some(value.to_string()),
            "data" => data = Some(Zeroizing::new(value.to_string())),
            "file" => file = Some(value.to_string()),
            "format" => match value {
                "raw" => base64 = false,
                "base64" => base64 = true,
                other => {
                    return Err(Failure::same(format!(
                        "Parameter 'format' does not accept value '{other}'"
                    )))
                }
            },
            "keyid" | "iv" => {
                return Err(Failure::new(
                    format!("Parameter '{key}' is unexpected"),
                    format!(
                        "--object secret: encrypted secrets ('{key}') are not supported; give the secret in plain with data= or file="
                    ),
                ))
            }
            other => {
                return Err(Failure::same(format!(
                    "Parameter '{other}' is unexpected"
                )))
            }
        }
    }
    let qom_type = qom_type.unwrap_or_default();
    if qom_type != "secret" {
        return Err(Failure::new(
            format!("Parameter 'qom-type' does not accept value '{qom_type}'"),
            format!("--object: unknown object type '{qom_type}' (vdisk knows: secret)"),
        ));
    }
    let id = id.ok_or_else(|| Failure::same("Parameter 'id' is missing"))?;
    if !is_identifier(&id) {
        return Err(Failure::same(
            "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
        ));
    }
    let raw = match (data, file) {
        (Some(_), Some(_)) => {
            return Err(Failure::same("'file' and 'data' are mutually exclusive"))
        }
        (None, None) => return Err(Failure::same("Either 'file' or 'data' must be provided")),
        (Some(d), None) => Zeroizing::new(d.as_bytes().to_vec()),
        // qemu takes the file's bytes as they are, a trailing newline included.
        (None, Some(path)) => Zeroizing::new(std::fs::read(&path).map_err(|e| {
            Failure::new(
                format!(
                    "Unable to read {path}: Failed to open file “{path}”: {}",
                    os_text(&e)
                ),
                format!("--object secret: cannot read '{path}': {}", os_text(&e)),
            )
        })?),
    };
    let value = if base64 {
        decode_base64(&raw)
            .ok_or_else(|| Failure::same("Base64 data contains invalid characters"))?
    } else {
        raw
    };
    Ok(Object { id, value })
}

fn os_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Standard base64 with `=` padding; `None` on any other character.
fn decode_base64(text: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = text
        .iter()
        .rposition(|&c| c != b'=')
        .map_or(&text[..0], |end| &text[..=end]);
    if text.len() - body.len() > 2 {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() * 3 / 4));
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in body {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_live_as_long_as_the_command() {
        let objects = vec!["secret,id=object-test,data=x".to_string()];
        let secrets = define_all(&objects).expect("define");
        assert!(
            define_all(&objects).is_err(),
            "a second definition of one id"
        );
        assert_eq!(
            &vdisk_luks::secret::lookup("object-test").expect("defined")[..],
            b"x"
        );
        drop(secrets);
        assert!(vdisk_luks::secret::lookup("object-test").is_err());
        drop(define_all(&objects).expect("defined again after the first run"));
    }

    #[test]
    fn parses_secrets_as_qemu_does() {
        let o = parse("secret,id=sec0,data=abc").expect("data");
        assert_eq!((o.id.as_str(), &o.value[..]), ("sec0", &b"abc"[..]));
        let o = parse("qom-type=secret,id=s,data=YWJj,format=base64").expect("base64");
        assert_eq!(&o.value[..], b"abc");
        assert_eq!(&decode_base64(b"YWI=").expect("pad")[..], b"ab");
        let err = |t: &str| parse(t).expect_err(t).qemu;
        assert_eq!(err("secret,data=abc"), "Parameter 'id' is missing");
        assert_eq!(
            err("foo,id=a"),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(
            err("secret,id=a"),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            err("secret,id=a,data=@@,format=base64"),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            err("secret,id=a,data=x,bogus=1"),
            "Parameter 'bogus' is unexpected"
        );
        assert!(err("secret,id=1a,data=x").starts_with("Parameter 'id' expects an identifier"));
    }
}
