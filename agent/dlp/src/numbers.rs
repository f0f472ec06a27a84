//! Numbers in text: a run of digit groups joined by short separators (`943 476 5919`,
//! `4111-1111-1111-1111`, `+44 (0)20 7946 0958`, `12/03/1980`) is read once into a [`Token`],
//! then each span of consecutive groups is checked against the numeric detectors.

use super::Kind;
use super::checks;
use super::text::{self, DIGIT, SEP, at, is, is_alnum};

const MAX_DIGITS: usize = 64;
const MAX_GROUPS: usize = 24;
/// The separator ` (` packed as in [`Token::seps`].
const OPEN_PAREN: u16 = b' ' as u16 | (b'(' as u16) << 8;

/// One run of digit groups. Digits are ASCII or full-width (`９`); separators are normalised
/// (tab and the Unicode spaces to ` `, Unicode hyphens to `-`) and stored as up to two bytes
/// packed into a `u16`. Positions are byte offsets into the original buffer, so findings point
/// at the text as written.
pub(crate) struct Token {
    pub start: usize,
    pub end: usize,
    digits: [u8; MAX_DIGITS],
    n: usize,
    /// Digit count of each group (saturating).
    groups: [u8; MAX_GROUPS],
    /// Byte offset where each group starts.
    group_pos: [usize; MAX_GROUPS],
    ng: usize,
    /// `seps[i]` joins group `i` and `i + 1`.
    seps: [u16; MAX_GROUPS],
    /// Immediately preceded by `+` / `(`.
    plus: bool,
    paren: bool,
    /// More digits or groups than any detector wants; never matches.
    overflow: bool,
}

/// The digit at `i` (ASCII, or full-width U+FF10..U+FF19) as its value and byte length.
#[inline(always)]
pub(crate) fn digit_at(buf: &[u8], i: usize) -> Option<(u8, usize)> {
    let b = *buf.get(i)?;
    if b.is_ascii_digit() {
        return Some((b - b'0', 1));
    }
    if b != 0xEF {
        return None;
    }
    match buf.get(i + 1..i + 3)? {
        [0xBC, c @ 0x90..=0x99] => Some((c - 0x90, 3)),
        _ => None,
    }
}

/// One separator unit at `i`, normalised to an ASCII separator, with its byte length: the ASCII
/// separators, tab, no-break / figure / thin / narrow no-break / ideographic spaces, and the
/// Unicode and full-width hyphens.
#[inline(always)]
pub(crate) fn sep_at(buf: &[u8], i: usize) -> Option<(u8, usize)> {
    let b = *buf.get(i)?;
    if is(b, SEP) {
        return Some((b, 1));
    }
    match b {
        b'\t' => Some((b' ', 1)),
        0xC2 if buf.get(i + 1) == Some(&0xA0) => Some((b' ', 2)),
        0xE2 => match buf.get(i + 1..i + 3)? {
            [0x80, 0x87 | 0x89 | 0xAF] => Some((b' ', 3)),
            [0x80, 0x90 | 0x91] => Some((b'-', 3)),
            _ => None,
        },
        0xE3 if buf.get(i + 1..i + 3)? == [0x80, 0x80] => Some((b' ', 3)),
        0xEF if buf.get(i + 1..i + 3)? == [0xBC, 0x8D] => Some((b'-', 3)),
        _ => None,
    }
}

/// Words that may be glued to a number and still name it (`NHS9434765919`).
const GLUED_PREFIXES: [&[u8]; 5] = [b"nhs", b"nhsno", b"nhsnum", b"nhsnumber", b"ssn"];

/// The digit at `p` follows letters that are one of [`GLUED_PREFIXES`] standing as a word.
pub(crate) fn glued_prefix(buf: &[u8], p: usize) -> bool {
    let mut i = p;
    while i > 0 && p - i < 10 && is(buf[i - 1], text::UPPER | text::LOWER) {
        i -= 1;
    }
    if i > 0 && is_alnum(buf[i - 1]) {
        return false;
    }
    let word = &buf[i..p];
    GLUED_PREFIXES.iter().any(|k| word.eq_ignore_ascii_case(k))
}

impl Token {
    /// Read the token starting at the digit `p` (which must not follow a letter or digit,
    /// unless a [`glued_prefix`]).
    pub fn read(buf: &[u8], p: usize) -> Token {
        let mut t = Token {
            start: p,
            end: p,
            digits: [0; MAX_DIGITS],
            n: 0,
            groups: [0; MAX_GROUPS],
            group_pos: [0; MAX_GROUPS],
            ng: 0,
            seps: [0; MAX_GROUPS],
            plus: p > 0 && buf[p - 1] == b'+',
            paren: p > 0 && buf[p - 1] == b'(',
            overflow: false,
        };
        let mut i = p;
        let mut sep_start = p;
        loop {
            let group_start = i;
            let mut run = 0;
            let mut j = i;
            while let Some((d, len)) = digit_at(buf, j) {
                if let Some(slot) = t.digits.get_mut(t.n + run) {
                    *slot = d;
                }
                run += 1;
                j += len;
            }
            if t.n + run > MAX_DIGITS {
                if t.ng == 0 {
                    // One run longer than any number we look for (a hash, a long id): skip it.
                    t.overflow = true;
                    t.end = j;
                } else {
                    // The group is read again as the start of the next token.
                    t.end = sep_start;
                }
                return t;
            }
            t.n += run;
            i = j;
            t.groups[t.ng] = u8::try_from(run).unwrap_or(u8::MAX);
            t.group_pos[t.ng] = group_start;
            t.ng += 1;
            sep_start = i;
            let mut sep = [0u8; 2];
            let mut units = 0;
            while units < 2
                && let Some((c, len)) = sep_at(buf, i)
            {
                sep[units] = c;
                units += 1;
                i += len;
            }
            let joined = units > 0 && digit_at(buf, i).is_some();
            if !joined || t.ng == MAX_GROUPS {
                // Not followed by another group; or a long list of small numbers, whose rest
                // is read as a new token.
                t.end = sep_start;
                break;
            }
            t.seps[t.ng - 1] = u16::from(sep[0]) | (u16::from(sep[1]) << 8);
        }
        t
    }

    /// Report each span of groups that is a sensitive number, preferring the longest span from
    /// the left. Returns `(kind, byte offset of the span)` through `hit`.
    pub fn classify(&self, buf: &[u8], mut hit: impl FnMut(Kind, usize)) {
        // Most numbers in text are short; no numeric detector wants fewer than six digits.
        if self.overflow || self.n < 6 {
            return;
        }
        let mut digit_offsets = [0usize; MAX_GROUPS + 1];
        for g in 0..self.ng {
            digit_offsets[g + 1] = digit_offsets[g] + usize::from(self.groups[g]);
        }
        // Inside a token a span may only start or end at a plain space: `790 59 2231-4211-…` is
        // not an SSN followed by a card.
        let space_before = |g: usize| g == 0 || self.seps[g - 1] == u16::from(b' ') || self.seps[g - 1] == OPEN_PAREN;
        let space_after = |h: usize| h + 1 == self.ng || self.seps[h] == u16::from(b' ');
        let mut g = 0;
        while g < self.ng {
            let found = (g..self.ng).rev().filter(|&h| space_before(g) && space_after(h)).find_map(|h| {
                let span = Span {
                    token: self,
                    first: g,
                    last: h,
                    digits: &self.digits[digit_offsets[g]..digit_offsets[h + 1]],
                    start: self.group_pos[g],
                };
                span.kind(buf).map(|k| (k, h))
            });
            match found {
                Some((kind, h)) => {
                    hit(kind, self.group_pos[g]);
                    g = h + 1;
                }
                None => g += 1,
            }
        }
    }
}

/// Groups `first..=last` of a token.
struct Span<'a> {
    token: &'a Token,
    first: usize,
    last: usize,
    digits: &'a [u8],
    start: usize,
}

impl Span<'_> {
    fn kind(&self, buf: &[u8]) -> Option<Kind> {
        let n = self.digits.len();
        if !(6..=19).contains(&n) {
            return None;
        }
        let ends_word = self.last + 1 < self.token.ng || !is_alnum(at(buf, self.token.end));
        if !ends_word {
            return None;
        }
        if (13..=19).contains(&n) && self.card_layout() && checks::payment_card(self.digits) {
            return Some(Kind::PaymentCard);
        }
        if n == 10 && self.nhs_layout() && checks::nhs_number(self.digits) {
            return Some(Kind::NhsNumber);
        }
        if n == 9 && self.ssn_layout(buf) && checks::ssn(self.digits) {
            return Some(Kind::Ssn);
        }
        // Phone numbers take many layouts, so inside a longer token only a UK national number
        // (`… 020 7946 0958`) counts.
        if (self.first == 0 || (self.digits[0] == 0 && self.digits[1] != 0)) && self.phone() {
            return Some(Kind::Phone);
        }
        if self.date_of_birth(buf) {
            return Some(Kind::DateOfBirth);
        }
        None
    }

    fn groups(&self) -> &[u8] {
        &self.token.groups[self.first..=self.last]
    }

    /// Separators inside the span.
    fn seps(&self) -> &[u16] {
        &self.token.seps[self.first..self.last]
    }

    fn single_group(&self) -> bool {
        self.first == self.last
    }

    /// All separators are the same single byte, one of `allowed`.
    fn uniform_sep(&self, allowed: &[u8]) -> bool {
        let seps = self.seps();
        seps.iter().all(|&s| s == seps[0] && s <= 0xff && allowed.contains(&(s as u8)))
    }

    fn leading_plus(&self) -> bool {
        self.first == 0 && self.token.plus
    }

    fn leading_paren(&self) -> bool {
        if self.first == 0 { self.token.paren } else { self.token.seps[self.first - 1] == OPEN_PAREN }
    }

    fn card_layout(&self) -> bool {
        if self.single_group() {
            return !self.leading_plus();
        }
        let g = self.groups();
        let fours = g[..g.len() - 1].iter().all(|&x| x == 4) && (1..=4).contains(&g[g.len() - 1]);
        let amex_diners = g.len() == 3 && g[0] == 4 && g[1] == 6 && (4..=5).contains(&g[2]);
        self.uniform_sep(b" -") && (fours || amex_diners)
    }

    fn nhs_layout(&self) -> bool {
        if self.leading_plus() {
            return false;
        }
        self.single_group() || (self.groups() == [3, 3, 4] && self.uniform_sep(b" -."))
    }

    fn ssn_layout(&self, buf: &[u8]) -> bool {
        if self.leading_plus() {
            return false;
        }
        if self.single_group() {
            return text::keyword_before(buf, self.start, 24, &[b"ssn", b"social security", b"ss#"]);
        }
        self.groups() == [3, 2, 4] && self.uniform_sep(b" -")
    }

    fn phone(&self) -> bool {
        let d = self.digits;
        let n = d.len();
        let seps_ok = self
            .seps()
            .iter()
            .all(|&s| matches!(s.to_le_bytes(), [b' ' | b'-' | b'.', 0] | [b')', 0 | b' '] | [b' ', b'('] | [b'(', 0]));
        if !seps_ok {
            return false;
        }
        let grouped = !self.single_group();
        if self.leading_plus() {
            return (9..=15).contains(&n) && d[0] != 0 && (grouped || n >= 10);
        }
        if d[0] == 0 && d[1] == 0 {
            // `00 33 …`, `0044 20 …`: the international prefix, then a country code (never 0).
            let g0 = self.groups()[0];
            return (10..=15).contains(&n) && grouped && (g0 == 2 || g0 == 4) && d[2] != 0;
        }
        if d[0] == 0 && matches!(d[1], 1 | 2 | 3 | 5 | 7 | 8 | 9) && (10..=11).contains(&n) {
            if !grouped {
                return n == 11 && d[1] == 7;
            }
            let g = self.groups();
            return (3..=5).contains(&g[0]) && g[1..].iter().all(|&x| (3..=6).contains(&x));
        }
        // North American numbers only in the unambiguous `(415) 555-2671` form: the bare
        // 3-3-4 layout is also how NHS numbers are written.
        self.leading_paren() && n == 10 && self.groups() == [3, 3, 4] && self.seps()[0] & 0xff == u16::from(b')')
    }

    fn date_of_birth(&self, buf: &[u8]) -> bool {
        if self.groups().len() != 3 || !self.uniform_sep(b"/-.") {
            return false;
        }
        let g = self.groups();
        let d = self.digits;
        let num = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |acc, &x| acc * 10 + u32::from(x));
        let (a, b) = (usize::from(g[0]), usize::from(g[1]));
        let plausible = |y: u32, m: u32, day: u32| (1900..=2100).contains(&y) && checks::valid_date(y, m, day);
        let is_date = match (g[0], g[1], g[2]) {
            (1..=2, 1..=2, 4) => {
                let (x, y, year) = (num(0..a), num(a..a + b), num(a + b..d.len()));
                plausible(year, y, x) || plausible(year, x, y)
            }
            (4, 1..=2, 1..=2) => plausible(num(0..4), num(4..4 + b), num(4 + b..d.len())),
            _ => false,
        };
        is_date && birth_context(buf, self.start)
    }
}

/// A date is a date of birth when the line says so just before it, or a name stands right
/// before it.
pub(crate) fn birth_context(buf: &[u8], start: usize) -> bool {
    text::keyword_before(buf, start, 40, &[b"dob", b"d.o.b", b"birth", b"born"]) || text::name_before(buf, start)
}

const MONTHS: [&[u8]; 12] = [
    b"january",
    b"february",
    b"march",
    b"april",
    b"may",
    b"june",
    b"july",
    b"august",
    b"september",
    b"october",
    b"november",
    b"december",
];

/// `12 March 1980` / `3 Sept 1975` after a one- or two-digit token ending at `end`: returns the
/// end of the year if the date is real.
pub(crate) fn written_date_end(buf: &[u8], day_start: usize, end: usize) -> Option<usize> {
    let day_len = end - day_start;
    if !(1..=2).contains(&day_len) || at(buf, end) != b' ' {
        return None;
    }
    let word_start = end + 1;
    let mut i = word_start;
    while i < buf.len() && i - word_start < 9 && is(buf[i], text::UPPER | text::LOWER) {
        i += 1;
    }
    if i - word_start < 3 || !b"jfmasondJFMASOND".contains(&buf[word_start]) {
        return None;
    }
    let word = &buf[word_start..i];
    let month_index = MONTHS.iter().position(|m| {
        word.eq_ignore_ascii_case(m)
            || word.eq_ignore_ascii_case(&m[..3])
            || word.eq_ignore_ascii_case(b"sept") && m[0] == b's'
    })?;
    let month = u32::try_from(month_index).ok()? + 1;
    if at(buf, i) != b' ' {
        return None;
    }
    let year_start = i + 1;
    let year = buf.get(year_start..year_start + 4)?;
    if !year.iter().all(|&b| is(b, DIGIT)) || is_alnum(at(buf, year_start + 4)) {
        return None;
    }
    let num = |s: &[u8]| s.iter().fold(0u32, |acc, &b| acc * 10 + u32::from(b - b'0'));
    let (day, year) = (num(&buf[day_start..end]), num(year));
    ((1900..=2100).contains(&year) && checks::valid_date(year, month, day)).then_some(year_start + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<Kind> {
        let buf = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < buf.len() {
            // The scanner's anchors: a digit not after a letter or digit, or after a prefix word.
            let start = digit_at(buf, i).is_some()
                && (i == 0 || !is_alnum(buf[i - 1]) || glued_prefix(buf, i))
                && !(i >= 3 && digit_at(buf, i - 3).is_some_and(|(_, len)| len == 3));
            if start {
                let t = Token::read(buf, i);
                t.classify(buf, |k, _| out.push(k));
                i = t.end.max(i + 1);
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn nhs_numbers_in_their_written_forms() {
        for ok in ["NHS 9434765919", "nhs no: 943 476 5919.", "943-476-5919", "age 45 9434765919"] {
            assert_eq!(kinds(ok), [Kind::NhsNumber], "{ok}");
        }
        for bad in ["9434765918", "943 476 5918", "94347659190", "943/476/5919", "x9434765919", "9434765919abc"] {
            assert_eq!(kinds(bad), [], "{bad}");
        }
    }

    #[test]
    fn nhs_numbers_with_unicode_spaces_dots_tabs_full_width_digits_or_a_glued_prefix() {
        for ok in [
            "943.476.5919",
            "943\t476\t5919",
            "943\u{a0}476\u{a0}5919",
            "943\u{202f}476\u{202f}5919",
            "943\u{2009}476\u{2009}5919",
            "943\u{3000}476\u{3000}5919",
            "943\u{2011}476\u{2011}5919",
            "９４３４７６５９１９",
            "９４３ ４７６ ５９１９",
            "NHS ９４３\u{a0}４７６\u{a0}５９１９",
            "NHS9434765919",
            "nhsNo9434765919",
            "NHSnumber943 476 5919",
            "NHS:9434765919",
        ] {
            assert_eq!(kinds(ok), [Kind::NhsNumber], "{ok:?}");
        }
        for bad in [
            "943.476.5918",
            "943\u{a0}476\u{a0}5918",
            "９４３４７６５９１８",
            "NHS9434765918",
            "ABC9434765919",
            "xNHS9434765919",
            "NHS9434765919x",
            "943.476.59.19",
            "943\u{a0}\u{a0}\u{a0}476 5919",
        ] {
            assert_eq!(kinds(bad), [], "{bad:?}");
        }
    }

    #[test]
    fn ssns_dashed_spaced_or_with_context() {
        for ok in ["SSN 536-22-1234", "536 22 1234", "ssn: 536221234", "SSN536221234", "536\t22\t1234"] {
            assert_eq!(kinds(ok), [Kind::Ssn], "{ok}");
        }
        for bad in ["000-22-1234", "666-22-1234", "536-00-1234", "536-22-0000", "536221234", "53-622-1234"] {
            assert_eq!(kinds(bad), [], "{bad}");
        }
    }

    #[test]
    fn cards_with_and_without_separators() {
        for ok in ["4111111111111111", "4111 1111 1111 1111", "5500-0055-5555-5559", "3782 822463 10005"] {
            assert_eq!(kinds(ok), [Kind::PaymentCard], "{ok}");
        }
        for bad in ["4111111111111112", "4111 1111 1111 1112", "9111111111111110", "4111 1111-1111 1111"] {
            assert_eq!(kinds(bad), [], "{bad}");
        }
    }

    #[test]
    fn phones_uk_and_international() {
        for ok in [
            "07700 900123",
            "07700900123",
            "+44 7700 900123",
            "+44 (0)20 7946 0958",
            "020 7946 0958",
            "(020) 7946 0958",
            "0161-496-0000",
            "+1 415 555 2671",
            "(415) 555-2671",
            "+33 1 23 45 67 89",
            "0044 20 7946 0958",
        ] {
            assert_eq!(kinds(ok), [Kind::Phone], "{ok}");
        }
        for bad in ["+44 7700", "0800 12", "02079460958123", "415-555-2670", "1234 567890", "0400 7946 0958"] {
            assert_eq!(kinds(bad), [], "{bad}");
        }
    }

    #[test]
    fn dates_of_birth_need_context() {
        for ok in ["DOB: 12/03/1980", "date of birth 1980-03-12", "John Smith, 12.03.1980", "born 3/4/1975"] {
            assert_eq!(kinds(ok), [Kind::DateOfBirth], "{ok}");
        }
        for bad in ["Appointment 12/03/2021", "DOB: 31/02/1980", "DOB 12/03/80", "Admission Date 12/03/1980"] {
            assert_eq!(kinds(bad), [], "{bad}");
        }
    }

    #[test]
    fn dates_of_birth_exist_on_the_calendar() {
        for ok in [
            "DOB: 30/04/1980",
            "DOB: 30/06/1980",
            "DOB: 30/09/1980",
            "DOB: 30/11/1980",
            "DOB: 31/12/1980",
            "DOB: 29/02/2000",
            "DOB: 29/02/1996",
            "DOB: 28/02/1900",
            "DOB 1996-02-29",
            "DOB: 02/29/1996",
        ] {
            assert_eq!(kinds(ok), [Kind::DateOfBirth], "{ok}");
        }
        for bad in [
            "DOB: 31/04/1980",
            "DOB: 31/06/1980",
            "DOB: 31/09/1980",
            "DOB: 31/11/1980",
            "DOB: 32/12/1980",
            "DOB: 29/02/1900",
            "DOB: 29/02/1999",
            "DOB: 30/02/2000",
            "DOB 1999-02-29",
            "DOB: 12/03/1899",
            "DOB: 12/03/2101",
        ] {
            assert_eq!(kinds(bad), [], "{bad}");
        }
    }

    #[test]
    fn written_dates() {
        let s = b"DOB 12 March 1980 ok";
        assert_eq!(written_date_end(s, 4, 6), Some(17));
        assert_eq!(written_date_end(b"31 Feb 1980", 0, 2), None);
        assert_eq!(written_date_end(b"29 Feb 2000", 0, 2), Some(11));
        assert_eq!(written_date_end(b"29 February 1900", 0, 2), None);
        assert_eq!(written_date_end(b"30 April 1980", 0, 2), Some(13));
        assert_eq!(written_date_end(b"31 April 1980", 0, 2), None);
        assert_eq!(written_date_end(b"31 Sept 1980", 0, 2), None);
        assert_eq!(written_date_end(b"30 Sept 1980", 0, 2), Some(12));
        assert_eq!(written_date_end(b"12 Marchx 1980", 0, 2), None);
        assert_eq!(written_date_end(b"12 apples 1980", 0, 2), None);
    }

    #[test]
    fn two_numbers_in_one_run_are_both_seen() {
        assert_eq!(kinds("DOB 12/03/1980 9434765919"), [Kind::DateOfBirth, Kind::NhsNumber]);
    }
}
