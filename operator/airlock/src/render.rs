//! What a reviewer sees: the file rendered with the checks' findings on it. Pure functions;
//! the review page (gateway or API) and the CLI call them.
//!
//! - [`table_view`]: a table's rows and cells, each cell marked with the checks that flag it.
//! - [`review_html`]: a self-contained HTML fragment: the check results, then the file (a table
//!   with the flagged cells marked, text in `<pre>`, images as `data:` URIs in `<img>`). Every
//!   byte of the file and of the report is escaped; SVG is only ever an `<img>` source (an
//!   image context runs no script), never inline markup.

use std::collections::HashMap;
use std::fmt::Write as _;

use base64::Engine as _;
use csv::ByteRecord;

use crate::checks::{self, Format, Report, Verdict};

/// Rows shown in full; rows after these appear only if a check flags one of their cells.
pub const MAX_VIEW_ROWS: usize = 2000;
/// Flagged rows shown after [`MAX_VIEW_ROWS`].
pub const MAX_FLAGGED_ROWS: usize = 2000;
/// Characters shown per cell.
pub const MAX_CELL_CHARS: usize = 500;
/// Text shown in `<pre>`.
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// Largest image inlined as a `data:` URI.
pub const MAX_IMAGE_BYTES: usize = 16 << 20;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViewCell {
    pub text: String,
    /// A failing check lists this cell.
    pub failed: bool,
    /// A check asks a person to look at this cell.
    pub review: bool,
    /// Already suppressed or marked by the researcher.
    pub suppressed: bool,
    /// Names of the checks that list this cell (ours, then `acro`).
    pub checks: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ViewRow {
    /// 1-based line where the record starts (as in [`checks::Cell::row`]).
    pub line: usize,
    pub cells: Vec<ViewCell>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableView {
    pub rows: Vec<ViewRow>,
    /// Rows not shown (past [`MAX_VIEW_ROWS`] and not flagged).
    pub omitted_rows: usize,
    /// The table could not be read past some point.
    pub error: Option<String>,
}

/// How each listed cell is marked.
#[derive(Default)]
struct Marks {
    failed: bool,
    review: bool,
    suppressed: bool,
    checks: Vec<String>,
}

fn marks(report: &Report) -> HashMap<(usize, usize), Marks> {
    let mut m: HashMap<(usize, usize), Marks> = HashMap::new();
    for r in report.results.iter().chain(&report.acro) {
        let ours = !report.acro.iter().any(|a| std::ptr::eq(a, r));
        for c in &r.cells {
            let e = m.entry((c.row, c.column)).or_default();
            if r.check == "suppressed" {
                e.suppressed = true;
            } else if ours && r.verdict == Verdict::Fail {
                e.failed = true;
            } else if ours && r.verdict == Verdict::Review {
                e.review = true;
            }
            if r.check != "suppressed" && !e.checks.contains(&r.check) {
                e.checks.push(r.check.clone());
            }
        }
    }
    m
}

/// Guess the delimiter of a table whose name is unknown: tab if the first line has more tabs
/// than commas.
fn sniff_delimiter(bytes: &[u8]) -> u8 {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let count = |d| line.iter().filter(|&&b| b == d).count();
    if count(b'\t') > count(b',') { b'\t' } else { b',' }
}

/// The table in `bytes` with the report's cells marked (delimiter sniffed from the content).
pub fn table_view(bytes: &[u8], report: &Report) -> TableView {
    table_view_with(bytes, sniff_delimiter(bytes), report)
}

/// [`table_view`] with a known delimiter.
pub fn table_view_with(bytes: &[u8], delimiter: u8, report: &Report) -> TableView {
    let marks = marks(report);
    let flagged_lines: std::collections::HashSet<usize> = marks.keys().map(|&(row, _)| row).collect();
    let mut view = TableView::default();
    let mut rdr = checks::table::reader(bytes, delimiter);
    let mut lines = checks::table::Lines::new(bytes);
    let mut rec = ByteRecord::new();
    let mut index = 0usize;
    let mut flagged_after = 0usize;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                view.error = Some(e.to_string());
                break;
            }
        }
        let (line, _) = lines.of(&rec);
        index += 1;
        let show = index <= MAX_VIEW_ROWS || (flagged_lines.contains(&line) && flagged_after < MAX_FLAGGED_ROWS);
        if !show {
            view.omitted_rows += 1;
            continue;
        }
        if index > MAX_VIEW_ROWS {
            flagged_after += 1;
        }
        let cells = rec
            .iter()
            .enumerate()
            .map(|(j, f)| {
                let mut text: String = String::from_utf8_lossy(f).chars().take(MAX_CELL_CHARS + 1).collect();
                if text.chars().count() > MAX_CELL_CHARS {
                    text = text.chars().take(MAX_CELL_CHARS).collect::<String>() + "…";
                }
                let m = marks.get(&(line, j + 1));
                ViewCell {
                    text,
                    failed: m.is_some_and(|m| m.failed),
                    review: m.is_some_and(|m| m.review),
                    suppressed: m.is_some_and(|m| m.suppressed),
                    checks: m.map(|m| m.checks.clone()).unwrap_or_default(),
                }
            })
            .collect();
        view.rows.push(ViewRow { line, cells });
    }
    view
}

/// Escape for HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Review => "review",
        Verdict::Fail => "fail",
        Verdict::Refuse => "refused",
    }
}

/// The rules [`review_html`] puts in its `<style>`; a page under a strict CSP (no inline
/// style) serves them as a stylesheet and uses [`review_fragment`].
pub const REVIEW_CSS: &str = "\
.noexit-review table{border-collapse:collapse}\
.noexit-review td,.noexit-review th{border:1px solid #ccc;padding:2px 6px}\
.noexit-review .fail{background:#f8c8c8;font-weight:bold}\
.noexit-review .review{background:#fbe7b5}\
.noexit-review .suppressed{color:#777}\
.noexit-review .line{color:#777;text-align:right}\
.noexit-review pre{white-space:pre-wrap}\
";

fn results_table(out: &mut String, title: &str, results: &[checks::CheckResult]) {
    let _ = write!(
        out,
        "<h3>{}</h3><table class=\"noexit-checks\"><tr><th>check</th><th>verdict</th><th>finding</th><th>cells (line, column)</th></tr>",
        escape(title)
    );
    for r in results {
        let v = verdict_name(r.verdict);
        let cells: Vec<String> = r.cells.iter().take(20).map(|c| format!("({}, {})", c.row, c.column)).collect();
        let more = if r.cells.len() > 20 { format!(" … {} in all", r.cells.len()) } else { String::new() };
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"{v}\">{v}</td><td>{}</td><td>{}{more}</td></tr>",
            escape(&r.check),
            escape(&r.message),
            cells.join(" ")
        );
    }
    out.push_str("</table>");
}

/// A self-contained HTML fragment for one output: the checks, ACRO's verdicts, the file.
pub fn review_html(file_name: &str, bytes: &[u8], report: &Report) -> String {
    format!("<style>{REVIEW_CSS}</style>{}", review_fragment(file_name, bytes, report))
}

/// [`review_html`] without its `<style>`: for pages that link [`REVIEW_CSS`] instead.
pub fn review_fragment(file_name: &str, bytes: &[u8], report: &Report) -> String {
    let mut out = String::with_capacity(bytes.len().min(MAX_TEXT_BYTES) * 2 + 4096);
    let v = verdict_name(report.verdict);
    let _ = write!(
        out,
        "<section class=\"noexit-review\"><h2>{}</h2><p>Automatic checks: <span class=\"{v}\">{v}</span> ({} bytes)</p>",
        escape(file_name),
        bytes.len()
    );
    results_table(&mut out, "Checks", &report.results);
    if !report.acro.is_empty() {
        results_table(&mut out, "ACRO (the researcher's own results.json)", &report.acro);
    }
    out.push_str("<h3>File</h3>");
    match checks::detect_format(file_name, bytes) {
        Format::Table { delimiter } => table_html(&mut out, &table_view_with(bytes, delimiter, report)),
        Format::Text => {
            let shown = &bytes[..bytes.len().min(MAX_TEXT_BYTES)];
            let _ = write!(out, "<pre>{}</pre>", escape(&String::from_utf8_lossy(shown)));
            if shown.len() < bytes.len() {
                let _ = write!(out, "<p>… first {} of {} bytes shown.</p>", shown.len(), bytes.len());
            }
        }
        Format::Image { mime } => image_html(&mut out, file_name, mime, bytes),
        Format::Svg => image_html(&mut out, file_name, "image/svg+xml", bytes),
        Format::Archive { what } | Format::Executable { what } | Format::Binary { what } => {
            let _ = write!(out, "<p>{}: not shown; it can only be reviewed offline.</p>", escape(what));
        }
    }
    out.push_str("</section>");
    out
}

fn image_html(out: &mut String, file_name: &str, mime: &str, bytes: &[u8]) {
    if bytes.len() > MAX_IMAGE_BYTES {
        let _ = write!(out, "<p>image of {} bytes: too large to show inline.</p>", bytes.len());
        return;
    }
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    let _ = write!(out, "<img alt=\"{}\" src=\"data:{mime};base64,{data}\">", escape(file_name));
}

fn table_html(out: &mut String, view: &TableView) {
    out.push_str("<table class=\"noexit-table\"><tr><th>line</th>");
    let width = view.rows.iter().map(|r| r.cells.len()).max().unwrap_or(0);
    for j in 1..=width {
        let _ = write!(out, "<th>{j}</th>");
    }
    out.push_str("</tr>");
    let mut last_line = 0;
    for row in &view.rows {
        if row.line > last_line + 1 && last_line > 0 && view.omitted_rows > 0 {
            let _ = write!(out, "<tr><td class=\"line\">…</td><td colspan=\"{width}\">rows not shown</td></tr>");
        }
        last_line = row.line;
        let _ = write!(out, "<tr><td class=\"line\">{}</td>", row.line);
        for c in &row.cells {
            let class = if c.failed {
                "fail"
            } else if c.review {
                "review"
            } else if c.suppressed {
                "suppressed"
            } else {
                ""
            };
            if class.is_empty() && c.checks.is_empty() {
                let _ = write!(out, "<td>{}</td>", escape(&c.text));
            } else {
                let title = if c.checks.is_empty() { "suppressed".to_owned() } else { c.checks.join(", ") };
                let _ = write!(out, "<td class=\"{class}\" title=\"{}\">{}</td>", escape(&title), escape(&c.text));
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    if view.omitted_rows > 0 {
        let _ = write!(out, "<p>{} row(s) without findings not shown.</p>", view.omitted_rows);
    }
    if let Some(e) = &view.error {
        let _ = write!(out, "<p>The table could not be read past: {}</p>", escape(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::{Policy, Submission, run};

    fn report(name: &str, bytes: &[u8]) -> Report {
        run(&Submission { file_name: name, bytes, metadata: None, acro_results: None }, &Policy::default())
    }

    #[test]
    fn the_view_marks_failing_and_suppressed_cells() {
        let body = b"region,men,women\nNorth,25,7\nSouth,*,40\n";
        let r = report("t.csv", body);
        let v = table_view(body, &r);
        assert_eq!(v.rows.len(), 3);
        assert_eq!(v.rows[1].line, 2);
        let seven = &v.rows[1].cells[2];
        assert_eq!(
            (seven.text.as_str(), seven.failed, seven.checks.clone()),
            ("7", true, vec!["minCellCount".to_owned()])
        );
        assert!(!v.rows[1].cells[1].failed);
        assert!(v.rows[2].cells[1].suppressed && !v.rows[2].cells[1].failed);
    }

    #[test]
    fn tsv_is_sniffed() {
        let body = b"area\tn\nX\t3\n";
        let v = table_view(body, &report("t.tsv", body));
        assert_eq!(v.rows[1].cells.len(), 2);
        assert!(v.rows[1].cells[1].failed);
    }

    #[test]
    fn hostile_table_content_is_escaped() {
        let body = "label,n\n\"<script>alert(1)</script>\",3\n\"\"\"><img src=x onerror=alert(1)>\",40\n'&amp;',12\n";
        let name = "t<b>\".csv";
        let html = review_html(name, body.as_bytes(), &report(name, body.as_bytes()));
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(!html.contains("<b>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("&#39;&amp;amp;&#39;"));
        assert!(html.contains("<td class=\"fail\" title=\"minCellCount\">3</td>"), "{html}");
    }

    #[test]
    fn hostile_text_and_svg_never_become_markup() {
        let text = b"</pre><script>alert(1)</script>";
        let html = review_html("notes.txt", text, &report("notes.txt", text));
        assert!(html.contains("<pre>&lt;/pre&gt;&lt;script&gt;"));
        assert!(!html.contains("<script>"));
        let svg = br#"<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>"#;
        let html = review_html("plot.svg", svg, &report("plot.svg", svg));
        assert!(!html.contains("<svg") && !html.contains("<script"), "{html}");
        let b64 = base64::engine::general_purpose::STANDARD.encode(svg);
        assert!(html.contains(&format!("<img alt=\"plot.svg\" src=\"data:image/svg+xml;base64,{b64}\">")));
    }

    #[test]
    fn images_are_data_uris_and_binaries_are_not_shown() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let html = review_html("p.png", png, &report("p.png", png));
        assert!(html.contains("src=\"data:image/png;base64,iVBORw0KGgo"));
        let zip = b"PK\x03\x04\x14\0\0\0<script>";
        let html = review_html("a.zip", zip, &report("a.zip", zip));
        assert!(html.contains("zip archive: not shown"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn long_tables_show_flagged_rows_past_the_limit() {
        // Rows 2..=5001 hold 50; line 4000 holds 3 (flagged).
        let mut body = String::from("row,n\n");
        for i in 2..=5001 {
            body.push_str(&format!("r{i},{}\n", if i == 4000 { 3 } else { 50 }));
        }
        let r = report("l.csv", body.as_bytes());
        let v = table_view(body.as_bytes(), &r);
        assert_eq!(v.rows.len(), MAX_VIEW_ROWS + 1);
        assert_eq!(v.omitted_rows, 5001 - MAX_VIEW_ROWS - 1);
        let last = v.rows.last().unwrap();
        assert_eq!((last.line, last.cells[1].failed), (4000, true));
    }
}
