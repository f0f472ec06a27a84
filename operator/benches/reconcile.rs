//! Render + reconcile of 1,000 Workspaces across 50 Projects against the fake API.
//!
//! `cargo bench -p noexit-operator --features testing --bench reconcile`
//! (`NOEXIT_BENCH_CONCURRENCY=<n>`: reconciles in flight per controller, default 4)
//!
//! The fake API server runs in a child process (this binary re-executed with
//! `NOEXIT_BENCH_FAKE_API=1`, serving on loopback HTTP), so the peak RSS reported is the
//! operator side's alone: controllers, caches, client. Reports pure render throughput, first-pass
//! reconcile throughput, reconciles per second, p50/p99 reconcile time and VmHWM.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_crds::workspace::Runtime;
use noexit_crds::{Dataset, Project, Workspace};
use noexit_operator::controllers::context::Backoff;
use noexit_operator::controllers::site::Site;
use noexit_operator::controllers::workspace::{self, AgentCredentials};
use noexit_operator::manifests::{Manifest, parse_documents};
use noexit_operator::pki::Ca;
use noexit_operator::testing::{FakeApi, Running};

const PROJECTS: usize = 50;
const PER_PROJECT: usize = 20;
const CHILD_ENV: &str = "NOEXIT_BENCH_FAKE_API";

struct Fixtures {
    projects: Vec<Project>,
    datasets: Vec<Dataset>,
    workspaces: Vec<Workspace>,
}

/// The shipped example, multiplied: 50 projects with 20 workspaces each (every tenth a VM),
/// both datasets granted to every project.
fn fixtures() -> Fixtures {
    let docs = parse_documents(include_str!("../../examples/ward-7.yaml")).expect("example parses");
    let (mut project, mut datasets, mut templates) = (None, Vec::new(), Vec::new());
    for m in docs {
        match m {
            Manifest::Project(p) => project = Some(*p),
            Manifest::Dataset(d) => datasets.push(*d),
            Manifest::Workspace(w) => templates.push(*w),
            Manifest::WorkspaceRequest(_) => {}
        }
    }
    let project = project.expect("example has a project");
    let pod = templates.iter().find(|w| w.spec.runtime == Runtime::Pod).expect("pod workspace").clone();
    let vm = templates.iter().find(|w| w.spec.runtime == Runtime::Vm).expect("vm workspace").clone();
    let mut projects = Vec::new();
    let mut workspaces = Vec::new();
    for p in 0..PROJECTS {
        let name = format!("study-{p:02}");
        let mut proj = project.clone();
        proj.metadata.name = Some(name.clone());
        proj.spec.quota.workspaces = PER_PROJECT as u32;
        projects.push(proj);
        for w in 0..PER_PROJECT {
            let mut ws = if w % 10 == 9 { vm.clone() } else { pod.clone() };
            ws.metadata.name = Some(format!("ws-{w:02}"));
            ws.metadata.namespace = Some(format!("noexit-{name}"));
            ws.spec.project = name.clone();
            workspaces.push(ws);
        }
    }
    for d in &mut datasets {
        d.spec.granted_to = projects.iter().map(|p| p.name_any()).collect();
    }
    Fixtures { projects, datasets, workspaces }
}

/// Child process: seed and serve the fake API until the parent closes our stdin.
fn serve_fake_api() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let api = FakeApi::new();
        api.record_calls(false);
        let f = fixtures();
        for d in &f.datasets {
            api.create(d).expect("dataset");
        }
        for p in &f.projects {
            api.create(p).expect("project");
        }
        for w in &f.workspaces {
            api.create(w).expect("workspace");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("PORT {}", listener.local_addr().expect("addr").port());
        std::thread::spawn(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            std::process::exit(0);
        });
        api.serve(listener).await.expect("serve");
    });
    ExitCode::SUCCESS
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) of process `pid` ("self" for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Pure validate + build of every workspace (what `render` does), one credential set reused.
fn bench_render(f: &Fixtures) {
    let ca = Ca::generate("bench CA").expect("ca");
    let id = WorkspaceIdentity { project: "study-00".into(), name: "ws-00".into() };
    let cert = ca.issue_workspace_client(&id, chrono::Duration::days(30)).expect("cert");
    let creds = AgentCredentials {
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        ca_pem: ca.cert_pem().to_owned(),
        serial: cert.serial,
        not_after: cert.not_after.to_rfc3339(),
    };
    let vnc = noexit_operator::controllers::workspace::build::VncCredential::generate();
    let site = Site::default();
    let now = chrono::Utc::now();
    let start = Instant::now();
    let mut children = 0;
    for ws in &f.workspaces {
        let project = f.projects.iter().find(|p| p.name_any() == ws.spec.project);
        let resolved = workspace::validate(ws, project, &f.datasets, &site.workspace_images, now);
        assert!(resolved.problems.is_empty(), "{:?}", resolved.problems);
        children += workspace::build(ws, &resolved, &site, &creds, &vnc).expect("build").len();
    }
    let took = start.elapsed();
    println!(
        "render:    {} workspaces -> {children} children in {:.1} ms ({:.0} workspaces/s, {:.1} us each)",
        f.workspaces.len(),
        took.as_secs_f64() * 1e3,
        f.workspaces.len() as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f.workspaces.len() as f64
    );
}

#[derive(Default)]
struct Stats {
    durations: Vec<Duration>,
    done: HashSet<String>,
}

fn main() -> ExitCode {
    if std::env::var_os(CHILD_ENV).is_some() {
        return serve_fake_api();
    }
    // Reconciles in flight per controller (the operator's --concurrency).
    let concurrency: u16 = std::env::var("NOEXIT_BENCH_CONCURRENCY").ok().and_then(|c| c.parse().ok()).unwrap_or(4);
    println!("concurrency {concurrency} (NOEXIT_BENCH_CONCURRENCY)");
    let f = fixtures();
    let total = f.workspaces.len();
    bench_render(&f);
    drop(f);

    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the fake API process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port line");
    let port: u16 = line.trim().strip_prefix("PORT ").and_then(|p| p.parse().ok()).expect("PORT <n>");

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let result = runtime.block_on(async move {
        let url: http::Uri = format!("http://127.0.0.1:{port}").parse().expect("url");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
        let stats = Arc::new(Mutex::new(Stats::default()));
        let observer = {
            let stats = stats.clone();
            Arc::new(move |kind: &'static str, key: &str, took: Duration, ok: bool| {
                if kind != "Workspace" {
                    return;
                }
                let mut s = stats.lock().expect("stats");
                s.durations.push(took);
                if ok {
                    s.done.insert(key.to_owned());
                }
            })
        };
        let start = Instant::now();
        let running = Running::start_observed(client, Backoff::default(), concurrency, Some(observer));
        let deadline = start + Duration::from_secs(300);
        let first_pass = loop {
            if stats.lock().expect("stats").done.len() >= total {
                break Some(start.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Let follow-up reconciles (triggered by our own child and status writes) settle.
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let n = stats.lock().expect("stats").durations.len();
            if n == last {
                break;
            }
            last = n;
        }
        let settled = start.elapsed();
        let errors: Vec<String> = running
            .ctx
            .metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("noexit_reconcile_errors_total"))
            .map(str::to_owned)
            .collect();
        running.stop().await;
        let s = stats.lock().expect("stats");
        (first_pass, settled, s.durations.clone(), errors, s.done.len())
    });
    let child_cpu = cpu_seconds(&child.id().to_string());
    let own_cpu = cpu_seconds("self");
    drop(child.stdin.take());
    let _ = child.wait();

    let (first_pass, settled, mut durations, error_lines, done) = result;
    let errors = error_lines.len();
    durations.sort();
    let Some(first_pass) = first_pass else {
        eprintln!("only {done} of {total} workspaces were reconciled within 300 s");
        return ExitCode::FAILURE;
    };
    let active: Duration = settled.saturating_sub(Duration::from_millis(500));
    println!(
        "reconcile: {done} workspaces in {PROJECTS} projects, first pass in {:.2} s ({:.0} workspaces/s)",
        first_pass.as_secs_f64(),
        total as f64 / first_pass.as_secs_f64()
    );
    println!(
        "           {} workspace reconciles ({errors} error series) in {:.2} s = {:.0} reconciles/s",
        durations.len(),
        active.as_secs_f64(),
        durations.len() as f64 / active.as_secs_f64()
    );
    println!(
        "           reconcile time p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&durations, 0.50).as_secs_f64() * 1e3,
        percentile(&durations, 0.99).as_secs_f64() * 1e3,
        durations.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    for line in &error_lines {
        println!("           {line}");
    }
    println!(
        "cpu:       operator {own_cpu:.2} s ({:.2} ms per reconcile), fake API {child_cpu:.2} s; load average {}",
        own_cpu * 1e3 / durations.len().max(1) as f64,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "memory:    operator process peak RSS (VmHWM) {:.1} MiB (fake API in a separate process)",
        vm_hwm_kib() as f64 / 1024.0
    );
    ExitCode::SUCCESS
}
