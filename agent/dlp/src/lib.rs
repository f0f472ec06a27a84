//! noexit-dlp: the DLP scanner for files leaving a workspace. The agent runs it on outbox
//! files (advice to the researcher); the airlock runs the same code on what it receives (the
//! check that counts). It knows nothing of Kubernetes or of the agent's config format.
//!
//! Built for throughput: one pass finds the only bytes a built-in detector can start from
//! (ASCII digits and `@`), 64 bytes at a time; each number is read once into a token and
//! checked by validators with checksums (NHS mod-11, Luhn, SSN rules) rather than matched by a
//! large regular expression. Input is streamed in chunks; the scanner keeps a short tail of each
//! chunk so a number or address split across two chunks is still found, exactly once.

mod checks;
mod numbers;
pub mod testdata;
mod text;

use numbers::Token;
use text::is_alnum;

/// What the built-in detectors find.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    NhsNumber,
    Ssn,
    PaymentCard,
    Email,
    Phone,
    UkPostcode,
    DateOfBirth,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Kind::NhsNumber, Kind::Ssn, Kind::PaymentCard, Kind::Email, Kind::Phone, Kind::UkPostcode, Kind::DateOfBirth];

    /// Name used in [`Finding::kind`].
    pub fn name(self) -> &'static str {
        match self {
            Kind::NhsNumber => "nhsNumber",
            Kind::Ssn => "ssn",
            Kind::PaymentCard => "paymentCard",
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::UkPostcode => "ukPostcode",
            Kind::DateOfBirth => "dateOfBirth",
        }
    }
}

/// One pattern found in a scanned file: never the matched value itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// [`Kind::name`] or the name of an extra pattern.
    pub kind: String,
    pub count: u64,
    /// Byte offset, in the original input, of the first occurrence.
    pub first_offset: u64,
}

/// A site-defined pattern: a name for findings and a regular expression (bytes, Rust syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraPattern {
    pub name: String,
    pub regex: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error("extra pattern [{index}] ({name:?}): invalid regular expression: {source}")]
    Pattern { index: usize, name: String, source: Box<regex::Error> },
    #[error("extra pattern [{index}]: name must not be empty")]
    EmptyName { index: usize },
}

/// The compiled detectors: built-ins plus the site's extra patterns.
#[derive(Debug, Clone)]
pub struct Detectors {
    extra: Vec<(String, regex::bytes::Regex)>,
}

impl Detectors {
    /// Built-in detectors plus `extra` patterns (checked: a bad pattern is an error, not ignored).
    pub fn new(extra: &[ExtraPattern]) -> Result<Self, DlpError> {
        let extra = extra
            .iter()
            .enumerate()
            .map(|(index, p)| {
                if p.name.trim().is_empty() {
                    return Err(DlpError::EmptyName { index });
                }
                regex::bytes::RegexBuilder::new(&p.regex)
                    .size_limit(1 << 20)
                    .build()
                    .map(|re| (p.name.clone(), re))
                    .map_err(|e| DlpError::Pattern { index, name: p.name.clone(), source: Box::new(e) })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { extra })
    }

    pub fn builtin() -> Self {
        Self { extra: Vec::new() }
    }

    pub fn scanner(&self) -> Scanner<'_> {
        Scanner {
            detectors: self,
            buf: Vec::with_capacity(CHUNK + LOOKBACK + MARGIN),
            base: 0,
            done: 0,
            next_token: 0,
            hits: vec![Hit::default(); Kind::ALL.len() + self.extra.len()],
            sniff: Sniff::default(),
        }
    }

    /// Scan a whole buffer.
    pub fn scan(&self, data: &[u8]) -> ScanResult {
        let mut s = self.scanner();
        s.feed(data);
        s.finish()
    }
}

/// Bytes kept before the unscanned part: context a detector looks back at (e-mail local part,
/// "DOB" before a date, a name before a date).
const LOOKBACK: usize = 96;
/// Bytes a match may extend past its first anchor; anchors this close to the end of the buffer
/// wait for the next chunk.
const MARGIN: usize = 512;
/// Input is processed once this much is buffered.
const CHUNK: usize = 256 * 1024;

#[derive(Clone, Copy, Default, Debug)]
struct Hit {
    count: u64,
    first: u64,
}

/// Streaming scan of one file.
#[derive(Debug)]
pub struct Scanner<'d> {
    detectors: &'d Detectors,
    buf: Vec<u8>,
    /// Absolute offset of `buf[0]`.
    base: u64,
    /// Anchors before `buf[done]` have been handled.
    done: usize,
    /// Absolute offset up to which digits belong to a token already read.
    next_token: u64,
    hits: Vec<Hit>,
    sniff: Sniff,
}

/// Outcome of scanning one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    pub findings: Vec<Finding>,
    /// Why the content is not plain text, if it is not.
    pub binary: Option<&'static str>,
    pub bytes: u64,
}

impl ScanResult {
    pub fn has(&self, kind: &str) -> bool {
        self.findings.iter().any(|f| f.kind == kind)
    }
}

impl Scanner<'_> {
    pub fn feed(&mut self, data: &[u8]) {
        self.sniff.observe(self.base + self.buf.len() as u64, data);
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.done + CHUNK + MARGIN {
            self.process(self.buf.len() - MARGIN);
            let keep_from = self.done.saturating_sub(LOOKBACK);
            self.buf.drain(..keep_from);
            self.base += keep_from as u64;
            self.done -= keep_from;
        }
    }

    pub fn finish(mut self) -> ScanResult {
        self.process(self.buf.len());
        let names = Kind::ALL.iter().map(|k| k.name()).chain(self.detectors.extra.iter().map(|(n, _)| n.as_str()));
        let findings = names
            .zip(&self.hits)
            .filter(|(_, h)| h.count > 0)
            .map(|(name, h)| Finding { kind: name.to_owned(), count: h.count, first_offset: h.first })
            .collect();
        ScanResult { findings, binary: self.sniff.verdict(), bytes: self.base + self.buf.len() as u64 }
    }

    fn record(&mut self, index: usize, offset: u64) {
        let h = &mut self.hits[index];
        if h.count == 0 {
            h.first = offset;
        }
        h.count += 1;
    }

    /// Handle every anchor in `buf[done..limit]`.
    fn process(&mut self, limit: usize) {
        let mut block_start = self.done;
        while block_start < limit {
            let block_end = (block_start + 64).min(limit);
            let m = ByteMasks::of(&self.buf[block_start..block_end]);
            // A number starts at a digit (or the lead byte of a full-width digit) that does not
            // follow a letter or digit, or at a digit glued to a word such as `NHS`.
            let before = block_start.checked_sub(1).map(|i| self.buf[i]);
            let carry = u64::from(before.is_some_and(is_alnum));
            let carry_letter = u64::from(before.is_some_and(|b| b.is_ascii_alphabetic()));
            let letters = m.alnum & !m.digit;
            let glued = m.digit & ((letters << 1) | carry_letter);
            let mut anchors = ((m.digit | m.wide) & !((m.alnum << 1) | carry)) | m.at | glued;
            while anchors != 0 {
                let bit = anchors.trailing_zeros();
                let p = block_start + bit as usize;
                anchors &= anchors - 1;
                if glued >> bit & 1 == 0 {
                    self.anchor(p, false);
                } else if numbers::glued_prefix(&self.buf, p) {
                    self.anchor(p, true);
                }
            }
            block_start = block_end;
        }
        self.extra_patterns(limit);
        self.done = limit;
    }

    /// Handle one anchor: an `@`, or the first digit of a number (`glued`: right after a
    /// prefix word such as `NHS`).
    fn anchor(&mut self, p: usize, glued: bool) {
        let buf = &self.buf;
        let b = buf[p];
        if b == b'@' {
            if let Some(start) = text::email_at(buf, p) {
                self.record(Kind::Email as usize, self.base + start as u64);
            }
            return;
        }
        if self.base + (p as u64) < self.next_token {
            return;
        }
        let prev = if p > 0 { buf[p - 1] } else { b' ' };
        if (!glued && is_alnum(prev))
            || (!b.is_ascii_digit() && numbers::digit_at(buf, p).is_none())
            // The second of two full-width digits (their last byte is >= 0x80).
            || (prev >= 0x80 && p >= 3 && numbers::digit_at(buf, p - 3).is_some_and(|(_, len)| len == 3))
        {
            return;
        }
        // Fast path for the most common case, a short number standing alone (`47`, `2021,`):
        // none of the numeric detectors applies, only the written-date and postcode forms.
        if let Some(at_end) = short_number_end(buf, p) {
            let (short, end) = short_form(buf, p, at_end);
            self.next_token = self.base + end as u64;
            if let Some((kind, at)) = short {
                self.record(kind as usize, self.base + at as u64);
            }
            return;
        }
        let token = Token::read(buf, p);
        let mut found = [None::<(Kind, usize)>; 4];
        let mut n = 0;
        token.classify(buf, |k, at| {
            if n < found.len() {
                found[n] = Some((k, at));
                n += 1;
            }
        });
        let (short, end) = short_form(buf, token.start, token.end);
        if short.is_some() {
            found[0] = short;
        }
        self.next_token = self.base + end as u64;
        for (kind, at) in found.into_iter().flatten() {
            self.record(kind as usize, self.base + at as u64);
        }
    }

    fn extra_patterns(&mut self, limit: usize) {
        for i in 0..self.detectors.extra.len() {
            let re = &self.detectors.extra[i].1;
            let mut from = self.done;
            let mut hits = Vec::new();
            while from < limit {
                let Some(m) = re.find_at(&self.buf, from) else { break };
                if m.start() >= limit {
                    break;
                }
                hits.push(m.start());
                from = m.end().max(m.start() + 1);
            }
            for start in hits {
                self.record(Kind::ALL.len() + i, self.base + start as u64);
            }
        }
    }
}

/// End of the number starting at `p` if it has fewer than six digits in all (`47`, `12.5`,
/// `3/4`): too short for any numeric detector. Separators and digits as [`numbers::Token`]
/// reads them (Unicode spaces, full-width digits).
#[inline]
fn short_number_end(buf: &[u8], p: usize) -> Option<usize> {
    let sep = |i: usize| numbers::sep_at(buf, i).map(|(_, len)| len);
    let digit = |i: usize| numbers::digit_at(buf, i).is_some();
    let (mut i, mut digits) = (p, 0);
    loop {
        while let Some((_, len)) = numbers::digit_at(buf, i) {
            i += len;
            digits += 1;
        }
        if digits >= 6 {
            return None;
        }
        let Some(first) = sep(i) else { return Some(i) };
        let next = if digit(i + first) {
            i + first
        } else if let Some(second) = sep(i + first)
            && digit(i + first + second)
        {
            i + first + second
        } else {
            return Some(i);
        };
        i = next;
    }
}

/// A one- or two-digit number starting a written date of birth (`12 March 1980`), or the one
/// digit starting a postcode's inward code. Returns the finding and where the token ends.
fn short_form(buf: &[u8], start: usize, end: usize) -> (Option<(Kind, usize)>, usize) {
    if end - start > 2 {
        return (None, end);
    }
    if let Some(date_end) = numbers::written_date_end(buf, start, end) {
        let found = numbers::birth_context(buf, start).then_some((Kind::DateOfBirth, start));
        return (found, date_end);
    }
    if end - start == 1 && text::postcode_at(buf, start) {
        return (Some((Kind::UkPostcode, postcode_start(buf, start))), end);
    }
    (None, end)
}

/// Start of the outward code before the inward code at `p`.
fn postcode_start(buf: &[u8], p: usize) -> usize {
    let mut i = p - 1;
    while i > 0 && is_alnum(buf[i - 1]) {
        i -= 1;
    }
    i
}

/// Per-byte classes of a block of up to 64 bytes, one bit per byte.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ByteMasks {
    digit: u64,
    alnum: u64,
    at: u64,
    /// 0xEF: the lead byte of a full-width digit (among other characters).
    wide: u64,
}

impl ByteMasks {
    #[inline]
    fn of(block: &[u8]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Ok(full) = <&[u8; 64]>::try_from(block) {
            return sse2::masks(full);
        }
        Self::scalar(block)
    }

    fn scalar(block: &[u8]) -> Self {
        let mut m = Self::default();
        for (i, &b) in block.iter().enumerate() {
            m.digit |= u64::from(b.is_ascii_digit()) << i;
            m.alnum |= u64::from(b.is_ascii_alphanumeric()) << i;
            m.at |= u64::from(b == b'@') << i;
            m.wide |= u64::from(b == 0xEF) << i;
        }
        m
    }
}

/// SSE2 is part of every x86_64 CPU, so this needs no runtime detection.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    #[inline]
    pub(super) fn masks(block: &[u8; 64]) -> super::ByteMasks {
        let mut m = super::ByteMasks::default();
        for lane in 0..4 {
            // SAFETY: SSE2 is baseline on x86_64; the load reads 16 bytes inside `block`.
            let (d, a, at, wide) = unsafe {
                let v = _mm_loadu_si128(block.as_ptr().add(lane * 16).cast());
                let in_range = |v: __m128i, lo: i8, span: i8| {
                    let t = _mm_sub_epi8(v, _mm_set1_epi8(lo));
                    _mm_cmpeq_epi8(_mm_min_epu8(t, _mm_set1_epi8(span)), t)
                };
                let digit = in_range(v, b'0' as i8, 9);
                let letter = in_range(_mm_or_si128(v, _mm_set1_epi8(0x20)), b'a' as i8, 25);
                let at = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'@' as i8));
                let wide = _mm_cmpeq_epi8(v, _mm_set1_epi8(0xEFu8 as i8));
                (
                    _mm_movemask_epi8(digit),
                    _mm_movemask_epi8(_mm_or_si128(digit, letter)),
                    _mm_movemask_epi8(at),
                    _mm_movemask_epi8(wide),
                )
            };
            let shift = lane * 16;
            m.digit |= u64::from(d as u16) << shift;
            m.alnum |= u64::from(a as u16) << shift;
            m.at |= u64::from(at as u16) << shift;
            m.wide |= u64::from(wide as u16) << shift;
        }
        m
    }
}

/// Binary detection: a NUL anywhere, a UTF-16 byte-order mark, or many control bytes at the start.
#[derive(Debug, Default)]
struct Sniff {
    nul: bool,
    utf16: bool,
    head_bytes: u32,
    head_control: u32,
}

const SNIFF_HEAD: u64 = 8192;

impl Sniff {
    fn observe(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && (data.starts_with(&[0xff, 0xfe]) || data.starts_with(&[0xfe, 0xff])) {
            self.utf16 = true;
        }
        self.nul |= memchr::memchr(0, data).is_some();
        if offset < SNIFF_HEAD {
            let head = &data[..data.len().min((SNIFF_HEAD - offset) as usize)];
            self.head_bytes += head.len() as u32;
            self.head_control +=
                head.iter().filter(|&&b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0c)) || b == 0x7f).count()
                    as u32;
        }
    }

    fn verdict(&self) -> Option<&'static str> {
        if self.utf16 {
            Some("UTF-16 text: not scanned by the text detectors")
        } else if self.nul {
            Some("binary content (NUL bytes)")
        } else if self.head_control * 10 > self.head_bytes {
            Some("binary content (control bytes)")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<String> {
        Detectors::builtin().scan(s.as_bytes()).findings.into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn one_valid_nhs_number_is_found_with_its_offset() {
        let r = Detectors::builtin().scan(b"Patient seen. NHS number 943 476 5919, follow up.");
        assert_eq!(r.findings, [Finding { kind: "nhsNumber".into(), count: 1, first_offset: 25 }]);
        assert_eq!(r.binary, None);
    }

    #[test]
    fn every_builtin_kind_in_one_document() {
        let doc = "nhs 9434765919\nssn 536-22-1234\ncard 4111 1111 1111 1111\nmail a.b@example.org\n\
                   tel +44 7700 900123\naddr 10 Downing St, SW1A 2AA\nDOB: 12 March 1980\n";
        let mut got = kinds(doc);
        got.sort();
        let mut want: Vec<String> = Kind::ALL.iter().map(|k| k.name().to_owned()).collect();
        want.sort();
        assert_eq!(got, want);
    }

    /// `(kind, first offset)` of every finding.
    fn hits(doc: &[u8]) -> Vec<(String, u64)> {
        Detectors::builtin().scan(doc).findings.into_iter().map(|f| (f.kind, f.first_offset)).collect()
    }

    #[test]
    fn every_kind_reports_the_offset_of_its_first_occurrence_in_the_original_bytes() {
        // Multi-byte text before and between the values: offsets count bytes as written.
        let doc = "Café née Zoë —\n\
                   tel: +44 7700 900123 / 07700 900456\n\
                   card 4111\u{a0}1111\u{a0}1111\u{a0}1111\n\
                   NHS ９４３\u{a0}４７６\u{a0}５９１９ then NHS9434765919\n\
                   ssn 536-22-1234, mail: a.b@example.org, at SW1A 2AA\n\
                   Alice Jones, 12.03.1980; born 3 March 1975\n";
        let b = doc.as_bytes();
        let at = |needle: &str| doc.find(needle).unwrap() as u64;
        let mut want = vec![
            ("nhsNumber".to_owned(), at("９４３")),
            ("ssn".to_owned(), at("536-22")),
            ("paymentCard".to_owned(), at("4111")),
            ("email".to_owned(), at("a.b@")),
            ("phone".to_owned(), at("44 7700")),
            ("ukPostcode".to_owned(), at("SW1A")),
            ("dateOfBirth".to_owned(), at("12.03")),
        ];
        want.sort();
        let mut got = hits(b);
        got.sort();
        assert_eq!(got, want);
        let counts: Vec<u64> = Detectors::builtin().scan(b).findings.iter().map(|f| f.count).collect();
        assert_eq!(counts, [2, 1, 1, 1, 2, 1, 2], "in Kind order");
        // The same offsets however the input is cut into pieces.
        let det = Detectors::builtin();
        for piece in [1, 2, 3, 5, 64] {
            let mut s = det.scanner();
            for c in b.chunks(piece) {
                s.feed(c);
            }
            let mut got: Vec<(String, u64)> =
                s.finish().findings.into_iter().map(|f| (f.kind, f.first_offset)).collect();
            got.sort();
            assert_eq!(got, want, "pieces of {piece}");
        }
    }

    #[test]
    fn normalised_nhs_forms_are_found_by_the_scanner_with_their_offsets() {
        for (doc, offset) in [
            ("ref NHS9434765919.", 7),
            ("ref nhsno9434765919", 9),
            ("x 943.476.5919", 2),
            ("x\t943\t476\t5919", 2),
            ("no: 943\u{a0}476\u{a0}5919", 4),
            ("no: 943\u{202f}476\u{202f}5919", 4),
            ("é ９４３４７６５９１９", 3),
            ("NHS:９４３-４７６-５９１９", 4),
        ] {
            assert_eq!(hits(doc.as_bytes()), [("nhsNumber".to_owned(), offset)], "{doc:?}");
        }
        for doc in
            ["SW1A9434765919", "x9434765919", "NHS9434765918", "９４３４７６５９１８", "ＮＨＳ９４３４７６５９１８"]
        {
            assert_eq!(hits(doc.as_bytes()), [], "{doc:?}");
        }
    }

    #[test]
    fn near_misses_stay_clean() {
        let doc = "ref 9434765918, ssn 666-22-1234, card 4111 1111 1111 1112, user@localhost, \
                   call 0800 12, SW1A 1AI, appointment 12/03/2021, pi 3.14159265358979";
        assert_eq!(kinds(doc), Vec::<String>::new());
    }

    #[test]
    fn matches_split_across_chunks_are_found_once() {
        let det = Detectors::builtin();
        let mut doc = "x ".repeat(CHUNK / 2 - 7).into_bytes();
        doc.extend_from_slice(b"NHS 943 476 5919 and jo@example.com ");
        doc.extend(std::iter::repeat_n(b'y', CHUNK + 1000));
        doc.extend_from_slice(b" 4111111111111111\n");
        for split in [CHUNK - 20, CHUNK - 9, CHUNK - 3, CHUNK, CHUNK + 5, 17] {
            for piece in [1usize, 7, 4096] {
                let mut s = det.scanner();
                let (a, b) = doc.split_at(split);
                s.feed(a);
                for c in b.chunks(piece.max(1) * 1000) {
                    s.feed(c);
                }
                let r = s.finish();
                let count = |k: &str| r.findings.iter().find(|f| f.kind == k).map_or(0, |f| f.count);
                assert_eq!((count("nhsNumber"), count("email"), count("paymentCard")), (1, 1, 1), "split {split}");
                let nhs = r.findings.iter().find(|f| f.kind == "nhsNumber").map(|f| f.first_offset);
                assert_eq!(nhs, Some((CHUNK / 2 - 7) as u64 * 2 + 4));
            }
        }
    }

    #[test]
    fn extra_patterns_are_counted_and_bad_ones_refused() {
        let det = Detectors::new(&[ExtraPattern { name: "mrn".into(), regex: r"MRN-\d{6}".into() }]).unwrap();
        let r = det.scan(b"MRN-123456 and MRN-654321");
        assert_eq!(r.findings, [Finding { kind: "mrn".into(), count: 2, first_offset: 0 }]);
        let err = Detectors::new(&[ExtraPattern { name: "x".into(), regex: "(".into() }]).unwrap_err().to_string();
        assert!(err.starts_with("extra pattern [0] (\"x\")"), "{err}");
        let err = Detectors::new(&[ExtraPattern { name: " ".into(), regex: "x".into() }]).unwrap_err();
        assert!(matches!(err, DlpError::EmptyName { index: 0 }), "{err}");
    }

    #[test]
    fn arbitrary_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let alphabet = b"0123456789 -./()+@:,\nABCDEFGHIJKLMNOPQRSTUVWXYZabcdeforn";
        let det = Detectors::builtin();
        for len in [0usize, 1, 2, 3, 7, 64, 65, 1000, CHUNK + MARGIN + 3] {
            let doc: Vec<u8> = (0..len).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
            let mut s = det.scanner();
            for piece in doc.chunks(rng.gen_range(1..4096)) {
                s.feed(piece);
            }
            assert_eq!(s.finish().bytes, len as u64);
            let noise: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            det.scan(&noise);
        }
    }

    #[test]
    fn vector_and_scalar_byte_classes_agree() {
        let block: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).chain(*b"09@azAZ`{/:").collect();
        for w in block.windows(64) {
            assert_eq!(ByteMasks::of(w), ByteMasks::scalar(w));
        }
        let all: Vec<u8> = (0..=255u8).collect();
        for w in all.chunks(64) {
            assert_eq!(ByteMasks::of(w), ByteMasks::scalar(w));
        }
    }

    #[test]
    fn binary_content_is_recognised() {
        let det = Detectors::builtin();
        assert_eq!(det.scan(b"PK\x03\x04\x00\x00zip").binary, Some("binary content (NUL bytes)"));
        assert!(det.scan(b"\xff\xfeh\x00i\x00").binary.unwrap().starts_with("UTF-16"));
        assert_eq!(det.scan("plain text, café\n".as_bytes()).binary, None);
    }
}
