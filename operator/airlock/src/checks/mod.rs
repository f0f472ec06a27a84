//! Automatic checks on one output: DLP (the same scanner as the agent's) and statistical
//! disclosure control on tables. The control plane runs them on the bytes it received; it never
//! trusts the agent's own scan.
//!
//! INTERFACE (shared by the API glue): `run(&Submission, &Policy) -> Report`. The types below
//! are serialised into the database and shown to reviewers; extend them, do not rename fields.

use serde::{Deserialize, Serialize};

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
}

/// A table cell, as a reviewer finds it in the file: `row` is the 1-based line of the file
/// (header = 1), `column` the 1-based column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    pub row: usize,
    pub column: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// Stable check name: `dlp`, `minCellCount`, `zeros`, `dominance`, `pRatio`,
    /// `residualDof`, `format`.
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

/// Run every check that applies to `sub`.
// PLACEHOLDER until the checks land: everything goes to manual review.
pub fn run(sub: &Submission<'_>, _policy: &Policy) -> Report {
    let results = vec![CheckResult {
        check: "format".into(),
        verdict: Verdict::Review,
        message: format!("{}: automatic checks not available; manual review", sub.file_name),
        cells: vec![],
    }];
    Report { verdict: Verdict::Review, results, acro: vec![] }
}
