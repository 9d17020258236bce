//! Sizes as qemu-img spells them: a number with an optional 1024-based suffix.

use crate::error::{Error, Result};

/// Parses `1024`, `64k`, `1.5G`, `10T`, ... (suffixes b, k/K, M, G, T, P, E; 1024-based).
/// A plain number means bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let bad = || {
        Error::invalid(
            "parse size",
            format!(
                "Invalid size '{text}': use a number of bytes, optionally followed by k, M, G, T, P or E"
            ),
        )
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    let too_big = || {
        Error::invalid(
            "parse size",
            format!("Invalid size '{text}': the value is too large (at most 8 EiB - 1)"),
        )
    };
    let bytes = if let Some((whole, frac)) = number.split_once('.') {
        if frac.contains('.') || shift == 0 {
            return Err(bad());
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac_value: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
        let base = whole
            .checked_shl(shift)
            .filter(|v| v >> shift == whole)
            .ok_or_else(too_big)?;
        let extra = (frac_value * (1u64 << shift) as f64) as u64;
        base.checked_add(extra).ok_or_else(too_big)?
    } else {
        let value: u64 = number.parse().map_err(|_| too_big())?;
        let shifted = value.checked_shl(shift).ok_or_else(too_big)?;
        if shifted >> shift != value {
            return Err(too_big());
        }
        shifted
    };
    if bytes > i64::MAX as u64 {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Formats a byte count as qemu-img does in human output: `64 MiB`, `1.07 MiB`, `512 B`.
///
/// qemu switches to the next unit once the value reaches 1000 of the current one and prints
/// with C's `%0.3g`, so 999.5 KiB prints as `1e+03 KiB` and 1000 KiB as `0.977 MiB`; both
/// quirks are kept so output matches byte for byte.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // floor(log2(bytes * 1024 / 1000)) + 1, as C's frexp() gives it, picks the unit.
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    let exponent = frexp_exponent(scaled);
    let unit = ((exponent - 1) / 10).clamp(0, UNITS.len() as i32 - 1) as usize;
    let value = bytes as f64 / (1u64 << (unit * 10)) as f64;
    format!("{} {}", format_g3(value), UNITS[unit])
}

/// The exponent C's `frexp()` returns for a finite, non-negative `x` (0 for 0).
fn frexp_exponent(x: f64) -> i32 {
    if x == 0.0 {
        return 0;
    }
    let biased = ((x.to_bits() >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Subnormal: never reached by byte counts, but keep the arithmetic honest.
        return frexp_exponent(x * (1u64 << 54) as f64) - 54;
    }
    biased - 1022
}

/// C's `%0.3g` for a non-negative finite value.
fn format_g3(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    // The decimal exponent after rounding to three significant digits decides the style.
    let sci = format!("{value:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |t: &str| -> String {
        if t.contains('.') {
            t.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            t.to_string()
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let decimals = (2 - exp) as usize;
        trim(&format!("{value:.decimals$}"))
    }
}

/// Why text is not a number qemu's option parser takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberError {
    /// Not a number at all (qemu: "expects a number").
    NotANumber,
    /// Digits that do not fit in 64 bits (qemu: "is too large").
    TooLarge,
}

/// The sign and magnitude of a number as qemu's `qemu_strtou64` / `qemu_strtoi64` read one
/// with base 0: leading white space, a sign, `0x` hex, a leading `0` octal, and nothing
/// after the digits.
pub fn qemu_number_parts(text: &str) -> std::result::Result<(bool, u64), NumberError> {
    let t = text.trim_start_matches([' ', '\t', '\n', '\u{b}', '\u{c}', '\r']);
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(hex) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (16, hex)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumberError::NotANumber);
    }
    let magnitude = u64::from_str_radix(digits, radix).map_err(|_| NumberError::TooLarge)?;
    Ok((negative, magnitude))
}

/// qemu's `qemu_strtou64` with base 0, as its option parser checks a number option: a
/// negative number wraps around, as C's `strtoull` does.
pub fn qemu_strtou64(text: &str) -> std::result::Result<u64, NumberError> {
    let (negative, magnitude) = qemu_number_parts(text)?;
    Ok(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

/// Why a size option did not parse, as qemu's `qemu_strtosz` tells it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size ("expects a non-negative number below 2^64").
    Invalid,
    /// A negative number, or one past 64 bits ("is out of range").
    Range,
}

/// qemu's refusal of `text` for the size option `key`.
pub fn size_refusal(key: &str, text: &str, err: SizeError) -> String {
    match err {
        SizeError::Range => format!("Value '{text}' is out of range for parameter '{key}'"),
        SizeError::Invalid => format!(
            "Parameter '{key}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        ),
    }
}

fn suffix_shift(c: u8) -> Option<u32> {
    match c.to_ascii_uppercase() {
        b'B' => Some(0),
        b'K' => Some(10),
        b'M' => Some(20),
        b'G' => Some(30),
        b'T' => Some(40),
        b'P' => Some(50),
        b'E' => Some(60),
        _ => None,
    }
}

/// qemu's `qemu_strtosz`, which its option parser uses for size options: leading blanks and
/// `+`, decimal or `0x` hex, a fraction only before a suffix other than `B`, 1024-based
/// suffixes, nothing after.
pub fn qemu_strtosz(text: &str) -> std::result::Result<u64, SizeError> {
    let bytes = text.as_bytes();
    // strtoull's prefix: blanks, then one sign.
    let mut i = bytes
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        .unwrap_or(bytes.len());
    let negative = bytes.get(i) == Some(&b'-');
    if matches!(bytes.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits = |from: usize, hex: bool| {
        bytes[from..]
            .iter()
            .take_while(|c| {
                if hex {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_digit()
                }
            })
            .count()
    };
    let int_len = digits(i, false);
    let int_text = &text[i..i + int_len];
    let mut end = i + int_len;
    // qemu refuses a negative number as out of range once its digits are read, unless
    // something (a suffix, a fraction, `x`) follows them, which makes it invalid instead.
    if negative && int_len > 0 {
        return Err(if end == bytes.len() {
            SizeError::Range
        } else {
            SizeError::Invalid
        });
    }
    // Hexadecimal: "0x" and hex digits, with neither a fraction nor a suffix.
    if int_text == "0" && matches!(bytes.get(end), Some(b'x' | b'X')) {
        let hex_len = digits(end + 1, true);
        if hex_len == 0 || end + 1 + hex_len != bytes.len() {
            return Err(SizeError::Invalid);
        }
        let hex = text[end + 1..].trim_start_matches('0');
        if hex.len() > 16 {
            return Err(SizeError::Range);
        }
        let value = u64::from_str_radix(if hex.is_empty() { "0" } else { hex }, 16)
            .map_err(|_| SizeError::Invalid)?;
        return if negative {
            Err(SizeError::Invalid)
        } else {
            Ok(value)
        };
    }
    let value: u64 = if int_len == 0 {
        0
    } else {
        int_text.parse().map_err(|_| SizeError::Range)?
    };
    let mut fraction_text = None;
    if bytes.get(end) == Some(&b'.') {
        let frac_len = digits(end + 1, false);
        fraction_text = Some(&text[end + 1..end + 1 + frac_len]);
        end += 1 + frac_len;
    }
    let had_digits = int_len > 0 || fraction_text.is_some_and(|f| !f.is_empty());
    if !had_digits || negative {
        return Err(SizeError::Invalid);
    }
    let (shift, end) = match bytes.get(end).and_then(|&c| suffix_shift(c)) {
        Some(s) => (s, end + 1),
        None => (0, end),
    };
    if end != bytes.len() {
        return Err(SizeError::Invalid);
    }
    let fraction: f64 = match fraction_text {
        Some(f) if !f.is_empty() => format!("0.{f}").parse().map_err(|_| SizeError::Invalid)?,
        _ => 0.0,
    };
    if shift == 0 && fraction != 0.0 {
        return Err(SizeError::Invalid);
    }
    let mul = 1u64 << shift;
    let whole = value.checked_mul(mul).ok_or(SizeError::Range)?;
    let extra = fraction * mul as f64;
    if extra > (u64::MAX - whole) as f64 {
        return Err(SizeError::Range);
    }
    Ok(whole + extra as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("512").ok(), Some(512));
        assert_eq!(parse_size("64k").ok(), Some(65536));
        assert_eq!(parse_size("1M").ok(), Some(1 << 20));
        assert_eq!(parse_size("1.5G").ok(), Some(3 << 29));
        assert_eq!(parse_size("2T").ok(), Some(2 << 40));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert!(parse_size("").is_err());
        assert!(parse_size("12x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("8E").is_err());
    }

    #[test]
    fn human_sizes_match_qemu() {
        assert_eq!(human_size(67108864), "64 MiB");
        assert_eq!(human_size(1118208), "1.07 MiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(196608), "192 KiB");
        assert_eq!(human_size(1073741824), "1 GiB");
        // qemu-img 10.0.2's output around the unit switch and for tiny values.
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "0.999 KiB");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1023488), "1e+03 KiB");
        assert_eq!(human_size(1024000), "0.977 MiB");
        assert_eq!(human_size(1048051712), "1e+03 MiB");
        assert_eq!(human_size(1245184), "1.19 MiB");
    }

    #[test]
    fn sizes_parse_as_qemu_qemu_strtosz() {
        let ok = |t: &str| qemu_strtosz(t).unwrap_or_else(|e| panic!("{t}: {e:?}"));
        assert_eq!(ok("2M"), 2 << 20);
        assert_eq!(ok(" +2M"), 2 << 20);
        assert_eq!(ok(".5M"), 512 << 10);
        assert_eq!(ok("5.M"), 5 << 20);
        assert_eq!(ok("1.0"), 1);
        assert_eq!(ok("1.0b"), 1);
        assert_eq!(ok("010M"), 10 << 20);
        assert_eq!(ok("0X100000"), 1 << 20);
        assert_eq!(ok("0x0000000000000000000000100000"), 1 << 20);
        assert_eq!(ok("3.9999999999999999999M"), 4 << 20);
        assert_eq!(ok("18446744073709551615"), u64::MAX);
        assert_eq!(ok("4294967296.5k"), 4398046511616);
        for bad in [
            "", " ", ".", ".M", "1.5", "1e3", "1.5b", "0x10M", "0x1.5M", "0x", "00x10", "2M ",
            "-2M", "1kB", "5.5.5M", "0x-5",
        ] {
            assert_eq!(qemu_strtosz(bad), Err(SizeError::Invalid), "{bad:?}");
        }
        for big in [
            "18446744073709551616",
            "16E",
            "17179869183.99999999999G",
            "0xfffffffffffffffff",
            "99999999999999999999",
            "-1",
            "-0",
            " -5",
        ] {
            assert_eq!(qemu_strtosz(big), Err(SizeError::Range), "{big:?}");
        }
    }
}
