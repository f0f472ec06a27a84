//! Loading and checking the agent's config file. Every error names the file and the field.

use std::path::{Path, PathBuf};

use noexit_crds::agent::AgentConfig;
use noexit_crds::names::check_dns1123_label;

use crate::dlp::DlpError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: field `{field}`: {message}")]
    Parse { path: PathBuf, field: String, message: String },
    #[error("config {path}: field `{field}`: {problem}")]
    Invalid { path: PathBuf, field: String, problem: String },
}

/// Read, parse and validate the config at `path`.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let cfg: AgentConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        ConfigError::Parse {
            path: path.into(),
            field: if field == "." { "(top level)".into() } else { field },
            message: e.into_inner().to_string(),
        }
    })?;
    validate(&cfg).map_err(|(field, problem)| ConfigError::Invalid { path: path.into(), field, problem })?;
    Ok(cfg)
}

/// Checks serde cannot express. Returns the field (as written in YAML) and the problem.
pub fn validate(cfg: &AgentConfig) -> Result<(), (String, String)> {
    let field = |f: &str, p: String| Err((f.to_owned(), p));
    if let Err(p) = check_dns1123_label(&cfg.workspace.project, 63) {
        return field("workspace.project", p);
    }
    if let Err(p) = check_dns1123_label(&cfg.workspace.name, 63) {
        return field("workspace.name", p);
    }
    let url = &cfg.control_plane.url;
    match url.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
        Ok(_) => return field("controlPlane.url", format!("{url:?} must be an https:// URL with a host")),
        Err(e) => return field("controlPlane.url", format!("{url:?} is not a URL: {e}")),
    }
    for (name, p) in [
        ("controlPlane.caFile", &cfg.control_plane.ca_file),
        ("controlPlane.certFile", &cfg.control_plane.cert_file),
        ("controlPlane.keyFile", &cfg.control_plane.key_file),
        ("outbox", &cfg.outbox),
        ("inbox", &cfg.inbox),
        ("spool", &cfg.spool),
    ] {
        if !p.is_absolute() {
            return field(name, format!("{} must be an absolute path", p.display()));
        }
    }
    if cfg.outbox.starts_with(&cfg.spool) || cfg.spool.starts_with(&cfg.outbox) {
        return field("spool", "must not be inside the outbox (or contain it)".into());
    }
    if cfg.inbox.starts_with(&cfg.outbox) || cfg.outbox.starts_with(&cfg.inbox) {
        return field(
            "inbox",
            "must not be inside the outbox (or contain it): inbox files would go straight out".into(),
        );
    }
    if cfg.inbox.starts_with(&cfg.spool) || cfg.spool.starts_with(&cfg.inbox) {
        return field("inbox", "must not be inside the spool (or contain it)".into());
    }
    if !(1..=300).contains(&cfg.heartbeat_seconds) {
        return field("heartbeatSeconds", format!("{} must be between 1 and 300", cfg.heartbeat_seconds));
    }
    if cfg.dlp.max_scan_bytes == Some(0) {
        return field("dlp.maxScanBytes", "must be greater than 0".into());
    }
    if let Err(e) = crate::dlp::detectors(&cfg.dlp) {
        let f = match &e {
            DlpError::Pattern { index, .. } => format!("dlp.extraPatterns[{index}].regex"),
            DlpError::EmptyName { index } => format!("dlp.extraPatterns[{index}].name"),
        };
        return field(&f, e.to_string());
    }
    Ok(())
}

#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"
workspace: { project: ward-7, name: alice-r }
controlPlane:
  url: https://noexit-api.noexit-system.svc:8443
  caFile: /etc/noexit/ca.crt
  certFile: /etc/noexit/tls.crt
  keyFile: /etc/noexit/tls.key
egress:
  resolvers: [10.96.0.10]
  endpoints: [{ name: mirror, address: 10.96.0.20, port: 443 }]
  desktopPort: 5901
mode: pod
desktop: vnc
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("/etc/noexit/agent.yaml"), text).unwrap_err().to_string()
    }

    #[test]
    fn example_loads_with_defaults() {
        let cfg = parse(Path::new("x.yaml"), EXAMPLE).unwrap();
        assert_eq!(cfg.outbox, Path::new("/outbox"));
        assert_eq!(cfg.inbox, Path::new("/inbox"));
        assert_eq!(cfg.heartbeat_seconds, 5);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = err(&EXAMPLE.replace("desktop: vnc", "desktop: teams"));
        assert!(e.starts_with("config /etc/noexit/agent.yaml: field `desktop`:"), "{e}");
        let e = err(&EXAMPLE.replace("port: 443", "port: http"));
        assert!(e.contains("field `egress.endpoints[0].port`"), "{e}");
        let e = err(&EXAMPLE.replace("https://noexit-api", "http://noexit-api"));
        assert!(e.contains("field `controlPlane.url`: \"http://"), "{e}");
        let e = err(&EXAMPLE.replace("mode: pod", "mode: pod\nheartbeatSeconds: 0"));
        assert!(e.contains("field `heartbeatSeconds`"), "{e}");
        let e = err(&EXAMPLE.replace("mode: pod", "mode: pod\ndlp: { extraPatterns: [{ name: x, regex: '(' }] }"));
        assert!(e.contains("field `dlp.extraPatterns[0].regex`"), "{e}");
        let e = err(&EXAMPLE.replace("mode: pod", "mode: pod\nspool: /outbox/.spool"));
        assert!(e.contains("field `spool`"), "{e}");
        let e = err(&EXAMPLE.replace("mode: pod", "mode: pod\ninbox: /outbox/in"));
        assert!(e.contains("field `inbox`"), "{e}");
        let e = err(&EXAMPLE.replace("mode: pod", "mode: pod\ninbox: relative"));
        assert!(e.contains("field `inbox`"), "{e}");
        let e = err(&EXAMPLE.replace("mode: pod", "mode: pod\nsurprise: 1"));
        assert!(e.contains("unknown field `surprise`"), "{e}");
        let e = load(Path::new("/nonexistent/agent.yaml")).unwrap_err().to_string();
        assert!(e.starts_with("config /nonexistent/agent.yaml: cannot read"), "{e}");
    }
}
