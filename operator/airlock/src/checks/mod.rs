//! Automatic checks on one output: DLP (the same scanner as the agent's) and statistical
//! disclosure control on tables. The control plane runs them on the bytes it received; it never
//! trusts the agent's own scan.
//!
//! INTERFACE (shared by the API glue): `run(&Submission, &Policy) -> Report`. The types below
//! are serialised into the database and shown to reviewers; extend them, do not rename fields.

mod acro;
mod dlp;
mod format;
pub mod table;
mod value;

use serde::{Deserialize, Serialize};

pub use acro::{AcroError, AcroOutput, outputs_for as acro_outputs_for};
pub use format::{Format, detect as detect_format};
pub use value::{Value, classify as classify_value};

/// The project's disclosure-control settings. Defaults follow ACRO's `acro/default.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Smallest count a table cell may show (`outputs.minCellCount`).
    pub min_cell_count: u32,
    /// Zero cells are disclosive (structural zeros reveal absence).
    pub zeros_disclosive: bool,
    /// Dominance N-K: the `n` largest contributors may not exceed `k` of a cell's total.
    pub dominance_n: u32,
    pub dominance_k: f64,
    /// p-ratio: the total minus the two largest contributors must be at least `p` of the largest.
    pub p_ratio: f64,
    /// Smallest residual degrees of freedom for model outputs that declare them.
    pub min_residual_dof: u32,
    /// Larger files are not parsed: "manual review", never "pass".
    pub max_checked_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_cell_count: 10,
            zeros_disclosive: true,
            dominance_n: 2,
            dominance_k: 0.90,
            p_ratio: 0.10,
            min_residual_dof: 10,
            max_checked_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Outcome of one check, and of a whole report (the worst of its checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    Pass,
    /// A person must look (unparseable, binary, too large, ambiguous).
    Review,
    Fail,
    /// Never released, not even reviewed: an archive or executable the checks cannot look
    /// inside. The control plane rejects the request at once and deletes its content.
    Refuse,
}

/// A table cell, as a reviewer finds it in the file: `row` is the 1-based line of the file
/// (header = 1) where the cell's record starts (a quoted label may span lines), `column` the
/// 1-based column (field). For text that is not a table, `column` is the byte in the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    pub row: usize,
    pub column: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// Stable check name: `format` (could the file be read, and as what), `dlp`, `sdc`
    /// (can disclosure control apply at all), `values` (non-count values in count columns),
    /// `minCellCount`, `zeros`, `totals`, `suppressed` (information: cells already marked),
    /// `dominance`, `pRatio`, `contributions`, `residualDof`, `acro` (ACRO's own verdicts, or a
    /// `results.json` we could not read).
    pub check: String,
    pub verdict: Verdict,
    /// One line for a reviewer.
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<Cell>,
}

/// What a researcher may declare about an output, sent beside it (a sidecar file).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputMetadata {
    /// Residual degrees of freedom of a model output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_dof: Option<u64>,
    /// Per-cell contributions of a magnitude table, for dominance and p-ratio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contributions: Vec<CellContributions>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CellContributions {
    pub cell: Cell,
    pub values: Vec<f64>,
}

/// One file to check.
#[derive(Clone, Debug)]
pub struct Submission<'a> {
    pub file_name: &'a str,
    pub bytes: &'a [u8],
    pub metadata: Option<&'a OutputMetadata>,
    /// An ACRO `results.json` submitted with the outputs (raw bytes; parsed here).
    pub acro_results: Option<&'a [u8]>,
}

/// Everything the checks found about one file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub verdict: Verdict,
    pub results: Vec<CheckResult>,
    /// ACRO's own verdicts for this file, shown beside ours (never replacing them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acro: Vec<CheckResult>,
}

impl Report {
    /// The worst verdict of `results` (a report with no results is for review, never a pass).
    pub fn from_results(results: Vec<CheckResult>, acro: Vec<CheckResult>) -> Self {
        let verdict = results.iter().map(|r| r.verdict).max().unwrap_or(Verdict::Review);
        Report { verdict, results, acro }
    }
}

/// Why an archive is refused (the researcher reads it in `/outbox/.decisions`).
pub const ARCHIVES_REFUSED: &str = "archives are not released: unpack and submit the files";
/// Why an executable is refused.
pub const EXECUTABLES_REFUSED: &str = "executables are not released: submit results, not programs";

impl Report {
    /// The reason the checks refuse this file outright (verdict [`Verdict::Refuse`]), if they do.
    pub fn refusal(&self) -> Option<String> {
        if self.verdict != Verdict::Refuse {
            return None;
        }
        let why: Vec<&str> =
            self.results.iter().filter(|r| r.verdict == Verdict::Refuse).map(|r| r.message.as_str()).collect();
        Some(if why.is_empty() { ARCHIVES_REFUSED.to_owned() } else { why.join("; ") })
    }
}

fn result(check: &str, verdict: Verdict, message: String) -> CheckResult {
    CheckResult { check: check.into(), verdict, message, cells: vec![] }
}

/// Run every check that applies to `sub`. Pure: no I/O, no panics on any input; the worst
/// check decides the verdict, and only a table that passes every check passes. DLP uses the
/// built-in detectors; [`run_with_detectors`] adds a site's extra patterns.
pub fn run(sub: &Submission<'_>, policy: &Policy) -> Report {
    run_with_detectors(sub, policy, &noexit_dlp::Detectors::builtin())
}

/// [`run`] with the DLP detectors the site configured (built-ins plus its extra patterns, as
/// the agent compiles them with `noexit_dlp::Detectors::new`).
pub fn run_with_detectors(sub: &Submission<'_>, policy: &Policy, detectors: &noexit_dlp::Detectors) -> Report {
    let bytes = sub.bytes;
    let size = bytes.len() as u64;
    let fmt = format::detect(sub.file_name, bytes);
    let mut results = Vec::new();
    let mut layout = None;
    if size > policy.max_checked_bytes {
        results.push(result(
            "format",
            Verdict::Review,
            format!("{size} bytes, more than the {} checked automatically: manual review", policy.max_checked_bytes),
        ));
    } else {
        match fmt {
            Format::Archive { what } => results.push(result(
                "format",
                Verdict::Refuse,
                format!("{what} ({size} bytes, never expanded): {ARCHIVES_REFUSED}"),
            )),
            Format::Executable { what } => {
                results.push(result("format", Verdict::Refuse, format!("{what} ({size} bytes): {EXECUTABLES_REFUSED}")))
            }
            Format::Binary { what } => results.push(result(
                "format",
                Verdict::Review,
                format!("{what}: not checked automatically; manual review"),
            )),
            Format::Image { mime } => results.push(result(
                "format",
                Verdict::Review,
                format!("{mime} image: a person must look at it (the review page shows it); manual review"),
            )),
            Format::Svg | Format::Text | Format::Table { .. } => {
                // Fed in chunks as the agent does: `scan(bytes)` would copy the whole file.
                let mut scanner = detectors.scanner();
                bytes.chunks(256 * 1024).for_each(|c| scanner.feed(c));
                let scan = scanner.finish();
                if let Some(why) = scan.binary {
                    results.push(result(
                        "format",
                        Verdict::Review,
                        format!("{why}: not checked as text; manual review"),
                    ));
                    results.push(dlp::result(&scan, fmt, bytes, true));
                } else {
                    results.push(dlp::result(&scan, fmt, bytes, false));
                    let utf8 = std::str::from_utf8(bytes).is_ok();
                    if !utf8 {
                        results.push(result(
                            "format",
                            Verdict::Review,
                            "not UTF-8 text: the encoding is unknown, labels may read wrong; manual review".into(),
                        ));
                    }
                    match fmt {
                        Format::Table { delimiter } => {
                            let outcome = table::check(bytes, delimiter, policy, sub.metadata);
                            results.extend(outcome.results);
                            layout = Some(outcome.layout);
                        }
                        Format::Svg => results.push(result(
                            "format",
                            Verdict::Review,
                            "SVG image: a person must look at it (shown as an image, never inline); manual review"
                                .into(),
                        )),
                        _ => {
                            let lines = bytes.split(|&b| b == b'\n').count();
                            if utf8 {
                                results.push(result("format", Verdict::Pass, format!("text, {lines} line(s)")));
                            }
                            results.push(result(
                                "sdc",
                                Verdict::Review,
                                "text, not a CSV/TSV table: disclosure control is automatic only for tables; a person must read it".into(),
                            ));
                        }
                    }
                }
            }
        }
    }
    if let Some(dof) = sub.metadata.and_then(|m| m.residual_dof) {
        let min = policy.min_residual_dof;
        results.push(if dof < u64::from(min) {
            result("residualDof", Verdict::Fail, format!("residual degrees of freedom {dof} below {min}"))
        } else {
            result("residualDof", Verdict::Pass, format!("residual degrees of freedom {dof} (at least {min})"))
        });
    }
    let mut acro = Vec::new();
    if let Some(json) = sub.acro_results {
        match acro::outputs_for(json, sub.file_name) {
            Ok(outputs) if outputs.is_empty() => acro.push(result(
                "acro",
                Verdict::Review,
                format!("the ACRO results.json has no output for {}", base_name(sub.file_name)),
            )),
            Ok(outputs) => {
                let locate = |positions: &[(usize, usize)]| layout.as_ref().map(|l| table::locate(bytes, l, positions));
                acro = acro::to_results(outputs, &locate);
            }
            Err(e) => results.push(result(
                "acro",
                Verdict::Review,
                format!("the ACRO results.json could not be read ({e}): manual review"),
            )),
        }
    }
    Report::from_results(results, acro)
}

fn base_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

#[cfg(test)]
mod tests;
