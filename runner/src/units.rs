//! Sizes ("512M", "2G") and CPU shares ("1.5") as the configuration, the CLI and
//! messages write them: parsing, formatting, and the host's CPU count.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// The smallest workspace quota (the inputs and a build's files must fit somewhere).
pub const MIN_DISK_BYTES: u64 = 1 << 20;

const UNITS: [(&str, u64); 5] = [
    ("", 1),
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("T", 1 << 40),
];

/// Parses a size: bytes, or a number with a binary suffix K, M, G or T (optionally
/// followed by "i"/"iB"/"B"), e.g. "512M", "2G", "1.5G".
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let digits_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix('B').filter(|u| !u.is_empty()))
        .or_else(|| unit.strip_suffix('i'))
        .unwrap_or(unit)
        .to_ascii_uppercase();
    let bad = || format!("{text:?} is not a size (e.g. 4096, 512M, 2G)");
    let factor = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, f)| *f)
        .ok_or_else(bad)?;
    let scaled = scale_decimal(number, factor).ok_or_else(bad)?;
    Ok(scaled)
}

/// `number` (digits, at most one '.') times `factor`, exactly, rounded down; None on
/// overflow or a malformed number.
fn scale_decimal(number: &str, factor: u64) -> Option<u64> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let denom = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let value = int
        .checked_mul(u128::from(factor))?
        .checked_add(frac_value * u128::from(factor) / denom)?;
    u64::try_from(value).ok()
}

/// Parses a CPU count ("2", "1.5", "0.25") into thousandths of a CPU.
pub fn parse_cpus(text: &str) -> std::result::Result<u32, String> {
    let bad = || format!("{text:?} is not a CPU count (e.g. 1, 1.5, 0.25)");
    let t = text.trim();
    if t.split_once('.').is_some_and(|(_, f)| f.len() > 3) {
        return Err(format!("{text:?}: at most 3 decimals (millicpus)"));
    }
    let millis = scale_decimal(t, 1000).ok_or_else(bad)?;
    u32::try_from(millis).map_err(|_| bad())
}

/// "64 MiB", "1.5 GiB", "512 B": for messages.
pub fn format_size(bytes: u64) -> String {
    let (unit, factor) = UNITS
        .iter()
        .rev()
        .find(|(_, f)| bytes >= *f)
        .copied()
        .unwrap_or(("", 1));
    if factor == 1 {
        return format!("{bytes} B");
    }
    let whole = bytes / factor;
    let tenths = (bytes % factor) * 10 / factor;
    if tenths == 0 {
        format!("{whole} {unit}iB")
    } else {
        format!("{whole}.{tenths} {unit}iB")
    }
}

/// "1.5", "2": for messages.
pub fn format_cpus(millis: u32) -> String {
    let frac = millis % 1000;
    if frac == 0 {
        format!("{}", millis / 1000)
    } else {
        format!("{}.{:03}", millis / 1000, frac)
            .trim_end_matches('0')
            .to_string()
    }
}

/// A size in the config: bytes as an integer, or a string like "4G".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => parse_size(&t).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

/// A CPU count in the config: an integer, a float or a string ("1.5"); kept in millicpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus(pub u32);

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Int(n) => n.to_string(),
            // Through text so 1.5 is exactly 1500 (at most 3 decimals are accepted).
            Raw::Float(x) => format!("{x}"),
            Raw::Text(t) => t,
        };
        parse_cpus(&text)
            .map(Cpus)
            .map_err(serde::de::Error::custom)
    }
}

/// The host's CPU count, the default CPU limit.
pub fn host_cpu_millis() -> u32 {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    u32::try_from(n)
        .unwrap_or(u32::MAX / 1000)
        .saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        for bad in ["", "M", "12X", "-1", "1.2.3G", "99999999999T", "1 0M"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cpus("1.5").unwrap(), 1500);
        assert_eq!(parse_cpus("2").unwrap(), 2000);
        assert_eq!(parse_cpus("0.25").unwrap(), 250);
        assert!(parse_cpus("0.0001").is_err());
        assert!(parse_cpus("two").is_err());
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_cpus(1500), "1.5");
        assert_eq!(format_cpus(2000), "2");
        assert_eq!(format_cpus(250), "0.25");
    }

    #[test]
    fn config_values_accept_numbers_and_strings() {
        #[derive(Deserialize)]
        struct T {
            a: Size,
            b: Size,
            c: Cpus,
            d: Cpus,
        }
        let t: T = toml::from_str("a = 1024\nb = \"2G\"\nc = 1.5\nd = 2\n").unwrap();
        assert_eq!((t.a.0, t.b.0, t.c.0, t.d.0), (1024, 2 << 30, 1500, 2000));
        assert!(toml::from_str::<T>("a = \"lots\"\nb = 1\nc = 1\nd = 1\n").is_err());
    }
}
