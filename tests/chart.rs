//! Checks of the Helm chart that need no `helm` binary (none is installed here; see
//! docs/sre.md): the plain YAML files parse, every `.Values` path a template uses exists, the
//! `site:` values are a valid site file equal to `examples/site.yaml`, `values.yaml` satisfies
//! `values.schema.json`, template actions are balanced, and each template still parses as YAML
//! with its actions blanked out, with the fields a restricted, probed, least-privilege install
//! needs.

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
        .expect("values.site is a valid site file (operator/common/src/site.rs)");
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
    assert_eq!(
        names,
        BTreeSet::from([
            "noexit-api",
            "noexit-controller",
            "noexit-dns",
            "noexit-gateway",
            "noexit-mirror",
            "noexit-webhook"
        ])
    );
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
            // The controller's rights in project namespaces (bound there only, see below).
            if touches_secrets && reads && name != "noexit-controller-project" {
                assert!(
                    !rule["resourceNames"].is_null() && !verbs.contains(&"list") && !verbs.contains(&"watch"),
                    "{file}: {name} reads secrets beyond one named Secret"
                );
            }
            assert!(!verbs.contains(&"*"), "{file}: {name} uses a wildcard verb");
        }
    }
}

fn schema() -> serde_json::Value {
    serde_json::from_str(&read("values.schema.json")).expect("values.schema.json parses")
}

/// The part of JSON Schema the chart's schema uses: type, properties, additionalProperties,
/// enum, minimum, maximum, minLength, items. Returns every violation with its path.
fn violations(value: &serde_json::Value, schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value as J;
    let type_ok = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    };
    match &schema["type"] {
        J::String(t) if !type_ok(t) => out.push(format!("{path}: not {t}")),
        J::Array(ts) if !ts.iter().filter_map(J::as_str).any(type_ok) => out.push(format!("{path}: wrong type")),
        _ => {}
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{path}: {value} not one of {allowed:?}"));
    }
    if let (Some(min), Some(v)) = (schema["minimum"].as_i64(), value.as_i64())
        && v < min
    {
        out.push(format!("{path}: {v} < {min}"));
    }
    if let (Some(max), Some(v)) = (schema["maximum"].as_i64(), value.as_i64())
        && v > max
    {
        out.push(format!("{path}: {v} > {max}"));
    }
    if let (Some(min), Some(v)) = (schema["minLength"].as_u64(), value.as_str())
        && (v.len() as u64) < min
    {
        out.push(format!("{path}: shorter than {min}"));
    }
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            match schema["properties"].get(k) {
                Some(s) => violations(v, s, &format!("{path}.{k}"), out),
                None if schema["additionalProperties"] == J::Bool(false) => {
                    out.push(format!("{path}.{k}: not in the schema"))
                }
                None => {
                    if schema["additionalProperties"].is_object() {
                        violations(v, &schema["additionalProperties"], &format!("{path}.{k}"), out);
                    }
                }
            }
        }
    }
    if let (Some(items), Some(s)) = (value.as_array(), schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            violations(v, s, &format!("{path}[{i}]"), out);
        }
    }
}

#[test]
fn values_satisfy_the_values_schema() {
    let values: serde_json::Value = serde_json::to_value(values()).expect("values as JSON");
    let mut out = Vec::new();
    violations(&values, &schema(), "", &mut out);
    assert!(out.is_empty(), "values.yaml violates values.schema.json: {out:#?}");

    // The schema refuses what Helm should refuse.
    let mut bad = values.clone();
    bad["webhook"]["failurPolicy"] = serde_json::json!("Ignore");
    bad["webhook"]["failurePolicy"] = serde_json::json!("Sometimes");
    bad["controller"]["replicas"] = serde_json::json!(0);
    let mut out = Vec::new();
    violations(&bad, &schema(), "", &mut out);
    assert_eq!(out.len(), 3, "{out:#?}");
}

#[test]
fn the_schema_names_exactly_the_site_file_keys() {
    let site = serde_json::to_value(Site::default()).expect("site as JSON");
    let keys = |v: &serde_json::Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        keys(&schema()["properties"]["site"]["properties"]),
        keys(&site),
        "values.schema.json `site` and operator/common/src/site.rs disagree"
    );
}

/// The controller's mirror-config reconciler watches workspace pods everywhere and reads and
/// patches the one ConfigMap `noexit-mirror-config` (by name) in the release namespace.
#[test]
fn the_controller_may_keep_the_mirror_config_current() {
    let objects = objects();
    let allows = |kind: &str, name: &str, resource: &str, verb: &str, resource_name: Option<&str>| {
        objects.iter().any(|(_, o)| {
            o["kind"].as_str() == Some(kind)
                && o["metadata"]["name"].as_str() == Some(name)
                && o["rules"].as_sequence().into_iter().flatten().any(|r| {
                    let has = |field: &str, want: &str| {
                        r[field].as_sequence().into_iter().flatten().any(|v| v.as_str() == Some(want))
                    };
                    has("resources", resource)
                        && has("verbs", verb)
                        && resource_name.is_none_or(|n| r["resourceNames"].is_null() || has("resourceNames", n))
                })
        })
    };
    let bound = |role_kind: &str, role: &str| {
        objects.iter().any(|(_, o)| {
            o["roleRef"]["kind"].as_str() == Some(role_kind)
                && o["roleRef"]["name"].as_str() == Some(role)
                && o["subjects"].as_sequence().into_iter().flatten().any(|s| s["name"] == "noexit-controller")
        })
    };
    for verb in ["list", "watch"] {
        assert!(allows("ClusterRole", "noexit-controller", "pods", verb, None), "pods {verb}");
    }
    assert!(bound("ClusterRole", "noexit-controller"));
    let role = "noexit-controller-mirror-config";
    for verb in ["get", "list", "watch", "patch"] {
        assert!(allows("Role", role, "configmaps", verb, Some("noexit-mirror-config")), "configmaps {verb}");
    }
    assert!(bound("Role", role));
}

/// The DNS wall: workspaces resolve through noexit's own DNS server only. Its Service has the
/// site's fixed address on port 53 (what workspace pods, VMs and agents are given), only
/// project namespaces may query it, and it may reach nothing but the audit database: it has
/// no upstream to forward to. None of this depends on `networkPolicy.enabled`.
#[test]
fn the_chart_deploys_the_workspace_dns_server_behind_its_own_walls() {
    let text = read("templates/dns.yaml");
    assert!(!text.contains(".Values.networkPolicy.enabled"), "the DNS wall must not be optional");
    let objects: Vec<Value> = objects().into_iter().filter(|(f, _)| f == "dns.yaml").map(|(_, o)| o).collect();
    let get = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("dns.yaml has no {kind} {name}"))
    };
    let deployment = get("Deployment", "noexit-dns");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "dns");
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    for flag in ["--site=/etc/noexit/site.yaml", "--clients=/etc/noexit-mirror/clients.yaml"] {
        assert!(args.contains(&flag), "{flag} missing: {args:?}");
    }
    assert!(text.contains("--listen=0.0.0.0:{{ .Values.site.dns.port }}"));
    assert!(text.contains("name: NOEXIT_DATABASE_URL"), "refused names are audited into the shared log");

    // The Service: the site's address, port 53 over UDP and TCP.
    assert!(text.contains("clusterIP: {{ .Values.site.dns.address }}"));
    assert!(text.contains("name: {{ .Values.site.dns.service }}"));
    let service = objects.iter().find(|o| o["kind"] == "Service").expect("a Service");
    let ports: BTreeSet<(i64, &str)> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_i64().unwrap(), p["protocol"].as_str().unwrap()))
        .collect();
    assert_eq!(ports, BTreeSet::from([(53, "TCP"), (53, "UDP")]));

    // Ingress: DNS from project namespaces only (UDP and TCP), metrics from Prometheus.
    let ingress = &get("NetworkPolicy", "noexit-dns-ingress")["spec"];
    assert_eq!(ingress["policyTypes"], serde_yaml::from_str::<Value>("[Ingress]").unwrap());
    let dns_rule = &ingress["ingress"][0];
    assert_eq!(dns_rule["from"].as_sequence().unwrap().len(), 1);
    assert_eq!(dns_rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["key"], "noexit.io/project");
    assert!(dns_rule["from"][0]["podSelector"].is_null());
    let protocols: BTreeSet<&str> =
        dns_rule["ports"].as_sequence().unwrap().iter().filter_map(|p| p["protocol"].as_str()).collect();
    assert_eq!(protocols, BTreeSet::from(["TCP", "UDP"]));
    assert!(text.contains("- {port: {{ .Values.site.dns.port }}, protocol: UDP}"));

    // Egress: the audit database only. No port 53 anywhere: nothing to forward to.
    let egress = &get("NetworkPolicy", "noexit-dns-egress")["spec"];
    assert_eq!(egress["policyTypes"], serde_yaml::from_str::<Value>("[Egress]").unwrap());
    let rules = egress["egress"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["ports"].as_sequence().map(Vec::len), Some(1));
    assert!(text.contains("ports: [{port: {{ .Values.networkPolicy.database.port }}, protocol: TCP}]"));
    assert_eq!(rules[0]["to"].as_sequence().map(Vec::len), Some(1), "the database pods only");
    assert!(rules[0]["to"][0]["namespaceSelector"].is_mapping() && rules[0]["to"][0]["podSelector"].is_mapping());
    // Nor may the cluster-DNS allow of the operator namespace reach this pod.
    let policies = read("templates/networkpolicies.yaml");
    assert!(policies.contains("- {key: app.kubernetes.io/component, operator: NotIn, values: [dns]}"));

    // The site the chart renders sends workspaces there, not to kube-dns.
    let site: Site = serde_yaml::from_value(values()["site"].clone()).expect("site");
    assert_eq!(site.dns.service, "noexit-dns");
    assert_eq!(site.dns.pod_labels["app.kubernetes.io/component"], "dns");
    assert_ne!(site.dns.address, "10.96.0.10", "kube-dns forwards names to the internet");
    // (kube-dns stays only as the control plane's own resolver, networkPolicy.clusterDns.)
    assert!(!serde_yaml::to_string(&values()["site"]).unwrap().contains("kube-dns"));
}

/// `(role kind, role name)` of every binding whose subjects include the ServiceAccount `sa`.
fn roles_bound_to(objects: &[(String, Value)], sa: &str) -> Vec<(String, String, String)> {
    objects
        .iter()
        .filter(|(_, o)| matches!(o["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding")))
        .filter(|(_, o)| {
            o["subjects"].as_sequence().into_iter().flatten().any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa)
        })
        .map(|(_, o)| {
            (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["roleRef"]["kind"].as_str().unwrap_or_default().to_owned(),
                o["roleRef"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn rules_of<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|(_, o)| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .flat_map(|(_, o)| o["rules"].as_sequence().into_iter().flatten())
        .collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str()).collect()
}

const WRITE: &[&str] = &["create", "update", "patch", "delete", "deletecollection", "*"];

/// Issue 9: nothing the chart binds cluster-wide may write Secrets or Pods (nor read Secrets):
/// the controller's rights over them come from the ClusterRole noexit-controller-project, which
/// the chart never binds cluster-wide and the controller binds only in the project namespaces
/// it creates (`project::build`, RoleBinding `noexit-controller`).
#[test]
fn nothing_bound_cluster_wide_writes_secrets_or_pods() {
    use noexit_operator::controllers::project::build::{
        API_PROJECT_ROLE, CONTROLLER_PROJECT_ROLE, CONTROLLER_SERVICE_ACCOUNT,
    };
    let objects = objects();
    let cluster_wide: Vec<&str> = objects
        .iter()
        .filter(|(_, o)| o["kind"] == "ClusterRoleBinding")
        .filter_map(|(_, o)| o["roleRef"]["name"].as_str())
        .collect();
    assert!(!cluster_wide.is_empty());
    assert!(!cluster_wide.contains(&CONTROLLER_PROJECT_ROLE), "{CONTROLLER_PROJECT_ROLE} is bound cluster-wide");
    for role in &cluster_wide {
        for rule in rules_of(&objects, "ClusterRole", role) {
            let resources = strings(&rule["resources"]);
            let verbs = strings(&rule["verbs"]);
            for kind in ["secrets", "pods", "*"] {
                if resources.contains(&kind) {
                    let writes: Vec<_> = verbs.iter().filter(|v| WRITE.contains(v)).collect();
                    assert!(writes.is_empty(), "ClusterRole {role} (bound cluster-wide) may {writes:?} {kind}");
                }
            }
            if resources.contains(&"secrets") {
                panic!("ClusterRole {role} (bound cluster-wide) touches secrets: {verbs:?}");
            }
        }
    }
    // The per-project ClusterRole exists and carries what the controller writes there.
    let project = rules_of(&objects, "ClusterRole", CONTROLLER_PROJECT_ROLE);
    for kind in ["secrets", "pods", "services", "roles", "rolebindings", "networkpolicies", "virtualmachines"] {
        assert!(
            project.iter().any(|r| strings(&r["resources"]).contains(&kind) && strings(&r["verbs"]).contains(&"patch")),
            "{CONTROLLER_PROJECT_ROLE} cannot patch {kind}"
        );
    }
    // The controller may create the bootstrap RoleBinding and bind only that ClusterRole.
    assert_eq!(CONTROLLER_SERVICE_ACCOUNT, "noexit-controller");
    let controller = rules_of(&objects, "ClusterRole", "noexit-controller");
    let bind: Vec<_> = controller.iter().filter(|r| strings(&r["verbs"]).contains(&"bind")).collect();
    assert_eq!(bind.len(), 1);
    // The controller may bind only the two per-project ClusterRoles (its own, and the API's).
    assert_eq!(strings(&bind[0]["resourceNames"]), [CONTROLLER_PROJECT_ROLE, API_PROJECT_ROLE]);
    assert!(
        controller.iter().any(|r| strings(&r["resources"]) == ["rolebindings"] && strings(&r["verbs"]) == ["create"])
    );
    // Namespaces are never deleted by the controller (garbage collection does it).
    for r in &controller {
        if strings(&r["resources"]).contains(&"namespaces") {
            assert!(!strings(&r["verbs"]).contains(&"delete"), "the controller may delete namespaces");
        }
    }
}

/// Issue 11: the API writes the airlock's OutputRequest mirrors only in project namespaces (the
/// ClusterRole noexit-api-project, bound there by the controller, never cluster-wide), and SREs
/// read them through the aggregated view role, which writes nothing.
#[test]
fn output_request_mirrors_are_written_per_project_and_read_through_view() {
    use noexit_operator::controllers::project::build::{API_PROJECT_ROLE, API_SERVICE_ACCOUNT};
    let objects = objects();
    let cluster_wide: Vec<&str> = objects
        .iter()
        .filter(|(_, o)| o["kind"] == "ClusterRoleBinding")
        .filter_map(|(_, o)| o["roleRef"]["name"].as_str())
        .collect();
    assert!(!cluster_wide.contains(&API_PROJECT_ROLE), "{API_PROJECT_ROLE} is bound cluster-wide");
    for role in &cluster_wide {
        for rule in rules_of(&objects, "ClusterRole", role) {
            let resources = strings(&rule["resources"]);
            if resources.iter().any(|r| r.starts_with("outputrequests") || *r == "*") {
                let writes: Vec<_> = strings(&rule["verbs"]).into_iter().filter(|v| WRITE.contains(v)).collect();
                assert!(writes.is_empty(), "ClusterRole {role} (bound cluster-wide) may {writes:?} outputrequests");
            }
        }
    }
    assert_eq!(API_SERVICE_ACCOUNT, "noexit-api");
    let api = rules_of(&objects, "ClusterRole", API_PROJECT_ROLE);
    let resources: Vec<&str> = api.iter().flat_map(|r| strings(&r["resources"])).collect();
    assert_eq!(resources, ["outputrequests", "outputrequests/status"], "{API_PROJECT_ROLE} grants only the mirrors");
    for r in &api {
        assert!(strings(&r["verbs"]).contains(&"patch"), "{API_PROJECT_ROLE} cannot apply {:?}", r["resources"]);
        assert!(!strings(&r["verbs"]).contains(&"delete"));
    }
    let view = objects
        .iter()
        .find(|(_, o)| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "noexit-outputrequests-view")
        .map(|(_, o)| o)
        .expect("ClusterRole noexit-outputrequests-view");
    assert_eq!(view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"], "true");
    for r in rules_of(&objects, "ClusterRole", "noexit-outputrequests-view") {
        assert_eq!(strings(&r["verbs"]), ["get", "list", "watch"]);
    }
}

/// Issue 9: the webhook holds no Secret rights at all (its certificate is mounted from the
/// Secret the controller issues), so it cannot read the CA key; its Deployment mounts that
/// Secret read-only and no longer issues or patches anything.
#[test]
fn the_webhook_cannot_read_the_ca_secret() {
    let objects = objects();
    let bound = roles_bound_to(&objects, "noexit-webhook");
    assert!(!bound.is_empty(), "the webhook has no bindings at all?");
    for (_, kind, name) in &bound {
        for rule in rules_of(&objects, kind, name) {
            let resources = strings(&rule["resources"]);
            assert!(
                !resources.contains(&"secrets") && !resources.contains(&"*"),
                "{kind} {name} gives the webhook {:?} on secrets",
                strings(&rule["verbs"])
            );
            assert!(
                !resources.contains(&"validatingwebhookconfigurations"),
                "the webhook still patches its configuration ({kind} {name})"
            );
        }
    }
    let text = read("templates/webhook.yaml");
    assert!(!text.contains("--ca-secret"), "the webhook still issues from the CA");
    let (_, webhook) = objects
        .iter()
        .find(|(_, o)| o["kind"] == "Deployment" && o["metadata"]["name"] == "noexit-webhook")
        .expect("webhook Deployment");
    let mounts = &webhook["spec"]["template"]["spec"]["containers"][0]["volumeMounts"];
    let tls = mounts.as_sequence().unwrap().iter().find(|m| m["name"] == "tls").expect("tls mount");
    assert_eq!(tls["readOnly"], true);
    // The controller issues it, into the Secret the webhook mounts.
    let controller = read("templates/controller.yaml");
    assert!(controller.contains("--webhook-secret={{ include \"noexit.webhookTlsSecret\" . }}"), "{controller}");
    assert!(controller.contains("--webhook-configuration="));
    assert_eq!(values()["webhook"]["tls"]["issuedByController"], true);
}

/// Issue 9: the control plane's NetworkPolicies are on by default, deny both ways, and every
/// egress rule names its destination (`to:` with a namespace/pod selector or an ipBlock), not
/// just a port.
#[test]
fn network_policies_are_on_by_default_with_destinations() {
    assert_eq!(values()["networkPolicy"]["enabled"], true, "NetworkPolicies must be on by default");
    let policies: Vec<Value> =
        objects().into_iter().filter(|(_, o)| o["kind"] == "NetworkPolicy").map(|(_, o)| o).collect();
    let deny = policies.iter().find(|p| p["metadata"]["name"] == "noexit-default-deny").expect("a default deny");
    assert_eq!(deny["spec"]["podSelector"], Value::Mapping(Default::default()));
    assert_eq!(strings(&deny["spec"]["policyTypes"]), ["Ingress", "Egress"]);
    let mut egress_for: BTreeSet<String> = BTreeSet::new();
    for p in &policies {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        for rule in p["spec"]["egress"].as_sequence().into_iter().flatten() {
            let to = rule["to"].as_sequence().unwrap_or_else(|| panic!("{name}: an egress rule without `to:`"));
            assert!(!to.is_empty(), "{name}: empty `to:`");
            for peer in to {
                let named = ["namespaceSelector", "podSelector", "ipBlock"].iter().any(|k| !peer[*k].is_null());
                assert!(named, "{name}: a peer without a selector or ipBlock: {peer:?}");
                if let Some(cidr) = peer["ipBlock"]["cidr"].as_str()
                    && cidr == "0.0.0.0/0"
                {
                    assert!(
                        !peer["ipBlock"]["except"].is_null(),
                        "{name}: the whole internet, private ranges included"
                    );
                }
            }
            assert!(!rule["ports"].is_null(), "{name}: an egress rule without ports");
            egress_for.insert(name.to_owned());
        }
    }
    // Where each component may go: DNS (all), the Kubernetes API (controller, webhook, api),
    // the api (controller), the database and HTTPS outside (api, mirror).
    for name in [
        "noexit-allow-cluster-dns",
        "noexit-allow-kubernetes-api",
        "noexit-controller-egress",
        "noexit-api-egress",
        "noexit-mirror-egress",
    ] {
        assert!(egress_for.contains(name), "no egress policy {name}");
    }
    let api = policies.iter().find(|p| p["metadata"]["name"] == "noexit-allow-kubernetes-api").expect("api policy");
    assert_eq!(strings(&api["spec"]["podSelector"]["matchExpressions"][0]["values"]), ["controller", "webhook", "api"]);
    let text = read("templates/networkpolicies.yaml");
    assert!(text.contains("range $np.kubernetesApi.cidrs"), "the Kubernetes API is reached by ipBlock");
}

/// Issue 10: the gateway ships on, and the chart and the controller agree on who reaches a
/// desktop: the project NetworkPolicy the controller renders (from `values.site`) admits the
/// chart's gateway pods (labels, release namespace) on the port the gateway's own egress allows,
/// and no other Deployment of the chart; each workspace's Role lets the chart's gateway
/// ServiceAccount `get` that workspace's VNC Secret by name, and nothing the chart binds lets it
/// read Secrets.
#[test]
fn the_gateway_is_on_and_alone_reaches_desktops_and_reads_only_vnc_secrets_by_name() {
    use noexit_operator::controllers::workspace::build::VncCredential;
    use noexit_operator::controllers::workspace::{AgentCredentials, build::vnc_secret_name};
    use noexit_operator::manifests::parse_documents;
    use noexit_operator::render::{Inputs, render};

    let values = values();
    assert_eq!(values["gateway"]["enabled"], true, "the gateway ships enabled");
    let mut site: Site = serde_yaml::from_value(values["site"].clone()).expect("site");
    // site-configmap.yaml puts both in the release namespace.
    site.operator_namespace = "noexit-system".into();
    site.gateway.namespace = "noexit-system".into();
    let cm = read("templates/site-configmap.yaml");
    assert!(cm.contains(r#"set $site.gateway "namespace" .Release.Namespace"#), "gateway namespace not set");

    let objects = objects();
    let deployments: Vec<&Value> = objects.iter().filter(|(_, o)| o["kind"] == "Deployment").map(|(_, o)| o).collect();
    let gateway = deployments.iter().find(|d| d["metadata"]["name"] == "noexit-gateway").expect("gateway");
    let pod = &gateway["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"].as_str(), Some(site.gateway.service_account.as_str()));
    let gateway_text = read("templates/gateway.yaml");
    assert!(
        gateway_text.contains(r#"include "noexit.labels" (dict "root" . "component" "gateway")"#)
            || gateway_text.contains(r#"$labels := dict "root" . "component" "gateway""#)
    );
    // The chart's selector labels for a component (templates/_helpers.tpl).
    let chart_labels = |component: &str| {
        std::collections::BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "noexit".to_owned()),
            ("app.kubernetes.io/component".to_owned(), component.to_owned()),
        ])
    };
    assert!(read("templates/_helpers.tpl").contains("app.kubernetes.io/component: {{ .component }}"));

    // What the controller renders for the example project and its workspaces.
    let mut inputs = Inputs::default();
    inputs
        .add("examples/ward-7.yaml", parse_documents(include_str!("../examples/ward-7.yaml")).expect("example parses"));
    let creds = |_: &_| {
        Ok(AgentCredentials {
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_pem: String::new(),
            serial: "1".into(),
            not_after: "2099-01-01T00:00:00Z".into(),
        })
    };
    let now = "2026-11-22T10:00:00Z".parse().expect("time");
    let mut site_any = site.clone();
    site_any.workspace_images = Default::default();
    let rendered = render(&inputs, &site_any, now, creds, |_| VncCredential { password: "x".into() })
        .expect("the example renders");
    let children: Vec<serde_json::Value> = rendered
        .iter()
        .flat_map(|r| r.children.iter())
        .map(|c| serde_json::to_value(&c.object).expect("json"))
        .collect();
    let policy = children
        .iter()
        .find(|c| c["kind"] == "NetworkPolicy" && c["metadata"]["name"] == "noexit-allow-gateway-desktop")
        .expect("the project's gateway → desktop policy");
    let rules = policy["spec"]["ingress"].as_array().expect("ingress");
    assert_eq!(rules.len(), 1);
    let from = rules[0]["from"].as_array().expect("from");
    assert_eq!(from.len(), 1, "one peer: the gateway");
    let peer = &from[0];
    assert_eq!(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "noexit-system");
    let selected: std::collections::BTreeMap<String, String> =
        serde_json::from_value(peer["podSelector"]["matchLabels"].clone()).expect("labels");
    assert_eq!(selected, chart_labels("gateway"), "the policy selects the chart's gateway pods");
    for d in &deployments {
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let component = name.trim_start_matches("noexit-");
        let matches = selected.iter().all(|(k, v)| chart_labels(component).get(k) == Some(v));
        assert_eq!(matches, name == "noexit-gateway", "{name} and the desktop policy");
    }
    assert_eq!(rules[0]["ports"], serde_json::json!([{"port": site.desktop_port, "protocol": "TCP"}]));
    // The gateway's own egress names that port in project namespaces.
    assert!(gateway_text.contains("ports: [{port: {{ .Values.site.desktopPort }}, protocol: TCP}]"));
    assert!(gateway_text.contains("matchExpressions: [{key: noexit.io/project, operator: Exists}]"));
    let ns = children.iter().find(|c| c["kind"] == "Namespace").expect("namespace");
    assert!(ns["metadata"]["labels"]["noexit.io/project"].is_string(), "project namespaces carry noexit.io/project");

    // Per workspace: a Role reading its VNC Secret by name, bound to the chart's gateway SA.
    let workspaces: Vec<&serde_json::Value> = children
        .iter()
        .filter(|c| {
            c["kind"] == "PersistentVolumeClaim" && c["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-home"))
        })
        .collect();
    assert!(!workspaces.is_empty());
    for home in workspaces {
        let ws = home["metadata"]["name"].as_str().unwrap().trim_start_matches("ws-").trim_end_matches("-home");
        let role_name = format!("ws-{ws}-gateway");
        let role = children.iter().find(|c| c["kind"] == "Role" && c["metadata"]["name"] == role_name).expect("role");
        assert_eq!(
            role["rules"],
            serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [vnc_secret_name(ws)], "verbs": ["get"]}])
        );
        let binding = children
            .iter()
            .find(|c| c["kind"] == "RoleBinding" && c["metadata"]["name"] == role_name)
            .expect("binding");
        assert_eq!(
            binding["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "noexit-gateway", "namespace": "noexit-system"}])
        );
        assert!(children.iter().any(|c| c["kind"] == "Secret" && c["metadata"]["name"] == vnc_secret_name(ws)));
    }
    // Nothing in the chart gives the gateway Secrets.
    for (kind, role_kind, role) in roles_bound_to(&objects, "noexit-gateway") {
        for rule in rules_of(&objects, &role_kind, &role) {
            assert!(!strings(&rule["resources"]).contains(&"secrets"), "{kind} → {role_kind} {role} grants secrets");
        }
    }
}

/// Every audit writer but the API (which makes its own key on its volume) runs as its own
/// database role and signs with its own key: its Deployment takes `NOEXIT_DATABASE_URL` from
/// `audit.<writer>.databaseSecretName`, mounts `audit.<writer>.keySecretName` and points
/// `NOEXIT_AUDIT_KEY` at it; the audit-roles Job gives that writer's URL to `audit-roles`, so
/// the role it connects as is the one the trigger restricts to its own actions.
#[test]
fn each_audit_writer_connects_as_its_own_role_and_signs_with_its_own_key() {
    let values = values();
    let roles = read("templates/audit-roles.yaml");
    for (writer, file, deployment) in [
        ("mirror", "mirror.yaml", "noexit-mirror"),
        ("webhook", "webhook.yaml", "noexit-webhook"),
        ("dns", "dns.yaml", "noexit-dns"),
        ("gateway", "gateway.yaml", "noexit-gateway"),
    ] {
        for key in ["databaseSecretName", "keySecretName"] {
            assert!(values["audit"][writer][key].is_string(), "values audit.{writer}.{key}");
        }
        let text = read(&format!("templates/{file}"));
        let url = format!("secretKeyRef: {{name: {{{{ .Values.audit.{writer}.databaseSecretName }}}}, key: url}}");
        assert!(text.contains(&url), "{file}: NOEXIT_DATABASE_URL is not the {writer}'s own URL");
        let secret = format!("secret: {{secretName: {{{{ .Values.audit.{writer}.keySecretName }}}}");
        assert!(text.contains(&secret), "{file}: the {writer}'s key Secret is not mounted");
        let objects = objects();
        let d = objects
            .iter()
            .find(|(f, o)| f == file && o["kind"] == "Deployment" && o["metadata"]["name"] == deployment)
            .map(|(_, o)| o)
            .unwrap_or_else(|| panic!("{file}: no Deployment {deployment}"));
        let pod = &d["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let env = container["env"].as_sequence().unwrap();
        let key = env.iter().find(|e| e["name"] == "NOEXIT_AUDIT_KEY").unwrap_or_else(|| panic!("{file}: no key"));
        assert_eq!(key["value"], "/audit-key/key.pem", "{file}");
        assert!(env.iter().any(|e| e["name"] == "NOEXIT_DATABASE_URL"), "{file}");
        let mounts = container["volumeMounts"].as_sequence().unwrap();
        assert!(
            mounts.iter().any(|m| m["name"] == "audit-key" && m["mountPath"] == "/audit-key" && m["readOnly"] == true),
            "{file}: {mounts:?}"
        );
        assert!(pod["volumes"].as_sequence().unwrap().iter().any(|v| v["name"] == "audit-key"), "{file}");
        let var = format!("NOEXIT_{}_DATABASE_URL", writer.to_uppercase());
        let role_url = format!("- name: {var}\n              valueFrom:\n                {url}");
        assert!(roles.contains(&role_url), "audit-roles.yaml does not pass {var} from the {writer}'s Secret");
    }
}
