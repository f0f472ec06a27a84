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
        // Discover (6011, 644–649, 65), UnionPay (62) and Maestro (56–69, any length) together
        // take every 6x prefix at every length from 13 to 19.
        6 => true,
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

    /// `prefix` padded with zeros to `len` digits, with a valid Luhn check digit.
    fn card(prefix: &str, len: usize) -> Vec<u8> {
        let mut d = digits(prefix);
        d.resize(len, 0);
        for x in 0..10 {
            d[len - 1] = x;
            if luhn(&d) {
                return d;
            }
        }
        unreachable!()
    }

    #[test]
    fn issuer_ranges_and_lengths_at_their_edges() {
        let cases: &[(&str, &[usize], bool)] = &[
            // Visa: 13, 16 or 19 digits only
            ("4", &[13, 16, 19], true),
            ("4", &[14, 15, 17, 18], false),
            // Mastercard 2-series 2221–2720, 16 digits
            ("2221", &[16], true),
            ("2720", &[16], true),
            ("2220", &[16], false),
            ("2721", &[16], false),
            ("2221", &[15, 17], false),
            // Mastercard 51–55, 16 digits; Maestro 50 and 56–59 at any length
            ("51", &[16], true),
            ("55", &[16], true),
            ("51", &[13, 15, 17, 19], false),
            ("55", &[15], false),
            ("50", &[13, 16, 19], true),
            ("56", &[13, 19], true),
            ("59", &[13], true),
            // Amex 34/37, 15 digits
            ("34", &[15], true),
            ("37", &[15], true),
            ("35", &[15], false),
            ("33", &[15], false),
            ("34", &[14, 16], false),
            // JCB 3528–3589, 16–19 digits
            ("3528", &[16, 19], true),
            ("3589", &[16], true),
            ("3527", &[16], false),
            ("3590", &[16], false),
            ("3528", &[15], false),
            // Diners 300–305, 36, 38, 39: 14–19 digits
            ("300", &[14, 19], true),
            ("305", &[14], true),
            ("306", &[14], false),
            ("36", &[14], true),
            ("38", &[14], true),
            ("39", &[14], true),
            ("37", &[14], false),
            ("300", &[13], false),
            // 6x: Discover, UnionPay, Maestro
            ("6011", &[16], true),
            ("62", &[16, 19], true),
            ("60", &[13], true),
            // No scheme starts with 0, 1, 7, 8 or 9.
            ("0", &[16], false),
            ("1", &[16], false),
            ("7", &[16], false),
            ("8", &[16], false),
            ("9", &[16], false),
        ];
        for (prefix, lengths, want) in cases {
            for &len in *lengths {
                let d = card(prefix, len);
                assert_eq!(payment_card(&d), *want, "{prefix}… with {len} digits");
            }
        }
        // Length bounds of the whole check.
        assert!(!payment_card(&card("4", 12)));
        assert!(!payment_card(&card("62", 20)));
    }

    #[test]
    fn luhn_matches_the_textbook_example() {
        assert!(luhn(&digits("79927398713")));
        assert!(!luhn(&digits("79927398710")));
    }

    #[test]
    fn dates_know_month_lengths_and_leap_years() {
        // The last day of every month, and the day after it.
        let lengths = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        for (m, &days) in (1..=12).zip(&lengths) {
            assert!(valid_date(1981, m, days), "{m}/{days}");
            assert!(!valid_date(1981, m, days + 1), "{m}/{}", days + 1);
            assert!(valid_date(1981, m, 1));
            assert!(!valid_date(1981, m, 0));
        }
        // February 29th: every 4th year, not every 100th, but every 400th.
        for leap in [1904, 1980, 1996, 2000, 2024, 2400] {
            assert!(valid_date(leap, 2, 29), "{leap}");
            assert!(!valid_date(leap, 2, 30), "{leap}");
        }
        for common in [1900, 1981, 2023, 2100, 2200] {
            assert!(!valid_date(common, 2, 29), "{common}");
            assert!(valid_date(common, 2, 28), "{common}");
        }
        assert!(!valid_date(1980, 13, 1));
        assert!(!valid_date(1980, 0, 1));
    }
}
