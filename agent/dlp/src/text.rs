//! Byte classes and the detectors that look at letters: e-mail addresses, UK postcodes, and the
//! words around a date that make it a date of birth.

pub(crate) const DIGIT: u8 = 1;
pub(crate) const UPPER: u8 = 2;
pub(crate) const LOWER: u8 = 4;
/// Allowed in the local part of an e-mail address (besides letters and digits).
pub(crate) const LOCAL: u8 = 8;
/// Separators allowed between digit groups of one number: `943 476 5919`, `(020) 7946-0958`.
pub(crate) const SEP: u8 = 16;

const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = if c.is_ascii_digit() {
            DIGIT
        } else if c.is_ascii_uppercase() {
            UPPER
        } else if c.is_ascii_lowercase() {
            LOWER
        } else {
            0
        };
        if matches!(c, b'.' | b'_' | b'%' | b'+' | b'-') {
            t[b] |= LOCAL;
        }
        if matches!(c, b' ' | b'-' | b'.' | b'/' | b'(' | b')') {
            t[b] |= SEP;
        }
        b += 1;
    }
    t
}

pub(crate) static CLASS: [u8; 256] = classes();

#[inline]
pub(crate) fn is(b: u8, class: u8) -> bool {
    CLASS[b as usize] & class != 0
}

#[inline]
pub(crate) fn is_alnum(b: u8) -> bool {
    is(b, DIGIT | UPPER | LOWER)
}

/// Byte at `i`, or a space outside the buffer (so the buffer edges act as word boundaries).
#[inline]
pub(crate) fn at(buf: &[u8], i: usize) -> u8 {
    buf.get(i).copied().unwrap_or(b' ')
}

/// An e-mail address around the `@` at `at_pos`: a local part of up to 64 characters and a
/// domain of at least two labels whose last label (the TLD) is 2–24 letters. Returns where the
/// address starts.
pub(crate) fn email_at(buf: &[u8], at_pos: usize) -> Option<usize> {
    domain_after(buf, at_pos).then_some(())?;
    local_part_start(buf, at_pos)
}

fn local_part_start(buf: &[u8], at_pos: usize) -> Option<usize> {
    let mut start = at_pos;
    while start > 0 && at_pos - start < 64 && (is_alnum(buf[start - 1]) || is(buf[start - 1], LOCAL)) {
        start -= 1;
    }
    let ok = start < at_pos && buf[start] != b'.' && buf[at_pos - 1] != b'.';
    ok.then_some(start)
}

fn domain_after(buf: &[u8], at_pos: usize) -> bool {
    let mut i = at_pos + 1;
    let mut labels = 0;
    let mut last_label_alpha_len = 0;
    loop {
        let label_start = i;
        let mut alpha = true;
        while i < buf.len() && i - at_pos < 128 && (is_alnum(buf[i]) || buf[i] == b'-') {
            alpha &= is(buf[i], UPPER | LOWER);
            i += 1;
        }
        let len = i - label_start;
        if len == 0 || buf[label_start] == b'-' || buf[i - 1] == b'-' {
            return labels >= 2 && (2..=24).contains(&last_label_alpha_len);
        }
        labels += 1;
        last_label_alpha_len = if alpha { len } else { 0 };
        if at(buf, i) == b'.' && i + 1 < buf.len() && is_alnum(buf[i + 1]) {
            i += 1;
        } else {
            return labels >= 2 && (2..=24).contains(&last_label_alpha_len);
        }
    }
}

/// A UK postcode whose inward code starts with the digit at `p` (`SW1A 1AA`: `p` is the `1`
/// after the space). The outward code must sit alone before the space.
pub(crate) fn postcode_at(buf: &[u8], p: usize) -> bool {
    const INWARD_BAD: &[u8] = b"CIKMOV";
    let (l1, l2) = (at(buf, p + 1), at(buf, p + 2));
    let inward_ok = is(l1, UPPER) && is(l2, UPPER) && !INWARD_BAD.contains(&l1) && !INWARD_BAD.contains(&l2);
    if !inward_ok || is_alnum(at(buf, p + 3)) || p < 3 || buf[p - 1] != b' ' {
        return false;
    }
    let end = p - 1;
    let mut start = end;
    while start > 0 && end - start < 5 && is_alnum(buf[start - 1]) {
        start -= 1;
    }
    if start > 0 && is_alnum(buf[start - 1]) {
        return false;
    }
    outward_code(&buf[start..end])
}

/// Outward code forms: A9, A99, A9A, AA9, AA99, AA9A.
fn outward_code(o: &[u8]) -> bool {
    let letter = |b: u8| is(b, UPPER);
    let digit = |b: u8| is(b, DIGIT);
    if o.is_empty() || !letter(o[0]) || b"QVX".contains(&o[0]) {
        return false;
    }
    match o.len() {
        2 => digit(o[1]),
        3 if digit(o[1]) => digit(o[2]) || b"ABCDEFGHJKPSTUW".contains(&o[2]),
        3 => letter(o[1]) && !b"IJZ".contains(&o[1]) && digit(o[2]),
        4 => letter(o[1]) && !b"IJZ".contains(&o[1]) && digit(o[2]) && (digit(o[3]) || b"ABEHMNPRVWXY".contains(&o[3])),
        _ => false,
    }
}

/// Whether one of `keywords` (lower case) appears in the `window` bytes before `pos` on the same
/// line, ignoring case.
pub(crate) fn keyword_before(buf: &[u8], pos: usize, window: usize, keywords: &[&[u8]]) -> bool {
    let from = pos.saturating_sub(window);
    let line_start = memchr::memrchr(b'\n', &buf[from..pos]).map_or(from, |i| from + i + 1);
    let hay = &buf[line_start..pos];
    // This runs for every date: test each byte against the keywords' first letters (a bit set)
    // before comparing whole keywords.
    let firsts = keywords.iter().fold(0u32, |m, k| m | 1 << (k[0].wrapping_sub(b'a') & 31));
    hay.iter().enumerate().any(|(i, &b)| {
        let letter = (b | 0x20).wrapping_sub(b'a');
        letter < 26
            && (firsts >> letter) & 1 == 1
            && keywords.iter().any(|k| hay[i..].len() >= k.len() && hay[i..i + k.len()].eq_ignore_ascii_case(k))
    })
}

/// Words that are capitalised in clinical text but are not names.
const NOT_NAMES: &[&[u8]] = &[
    b"Date",
    b"Visit",
    b"Admitted",
    b"Admission",
    b"Discharged",
    b"Discharge",
    b"Report",
    b"Seen",
    b"Clinic",
    b"Appointment",
    b"Review",
    b"Updated",
    b"Created",
    b"Printed",
    b"Monday",
    b"Tuesday",
    b"Wednesday",
    b"Thursday",
    b"Friday",
    b"Saturday",
    b"Sunday",
    b"The",
    b"On",
    b"Since",
    b"From",
    b"Until",
    b"Due",
    b"Next",
    b"Last",
    b"Start",
    b"End",
    b"Issued",
    b"Expires",
    b"Received",
    b"Sample",
    b"Test",
    b"Result",
    b"Order",
];

/// A personal name directly before `pos` (`John Smith, 12/03/1980`, `Smith John: …`): two
/// capitalised words of 2–20 letters, neither a common clinical heading.
pub(crate) fn name_before(buf: &[u8], pos: usize) -> bool {
    let mut i = pos;
    let mut gap = 0;
    while i > 0 && gap < 3 && matches!(buf[i - 1], b' ' | b',' | b':' | b'\t') {
        i -= 1;
        gap += 1;
    }
    for word_index in 0..2 {
        let end = i;
        while i > 0 && end - i <= 20 && is(buf[i - 1], UPPER | LOWER) {
            i -= 1;
        }
        let word = &buf[i..end];
        let capitalised = word.len() >= 2 && is(word[0], UPPER) && word[1..].iter().all(|&b| is(b, LOWER));
        if !capitalised || NOT_NAMES.contains(&word) || (i > 0 && is_alnum(buf[i - 1])) {
            return false;
        }
        if word_index == 0 {
            let word_start = i;
            while i > 0 && word_start - i < 2 && matches!(buf[i - 1], b' ' | b',') {
                i -= 1;
            }
            if i == word_start {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(s: &str) -> bool {
        let p = s.find('@').unwrap();
        email_at(s.as_bytes(), p).is_some()
    }

    #[test]
    fn emails_found_and_look_alikes_refused() {
        assert!(email("contact jane.doe+ward7@nhs.example.co.uk today"));
        assert!(email("x@y.org."));
        for bad in ["user@localhost", "@mention here", "a@b.c", "a.@b.com", "me@host.123", "me@-bad.com"] {
            assert!(!email(bad), "{bad}");
        }
    }

    fn postcode(s: &str) -> bool {
        let p = s.rfind(' ').unwrap() + 1;
        postcode_at(s.as_bytes(), p)
    }

    #[test]
    fn postcodes_follow_the_royal_mail_format() {
        for ok in ["at SW1A 1AA", "M1 1AE", "lives in B33 8TH.", "CR2 6XH", "DN55 1PT", "W1A 0AX", "EC1A 1BB"] {
            assert!(postcode(ok), "{ok}");
        }
        // invalid inward letters, Q first, lowercase, too long outward, attached to a word
        for bad in ["SW1A 1AI", "QW1 1AA", "sw1a 1aa", "SWW11 1AA", "xSW1A 1AA", "ROOM 5AB", "SW1A 1AAB"] {
            assert!(!postcode(bad), "{bad}");
        }
    }

    #[test]
    fn keywords_count_only_on_the_same_line() {
        let s = b"Patient DOB: 12/03/1980";
        assert!(keyword_before(s, 13, 32, &[b"dob"]));
        let s = b"DOB\n12/03/1980";
        assert!(!keyword_before(s, 4, 32, &[b"dob"]));
    }

    #[test]
    fn names_are_two_capitalised_words_not_headings() {
        assert!(name_before(b"John Smith, 12/03/1980", 12));
        assert!(name_before(b"Smith, John 12/03/1980", 12));
        assert!(!name_before(b"Admission Date 12/03/1980", 15));
        assert!(!name_before(b"john smith 12/03/1980", 11));
        assert!(!name_before(b"ACME LTD 12/03/1980", 9));
    }
}
