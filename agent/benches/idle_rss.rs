//! Resident memory of the real agent binary at idle: started with a config against a fake
//! control-plane API (mTLS), left to send heartbeats, then VmRSS / VmHWM read from /proc.
//!
//!     cargo bench -p noexit-agent --bench idle_rss
//!     NOEXIT_BENCH_HEARTBEATS=30 cargo bench -p noexit-agent --bench idle_rss
//!
//! Target: < 20 MiB resident at idle.

#[path = "../tests/support/mod.rs"]
mod support;

use support::{Agent, Api, Env, Server, until};

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let beats: usize = std::env::var("NOEXIT_BENCH_HEARTBEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let env = Env::new();
        let api = Api::default();
        let (server, addr) = Server::start("127.0.0.1:0".parse().unwrap(), env.server_tls.clone(), api.clone()).await;
        env.write_config(addr.port());
        let agent = Agent::start(&env);
        let pid = agent.0.id();
        // One desktop session and one outbox file first, so idle follows real work.
        env.hook("connect", "alice");
        std::fs::write(env.path("outbox/table.csv"), "ward,count\nA,31\n".repeat(100_000)).unwrap();
        until(&env, 60, "the outbox file", || api.with(|r| r.contents.len() == 1)).await;
        let start = api.with(|r| r.heartbeats.len());
        until(&env, 10 + 2 * beats as u64, "heartbeats", || api.with(|r| r.heartbeats.len() >= start + beats)).await;
        let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
        let depth = api.with(|r| r.heartbeats.last().map(|h| h.spool_depth));
        println!("agent idle after {beats} heartbeats (1 s apart), spool depth {depth:?}:");
        println!("  VmRSS {:6.1} MiB   (target < 20 MiB)", rss as f64 / 1024.0);
        println!("  VmHWM {:6.1} MiB   (peak, includes scanning a 1.6 MB outbox file)", hwm as f64 / 1024.0);
        drop(agent);
        server.stop();
    });
}
