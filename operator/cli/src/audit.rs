//! `noexit audit tail|query|verify|export`: the auditor's commands. They open the store
//! read-only and never write to it.
//!
//! Exit codes: 0 ok · 1 `verify` found tampering or could not authenticate the log · 2 usage,
//! key or connection error.

use std::{io::Write, path::PathBuf, process::ExitCode};

use chrono::{DateTime, NaiveDate, Utc};

use super::escape::{json as term_json, term};

use noexit_audit::{
    AuditError, Outcome, keys,
    store::{Entry, Filter, Store, read_exported_checkpoints, redact},
    verify::{Report, VerifyOptions, verify},
    writers::{self, WriterKeys},
};

/// Exit code when `verify` finds tampering, or cannot authenticate what it read.
pub const EXIT_TAMPERED: u8 = 1;
/// Exit code for bad arguments, unreadable keys or an unreachable store.
pub const EXIT_USAGE: u8 = 2;

/// `noexit audit …`
#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    /// The audit database, opened read-only (the API's --database-url):
    /// sqlite:///var/lib/noexit/noexit.db or postgres://user@host/db
    #[arg(
        long = "database-url",
        alias = "store",
        env = "NOEXIT_DATABASE_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub store: Option<String>,
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum AuditCommand {
    /// Show the newest entries.
    Tail {
        /// How many entries.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: i64,
        /// Keep printing new entries as they are appended (checks every second).
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show entries matching filters, oldest first.
    Query {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Recompute hashes, chain, checkpoint Merkle roots and signatures, and each entry's
    /// writer signature; name the first tampered entry. Exit 1 when tampering is found or
    /// the log could not be authenticated.
    Verify {
        /// Public key (PEM) that signs checkpoints (the API's key); repeat for rotated keys.
        /// It also authenticates the `api` writer unless --writer-key api=… is given.
        #[arg(long = "checkpoint-key-pub", value_name = "FILE")]
        keys: Vec<PathBuf>,
        /// A writer's public key, WRITER=FILE (writers: api, mirror, webhook, dns, gateway); repeat for
        /// each writer and for rotated keys. Every entry must be signed by the writer that owns
        /// its action.
        #[arg(long = "writer-key", value_name = "WRITER=FILE", value_parser = parse_writer_key)]
        writer_keys: Vec<(String, PathBuf)>,
        /// Which actions a writer may write, WRITER=PREFIX (`mirror=mirror.`), or WRITER=* for
        /// every action no other writer owns. Default: api=*, mirror=mirror., webhook=admission.,
        /// dns=dns., gateway=gateway.
        #[arg(long = "writer-actions", value_name = "WRITER=PREFIX", value_parser = parse_writer_actions)]
        writer_actions: Vec<(String, Option<String>)>,
        /// Checkpoints published outside the database (the API's --checkpoint-export
        /// directory, or a file of them): each must still be in the database unchanged.
        #[arg(long = "checkpoints", value_name = "FILE_OR_DIR")]
        published: Option<PathBuf>,
        /// Check only that the log is consistent, authenticating nothing (no keys): the
        /// report then says loudly that nothing was authenticated.
        #[arg(long)]
        no_authentication: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write entries as JSON lines (everything needed to recompute the hashes).
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        /// File to write (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only this actor, e.g. user:alice@example.org or workspace:ward-7/alice.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this action; a trailing `*` matches a prefix (request.*).
    #[arg(long)]
    pub action: Option<String>,
    /// Only this object, e.g. workspacerequest:ward-7/r-42.
    #[arg(long)]
    pub object: Option<String>,
    /// Only allowed or only refused actions.
    #[arg(long, value_enum)]
    pub outcome: Option<OutcomeArg>,
    /// From this time: RFC 3339 (2026-12-01T08:00:00Z), a date (2026-12-01), or an age (90m, 24h, 7d).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Before this time (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// At most this many entries.
    #[arg(long)]
    pub limit: Option<i64>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeArg {
    Allowed,
    Refused,
}

impl FilterArgs {
    fn to_filter(&self) -> Filter {
        Filter {
            actor: self.actor.clone(),
            action: self.action.clone(),
            object: self.object.clone(),
            refused: self.outcome.map(|o| o == OutcomeArg::Refused),
            since: self.since,
            until: self.until,
            after_seq: None,
            limit: self.limit,
        }
    }
}

/// Parses `--writer-key WRITER=FILE`.
fn parse_writer_key(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s.split_once('=').ok_or_else(|| format!("`{s}`: use WRITER=FILE, e.g. mirror=mirror.pub"))?;
    if !writers::WRITERS.iter().any(|w| w.name == name) {
        let known: Vec<&str> = writers::WRITERS.iter().map(|w| w.name).collect();
        return Err(format!("`{name}` is not a writer: one of {}", known.join(", ")));
    }
    Ok((name.to_owned(), PathBuf::from(file)))
}

/// Parses `--writer-actions WRITER=PREFIX|*`.
fn parse_writer_actions(s: &str) -> Result<(String, Option<String>), String> {
    let (name, prefix) = s.split_once('=').ok_or_else(|| format!("`{s}`: use WRITER=PREFIX, e.g. mirror=mirror."))?;
    parse_writer_key(&format!("{name}=x"))?;
    match prefix {
        "*" => Ok((name.to_owned(), None)),
        "" => Err(format!("`{s}`: the prefix is empty (use * for every other action)")),
        p => Ok((name.to_owned(), Some(p.to_owned()))),
    }
}

/// Parses `--since`/`--until`.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 =
        number.parse().map_err(|_| format!("`{s}` is not a time: use 2026-12-01T08:00:00Z, 2026-12-01 or 24h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: the unit of an age must be s, m, h or d")),
    };
    Ok(Utc::now() - chrono::Duration::seconds(seconds))
}

/// Runs an audit command, printing to stdout/stderr.
pub async fn run(args: AuditArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    ExitCode::from(run_with(args, &mut out, &mut err).await)
}

/// [`run`] with the output streams given (tests). Returns the exit code.
pub async fn run_with(args: AuditArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match execute(args, out, err).await {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(err, "noexit audit: {message}");
            EXIT_USAGE
        }
    }
}

async fn execute(args: AuditArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<u8, String> {
    let url = args.store.ok_or("no audit store given: pass --database-url URL or set NOEXIT_DATABASE_URL")?;
    // Keys first: a typo in a path should not cost a full pass over the log.
    let mut verify_options = VerifyOptions::default();
    if let AuditCommand::Verify { keys, writer_keys, writer_actions, published, no_authentication, .. } = &args.command
    {
        verify_options.keys = keys
            .iter()
            .map(|p| keys::load_verifying_key(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if keys.is_empty() && writer_keys.is_empty() && !no_authentication {
            let _ = writeln!(
                out,
                "NOT VERIFIED: no public key given, so nothing in the log can be authenticated.\n  \
                 Pass --checkpoint-key-pub FILE (and --writer-key WRITER=FILE for each writer), or \
                 --no-authentication to check only that the log is consistent."
            );
            return Ok(EXIT_TAMPERED);
        }
        if !keys.is_empty() || !writer_keys.is_empty() {
            let mut w = WriterKeys::new();
            for (name, path) in writer_keys {
                w.add(name, keys::load_verifying_key(path).map_err(|e| e.to_string())?);
            }
            if !w.has(writers::API) {
                verify_options.keys.iter().for_each(|k| w.add(writers::API, *k));
            }
            for (name, prefix) in writer_actions {
                w.set_actions(name, prefix.as_deref());
            }
            verify_options.writers = Some(w);
        }
        if let Some(path) = published {
            verify_options.published = Some(read_exported_checkpoints(path)?);
        }
    }
    let store = Store::open_read_only(&url).await.map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("writing output: {e}");
    let code = match args.command {
        AuditCommand::Tail { lines, follow, json } => {
            let entries = store.tail(lines).await.map_err(show)?;
            let mut last = entries.last().map_or(0, |e| e.seq);
            for e in &entries {
                print_entry(out, e, json).map_err(io)?;
            }
            if follow {
                loop {
                    out.flush().map_err(io)?;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    let filter = Filter { after_seq: Some(last), ..Filter::default() };
                    for e in store.query(&filter).await.map_err(show)? {
                        print_entry(out, &e, json).map_err(io)?;
                        last = e.seq;
                    }
                }
            }
            0
        }
        AuditCommand::Query { filter, json } => {
            let mut failed = None;
            store
                .for_each(&filter.to_filter(), |e| {
                    print_entry(out, &e, json).map_err(|e| {
                        failed = Some(e.to_string());
                        AuditError::Unavailable("output closed".into())
                    })
                })
                .await
                .map_err(|e| failed.take().unwrap_or_else(|| show(e)))?;
            0
        }
        AuditCommand::Export { filter, output } => {
            let mut file;
            let to_file = output.is_some();
            let sink: &mut dyn Write = match &output {
                Some(path) => {
                    file = std::io::BufWriter::new(
                        std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?,
                    );
                    &mut file
                }
                None => out,
            };
            let n = store
                .for_each(&filter.to_filter(), |e| {
                    // A file gets the exact bytes; a terminal gets the same JSON, escaped.
                    let line = e.to_json().to_string();
                    writeln!(sink, "{}", if to_file { line.as_str().into() } else { term_json(&line) })
                        .map_err(|e| AuditError::Unavailable(format!("writing export: {e}")))
                })
                .await
                .map_err(show)?;
            sink.flush().map_err(io)?;
            if let Some(path) = output {
                let _ = writeln!(err, "exported {n} entries to {}", path.display());
            }
            0
        }
        AuditCommand::Verify { json, no_authentication, .. } => {
            let no_keys = verify_options.keys.is_empty();
            let published = verify_options.published.is_some();
            let report = verify(&store, &verify_options).await.map_err(show)?;
            let authenticated = report.writers_checked && report.writers_without_key.is_empty() && !no_keys;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report).unwrap_or_default()).map_err(io)?;
            } else {
                print_report(out, &report, &redact(&url), no_authentication).map_err(io)?;
            }
            if no_keys && report.checkpoints > 0 {
                let _ = writeln!(
                    err,
                    "warning: checkpoint signatures were NOT checked; pass --checkpoint-key-pub FILE to check them"
                );
            }
            if !published && report.is_intact() {
                let _ = writeln!(
                    err,
                    "note: checkpoints were not compared with a published copy (--checkpoints DIR): a rollback of \
                     the newest entries together with their checkpoints would not be seen"
                );
            }
            if !report.is_intact() {
                EXIT_TAMPERED
            } else if no_authentication {
                let _ = writeln!(
                    err,
                    "WARNING: --no-authentication: NOTHING WAS AUTHENTICATED. Anyone with write access to the \
                     database could have produced this log."
                );
                0
            } else if !authenticated {
                EXIT_TAMPERED
            } else {
                0
            }
        }
    };
    Ok(code)
}

fn show(e: AuditError) -> String {
    e.to_string()
}

fn print_entry(out: &mut dyn Write, e: &Entry, json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", term_json(&e.to_json().to_string()));
    }
    // Actor, object, reasons and sources can come from agents, file names and user names.
    let time = e.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let outcome = match &e.event.outcome {
        Outcome::Allowed => "allowed".to_string(),
        Outcome::Refused(reason) => format!("REFUSED ({})", term(reason)),
    };
    let role = e.event.role.as_deref().map(|r| format!(" as {}", term(r))).unwrap_or_default();
    let source = e.event.source.as_deref().map(|s| format!(" from {}", term(s))).unwrap_or_default();
    writeln!(
        out,
        "{:>8}  {time}  {}{role}  {}  {}  {outcome}{source}",
        e.seq,
        term(&e.event.actor),
        term(&e.event.action),
        term(&e.event.object)
    )
}

fn print_report(out: &mut dyn Write, r: &Report, store: &str, no_authentication: bool) -> std::io::Result<()> {
    let rate = r.entries as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let writers: Vec<String> = r.writers.iter().map(|(w, n)| format!("{w} {n}")).collect();
    let writers = if writers.is_empty() { "none".to_owned() } else { writers.join(", ") };
    let published = match r.published_checkpoints {
        Some(n) => format!("{n} published checkpoints match the database"),
        None => "no published checkpoints compared".to_owned(),
    };
    match &r.finding {
        None if no_authentication || !r.writers_without_key.is_empty() || !r.writers_checked => {
            let missing = if r.writers_without_key.is_empty() {
                String::new()
            } else {
                format!(
                    "\n  no public key for writer(s) {}: pass --writer-key {}=FILE",
                    r.writers_without_key.join(", "),
                    r.writers_without_key[0]
                )
            };
            writeln!(
                out,
                "NOT AUTHENTICATED: {store}\n  the chain is consistent, but {} of {} entries were authenticated{missing}\n  \
                 {} entries (last seq {}), {} checkpoints, {} signatures checked; writers: {writers}",
                r.entries_authenticated, r.entries, r.entries, r.last_seq, r.checkpoints, r.signatures_checked,
            )
        }
        None => writeln!(
            out,
            "audit log intact: {store}\n  {} entries (last seq {}), {} checkpoints, {} signatures checked, \
             {} entries after the last checkpoint\n  {} entries signed by their writers ({writers})\n  {published}\n  \
             verified in {:.3} s ({:.0} entries/s)",
            r.entries,
            r.last_seq,
            r.checkpoints,
            r.signatures_checked,
            r.unsealed,
            r.entries_authenticated,
            r.elapsed.as_secs_f64(),
            rate
        ),
        Some(f) => writeln!(
            out,
            "TAMPERED: {store}\n  {}\n  kind: {}, first affected entry: {}{}\n  {} entries verified before it",
            term(&f.message),
            serde_json::to_value(f.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            f.seq,
            f.checkpoint.map(|c| format!(", checkpoint {c}")).unwrap_or_default(),
            r.entries
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use noexit_audit::{AuditEvent, store::StoreOptions};

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        audit: AuditArgs,
    }

    async fn cli(args: &[&str]) -> (u8, String, String) {
        let parsed = Cli::try_parse_from(std::iter::once("audit").chain(args.iter().copied())).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(parsed.audit, &mut out, &mut err).await;
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    /// Five API entries and one mirror entry, each signed by its writer; the API's key also
    /// signs the checkpoints. Returns the URL, the API's and the mirror's public keys.
    async fn sample(dir: &std::path::Path) -> (String, PathBuf, PathBuf) {
        let url = format!("sqlite://{}", dir.join("audit.db").display());
        let (sk, pk) = (dir.join("checkpoint.key"), dir.join("checkpoint.pub"));
        keys::write_key_pair(&sk, &pk).unwrap();
        let (msk, mpk) = (dir.join("mirror.key"), dir.join("mirror.pub"));
        keys::write_key_pair(&msk, &mpk).unwrap();
        let key = keys::load_signing_key(&sk).unwrap();
        let options = StoreOptions {
            writer: Some(writers::Writer::new(writers::API, key.clone())),
            signing_key: Some(key),
            ..Default::default()
        };
        let store = Store::connect_with(&url, options).await.unwrap();
        for i in 0..5 {
            store.append(AuditEvent::allowed(format!("user:u{i}"), "agent.heartbeat", "workspace:p/w")).await.unwrap();
        }
        let mirror = Store::connect_with(
            &url,
            StoreOptions { writer: Some(writers::Writer::load(writers::MIRROR, &msk).unwrap()), ..Default::default() },
        )
        .await
        .unwrap();
        mirror.append(AuditEvent::allowed("workspace:p/w", "mirror.fetch", "package:x@1")).await.unwrap();
        mirror.close().await;
        store
            .append(AuditEvent::refused("user:eve", "request.approve", "workspacerequest:p/r", "own request"))
            .await
            .unwrap();
        store.close().await;
        (url, pk, mpk)
    }

    #[tokio::test]
    async fn agent_supplied_text_reaches_the_terminal_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("audit.db").display());
        let store = Store::connect(&url).await.unwrap();
        // What a root user in a VM could make its agent report: a file name that clears the
        // screen, sets the title and the clipboard (OSC), moves the cursor (C1 CSI), overprints
        // the line (CR) and reverses text (bidi override).
        let file = "out\x1b[2J\x1b[H\x1b]0;ok\x07\x1b]52;c;cm0gLXJm\x1b\\\u{9b}1A\rallowed \u{202e}vsc.exe";
        let mut event = AuditEvent::refused(
            "workspace:p/w\x1b[8m",
            "agent.outbox",
            format!("file:{file}"),
            format!("DLP hit in {file}"),
        );
        event.source = Some("10.0.0.9\x07".into());
        store.append(event).await.unwrap();
        store.close().await;
        let dangerous =
            |s: &str| s.chars().any(|c| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c));
        for args in [
            vec!["tail", "--database-url", &url],
            vec!["query", "--database-url", &url],
            vec!["query", "--database-url", &url, "--json"],
            vec!["export", "--database-url", &url],
        ] {
            let (code, out, err) = cli(&args).await;
            assert_eq!(code, 0, "{args:?}: {err}");
            assert!(!dangerous(&out), "{args:?} printed raw controls: {out:?}");
            assert!(out.contains("agent.outbox"), "{out}");
        }
        let (_, out, _) = cli(&["tail", "--database-url", &url]).await;
        assert!(out.contains(r"out\x1b[2J\x1b[H\x1b]0;ok\x07") && out.contains(r"\u{202e}vsc.exe"), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        // JSON stays JSON with the same value.
        let (_, out, _) = cli(&["query", "--database-url", &url, "--json"]).await;
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["object"], format!("file:{file}"));
        // An export to a file keeps the exact bytes.
        let path = dir.path().join("export.jsonl");
        let (code, _, _) = cli(&["export", "--database-url", &url, "-o", path.to_str().unwrap()]).await;
        assert_eq!(code, 0);
        let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(line["object"], format!("file:{file}"));
    }

    #[tokio::test]
    async fn verify_tail_query_export() {
        let dir = tempfile::tempdir().unwrap();
        let (url, pk, mpk) = sample(dir.path()).await;
        let (pk, mpk) = (pk.to_str().unwrap(), format!("mirror={}", mpk.display()));

        let (code, out, _) =
            cli(&["verify", "--database-url", &url, "--checkpoint-key-pub", pk, "--writer-key", &mpk]).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("audit log intact") && out.contains("1 signatures checked"), "{out}");
        assert!(out.contains("7 entries signed by their writers (api 6, mirror 1)"), "{out}");

        // The mirror's entry cannot be authenticated without the mirror's key: never "intact".
        let (code, out, _) = cli(&["verify", "--database-url", &url, "--checkpoint-key-pub", pk]).await;
        assert_eq!(code, EXIT_TAMPERED, "{out}");
        assert!(out.contains("NOT AUTHENTICATED") && out.contains("--writer-key mirror=FILE"), "{out}");

        // No key at all: refused, or loudly unauthenticated on request.
        let (code, out, _) = cli(&["verify", "--database-url", &url]).await;
        assert_eq!(code, EXIT_TAMPERED, "{out}");
        assert!(out.contains("NOT VERIFIED: no public key given"), "{out}");
        assert!(!out.contains("intact"), "{out}");
        let (code, out, err) = cli(&["verify", "--database-url", &url, "--no-authentication"]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("NOT AUTHENTICATED") && !out.contains("intact"), "{out}");
        assert!(err.contains("NOTHING WAS AUTHENTICATED"), "{err}");
        assert_eq!(parse_writer_actions("mirror=cran.").unwrap(), ("mirror".into(), Some("cran.".into())));
        assert_eq!(parse_writer_actions("api=*").unwrap(), ("api".into(), None));
        assert!(parse_writer_actions("mirror=").is_err());
        // Declaring that the mirror owns nothing of what it wrote: its entry is now refused.
        let (code, out, _) = cli(&[
            "verify",
            "--database-url",
            &url,
            "--checkpoint-key-pub",
            pk,
            "--writer-key",
            &mpk,
            "--writer-actions",
            "mirror=cran.",
        ])
        .await;
        assert_eq!(code, EXIT_TAMPERED, "{out}");
        assert!(out.contains("entry 6 was written by mirror, which may not write this action"), "{out}");
        let unknown = parse_writer_key("printer=x.pub").unwrap_err();
        assert!(unknown.contains("not a writer"), "{unknown}");

        let (_, out, _) = cli(&["tail", "-n", "2", "--store", &url]).await;
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(out.contains("REFUSED (own request)"), "{out}");

        let (_, out, _) = cli(&["query", "--database-url", &url, "--outcome", "refused", "--json"]).await;
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["actor"], "user:eve");

        let file = dir.path().join("export.jsonl");
        let (code, _, err) =
            cli(&["export", "--database-url", &url, "--action", "agent.*", "-o", file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{err}");
        let exported = std::fs::read_to_string(&file).unwrap();
        assert_eq!(exported.lines().count(), 5);
        let first: serde_json::Value = serde_json::from_str(exported.lines().next().unwrap()).unwrap();
        assert_eq!(first["writer"], "api");
        assert_eq!(first["signature"].as_str().map(str::len), Some(128));
        assert!(exported.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }

    #[tokio::test]
    async fn tampering_exits_1_and_errors_exit_2() {
        let dir = tempfile::tempdir().unwrap();
        let (url, pk, _) = sample(dir.path()).await;
        let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::raw_sql("DROP TRIGGER audit_log_no_update; UPDATE audit_log SET object = 'x' WHERE seq = 3")
            .execute(&raw)
            .await
            .unwrap();
        raw.close().await;
        let (code, out, _) =
            cli(&["verify", "--database-url", &url, "--checkpoint-key-pub", pk.to_str().unwrap()]).await;
        assert_eq!(code, EXIT_TAMPERED, "{out}");
        assert!(out.contains("TAMPERED") && out.contains("entry 3 was changed"), "{out}");

        let (code, _, err) = cli(&["verify", "--store", &url, "--checkpoint-key-pub", "/nonexistent.pub"]).await;
        assert_eq!(code, EXIT_USAGE);
        assert!(err.contains("/nonexistent.pub"), "{err}");

        let missing = format!("sqlite://{}", dir.path().join("nothing.db").display());
        let (code, _, err) = cli(&["tail", "--store", &missing]).await;
        assert_eq!(code, EXIT_USAGE);
        assert!(err.contains("nothing.db"), "{err}");

        let (code, _, err) = cli(&["tail", "--store", "mysql://x"]).await;
        assert_eq!((code, err.contains("unsupported")), (EXIT_USAGE, true), "{err}");
    }

    #[test]
    fn times_parse_in_three_forms() {
        assert_eq!(parse_time("2026-12-01T08:00:00Z").unwrap().to_rfc3339(), "2026-12-01T08:00:00+00:00");
        assert_eq!(parse_time("2026-12-01").unwrap().to_rfc3339(), "2026-12-01T00:00:00+00:00");
        let age = Utc::now() - parse_time("2h").unwrap();
        assert!((age.num_seconds() - 7200).abs() < 5);
        assert!(parse_time("2 weeks").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
