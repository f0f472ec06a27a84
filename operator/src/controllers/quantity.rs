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

#[cfg(test)]
mod tests {
    use super::*;

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
