//! The DLP check: the agent's scanner (`noexit-dlp`, the same crate), run by the control plane
//! on the bytes it received. A finding gives its kind, count and first offset, never the value.

use noexit_dlp::ScanResult;

use super::format::Format;
use super::{Cell, CheckResult, Verdict, table};

/// `binary`: the content is not text, so a "finding" may be chance bytes: review, not fail.
pub fn result(scan: &ScanResult, fmt: Format, bytes: &[u8], binary: bool) -> CheckResult {
    if scan.findings.is_empty() {
        let message = if binary {
            "no personal data patterns found (binary content: the scan proves little)".to_owned()
        } else {
            format!("no personal data patterns found in {} bytes", scan.bytes)
        };
        return CheckResult { check: "dlp".into(), verdict: Verdict::Pass, message, cells: vec![] };
    }
    let mut cells = Vec::new();
    let parts: Vec<String> = scan
        .findings
        .iter()
        .map(|f| {
            let cell = locate(fmt, bytes, f.first_offset as usize);
            cells.push(cell);
            format!(
                "{} ×{} (first at byte {}, line {} column {})",
                f.kind, f.count, f.first_offset, cell.row, cell.column
            )
        })
        .collect();
    cells.sort_by_key(|c| (c.row, c.column));
    cells.dedup();
    let (verdict, lead) = if binary {
        (Verdict::Review, "possible personal data in binary content")
    } else {
        (Verdict::Fail, "personal data patterns found")
    };
    CheckResult { check: "dlp".into(), verdict, message: format!("{lead}: {}", parts.join("; ")), cells }
}

/// Where byte `offset` is: for a table the cell (record's first line, field); otherwise the
/// line and the byte in that line.
fn locate(fmt: Format, bytes: &[u8], offset: usize) -> Cell {
    let offset = offset.min(bytes.len());
    if let Format::Table { delimiter } = fmt
        && let Some(cell) = table::cell_at_offset(bytes, delimiter, offset)
    {
        return cell;
    }
    let before = &bytes[..offset];
    let row = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Cell { row, column: offset - line_start + 1 }
}
