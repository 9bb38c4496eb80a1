//! Numbers and times as people read them.

/// 1234567 → "1,234,567"
pub fn points(n: u64) -> String {
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

/// "2026-11-23T10:04:05.123Z" → "2026-11-23 10:04 UTC" (times are stored in UTC).
pub fn when(rfc3339: &str) -> String {
    match (rfc3339.get(0..10), rfc3339.get(11..16)) {
        (Some(day), Some(time)) => format!("{day} {time} UTC"),
        _ => rfc3339.to_string(),
    }
}

/// "2026-11-23T…" → "November 2026"
pub fn month_year(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = rfc3339.get(5..7).and_then(|m| m.parse::<usize>().ok()).filter(|m| (1..=12).contains(m));
    match (rfc3339.get(0..4), month) {
        (Some(year), Some(m)) => format!("{} {year}", MONTHS[m - 1]),
        _ => rfc3339.to_string(),
    }
}

/// 12.345 → "12.3" (one decimal, thousands separated). Integer arithmetic on purpose: float
/// formatting would add ~20 KB of WASM to the staff console for this one column.
pub fn rate(per_second: f64) -> String {
    let tenths = (per_second.max(0.0) * 10.0).round() as u64;
    format!("{}.{}", points(tenths / 10), tenths % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_get_thousands_separators() {
        assert_eq!(points(0), "0");
        assert_eq!(points(999), "999");
        assert_eq!(points(1_000), "1,000");
        assert_eq!(points(1_234_567), "1,234,567");
    }

    #[test]
    fn rates_have_one_decimal() {
        assert_eq!(rate(0.0), "0.0");
        assert_eq!(rate(12.345), "12.3");
        assert_eq!(rate(12.96), "13.0");
        assert_eq!(rate(1234.5), "1,234.5");
        assert_eq!(rate(-1.0), "0.0");
    }

    #[test]
    fn times_are_shortened_for_people() {
        assert_eq!(when("2026-11-23T10:04:05.123Z"), "2026-11-23 10:04 UTC");
        assert_eq!(month_year("2026-11-23T10:04:05.123Z"), "November 2026");
        assert_eq!(when("garbage"), "garbage");
    }
}
