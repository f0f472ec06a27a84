//! Conditional and partial GETs (RFC 9110 §13, §14): which answer a request gets given the
//! representation's validators and length. Pure, so every rule has a unit test.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE};

/// What identifies one version of a representation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validators {
    /// Strong entity tag, quoted: `"md5-…"`.
    pub etag: String,
    pub last_modified: SystemTime,
}

/// The answer to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    NotModified,
    Full,
    /// Inclusive byte range.
    Partial {
        start: u64,
        end: u64,
    },
    RangeNotSatisfiable,
}

/// HTTP-date (IMF-fixdate) of `t`.
pub fn http_date(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn parse_http_date(s: &str) -> Option<SystemTime> {
    let dt = chrono::DateTime::parse_from_rfc2822(s.trim()).ok()?;
    let secs = u64::try_from(dt.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn whole_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Weak comparison (If-None-Match): `W/"x"` matches `"x"`.
fn etag_list_matches(list: &str, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    list.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

fn header(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Decide the answer for a GET or HEAD of a representation of `len` bytes.
pub fn answer(headers: &HeaderMap, v: &Validators, len: u64) -> Answer {
    if let Some(list) = header(headers, IF_NONE_MATCH) {
        if etag_list_matches(list, &v.etag) {
            return Answer::NotModified;
        }
    } else if let Some(since) = header(headers, IF_MODIFIED_SINCE).and_then(parse_http_date)
        && whole_seconds(v.last_modified) <= whole_seconds(since)
    {
        return Answer::NotModified;
    }
    let Some(range) = header(headers, RANGE) else {
        return Answer::Full;
    };
    if let Some(if_range) = header(headers, IF_RANGE) {
        let still_same = if if_range.trim_start().starts_with('"') {
            // Strong comparison only.
            if_range.trim() == v.etag
        } else {
            parse_http_date(if_range).is_some_and(|d| whole_seconds(d) == whole_seconds(v.last_modified))
        };
        if !still_same {
            return Answer::Full;
        }
    }
    parse_range(range, len)
}

/// One `bytes=` range; anything else (other units, several ranges, bad syntax) is ignored
/// and the whole representation is sent, as RFC 9110 allows.
fn parse_range(value: &str, len: u64) -> Answer {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Answer::Full;
    };
    if spec.contains(',') {
        return Answer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Answer::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.is_empty(), last.is_empty()) {
        // Suffix: the last N bytes.
        (true, false) => match last.parse::<u64>() {
            Ok(0) => return Answer::RangeNotSatisfiable,
            Ok(n) if len == 0 => return if n > 0 { Answer::RangeNotSatisfiable } else { Answer::Full },
            Ok(n) => Some((len.saturating_sub(n), len - 1)),
            Err(_) => None,
        },
        (false, true) => first.parse::<u64>().ok().map(|s| (s, len.saturating_sub(1))),
        (false, false) => match (first.parse::<u64>(), last.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(len.saturating_sub(1)))),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => Answer::Full,
        Some((start, _)) if start >= len => Answer::RangeNotSatisfiable,
        Some((start, end)) => Answer::Partial { start, end },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Validators {
        Validators { etag: "\"md5-abc\"".into(), last_modified: UNIX_EPOCH + Duration::from_secs(1_700_000_000) }
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, val) in pairs {
            m.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), val.parse().unwrap());
        }
        m
    }

    #[test]
    fn ranges() {
        let a = |r: &str| answer(&h(&[("range", r)]), &v(), 1000);
        assert_eq!(a("bytes=0-99"), Answer::Partial { start: 0, end: 99 });
        assert_eq!(a("bytes=900-"), Answer::Partial { start: 900, end: 999 });
        assert_eq!(a("bytes=-100"), Answer::Partial { start: 900, end: 999 });
        assert_eq!(a("bytes=-5000"), Answer::Partial { start: 0, end: 999 });
        assert_eq!(a("bytes=990-5000"), Answer::Partial { start: 990, end: 999 });
        assert_eq!(a("bytes=1000-"), Answer::RangeNotSatisfiable);
        assert_eq!(a("bytes=-0"), Answer::RangeNotSatisfiable);
        assert_eq!(a("bytes=5-1"), Answer::Full);
        assert_eq!(a("bytes=0-1,5-6"), Answer::Full);
        assert_eq!(a("items=0-1"), Answer::Full);
        assert_eq!(a("bytes=x-"), Answer::Full);
        assert_eq!(answer(&HeaderMap::new(), &v(), 1000), Answer::Full);
    }

    #[test]
    fn etags_and_dates() {
        let date = http_date(v().last_modified);
        assert_eq!(date, "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(answer(&h(&[("if-none-match", "\"md5-abc\"")]), &v(), 10), Answer::NotModified);
        assert_eq!(answer(&h(&[("if-none-match", "\"x\", W/\"md5-abc\"")]), &v(), 10), Answer::NotModified);
        assert_eq!(answer(&h(&[("if-none-match", "*")]), &v(), 10), Answer::NotModified);
        assert_eq!(answer(&h(&[("if-none-match", "\"other\"")]), &v(), 10), Answer::Full);
        assert_eq!(answer(&h(&[("if-modified-since", &date)]), &v(), 10), Answer::NotModified);
        assert_eq!(answer(&h(&[("if-modified-since", "Mon, 13 Nov 2023 00:00:00 GMT")]), &v(), 10), Answer::Full);
        // If-None-Match takes precedence over If-Modified-Since.
        assert_eq!(answer(&h(&[("if-none-match", "\"other\""), ("if-modified-since", &date)]), &v(), 10), Answer::Full);
        assert_eq!(answer(&h(&[("if-modified-since", "garbage")]), &v(), 10), Answer::Full);
    }

    #[test]
    fn if_range_only_resumes_the_same_version() {
        let a = |ir: &str| answer(&h(&[("range", "bytes=5-"), ("if-range", ir)]), &v(), 10);
        assert_eq!(a("\"md5-abc\""), Answer::Partial { start: 5, end: 9 });
        assert_eq!(a("\"md5-new\""), Answer::Full);
        assert_eq!(a(&http_date(v().last_modified)), Answer::Partial { start: 5, end: 9 });
        assert_eq!(a("Mon, 13 Nov 2023 00:00:00 GMT"), Answer::Full);
    }
}
