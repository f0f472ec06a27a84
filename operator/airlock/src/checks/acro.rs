//! ACRO's own verdicts, read from the `results.json` that `acro.finalise(path, "json")` writes:
//!
//! ```json
//! { "version": "0.4.x",
//!   "results": { "output_0": { "uid": "output_0", "status": "fail", "type": "table",
//!       "properties": { "method": "crosstab" },
//!       "files": [ { "name": "output_0_0.csv",
//!                    "sdc": { "summary": { "suppressed": false, "threshold": 2, ... },
//!                             "cells": { "threshold": [[0, 1], [2, 0]], ... } } } ],
//!       "outcome": { ... }, "command": "...", "summary": "fail; threshold: 2 cells may need suppressing; ",
//!       "timestamp": "...", "comments": [], "exception": "" } },
//!   "session_summary": { ... } }
//! ```
//!
//! `status` is `pass`, `fail` or `review`. `sdc.cells` are 0-based positions in the table's
//! values (below the header, right of the index columns); they are turned into file
//! coordinates when the file is a table we could read.

use serde_json::Value as Json;

use super::{Cell, CheckResult, Verdict};

/// ACRO's verdicts for one output file.
#[derive(Debug, PartialEq)]
pub struct AcroOutput {
    pub uid: String,
    pub verdict: Verdict,
    pub message: String,
    /// `(row, column)` positions in the table's values, 0-based, as ACRO gives them.
    pub positions: Vec<(usize, usize)>,
}

/// Why a `results.json` could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AcroError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("no \"results\" object: not an ACRO results.json")]
    NoResults,
    #[error("results.{uid}: {what}")]
    Entry { uid: String, what: &'static str },
}

/// The outputs of `results_json` whose files include `file_name` (compared by base name) or
/// whose uid is the file's stem.
pub fn outputs_for(results_json: &[u8], file_name: &str) -> Result<Vec<AcroOutput>, AcroError> {
    let doc: Json = serde_json::from_slice(results_json).map_err(|e| AcroError::NotJson(e.to_string()))?;
    let results = doc.get("results").and_then(Json::as_object).ok_or(AcroError::NoResults)?;
    let base = base_name(file_name);
    let stem = base.rsplit_once('.').map_or(base, |(s, _)| s);
    let mut out = Vec::new();
    for (key, entry) in results {
        let entry_err = |what| AcroError::Entry { uid: key.clone(), what };
        let entry = entry.as_object().ok_or_else(|| entry_err("not an object"))?;
        let status = entry.get("status").and_then(Json::as_str).ok_or_else(|| entry_err("no \"status\""))?;
        let files = entry.get("files").and_then(Json::as_array).ok_or_else(|| entry_err("no \"files\" list"))?;
        let uid = entry.get("uid").and_then(Json::as_str).unwrap_or(key);
        let mut matched = None;
        for f in files {
            let name = f.get("name").and_then(Json::as_str).ok_or_else(|| entry_err("a file without \"name\""))?;
            if base_name(name) == base {
                matched = Some(f);
            }
        }
        if matched.is_none() && uid != stem {
            continue;
        }
        let verdict = match status {
            "pass" => Verdict::Pass,
            "fail" => Verdict::Fail,
            _ => Verdict::Review,
        };
        let what = entry
            .get("properties")
            .and_then(|p| p.get("method"))
            .and_then(Json::as_str)
            .or_else(|| entry.get("type").and_then(Json::as_str))
            .unwrap_or("output");
        let summary = entry.get("summary").and_then(Json::as_str).unwrap_or(status).trim();
        let mut message = format!("ACRO {uid} ({what}): {summary}");
        if !matches!(status, "pass" | "fail" | "review") {
            message.push_str(&format!(" (unknown status {status:?}: review)"));
        }
        if let Some(e) = entry.get("exception").and_then(Json::as_str).filter(|e| !e.trim().is_empty()) {
            message.push_str(&format!("; exception requested: {}", e.trim()));
        }
        let mut positions = Vec::new();
        let cells = matched.and_then(|f| f.get("sdc")).and_then(|s| s.get("cells")).and_then(Json::as_object);
        for list in cells.into_iter().flat_map(|c| c.values()) {
            for pos in list.as_array().into_iter().flatten() {
                let p = pos.as_array().map(|p| (p.first().and_then(Json::as_u64), p.get(1).and_then(Json::as_u64)));
                if let Some((Some(r), Some(c))) = p {
                    positions.push((r as usize, c as usize));
                }
            }
        }
        positions.sort_unstable();
        positions.dedup();
        out.push(AcroOutput { uid: uid.to_owned(), verdict, message, positions });
    }
    Ok(out)
}

fn base_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

/// Turns ACRO's 0-based value positions into file cells.
pub type Locate<'a> = &'a dyn Fn(&[(usize, usize)]) -> Option<Vec<Cell>>;

/// ACRO's outputs as results shown beside ours; `locate` turns ACRO's positions into file
/// cells (`None`: the file is not a table we read, the positions stay in the message).
pub fn to_results(outputs: Vec<AcroOutput>, locate: Locate<'_>) -> Vec<CheckResult> {
    outputs
        .into_iter()
        .map(|o| {
            let mut message = o.message;
            let cells = if o.positions.is_empty() {
                vec![]
            } else if let Some(cells) = locate(&o.positions) {
                cells
            } else {
                let list: Vec<String> = o.positions.iter().take(20).map(|(r, c)| format!("[{r}, {c}]")).collect();
                message.push_str(&format!("; ACRO cell positions (0-based, in the values): {}", list.join(" ")));
                vec![]
            };
            CheckResult { check: "acro".into(), verdict: o.verdict, message, cells }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the output of ACRO 0.4's `finalise(path, "json")`.
    pub const RESULTS: &str = r#"{
    "version": "0.4.8",
    "results": {
        "output_0": {
            "uid": "output_0", "status": "fail", "type": "table",
            "properties": {"method": "crosstab"},
            "files": [{"name": "output_0_0.csv", "sdc": {
                "summary": {"suppressed": false, "negative": 0, "missing": 0, "threshold": 2, "p-ratio": 0, "nk-rule": 0, "all-values-are-same": 0},
                "cells": {"negative": [], "missing": [], "threshold": [[0, 1], [2, 0]], "p-ratio": [], "nk-rule": [], "all-values-are-same": []}}}],
            "outcome": {"A": {"x": "ok"}},
            "command": "safe_table = acro.crosstab(df.year, df.grant_type)",
            "summary": "fail; threshold: 2 cells may need suppressing; ",
            "timestamp": "2024-01-01T00:00:00", "comments": [], "exception": "small cells are structural"
        },
        "output_1": {
            "uid": "output_1", "status": "pass", "type": "regression",
            "properties": {"method": "ols", "dof": 806},
            "files": [{"name": "output_1_0.csv", "sdc": {}}],
            "outcome": {}, "command": "acro.ols(...)", "summary": "pass; dof=806.0 >= 10",
            "timestamp": "2024-01-01T00:00:01", "comments": [], "exception": ""
        }
    },
    "session_summary": {"DO_NOT_RELEASE": true, "purpose": "Session summary", "data": []}
}"#;

    #[test]
    fn picks_the_outputs_of_the_named_file() {
        let got = outputs_for(RESULTS.as_bytes(), "outbox/output_0_0.csv").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].uid, "output_0");
        assert_eq!(got[0].verdict, Verdict::Fail);
        assert_eq!(got[0].positions, [(0, 1), (2, 0)]);
        assert!(got[0].message.contains("threshold: 2 cells"), "{}", got[0].message);
        assert!(got[0].message.contains("exception requested: small cells are structural"));
        let got = outputs_for(RESULTS.as_bytes(), "output_1_0.csv").unwrap();
        assert_eq!((got[0].verdict, got[0].positions.len()), (Verdict::Pass, 0));
        assert!(outputs_for(RESULTS.as_bytes(), "other.csv").unwrap().is_empty());
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        assert!(matches!(outputs_for(b"{not json", "a.csv"), Err(AcroError::NotJson(_))));
        assert_eq!(outputs_for(b"[]", "a.csv"), Err(AcroError::NoResults));
        assert_eq!(
            outputs_for(br#"{"results": {"o": 3}}"#, "a.csv"),
            Err(AcroError::Entry { uid: "o".into(), what: "not an object" })
        );
        assert_eq!(
            outputs_for(br#"{"results": {"o": {"files": []}}}"#, "a.csv"),
            Err(AcroError::Entry { uid: "o".into(), what: "no \"status\"" })
        );
        let odd = br#"{"results": {"o": {"status": "maybe", "files": [{"name": "a.csv"}]}}}"#;
        let got = outputs_for(odd, "a.csv").unwrap();
        assert_eq!(got[0].verdict, Verdict::Review, "an unknown status is review");
    }
}
