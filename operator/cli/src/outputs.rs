//! `noexit outputs …` (the door out: review, release, download, receipts) and `noexit inbox …`
//! (the door in). Thin calls to the API; what is printed is built by the pure `render_*`
//! functions below, and every string that came from the server passes through [`term`].

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use http::Method;
use noexit_airlock::checks::{Report, Verdict};
use noexit_airlock::receipt::{self, FileDigest, ReviewDecision, SignedReceipt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::{ApiClient, CliError};
use super::escape::term;
use super::table;
use noexit_api::people::DecisionBody;

/// Largest file `outputs show` fetches to draw as a table.
const MAX_RENDERED_BYTES: usize = 16 * 1024 * 1024;

#[derive(Subcommand, Debug)]
pub enum OutputsCommand {
    /// A project's output requests (output checkers see all; researchers their own).
    List {
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Only requests in this state (e.g. inReview, approved, released).
        #[arg(long)]
        state: Option<String>,
    },
    /// One output request: metadata, check results (tables drawn with failing cells marked),
    /// reviews.
    Show {
        /// Output request id (from `noexit outputs list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
    },
    /// Approve an output (output checkers; not your own).
    Approve {
        /// Output request id (from `noexit outputs list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Why (kept in the audit log and the release receipt).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject an output (output checkers; not your own). One rejection is final.
    Reject {
        /// Output request id (from `noexit outputs list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Why (required; the researcher sees it).
        #[arg(long)]
        reason: String,
    },
    /// Send an output back to its researcher with what to change.
    RequestChanges {
        /// Output request id (from `noexit outputs list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// What to change (required; the researcher sees it).
        #[arg(long)]
        reason: String,
    },
    /// Withdraw your own output request before it is released.
    Withdraw {
        /// Output request id (from `noexit outputs list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
    },
    /// Download an approved output once, with its signed receipt; both are checked before
    /// the file gets its name.
    Download {
        /// Output request id (from `noexit outputs list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Where to write the file (default: its file name, in this directory). The receipt
        /// goes to FILE.receipt.json.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        /// The site's receipt signing key (the audit checkpoint public key, PEM). Without it
        /// the file and receipt are saved but the command says NOT VERIFIED and exits 1.
        #[arg(long, env = "NOEXIT_RECEIPT_KEY", value_name = "PUBKEY")]
        key: Option<PathBuf>,
    },
    /// Check offline that RECEIPT is a signed release receipt for FILE, signed by the site's
    /// key. Exit 0 and one line starting OK, or exit 1 naming what failed (NOT VERIFIED
    /// without a key).
    VerifyReceipt {
        file: PathBuf,
        receipt: PathBuf,
        /// The site's receipt signing key (the audit checkpoint public key, PEM). Without it
        /// the receipt is only checked against the key it carries (integrity, not who signed)
        /// and the command says NOT VERIFIED and exits 1.
        #[arg(long, env = "NOEXIT_RECEIPT_KEY", value_name = "PUBKEY")]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum InboxCommand {
    /// Submit a file for a workspace's /inbox (data analysts, admins); an admin who is not you
    /// approves it.
    Submit {
        file: PathBuf,
        /// Project name.
        #[arg(long, short)]
        project: String,
        /// Workspace that receives it.
        #[arg(long, short)]
        workspace: String,
        /// File name in /inbox (default: FILE's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// A project's inbox submissions.
    List {
        /// Project name.
        #[arg(long, short)]
        project: String,
    },
    /// Approve a submission (admins; not your own).
    Approve {
        /// Submission id (from `noexit inbox list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject a submission (admins).
    Reject {
        /// Submission id (from `noexit inbox list`).
        id: String,
        /// Project name.
        #[arg(long, short)]
        project: String,
        #[arg(long)]
        reason: String,
    },
}

/// An output request as the API shows it. Fields the API may leave out default to empty.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputView {
    pub id: String,
    #[serde(default)]
    pub workspace: String,
    #[serde(default)]
    pub file_name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub requester: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub checks: Option<Report>,
    #[serde(default)]
    pub reviews: Vec<ReviewView>,
    /// Distinct approvals so far, and how many release needs.
    #[serde(default)]
    pub approvals: Option<u32>,
    #[serde(default)]
    pub reviewers_required: Option<u32>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReviewView {
    pub reviewer: String,
    pub decision: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
}

/// An inbox submission as the API shows it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InboxView {
    pub id: String,
    #[serde(default)]
    pub workspace: String,
    #[serde(default)]
    pub file_name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, alias = "submittedBy", alias = "requester")]
    pub submitter: String,
    #[serde(default)]
    pub state: String,
    #[serde(default, alias = "decidedBy")]
    pub reviewer: Option<String>,
    /// The name the agent gave it in /inbox, once delivered.
    #[serde(default)]
    pub placed_as: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DownloadLink {
    url: String,
}

/// `1/2`: approvals so far of those needed, when the API says.
fn approvals(o: &OutputView) -> String {
    match (o.approvals, o.reviewers_required) {
        (Some(a), Some(n)) => format!("{a}/{n}"),
        (Some(a), None) => a.to_string(),
        _ => "-".into(),
    }
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)).unwrap_or_else(|| "-".into())
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Review => "review",
        Verdict::Fail => "FAIL",
        Verdict::Refuse => "REFUSED",
    }
}

/// `outputs list` as text.
pub fn render_list(list: &[OutputView]) -> String {
    let mut out = format!(
        "{:<36} {:<18} {:<7} {:<5} {:<20} {:<28} {:>10} {:<26} UPDATED\n",
        "ID", "STATE", "CHECKS", "APPR", "WORKSPACE", "FILE", "SIZE", "REQUESTER"
    );
    for o in list {
        out.push_str(&format!(
            "{:<36} {:<18} {:<7} {:<5} {:<20} {:<28} {:>10} {:<26} {}\n",
            term(&o.id),
            term(&o.state),
            o.checks.as_ref().map(|c| verdict(c.verdict)).unwrap_or("-"),
            approvals(o),
            term(&o.workspace),
            term(&o.file_name),
            o.size,
            term(&o.requester),
            time(o.updated_at.or(o.created_at)),
        ));
    }
    out
}

/// What `outputs show` draws below the checks for a table.
pub enum Content<'a> {
    /// The file's bytes.
    Bytes(&'a [u8]),
    /// Why they could not be fetched.
    Unavailable(String),
    /// Not a table.
    NotATable,
}

/// `outputs show` as text.
pub fn render_show(o: &OutputView, content: Content<'_>) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: &str| out.push_str(&format!("{k:<12} {v}\n"));
    line(&mut out, "output", &term(&o.id));
    line(&mut out, "file", &format!("{} ({} bytes)", term(&o.file_name), o.size));
    line(&mut out, "sha256", &term(&o.sha256));
    line(&mut out, "workspace", &term(&o.workspace));
    line(&mut out, "requester", &term(&o.requester));
    line(&mut out, "state", &term(&o.state));
    line(&mut out, "approvals", &approvals(o));
    line(&mut out, "created", &time(o.created_at));
    line(&mut out, "updated", &time(o.updated_at));
    out.push('\n');
    match &o.checks {
        None => out.push_str("checks: not run yet\n"),
        Some(report) => {
            out.push_str(&format!("checks: {}\n", verdict(report.verdict)));
            for r in &report.results {
                let cells: Vec<String> = r.cells.iter().map(|c| format!("({},{})", c.row, c.column)).collect();
                let cells = if cells.is_empty() { String::new() } else { format!(" cells {}", cells.join(" ")) };
                out.push_str(&format!(
                    "  {:<6} {:<14} {}{cells}\n",
                    verdict(r.verdict),
                    term(&r.check),
                    term(&r.message)
                ));
            }
            if !report.acro.is_empty() {
                out.push_str("ACRO's own verdicts (shown beside ours, not replacing them):\n");
                for r in &report.acro {
                    out.push_str(&format!("  {:<6} {:<14} {}\n", verdict(r.verdict), term(&r.check), term(&r.message)));
                }
            }
        }
    }
    out.push('\n');
    if o.reviews.is_empty() {
        out.push_str("reviews: none yet\n");
    } else {
        out.push_str("reviews:\n");
        for r in &o.reviews {
            let reason =
                r.reason.as_deref().filter(|s| !s.is_empty()).map(|s| format!(": {}", term(s))).unwrap_or_default();
            out.push_str(&format!("  {} {:<26} {}{reason}\n", time(r.at), term(&r.reviewer), term(&r.decision)));
        }
    }
    let flagged = table::flagged_cells(
        o.checks
            .iter()
            .flat_map(|r| r.results.iter())
            .filter(|r| r.verdict != Verdict::Pass)
            .map(|r| (r.check.as_str(), r.cells.as_slice())),
    );
    match content {
        Content::NotATable => {}
        Content::Bytes(bytes) => {
            out.push('\n');
            if !flagged.is_empty() {
                out.push_str("flagged cells are marked *like this*\n");
            }
            out.push_str(&table::render(bytes, table::delimiter_for(&o.file_name), &flagged, table::Limits::default()));
        }
        Content::Unavailable(why) => {
            out.push_str(&format!("\n(table not drawn: {})\n", term(&why)));
        }
    }
    out
}

/// `inbox list` as text.
pub fn render_inbox(list: &[InboxView]) -> String {
    let mut out = format!(
        "{:<36} {:<12} {:<20} {:<28} {:>10} {:<26} DECIDED BY\n",
        "ID", "STATE", "WORKSPACE", "FILE", "SIZE", "SUBMITTER"
    );
    for i in list {
        let decided = match (&i.reviewer, &i.reason) {
            (Some(r), Some(why)) if !why.is_empty() => format!("{}: {}", term(r), term(why)),
            (Some(r), _) => term(r).into_owned(),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<36} {:<12} {:<20} {:<28} {:>10} {:<26} {decided}\n",
            term(&i.id),
            term(&i.state),
            term(&i.workspace),
            term(&i.file_name),
            i.size,
            term(&i.submitter),
        ));
    }
    out
}

/// One line describing a verified receipt.
pub fn render_verified(file: &Path, signed: &SignedReceipt, key_source: &str) -> String {
    let r = &signed.receipt;
    let approvers: Vec<String> = r
        .reviews
        .iter()
        .filter(|v| v.decision == ReviewDecision::Approved)
        .map(|v| term(&v.reviewer).into_owned())
        .collect();
    format!(
        "OK {}: {} bytes, sha256 {}, {} of {}/{} released {} to {}, approved by {}; signed by key {} ({key_source})",
        term(&file.display().to_string()),
        r.size,
        term(&r.sha256),
        term(&r.file_name),
        term(&r.project),
        term(&r.workspace),
        r.released_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        term(&r.requester),
        if approvers.is_empty() { "nobody".into() } else { approvers.join(", ") },
        term(&r.key_id),
    )
}

/// The site's receipt key, with how to name it.
type SiteKey = (ed25519_dalek::VerifyingKey, String);

fn site_key(path: Option<&Path>) -> Result<Option<SiteKey>, CliError> {
    path.map(|p| {
        let key = noexit_audit::keys::load_verifying_key(p).map_err(|e| CliError::Usage(e.to_string()))?;
        Ok((key, format!("the site key {}", p.display())))
    })
    .transpose()
}

/// Without the site's key a receipt proves only that it is consistent with the key it carries:
/// anyone can make such a receipt, so this is a failure (exit 1), as `noexit audit verify`
/// without keys.
pub fn not_verified(signed: &SignedReceipt) -> CliError {
    CliError::Verification(format!(
        "NOT VERIFIED: no site key given (--key or NOEXIT_RECEIPT_KEY); the receipt is internally consistent \
         with the key it carries (id {})",
        term(&signed.key_id)
    ))
}

/// `outputs verify-receipt`: returns the OK line (an error without the site's key).
pub fn verify_receipt(file: &Path, receipt_path: &Path, key: Option<&Path>) -> Result<String, CliError> {
    let text = std::fs::read(receipt_path)
        .map_err(|e| CliError::Usage(format!("cannot read receipt {}: {e}", receipt_path.display())))?;
    let signed = SignedReceipt::from_json(&text)
        .map_err(|e| CliError::Verification(format!("{}: {e}", receipt_path.display())))?;
    let f = std::fs::File::open(file).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let digest = FileDigest::from_reader(std::io::BufReader::new(f))
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let site = site_key(key)?;
    let line = check(file, receipt_path, &signed, &digest, site.as_ref())?;
    if site.is_none() {
        return Err(not_verified(&signed));
    }
    Ok(line)
}

fn check(
    file: &Path,
    receipt_path: &Path,
    signed: &SignedReceipt,
    digest: &FileDigest,
    site: Option<&SiteKey>,
) -> Result<String, CliError> {
    // Without the site's key, the receipt's own: integrity, not who signed.
    let (vk, source) = match site {
        Some((k, source)) => (*k, source.clone()),
        None => {
            let key = signed
                .embedded_key()
                .map_err(|e| CliError::Verification(format!("{}: {e}", receipt_path.display())))?;
            (key, "the key inside the receipt".to_owned())
        }
    };
    receipt::verify_digest(signed, digest, &vk).map_err(|e| {
        CliError::Verification(format!("{} does not vouch for {}: {e}", receipt_path.display(), file.display()))
    })?;
    Ok(render_verified(file, signed, &source))
}

/// A path segment that is an id the API gave (UUIDs and the like).
fn id_segment(id: &str) -> Result<&str, CliError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(CliError::Usage(format!("{:?} is not a valid id", term(id))));
    }
    Ok(id)
}

/// Percent-encode a query value (everything but RFC 3986 unreserved characters).
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The name a download gets by default: the output's own file name, if it is a plain name.
pub fn default_download_name(file_name: &str) -> Result<PathBuf, CliError> {
    let plain = !file_name.is_empty()
        && file_name.len() <= 255
        && !file_name.starts_with('.')
        && !file_name.contains(['/', '\\'])
        && !file_name.chars().any(|c| c.is_control() || term(&c.to_string()).len() > c.len_utf8());
    if !plain {
        return Err(CliError::Usage(format!(
            "the output's file name {:?} cannot be used as a local name; give -o FILE",
            term(file_name)
        )));
    }
    Ok(PathBuf::from(file_name))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn refuse_existing(path: &Path) -> Result<(), CliError> {
    if path.exists() {
        return Err(CliError::Usage(format!("{} exists; move it away or give -o FILE", path.display())));
    }
    Ok(())
}

/// The path part of a download link the API gave for the output at `output_path`, if it points
/// back at the API: `{output_path}/download/{token}` or `/v1/downloads/{token}`.
fn download_path<'a>(base: &str, output_path: &str, url: &'a str) -> Result<&'a str, CliError> {
    let path = url.strip_prefix(base.trim_end_matches('/')).unwrap_or(url);
    let ours = path.strip_prefix(output_path).is_some_and(|rest| rest.starts_with("/download/"));
    if !(ours || path.starts_with("/v1/downloads/")) || path.contains("..") || path.contains("//") {
        return Err(CliError::Verification(format!(
            "the API gave a download link outside itself ({}); not followed",
            term(url)
        )));
    }
    Ok(path)
}

fn print_json(v: &impl Serialize) {
    println!("{}", super::escape::json(&serde_json::to_string_pretty(v).unwrap_or_default()));
}

fn decode<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, CliError> {
    serde_json::from_value(v).map_err(|e| CliError::Connection {
        url: what.into(),
        message: format!("the answer is not the JSON expected ({e}); is this a noexit API?"),
    })
}

fn nonempty(reason: &str) -> Result<String, CliError> {
    if reason.trim().is_empty() {
        return Err(CliError::Usage("--reason must say why".into()));
    }
    Ok(reason.to_owned())
}

/// Run an `outputs` command.
pub async fn outputs(api: &ApiClient, base: &str, json: bool, cmd: &OutputsCommand) -> Result<(), CliError> {
    let none: Option<&()> = None;
    let project_path =
        |p: &str| -> Result<String, CliError> { Ok(format!("/v1/projects/{}/outputs", super::encode(p)?)) };
    match cmd {
        OutputsCommand::VerifyReceipt { file, receipt, key } => {
            println!("{}", verify_receipt(file, receipt, key.as_deref())?);
        }
        OutputsCommand::List { project, state } => {
            let mut path = project_path(project)?;
            if let Some(s) = state {
                path.push_str(&format!("?state={}", query_value(s)));
            }
            let v: Value = api.call(Method::GET, &path, none).await?;
            if json {
                print_json(&v);
            } else {
                let list: Vec<OutputView> = decode(v, &path)?;
                print!("{}", render_list(&list));
            }
        }
        OutputsCommand::Show { id, project } => {
            let path = format!("{}/{}", project_path(project)?, id_segment(id)?);
            let v: Value = api.call(Method::GET, &path, none).await?;
            if json {
                print_json(&v);
                return Ok(());
            }
            let o: OutputView = decode(v, &path)?;
            let fetched;
            let content = if !table::is_table(&o.file_name) {
                Content::NotATable
            } else {
                match api.get_bytes(&format!("{path}/content"), MAX_RENDERED_BYTES).await {
                    Ok(b) => {
                        fetched = b;
                        Content::Bytes(&fetched)
                    }
                    Err(CliError::Refused { status, code, message }) => {
                        Content::Unavailable(format!("the API refused the file's content: {status} {code}: {message}"))
                    }
                    Err(e) => Content::Unavailable(e.to_string()),
                }
            };
            print!("{}", render_show(&o, content));
        }
        OutputsCommand::Approve { id, project, reason } => {
            let body = DecisionBody { reason: reason.clone().unwrap_or_default() };
            decide(api, json, project, id, "approve", "approved", &body).await?;
        }
        OutputsCommand::Reject { id, project, reason } => {
            let body = DecisionBody { reason: nonempty(reason)? };
            decide(api, json, project, id, "reject", "rejected", &body).await?;
        }
        OutputsCommand::RequestChanges { id, project, reason } => {
            let body = DecisionBody { reason: nonempty(reason)? };
            decide(api, json, project, id, "request-changes", "sent back for changes", &body).await?;
        }
        OutputsCommand::Withdraw { id, project } => {
            let path = format!("{}/{}/withdraw", project_path(project)?, id_segment(id)?);
            let v: Value = api.call(Method::POST, &path, none).await?;
            if json {
                print_json(&v)
            } else {
                println!("output {} withdrawn", term(id));
            }
        }
        OutputsCommand::Download { id, project, output, key } => {
            download(api, base, project, id, output.as_deref(), key.as_deref()).await?;
        }
    }
    Ok(())
}

async fn decide(
    api: &ApiClient,
    json: bool,
    project: &str,
    id: &str,
    action: &str,
    done: &str,
    body: &DecisionBody,
) -> Result<(), CliError> {
    let path = format!("/v1/projects/{}/outputs/{}/{action}", super::encode(project)?, id_segment(id)?);
    let v: Value = api.call(Method::POST, &path, Some(body)).await?;
    if json {
        print_json(&v);
    } else {
        let state =
            v.get("state").and_then(Value::as_str).map(|s| format!("; it is now {}", term(s))).unwrap_or_default();
        println!("output {} {done}{state}", term(id));
    }
    Ok(())
}

async fn download(
    api: &ApiClient,
    base: &str,
    project: &str,
    id: &str,
    output: Option<&Path>,
    key: Option<&Path>,
) -> Result<(), CliError> {
    let none: Option<&()> = None;
    let path = format!("/v1/projects/{}/outputs/{}", super::encode(project)?, id_segment(id)?);
    // Everything local is settled before the single-use link is spent.
    let view: OutputView = decode(api.call(Method::GET, &path, none).await?, &path)?;
    let target = match output {
        Some(p) => p.to_path_buf(),
        None => default_download_name(&view.file_name)?,
    };
    let receipt_path = with_suffix(&target, ".receipt.json");
    let partial = with_suffix(&target, ".part");
    let unverified = with_suffix(&target, ".unverified");
    for p in [&target, &receipt_path, &partial, &unverified] {
        refuse_existing(p)?;
    }
    let site = site_key(key)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", partial.display())))?;

    let link: Result<DownloadLink, CliError> = api.call(Method::POST, &format!("{path}/download-link"), none).await;
    let digest = match link {
        Ok(link) => match download_path(base, &path, &link.url) {
            Ok(p) => api.download(p, &mut file).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let digest = match digest.and_then(|d| {
        file.sync_all().map_err(|e| CliError::Usage(format!("cannot write {}: {e}", partial.display())))?;
        Ok(d)
    }) {
        Ok(d) => d,
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    drop(file);
    // The receipt: saved whatever it says, so nothing the server gave is lost.
    let signed: Result<SignedReceipt, CliError> = api.call(Method::GET, &format!("{path}/receipt"), none).await;
    let keep_unverified = |why: CliError| -> CliError {
        let kept = std::fs::rename(&partial, &unverified).is_ok();
        let note = if kept {
            format!("; the bytes are kept in {} for inspection: do not use them", unverified.display())
        } else {
            String::new()
        };
        CliError::Verification(format!("{why}{note}"))
    };
    let signed = match signed {
        Ok(s) => s,
        Err(e) => return Err(keep_unverified(CliError::Verification(format!("no receipt: {e}")))),
    };
    let saved = std::fs::OpenOptions::new().write(true).create_new(true).open(&receipt_path).and_then(|mut rf| {
        rf.write_all(signed.to_json_pretty().as_bytes())?;
        rf.write_all(b"\n")
    });
    if let Err(e) = saved {
        return Err(keep_unverified(CliError::Usage(format!("cannot write {}: {e}", receipt_path.display()))));
    }
    if signed.receipt.project != project {
        return Err(keep_unverified(CliError::Verification(format!(
            "the receipt is for project {:?}, not {project}",
            term(&signed.receipt.project)
        ))));
    }
    match check(&target, &receipt_path, &signed, &digest, site.as_ref()) {
        Ok(line) => {
            std::fs::rename(&partial, &target).map_err(|e| {
                CliError::Usage(format!("cannot rename {} to {}: {e}", partial.display(), target.display()))
            })?;
            if site.is_none() {
                // The bytes match the receipt and its own key; who signed it is unknown.
                println!("saved as {}", target.display());
                println!("receipt saved as {}", receipt_path.display());
                return Err(not_verified(&signed));
            }
            println!("{line}");
            println!("receipt saved as {}", receipt_path.display());
            Ok(())
        }
        Err(e) => Err(keep_unverified(e)),
    }
}

/// Run an `inbox` command.
pub async fn inbox(api: &ApiClient, json: bool, cmd: &InboxCommand) -> Result<(), CliError> {
    let none: Option<&()> = None;
    match cmd {
        InboxCommand::Submit { file, project, workspace, name } => {
            let name = match name {
                Some(n) => n.clone(),
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| CliError::Usage(format!("{} has no usable file name; give --name", file.display())))?
                    .to_owned(),
            };
            let bytes =
                std::fs::read(file).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let path = format!(
                "/v1/projects/{}/workspaces/{}/inbox?fileName={}",
                super::encode(project)?,
                super::encode(workspace)?,
                query_value(&name)
            );
            let v: Value = api.call_raw(Method::POST, &path, Bytes::from(bytes)).await?;
            if json {
                print_json(&v);
            } else {
                let id = term(v.get("id").and_then(Value::as_str).unwrap_or("?")).into_owned();
                println!(
                    "inbox submission {id} ({} for {project}/{workspace}) created; an admin other than you must approve it:",
                    term(&name)
                );
                println!("  noexit inbox approve {id} --project {project}");
            }
        }
        InboxCommand::List { project } => {
            let path = format!("/v1/projects/{}/inbox", super::encode(project)?);
            let v: Value = api.call(Method::GET, &path, none).await?;
            if json {
                print_json(&v);
            } else {
                let list: Vec<InboxView> = decode(v, &path)?;
                print!("{}", render_inbox(&list));
            }
        }
        InboxCommand::Approve { id, project, reason } => {
            let body = DecisionBody { reason: reason.clone().unwrap_or_default() };
            inbox_decide(api, json, project, id, "approve", "approved", &body).await?;
        }
        InboxCommand::Reject { id, project, reason } => {
            let body = DecisionBody { reason: nonempty(reason)? };
            inbox_decide(api, json, project, id, "reject", "rejected", &body).await?;
        }
    }
    Ok(())
}

async fn inbox_decide(
    api: &ApiClient,
    json: bool,
    project: &str,
    id: &str,
    action: &str,
    done: &str,
    body: &DecisionBody,
) -> Result<(), CliError> {
    let path = format!("/v1/projects/{}/inbox/{}/{action}", super::encode(project)?, id_segment(id)?);
    let v: Value = api.call(Method::POST, &path, Some(body)).await?;
    if json {
        print_json(&v);
    } else {
        println!("inbox submission {} {done}", term(id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_airlock::checks::{Cell, CheckResult};

    fn view() -> OutputView {
        OutputView {
            id: "0193a1b2-0000-7000-8000-000000000001".into(),
            workspace: "alice-r".into(),
            file_name: "table.csv".into(),
            size: 40,
            sha256: "ab".repeat(32),
            requester: "alice@ward7.example".into(),
            state: "inReview".into(),
            checks: Some(Report {
                verdict: Verdict::Fail,
                results: vec![
                    CheckResult {
                        check: "minCellCount".into(),
                        verdict: Verdict::Fail,
                        message: "1 cell below 10".into(),
                        cells: vec![Cell { row: 3, column: 3 }],
                    },
                    CheckResult {
                        check: "dlp".into(),
                        verdict: Verdict::Pass,
                        message: "nothing found".into(),
                        cells: vec![],
                    },
                ],
                acro: vec![],
            }),
            reviews: vec![ReviewView {
                reviewer: "olive@ward7.example".into(),
                decision: "rejected".into(),
                reason: Some("cell of 7\x1b[2J".into()),
                at: Some("2026-12-07T10:00:00Z".parse().unwrap()),
            }],
            approvals: Some(1),
            reviewers_required: Some(2),
            created_at: Some("2026-12-07T09:00:00Z".parse().unwrap()),
            updated_at: None,
        }
    }

    #[test]
    fn show_draws_checks_reviews_and_the_table_with_the_failing_cell() {
        let text = render_show(&view(), Content::Bytes(b"ward,sex,count\nA,F,12\nA,M,7\n"));
        assert!(text.contains("state        inReview\napprovals    1/2\n"), "{text}");
        assert!(text.contains("checks: FAIL\n  FAIL   minCellCount   1 cell below 10 cells (3,3)\n"), "{text}");
        assert!(text.contains("  pass   dlp            nothing found\n"), "{text}");
        assert!(
            text.contains("2026-12-07T10:00:00Z olive@ward7.example        rejected: cell of 7\\x1b[2J\n"),
            "{text}"
        );
        assert!(text.contains("3 | A    | M   | *7*   |"), "{text}");
        assert!(!text.contains('\x1b'));
        let text = render_show(&view(), Content::Unavailable("404 notFound".into()));
        assert!(text.ends_with("(table not drawn: 404 notFound)\n"), "{text}");
    }

    #[test]
    fn list_and_inbox_are_columns_with_escaped_text() {
        let text = render_list(&[view()]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID "));
        assert!(
            lines[1].starts_with("0193a1b2-0000-7000-8000-000000000001 inReview           FAIL    1/2   alice-r"),
            "{text}"
        );
        assert!(lines[1].ends_with("2026-12-07T09:00:00Z"), "{text}");
        let inbox = render_inbox(&[InboxView {
            id: "i1".into(),
            file_name: "x\u{202e}gpj.sh".into(),
            state: "rejected".into(),
            reviewer: Some("carol@ward7.example".into()),
            reason: Some("not a script we run".into()),
            ..InboxView::default()
        }]);
        assert!(inbox.contains("x\\u{202e}gpj.sh"), "{inbox}");
        assert!(inbox.contains("carol@ward7.example: not a script we run"), "{inbox}");
    }

    #[test]
    fn download_names_and_links_are_checked_before_use() {
        assert_eq!(default_download_name("summary.csv").unwrap(), PathBuf::from("summary.csv"));
        for bad in ["", "../x.csv", "a/b.csv", ".bashrc", "x\u{202e}vsc.exe", "a\nb"] {
            assert!(default_download_name(bad).is_err(), "{bad:?}");
        }
        let out = "/v1/projects/ward-7/outputs/o1";
        assert_eq!(download_path("https://api:8443", out, "/v1/downloads/t0k").unwrap(), "/v1/downloads/t0k");
        assert_eq!(
            download_path("https://api:8443/", out, "https://api:8443/v1/projects/ward-7/outputs/o1/download/t0k")
                .unwrap(),
            "/v1/projects/ward-7/outputs/o1/download/t0k"
        );
        for bad in [
            "https://evil.example/v1/downloads/t",
            "/v1/outputs/x",
            "/v1/downloads/../x",
            "/v1/projects/ward-7/outputs/o2/download/t",
            "/v1/projects/ward-7/outputs/o1/content",
            "/v1/projects/ward-7/outputs/o1/download/../../o2/download/t",
        ] {
            assert!(download_path("https://api:8443", out, bad).is_err(), "{bad}");
        }
        assert_eq!(query_value("my file/ü.csv"), "my%20file%2F%C3%BC.csv");
        assert!(id_segment("0193a1b2-0000").is_ok());
        assert!(id_segment("..").is_err() && id_segment("a/b").is_err() && id_segment("").is_err());
    }
}
