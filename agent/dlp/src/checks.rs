//! Checksum and numbering-plan rules. Each takes the digits of a candidate as values 0..=9.

/// NHS number: ten digits, the last a modulus-11 check digit over the first nine (weights 10..2).
/// A remainder giving check value 10 is never issued. Repeated digits (`0000000000`) are test
/// values, not numbers.
pub fn nhs_number(d: &[u8]) -> bool {
    if d.len() != 10 || all_same(d) {
        return false;
    }
    let sum: u32 = d[..9].iter().zip((2..=10).rev()).map(|(&x, w)| u32::from(x) * w).sum();
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return false,
        c => c,
    };
    check == u32::from(d[9])
}

/// US Social Security number: area not 000, 666 or 900–999; group not 00; serial not 0000; and
/// not one of the numbers famous for being printed on sample cards.
pub fn ssn(d: &[u8]) -> bool {
    if d.len() != 9 {
        return false;
    }
    let area = number(&d[..3]);
    let group = number(&d[3..5]);
    let serial = number(&d[5..]);
    let famous = [78_051_120, 219_099_999, 123_456_789];
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0 && !famous.contains(&number(d))
}

/// Luhn (mod 10) check used by payment cards.
pub fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 { if x * 2 > 9 { x * 2 - 9 } else { x * 2 } } else { x }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Payment card: 13–19 digits, a known issuer prefix for that length, and a valid Luhn digit.
pub fn payment_card(d: &[u8]) -> bool {
    (13..=19).contains(&d.len()) && !all_same(d) && known_issuer(d) && luhn(d)
}

/// Issuer identification number ranges of the card schemes in wide use, with their lengths.
fn known_issuer(d: &[u8]) -> bool {
    let n = d.len();
    let p2 = number(&d[..2]);
    let p3 = number(&d[..3]);
    let p4 = number(&d[..4]);
    match d[0] {
        4 => matches!(n, 13 | 16 | 19),                                      // Visa
        2 => (2221..=2720).contains(&p4) && n == 16,                         // Mastercard 2-series
        5 => ((51..=55).contains(&p2) && n == 16) || (p2 == 50 || p2 >= 56), // Mastercard, Maestro
        3 => {
            ((p2 == 34 || p2 == 37) && n == 15)                                    // Amex
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&n))         // JCB
                || (((300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39) && (14..=19).contains(&n)) // Diners
        }
        6 => {
            // Discover, UnionPay, Maestro 6x
            ((p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 || p2 == 62) && (16..=19).contains(&n)) || p2 >= 60
        }
        _ => false,
    }
}

fn all_same(d: &[u8]) -> bool {
    d.iter().all(|&x| x == d[0])
}

fn number(d: &[u8]) -> u64 {
    d.iter().fold(0, |acc, &x| acc * 10 + u64::from(x))
}

/// Calendar date check (proleptic Gregorian).
pub fn valid_date(year: u32, month: u32, day: u32) -> bool {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

#[cfg(test)]
pub(crate) fn digits(s: &str) -> Vec<u8> {
    s.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhs_numbers_pass_mod_11_and_near_misses_fail() {
        for ok in ["9434765919", "4010232137", "9990001235"] {
            assert!(nhs_number(&digits(ok)), "{ok}");
        }
        // wrong check digit, check value 10 (never issued), repdigit, wrong length
        for bad in ["9434765918", "9434765910", "0000000000", "943476591", "94347659190"] {
            assert!(!nhs_number(&digits(bad)), "{bad}");
        }
    }

    #[test]
    fn ssn_rules_reject_unissued_areas_groups_and_serials() {
        assert!(ssn(&digits("536-22-1234")));
        assert!(ssn(&digits("001-01-0001")));
        for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "536-00-1234", "536-22-0000", "078-05-1120"] {
            assert!(!ssn(&digits(bad)), "{bad}");
        }
    }

    #[test]
    fn cards_need_luhn_and_a_known_issuer() {
        for ok in ["4111111111111111", "5500005555555559", "378282246310005", "6011111111111117", "3530111333300000"] {
            assert!(payment_card(&digits(ok)), "{ok}");
        }
        assert!(payment_card(&digits("2223000048400011")));
        // Luhn fails; unknown issuer with valid Luhn; Amex prefix with wrong length; repdigit
        for bad in ["4111111111111112", "9111111111111110", "3782822463100050", "3400000000000000"] {
            assert!(!payment_card(&digits(bad)), "{bad}");
        }
    }

    #[test]
    fn luhn_matches_the_textbook_example() {
        assert!(luhn(&digits("79927398713")));
        assert!(!luhn(&digits("79927398710")));
    }

    #[test]
    fn dates_know_month_lengths_and_leap_years() {
        assert!(valid_date(2000, 2, 29));
        assert!(!valid_date(1900, 2, 29));
        assert!(!valid_date(1980, 4, 31));
        assert!(!valid_date(1980, 13, 1));
        assert!(!valid_date(1980, 1, 0));
    }
}
