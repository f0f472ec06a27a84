//! Generated text for the DLP corpus test and benchmark: sensitive values of every kind in the
//! forms people write them, near-misses (wrong checksums, look-alike numbers), and filler that
//! looks like clinical notes and CSV extracts. Deterministic for a given seed.

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::Kind;
use super::checks;

/// One line of text and the kind it must be flagged as (`None`: it must stay clean).
#[derive(Debug, Clone)]
pub struct Labeled {
    pub text: String,
    pub expect: Option<Kind>,
}

const WORDS: &[&str] = &[
    "patient",
    "reviewed",
    "in",
    "clinic",
    "with",
    "the",
    "cohort",
    "mean",
    "age",
    "was",
    "years",
    "and",
    "median",
    "follow-up",
    "of",
    "months",
    "baseline",
    "score",
    "improved",
    "after",
    "treatment",
    "ward",
    "bed",
    "discharged",
    "to",
    "community",
    "team",
    "blood",
    "pressure",
    "stable",
    "no",
    "adverse",
    "events",
    "reported",
    "analysis",
    "table",
    "model",
    "estimate",
    "interval",
    "confidence",
    "regression",
    "outcome",
    "exposure",
    "control",
    "cases",
];

fn filler(rng: &mut StdRng, words: std::ops::Range<usize>) -> String {
    let words = if words.is_empty() { words.start } else { rng.gen_range(words) };
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        match rng.gen_range(0..12) {
            0 => s.push_str(&rng.gen_range(0..1000).to_string()),
            1 => s.push_str(&format!("{}.{}", rng.gen_range(0..100), rng.gen_range(0..100))),
            2 => s.push_str(&format!("{}%", rng.gen_range(0..100))),
            _ => s.push_str(WORDS.choose(rng).copied().unwrap_or("data")),
        }
    }
    s
}

fn digits(rng: &mut StdRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.gen_range(0..10)).collect()
}

fn text(d: &[u8]) -> String {
    d.iter().map(|&x| char::from(b'0' + x)).collect()
}

/// Digits grouped by `sizes` with `sep`.
fn grouped(d: &[u8], sizes: &[usize], sep: &str) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    for &n in sizes {
        out.push(text(&d[i..i + n]));
        i += n;
    }
    out.join(sep)
}

fn nhs(rng: &mut StdRng, valid: bool) -> Vec<u8> {
    loop {
        let mut d = vec![rng.gen_range(4..8)];
        d.extend(digits(rng, 9));
        if checks::nhs_number(&d) == valid {
            return d;
        }
    }
}

/// Full-width digits (U+FF10..U+FF19), as East Asian input methods type them.
fn full_width(d: &[u8]) -> String {
    d.iter().filter_map(|&x| char::from_u32(0xFF10 + u32::from(x))).collect()
}

fn nhs_text(rng: &mut StdRng, valid: bool) -> String {
    let d = nhs(rng, valid);
    match rng.gen_range(0..9) {
        0 => format!("NHS {}", text(&d)),
        1 => format!("NHS no. {}", grouped(&d, &[3, 3, 4], " ")),
        2 => grouped(&d, &[3, 3, 4], "-"),
        3 => format!("NHS no. {}", grouped(&d, &[3, 3, 4], ".")),
        4 => format!("NHS\t{}", grouped(&d, &[3, 3, 4], "\t")),
        5 => format!("NHS number {}", grouped(&d, &[3, 3, 4], "\u{a0}")),
        6 => format!("NHS {}", grouped(&d, &[3, 3, 4], "\u{202f}")),
        7 => format!("NHS {}", full_width(&d)),
        _ => format!("NHS{}", text(&d)),
    }
}

fn ssn_text(rng: &mut StdRng, valid: bool) -> String {
    let d = loop {
        let mut d = digits(rng, 9);
        if !valid {
            match rng.gen_range(0..3) {
                0 => d[..3].copy_from_slice(&[6, 6, 6]),
                1 => d[3..5].copy_from_slice(&[0, 0]),
                _ => d[5..].copy_from_slice(&[0, 0, 0, 0]),
            }
        }
        if checks::ssn(&d) == valid {
            break d;
        }
    };
    format!("SSN {}", grouped(&d, &[3, 2, 4], "-"))
}

fn card_text(rng: &mut StdRng, valid: bool) -> String {
    let prefixes: &[(&[u8], usize)] =
        &[(&[4], 16), (&[5, 3], 16), (&[3, 7], 15), (&[6, 0, 1, 1], 16), (&[3, 5, 3, 0], 16), (&[2, 2, 3, 1], 16)];
    let &(prefix, len) = prefixes.choose(rng).unwrap_or(&(&[4], 16));
    let d = loop {
        let mut d = prefix.to_vec();
        d.extend(digits(rng, len - prefix.len()));
        let fixed = luhn_fix(d.clone());
        let d = if valid { fixed } else { near_miss_card(rng, fixed) };
        if checks::payment_card(&d) == valid {
            break d;
        }
    };
    let layout: Vec<usize> = if d.len() == 15 { vec![4, 6, 5] } else { vec![4, 4, 4, 4] };
    match rng.gen_range(0..3) {
        0 => text(&d),
        1 => grouped(&d, &layout, " "),
        _ => grouped(&d, &layout, "-"),
    }
}

/// Set the last digit so the Luhn check passes.
fn luhn_fix(mut d: Vec<u8>) -> Vec<u8> {
    let last = d.len() - 1;
    for x in 0..10 {
        d[last] = x;
        if checks::luhn(&d) {
            break;
        }
    }
    d
}

/// A card-like number that must not be flagged: wrong Luhn digit, or valid Luhn with an
/// issuer prefix no scheme uses.
fn near_miss_card(rng: &mut StdRng, mut d: Vec<u8>) -> Vec<u8> {
    if rng.gen_bool(0.5) {
        let last = d.len() - 1;
        d[last] = (d[last] + rng.gen_range(1..10)) % 10;
        d
    } else {
        d[0] = 9;
        luhn_fix(d)
    }
}

const NAMES: &[&str] = &["Alice Jones", "Rahul Patel", "Sara Khan", "Tom Brown", "Grace Okafor", "Li Wei"];
const DOMAINS: &[&str] = &["example.org", "nhs.example.uk", "mail.example.com", "uni.example.ac.uk"];

fn email_text(rng: &mut StdRng, valid: bool) -> String {
    let user = ["a.jones", "rpatel7", "mary_o", "t.brown+study", "g.okafor"].choose(rng).copied().unwrap_or("x");
    if valid {
        format!("contact {user}@{}", DOMAINS.choose(rng).copied().unwrap_or("example.org"))
    } else {
        match rng.gen_range(0..4) {
            0 => format!("{user}@localhost"),
            1 => format!("twitter @{user}"),
            2 => format!("{user} at example dot org"),
            _ => format!("{user}@example.c"),
        }
    }
}

fn phone_text(rng: &mut StdRng, valid: bool) -> String {
    let d = digits(rng, 6);
    if valid {
        match rng.gen_range(0..6) {
            0 => format!("07700 {}", text(&d)),
            1 => format!("+44 7700 {}", text(&d)),
            2 => format!("020 7946 {}", text(&d[..4])),
            3 => format!("+44 (0)161 496 {}", text(&d[..4])),
            4 => format!("+1 415 555 {}", text(&d[..4])),
            _ => format!("(01632) {}", text(&d)),
        }
    } else {
        match rng.gen_range(0..4) {
            0 => format!("ext {}", text(&d[..4])),
            1 => "+44 7700".to_owned(),
            2 => format!("room 0{} floor 2", text(&d[..3])),
            _ => format!("code 0{}", text(&d[..5])),
        }
    }
}

fn postcode_text(rng: &mut StdRng, valid: bool) -> String {
    let good = ["SW1A 1AA", "M1 1AE", "B33 8TH", "CR2 6XH", "DN55 1PT", "EH1 2NG", "LS6 3AB", "W1A 0AX"];
    let bad = ["SW1A 1AI", "QW1 1AA", "sw1a 1aa", "B33 8T", "AB123 4CD", "M1 1AEX", "room 5 AB"];
    let pick = if valid { good.choose(rng) } else { bad.choose(rng) };
    format!("lives at {}", pick.copied().unwrap_or(""))
}

fn dob_text(rng: &mut StdRng, valid: bool) -> String {
    let (y, m, d) = (rng.gen_range(1930..2010), rng.gen_range(1..13), rng.gen_range(1..29));
    let name = NAMES.choose(rng).copied().unwrap_or("Tom Brown");
    if valid {
        match rng.gen_range(0..4) {
            0 => format!("DOB: {d:02}/{m:02}/{y}"),
            1 => format!("{name}, {d}.{m}.{y}"),
            2 => format!("date of birth {y}-{m:02}-{d:02}"),
            _ => format!("born {d} March {y}"),
        }
    } else {
        match rng.gen_range(0..4) {
            0 => format!("appointment {d:02}/{m:02}/{}", rng.gen_range(2015..2025)),
            1 => format!("DOB: 31/02/{y}"),
            2 => format!("Admission Date {d:02}/{m:02}/{y}"),
            _ => format!("DOB {d:02}/{m:02}/{}", y % 100),
        }
    }
}

fn item(rng: &mut StdRng, kind: Kind, valid: bool) -> String {
    match kind {
        Kind::NhsNumber => nhs_text(rng, valid),
        Kind::Ssn => ssn_text(rng, valid),
        Kind::PaymentCard => card_text(rng, valid),
        Kind::Email => email_text(rng, valid),
        Kind::Phone => phone_text(rng, valid),
        Kind::UkPostcode => postcode_text(rng, valid),
        Kind::DateOfBirth => dob_text(rng, valid),
    }
}

/// `per_kind` true positives and as many near-misses of every kind, each on its own line in
/// filler text.
pub fn labeled_lines(rng: &mut StdRng, per_kind: usize) -> Vec<Labeled> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for _ in 0..per_kind {
            for valid in [true, false] {
                // Ends and starts with a word: a value next to a stray number is a different
                // number (`522 020 7946 4535` is a valid NHS number as much as a phone number).
                let before = format!("{} {}", filler(rng, 0..8), WORDS.choose(rng).copied().unwrap_or("and"));
                let after = format!("{} {}", WORDS.choose(rng).copied().unwrap_or("and"), filler(rng, 0..8));
                let text = format!("{before} {} {after}", item(rng, kind, valid));
                out.push(Labeled { text, expect: valid.then_some(kind) });
            }
        }
    }
    out.shuffle(rng);
    out
}

/// About `bytes` of mixed text: prose, CSV rows full of numbers and dates, and a sensitive value
/// or a near-miss in one line in ten (a fifth of them real).
pub fn mixed_corpus(rng: &mut StdRng, bytes: usize) -> Vec<u8> {
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        match rng.gen_range(0..10) {
            0..=4 => out.push_str(&filler(rng, 8..20)),
            5..=8 => {
                let (y, m, d) = (rng.gen_range(2015..2025), rng.gen_range(1..13), rng.gen_range(1..29));
                out.push_str(&format!(
                    "{},{},{y}-{m:02}-{d:02},{}.{},{},{}",
                    rng.gen_range(1..100_000),
                    WORDS.choose(rng).copied().unwrap_or("x"),
                    rng.gen_range(0..300),
                    rng.gen_range(0..10),
                    rng.gen_range(0..2),
                    rng.gen_range(10..99)
                ));
            }
            _ => {
                let kind = Kind::ALL.choose(rng).copied().unwrap_or(Kind::NhsNumber);
                let valid = rng.gen_bool(0.2);
                out.push_str(&filler(rng, 4..5));
                out.push(' ');
                out.push_str(&item(rng, kind, valid));
            }
        }
        out.push('\n');
    }
    out.into_bytes()
}
