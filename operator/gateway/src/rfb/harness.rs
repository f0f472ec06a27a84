//! One input, every property the filters promise: the cargo-fuzz target
//! (`operator/gateway/fuzz`) and the corpus test (`tests/fuzz_rfb.rs`) both call [`exercise`],
//! so what the fuzzer checks is what CI replays.
//!
//! Input layout: byte 0 picks the direction and, for client streams, the paste policy; byte 1
//! the chunk size the bytes arrive in (1–64); byte 2–3 the framebuffer size hint for server
//! streams; the rest is the stream. Properties: no panic; every step consumes bytes or asks for
//! more than it has; the filtered output is itself a clean stream: a fresh filter forwards it
//! unchanged and drops nothing, so server output carries no `ServerCutText` and a client
//! stream under a deny policy no `ClientCutText` (a fresh filter would have dropped them).

use super::{ClientFilter, DropReason, PastePolicy, RfbError, ServerFilter, Step};

/// Feed `input` in `chunk`-byte pieces; returns forwarded bytes, drops and the error if any.
/// Panics if a step neither consumes bytes nor asks for more.
pub fn drive(
    mut step: impl FnMut(&[u8]) -> Result<Step, RfbError>,
    input: &[u8],
    chunk: usize,
) -> (Vec<u8>, Vec<DropReason>, Option<RfbError>) {
    let (mut buf, mut out, mut drops, mut fed) = (Vec::new(), Vec::new(), Vec::new(), 0usize);
    for _ in 0..(input.len() * 4 + 100) {
        match step(&buf) {
            Err(e) => return (out, drops, Some(e)),
            Ok(Step::Need(n)) => {
                assert!(n > buf.len(), "Need({n}) with {} buffered", buf.len());
                if fed == input.len() {
                    return (out, drops, None);
                }
                let next = (fed + chunk.max(1)).min(input.len());
                buf.extend_from_slice(&input[fed..next]);
                fed = next;
            }
            Ok(Step::Forward { len, .. }) => {
                assert!(len > 0 && len <= buf.len(), "Forward({len}) of {}", buf.len());
                out.extend(buf.drain(..len));
            }
            Ok(Step::Drop { len, reason }) => {
                assert!(len > 0 && len <= buf.len(), "Drop({len}) of {}", buf.len());
                buf.drain(..len);
                drops.push(reason);
            }
            Ok(Step::Replace { consumed, with, .. }) => {
                assert!(consumed > 0 && consumed <= buf.len(), "Replace({consumed}) of {}", buf.len());
                buf.drain(..consumed);
                out.extend(with);
                drops.push(DropReason::EncodingStripped);
            }
        }
    }
    panic!("filter made no progress on {} bytes", input.len());
}

/// Check every property on one input (see the module doc). Panics on a violation.
pub fn exercise(data: &[u8]) {
    let [mode, chunk, w, h, stream @ ..] = data else { return };
    let chunk = usize::from(chunk % 64) + 1;
    match mode % 3 {
        0 => {
            let (w, h) = (u16::from(*w) * 8 + 1, u16::from(*h) * 8 + 1);
            let mut f = ServerFilter::new(w, h);
            let (out, _, _) = drive(|b| f.step(b), stream, chunk);
            let mut again = ServerFilter::new(w, h);
            let (out2, drops2, err2) = drive(|b| again.step(b), &out, 7);
            assert!(err2.is_none(), "filtered server output refused: {err2:?}");
            assert!(drops2.is_empty(), "filtered server output still had {drops2:?}");
            // A fresh filter drops every ServerCutText it sees: none dropped, none there.
            assert_eq!(out2, out, "filtered server output changed on a second pass");
        }
        m => {
            let policy = PastePolicy { allowed: m == 2, max_bytes: 64 };
            let mut f = ClientFilter::new(policy);
            let (out, _, _) = drive(|b| f.step(b), stream, chunk);
            // Under a deny policy a fresh filter drops every ClientCutText: none dropped, none
            // there; under allow, none over the cap.
            let mut again = ClientFilter::new(policy);
            let (out2, drops2, err2) = drive(|b| again.step(b), &out, 7);
            assert!(err2.is_none(), "filtered client output refused: {err2:?}");
            assert!(drops2.is_empty(), "filtered client output still had {drops2:?}");
            assert_eq!(out2, out, "filtered client output changed on a second pass");
        }
    }
}
