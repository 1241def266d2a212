//! Human units for durations and sizes, in both directions: parsing what users
//! type on the command line (`500ms`, `5m`, `64KiB`) and printing figures in
//! reports (`1.5 MiB`, `3.2s`).
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("`{0}` is not a duration: use a number with a unit, e.g. 500ms, 10s, 5m, 1h")]
    BadDuration(String),
    #[error("`{0}` is not a size: use bytes or a number with a unit, e.g. 4096, 64KiB, 1MiB")]
    BadSize(String),
}

/// Parses `500ms`, `10s`, `1.5s`, `5m`, `1h`, `2m30s`. A bare number is refused:
/// `10` could mean seconds or milliseconds, and guessing wrong is silent.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(UnitError::Empty);
    }
    let bad = || UnitError::BadDuration(s.to_string());
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses `4096`, `64KiB`, `1MiB`, `2GiB`, also `64K`, `1M` (binary) and `1kB`, `1MB` (decimal).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(UnitError::Empty);
    }
    let bad = || UnitError::BadSize(s.to_string());
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    if num_end == 0 {
        return Err(bad());
    }
    let value: f64 = t[..num_end].parse().map_err(|_| bad())?;
    let scale: u64 = match t[num_end..].trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `1023 B`, `1.5 KiB`, `12.3 MiB`.
pub fn format_bytes(bytes: i64) -> String {
    let sign = if bytes < 0 { "-" } else { "" };
    let b = bytes.unsigned_abs() as f64;
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024.0 {
        return format!("{sign}{} B", bytes.unsigned_abs());
    }
    let mut v = b / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{sign}{v:.1} {}", UNITS[unit])
}

/// `850ms`, `12.5s`, `3m05s`, `2h10m`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h{:02}m", d.as_secs() / 3600, (d.as_secs() % 3600) / 60)
    }
}

/// `n` things with the noun in the right number: `1 block`, `2,000 blocks`
/// (`noun` takes an `s` in the plural).
pub fn counted(n: u64, noun: &str) -> String {
    format!(
        "{} {noun}{}",
        format_count(n),
        if n == 1 { "" } else { "s" }
    )
}

/// `1234567` → `1,234,567`.
pub fn format_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn things_are_counted_in_the_right_number() {
        assert_eq!(super::counted(1, "block"), "1 block");
        assert_eq!(super::counted(0, "block"), "0 blocks");
        assert_eq!(super::counted(2000, "allocation"), "2,000 allocations");
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2m30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "5x", "s", "ms5", "1..2s", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("2kB"), Ok(2000));
        for bad in ["", "KiB", "1.3B", "12XB", "-5"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(-2048), "-2.0 KiB");
        assert_eq!(format_bytes(5 << 20), "5.0 MiB");
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(12_500)), "12.5s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(1_234_567), "1,234,567");
    }
}

/// A growth rate, as given on the command line (`--alert-growth 10MiB/min`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub bytes_per_s: f64,
    /// The time unit it was written with (`/min`: 60 s), used to print rates
    /// back in the user's terms.
    pub per: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_rate(self.bytes_per_s, self.per))
    }
}

/// Parses `10MiB/min`, `1MiB/s`, `500KiB/h`, `64KiB/10s`: a size (as
/// [`parse_size`]) per a duration (as [`parse_duration`], where a bare unit
/// means one of it: `/min` is `/1min`).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || {
        format!("`{s}` is not a rate: use a size per time unit, e.g. 10MiB/min, 1MiB/s, 500KiB/h")
    };
    let (size, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let bytes = parse_size(size).map_err(|_| bad())?;
    let per = per.trim();
    let per = if per.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        parse_duration(per)
    } else {
        parse_duration(&format!("1{per}"))
    }
    .map_err(|_| bad())?;
    if per.is_zero() || bytes == 0 {
        return Err(bad());
    }
    Ok(Rate {
        bytes_per_s: bytes as f64 / per.as_secs_f64(),
        per,
    })
}

/// `12.0 MiB/min`: a rate in bytes per second, printed per `per`.
pub fn format_rate(bytes_per_s: f64, per: Duration) -> String {
    let unit = match per.as_secs_f64() {
        1.0 => "s".to_string(),
        60.0 => "min".to_string(),
        3600.0 => "h".to_string(),
        86400.0 => "d".to_string(),
        _ => format_duration(per),
    };
    let amount = bytes_per_s * per.as_secs_f64();
    let amount = if amount.is_finite() {
        amount.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64
    } else {
        0
    };
    format!("{}/{unit}", format_bytes(amount))
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn rates() {
        let r = parse_rate("10MiB/min").unwrap();
        assert_eq!(r.bytes_per_s, (10u64 << 20) as f64 / 60.0);
        assert_eq!(r.per, Duration::from_secs(60));
        assert_eq!(r.to_string(), "10.0 MiB/min");
        assert_eq!(
            parse_rate("1MiB/s").unwrap().bytes_per_s,
            (1u64 << 20) as f64
        );
        let h = parse_rate("500KiB/h").unwrap();
        assert_eq!(h.bytes_per_s, 500.0 * 1024.0 / 3600.0);
        assert_eq!(h.to_string(), "500.0 KiB/h");
        let t = parse_rate("64KiB/10s").unwrap();
        assert_eq!(t.bytes_per_s, 65536.0 / 10.0);
        assert_eq!(t.to_string(), "64.0 KiB/10.0s");
        assert_eq!(parse_rate("4096/min").unwrap().bytes_per_s, 4096.0 / 60.0);
        for bad in [
            "", "10MiB", "/s", "10MiB/", "10MiB/x", "0/s", "1MiB/0s", "x/s", "-1MiB/s",
        ] {
            let e = parse_rate(bad).unwrap_err();
            assert!(e.contains("is not a rate"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn rate_formatting() {
        assert_eq!(format_rate(1024.0, Duration::from_secs(1)), "1.0 KiB/s");
        assert_eq!(
            format_rate(12.0 * 1048576.0 / 60.0, Duration::from_secs(60)),
            "12.0 MiB/min"
        );
        assert_eq!(format_rate(-2048.0, Duration::from_secs(1)), "-2.0 KiB/s");
        assert_eq!(format_rate(0.5, Duration::from_secs(1)), "1 B/s");
    }
}
