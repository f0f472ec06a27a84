//! The Helm chart ships the CRDs as files (`charts/noexit/crds/`); they must be exactly what
//! the types generate. Fix a failure with `hack/sync-chart-crds.sh` (after crdgen).

use std::collections::BTreeSet;
use std::path::Path;

fn chart_crds() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/noexit/crds")
}

#[test]
fn chart_crds_match_the_generated_ones() {
    for (name, yaml) in noexit_crds::generated::files() {
        let path = chart_crds().join(&name);
        let in_chart = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run hack/sync-chart-crds.sh", path.display()));
        assert!(in_chart == yaml, "charts/noexit/crds/{name} differs from the types: run hack/sync-chart-crds.sh");
    }
}

#[test]
fn chart_has_no_stale_crds() {
    let wanted: BTreeSet<String> = noexit_crds::generated::files().into_iter().map(|(name, _)| name).collect();
    let present: BTreeSet<String> = std::fs::read_dir(chart_crds())
        .expect("charts/noexit/crds exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present, wanted,
        "charts/noexit/crds/ holds files the types no longer generate: run hack/sync-chart-crds.sh"
    );
}
