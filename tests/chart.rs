//! Checks of the Helm chart that need no `helm` binary (none is installed here; see
//! docs/sre.md): the plain YAML files parse, every `.Values` path a template uses exists, the
//! `site:` values are a valid site file equal to `examples/site.yaml`, template actions are
//! balanced, and each template still parses as YAML with its actions blanked out, with the
//! fields a restricted, probed, least-privilege install needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use noexit_operator::controllers::Site;
use regex::Regex;
use serde_yaml::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/noexit")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(chart().join(rel)).unwrap_or_else(|e| panic!("charts/noexit/{rel}: {e}"))
}

fn values() -> Value {
    serde_yaml::from_str(&read("values.yaml")).expect("values.yaml parses")
}

/// `(file name, text)` of every file in `templates/`.
fn templates() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(chart().join("templates"))
        .expect("templates/")
        .map(|e| e.expect("entry").path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn chart_metadata_parses() {
    let chart: Value = serde_yaml::from_str(&read("Chart.yaml")).expect("Chart.yaml parses");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "noexit");
    assert!(chart["version"].as_str().is_some_and(|v| v.split('.').count() == 3));
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")));
}

#[test]
fn site_values_are_a_valid_site_file_equal_to_the_example() {
    let mut from_values: Site = serde_yaml::from_value(values()["site"].clone())
        .expect("values.site is a valid site file (operator/src/controllers/site.rs)");
    // The chart sets operatorNamespace to the release namespace.
    from_values.operator_namespace = "noexit-system".into();
    let example: Site = serde_yaml::from_str(include_str!("../examples/site.yaml")).expect("examples/site.yaml");
    assert_eq!(from_values, example, "values.yaml `site:` and examples/site.yaml disagree");
}

#[test]
fn every_values_path_used_by_a_template_exists() {
    let re = Regex::new(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)").unwrap();
    let values = values();
    let mut missing = BTreeSet::new();
    for (file, text) in templates() {
        for cap in re.captures_iter(&text) {
            let path = &cap[1];
            let mut node = &values;
            for key in path.trim_start_matches('.').split('.') {
                node = &node[key];
            }
            if node.is_null() && !path_exists(&values, path) {
                missing.insert(format!("{file}: .Values{path}"));
            }
        }
    }
    assert!(missing.is_empty(), "templates use values not in values.yaml: {missing:#?}");
}

/// A key may exist with a null/empty value; only a missing key is an error.
fn path_exists(values: &Value, path: &str) -> bool {
    let mut node = values;
    for key in path.trim_start_matches('.').split('.') {
        match node.as_mapping().and_then(|m| m.get(key)) {
            Some(next) => node = next,
            None => return false,
        }
    }
    true
}

#[test]
fn template_actions_are_balanced_and_includes_are_defined() {
    let helpers = read("templates/_helpers.tpl");
    let defined: BTreeSet<String> =
        Regex::new(r#"define "([^"]+)""#).unwrap().captures_iter(&helpers).map(|c| c[1].to_owned()).collect();
    let include = Regex::new(r#"include "([^"]+)""#).unwrap();
    let opener = Regex::new(r"\{\{-?\s*(if|range|with|define)\b").unwrap();
    let end = Regex::new(r"\{\{-?\s*end\s*-?\}\}").unwrap();
    let any_action = Regex::new(r"(?s)\{\{.*?\}\}").unwrap();
    for (file, text) in templates() {
        let outside = any_action.replace_all(&text, "");
        assert!(!outside.contains("{{"), "{file}: an action is not closed");
        assert_eq!(
            opener.find_iter(&text).count(),
            end.find_iter(&text).count(),
            "{file}: if/range/with/define vs end"
        );
        for cap in include.captures_iter(&text) {
            assert!(defined.contains(&cap[1]), "{file}: include {:?} is not defined in _helpers.tpl", &cap[1]);
        }
    }
}

/// The template with every action removed: whole-line actions dropped, inline ones replaced
/// by a scalar. Both branches of an `if` stay, which is still valid YAML for these templates.
fn blanked(text: &str) -> String {
    let action = Regex::new(r"\{\{.*?\}\}").unwrap();
    let comment = Regex::new(r"(?s)\{\{-?\s*/\*.*?\*/\s*-?\}\}").unwrap();
    let text = comment.replace_all(text, "");
    text.lines()
        .filter(|l| {
            !(l.trim_start().starts_with("{{")
                && l.trim_end().ends_with("}}")
                && action.replace_all(l, "").trim().is_empty())
        })
        .map(|l| action.replace_all(l, "x").into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every object of the chart (templates blanked), as `(file, object)`.
fn objects() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (file, text) in templates() {
        if !file.ends_with(".yaml") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&blanked(&text)) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("templates/{file} is not YAML once actions are blanked: {e}"));
            if !value.is_null() {
                out.push((file.clone(), value));
            }
        }
    }
    out
}

#[test]
fn every_template_object_has_kind_and_name() {
    let objects = objects();
    assert!(objects.len() >= 20, "only {} objects", objects.len());
    for (file, o) in &objects {
        assert!(o["apiVersion"].as_str().is_some(), "{file}: object without apiVersion: {o:?}");
        assert!(o["kind"].as_str().is_some(), "{file}: object without kind");
        assert!(
            o["metadata"]["name"].as_str().is_some(),
            "{file}: {} without a name",
            o["kind"].as_str().unwrap_or("?")
        );
    }
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|(_, o)| o["kind"].as_str()).collect();
    for k in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "ValidatingWebhookConfiguration",
        "ConfigMap",
        "PersistentVolumeClaim",
    ] {
        assert!(kinds.contains(k), "the chart has no {k}");
    }
}

#[test]
fn deployments_are_restricted_probed_and_have_their_own_service_account() {
    let deployments: Vec<(String, Value)> = objects().into_iter().filter(|(_, o)| o["kind"] == "Deployment").collect();
    let names: BTreeSet<&str> = deployments.iter().filter_map(|(_, o)| o["metadata"]["name"].as_str()).collect();
    assert_eq!(names, BTreeSet::from(["noexit-api", "noexit-controller", "noexit-mirror", "noexit-webhook"]));
    for (file, d) in &deployments {
        let pod = &d["spec"]["template"]["spec"];
        assert!(pod["serviceAccountName"].as_str().is_some_and(|s| s.starts_with("noexit-")), "{file}");
        let text = read(&format!("templates/{file}"));
        assert!(text.contains("include \"noexit.podCommon\""), "{file}: pod securityContext missing");
        assert!(text.contains("toYaml .Values.securityContext"), "{file}: container securityContext missing");
        for c in pod["containers"].as_sequence().expect("containers") {
            for probe in ["livenessProbe", "readinessProbe"] {
                let path = c[probe]["httpGet"]["path"].as_str();
                assert!(matches!(path, Some("/healthz" | "/readyz")), "{file}: {probe} is {path:?}");
            }
            assert!(!c["args"].as_sequence().expect("args").is_empty(), "{file}: no subcommand");
        }
    }
    let values = values();
    assert_eq!(values["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(values["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(values["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(values["podSecurityContext"]["runAsNonRoot"], true);
    assert_eq!(values["podSecurityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(values["controller"]["replicas"], 2, "the controller runs with a standby for leader election");
}

#[test]
fn the_webhook_configuration_covers_every_kind_and_fails_closed() {
    let (_, vwc) = objects()
        .into_iter()
        .find(|(_, o)| o["kind"] == "ValidatingWebhookConfiguration")
        .expect("a ValidatingWebhookConfiguration");
    let hook = &vwc["webhooks"][0];
    assert_eq!(hook["clientConfig"]["service"]["path"], "/validate");
    assert_eq!(values()["webhook"]["failurePolicy"], "Fail");
    let resources: BTreeSet<&str> =
        hook["rules"][0]["resources"].as_sequence().unwrap().iter().filter_map(|r| r.as_str()).collect();
    for r in ["projects", "datasets", "workspaces", "workspacerequests", "workspacerequests/status"] {
        assert!(resources.contains(r), "the webhook does not see {r}");
    }
}

#[test]
fn no_component_may_read_secrets_except_the_controller() {
    for (file, o) in objects() {
        if !matches!(o["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        let name = o["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        for rule in o["rules"].as_sequence().into_iter().flatten() {
            let touches_secrets = rule["resources"].as_sequence().into_iter().flatten().any(|r| r == "secrets");
            let verbs: Vec<&str> =
                rule["verbs"].as_sequence().into_iter().flatten().filter_map(|v| v.as_str()).collect();
            let reads = verbs.iter().any(|v| matches!(*v, "get" | "list" | "watch"));
            if touches_secrets && reads && name != "noexit-controller" {
                assert!(
                    !rule["resourceNames"].is_null() && !verbs.contains(&"list") && !verbs.contains(&"watch"),
                    "{file}: {name} reads secrets beyond one named Secret"
                );
            }
            assert!(!verbs.contains(&"*"), "{file}: {name} uses a wildcard verb");
        }
    }
}
