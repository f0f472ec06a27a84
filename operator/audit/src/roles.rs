//! `noexit-operator audit-roles`: runs the migrations as the database owner, then gives each
//! writer its own PostgreSQL role that may only append its own kind of entry.
//!
//! - the owner (the URL given here) owns every table and trigger; only it can drop them;
//! - `noexit_api`: reads and writes the API's tables; appends to `audit_log` (any action no
//!   other writer owns) and `audit_checkpoint`; never updates or deletes them;
//! - `noexit_mirror`, `noexit_webhook`, `noexit_dns`, `noexit_gateway`: append `mirror.*`,
//!   `admission.*`, `dns.*`, `gateway.*` entries and read back only the chain head and
//!   idempotency keys; the gateway also inserts the desktop sessions it opens.
//!
//! The trigger of `0003_audit_writers.sql` enforces the action prefixes per role from the table
//! `audit_writers`, which this command fills. Run it after every upgrade (new tables).

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

use super::AuditError;
use super::store::{Pool, Store, migrate, redact};
use super::writers::WRITERS;

/// Arguments of `noexit-operator audit-roles`.
#[derive(clap::Args, Debug, Clone)]
pub struct RolesArgs {
    /// The database as its owner (runs migrations, creates roles, grants).
    #[arg(long, env = "NOEXIT_OWNER_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The API's role: a role name, or the API's postgres:// URL (its user and password are
    /// then used).
    #[arg(long, env = "NOEXIT_API_DATABASE_URL", default_value = "noexit_api", hide_env_values = true)]
    pub api: String,
    /// The mirror's role, or its URL.
    #[arg(long, env = "NOEXIT_MIRROR_DATABASE_URL", default_value = "noexit_mirror", hide_env_values = true)]
    pub mirror: String,
    /// The webhook's role, or its URL.
    #[arg(long, env = "NOEXIT_WEBHOOK_DATABASE_URL", default_value = "noexit_webhook", hide_env_values = true)]
    pub webhook: String,
    /// The DNS server's role, or its URL.
    #[arg(long, env = "NOEXIT_DNS_DATABASE_URL", default_value = "noexit_dns", hide_env_values = true)]
    pub dns: String,
    /// The remote-desktop gateway's role, or its URL.
    #[arg(long, env = "NOEXIT_GATEWAY_DATABASE_URL", default_value = "noexit_gateway", hide_env_values = true)]
    pub gateway: String,
    /// Print the SQL instead of running it (for a DBA to review).
    #[arg(long)]
    pub print_sql: bool,
}

/// A writer's role: name and optional password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub writer: &'static str,
    pub name: String,
    pub password: Option<String>,
}

impl Role {
    /// From a role name or a `postgres://user:password@…` URL.
    pub fn parse(writer: &'static str, value: &str) -> Result<Role, AuditError> {
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(value)
                .map_err(|e| AuditError::Rejected(format!("--{writer} {}: {e}", redact(value))))?;
            return Ok(Role { writer, name: opts.get_username().to_owned(), password: url_password(value) });
        }
        let valid = !value.is_empty()
            && value.len() <= 63
            && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(AuditError::Rejected(format!(
                "--{writer} `{value}`: a role name is lower-case letters, digits and _ (at most 63)"
            )));
        }
        Ok(Role { writer, name: value.to_owned(), password: None })
    }
}

/// The percent-decoded password of `scheme://user:password@host/…`.
fn url_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.rfind('@')?];
    let encoded = userinfo.split_once(':')?.1;
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()),
        ) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The statements that create the roles and grant them exactly what they need. Role creation
/// tolerates a concurrent creator (roles are shared by every database of the server).
pub fn sql(roles: &[Role]) -> Vec<String> {
    let mut out = Vec::new();
    let audit_tables = ["audit_log", "audit_checkpoint", "audit_writers", "_sqlx_migrations"];
    for r in roles {
        let (name, id) = (&r.name, ident(&r.name));
        out.push(format!(
            "DO $$ BEGIN CREATE ROLE {id} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ));
        if let Some(p) = &r.password {
            out.push(format!("ALTER ROLE {id} PASSWORD {}", lit(p)));
        }
        out.push(format!("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {id}"));
        out.push(format!("GRANT USAGE ON SCHEMA public TO {id}"));
        out.push(format!("GRANT SELECT ON _sqlx_migrations, audit_writers TO {id}"));
        let rule = WRITERS.iter().find(|w| w.name == r.writer);
        let prefix = rule.and_then(|w| w.prefix).map_or("NULL".to_owned(), lit);
        out.push(format!(
            "INSERT INTO audit_writers (role_name, writer, action_prefix) VALUES ({}, {}, {prefix}) \
             ON CONFLICT (role_name) DO UPDATE SET writer = EXCLUDED.writer, action_prefix = EXCLUDED.action_prefix",
            lit(name),
            lit(r.writer)
        ));
        if r.writer == super::writers::API {
            // Every table of the API, present and future, except the audit tables.
            out.push(format!(
                "DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' \
                 AND tablename NOT IN ({}) LOOP EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO %I', t, {}); \
                 END LOOP; END $$",
                audit_tables.iter().map(|t| lit(t)).collect::<Vec<_>>().join(", "),
                lit(name)
            ));
            out.push(format!("GRANT SELECT, INSERT ON audit_log, audit_checkpoint TO {id}"));
        } else {
            // The head of the chain and the idempotency keys, nothing else of the log.
            out.push(format!("GRANT SELECT (seq, hash, idempotency_key) ON audit_log TO {id}"));
            out.push(format!("GRANT INSERT ON audit_log TO {id}"));
            if r.writer == super::writers::GATEWAY {
                // The desktop sessions it opens, beside the agents' reports (`noexit sessions`);
                // `ON CONFLICT (id)` reads the id.
                out.push(format!("GRANT SELECT (id), INSERT ON agent_sessions TO {id}"));
            }
        }
    }
    out
}

/// Runs [`RolesArgs`]; returns what to print.
pub async fn run(args: &RolesArgs) -> Result<String, AuditError> {
    let roles = vec![
        Role::parse(super::writers::API, &args.api)?,
        Role::parse(super::writers::MIRROR, &args.mirror)?,
        Role::parse(super::writers::WEBHOOK, &args.webhook)?,
        Role::parse(super::writers::DNS, &args.dns)?,
        Role::parse(super::writers::GATEWAY, &args.gateway)?,
    ];
    let statements = sql(&roles);
    if args.print_sql {
        return Ok(statements.iter().map(|s| format!("{s};")).collect::<Vec<_>>().join("\n"));
    }
    let store = Store::open_for_owner(&args.database_url).await?;
    migrate(store.pool(), &args.database_url).await?;
    let Pool::Postgres(pg) = store.pool() else {
        store.pool_close().await;
        return Ok(format!(
            "migrated {}; SQLite has no roles: entries are bound to their writers by their signatures only",
            redact(&args.database_url)
        ));
    };
    let mut tx = pg.begin().await.map_err(|e| AuditError::Unavailable(e.to_string()))?;
    for s in &statements {
        sqlx::raw_sql(s).execute(&mut *tx).await.map_err(|e| {
            // Never echo a password.
            let shown = if s.contains(" PASSWORD ") { "ALTER ROLE … PASSWORD …".to_owned() } else { s.clone() };
            AuditError::Unavailable(format!("{shown}: {e}"))
        })?;
    }
    tx.commit().await.map_err(|e| AuditError::Unavailable(e.to_string()))?;
    store.pool_close().await;
    let names: Vec<String> = roles.iter().map(|r| format!("{} ({})", r.name, r.writer)).collect();
    Ok(format!("migrated {} and set up writer roles: {}", redact(&args.database_url), names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_names_or_urls() {
        let r = Role::parse("mirror", "postgres://noexit_mirror:s%40cret@db:5432/noexit").unwrap();
        assert_eq!((r.name.as_str(), r.password.as_deref()), ("noexit_mirror", Some("s@cret")));
        assert_eq!(Role::parse("api", "noexit_api").unwrap().password, None);
        assert!(Role::parse("api", "x; DROP TABLE audit_log").is_err());
        let sql = sql(&[Role { writer: "mirror", name: "m".into(), password: Some("it's".into()) }]).join("\n");
        assert!(sql.contains("PASSWORD 'it''s'"), "{sql}");
        assert!(sql.contains("'mirror.'"), "{sql}");
        assert!(!sql.contains("UPDATE ON audit_log") && !sql.contains("agent_sessions"), "{sql}");
        let gw = super::sql(&[Role { writer: "gateway", name: "g".into(), password: None }]).join("\n");
        assert!(
            gw.contains("'gateway.'") && gw.contains("GRANT SELECT (id), INSERT ON agent_sessions TO \"g\""),
            "{gw}"
        );
    }
}
