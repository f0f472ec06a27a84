//! `PACKAGES.rds`: R's serialisation (format 3, XDR) of the index as a character matrix with
//! column names, gzip-compressed, which is what `available.packages()` in R >= 3.4 downloads
//! first (it falls back to `PACKAGES.gz` only when this file is missing or unreadable).

use std::io::Write;

const STRSXP: u32 = 16;
const INTSXP: u32 = 13;
const VECSXP: u32 = 19;
const LISTSXP: u32 = 2;
const SYMSXP: u32 = 1;
const CHARSXP: u32 = 9;
const NILVALUE: u32 = 254;
const HAS_ATTR: u32 = 1 << 9;
const HAS_TAG: u32 = 1 << 10;
/// CHARSXP encoding bits (`gp` field, shifted by 12): ASCII and UTF-8.
const ASCII: u32 = 64 << 12;
const UTF8: u32 = 8 << 12;

struct Writer(Vec<u8>);

impl Writer {
    fn int(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn charsxp(&mut self, s: Option<&str>) {
        match s {
            // NA_character_
            None => {
                self.int(CHARSXP);
                self.int(u32::MAX);
            }
            Some(s) => {
                self.int(CHARSXP | if s.is_ascii() { ASCII } else { UTF8 });
                self.int(u32::try_from(s.len()).unwrap_or(u32::MAX));
                self.0.extend_from_slice(s.as_bytes());
            }
        }
    }
    fn tag(&mut self, name: &str) {
        self.int(SYMSXP);
        self.charsxp(Some(name));
    }
    fn len(&mut self, n: usize) {
        self.int(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// Serialise a character matrix (`rows` of `columns.len()` cells, `None` = NA) with column
/// names and no row names, uncompressed.
pub fn character_matrix(columns: &[&str], rows: &[Vec<Option<&str>>]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + rows.len() * columns.len() * 16));
    w.0.extend_from_slice(b"X\n");
    w.int(3); // format version
    w.int(0x0004_0202); // written by R 4.2.2 (informational)
    w.int(0x0003_0500); // readable by R >= 3.5.0
    w.int(5);
    w.0.extend_from_slice(b"UTF-8");
    w.int(STRSXP | HAS_ATTR);
    w.len(rows.len() * columns.len());
    // Column-major, as R stores matrices.
    for col in 0..columns.len() {
        for row in rows {
            w.charsxp(row.get(col).copied().flatten());
        }
    }
    // Attributes: a pairlist dim = c(nrow, ncol), dimnames = list(NULL, columns).
    w.int(LISTSXP | HAS_TAG);
    w.tag("dim");
    w.int(INTSXP);
    w.int(2);
    w.len(rows.len());
    w.len(columns.len());
    w.int(LISTSXP | HAS_TAG);
    w.tag("dimnames");
    w.int(VECSXP);
    w.int(2);
    w.int(NILVALUE);
    w.int(STRSXP);
    w.len(columns.len());
    for c in columns {
        w.charsxp(Some(c));
    }
    w.int(NILVALUE);
    w.0
}

/// Gzip `bytes` (what `saveRDS(compress = TRUE)` and `PACKAGES.gz` use).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 4 + 64), flate2::Compression::new(6));
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes `saveRDS(x, compress = FALSE)` wrote in R 4.2.2 for
    /// `read.dcf(...)[, c("Package","Version")]` of two packages a 1.0 and b 2.
    const FROM_R: &str = concat!(
        "580a000000030004020200030500000000055554462d3800000210000000040004000900000001610004000900000001",
        "620004000900000003312e300004000900000001320000040200000001000400090000000364696d0000000d00000002",
        "00000002000000020000040200000001000400090000000864696d6e616d65730000001300000002000000fe00000010",
        "0000000200040009000000075061636b616765000400090000000756657273696f6e000000fe",
    );

    #[test]
    fn matches_what_r_writes() {
        let ours =
            character_matrix(&["Package", "Version"], &[vec![Some("a"), Some("1.0")], vec![Some("b"), Some("2")]]);
        assert_eq!(hex::encode(ours), FROM_R);
    }

    #[test]
    fn na_and_utf8_cells() {
        let ours = character_matrix(&["A"], &[vec![None], vec![Some("é")]]);
        let hex = hex::encode(ours);
        assert!(hex.contains("00000009ffffffff"), "NA_character_");
        assert!(hex.contains("0000800900000002c3a9"), "UTF-8 flagged");
    }
}
