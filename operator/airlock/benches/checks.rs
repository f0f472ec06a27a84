//! The airlock's checks on a 100,000-row CSV: time and peak memory of `checks::run`, against
//! references in the same run (the csv crate parsing the same bytes alone; the DLP scan alone).
//!
//!     cargo bench -p noexit-airlock --bench checks
//!     NOEXIT_BENCH_ROWS=1000000 cargo bench -p noexit-airlock --bench checks
//!
//! Time: best of five, by this thread's CPU time (wall-clock beside it). Memory, two ways:
//! - heap: a counting global allocator gives the peak bytes allocated during the call, above
//!   what was allocated before it (the input itself is not counted);
//! - RSS: the bench runs each step again in a child process of its own and reads the child's
//!   VmHWM (peak resident set, input and binary included) from /proc/self/status.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use noexit_airlock::checks::{Policy, Submission, run};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A crosstab-shaped table: region × age band × sex, four count columns and a row total,
/// with some small counts, zeros and suppressed cells so every path runs.
fn table(rows: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(11);
    let mut out = String::with_capacity(rows * 48);
    out.push_str("region,age band,sex,admitted,discharged,transferred,died,Total\n");
    for i in 0..rows {
        let mut total = 0u32;
        let mut cells = [String::new(), String::new(), String::new(), String::new()];
        for c in &mut cells {
            let roll: u32 = rng.gen_range(0..1000);
            *c = match roll {
                0 => "0".into(),
                1..=3 => {
                    let n = rng.gen_range(1..10);
                    total += n;
                    n.to_string()
                }
                4..=9 => "*".into(),
                _ => {
                    let n = rng.gen_range(10..5000);
                    total += n;
                    n.to_string()
                }
            };
        }
        let band = 5 * (i % 18);
        out.push_str(&format!(
            "Region {},{}-{},{},{},{},{},{},{total}\n",
            i / 36,
            band,
            band + 4,
            if i % 2 == 0 { "F" } else { "M" },
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        ));
    }
    out.into_bytes()
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The steps measured, by name.
fn step(name: &str, bytes: &[u8]) -> u64 {
    match name {
        "run" => {
            let sub = Submission { file_name: "admissions.csv", bytes, metadata: None, acro_results: None };
            let r = run(&sub, &Policy::default());
            r.results.iter().map(|c| c.cells.len() as u64).sum()
        }
        "csv" => {
            let mut rdr = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(bytes);
            let mut rec = csv::ByteRecord::new();
            let mut fields = 0;
            while rdr.read_byte_record(&mut rec).unwrap_or(false) {
                fields += rec.len() as u64;
            }
            fields
        }
        "dlp" => {
            // In chunks, as the agent and `run` feed it.
            let det = noexit_dlp::Detectors::builtin();
            let mut s = det.scanner();
            bytes.chunks(256 * 1024).for_each(|c| s.feed(c));
            s.finish().findings.iter().map(|f| f.count).sum()
        }
        other => panic!("unknown step {other}"),
    }
}

struct Figures {
    cpu: f64,
    wall: f64,
    heap_peak: usize,
    out: u64,
}

fn measure(name: &str, bytes: &[u8]) -> Figures {
    let mut best = Figures { cpu: f64::MAX, wall: 0.0, heap_peak: 0, out: 0 };
    for _ in 0..5 {
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let (cpu, wall) = (thread_cpu_seconds(), Instant::now());
        let out = step(name, bytes);
        let (cpu, wall) = (thread_cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
        let heap_peak = PEAK.load(Ordering::Relaxed) - base;
        if cpu < best.cpu {
            best = Figures { cpu, wall, heap_peak, out };
        }
    }
    best
}

/// Peak RSS of one step in a fresh process: (VmHWM after generating the input, after the step).
fn child_rss(name: &str, rows: usize) -> (u64, u64) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let out = Command::new(exe)
        .env("NOEXIT_BENCH_CHILD", name)
        .env("NOEXIT_BENCH_ROWS", rows.to_string())
        .output()
        .unwrap_or_else(|e| panic!("child: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut nums = text.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

fn main() {
    let rows: usize = std::env::var("NOEXIT_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let bytes = table(rows);
    if let Ok(name) = std::env::var("NOEXIT_BENCH_CHILD") {
        let before = vm_hwm_kib();
        std::hint::black_box(step(&name, &bytes));
        println!("{before} {}", vm_hwm_kib());
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mb = bytes.len() as f64 / 1e6;
    println!("input: {rows} rows, {mb:.2} MB CSV (8 columns, {} lines)", rows + 1);
    let sub = Submission { file_name: "admissions.csv", bytes: &bytes, metadata: None, acro_results: None };
    let report = run(&sub, &Policy::default());
    for r in &report.results {
        println!("  {:<13} {:<7?} {} cell(s) listed: {}", r.check, r.verdict, r.cells.len(), r.message);
    }
    println!();
    println!(
        "step                              CPU s   wall s    MB/s(CPU)   heap peak MiB   child VmHWM MiB (before -> after step)"
    );
    let mut figures = Vec::new();
    for (name, label) in
        [("run", "checks::run (DLP + SDC)"), ("csv", "csv crate parse alone"), ("dlp", "DLP scan alone")]
    {
        let f = measure(name, &bytes);
        let (before, after) = child_rss(name, rows);
        println!(
            "{label:<32} {:7.3}  {:7.3}   {:9.0}   {:13.2}   {:.1} -> {:.1}",
            f.cpu,
            f.wall,
            mb / f.cpu,
            f.heap_peak as f64 / (1 << 20) as f64,
            before as f64 / 1024.0,
            after as f64 / 1024.0
        );
        std::hint::black_box(f.out);
        figures.push(f);
    }
    let (run, csv, dlp) = (&figures[0], &figures[1], &figures[2]);
    println!();
    println!("ratio run / csv parse alone:        {:6.2}", run.cpu / csv.cpu);
    println!("ratio run / DLP scan alone:         {:6.2}", run.cpu / dlp.cpu);
    println!("ratio run / (csv parse + DLP scan): {:6.2}", run.cpu / (csv.cpu + dlp.cpu));
    let ok_time = run.wall < 1.0;
    let ok_mem = run.heap_peak < 64 << 20;
    println!(
        "goal < 1 s: {} ({:.3} s wall); goal < 64 MiB: {} ({:.2} MiB heap above the input)",
        if ok_time { "met" } else { "NOT met" },
        run.wall,
        if ok_mem { "met" } else { "NOT met" },
        run.heap_peak as f64 / (1 << 20) as f64
    );
}
