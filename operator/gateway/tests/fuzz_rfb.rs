//! Fuzz-style test of the RFB filters: a corpus of well-formed streams (what noVNC and Xvnc
//! exchange, plus clipboard traffic), mutated at random with a fixed seed and fed in random
//! chunks. The filters must never panic, must make progress, and what they let through must
//! itself be a clean stream: a fresh filter passes it unchanged, with no clipboard in it.
//!
//!   cargo test -p noexit-gateway --test fuzz_rfb
//!   NOEXIT_FUZZ_ITERATIONS=200000 cargo test -p noexit-gateway --test fuzz_rfb --release

use noexit_gateway::rfb::{ClientFilter, DropReason, PastePolicy, RfbError, ServerFilter, Step, encoding};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MARKER: &[u8] = b"CLIPBOARD-MARKER-7f3a";
const W: u16 = 64;
const H: u16 = 48;

fn iterations() -> usize {
    std::env::var("NOEXIT_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000)
}

/// Feed `input` in chunks of a random size (the harness checks progress and bounds).
fn drive(
    rng: &mut StdRng,
    step: impl FnMut(&[u8]) -> Result<Step, RfbError>,
    input: &[u8],
) -> (Vec<u8>, Vec<DropReason>, Option<RfbError>) {
    noexit_gateway::rfb::harness::drive(step, input, rng.gen_range(1..=64))
}

fn rect(x: u16, y: u16, w: u16, h: u16, enc: i32) -> Vec<u8> {
    [x, y, w, h].iter().flat_map(|n| n.to_be_bytes()).chain(enc.to_be_bytes()).collect()
}

fn server_message(rng: &mut StdRng) -> Vec<u8> {
    let cut = |extended: bool| {
        let mut v = vec![3, 0, 0, 0];
        let len = MARKER.len() as i32;
        v.extend(if extended { -len } else { len }.to_be_bytes());
        v.extend(MARKER);
        v
    };
    match rng.gen_range(0..8) {
        0 => cut(false),
        1 => cut(true),
        2 => vec![2],
        _ => {
            let n = rng.gen_range(1..4);
            let mut v = vec![0, 0, 0, n];
            for _ in 0..n {
                let (w, h) = (rng.gen_range(0..=16u16), rng.gen_range(0..=16u16));
                match rng.gen_range(0..6) {
                    0 => {
                        v.extend(rect(0, 0, w, h, encoding::RAW));
                        v.extend((0..usize::from(w) * usize::from(h) * 4).map(|_| rng.r#gen::<u8>()));
                    }
                    1 => {
                        v.extend(rect(1, 1, w, h, encoding::COPY_RECT));
                        v.extend([0, 2, 0, 3]);
                    }
                    2 => {
                        v.extend(rect(0, 0, 16, 16, encoding::HEXTILE));
                        v.push(2 | 8 | 16);
                        v.extend([1, 2, 3, 4, 2]);
                        v.extend([9, 9, 9, 9, 0x00, 0x33, 8, 8, 8, 8, 0x11, 0x22]);
                    }
                    3 => {
                        v.extend(rect(0, 0, w, h, encoding::TIGHT));
                        v.extend([0x80, 1, 2, 3]);
                    }
                    4 => {
                        v.extend(rect(0, 0, 8, 8, encoding::TIGHT));
                        v.extend([0x90, 4, 0xff, 0xd8, 0xff, 0xd9]);
                    }
                    _ => {
                        v.extend(rect(0, 0, 2, 2, encoding::RRE));
                        v.extend(1u32.to_be_bytes());
                        v.extend([1, 2, 3, 4, 5, 5, 5, 5, 0, 0, 0, 0, 0, 1, 0, 1]);
                    }
                }
            }
            v
        }
    }
}

fn client_message(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..6) {
        0 => {
            let mut v = vec![2, 0, 0, 4];
            for e in [encoding::TIGHT, encoding::EXTENDED_CLIPBOARD, -312, encoding::HEXTILE] {
                v.extend(e.to_be_bytes());
            }
            v
        }
        1 => vec![3, 1, 0, 0, 0, 0, 0, 64, 0, 48],
        2 => vec![4, 1, 0, 0, 0, 0, 0, 0x41],
        3 => vec![5, 0, 0, 10, 0, 10],
        _ => {
            let mut v = vec![6, 0, 0, 0];
            v.extend((MARKER.len() as u32).to_be_bytes());
            v.extend(MARKER);
            v
        }
    }
}

fn mutate(rng: &mut StdRng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(0..4) {
        if v.is_empty() {
            break;
        }
        let at = rng.gen_range(0..v.len());
        match rng.gen_range(0..5) {
            0 => v[at] ^= 1 << rng.gen_range(0..8),
            1 => v[at] = rng.r#gen(),
            2 => v.truncate(at),
            3 => v.insert(at, rng.r#gen()),
            _ => {
                let len = rng.gen_range(1..=8).min(v.len() - at);
                let bytes: Vec<u8> = (0..len).map(|_| [0x00, 0x7f, 0x80, 0xff][rng.gen_range(0..4)]).collect();
                v.splice(at..at + len, bytes);
            }
        }
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn server_filter_never_panics_and_never_passes_cut_text() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0010);
    for i in 0..iterations() {
        let stream: Vec<u8> = (0..rng.gen_range(1..6)).flat_map(|_| server_message(&mut rng)).collect();
        let mutated = i % 2 == 1;
        let input = if mutated { mutate(&mut rng, stream.clone()) } else { stream.clone() };
        let mut f = ServerFilter::new(W, H);
        let (out, _, err) = drive(&mut rng, |b| f.step(b), &input);
        if !mutated {
            assert!(err.is_none(), "well-formed stream refused: {err:?}");
            assert!(!contains(&out, MARKER), "clipboard marker forwarded");
        }
        // Whatever passed is a clean stream: a fresh filter forwards it unchanged and finds no
        // clipboard in it (so no ServerCutText ever reached the browser, mutated or not).
        let mut again = ServerFilter::new(W, H);
        let (out2, drops2, err2) = drive(&mut rng, |b| again.step(b), &out);
        assert!(err2.is_none(), "filtered output refused: {err2:?}");
        assert!(drops2.is_empty(), "filtered output still had {drops2:?}");
        assert_eq!(out2, out);
    }
}

#[test]
fn client_filter_never_panics_and_follows_the_paste_policy() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0011);
    let deny = PastePolicy { allowed: false, max_bytes: 1024 };
    for i in 0..iterations() {
        let stream: Vec<u8> = (0..rng.gen_range(1..6)).flat_map(|_| client_message(&mut rng)).collect();
        let mutated = i % 2 == 1;
        let input = if mutated { mutate(&mut rng, stream) } else { stream };
        let mut f = ClientFilter::new(deny);
        let (out, _, err) = drive(&mut rng, |b| f.step(b), &input);
        if !mutated {
            assert!(err.is_none(), "well-formed stream refused: {err:?}");
            assert!(!contains(&out, MARKER), "paste passed although refused");
        }
        let mut again = ClientFilter::new(deny);
        let (out2, drops2, err2) = drive(&mut rng, |b| again.step(b), &out);
        assert!(err2.is_none(), "filtered output refused: {err2:?}");
        assert!(drops2.is_empty(), "filtered output still had {drops2:?}");
        assert_eq!(out2, out);
    }
}

/// The cargo-fuzz target's seed corpus (and anything the fuzzer found and was added there),
/// replayed through the very checks the target runs, every chunk size, on every CI run.
#[test]
fn the_cargo_fuzz_corpus_passes_the_fuzz_targets_checks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/rfb_filters");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        for chunk in [0u8, 1, 6, 63] {
            let mut input = data.clone();
            if input.len() > 1 {
                input[1] = chunk;
            }
            let run = std::panic::catch_unwind(|| noexit_gateway::rfb::harness::exercise(&input));
            assert!(run.is_ok(), "{} (chunk byte {chunk}) breaks a filter property", path.display());
        }
        seeds += 1;
    }
    assert!(seeds >= 20, "only {seeds} seeds in {}", dir.display());
}

/// The target's checks can fail: the clipboard that a filter forwarding everything lets
/// through is what a fresh filter (the second pass) drops.
#[test]
fn the_fuzz_targets_checks_catch_a_forwarded_clipboard() {
    use noexit_gateway::rfb::harness::drive;
    let mut cut = vec![3, 0, 0, 0];
    cut.extend((MARKER.len() as u32).to_be_bytes());
    cut.extend(MARKER);
    let forward_all =
        |b: &[u8]| Ok(if b.is_empty() { Step::Need(1) } else { Step::Forward { len: b.len(), input: false } });
    let (leaked, _, _) = drive(forward_all, &cut, 4);
    assert!(contains(&leaked, MARKER));
    let mut second = ServerFilter::new(W, H);
    let (_, drops, err) = drive(|b| second.step(b), &leaked, 7);
    assert!(err.is_none() && !drops.is_empty() && drops.iter().all(|d| *d == DropReason::ServerCutText), "{drops:?}");
    let mut f = ServerFilter::new(W, H);
    let (out, drops, err) = drive(|b| f.step(b), &cut, 4);
    assert!(err.is_none() && out.is_empty() && drops.iter().all(|d| *d == DropReason::ServerCutText), "{drops:?}");
}
