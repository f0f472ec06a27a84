//! Naming rules shared by validation in the operator, the webhook and the CLI.

/// Namespace that holds a project's workspaces.
pub fn project_namespace(project: &str) -> String {
    format!("noexit-{project}")
}

/// The project a namespace belongs to, if it is a project namespace.
pub fn project_of_namespace(namespace: &str) -> Option<&str> {
    namespace.strip_prefix("noexit-").filter(|p| !p.is_empty())
}

/// Longest project name: `noexit-` plus the name must fit a 63-character namespace label.
pub const MAX_PROJECT_NAME: usize = 63 - "noexit-".len();

/// Project names noexit keeps for itself: `noexit-system` is the default operator namespace
/// (a Project named `system` would adopt it, put default-deny around the control plane, and
/// take the CA with it when deleted), and the others name namespaces a site may run noexit or
/// cluster services in. Names starting `kube-` are refused too (confusable with system
/// namespaces). The site's own operator namespace is refused on top, by [`check_project_name`].
pub const RESERVED_PROJECT_NAMES: &[&str] =
    &["system", "operator", "control-plane", "controller", "default", "kube", "public", "monitoring"];

/// CEL form of the fixed part of [`check_project_name`], for `x-kubernetes-validations`.
pub const RESERVED_PROJECT_CEL: &str = "!(self.metadata.name in ['system', 'operator', 'control-plane', 'controller', 'default', 'kube', 'public', 'monitoring']) && !self.metadata.name.startsWith('kube-')";

/// A project name is a label of at most [`MAX_PROJECT_NAME`] characters, not reserved, and its
/// namespace `noexit-<name>` is not `operator_namespace` (where the control plane runs).
pub fn check_project_name(name: &str, operator_namespace: &str) -> Result<(), String> {
    check_dns1123_label(name, MAX_PROJECT_NAME)?;
    if RESERVED_PROJECT_NAMES.contains(&name) || name.starts_with("kube-") {
        return Err(format!(
            "{name:?} is reserved (its namespace {:?} is kept for noexit or the cluster)",
            project_namespace(name)
        ));
    }
    if project_namespace(name) == operator_namespace {
        return Err(format!(
            "{name:?} is reserved: its namespace {operator_namespace:?} is where the noexit control plane runs"
        ));
    }
    Ok(())
}

/// RFC 1123 label (what Kubernetes calls a DNS-1123 label): lower-case alphanumerics and '-',
/// starting and ending alphanumeric, at most `max` characters.
pub fn check_dns1123_label(value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > max {
        return Err(format!("must be at most {max} characters (is {})", value.len()));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !value.chars().all(ok_char) {
        return Err("must consist of lower-case letters, digits and '-'".into());
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// CEL form of [`check_dns1123_label`], for `x-kubernetes-validations`.
pub const DNS1123_LABEL_CEL: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(check_dns1123_label("ward-7", 63).is_ok());
        assert!(check_dns1123_label("Ward", 63).is_err());
        assert!(check_dns1123_label("-a", 63).is_err());
        assert!(check_dns1123_label("a-", 63).is_err());
        assert!(check_dns1123_label("", 63).is_err());
        assert!(check_dns1123_label(&"a".repeat(64), 63).is_err());
        assert!(check_dns1123_label("a_b", 63).is_err());
    }

    #[test]
    fn reserved_project_names_are_refused() {
        assert!(check_project_name("ward-7", "noexit-system").is_ok());
        for name in ["system", "operator", "default", "kube", "kube-system", "kube-x"] {
            let err = check_project_name(name, "noexit-system").expect_err(name);
            assert!(err.contains("reserved"), "{err}");
        }
        // The site's operator namespace, whatever it is called.
        let err = check_project_name("control", "noexit-control").expect_err("operator namespace");
        assert!(err.contains("\"noexit-control\" is where the noexit control plane runs"), "{err}");
        assert!(check_project_name("control", "noexit-system").is_ok());
        // Still a label first.
        assert!(check_project_name("Ward", "noexit-system").is_err());
    }

    #[test]
    fn namespaces_round_trip() {
        assert_eq!(project_namespace("ward-7"), "noexit-ward-7");
        assert_eq!(project_of_namespace("noexit-ward-7"), Some("ward-7"));
        assert_eq!(project_of_namespace("noexit-"), None);
        assert_eq!(project_of_namespace("default"), None);
    }
}
