//! Text that came from outside (agent events, file names, user names, refusal reasons) made
//! safe for an auditor's terminal. A workspace agent runs where a researcher may be root, so
//! anything it reports can hold terminal escapes: ESC/CSI sequences that move the cursor or
//! rewrite earlier lines, OSC sequences that set the window title or the clipboard, BEL,
//! carriage returns that overprint a line, and Unicode bidi overrides that show text in
//! another order than it is stored. Every such character is shown as a visible escape
//! (`\x1b`, `\u{202e}`) instead; a backslash is doubled so an escape cannot be faked.

use std::borrow::Cow;
use std::fmt::Write;

/// Unicode format characters that reorder or hide text (bidi embeddings, overrides,
/// isolates and marks; line and paragraph separators; the byte-order mark).
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

fn needs_escape(c: char) -> bool {
    c.is_control() || is_invisible_format(c)
}

/// `s` with every control character (C0, DEL, C1 — which includes the one-byte CSI U+009B),
/// every bidi or invisible format character, and backslash escaped. Borrowed when nothing
/// needed escaping.
pub fn term(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c) || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x100 && needs_escape(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text (as `serde_json` writes it) with the characters it leaves raw but a terminal
/// acts on — DEL, C1 controls, bidi and invisible format characters — written as `\uXXXX`.
/// The result is the same JSON value; `serde_json` already escapes C0 controls.
pub fn json(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape_in_json) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape_in_json(c) {
            // Outside the BMP nothing here needs escaping, so one \u unit is enough.
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape_in_json(c: char) -> bool {
    // Newlines between pretty-printed members are JSON's own, and other C0 controls cannot
    // appear raw in serde_json's output.
    (c.is_control() && c as u32 >= 0x7f) || is_invisible_format(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_shown_not_obeyed() {
        let cases = [
            ("plain alice@ward7.example r.csv", "plain alice@ward7.example r.csv"),
            // ESC + CSI: clear screen, move the cursor home.
            ("a\x1b[2J\x1b[Hb", "a\\x1b[2J\\x1b[Hb"),
            // The one-byte C1 CSI.
            ("x\u{9b}31mred", "x\\x9b31mred"),
            // OSC 52 (write the clipboard) ended by BEL, and OSC 0 (window title) ended by ST.
            ("\x1b]52;c;ZWNobw==\x07", "\\x1b]52;c;ZWNobw==\\x07"),
            ("\x1b]0;pwned\x1b\\", "\\x1b]0;pwned\\x1b\\\\"),
            // CR overprints the line; LF, TAB, NUL, DEL.
            ("refused\rallowed", "refused\\x0dallowed"),
            ("a\nb\tc\0d\x7f", "a\\x0ab\\x09c\\x00d\\x7f"),
            // Bidi override: "exe.txt" shown as "txt.exe".
            ("report\u{202e}txt.exe", "report\\u{202e}txt.exe"),
            (
                "\u{2066}x\u{2069}\u{200f}\u{061c}\u{feff}\u{2028}",
                "\\u{2066}x\\u{2069}\\u{200f}\\u{61c}\\u{feff}\\u{2028}",
            ),
            // A literal backslash cannot pass for an escape.
            ("C:\\x1b", "C:\\\\x1b"),
            // Ordinary non-ASCII stays.
            ("Zoë 数据 café", "Zoë 数据 café"),
        ];
        for (raw, shown) in cases {
            assert_eq!(term(raw), shown, "{raw:?}");
            assert!(!term(raw).chars().any(|c| c.is_control() || is_invisible_format(c)), "{raw:?}");
        }
        assert!(matches!(term("ok"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_output_keeps_its_value_and_loses_its_teeth() {
        let value = serde_json::json!({"file": "a\x1b[2Jb\u{9b}c\u{202e}d\u{7f}", "user": "Zoë"});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let safe = json(&text);
        assert!(!safe.chars().any(|c| (c.is_control() && c != '\n') || is_invisible_format(c)), "{safe}");
        assert!(
            safe.contains("\\u009b") && safe.contains("\\u202e") && safe.contains("\\u001b") && safe.contains("Zoë")
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), value);
    }
}
