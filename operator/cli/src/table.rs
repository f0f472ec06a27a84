//! A CSV/TSV output drawn as a terminal table for a reviewer, with the cells the checks
//! flagged marked `*like this*`. Pure: bytes and cells in, text out.
//!
//! Rows are numbered as the checks number them ([`Cell::row`]: the 1-based file line the row
//! starts on, the header being 1; a quoted field over two lines makes the next row start two
//! lines down), columns from 1; both numbers are drawn in the margins so a reviewer can find a
//! cell the report names. Every cell's text passes through [`term`], so a file cannot
//! drive the reviewer's terminal.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use noexit_airlock::checks::Cell;

use super::escape::term;

/// How much of a table to draw.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rows drawn from the top (flagged rows further down are drawn too, after a gap line).
    pub head_rows: usize,
    /// Widest a column is drawn, in characters (longer text ends with `…`).
    pub max_width: usize,
    /// Most columns drawn.
    pub max_columns: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { head_rows: 25, max_width: 24, max_columns: 12 }
    }
}

/// The delimiter a file name implies: tab for `.tsv`/`.tab`, else comma.
pub fn delimiter_for(file_name: &str) -> u8 {
    let lower = file_name.to_ascii_lowercase();
    if lower.ends_with(".tsv") || lower.ends_with(".tab") { b'\t' } else { b',' }
}

/// Whether the CLI draws this file as a table.
pub fn is_table(file_name: &str) -> bool {
    let lower = file_name.to_ascii_lowercase();
    [".csv", ".tsv", ".tab"].iter().any(|e| lower.ends_with(e))
}

/// One row of a table: the 1-based file line it starts on, and its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub line: usize,
    pub fields: Vec<String>,
}

/// Split delimited text into records (RFC 4180: quoted fields may hold the delimiter, doubled
/// quotes and line breaks; LF, CRLF or CR ends a record), each with the file line it starts on
/// — the numbering the checks use for cells. Invalid UTF-8 is shown replaced.
pub fn parse(bytes: &[u8], delimiter: u8) -> Vec<Record> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let delimiter = delimiter as char;
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    let (mut line, mut start) = (1usize, 1usize);
    while let Some(c) = chars.next() {
        any = true;
        // A line break: CRLF counts once.
        let newline = c == '\n' || (c == '\r' && chars.peek() != Some(&'\n'));
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                c => field.push(c),
            }
            if newline {
                line += 1;
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => in_quotes = true,
            c if c == delimiter => fields.push(std::mem::take(&mut field)),
            '\r' | '\n' if newline => {
                fields.push(std::mem::take(&mut field));
                records.push(Record { line: start, fields: std::mem::take(&mut fields) });
                any = false;
                line += 1;
                start = line;
            }
            '\r' => {}
            c => field.push(c),
        }
    }
    if any {
        fields.push(field);
        records.push(Record { line: start, fields });
    }
    records
}

fn clip(s: &str, width: usize) -> String {
    let shown = term(s);
    if shown.chars().count() <= width {
        return shown.into_owned();
    }
    let mut out: String = shown.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Draw `bytes` as a table with `flagged` cells marked. `flagged` maps each cell (file line,
/// column) to the checks that flagged it; flagged cells not drawn are listed below the table.
pub fn render(bytes: &[u8], delimiter: u8, flagged: &BTreeMap<(usize, usize), Vec<String>>, limits: Limits) -> String {
    let records = parse(bytes, delimiter);
    let by_line: HashMap<usize, usize> = records.iter().enumerate().map(|(i, r)| (r.line, i)).collect();
    let shown: BTreeSet<usize> = (0..records.len().min(limits.head_rows))
        .chain(flagged.keys().filter_map(|(line, _)| by_line.get(line).copied()))
        .collect();
    let columns = records.iter().map(|r| r.fields.len()).max().unwrap_or(0);
    let shown_columns = columns.min(limits.max_columns);

    // Cell texts (marked where flagged), then column widths over the rows drawn.
    let cell_text = |i: usize, col: usize| -> String {
        let r = &records[i];
        let raw = r.fields.get(col - 1).map(String::as_str).unwrap_or("");
        if flagged.contains_key(&(r.line, col)) {
            format!("*{}*", clip(raw, limits.max_width.saturating_sub(2)))
        } else {
            clip(raw, limits.max_width)
        }
    };
    let mut widths: Vec<usize> = (1..=shown_columns).map(|c| c.to_string().len()).collect();
    for &i in &shown {
        for (c, w) in widths.iter_mut().enumerate() {
            *w = (*w).max(cell_text(i, c + 1).chars().count());
        }
    }
    let gutter = records.last().map_or(1, |r| r.line).to_string().len();
    let mut out = String::new();
    // Column numbers.
    out.push_str(&" ".repeat(gutter));
    out.push_str(" |");
    for (c, w) in widths.iter().enumerate() {
        out.push_str(&format!(" {:<w$} |", c + 1, w = w));
    }
    out.push('\n');
    out.push_str(&"-".repeat(gutter + 2 + widths.iter().map(|w| w + 3).sum::<usize>()));
    out.push('\n');
    let mut next = 0;
    for &i in &shown {
        if i > next {
            out.push_str(&format!("{:>gutter$} | … {} rows not shown\n", "", i - next));
        }
        out.push_str(&format!("{:>gutter$} |", records[i].line));
        for (c, w) in widths.iter().enumerate() {
            out.push_str(&format!(" {:<w$} |", cell_text(i, c + 1), w = w));
        }
        out.push('\n');
        next = i + 1;
    }
    if records.len() > next {
        out.push_str(&format!("{:>gutter$} | … {} rows not shown\n", "", records.len() - next));
    }
    if columns > shown_columns {
        out.push_str(&format!("({} more columns not shown)\n", columns - shown_columns));
    }
    for ((line, col), checks) in flagged {
        let inside = by_line.get(line).is_some_and(|&i| *col >= 1 && *col <= records[i].fields.len());
        let at = format!("line {line}, column {col}");
        let why = checks.join(", ");
        if !inside {
            out.push_str(&format!("flagged {at} ({why}) is not a cell of the table\n"));
        } else if *col > shown_columns {
            out.push_str(&format!("flagged {at} ({why}) is beyond the columns drawn\n"));
        }
    }
    out
}

/// The cells of a report's failing or to-review results, each with the checks that named it.
pub fn flagged_cells<'a>(
    results: impl IntoIterator<Item = (&'a str, &'a [Cell])>,
) -> BTreeMap<(usize, usize), Vec<String>> {
    let mut map: BTreeMap<(usize, usize), Vec<String>> = BTreeMap::new();
    for (check, cells) in results {
        for c in cells {
            let checks = map.entry((c.row, c.column)).or_default();
            if !checks.iter().any(|x| x == check) {
                checks.push(check.to_owned());
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(cells: &[(usize, usize, &str)]) -> BTreeMap<(usize, usize), Vec<String>> {
        let mut m: BTreeMap<(usize, usize), Vec<String>> = BTreeMap::new();
        for (r, c, check) in cells {
            m.entry((*r, *c)).or_default().push((*check).to_owned());
        }
        m
    }

    #[test]
    fn parses_quoted_fields_line_ends_and_a_missing_last_newline() {
        let got = parse(b"\xef\xbb\xbfward,\"count, n\"\r\n\"A \"\"x\"\"\",12\n\"multi\nline\",7\rlast,1", b',');
        let rec = |line: usize, f: &[&str]| Record { line, fields: f.iter().map(|s| s.to_string()).collect() };
        assert_eq!(
            got,
            vec![
                rec(1, &["ward", "count, n"]),
                rec(2, &["A \"x\"", "12"]),
                rec(3, &["multi\nline", "7"]),
                // The quoted newline moved the next row down a line.
                rec(5, &["last", "1"]),
            ]
        );
        assert_eq!(parse(b"a\tb\n", b'\t'), vec![rec(1, &["a", "b"])]);
        assert!(parse(b"", b',').is_empty());
    }

    #[test]
    fn rows_are_found_by_the_file_line_they_start_on() {
        let csv = b"label,count\n\"two\nlines\",12\nB,7\n";
        let text = render(csv, b',', &flag(&[(4, 2, "minCellCount")]), Limits::default());
        assert!(text.contains("4 | B            | *7*   |"), "{text}");
        assert!(text.contains("2 | two\\x0alines | 12    |"), "{text}");
        let text = render(csv, b',', &flag(&[(3, 2, "minCellCount")]), Limits::default());
        assert!(text.contains("flagged line 3, column 2 (minCellCount) is not a cell of the table"), "{text}");
    }

    #[test]
    fn a_failing_cell_is_marked_where_the_report_says() {
        let csv = b"ward,sex,count\nA,F,12\nA,M,7\nB,F,0\n";
        let text = render(csv, b',', &flag(&[(3, 3, "minCellCount"), (4, 3, "zeros")]), Limits::default());
        assert_eq!(
            text,
            "  | 1    | 2   | 3     |\n\
             ------------------------\n\
             1 | ward | sex | count |\n\
             2 | A    | F   | 12    |\n\
             3 | A    | M   | *7*   |\n\
             4 | B    | F   | *0*   |\n"
        );
    }

    #[test]
    fn long_tables_show_the_head_and_every_flagged_row() {
        let mut csv = String::from("id,count\n");
        for i in 2..=100 {
            csv.push_str(&format!("r{i},{}\n", if i == 60 { 3 } else { 50 }));
        }
        let limits = Limits { head_rows: 3, ..Limits::default() };
        let text = render(csv.as_bytes(), b',', &flag(&[(60, 2, "minCellCount")]), limits);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "  1 | id  | count |");
        assert_eq!(lines[4], "  3 | r3  | 50    |");
        assert_eq!(lines[5], "    | … 56 rows not shown");
        assert_eq!(lines[6], " 60 | r60 | *3*   |");
        assert_eq!(lines[7], "    | … 40 rows not shown");
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn cells_cannot_drive_the_terminal_and_long_text_is_clipped() {
        let csv = "name,count\n\"\x1b]0;pwned\x07\",\u{202e}12\nabcdefghijklmnopqrstuvwxyz0123456789,15\n";
        let text = render(csv.as_bytes(), b',', &BTreeMap::new(), Limits { max_width: 10, ..Limits::default() });
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        assert!(!text.contains('\u{202e}'), "{text}");
        assert!(text.contains("\\x1b]0;pw…"), "{text}");
        assert!(text.contains("abcdefghi…"), "{text}");
    }

    #[test]
    fn flagged_cells_outside_the_table_are_listed_not_lost() {
        let text = render(b"a,b\n1,2\n", b',', &flag(&[(9, 1, "zeros"), (2, 5, "dominance")]), Limits::default());
        assert!(text.contains("flagged line 2, column 5 (dominance) is not a cell of the table"), "{text}");
        assert!(text.contains("flagged line 9, column 1 (zeros) is not a cell of the table"), "{text}");
        let wide = "a,b,c,d\n1,2,3,4\n";
        let limits = Limits { max_columns: 2, ..Limits::default() };
        let text = render(wide.as_bytes(), b',', &flag(&[(2, 4, "minCellCount")]), limits);
        assert!(text.contains("(2 more columns not shown)"), "{text}");
        assert!(text.contains("flagged line 2, column 4 (minCellCount) is beyond the columns drawn"), "{text}");
    }

    #[test]
    fn the_file_name_picks_the_delimiter() {
        assert_eq!(delimiter_for("t.TSV"), b'\t');
        assert_eq!(delimiter_for("t.csv"), b',');
        assert!(is_table("x.Csv") && is_table("y.tab") && !is_table("plot.png"));
        let cells = [Cell { row: 2, column: 1 }];
        let m = flagged_cells([("minCellCount", &cells[..]), ("zeros", &cells[..]), ("zeros", &cells[..])]);
        assert_eq!(m[&(2, 1)], vec!["minCellCount".to_string(), "zeros".to_string()]);
    }
}
