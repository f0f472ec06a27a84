//! DLP throughput: our scanner against a plain single-regex scan of the same corpus, same run.
//!
//!     cargo bench -p noexit-agent --bench dlp            # 100 MB
//!     NOEXIT_BENCH_MB=20 cargo bench -p noexit-agent --bench dlp
//!
//! Single-threaded, so MB/s is per core. Streams the corpus in 1 MiB chunks as the outbox does.

use std::time::Instant;

use noexit_agent::dlp::Detectors;
use noexit_agent::dlp::testdata::mixed_corpus;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn main() {
    let mb: usize = std::env::var("NOEXIT_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let corpus = mixed_corpus(&mut StdRng::seed_from_u64(7), mb * 1_000_000);
    let size = corpus.len() as f64 / 1e6;
    let digits = corpus.iter().filter(|b| b.is_ascii_digit()).count() as f64 / corpus.len() as f64;
    println!("corpus: {size:.1} MB mixed text, {:.1}% digits", digits * 100.0);

    let det = Detectors::builtin();
    let best = |f: &mut dyn FnMut() -> u64| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let n = f();
                (t.elapsed().as_secs_f64(), n)
            })
            .fold((f64::MAX, 0), |a, b| if b.0 < a.0 { b } else { a })
    };
    let (ours, found) = best(&mut || {
        let mut s = det.scanner();
        for chunk in corpus.chunks(1 << 20) {
            s.feed(chunk);
        }
        s.finish().findings.iter().map(|f| f.count).sum()
    });
    let re = regex::bytes::Regex::new(r"(?-u)\b\d{10}\b").unwrap_or_else(|e| panic!("regex: {e}"));
    let (reference, ten_digit) = best(&mut || re.find_iter(&corpus).count() as u64);

    let ours_mbs = size / ours;
    let ref_mbs = size / reference;
    println!("noexit dlp (7 detectors, validated): {ours_mbs:8.0} MB/s  ({found} findings)");
    println!("regex \\b\\d{{10}}\\b (one pattern):     {ref_mbs:8.0} MB/s  ({ten_digit} matches)");
    println!("ratio ours / single regex:           {:8.2}", ours_mbs / ref_mbs);
}
