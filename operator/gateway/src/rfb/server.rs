//! Desktop → browser. Finds the end of every message and rectangle of the encodings the
//! gateway negotiated, drops every `ServerCutText`, and refuses anything else.

use super::{
    BYTES_PER_PIXEL, Direction, DropReason, MAX_CURSOR_SIDE, MAX_FRAMEBUFFER_SIDE, MAX_NAME, MAX_SERVER_CUT_TEXT,
    RfbError, Skip, Step, encoding, u16_at, u32_at,
};

const DIR: Direction = Direction::ServerToClient;

/// Bytes of one Tight "TPIXEL" in the gateway's pixel format (32 bpp, depth 24).
const TPIXEL: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rect {
    x: u16,
    y: u16,
    w: u16,
    h: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a message type.
    Idle,
    /// Inside a FramebufferUpdate, `left` rectangles to go.
    Rects { left: u16 },
    /// Inside a Hextile rectangle: tile `next` of it is due; `left` rectangles follow it.
    Hextile { rect: Rect, next: u32, left: u16 },
}

/// A parsed head of a message part: `head` bytes looked at, then `body` opaque bytes.
struct Unit {
    head: usize,
    body: u64,
    drop: Option<DropReason>,
    next: State,
}

#[derive(Debug)]
pub struct ServerFilter {
    width: u16,
    height: u16,
    state: State,
    skip: Option<Skip>,
}

fn oversized(what: &'static str, len: u64, max: u64) -> RfbError {
    RfbError::Oversized { direction: DIR, what, len, max }
}

fn malformed(what: &'static str, detail: impl Into<String>) -> RfbError {
    RfbError::Malformed { direction: DIR, what, detail: detail.into() }
}

/// Tight's compact length (1–3 bytes) at `buf[at..]`: `(bytes used, value)`.
fn compact_length(buf: &[u8], at: usize) -> Option<(usize, u64)> {
    let b0 = *buf.get(at)?;
    let mut len = u64::from(b0 & 0x7f);
    if b0 & 0x80 == 0 {
        return Some((1, len));
    }
    let b1 = *buf.get(at + 1)?;
    len |= u64::from(b1 & 0x7f) << 7;
    if b1 & 0x80 == 0 {
        return Some((2, len));
    }
    let b2 = *buf.get(at + 2)?;
    len |= u64::from(b2) << 14;
    Some((3, len))
}

/// The head and data length of a Tight rectangle body starting at `buf[0]`; `None` when more
/// bytes are needed (the caller asks for `need` then).
fn tight(buf: &[u8], w: u16, h: u16) -> Result<Result<(usize, u64), usize>, RfbError> {
    let (w, h) = (u64::from(w), u64::from(h));
    let Some(&control) = buf.first() else { return Ok(Err(1)) };
    let kind = control >> 4;
    match kind {
        8 => return Ok(Ok((1 + TPIXEL as usize, 0))),
        9 => {
            return Ok(match compact_length(buf, 1) {
                Some((n, len)) => Ok((1 + n, len)),
                None => Err(buf.len() + 1),
            });
        }
        0..=7 => {}
        // 10 is TightPNG, never negotiated; anything above is undefined.
        other => return Err(malformed("Tight rectangle", format!("compression type {other}"))),
    }
    let mut at = 1;
    let filter = if kind & 0x4 != 0 {
        let Some(&f) = buf.get(at) else { return Ok(Err(at + 1)) };
        at += 1;
        f
    } else {
        0
    };
    let raw_size = match filter {
        0 | 2 => w * h * TPIXEL,
        1 => {
            let Some(&n) = buf.get(at) else { return Ok(Err(at + 1)) };
            let colours = u64::from(n) + 1;
            at += 1 + (colours * TPIXEL) as usize;
            if colours == 2 { w.div_ceil(8) * h } else { w * h }
        }
        other => return Err(malformed("Tight rectangle", format!("filter {other}"))),
    };
    if buf.len() < at {
        return Ok(Err(at));
    }
    if raw_size < 12 {
        return Ok(Ok((at, raw_size)));
    }
    Ok(match compact_length(buf, at) {
        Some((n, len)) => Ok((at + n, len)),
        None => Err(buf.len() + 1),
    })
}

/// The head and body of one Hextile tile of `tw`×`th` pixels.
fn hextile_tile(buf: &[u8], tw: u64, th: u64) -> Result<Result<(usize, u64), usize>, RfbError> {
    let Some(&sub) = buf.first() else { return Ok(Err(1)) };
    if sub & 0xE0 != 0 {
        return Err(malformed("Hextile tile", format!("subencoding {sub:#04x}")));
    }
    if sub & 1 != 0 {
        return Ok(Ok((1, tw * th * BYTES_PER_PIXEL)));
    }
    let mut head = 1;
    if sub & 2 != 0 {
        head += BYTES_PER_PIXEL as usize;
    }
    if sub & 4 != 0 {
        head += BYTES_PER_PIXEL as usize;
    }
    if sub & 8 == 0 {
        return Ok(Ok((head, 0)));
    }
    let Some(&n) = buf.get(head) else { return Ok(Err(head + 1)) };
    let each = if sub & 16 != 0 { BYTES_PER_PIXEL + 2 } else { 2 };
    Ok(Ok((head + 1, u64::from(n) * each)))
}

impl ServerFilter {
    /// A filter for a desktop whose ServerInit announced a `width`×`height` framebuffer.
    pub fn new(width: u16, height: u16) -> Self {
        Self { width, height, state: State::Idle, skip: None }
    }

    /// True between messages (nothing half-forwarded).
    pub fn at_boundary(&self) -> bool {
        self.state == State::Idle && self.skip.is_none()
    }

    /// Decide about a prefix of `buf` (the bytes received and not yet consumed).
    pub fn step(&mut self, buf: &[u8]) -> Result<Step, RfbError> {
        if let Some(skip) = &mut self.skip {
            if buf.is_empty() {
                return Ok(Step::Need(1));
            }
            let step = skip.step(buf.len());
            if skip.left == 0 {
                self.skip = None;
            }
            return Ok(step);
        }
        let unit = match self.state {
            State::Idle => self.message(buf)?,
            State::Rects { left } => self.rect(buf, left)?,
            State::Hextile { rect, next, left } => self.tile(buf, rect, next, left)?,
        };
        let unit = match unit {
            Ok(unit) => unit,
            Err(need) => return Ok(Step::Need(need.max(buf.len() + 1))),
        };
        if buf.len() < unit.head {
            return Ok(Step::Need(unit.head));
        }
        self.state = match unit.next {
            State::Rects { left: 0 } => State::Idle,
            other => other,
        };
        if unit.body > 0 {
            self.skip = Some(Skip { left: unit.body, drop: unit.drop, input: false });
        }
        Ok(match unit.drop {
            Some(reason) => Step::Drop { len: unit.head, reason },
            None => Step::Forward { len: unit.head, input: false },
        })
    }

    fn message(&self, buf: &[u8]) -> Result<Result<Unit, usize>, RfbError> {
        let Some(&kind) = buf.first() else { return Ok(Err(1)) };
        let unit = |head, body, drop, next| Ok(Ok(Unit { head, body, drop, next }));
        match kind {
            // FramebufferUpdate: type, padding, number of rectangles.
            0 => {
                if buf.len() < 4 {
                    return Ok(Err(4));
                }
                unit(4, 0, None, State::Rects { left: u16_at(buf, 2) })
            }
            // SetColourMapEntries: type, padding, first colour, count, count × 6 bytes.
            1 => {
                if buf.len() < 6 {
                    return Ok(Err(6));
                }
                unit(6, u64::from(u16_at(buf, 4)) * 6, None, State::Idle)
            }
            // Bell.
            2 => unit(1, 0, None, State::Idle),
            // ServerCutText: type, 3 padding, length (negative: extended clipboard), text.
            3 => {
                if buf.len() < 8 {
                    return Ok(Err(8));
                }
                let len = u32_at(buf, 4) as i32;
                let (size, reason) = if len < 0 {
                    (u64::from(len.unsigned_abs()), DropReason::ServerExtendedCutText)
                } else {
                    (len as u64, DropReason::ServerCutText)
                };
                if size > MAX_SERVER_CUT_TEXT {
                    return Err(oversized("ServerCutText length", size, MAX_SERVER_CUT_TEXT));
                }
                unit(8, size, Some(reason), State::Idle)
            }
            other => Err(RfbError::UnknownMessage { direction: DIR, message_type: other }),
        }
    }

    fn check_inside(&self, r: Rect, what: &'static str) -> Result<(), RfbError> {
        if u32::from(r.x) + u32::from(r.w) > u32::from(self.width)
            || u32::from(r.y) + u32::from(r.h) > u32::from(self.height)
        {
            return Err(malformed(
                what,
                format!(
                    "{}x{} at {},{} lies outside the {}x{} framebuffer",
                    r.w, r.h, r.x, r.y, self.width, self.height
                ),
            ));
        }
        Ok(())
    }

    fn resize(&mut self, w: u16, h: u16) -> Result<(), RfbError> {
        let max = MAX_FRAMEBUFFER_SIDE;
        if w > max || h > max {
            return Err(oversized("framebuffer side", u64::from(w.max(h)), u64::from(max)));
        }
        self.width = w;
        self.height = h;
        Ok(())
    }

    fn rect(&mut self, buf: &[u8], left: u16) -> Result<Result<Unit, usize>, RfbError> {
        if buf.len() < 12 {
            return Ok(Err(12));
        }
        let r = Rect { x: u16_at(buf, 0), y: u16_at(buf, 2), w: u16_at(buf, 4), h: u16_at(buf, 6) };
        let enc = u32_at(buf, 8) as i32;
        let rest = &buf[12..];
        let next = State::Rects { left: left - 1 };
        let (w, h) = (u64::from(r.w), u64::from(r.h));
        let plain = |head: usize, body: u64| Ok(Ok(Unit { head: 12 + head, body, drop: None, next }));
        let more = |n: usize| Ok(Err(12 + n));
        match enc {
            encoding::RAW => {
                self.check_inside(r, "Raw rectangle")?;
                plain(0, w * h * BYTES_PER_PIXEL)
            }
            encoding::COPY_RECT => {
                self.check_inside(r, "CopyRect rectangle")?;
                if rest.len() < 4 {
                    return more(4);
                }
                let src = Rect { x: u16_at(rest, 0), y: u16_at(rest, 2), ..r };
                self.check_inside(src, "CopyRect source")?;
                plain(4, 0)
            }
            encoding::RRE => {
                self.check_inside(r, "RRE rectangle")?;
                if rest.len() < 8 {
                    return more(8);
                }
                let n = u64::from(u32_at(rest, 0));
                if n > w * h {
                    return Err(oversized("RRE subrectangle count", n, w * h));
                }
                plain(8, n * (BYTES_PER_PIXEL + 8))
            }
            encoding::HEXTILE => {
                self.check_inside(r, "Hextile rectangle")?;
                let tiles = w.div_ceil(16) * h.div_ceil(16);
                let next = if tiles == 0 { next } else { State::Hextile { rect: r, next: 0, left: left - 1 } };
                Ok(Ok(Unit { head: 12, body: 0, drop: None, next }))
            }
            encoding::TIGHT => {
                self.check_inside(r, "Tight rectangle")?;
                match tight(rest, r.w, r.h)? {
                    Ok((head, body)) => plain(head, body),
                    Err(need) => more(need),
                }
            }
            encoding::DESKTOP_SIZE => {
                self.resize(r.w, r.h)?;
                plain(0, 0)
            }
            encoding::EXTENDED_DESKTOP_SIZE => {
                if rest.len() < 4 {
                    return more(4);
                }
                // y carries the status of a client's request; only a success changes the size.
                if r.y == 0 {
                    self.resize(r.w, r.h)?;
                }
                plain(4, u64::from(rest[0]) * 16)
            }
            encoding::LAST_RECT => Ok(Ok(Unit { head: 12, body: 0, drop: None, next: State::Idle })),
            encoding::CURSOR => {
                let max = MAX_CURSOR_SIDE;
                if r.w > max || r.h > max {
                    return Err(oversized("cursor side", u64::from(r.w.max(r.h)), u64::from(max)));
                }
                plain(0, w * h * BYTES_PER_PIXEL + w.div_ceil(8) * h)
            }
            encoding::QEMU_EXTENDED_KEY => plain(0, 0),
            encoding::DESKTOP_NAME => {
                if rest.len() < 4 {
                    return more(4);
                }
                let len = u64::from(u32_at(rest, 0));
                if len > MAX_NAME {
                    return Err(oversized("desktop name length", len, MAX_NAME));
                }
                plain(4, len)
            }
            other => Err(RfbError::UnknownEncoding { direction: DIR, encoding: other }),
        }
    }

    fn tile(&self, buf: &[u8], r: Rect, index: u32, left: u16) -> Result<Result<Unit, usize>, RfbError> {
        let across = u32::from(r.w).div_ceil(16);
        let down = u32::from(r.h).div_ceil(16);
        let (tx, ty) = (index % across, index / across);
        let tw = u64::from((u32::from(r.w) - tx * 16).min(16));
        let th = u64::from((u32::from(r.h) - ty * 16).min(16));
        let (head, body) = match hextile_tile(buf, tw, th)? {
            Ok(found) => found,
            Err(need) => return Ok(Err(need)),
        };
        let next = if index + 1 == across * down {
            State::Rects { left }
        } else {
            State::Hextile { rect: r, next: index + 1, left }
        };
        Ok(Ok(Unit { head, body, drop: None, next }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{Driven, drive};
    use super::*;

    fn rect(x: u16, y: u16, w: u16, h: u16, enc: i32) -> Vec<u8> {
        let mut v = Vec::new();
        for n in [x, y, w, h] {
            v.extend(n.to_be_bytes());
        }
        v.extend(enc.to_be_bytes());
        v
    }

    fn update(rects: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![0, 0];
        v.extend((rects.len() as u16).to_be_bytes());
        for r in rects {
            v.extend(r);
        }
        v
    }

    fn cut_text(text: &[u8]) -> Vec<u8> {
        let mut v = vec![3, 0, 0, 0];
        v.extend((text.len() as u32).to_be_bytes());
        v.extend(text);
        v
    }

    fn run(input: &[u8]) -> Result<Driven, RfbError> {
        for chunk in [1, 3, 7, 4096] {
            let mut f = ServerFilter::new(64, 48);
            drive(|b| f.step(b), input, chunk)?;
        }
        let mut f = ServerFilter::new(64, 48);
        drive(|b| f.step(b), input, 5)
    }

    #[test]
    fn framebuffer_updates_pass_unchanged() {
        let mut raw = rect(0, 0, 2, 2, encoding::RAW);
        raw.extend([7u8; 16]);
        let mut copy = rect(10, 10, 4, 4, encoding::COPY_RECT);
        copy.extend([0, 1, 0, 2]);
        let mut rre = rect(0, 0, 8, 8, encoding::RRE);
        rre.extend(1u32.to_be_bytes());
        rre.extend([1, 2, 3, 4]);
        rre.extend([9; 12]);
        // Hextile 20x4: two tiles, one raw (16x4x4 bytes), one background + 1 coloured subrect.
        let mut hex = rect(0, 0, 20, 4, encoding::HEXTILE);
        hex.push(1);
        hex.extend([5u8; 16 * 4 * 4]);
        hex.extend([2 | 8 | 16, 1, 2, 3, 4, 1, 9, 9, 9, 9, 0x00, 0x11]);
        // Tight: fill, basic copy small (raw), basic palette with zlib length, jpeg.
        let mut fill = rect(0, 0, 64, 48, encoding::TIGHT);
        fill.extend([0x80, 1, 2, 3]);
        let mut small = rect(0, 0, 1, 2, encoding::TIGHT);
        small.extend([0x00, 1, 2, 3, 4, 5, 6]);
        let mut palette = rect(0, 0, 16, 16, encoding::TIGHT);
        palette.extend([0x40 | 0x10, 1, 1, 1, 1, 1, 2, 2, 2, 0x82, 0x01]);
        palette.extend([0xAB; 130]);
        let mut jpeg = rect(0, 0, 16, 16, encoding::TIGHT);
        jpeg.extend([0x90, 5, 1, 2, 3, 4, 5]);
        let mut cursor = rect(1, 1, 9, 2, encoding::CURSOR);
        cursor.extend(vec![0xCC; 9 * 2 * 4 + 2 * 2]);
        let mut name = rect(0, 0, 0, 0, encoding::DESKTOP_NAME);
        name.extend(3u32.to_be_bytes());
        name.extend(b"abc");
        let mut ext = rect(0, 0, 32, 32, encoding::EXTENDED_DESKTOP_SIZE);
        ext.extend([1, 0, 0, 0]);
        ext.extend([0; 16]);
        let input = [
            update(&[raw, copy, rre, hex, fill, small, palette, jpeg, cursor, name, ext]),
            vec![2],
            update(&[rect(0, 0, 16, 16, encoding::TIGHT).into_iter().chain([0x80, 0, 0, 0]).collect()]),
        ]
        .concat();
        let (out, drops, _) = run(&input).unwrap();
        assert_eq!(out, input);
        assert!(drops.is_empty());
    }

    #[test]
    fn last_rect_ends_an_update_of_unknown_length() {
        let mut fill = rect(0, 0, 4, 4, encoding::TIGHT);
        fill.extend([0x80, 1, 2, 3]);
        let mut input = vec![0, 0, 0xff, 0xff];
        input.extend(fill);
        input.extend(rect(0, 0, 0, 0, encoding::LAST_RECT));
        input.push(2);
        let (out, _, _) = run(&input).unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn cut_text_is_dropped_in_both_forms() {
        let marker = b"SECRET-MARKER-42";
        let mut extended = vec![3, 0, 0, 0];
        extended.extend((-(marker.len() as i32)).to_be_bytes());
        extended.extend(marker);
        let input = [vec![2], cut_text(marker), vec![2], extended, vec![2]].concat();
        let (out, drops, _) = run(&input).unwrap();
        assert_eq!(out, vec![2, 2, 2]);
        let total: usize = drops.iter().map(|d| d.1).sum();
        assert_eq!(total, input.len() - 3);
        assert!(drops.iter().any(|d| d.0 == DropReason::ServerCutText));
        assert!(drops.iter().any(|d| d.0 == DropReason::ServerExtendedCutText));
    }

    #[test]
    fn hostile_servers_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![150], "unknown_message"),
            (vec![248, 0, 0, 0], "unknown_message"),
            ([vec![3, 0, 0, 0], 0x7fff_ffffu32.to_be_bytes().to_vec()].concat(), "oversized"),
            ([vec![3, 0, 0, 0], 0x8000_0000u32.to_be_bytes().to_vec()].concat(), "oversized"),
            (update(&[rect(60, 0, 8, 8, encoding::RAW)]), "malformed"),
            (update(&[rect(0, 0, 65535, 65535, encoding::RAW)]), "malformed"),
            (update(&[rect(0, 0, 1, 1, encoding::EXTENDED_CLIPBOARD)]), "unknown_encoding"),
            (update(&[rect(0, 0, 1, 1, -260)]), "unknown_encoding"),
            (update(&[rect(0, 0, 1, 1, 16)]), "unknown_encoding"),
            (update(&[[rect(0, 0, 1, 1, encoding::TIGHT), vec![0xA0]].concat()]), "malformed"),
            (update(&[[rect(0, 0, 1, 1, encoding::TIGHT), vec![0x40, 7]].concat()]), "malformed"),
            (update(&[[rect(0, 0, 1, 1, encoding::HEXTILE), vec![0x20]].concat()]), "malformed"),
            (update(&[[rect(0, 0, 2, 2, encoding::RRE), 5u32.to_be_bytes().to_vec()].concat()]), "oversized"),
            (update(&[rect(0, 0, 2000, 2, encoding::CURSOR)]), "oversized"),
            (
                update(&[[rect(0, 0, 0, 0, encoding::DESKTOP_NAME), 1_000_000u32.to_be_bytes().to_vec()].concat()]),
                "oversized",
            ),
            (update(&[rect(0, 0, 20000, 2, encoding::DESKTOP_SIZE)]), "oversized"),
        ];
        for (input, category) in cases {
            let e = run(&[input.clone(), vec![0; 64]].concat()).expect_err(&format!("{input:?} accepted"));
            assert_eq!(e.category(), category, "{input:?}: {e}");
        }
    }

    #[test]
    fn desktop_size_changes_the_bounds() {
        let input = update(&[rect(0, 0, 128, 128, encoding::DESKTOP_SIZE), rect(100, 100, 10, 10, encoding::RAW)]);
        let input = [input, vec![0; 400]].concat();
        let (out, _, _) = run(&input).unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn large_bodies_stream_without_buffering() {
        let mut f = ServerFilter::new(64, 48);
        let head = update(&[rect(0, 0, 64, 48, encoding::RAW)]);
        assert_eq!(f.step(&head[..3]).unwrap(), Step::Need(4));
        assert_eq!(f.step(&head).unwrap(), Step::Forward { len: 4, input: false });
        assert_eq!(f.step(&head[4..]).unwrap(), Step::Forward { len: 12, input: false });
        // The body streams out as it arrives, whatever the chunk size.
        assert_eq!(f.step(&[0; 100]).unwrap(), Step::Forward { len: 100, input: false });
        assert!(!f.at_boundary());
        assert_eq!(f.step(&[0; 64 * 48 * 4]).unwrap(), Step::Forward { len: 64 * 48 * 4 - 100, input: false });
        assert!(f.at_boundary());
    }
}
