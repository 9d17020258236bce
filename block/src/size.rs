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
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    // qemu switches unit once the value reaches 1000 of the current unit (e.g. 1000 KiB
    // prints as 0.977 MiB), keeping three significant digits.
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.*}", significant_decimals(value));
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text} {}", UNITS[unit])
}

fn significant_decimals(value: f64) -> usize {
    if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    }
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
    }
}
