//! A private PostgreSQL server for tests: Debian's binaries, a cluster in a temp dir, loopback
//! only, trust auth for user `postgres`. Stopped when dropped.
//!
//! ```ignore
//! let Some(pg) = support::pg::shared() else { return }; // prints why when skipping
//! let url = pg.create_database("my_test").unwrap();     // postgres://postgres@127.0.0.1:PORT/my_test
//! ```
//! `shared()` gives every test in a binary the same server while any test holds it; crash tests
//! start their own with `PgServer::start()` and call `stop()`/`kill()`/`start_again()`.
//!
//! Without PostgreSQL installed the helpers print a skip message and return `None`, unless
//! `NOEXIT_CI=1`, where they panic. `PG_BIN` overrides the binary directory.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    net::TcpListener,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
};

use anyhow::{Context, bail};

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// uid/gid to run server commands as (PostgreSQL refuses to run as root).
    run_as: Option<(u32, u32)>,
    fsync: bool,
    running: AtomicBool,
}

/// Debian's newest `/usr/lib/postgresql/<version>/bin`, or `$PG_BIN`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| d.join("initdb").exists());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn ci() -> bool {
    std::env::var("NOEXIT_CI").is_ok_and(|v| v == "1")
}

/// `None` (after printing why) when PostgreSQL is missing; panics when it must not be skipped.
fn missing(why: &str) -> Option<PgServer> {
    if ci() {
        panic!("PostgreSQL is required with NOEXIT_CI=1 but {why}; run hack/install-deps.sh");
    }
    eprintln!("SKIP: PostgreSQL tests skipped: {why} (install package `postgresql`, or set PG_BIN)");
    None
}

fn uid_gid_of(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PgServer {
    /// A new cluster with `fsync=off`: fast, and still loses no acknowledged commit when the
    /// server process is killed (only an OS crash would).
    pub fn start() -> Option<PgServer> {
        Self::start_with(false)
    }

    /// A new cluster; `fsync` true for benchmarks that measure durable commits.
    pub fn start_with(fsync: bool) -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            return match std::env::var("PG_BIN") {
                Ok(dir) => missing(&format!("PG_BIN={dir} holds no initdb")),
                Err(_) => missing("no initdb under /usr/lib/postgresql/*/bin"),
            };
        };
        match Self::try_start(bin, fsync) {
            Ok(s) => Some(s),
            Err(e) => panic!("PostgreSQL is installed but did not start: {e:#}"),
        }
    }

    fn try_start(bin: PathBuf, fsync: bool) -> anyhow::Result<PgServer> {
        let dir = tempfile::Builder::new().prefix("noexit-pg-").tempdir()?;
        let is_root = std::fs::metadata("/proc/self")?.uid() == 0;
        let run_as = if is_root {
            let ids = uid_gid_of("postgres").context("running as root and there is no user `postgres`")?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))?;
            Some(ids)
        } else {
            None
        };
        let mut server = PgServer { dir, bin, port: 0, run_as, fsync, running: AtomicBool::new(false) };
        let data = server.data_dir();
        server
            .run_checked(
                "initdb",
                &["-D", path(&data), "-U", "postgres", "--auth=trust", "--no-sync", "--no-locale", "-E", "UTF8"],
            )
            .context("initdb")?;
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.start_again() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.current_dir(self.dir.path()).env("LC_ALL", "C").env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn run_checked(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let out = self.command(program).args(args).output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Starts the (stopped) cluster again on the same port and data.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -h 127.0.0.1 -k {} -c max_connections=300 -c shared_buffers=64MB",
            self.port,
            self.dir.path().display()
        );
        // Without fsync a commit still reaches the kernel before the client hears of it, so a
        // crash of PostgreSQL itself (`kill`) loses nothing acknowledged; only a machine crash would.
        if !self.fsync {
            options.push_str(" -c fsync=off -c full_page_writes=off");
        }
        let data = self.data_dir();
        let log = self.log_file();
        let started = self
            .run_checked("pg_ctl", &["-D", path(&data), "-l", path(&log), "-w", "-t", "60", "-o", &options, "start"]);
        if let Err(e) = started {
            let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
            let tail: String =
                log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            bail!("{e:#}\n--- postgres.log ---\n{tail}");
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Clean shutdown (waits for it).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Like a crash: no shutdown checkpoint, clients cut off.
    pub fn kill(&self) -> anyhow::Result<()> {
        self.pg_ctl_stop("immediate")
    }

    fn pg_ctl_stop(&self, mode: &str) -> anyhow::Result<()> {
        if !self.running.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let data = self.data_dir();
        self.run_checked("pg_ctl", &["-D", path(&data), "-m", mode, "-w", "-t", "60", "stop"]).map(|_| ())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `<name>_<n>` (unique in this process) and returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .take(40)
            .collect();
        let db = format!("{clean}_{}", N.fetch_add(1, Ordering::SeqCst));
        self.psql("postgres", &format!("CREATE DATABASE {db}"))?;
        Ok(self.url(&db))
    }

    /// Runs SQL as the superuser through `psql` (what an attacker with database access does).
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("stopping test PostgreSQL in {}: {e:#}", self.dir.path().display());
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// One server shared by the tests of this binary that run at the same time; it stops when the
/// last of them drops its handle (so nothing outlives the test process).
pub fn shared() -> Option<Arc<PgServer>> {
    static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(server) = slot.upgrade() {
        return Some(server);
    }
    let server = Arc::new(PgServer::start()?);
    *slot = Arc::downgrade(&server);
    Some(server)
}
