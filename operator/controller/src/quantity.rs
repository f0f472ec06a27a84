//! Kubernetes resource quantities: syntax check and whole-unit rounding (no full arithmetic).

/// Does `s` parse as a Kubernetes quantity (`500m`, `2`, `4Gi`, `1.5G`, `1e3`)?
pub fn is_valid(s: &str) -> bool {
    let (number, suffix) = split(s);
    let number_ok = !number.is_empty()
        && number.chars().filter(|c| *c == '.').count() <= 1
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok =
        matches!(suffix, "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei")
            || (suffix.starts_with(['e', 'E']) && suffix.len() > 1 && suffix[1..].chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

fn split(s: &str) -> (&str, &str) {
    let at = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    s.split_at(at)
}

/// CPU quantity as whole cores, rounded up (at least 1): `500m` → 1, `2` → 2, `2500m` → 3.
pub fn cpu_cores(s: &str) -> u32 {
    let (number, suffix) = split(s);
    let value: f64 = number.parse().unwrap_or(1.0);
    let cores = if suffix == "m" { value / 1000.0 } else { value };
    (cores.ceil() as u32).max(1)
}

/// A byte quantity (`512Mi`, `20Gi`, `1G`, `1000`), or `None` if it is not one (milli-units
/// or an exponent make no sense for bytes here).
pub fn bytes(s: &str) -> Option<u64> {
    if !is_valid(s) {
        return None;
    }
    let (number, suffix) = split(s);
    let unit: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "P" => 1000u64.pow(5),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    let total = value * unit as f64;
    (total.is_finite() && total < u64::MAX as f64).then_some(total.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_quantities() {
        assert_eq!(bytes("512Mi"), Some(512 << 20));
        assert_eq!(bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(bytes("2G"), Some(2_000_000_000));
        assert_eq!(bytes("100"), Some(100));
        assert_eq!(bytes("500m"), None);
        assert_eq!(bytes("4GB"), None);
    }

    #[test]
    fn syntax() {
        for ok in ["1", "500m", "4Gi", "1.5G", "20Gi", "100", "1e3"] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in ["", "Gi", "4GB", "-1", "1.2.3", "four", "1 Gi"] {
            assert!(!is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn cores_round_up() {
        assert_eq!(cpu_cores("500m"), 1);
        assert_eq!(cpu_cores("2"), 2);
        assert_eq!(cpu_cores("2500m"), 3);
    }
}
