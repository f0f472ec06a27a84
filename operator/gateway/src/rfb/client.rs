//! Browser → desktop. Narrows `SetEncodings` to what the server filter can parse, lets paste
//! in only under the project's policy, holds the pixel format to the gateway's, and refuses
//! anything else.

use super::{Direction, DropReason, MAX_ENCODINGS, PixelFormat, RfbError, Skip, Step, encoding, u16_at, u32_at};

const DIR: Direction = Direction::ClientToServer;

/// The project's paste-in rule for one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PastePolicy {
    pub allowed: bool,
    /// Largest `ClientCutText` passed, in bytes.
    pub max_bytes: u32,
}

#[derive(Debug)]
pub struct ClientFilter {
    paste: PastePolicy,
    skip: Option<Skip>,
}

fn malformed(what: &'static str, detail: impl Into<String>) -> RfbError {
    RfbError::Malformed { direction: DIR, what, detail: detail.into() }
}

impl ClientFilter {
    pub fn new(paste: PastePolicy) -> Self {
        Self { paste, skip: None }
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
        let Some(&kind) = buf.first() else { return Ok(Step::Need(1)) };
        let whole =
            |len: usize, input: bool| Ok(if buf.len() < len { Step::Need(len) } else { Step::Forward { len, input } });
        match kind {
            // SetPixelFormat: only formats the server filter can size.
            0 => {
                if buf.len() < 20 {
                    return Ok(Step::Need(20));
                }
                let mut pf = [0u8; 16];
                pf.copy_from_slice(&buf[4..20]);
                let format = PixelFormat::parse(&pf);
                if !format.acceptable() {
                    return Err(malformed(
                        "SetPixelFormat",
                        format!(
                            "{} bits per pixel, depth {}, true colour {}: only 32/24 true colour is served",
                            format.bits_per_pixel, format.depth, format.true_colour
                        ),
                    ));
                }
                Ok(Step::Forward { len: 20, input: false })
            }
            // SetEncodings: type, padding, count, count × s32.
            2 => {
                if buf.len() < 4 {
                    return Ok(Step::Need(4));
                }
                let count = u16_at(buf, 2);
                if count > MAX_ENCODINGS {
                    return Err(RfbError::Oversized {
                        direction: DIR,
                        what: "SetEncodings count",
                        len: u64::from(count),
                        max: u64::from(MAX_ENCODINGS),
                    });
                }
                let len = 4 + 4 * usize::from(count);
                if buf.len() < len {
                    return Ok(Step::Need(len));
                }
                let kept: Vec<i32> = (0..usize::from(count))
                    .map(|i| u32_at(buf, 4 + 4 * i) as i32)
                    .filter(|&e| encoding::allowed(e))
                    .collect();
                let stripped = u32::from(count) - kept.len() as u32;
                if stripped == 0 {
                    return Ok(Step::Forward { len, input: false });
                }
                let mut with = vec![2, 0];
                with.extend((kept.len() as u16).to_be_bytes());
                for e in kept {
                    with.extend(e.to_be_bytes());
                }
                Ok(Step::Replace { consumed: len, with, stripped })
            }
            // FramebufferUpdateRequest.
            3 => whole(10, false),
            // KeyEvent.
            4 => whole(8, true),
            // PointerEvent.
            5 => whole(6, true),
            // ClientCutText: type, 3 padding, length, Latin-1 text.
            6 => {
                if buf.len() < 8 {
                    return Ok(Step::Need(8));
                }
                let len = u32_at(buf, 4);
                if (len as i32) < 0 {
                    // The extended form needs the extended-clipboard pseudo-encoding, which the
                    // gateway never lets through.
                    return Err(malformed("ClientCutText", "extended-clipboard form was not negotiated"));
                }
                let reason = if !self.paste.allowed {
                    Some(DropReason::PasteRefused)
                } else if len > self.paste.max_bytes {
                    Some(DropReason::PasteTooLarge)
                } else {
                    None
                };
                if len > 0 {
                    self.skip = Some(Skip { left: u64::from(len), drop: reason, input: true });
                }
                Ok(match reason {
                    Some(reason) => Step::Drop { len: 8, reason },
                    None => Step::Forward { len: 8, input: true },
                })
            }
            // SetDesktopSize: type, padding, width, height, screens, padding, screens × 16.
            251 => {
                if buf.len() < 8 {
                    return Ok(Step::Need(8));
                }
                whole(8 + 16 * usize::from(buf[6]), false)
            }
            // QEMU client message: only the extended key event (subtype 0).
            255 => {
                if buf.len() < 2 {
                    return Ok(Step::Need(2));
                }
                if buf[1] != 0 {
                    return Err(malformed("QEMU message", format!("subtype {}", buf[1])));
                }
                whole(12, true)
            }
            other => Err(RfbError::UnknownMessage { direction: DIR, message_type: other }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{Driven, drive};
    use super::*;

    const ALLOW: PastePolicy = PastePolicy { allowed: true, max_bytes: 64 };
    const DENY: PastePolicy = PastePolicy { allowed: false, max_bytes: 64 };

    fn run(policy: PastePolicy, input: &[u8]) -> Result<Driven, RfbError> {
        for chunk in [1, 2, 5, 4096] {
            let mut f = ClientFilter::new(policy);
            drive(|b| f.step(b), input, chunk)?;
        }
        let mut f = ClientFilter::new(policy);
        drive(|b| f.step(b), input, 3)
    }

    fn set_encodings(list: &[i32]) -> Vec<u8> {
        let mut v = vec![2, 0];
        v.extend((list.len() as u16).to_be_bytes());
        for e in list {
            v.extend(e.to_be_bytes());
        }
        v
    }

    fn cut(text: &[u8]) -> Vec<u8> {
        let mut v = vec![6, 0, 0, 0];
        v.extend((text.len() as u32).to_be_bytes());
        v.extend(text);
        v
    }

    /// What noVNC 1.3 sends after ServerInit.
    fn novnc_opening() -> Vec<u8> {
        let mut v = super::super::set_pixel_format(&PixelFormat::GATEWAY).to_vec();
        v.extend(set_encodings(&[
            1,
            7,
            -260,
            5,
            2,
            0,
            -26,
            -254,
            -223,
            -224,
            -258,
            -308,
            -309,
            -312,
            -313,
            -307,
            encoding::EXTENDED_CLIPBOARD,
            0x574d5664,
            -239,
        ]));
        v.extend([3, 0, 0, 0, 0, 0, 0, 64, 0, 48]);
        v
    }

    #[test]
    fn set_encodings_is_narrowed_to_what_the_filter_parses() {
        let (out, drops, input) = run(ALLOW, &novnc_opening()).unwrap();
        let expected = [
            super::super::set_pixel_format(&PixelFormat::GATEWAY).to_vec(),
            set_encodings(&[1, 7, 5, 2, 0, -26, -254, -223, -224, -258, -308, -307, -239]),
            vec![3, 0, 0, 0, 0, 0, 0, 64, 0, 48],
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(drops, vec![(DropReason::EncodingStripped, 6)]);
        assert!(!input);
    }

    #[test]
    fn paste_follows_the_policy_and_the_cap() {
        let input = [vec![4, 1, 0, 0, 0, 0, 0, 0x61], cut(b"hello"), vec![5, 0, 0, 1, 0, 1]].concat();
        let (out, drops, saw_input) = run(ALLOW, &input).unwrap();
        assert_eq!(out, input);
        assert!(drops.is_empty());
        assert!(saw_input);

        let (out, drops, _) = run(DENY, &input).unwrap();
        assert_eq!(out, [vec![4, 1, 0, 0, 0, 0, 0, 0x61], vec![5, 0, 0, 1, 0, 1]].concat());
        assert!(drops.iter().all(|d| d.0 == DropReason::PasteRefused));
        assert_eq!(drops.iter().map(|d| d.1).sum::<usize>(), 13);

        let big = cut(&[b'x'; 65]);
        let (out, drops, _) = run(ALLOW, &big).unwrap();
        assert!(out.is_empty());
        assert!(drops.iter().all(|d| d.0 == DropReason::PasteTooLarge));
    }

    #[test]
    fn hostile_clients_are_refused() {
        let mut low_colour = super::super::set_pixel_format(&PixelFormat::GATEWAY);
        low_colour[4] = 8;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![7], "unknown_message"),
            (vec![150, 1, 0, 0, 0, 0, 0, 0, 0, 0], "unknown_message"),
            (vec![248, 0, 0, 0, 0, 0, 0, 0], "unknown_message"),
            (low_colour.to_vec(), "malformed"),
            (vec![2, 0, 0xff, 0xff], "oversized"),
            ([vec![6, 0, 0, 0], (-5i32).to_be_bytes().to_vec()].concat(), "malformed"),
            (vec![255, 1, 0, 0], "malformed"),
        ];
        for (input, category) in cases {
            let e = run(ALLOW, &[input.clone(), vec![0; 32]].concat()).expect_err(&format!("{input:?} accepted"));
            assert_eq!(e.category(), category, "{input:?}: {e}");
        }
    }
}
