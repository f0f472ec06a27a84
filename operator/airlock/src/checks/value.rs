//! What one table cell holds, read the way an output checker reads it.

/// The reading of one cell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// Nothing at all (or only spaces).
    Empty,
    /// Already suppressed or marked by the researcher: `*`, `<10`, `NA`, `..`, `c`, `[c]`...
    Marker,
    /// A number. `integer`: no fractional part (`12` and `12.0` are both integers, as pandas
    /// writes counts as `12.0` once a column holds a NaN).
    Number { value: f64, integer: bool },
    /// A percentage (`12.5%`).
    Percent,
    /// Anything else.
    Text,
}

impl Value {
    pub fn is_number(self) -> bool {
        matches!(self, Value::Number { .. })
    }
}

/// Markers statistical offices and ACRO use for a suppressed or unavailable cell (compared
/// case-insensitively, after trimming). `-` is deliberately not one: in many tables it means
/// zero, so it is "unrecognised" and goes to review.
const MARKERS: &[&str] = &[
    "*",
    "**",
    "***",
    "na",
    "n/a",
    "nan",
    "null",
    "none",
    "..",
    "...",
    ".",
    "c",
    "[c]",
    "x",
    "[x]",
    "s",
    "[s]",
    "z",
    "[z]",
    "u",
    "[u]",
    "~",
    "supp",
    "suppressed",
    "redacted",
    "[low]",
    "low",
    "small",
];

pub fn classify(field: &[u8]) -> Value {
    let s = trim(field);
    if s.is_empty() {
        return Value::Empty;
    }
    if s[0].is_ascii_digit()
        && let Some((value, integer)) = parse_number(s)
    {
        return Value::Number { value, integer };
    }
    if let Some(rest) = s.strip_prefix(b"<").or_else(|| s.strip_prefix("≤".as_bytes())) {
        // `<10`, `< 5`, `<=5`: "fewer than" is how small counts are marked.
        let rest = trim(rest.strip_prefix(b"=").unwrap_or(rest));
        if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) {
            return Value::Marker;
        }
    }
    if s.len() <= 12
        && let Ok(t) = std::str::from_utf8(s)
        && MARKERS.iter().any(|m| m.eq_ignore_ascii_case(t))
    {
        return Value::Marker;
    }
    if let Some(num) = s.strip_suffix(b"%") {
        return if parse_number(trim(num)).is_some() { Value::Percent } else { Value::Text };
    }
    match parse_number(s) {
        Some((value, integer)) => Value::Number { value, integer },
        None => Value::Text,
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &s[start..end]
}

/// `[+-]digits[.digits]`, digits optionally grouped by commas in threes (`1,234`), or an
/// exponent form (`1.5e3`). Returns the value and whether it has no fractional part.
fn parse_number(s: &[u8]) -> Option<(f64, bool)> {
    // Fast path, no allocation: a plain non-negative integer (most cells of a count table).
    if !s.is_empty() && s.len() <= 15 && s.iter().all(u8::is_ascii_digit) {
        let n = s.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        return Some((n as f64, true));
    }
    let (sign, body) = match s.first()? {
        b'-' => (-1.0, &s[1..]),
        b'+' => (1.0, &s[1..]),
        _ => (1.0, s),
    };
    let (mantissa, exponent) = match body.iter().position(|&b| b == b'e' || b == b'E') {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = match mantissa.iter().position(|&b| b == b'.') {
        Some(i) => (&mantissa[..i], Some(&mantissa[i + 1..])),
        None => (mantissa, None),
    };
    if int.is_empty() && frac.is_none_or(<[u8]>::is_empty) {
        return None;
    }
    let mut digits = String::with_capacity(mantissa.len() + 8);
    if int.contains(&b',') {
        // Grouped: first group 1-3 digits, then ",ddd" groups.
        let mut groups = int.split(|&b| b == b',');
        let first = groups.next()?;
        if first.is_empty() || first.len() > 3 || !first.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits.push_str(std::str::from_utf8(first).ok()?);
        for g in groups {
            if g.len() != 3 || !g.iter().all(u8::is_ascii_digit) {
                return None;
            }
            digits.push_str(std::str::from_utf8(g).ok()?);
        }
    } else {
        if !int.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits.push_str(std::str::from_utf8(int).ok()?);
    }
    if digits.is_empty() {
        digits.push('0');
    }
    let mut fractional = false;
    if let Some(f) = frac {
        if !f.iter().all(u8::is_ascii_digit) {
            return None;
        }
        fractional = f.iter().any(|&b| b != b'0');
        digits.push('.');
        digits.push_str(std::str::from_utf8(f).ok()?);
        digits.push('0');
    }
    if let Some(e) = exponent {
        let e = e.strip_prefix(b"+").unwrap_or(e);
        let (neg, d) = match e.strip_prefix(b"-") {
            Some(d) => (true, d),
            None => (false, e),
        };
        if d.is_empty() || d.len() > 3 || !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits.push('e');
        if neg {
            digits.push('-');
        }
        digits.push_str(std::str::from_utf8(d).ok()?);
    }
    let value = sign * digits.parse::<f64>().ok()?;
    if !value.is_finite() {
        return None;
    }
    let integer = if exponent.is_some() { value.fract() == 0.0 } else { !fractional };
    Some((value, integer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: f64, integer: bool) -> Value {
        Value::Number { value: v, integer }
    }

    #[test]
    fn numbers_markers_and_text() {
        assert_eq!(classify(b" 12 "), n(12.0, true));
        assert_eq!(classify(b"12.0"), n(12.0, true), "pandas writes counts as 12.0");
        assert_eq!(classify(b"12.5"), n(12.5, false));
        assert_eq!(classify(b"-3"), n(-3.0, true));
        assert_eq!(classify(b"1,234"), n(1234.0, true));
        assert_eq!(classify(b"1,23"), Value::Text, "not a thousands grouping");
        assert_eq!(classify(b"1e3"), n(1000.0, true));
        assert_eq!(classify(b".5"), n(0.5, false));
        assert_eq!(classify(b"0"), n(0.0, true));
        assert_eq!(classify(b"12%"), Value::Percent);
        for m in ["*", "<10", "< 5", "<=5", "NA", "n/a", "..", "c", "[c]", "[x]", "NaN", "≤5"] {
            assert_eq!(classify(m.as_bytes()), Value::Marker, "{m}");
        }
        assert_eq!(classify(b""), Value::Empty);
        assert_eq!(classify(b"   "), Value::Empty);
        for t in ["-", "North", "1-4", "12a", "e5", "+", "1.2.3", "inf", "NaNa"] {
            assert_eq!(classify(t.as_bytes()), Value::Text, "{t}");
        }
    }
}
