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
    fn namespaces_round_trip() {
        assert_eq!(project_namespace("ward-7"), "noexit-ward-7");
        assert_eq!(project_of_namespace("noexit-ward-7"), Some("ward-7"));
        assert_eq!(project_of_namespace("noexit-"), None);
        assert_eq!(project_of_namespace("default"), None);
    }
}
