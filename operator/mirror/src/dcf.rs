//! Debian Control File, the format of CRAN's `PACKAGES` index: records separated by blank
//! lines, `Field: value` lines, continuation lines starting with whitespace. Values are kept
//! as R's `read.dcf()` returns them (continuation lines trimmed and joined with `\n`), so the
//! index we render and the `PACKAGES.rds` matrix we serialise say the same thing.

/// One record: fields in file order.
pub type Record = Vec<(String, String)>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DcfError {
    #[error("line {line}: continuation line before any field")]
    OrphanContinuation { line: usize },
    #[error("line {line}: expected `Field: value`")]
    NoColon { line: usize },
    #[error("line {line}: empty field name")]
    EmptyField { line: usize },
}

/// Parse DCF text into records. Empty records (several blank lines) are skipped.
pub fn parse(text: &str) -> Result<Vec<Record>, DcfError> {
    let mut records = Vec::new();
    let mut current: Record = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            if !current.is_empty() {
                records.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some((_, value)) = current.last_mut() else {
                return Err(DcfError::OrphanContinuation { line: i + 1 });
            };
            let more = line.trim();
            // read.dcf drops a lone "." continuation's meaning (an empty line); keep it simple.
            if !value.is_empty() {
                value.push('\n');
            }
            value.push_str(more);
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(DcfError::NoColon { line: i + 1 });
        };
        if name.trim().is_empty() {
            return Err(DcfError::EmptyField { line: i + 1 });
        }
        current.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    if !current.is_empty() {
        records.push(current);
    }
    Ok(records)
}

/// Append one record in DCF form (multi-line values indented), followed by a blank line.
pub fn write_record(out: &mut String, record: &Record) {
    for (name, value) in record {
        out.push_str(name);
        out.push(':');
        for (i, line) in value.split('\n').enumerate() {
            out.push_str(if i == 0 { " " } else { "\n    " });
            out.push_str(line);
        }
        out.push('\n');
    }
    out.push('\n');
}

/// Value of `field` in `record`.
pub fn get<'a>(record: &'a Record, field: &str) -> Option<&'a str> {
    record.iter().find(|(n, _)| n == field).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Package: a\nVersion: 1.0\nDepends: R (>= 3.0),\n        foo (>= 1),\n  bar\nMD5sum: abc\n\n\n\
                        Package: b\r\nVersion: 2\n";

    #[test]
    fn parses_like_read_dcf() {
        let recs = parse(TEXT).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(get(&recs[0], "Depends"), Some("R (>= 3.0),\nfoo (>= 1),\nbar"));
        assert_eq!(get(&recs[0], "MD5sum"), Some("abc"));
        assert_eq!(get(&recs[1], "Version"), Some("2"));
        assert_eq!(get(&recs[1], "Depends"), None);
    }

    #[test]
    fn round_trips() {
        let recs = parse(TEXT).unwrap();
        let mut out = String::new();
        for r in &recs {
            write_record(&mut out, r);
        }
        assert_eq!(parse(&out).unwrap(), recs);
        assert!(out.contains("Depends: R (>= 3.0),\n    foo (>= 1),\n    bar\n"));
    }

    #[test]
    fn refuses_garbage_with_line_numbers() {
        assert_eq!(parse("  orphan\n"), Err(DcfError::OrphanContinuation { line: 1 }));
        assert_eq!(parse("Package: a\nno colon here\n"), Err(DcfError::NoColon { line: 2 }));
        assert_eq!(parse(": x\n"), Err(DcfError::EmptyField { line: 1 }));
    }
}
