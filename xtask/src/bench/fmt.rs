//! How numbers are written in the results: ns, byte counts, ranges, ratios.
pub(super) fn fmt_ns(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        group_thousands(v.round() as u64)
    }
}

pub(super) fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `+309` / `-12.5`: a difference of ns.
pub(super) fn fmt_signed_ns(v: f64) -> String {
    format!("{}{}", if v < 0.0 { "-" } else { "+" }, fmt_ns(v.abs()))
}

pub(super) fn fmt_bytes(b: u64) -> String {
    if b < 10 * 1024 {
        format!("{} B", group_thousands(b))
    } else if b < 10 * 1024 * 1024 {
        format!("{} B ({:.1} KiB)", group_thousands(b), b as f64 / 1024.0)
    } else {
        format!(
            "{} B ({:.1} MiB)",
            group_thousands(b),
            b as f64 / (1024.0 * 1024.0)
        )
    }
}

/// `7` when every value is the same, `5-7` otherwise; `-` for none.
pub(super) fn fmt_range(values: &[u64]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => group_thousands(*lo),
        (Some(lo), Some(hi)) => format!("{}-{}", group_thousands(*lo), group_thousands(*hi)),
        _ => "-".into(),
    }
}

pub(super) fn fmt_ratio(r: f64) -> String {
    if r < 10.0 {
        format!("{r:.2}")
    } else {
        group_thousands(r.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(group_thousands(1234567), "1,234,567");
        assert_eq!(fmt_signed_ns(-1234.4), "-1,234");
        assert_eq!(fmt_signed_ns(12.25), "+12.2");
        assert_eq!(fmt_range(&[7, 5, 7]), "5-7");
        assert_eq!(fmt_range(&[3, 3]), "3");
        assert_eq!(fmt_bytes(20480), "20,480 B (20.0 KiB)");
    }
}
