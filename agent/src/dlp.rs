//! The agent's side of the DLP scanner (crate `noexit-dlp`): detectors built from the agent's
//! config, and findings in the wire format.

use noexit_crds::agent::DlpConfig;
pub use noexit_dlp::{Detectors, DlpError, Kind, ScanResult};

/// The built-in detectors plus the site's `dlp.extraPatterns`.
pub fn detectors(cfg: &DlpConfig) -> Result<Detectors, DlpError> {
    let extra: Vec<noexit_dlp::ExtraPattern> = cfg
        .extra_patterns
        .iter()
        .map(|p| noexit_dlp::ExtraPattern { name: p.name.clone(), regex: p.regex.clone() })
        .collect();
    Detectors::new(&extra)
}

/// Findings as sent in an outbox manifest.
pub fn findings(result: &ScanResult) -> Vec<noexit_crds::agent::Finding> {
    result
        .findings
        .iter()
        .map(|f| noexit_crds::agent::Finding { kind: f.kind.clone(), count: f.count, first_offset: f.first_offset })
        .collect()
}
