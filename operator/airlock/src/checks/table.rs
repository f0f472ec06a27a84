//! Statistical disclosure control on a CSV/TSV table, in two streaming passes over the bytes:
//! the first reads a sample to find the header and what each column holds (labels, counts,
//! magnitudes, percentages); the second checks every cell. Memory stays bounded by the sample,
//! the per-column running sums and the capped lists of cells; the table is never held whole.
//!
//! Rules, with ACRO's defaults (`acro/default.yaml`):
//! - minimum cell count: a count `n` with `0 < n < minCellCount` fails (ACRO `threshold`);
//! - zeros: a count of `0` fails when zeros are disclosive (ACRO `zeros_are_disclosive`);
//! - cells already suppressed or marked (empty, `*`, `<10`, `NA`, `..`, `c`, `[c]`...) are not
//!   failures; they are counted and listed under `suppressed`;
//! - totals rows and columns (`Total`, `All`, `Overall`...) are checked like any cell, as ACRO
//!   does for its margins; in addition a total that differs from the sum of the cells it adds
//!   up must not give away a suppressed or hidden cell (`totals`);
//! - a negative, decimal, percentage or unrecognised value in a count column means this is not
//!   a plain count table: review (ACRO: negative values → review);
//! - magnitude columns (sums, means, amounts) need the contributions behind each cell for
//!   dominance (N-K) and p-ratio; without them: review.

use std::collections::{HashMap, HashSet};

use csv::{ByteRecord, ReaderBuilder};

use super::value::{Value, classify};
use super::{Cell, CheckResult, OutputMetadata, Policy, Verdict};

/// Cells listed per check; the message gives the full count.
pub const MAX_LISTED_CELLS: usize = 1000;
/// Records read to decide the header and the column kinds.
const SAMPLE_RECORDS: usize = 1000;
/// Leading records without any number that can be a (multi-line) header or title.
const MAX_HEADER_RECORDS: usize = 5;

/// What a column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    /// Category labels (text, or numbers such as years or a row index).
    Label,
    /// Frequencies: non-negative integers.
    Count,
    /// Sums, means, amounts: need contributions for dominance checks.
    Magnitude,
    /// Percentages: derived from counts not shown.
    Percent,
    /// Nothing but empty or suppressed cells in the sample.
    Empty,
}

/// The table's shape as the checks understood it; the review page uses it too.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub delimiter: u8,
    /// Leading records that are header (0 for a header-less table).
    pub header_records: usize,
    pub columns: Vec<ColumnKind>,
    /// Fields a row should have: the header's, or the commonest in a header-less sample.
    pub fields: usize,
    /// Columns whose header names a total (0-based).
    pub total_columns: Vec<usize>,
}

/// Parser for `bytes` (a UTF-8 BOM is skipped; CRLF and quoted fields are the csv crate's).
pub fn reader(bytes: &[u8], delimiter: u8) -> csv::Reader<&[u8]> {
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    ReaderBuilder::new().has_headers(false).flexible(true).delimiter(delimiter).from_reader(body)
}

/// Line numbers of records as an editor shows them. The csv crate's own `Position::line` is
/// off for CRLF and CR-only files, so lines are counted here from the record's byte offset
/// (`\n`, `\r\n` and a lone `\r` each end a line). Records come in order, so the count is
/// incremental: one pass over the bytes in all.
pub struct Lines<'a> {
    body: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    /// For the bytes given to [`reader`] (the BOM is skipped the same way).
    pub fn new(bytes: &'a [u8]) -> Self {
        Lines { body: bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes), pos: 0, line: 1 }
    }

    /// The line where the record read last starts, and its first byte in the body.
    pub fn of(&mut self, rec: &ByteRecord) -> (usize, usize) {
        let mut start = rec.position().map_or(self.pos, |p| p.byte() as usize).clamp(self.pos, self.body.len());
        // A record cannot start with a line end: skip the `\n` of a CRLF (and blank lines).
        while start < self.body.len() && matches!(self.body[start], b'\r' | b'\n') {
            start += 1;
        }
        let seg = &self.body[self.pos..start];
        self.line += memchr::memchr_iter(b'\n', seg).count();
        self.line += memchr::memchr_iter(b'\r', seg).filter(|&i| seg.get(i + 1) != Some(&b'\n')).count();
        self.pos = start;
        (self.line, start)
    }
}

/// Words that name a total row or column (ACRO's margins are called `All`).
/// Runs once per label cell of every row, so it does not allocate: a label longer than 64
/// bytes is not a total.
pub fn is_total_label(field: &[u8]) -> bool {
    let start = field.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(field.len());
    let end = field.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    let t = &field[start..end];
    if t.len() > 64 {
        return false;
    }
    let mut buf = [0u8; 64];
    let l = &mut buf[..t.len()];
    l.copy_from_slice(t);
    l.make_ascii_lowercase();
    let l = &*l;
    matches!(
        l,
        b"total"
            | b"totals"
            | b"all"
            | b"overall"
            | b"sum"
            | b"subtotal"
            | b"sub-total"
            | b"sub total"
            | b"grand total"
    ) || l.starts_with(b"total ")
        || l.starts_with(b"total:")
        || l.starts_with(b"all ")
        || l.ends_with(b" total")
        || l.ends_with(b" totals")
}

/// Header words that make a numeric column a label (a year, an age band start, a code).
/// Kept short on purpose: a count column mistaken for a label escapes the count checks.
const LABEL_HINTS: &[&str] =
    &["year", "age", "code", "id", "month", "week", "date", "period", "wave", "quarter", "decile", "quintile"];
/// Header words that make a numeric column a magnitude rather than a count.
const MAGNITUDE_HINTS: &[&str] = &[
    "sum", "mean", "median", "average", "avg", "amount", "income", "cost", "spend", "salary", "price", "weight",
    "height", "score", "rate", "std", "sd", "min", "max", "£", "$", "€",
];

fn header_words(header: &str) -> Vec<String> {
    header
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && !matches!(c, '£' | '$' | '€'))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn has_hint(header: &str, hints: &[&str]) -> bool {
    let words = header_words(header);
    hints
        .iter()
        .any(|h| if h.chars().all(char::is_alphanumeric) { words.iter().any(|w| w == h) } else { header.contains(h) })
}

#[derive(Default, Clone)]
struct ColumnSample {
    numbers: usize,
    decimals: usize,
    percents: usize,
    text: usize,
    markers: usize,
    /// Integer values in order, to spot a year column or a row index.
    integers: Vec<f64>,
}

/// Decide the layout from the first records. `None`: no record at all.
pub fn layout(bytes: &[u8], delimiter: u8, meta: Option<&OutputMetadata>) -> Option<Layout> {
    let mut rdr = reader(bytes, delimiter);
    let mut sample = Vec::new();
    let mut rec = ByteRecord::new();
    while sample.len() < SAMPLE_RECORDS && rdr.read_byte_record(&mut rec).unwrap_or(false) {
        sample.push(rec.clone());
    }
    if sample.is_empty() {
        return None;
    }
    // A header record holds only text and empty cells, with text past the first column (the
    // first column of a data row is a label too). A row of labels and suppressed markers is
    // data: its `*` and `<10` are cells, not column names.
    let header_like = |r: &ByteRecord| {
        r.iter().all(|f| matches!(classify(f), Value::Text | Value::Empty))
            && (r.len() == 1 || r.iter().skip(1).any(|f| classify(f) == Value::Text))
    };
    let mut header_records = sample.iter().take_while(|r| header_like(r)).count().min(MAX_HEADER_RECORDS);
    if header_records == sample.len() {
        // Nothing numeric in the sample: a header (if any) cannot be told from the body.
        header_records = usize::from(sample.len() > 1);
    }
    let width = sample.iter().map(ByteRecord::len).max().unwrap_or(0);
    let header_text = |j: usize| -> String {
        sample[..header_records]
            .iter()
            .filter_map(|r| r.get(j))
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut cols = vec![ColumnSample::default(); width];
    for r in &sample[header_records..] {
        for (j, f) in r.iter().enumerate() {
            let c = &mut cols[j];
            match classify(f) {
                Value::Number { value, integer } => {
                    c.numbers += 1;
                    if integer {
                        c.integers.push(value);
                    } else {
                        c.decimals += 1;
                    }
                }
                Value::Percent => c.percents += 1,
                Value::Text => c.text += 1,
                Value::Marker => c.markers += 1,
                Value::Empty => {}
            }
        }
    }
    let declared: HashSet<usize> =
        meta.map(|m| m.contributions.iter().map(|c| c.cell.column.saturating_sub(1)).collect()).unwrap_or_default();
    let mut columns = Vec::with_capacity(width);
    let mut total_columns = Vec::new();
    for (j, c) in cols.iter().enumerate() {
        let header = header_text(j);
        let numeric = c.numbers + c.percents;
        let kind = if c.text > numeric {
            ColumnKind::Label
        } else if numeric == 0 && c.markers == 0 {
            // Nothing but empty cells: a spacer, not a column of suppressed counts.
            ColumnKind::Empty
        } else if numeric == 0 {
            // Only markers: a count column suppressed throughout.
            ColumnKind::Count
        } else if c.percents * 2 > numeric {
            ColumnKind::Percent
        } else if declared.contains(&j) {
            ColumnKind::Magnitude
        } else if has_hint(&header, LABEL_HINTS)
            || (j == 0 && is_year_column(c))
            || (j == 0 && header.trim().is_empty() && is_row_index(c))
        {
            ColumnKind::Label
        } else if has_hint(&header, MAGNITUDE_HINTS) {
            ColumnKind::Magnitude
        } else {
            ColumnKind::Count
        };
        if header_records > 0
            && matches!(kind, ColumnKind::Count | ColumnKind::Magnitude)
            && sample[..header_records].iter().any(|r| r.get(j).is_some_and(is_total_label))
        {
            total_columns.push(j);
        }
        columns.push(kind);
    }
    let fields = if header_records > 0 {
        sample[header_records - 1].len()
    } else {
        let mut freq: HashMap<usize, usize> = HashMap::new();
        sample.iter().for_each(|r| *freq.entry(r.len()).or_default() += 1);
        freq.into_iter().max_by_key(|&(len, n)| (n, len)).map_or(width, |(len, _)| len)
    };
    Some(Layout { delimiter, header_records, columns, fields, total_columns })
}

/// Whole numbers from 1800 to 2100 only: years. Looked for in the first column alone.
fn is_year_column(c: &ColumnSample) -> bool {
    c.decimals == 0 && !c.integers.is_empty() && c.integers.iter().all(|&v| (1800.0..=2100.0).contains(&v))
}

/// 0,1,2,... or 1,2,3,...: the unnamed index pandas writes as the first column (only looked
/// for there: small counts 1,2,3 in a count column must stay counts).
fn is_row_index(c: &ColumnSample) -> bool {
    c.decimals == 0
        && c.integers.len() >= 3
        && c.integers.len() == c.numbers
        && (c.integers[0] == 0.0 || c.integers[0] == 1.0)
        && c.integers.windows(2).all(|w| w[1] == w[0] + 1.0)
}

/// Cells found by one check, listed up to [`MAX_LISTED_CELLS`].
#[derive(Default)]
struct Found {
    count: usize,
    cells: Vec<Cell>,
    /// First few reasons, for the message.
    notes: Vec<String>,
}

impl Found {
    fn add(&mut self, row: usize, column: usize) {
        self.count += 1;
        if self.cells.len() < MAX_LISTED_CELLS {
            self.cells.push(Cell { row, column });
        }
    }
    fn note(&mut self, row: usize, column: usize, note: String) {
        self.add(row, column);
        if self.notes.len() < 3 {
            self.notes.push(note);
        }
    }
    fn listed(&self) -> String {
        if self.count > self.cells.len() { format!(" (first {} listed)", self.cells.len()) } else { String::new() }
    }
}

/// Running sums of a count column, for totals.
#[derive(Default, Clone, Copy)]
struct Sums {
    visible: f64,
    suppressed: usize,
    rows: usize,
}

/// A totals row met before any cell it could add up (totals on top), checked at the end.
struct PendingTotal {
    line: usize,
    values: Vec<(usize, f64)>,
}

/// Everything the table checks found.
pub struct TableOutcome {
    pub layout: Layout,
    pub results: Vec<CheckResult>,
}

fn result(check: &str, verdict: Verdict, message: String, cells: Vec<Cell>) -> CheckResult {
    CheckResult { check: check.into(), verdict, message, cells }
}

/// Run the disclosure checks on a table.
pub fn check(bytes: &[u8], delimiter: u8, policy: &Policy, meta: Option<&OutputMetadata>) -> TableOutcome {
    let Some(layout) = layout(bytes, delimiter, meta) else {
        let layout = Layout { delimiter, header_records: 0, columns: vec![], fields: 0, total_columns: vec![] };
        let r = result("sdc", Verdict::Review, "empty table: nothing to check; manual review".into(), vec![]);
        return TableOutcome { layout, results: vec![r] };
    };
    let thr = f64::from(policy.min_cell_count);
    let cols = &layout.columns;
    let width = cols.len();
    let labels: Vec<usize> = (0..width).filter(|&j| cols[j] == ColumnKind::Label).collect();
    let counts: Vec<usize> = (0..width).filter(|&j| cols[j] == ColumnKind::Count).collect();
    let magnitudes: Vec<usize> = (0..width).filter(|&j| cols[j] == ColumnKind::Magnitude).collect();
    let percents: Vec<usize> = (0..width).filter(|&j| cols[j] == ColumnKind::Percent).collect();
    let is_total_col: Vec<bool> = (0..width).map(|j| layout.total_columns.contains(&j)).collect();
    // For each totals column: the count columns it adds up (those since the previous totals
    // column; all other count columns if none lie between).
    let total_groups: Vec<(usize, Vec<usize>)> = layout
        .total_columns
        .iter()
        .filter(|&&t| cols[t] == ColumnKind::Count)
        .map(|&t| {
            let prev = layout.total_columns.iter().copied().filter(|&p| p < t).max();
            let between: Vec<usize> =
                counts.iter().copied().filter(|&j| j < t && prev.is_none_or(|p| j > p) && !is_total_col[j]).collect();
            let group = if between.is_empty() {
                counts.iter().copied().filter(|&j| !is_total_col[j]).collect()
            } else {
                between
            };
            (t, group)
        })
        .collect();

    let mut small = Found::default();
    let mut zeros = Found::default();
    let mut suppressed = Found::default();
    let mut values = Found::default();
    let mut totals = Found::default();
    let mut totals_review = Found::default();
    let mut ragged = Found::default();
    let mut magnitude_cells: HashSet<(usize, usize)> = HashSet::new();
    let mut magnitude_count = 0usize;
    let mut count_cells = 0usize;
    let mut total_rows = 0usize;
    let mut data_rows = 0usize;
    let mut seg = vec![Sums::default(); width];
    let mut grand = vec![Sums::default(); width];
    let mut pending: Vec<PendingTotal> = Vec::new();
    let want_magnitude_cells = meta.is_some_and(|m| !m.contributions.is_empty());

    let mut rdr = reader(bytes, delimiter);
    let mut lines = Lines::new(bytes);
    let mut rec = ByteRecord::new();
    let mut index = 0usize;
    let mut parse_error = None;
    // Reused for every row: the row's shown counts and its suppressed count columns.
    let mut row_values: Vec<(usize, f64)> = Vec::new();
    let mut row_supp: Vec<usize> = Vec::new();
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                parse_error = Some(e.to_string());
                break;
            }
        }
        let (line, _) = lines.of(&rec);
        index += 1;
        if index <= layout.header_records {
            continue;
        }
        if rec.len() != layout.fields {
            let col = rec.len().min(layout.fields) + 1;
            ragged.note(line, col, format!("line {line} has {} fields, the table {}", rec.len(), layout.fields));
        }
        let total_row = labels.iter().any(|&j| rec.get(j).is_some_and(is_total_label));
        if total_row {
            total_rows += 1;
        } else {
            data_rows += 1;
        }
        row_values.clear();
        row_supp.clear();
        for &j in &counts {
            let Some(f) = rec.get(j) else { continue };
            let column = j + 1;
            count_cells += 1;
            match classify(f) {
                Value::Empty | Value::Marker => {
                    suppressed.add(line, column);
                    row_supp.push(j);
                }
                Value::Number { value, integer: true } if value >= 0.0 => {
                    if value == 0.0 {
                        if policy.zeros_disclosive {
                            zeros.add(line, column);
                        }
                    } else if value < thr {
                        small.add(line, column);
                    }
                    row_values.push((j, value));
                }
                Value::Number { value, .. } if value < 0.0 => {
                    values.note(line, column, format!("negative count at line {line}, column {column}"));
                }
                Value::Number { .. } => {
                    values.note(line, column, format!("decimal in a count column at line {line}, column {column}"));
                }
                Value::Percent => {
                    values.note(line, column, format!("percentage in a count column at line {line}, column {column}"));
                }
                Value::Text => {
                    values.note(
                        line,
                        column,
                        format!("unrecognised value in a count column at line {line}, column {column}"),
                    );
                }
            }
        }
        for &j in &magnitudes {
            let Some(f) = rec.get(j) else { continue };
            match classify(f) {
                Value::Empty | Value::Marker => suppressed.add(line, j + 1),
                Value::Number { value, .. } => {
                    magnitude_count += 1;
                    if value < 0.0 {
                        values.note(line, j + 1, format!("negative magnitude at line {line}, column {}", j + 1));
                    }
                    if want_magnitude_cells {
                        magnitude_cells.insert((line, j + 1));
                    }
                }
                Value::Percent | Value::Text => {
                    values.note(
                        line,
                        j + 1,
                        format!("unrecognised value in a magnitude column at line {line}, column {}", j + 1),
                    );
                }
            }
        }
        for &j in &percents {
            if let Some(Value::Text) = rec.get(j).map(classify) {
                values.note(
                    line,
                    j + 1,
                    format!("unrecognised value in a percentage column at line {line}, column {}", j + 1),
                );
            }
        }
        // A totals column against the cells of its row.
        let value_of = |j: usize| row_values.iter().find(|(c, _)| *c == j).map(|(_, v)| *v);
        for (t, group) in &total_groups {
            let Some(total) = value_of(*t) else { continue };
            let visible: f64 = group.iter().filter_map(|&j| value_of(j)).sum();
            let supp = group.iter().filter(|j| row_supp.contains(j)).count();
            judge_total(total - visible, supp, thr, line, t + 1, &mut totals, &mut totals_review);
        }
        // A totals row against the rows above it (since the previous totals row, or all).
        if total_row {
            if seg.iter().all(|s| s.rows == 0) && grand.iter().all(|s| s.rows == 0) {
                pending.push(PendingTotal { line, values: row_values.clone() });
            } else {
                for &(j, total) in &row_values {
                    let (s, g) = (seg[j], grand[j]);
                    if total - g.visible == 0.0 && g.rows > 0 {
                        continue;
                    }
                    judge_total(total - s.visible, s.suppressed, thr, line, j + 1, &mut totals, &mut totals_review);
                }
            }
            seg.iter_mut().for_each(|s| *s = Sums::default());
        } else {
            for &j in &counts {
                for sums in [&mut seg[j], &mut grand[j]] {
                    sums.rows += 1;
                }
            }
            for &(j, v) in &row_values {
                seg[j].visible += v;
                grand[j].visible += v;
            }
            for &j in &row_supp {
                seg[j].suppressed += 1;
                grand[j].suppressed += 1;
            }
        }
    }
    for p in &pending {
        for &(j, total) in &p.values {
            let g = grand[j];
            if g.rows > 0 {
                judge_total(total - g.visible, g.suppressed, thr, p.line, j + 1, &mut totals, &mut totals_review);
            }
        }
    }

    let mut results = Vec::new();
    let describe = |list: &[usize]| -> String {
        if list.is_empty() {
            "none".into()
        } else {
            list.iter().map(|j| (j + 1).to_string()).collect::<Vec<_>>().join(", ")
        }
    };
    let shape = format!(
        "{} table: {} header line(s), {data_rows} data row(s), {total_rows} totals row(s); label columns: {}; count columns: {}; magnitude columns: {}{}",
        if delimiter == b'\t' { "TSV" } else { "CSV" },
        layout.header_records,
        describe(&labels),
        describe(&counts),
        describe(&magnitudes),
        if layout.total_columns.is_empty() {
            String::new()
        } else {
            format!("; totals columns: {}", describe(&layout.total_columns))
        },
    );
    if let Some(e) = parse_error {
        results.push(result(
            "format",
            Verdict::Review,
            format!("{shape}; not readable past an error ({e}): manual review"),
            vec![],
        ));
    } else if ragged.count > 0 {
        results.push(result(
            "format",
            Verdict::Review,
            format!(
                "{shape}; {} row(s) with a different number of fields{}: {}",
                ragged.count,
                ragged.listed(),
                ragged.notes.join("; ")
            ),
            ragged.cells,
        ));
    } else {
        results.push(result("format", Verdict::Pass, shape, vec![]));
    }
    if counts.is_empty() && magnitudes.is_empty() {
        let what = if percents.is_empty() {
            "no count or magnitude column found"
        } else {
            "only percentages: the counts behind them cannot be checked"
        };
        results.push(result("sdc", Verdict::Review, format!("{what}: manual review"), vec![]));
    } else if !percents.is_empty() {
        results.push(result(
            "sdc",
            Verdict::Review,
            format!("percentage column(s) {}: derived from counts not shown; check them by hand", describe(&percents)),
            vec![],
        ));
    }
    if values.count > 0 {
        results.push(result(
            "values",
            Verdict::Review,
            format!(
                "{} cell(s) are not plain counts{} (not a count table?): {}",
                values.count,
                values.listed(),
                values.notes.join("; ")
            ),
            values.cells,
        ));
    }
    if !counts.is_empty() {
        let thr = policy.min_cell_count;
        results.push(if small.count > 0 {
            result(
                "minCellCount",
                Verdict::Fail,
                format!(
                    "{} of {count_cells} count cell(s) are below {thr} (and above 0){}",
                    small.count,
                    small.listed()
                ),
                small.cells,
            )
        } else {
            result("minCellCount", Verdict::Pass, format!("no count below {thr} among {count_cells} cell(s)"), vec![])
        });
        if policy.zeros_disclosive {
            results.push(if zeros.count > 0 {
                result(
                    "zeros",
                    Verdict::Fail,
                    format!("{} zero cell(s): zeros are disclosive in this project{}", zeros.count, zeros.listed()),
                    zeros.cells,
                )
            } else {
                result("zeros", Verdict::Pass, "no zero cells".into(), vec![])
            });
        }
    }
    if total_rows > 0 || !layout.total_columns.is_empty() {
        results.push(if totals.count > 0 {
            result(
                "totals",
                Verdict::Fail,
                format!(
                    "{} total(s) give away suppressed or hidden cells{}: {}",
                    totals.count,
                    totals.listed(),
                    totals.notes.join("; ")
                ),
                totals.cells,
            )
        } else if totals_review.count > 0 {
            result(
                "totals",
                Verdict::Review,
                format!(
                    "{} total(s) do not add up{}: {}",
                    totals_review.count,
                    totals_review.listed(),
                    totals_review.notes.join("; ")
                ),
                totals_review.cells,
            )
        } else {
            result("totals", Verdict::Pass, "totals add up and give nothing away".into(), vec![])
        });
    }
    if suppressed.count > 0 {
        results.push(result(
            "suppressed",
            Verdict::Pass,
            format!("{} cell(s) already suppressed or marked{}", suppressed.count, suppressed.listed()),
            suppressed.cells,
        ));
    }
    if magnitude_count > 0 && !want_magnitude_cells {
        let m = format!(
            "{magnitude_count} magnitude cell(s) in column(s) {} and no contributions declared: dominance cannot be checked; manual review",
            describe(&magnitudes)
        );
        results.push(result("dominance", Verdict::Review, m, vec![]));
    }
    if want_magnitude_cells {
        results.extend(contributions(
            policy,
            meta.map(|m| m.contributions.as_slice()).unwrap_or(&[]),
            &magnitude_cells,
        ));
    }
    TableOutcome { layout, results }
}

/// A total that differs by `d` from the visible cells it adds up, `supp` of them suppressed.
fn judge_total(d: f64, supp: usize, thr: f64, line: usize, column: usize, fail: &mut Found, review: &mut Found) {
    if d.abs() < 1e-9 {
        // Adds up: either nothing is hidden, or the total leaves the suppressed cells out
        // (as ACRO recomputes its margins after suppression).
        return;
    }
    if d < 0.0 {
        review.note(line, column, format!("line {line}, column {column}: total is {} less than its cells", -d));
    } else if supp == 1 {
        fail.note(
            line,
            column,
            format!("line {line}, column {column}: total minus the other cells gives the one suppressed cell"),
        );
    } else if d < thr {
        fail.note(
            line,
            column,
            format!("line {line}, column {column}: total exceeds its visible cells by {d} (below {thr})"),
        );
    }
    // d >= thr with 0 or >= 2 suppressed cells: the hidden part is itself at least the threshold.
}

/// Dominance (N-K), p-ratio and the number of contributors, for each declared cell.
fn contributions(
    policy: &Policy,
    declared: &[super::CellContributions],
    magnitude_cells: &HashSet<(usize, usize)>,
) -> Vec<CheckResult> {
    let mut few = Found::default();
    let mut dominant = Found::default();
    let mut pratio = Found::default();
    let mut negative = Found::default();
    let mut unknown = Found::default();
    let mut seen: HashMap<(usize, usize), ()> = HashMap::new();
    let n = policy.dominance_n as usize;
    for c in declared {
        let (row, column) = (c.cell.row, c.cell.column);
        seen.insert((row, column), ());
        if !magnitude_cells.contains(&(row, column)) {
            unknown.note(row, column, format!("line {row}, column {column} is not a magnitude cell of the file"));
        }
        if c.values.iter().any(|v| *v < 0.0 || !v.is_finite()) {
            negative.note(row, column, format!("line {row}, column {column}: negative or non-finite contribution"));
            continue;
        }
        if c.values.len() < policy.min_cell_count as usize {
            few.add(row, column);
        }
        let mut v = c.values.clone();
        v.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = v.iter().sum();
        // N-K (ACRO agg_nk): the n largest over the total above k fails; an empty total passes.
        if total > 0.0 && v.iter().take(n).sum::<f64>() / total > policy.dominance_k {
            dominant.add(row, column);
        }
        // p-ratio (ACRO agg_p_percent): (total - largest - second) / largest below p fails;
        // fewer than two contributors or a total of 0 fails when zeros are disclosive.
        let fails = if total <= 0.0 || v.len() <= 1 {
            policy.zeros_disclosive
        } else {
            (total - v[0] - v[1]) / v[0] < policy.p_ratio
        };
        if fails {
            pratio.add(row, column);
        }
    }
    let missing: Vec<Cell> = {
        let mut m: Vec<(usize, usize)> = magnitude_cells.iter().filter(|k| !seen.contains_key(k)).copied().collect();
        m.sort_unstable();
        m.into_iter().map(|(row, column)| Cell { row, column }).collect()
    };
    let mut out = Vec::new();
    let k = policy.dominance_k;
    out.push(if dominant.count > 0 {
        result(
            "dominance",
            Verdict::Fail,
            format!(
                "{} cell(s) where the {n} largest contributors exceed {k} of the total{}",
                dominant.count,
                dominant.listed()
            ),
            dominant.cells,
        )
    } else {
        result(
            "dominance",
            Verdict::Pass,
            format!("no cell where the {n} largest contributors exceed {k} of the total"),
            vec![],
        )
    });
    let p = policy.p_ratio;
    out.push(if pratio.count > 0 {
        result(
            "pRatio",
            Verdict::Fail,
            format!(
                "{} cell(s) where the rest after the two largest is below {p} of the largest{}",
                pratio.count,
                pratio.listed()
            ),
            pratio.cells,
        )
    } else {
        result(
            "pRatio",
            Verdict::Pass,
            format!("every cell keeps at least {p} of its largest contributor hidden"),
            vec![],
        )
    });
    if few.count > 0 {
        out.push(result(
            "minCellCount",
            Verdict::Fail,
            format!(
                "{} magnitude cell(s) have fewer than {} contributors{}",
                few.count,
                policy.min_cell_count,
                few.listed()
            ),
            few.cells,
        ));
    }
    let mut review_cells = negative.cells;
    let mut notes = negative.notes;
    review_cells.extend(unknown.cells);
    notes.extend(unknown.notes);
    let missing_n = missing.len();
    if missing_n > 0 {
        notes.push(format!("{missing_n} magnitude cell(s) without contributions"));
        review_cells.extend(missing.into_iter().take(MAX_LISTED_CELLS));
    }
    if !review_cells.is_empty() {
        review_cells.truncate(MAX_LISTED_CELLS);
        out.push(result(
            "contributions",
            Verdict::Review,
            format!("declared contributions need a look: {}", notes.join("; ")),
            review_cells,
        ));
    }
    out
}

/// ACRO's 0-based positions in the values (below the header, right of the leading label
/// columns) as cells of the file. pandas writes the index's name on a line of its own under
/// the header (`year,,,`) when both axes are named: such lines before the first value row are
/// not value rows. (The checks themselves treat that line as data: its empty cells count as
/// suppressed, which can only make them stricter.)
pub fn locate(bytes: &[u8], layout: &Layout, positions: &[(usize, usize)]) -> Vec<Cell> {
    let labels = layout.columns.iter().take_while(|k| **k == ColumnKind::Label).count();
    let mut wanted: Vec<usize> = positions.iter().map(|(r, _)| *r).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let last = wanted.last().copied().unwrap_or(0);
    let mut found: HashMap<usize, usize> = HashMap::new();
    let mut rdr = reader(bytes, layout.delimiter);
    let mut lines = Lines::new(bytes);
    let mut rec = ByteRecord::new();
    let mut index = 0;
    let mut value_row = 0;
    while value_row <= last && rdr.read_byte_record(&mut rec).unwrap_or(false) {
        let (line, _) = lines.of(&rec);
        index += 1;
        if index <= layout.header_records {
            continue;
        }
        let index_name_line = rec.len() > 1
            && classify(&rec[0]) == Value::Text
            && rec.iter().skip(1).all(|f| classify(f) == Value::Empty);
        if value_row == 0 && index_name_line && found.is_empty() && index == layout.header_records + 1 {
            continue;
        }
        if wanted.binary_search(&value_row).is_ok() {
            found.insert(value_row, line);
        }
        value_row += 1;
    }
    positions
        .iter()
        .filter_map(|(r, c)| found.get(r).map(|&row| Cell { row, column: labels.saturating_add(*c).saturating_add(1) }))
        .collect()
}

/// The cell holding byte `offset` of `bytes` (offsets count a BOM, as the DLP scanner's do).
pub fn cell_at_offset(bytes: &[u8], delimiter: u8, offset: usize) -> Option<Cell> {
    let bom = if bytes.starts_with(b"\xef\xbb\xbf") { 3 } else { 0 };
    let off = offset.checked_sub(bom)?;
    let body = &bytes[bom..];
    let mut rdr = reader(bytes, delimiter);
    let mut lines = Lines::new(bytes);
    let mut rec = ByteRecord::new();
    let mut found = None;
    while rdr.read_byte_record(&mut rec).ok()? {
        if rec.position()?.byte() as usize > off {
            break;
        }
        found = Some(lines.of(&rec));
    }
    let (row, start) = found?;
    let mut in_quotes = false;
    let mut column = 1;
    for &b in body.get(start..off)? {
        if b == b'"' {
            in_quotes = !in_quotes;
        } else if b == delimiter && !in_quotes {
            column += 1;
        }
    }
    Some(Cell { row, column })
}
