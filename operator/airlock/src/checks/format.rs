//! What kind of file this is, decided from its name and its first bytes (never by expanding
//! or decoding it): a table we can check, text, an image, or something a person must look at.

/// The kinds of file the checks and the review page tell apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Delimited table: CSV (`,`) or TSV (`\t`).
    Table { delimiter: u8 },
    /// Text that is not a table (a log, a model summary, Markdown...).
    Text,
    /// An image shown to reviewers (PNG, JPEG, GIF); `mime` is its media type.
    Image { mime: &'static str },
    /// SVG: text, but shown only as an image (`<img>`), never inline.
    Svg,
    /// An archive or compressed stream: never expanded (a zip bomb stays a few bytes).
    Archive { what: &'static str },
    /// A program (ELF, Mach-O, Windows PE): refused like an archive, never reviewed.
    Executable { what: &'static str },
    /// Some other binary format (PDF, Office, unknown).
    Binary { what: &'static str },
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::Table { delimiter: b'\t' } => "TSV table",
            Format::Table { .. } => "CSV table",
            Format::Text => "text",
            Format::Image { mime } => mime,
            Format::Svg => "SVG image",
            Format::Archive { what } | Format::Executable { what } | Format::Binary { what } => what,
        }
    }
}

/// Magic numbers of the formats we refuse to parse, first match wins.
const MAGIC: &[(&[u8], Format)] = &[
    (b"\x89PNG\r\n\x1a\n", Format::Image { mime: "image/png" }),
    (b"\xff\xd8\xff", Format::Image { mime: "image/jpeg" }),
    (b"GIF87a", Format::Image { mime: "image/gif" }),
    (b"GIF89a", Format::Image { mime: "image/gif" }),
    (b"PK\x03\x04", Format::Archive { what: "zip archive" }),
    (b"PK\x05\x06", Format::Archive { what: "zip archive (empty)" }),
    (b"PK\x07\x08", Format::Archive { what: "zip archive (spanned)" }),
    (b"\x1f\x8b", Format::Archive { what: "gzip stream" }),
    (b"BZh", Format::Archive { what: "bzip2 stream" }),
    (b"\xfd7zXZ\x00", Format::Archive { what: "xz stream" }),
    (b"7z\xbc\xaf\x27\x1c", Format::Archive { what: "7-zip archive" }),
    (b"\x28\xb5\x2f\xfd", Format::Archive { what: "zstd stream" }),
    (b"Rar!\x1a\x07", Format::Archive { what: "RAR archive" }),
    (b"%PDF-", Format::Binary { what: "PDF document" }),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", Format::Binary { what: "legacy Office document" }),
    (b"SQLite format 3\x00", Format::Binary { what: "SQLite database" }),
    (b"PAR1", Format::Binary { what: "Parquet file" }),
    (b"\x7fELF", Format::Executable { what: "ELF executable" }),
    (b"\xcf\xfa\xed\xfe", Format::Executable { what: "Mach-O executable" }),
    (b"\xce\xfa\xed\xfe", Format::Executable { what: "Mach-O executable" }),
];

/// Decide the format of `bytes` named `file_name`. Content wins over the name: a `.csv`
/// that starts `PK\x03\x04` is a zip archive.
pub fn detect(file_name: &str, bytes: &[u8]) -> Format {
    if let Some((_, f)) = MAGIC.iter().find(|(m, _)| bytes.starts_with(m)) {
        return *f;
    }
    if is_pe(bytes) {
        return Format::Executable { what: "Windows executable" };
    }
    // A tar archive has `ustar` at offset 257.
    if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        return Format::Archive { what: "tar archive" };
    }
    let ext = extension(file_name);
    if ext == "svg" || looks_like_svg(bytes) {
        return Format::Svg;
    }
    match ext.as_str() {
        "csv" => Format::Table { delimiter: b',' },
        "tsv" | "tab" => Format::Table { delimiter: b'\t' },
        _ => Format::Text,
    }
}

/// Lower-case extension of the last path component, or "".
pub fn extension(file_name: &str) -> String {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => String::new(),
    }
}

/// `MZ`, and the `PE\0\0` signature where the DOS header's offset at 0x3c points (so a table
/// whose first cell starts "MZ" is not taken for a program).
fn is_pe(bytes: &[u8]) -> bool {
    if !bytes.starts_with(b"MZ") || bytes.len() < 0x40 {
        return false;
    }
    let at = u32::from_le_bytes([bytes[0x3c], bytes[0x3d], bytes[0x3e], bytes[0x3f]]) as usize;
    bytes.get(at..at.saturating_add(4)) == Some(b"PE\0\0".as_slice())
}

fn looks_like_svg(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(1024)];
    let head = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let start = head.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(head.len());
    let head = &head[start..];
    (head.starts_with(b"<svg") || head.starts_with(b"<?xml")) && memchr_find(head, b"<svg").is_some()
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_wins_over_the_name() {
        assert_eq!(detect("table.csv", b"PK\x03\x04rest"), Format::Archive { what: "zip archive" });
        assert_eq!(detect("plot.png", b"\x89PNG\r\n\x1a\nxx"), Format::Image { mime: "image/png" });
        assert_eq!(detect("x.csv", b"a,b\n1,2\n"), Format::Table { delimiter: b',' });
        assert_eq!(detect("x.TSV", b"a\tb\n"), Format::Table { delimiter: b'\t' });
        assert_eq!(detect("notes.txt", b"<?xml version='1.0'?>\n<svg xmlns='x'/>"), Format::Svg);
        assert_eq!(detect("notes.txt", b"hello"), Format::Text);
        assert_eq!(detect(".csv", b"a,b"), Format::Text, "a dot file has no extension");
    }
}
