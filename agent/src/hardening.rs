//! Desktop and device hardening: the settings that stop data leaving through the remote
//! desktop (clipboard out, drive and printer redirection) and, in a VM, through a USB stick.
//!
//! Every setting is written and then read back from disk and checked by a separate parser, so
//! the reported [`HardeningState`] says what the files say, not what we meant to write. Only the
//! keys noexit manages are touched; a site's other settings in the same files stay.
//!
//! All paths are relative to a `root` (`/` in production, a temp dir in tests), including
//! `proc/modules`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use noexit_crds::agent::{AgentConfig, AgentMode, DesktopKind, HardeningState, Violation, ViolationKind};
use tokio::sync::{mpsc, watch as tokio_watch};

/// TigerVNC settings that override every user's own (`key=value` lines).
pub const VNC_MANDATORY: &str = "etc/tigervnc/vncserver-config-mandatory";
pub const XRDP_INI: &str = "etc/xrdp/xrdp.ini";
pub const SESMAN_INI: &str = "etc/xrdp/sesman.ini";
pub const USB_STORAGE_CONF: &str = "etc/modprobe.d/noexit-usb-storage.conf";
pub const PROC_MODULES: &str = "proc/modules";

const MANAGED_MARK: &str = "# managed by noexit-agent: data must not leave the workspace; edits are reverted";

/// `install … /bin/false` stops both autoloading and `modprobe`; `blacklist` stops alias loads.
pub const USB_STORAGE_RULES: &str = "# managed by noexit-agent: USB mass storage is blocked in research workspaces
install usb-storage /bin/false
install uas /bin/false
blacklist usb-storage
blacklist uas
";
/// Kernel module names (as in `/proc/modules`) that give access to USB drives.
pub const USB_STORAGE_MODULES: [&str; 2] = ["usb_storage", "uas"];

/// The state plus the reasons behind every `false`, for logs and violations.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HardeningReport {
    pub state: HardeningState,
    /// Settings that are not as they must be (file, key, value found).
    pub problems: Vec<String>,
    /// USB storage modules loaded despite the block.
    pub usb_modules_loaded: Vec<String>,
}

impl HardeningReport {
    pub fn violations(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        if !self.usb_modules_loaded.is_empty() {
            out.push(Violation {
                kind: ViolationKind::UsbStorage,
                count: 1,
                detail: format!("USB storage driver loaded despite the block: {}", self.usb_modules_loaded.join(", ")),
            });
        }
        out
    }
}

/// Writes the settings for `cfg` under `root`, then verifies them from disk.
pub fn apply_and_verify(cfg: &AgentConfig, root: &Path) -> HardeningState {
    apply_and_report(cfg, root).state
}

/// [`apply_and_verify`] with the reasons.
pub fn apply_and_report(cfg: &AgentConfig, root: &Path) -> HardeningReport {
    let mut write_errors = Vec::new();
    for (rel, edit) in edits(cfg) {
        if let Err(e) = rewrite(&root.join(rel), &edit) {
            write_errors.push(format!("{rel}: cannot write: {e}"));
        }
    }
    let mut report = verify(cfg, root);
    report.problems.splice(0..0, write_errors);
    report
}

/// Reads the settings back and checks them (no writes).
pub fn verify(cfg: &AgentConfig, root: &Path) -> HardeningReport {
    let mut problems = Vec::new();
    let (clipboard_out_disabled, drive_redirection_disabled) = match cfg.desktop {
        // No desktop server: nothing to copy through.
        DesktopKind::None => (true, true),
        DesktopKind::Vnc => {
            let text = read(root, VNC_MANDATORY, &mut problems);
            let mut out_off = text.is_some();
            for (key, want) in vnc_settings(cfg.clipboard_in) {
                let ok = check(VNC_MANDATORY, key, want, text.as_deref().and_then(|t| kv_get(t, key)), &mut problems);
                // Only SendCutText carries data out; with it off SendPrimary has nothing to send.
                // The other keys are policy (pasting in) and show up as problems.
                if key == "SendCutText" {
                    out_off &= ok;
                }
            }
            // VNC has no drive or printer redirection.
            (out_off, true)
        }
        DesktopKind::Xrdp => {
            let xrdp = read(root, XRDP_INI, &mut problems);
            let sesman = read(root, SESMAN_INI, &mut problems);
            fn get<'a>(text: &'a Option<String>, section: &str, key: &str) -> Option<&'a str> {
                text.as_deref().and_then(|t| ini_get(t, section, key))
            }
            let mut drives = true;
            let mut clip = true;
            for (section, key, want) in xrdp_settings(cfg.clipboard_in) {
                let ok = check(&format!("{XRDP_INI} [{section}]"), key, want, get(&xrdp, section, key), &mut problems);
                if key == "rdpdr" {
                    drives &= ok;
                }
                if key == "cliprdr" {
                    clip &= ok;
                }
            }
            for (section, key, want) in sesman_settings(cfg.clipboard_in) {
                clip &=
                    check(&format!("{SESMAN_INI} [{section}]"), key, want, get(&sesman, section, key), &mut problems);
            }
            (clip && xrdp.is_some() && sesman.is_some(), drives && xrdp.is_some())
        }
    };
    let mut usb_modules_loaded = Vec::new();
    let usb_storage_blocked = (cfg.mode == AgentMode::Vm).then(|| {
        let rules_ok = match read(root, USB_STORAGE_CONF, &mut problems) {
            Some(t) if t == USB_STORAGE_RULES => true,
            Some(_) => {
                problems.push(format!("{USB_STORAGE_CONF}: content differs from the noexit block list"));
                false
            }
            None => false,
        };
        match fs::read_to_string(root.join(PROC_MODULES)) {
            Ok(modules) => usb_modules_loaded = loaded_usb_modules(&modules),
            Err(e) => problems.push(format!("{PROC_MODULES}: cannot read: {e}")),
        }
        rules_ok && usb_modules_loaded.is_empty()
    });
    HardeningReport {
        state: HardeningState { clipboard_out_disabled, drive_redirection_disabled, usb_storage_blocked },
        problems,
        usb_modules_loaded,
    }
}

/// Re-verifies every `interval`. A setting that goes wrong after we wrote and verified it is
/// reported as tamper and written again; a problem that persists (a read-only file system in a
/// pod) is logged once per change, not reported on every pass. A USB storage module that
/// appears is reported once per appearance.
pub async fn watch(
    cfg: AgentConfig,
    root: PathBuf,
    interval: Duration,
    tx: mpsc::Sender<Violation>,
    state: tokio_watch::Sender<HardeningState>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut usb_reported = false;
    // Problems left after our own last write; `None` before the first one.
    let mut known: Option<Vec<String>> = None;
    while !tx.is_closed() {
        ticker.tick().await;
        let (c, r, k) = (cfg.clone(), root.clone(), known.clone());
        let pass = tokio::task::spawn_blocking(move || {
            let seen = verify(&c, &r);
            let new: Vec<String> = match &k {
                None => Vec::new(),
                Some(k) => seen.problems.iter().filter(|p| !k.contains(p)).cloned().collect(),
            };
            if k.is_none() || !new.is_empty() { (apply_and_report(&c, &r), true, new) } else { (seen, false, new) }
        })
        .await;
        let Ok((report, rewritten, tampered)) = pass else { continue };
        if !tampered.is_empty() {
            let detail = format!("desktop/device settings changed and rewritten: {}", tampered.join("; "));
            tracing::warn!(%detail, "hardening tamper");
            let _ = tx.send(Violation { kind: ViolationKind::Tamper, count: 1, detail }).await;
        }
        if rewritten {
            if !report.problems.is_empty() {
                tracing::warn!(problems = %report.problems.join("; "), "hardening not complete");
            }
            known = Some(report.problems.clone());
        }
        let usb_now = !report.usb_modules_loaded.is_empty();
        if usb_now && !usb_reported {
            for v in report.violations() {
                let _ = tx.send(v).await;
            }
        }
        usb_reported = usb_now;
        state.send_replace(report.state);
    }
}

// ---- what to write ------------------------------------------------------------------------

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

fn tf(on: bool) -> &'static str {
    if on { "true" } else { "false" }
}

/// Xvnc parameters: `SendCutText`/`SendPrimary` carry the clipboard out to the viewer,
/// `AcceptCutText`/`SetPrimary` carry it in.
fn vnc_settings(clipboard_in: bool) -> [(&'static str, &'static str); 4] {
    [
        ("SendCutText", "0"),
        ("SendPrimary", "0"),
        ("AcceptCutText", flag(clipboard_in)),
        ("SetPrimary", flag(clipboard_in)),
    ]
}

/// xrdp virtual channels: `cliprdr` clipboard (both ways), `rdpdr` drives/printers/smart cards,
/// `rdpsnd` audio, `drdynvc` dynamic channels, `rail` remote apps, `xrdpvr` video redirection.
fn xrdp_settings(clipboard_in: bool) -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("Channels", "cliprdr", tf(clipboard_in)),
        ("Channels", "rdpdr", "false"),
        ("Channels", "rdpsnd", "false"),
        ("Channels", "drdynvc", "false"),
        ("Channels", "rail", "false"),
        ("Channels", "xrdpvr", "false"),
    ]
}

/// When the clipboard channel must stay on for pasting in, xrdp (≥ 0.9.19) still blocks every
/// format going out.
fn sesman_settings(clipboard_in: bool) -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("Security", "RestrictOutboundClipboard", "all"),
        ("Security", "RestrictInboundClipboard", if clipboard_in { "none" } else { "all" }),
        ("Chansrv", "EnableFuseMount", "false"),
    ]
}

enum Edit {
    KeyValues(Vec<(&'static str, &'static str)>),
    Ini(Vec<(&'static str, &'static str, &'static str)>),
    Whole(&'static str),
}

fn edits(cfg: &AgentConfig) -> Vec<(&'static str, Edit)> {
    let mut out = Vec::new();
    match cfg.desktop {
        DesktopKind::None => {}
        DesktopKind::Vnc => out.push((VNC_MANDATORY, Edit::KeyValues(vnc_settings(cfg.clipboard_in).to_vec()))),
        DesktopKind::Xrdp => {
            out.push((XRDP_INI, Edit::Ini(xrdp_settings(cfg.clipboard_in))));
            out.push((SESMAN_INI, Edit::Ini(sesman_settings(cfg.clipboard_in))));
        }
    }
    if cfg.mode == AgentMode::Vm {
        out.push((USB_STORAGE_CONF, Edit::Whole(USB_STORAGE_RULES)));
    }
    out
}

fn rewrite(path: &Path, edit: &Edit) -> std::io::Result<()> {
    let old = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let new = match edit {
        Edit::KeyValues(settings) => kv_set(&old, settings),
        Edit::Ini(settings) => settings.iter().fold(old.clone(), |text, (s, k, v)| ini_set(&text, s, k, v)),
        Edit::Whole(text) => (*text).to_string(),
    };
    if new == old {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    // Write beside and rename: a desktop server starting now reads the old or the new file,
    // never half of one.
    let tmp = path.with_extension("noexit-tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(new.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

// ---- TigerVNC config files ---------------------------------------------------------------
//
// Two syntaxes share the path: Debian's `tigervncserver` wrapper reads Perl assignments
// (`$SendCutText = "0";`), upstream `vncsession` reads `SendCutText=0`. We keep whichever the
// file already uses; a new file gets the Perl form (Debian is what the images run).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VncSyntax {
    Perl,
    KeyValue,
}

fn vnc_syntax(text: &str) -> VncSyntax {
    let assignments = text.lines().map(str::trim).filter(|l| !l.starts_with('#') && l.contains('='));
    match assignments.map(|l| l.starts_with('$')).next() {
        Some(false) => VncSyntax::KeyValue,
        _ => VncSyntax::Perl,
    }
}

fn kv_key(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.starts_with('#') {
        return None;
    }
    line.split_once('=').map(|(k, _)| k.trim().trim_start_matches('$').trim())
}

/// `"0";` → `0`
fn kv_value(line: &str) -> Option<&str> {
    let (_, v) = line.split_once('=')?;
    let v = v.trim().trim_end_matches(';').trim();
    Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v))
}

/// Drops every line setting one of `settings` (and our old block), appends our block.
fn kv_set(text: &str, settings: &[(&str, &str)]) -> String {
    let syntax = vnc_syntax(text);
    let mut out: Vec<&str> = text
        .lines()
        .filter(|l| *l != MANAGED_MARK && !(syntax == VncSyntax::Perl && l.trim() == "1;"))
        .filter(|l| !kv_key(l).is_some_and(|k| settings.iter().any(|(s, _)| s.eq_ignore_ascii_case(k))))
        .collect();
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    let mut s = out.join("\n");
    if !s.is_empty() {
        s.push_str("\n\n");
    }
    s.push_str(MANAGED_MARK);
    s.push('\n');
    for (k, v) in settings {
        match syntax {
            VncSyntax::Perl => s.push_str(&format!("${k} = \"{v}\";\n")),
            VncSyntax::KeyValue => s.push_str(&format!("{k}={v}\n")),
        }
    }
    // Perl's `do FILE` wants a true last value.
    if syntax == VncSyntax::Perl {
        s.push_str("1;\n");
    }
    s
}

/// Effective value of `key`: the last line setting it wins.
fn kv_get<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().filter(|l| kv_key(l).is_some_and(|k| k.eq_ignore_ascii_case(key))).filter_map(kv_value).next_back()
}

// ---- INI files (xrdp) ---------------------------------------------------------------------

fn section_name(line: &str) -> Option<&str> {
    let l = line.trim();
    l.strip_prefix('[').and_then(|r| r.strip_suffix(']')).map(str::trim)
}

fn ini_key(line: &str) -> Option<&str> {
    let l = line.trim();
    if l.starts_with(';') || l.starts_with('#') {
        return None;
    }
    l.split_once('=').map(|(k, _)| k.trim())
}

/// Sets `key=value` in `[section]`: removes the key's lines there, inserts one right after the
/// header; appends the section when it is missing.
fn ini_set(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut found = false;
    for line in text.lines() {
        if let Some(name) = section_name(line) {
            current = Some(name.to_string());
            out.push(line.to_string());
            if name.eq_ignore_ascii_case(section) && !found {
                found = true;
                out.push(format!("{key}={value}"));
            }
            continue;
        }
        let in_section = current.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(section));
        if in_section && ini_key(line).is_some_and(|k| k.eq_ignore_ascii_case(key)) {
            continue;
        }
        out.push(line.to_string());
    }
    if !found {
        if out.last().is_some_and(|l| !l.trim().is_empty()) {
            out.push(String::new());
        }
        out.push(format!("[{section}]"));
        out.push(format!("{key}={value}"));
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// Effective value of `key` in `[section]` (last one wins; sections may repeat).
fn ini_get<'a>(text: &'a str, section: &str, key: &str) -> Option<&'a str> {
    let mut current: Option<&str> = None;
    let mut value = None;
    for line in text.lines() {
        if let Some(name) = section_name(line) {
            current = Some(name);
            continue;
        }
        if current.is_some_and(|c| c.eq_ignore_ascii_case(section))
            && ini_key(line).is_some_and(|k| k.eq_ignore_ascii_case(key))
        {
            value = line.split_once('=').map(|(_, v)| v.trim());
        }
    }
    value
}

// ---- checks -------------------------------------------------------------------------------

fn read(root: &Path, rel: &str, problems: &mut Vec<String>) -> Option<String> {
    match fs::read_to_string(root.join(rel)) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(format!("{rel}: cannot read: {e}"));
            None
        }
    }
}

/// Booleans compare by meaning (`0`/`false`/`no`/`off`), other values as written.
fn same_value(found: &str, want: &str) -> bool {
    let as_bool = |v: &str| match v.to_ascii_lowercase().as_str() {
        "0" | "false" | "no" | "off" => Some(false),
        "1" | "true" | "yes" | "on" => Some(true),
        _ => None,
    };
    match (as_bool(found), as_bool(want)) {
        (Some(a), Some(b)) => a == b,
        _ => found.eq_ignore_ascii_case(want),
    }
}

fn check(file: &str, key: &str, want: &str, found: Option<&str>, problems: &mut Vec<String>) -> bool {
    match found {
        Some(v) if same_value(v, want) => true,
        Some(v) => {
            problems.push(format!("{file}: {key} is `{v}`, must be `{want}`"));
            false
        }
        None => {
            problems.push(format!("{file}: {key} is not set, must be `{want}`"));
            false
        }
    }
}

/// Module names from `/proc/modules` that give access to USB drives.
pub fn loaded_usb_modules(proc_modules: &str) -> Vec<String> {
    proc_modules
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| USB_STORAGE_MODULES.contains(m))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: AgentMode, desktop: DesktopKind, clipboard_in: bool) -> AgentConfig {
        let mut cfg: AgentConfig = serde_yaml::from_str(
            r#"
workspace: { project: ward-7, name: alice-r }
controlPlane: { url: "https://127.0.0.1:1", caFile: ca, certFile: crt, keyFile: key }
egress: { resolvers: [], endpoints: [], desktopPort: 5901 }
mode: vm
desktop: none
"#,
        )
        .unwrap();
        cfg.mode = mode;
        cfg.desktop = desktop;
        cfg.clipboard_in = clipboard_in;
        cfg
    }

    fn root_with_modules(modules: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("proc")).unwrap();
        fs::write(dir.path().join(PROC_MODULES), modules).unwrap();
        dir
    }

    const MODULES: &str = "nf_tables 348160 1 - Live 0x0000000000000000\nvirtio_net 65536 0 - Live 0x0\n";

    #[test]
    fn vnc_keeps_site_settings_and_turns_clipboard_out_off() {
        let root = root_with_modules(MODULES);
        let path = root.path().join(VNC_MANDATORY);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "session=xfce\nSendCutText=1\n# SendPrimary=1 (comment)\n").unwrap(); // vncsession syntax
        let cfg = config(AgentMode::Vm, DesktopKind::Vnc, true);
        let report = apply_and_report(&cfg, root.path());
        assert_eq!(report.problems, Vec::<String>::new());
        assert_eq!(
            report.state,
            HardeningState {
                clipboard_out_disabled: true,
                drive_redirection_disabled: true,
                usb_storage_blocked: Some(true)
            }
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("session=xfce\n# SendPrimary=1 (comment)\n\n# managed by noexit-agent"), "{text}");
        assert!(text.ends_with("SendCutText=0\nSendPrimary=0\nAcceptCutText=1\nSetPrimary=1\n"), "{text}");
        // Idempotent: a second pass changes nothing.
        apply_and_verify(&cfg, root.path());
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        assert_eq!(fs::read_to_string(root.path().join(USB_STORAGE_CONF)).unwrap(), USB_STORAGE_RULES);
    }

    #[test]
    fn vnc_debian_perl_syntax_is_kept() {
        let root = root_with_modules(MODULES);
        let path = root.path().join(VNC_MANDATORY);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "# image default\n$SendCutText = \"1\";\n$localhost = \"no\";\n1;\n").unwrap();
        let cfg = config(AgentMode::Pod, DesktopKind::Vnc, false);
        let report = apply_and_report(&cfg, root.path());
        assert_eq!(report.problems, Vec::<String>::new());
        assert!(report.state.clipboard_out_disabled);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(
                "# image default\n$localhost = \"no\";\n\n{MANAGED_MARK}\n$SendCutText = \"0\";\n$SendPrimary = \"0\";\n\
                 $AcceptCutText = \"0\";\n$SetPrimary = \"0\";\n1;\n"
            )
        );
        apply_and_verify(&cfg, root.path());
        assert_eq!(fs::read_to_string(&path).unwrap(), text, "idempotent");
        // A new file gets the Perl form too (Debian's tigervncserver evaluates it).
        fs::remove_file(&path).unwrap();
        assert!(apply_and_verify(&cfg, root.path()).clipboard_out_disabled);
        assert!(fs::read_to_string(&path).unwrap().contains("$SendCutText = \"0\";"));
    }

    #[test]
    fn vnc_edit_behind_our_back_is_seen() {
        let root = root_with_modules(MODULES);
        let cfg = config(AgentMode::Pod, DesktopKind::Vnc, false);
        assert!(apply_and_verify(&cfg, root.path()).clipboard_out_disabled);
        let path = root.path().join(VNC_MANDATORY);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("sendcuttext=true\n");
        fs::write(&path, text).unwrap();
        let report = verify(&cfg, root.path());
        assert!(!report.state.clipboard_out_disabled);
        assert_eq!(report.problems, [format!("{VNC_MANDATORY}: SendCutText is `true`, must be `0`")]);
        assert_eq!(report.state.usb_storage_blocked, None, "pod mode does not manage USB");
    }

    #[test]
    fn xrdp_channels_and_clipboard_restrictions() {
        let root = root_with_modules(MODULES);
        let ini = root.path().join(XRDP_INI);
        fs::create_dir_all(ini.parent().unwrap()).unwrap();
        fs::write(&ini, "[Globals]\nport=3389\n\n[Channels]\n; comment\nrdpdr=true\ncliprdr=true\nrdpsnd=true\n\n[Xorg]\nname=Xorg\n").unwrap();
        let cfg = config(AgentMode::Vm, DesktopKind::Xrdp, false);
        let report = apply_and_report(&cfg, root.path());
        assert_eq!(report.problems, Vec::<String>::new());
        assert!(report.state.clipboard_out_disabled && report.state.drive_redirection_disabled);
        let text = fs::read_to_string(&ini).unwrap();
        assert_eq!(ini_get(&text, "Globals", "port"), Some("3389"));
        assert_eq!(ini_get(&text, "Channels", "rdpdr"), Some("false"));
        assert_eq!(ini_get(&text, "Channels", "cliprdr"), Some("false"));
        assert_eq!(ini_get(&text, "Xorg", "name"), Some("Xorg"));
        assert_eq!(text.matches("rdpdr=").count(), 1, "{text}");
        let sesman = fs::read_to_string(root.path().join(SESMAN_INI)).unwrap();
        assert_eq!(ini_get(&sesman, "Security", "RestrictOutboundClipboard"), Some("all"));
        assert_eq!(ini_get(&sesman, "Chansrv", "EnableFuseMount"), Some("false"));
    }

    #[test]
    fn xrdp_with_paste_in_keeps_the_channel_but_restricts_outbound() {
        let root = root_with_modules(MODULES);
        let cfg = config(AgentMode::Vm, DesktopKind::Xrdp, true);
        let report = apply_and_report(&cfg, root.path());
        assert!(report.state.clipboard_out_disabled, "{:?}", report.problems);
        let text = fs::read_to_string(root.path().join(XRDP_INI)).unwrap();
        assert_eq!(ini_get(&text, "Channels", "cliprdr"), Some("true"));
        // Someone turns drive redirection back on.
        fs::write(root.path().join(XRDP_INI), text.replace("rdpdr=false", "rdpdr=true")).unwrap();
        let report = verify(&cfg, root.path());
        assert!(!report.state.drive_redirection_disabled);
        assert!(report.problems[0].contains("rdpdr is `true`"), "{:?}", report.problems);
    }

    #[test]
    fn usb_storage_loaded_anyway_is_reported() {
        let root = root_with_modules("usb_storage 81920 0 - Live 0x0\nuas 32768 0 - Live 0x0\nsd_mod 1 2 - Live 0x0\n");
        let cfg = config(AgentMode::Vm, DesktopKind::None, false);
        let report = apply_and_report(&cfg, root.path());
        assert_eq!(report.state.usb_storage_blocked, Some(false));
        assert_eq!(report.usb_modules_loaded, ["usb_storage", "uas"]);
        let v = report.violations();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, ViolationKind::UsbStorage);
        assert!(v[0].detail.contains("usb_storage, uas"));
    }

    #[tokio::test]
    async fn watch_rewrites_changed_settings_and_reports_usb_once() {
        let root = root_with_modules(MODULES);
        let cfg = config(AgentMode::Vm, DesktopKind::Vnc, false);
        let (tx, mut rx) = mpsc::channel(8);
        let (state_tx, mut state_rx) = tokio_watch::channel(HardeningState::default());
        let task = tokio::spawn(watch(cfg, root.path().to_path_buf(), Duration::from_millis(20), tx, state_tx));
        let bound = Duration::from_secs(10);
        tokio::time::timeout(bound, state_rx.wait_for(|s| s.clipboard_out_disabled)).await.unwrap().unwrap();

        let path = root.path().join(VNC_MANDATORY);
        fs::write(&path, "$SendCutText = \"1\";\n").unwrap();
        let v = tokio::time::timeout(bound, rx.recv()).await.unwrap().unwrap();
        assert_eq!(v.kind, ViolationKind::Tamper);
        assert!(v.detail.contains("SendCutText is `1`"), "{}", v.detail);
        assert_eq!(kv_get(&fs::read_to_string(&path).unwrap(), "SendCutText"), Some("0"), "rewritten");

        fs::write(root.path().join(PROC_MODULES), "usb_storage 81920 0 - Live 0x0\n").unwrap();
        let v = tokio::time::timeout(bound, rx.recv()).await.unwrap().unwrap();
        assert_eq!(v.kind, ViolationKind::UsbStorage);
        tokio::time::timeout(bound, state_rx.wait_for(|s| s.usb_storage_blocked == Some(false)))
            .await
            .unwrap()
            .unwrap();
        // Still loaded on the next checks: no second report.
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err());
        task.abort();
    }

    #[tokio::test]
    async fn watch_does_not_repeat_a_problem_it_cannot_fix() {
        let root = root_with_modules(MODULES);
        // A file where the directory must go: every write fails, every pass sees the same.
        fs::write(root.path().join("etc"), "not a dir").unwrap();
        let cfg = config(AgentMode::Pod, DesktopKind::Vnc, false);
        let (tx, mut rx) = mpsc::channel(8);
        let (state_tx, mut state_rx) = tokio_watch::channel(HardeningState::default());
        let task = tokio::spawn(watch(cfg, root.path().to_path_buf(), Duration::from_millis(10), tx, state_tx));
        tokio::time::timeout(Duration::from_secs(10), state_rx.changed()).await.unwrap().unwrap();
        assert!(!state_rx.borrow().clipboard_out_disabled);
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err(), "not tamper");
        task.abort();
    }

    #[test]
    fn unwritable_root_reports_false_not_panic() {
        let root = root_with_modules(MODULES);
        // A file where the directory must go.
        fs::write(root.path().join("etc"), "not a dir").unwrap();
        let cfg = config(AgentMode::Vm, DesktopKind::Vnc, false);
        let report = apply_and_report(&cfg, root.path());
        assert!(!report.state.clipboard_out_disabled);
        assert_eq!(report.state.usb_storage_blocked, Some(false));
        assert!(report.problems.iter().any(|p| p.contains("cannot write")), "{:?}", report.problems);
    }
}
