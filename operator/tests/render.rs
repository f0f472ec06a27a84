//! `noexit-operator render` as an SRE runs it: the real binary on real files.

use std::path::Path;
use std::process::Command;

fn render(files: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_noexit-operator"));
    cmd.arg("render");
    for f in files {
        cmd.arg("-f").arg(f);
    }
    cmd.output().expect("run noexit-operator")
}

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)
}

#[test]
fn renders_the_example_project_with_real_certificates() {
    let out = render(&[&example("ward-7.yaml"), &example("request.yaml")]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).expect("utf8");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("document"))
        .collect();
    // 28 objects, plus per workspace the VNC Secret and the gateway's Role and RoleBinding to
    // read it (2 workspaces), plus the API's RoleBinding for the airlock's OutputRequest mirrors.
    assert_eq!(docs.len(), 35);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "Pod").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "VirtualMachine").count(), 1);
    // The dry run issues real (throwaway) certificates, so the Secret holds a parsable PEM.
    let secret = docs.iter().find(|d| d["kind"] == "Secret" && !d["data"]["tls.crt"].is_null()).expect("secret");
    let pem = secret["data"]["tls.crt"].as_str().expect("tls.crt");
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD.decode(pem).expect("base64");
    assert!(String::from_utf8_lossy(&decoded).starts_with("-----BEGIN CERTIFICATE-----"));
}

/// The single-host example (host paths for the image and the datasets) is still a valid
/// manifest set for the Kubernetes dry run.
#[test]
fn renders_the_single_host_example() {
    let out = render(&[&example("single-host/ward-7.yaml")]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(yaml.matches("\nkind: VirtualMachine\n").count(), 2, "{yaml}");
    assert!(yaml.contains("path: /var/lib/noexit/datasets/icu-2019.img"), "{yaml}");
}

#[test]
fn refuses_a_dataset_not_granted_naming_file_object_and_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(example("ward-7.yaml"))
        .expect("example")
        .replace("grantedTo: [ward-7]\n", "grantedTo: [ward-9]\n");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, text).expect("write");
    let out = render(&[&bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing may be rendered");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "error: {}: workspace ward-7/alice-r: spec.datasets[0]: dataset \"icu-2019\" is not granted to project \"ward-7\"",
        bad.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn malformed_files_get_a_clear_message_not_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        ("kind: [unclosed", "not valid YAML"),
        (
            "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {name: p}\nspec: {members: oops}\n",
            "project p: spec.members: invalid type",
        ),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n", "is not a noexit resource"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&f, text).expect("write");
        let out = render(&[&f]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr} should contain {expected}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = render(&[&dir.path().join("missing.yaml")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
