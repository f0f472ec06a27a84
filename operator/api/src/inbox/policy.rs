//! What may come in through the inbox (pure): the file name, the extension, and what the bytes
//! look like. Every refusal names the rule and the file.

/// Extensions accepted when the site configures none: scripts, text, tables, codebooks,
/// statistical program files and PDF. Lower case, without the dot.
pub const DEFAULT_EXTENSIONS: &[&str] = &[
    "txt", "md", "csv", "tsv", "json", "yaml", "yml", "xml", "r", "rmd", "qmd", "py", "ipynb", "sql", "do", "sas",
    "sps", "jl", "m", "sh", "pdf",
];

/// Default size cap of one inbox file.
pub const DEFAULT_MAX_BYTES: u64 = 50 * 1024 * 1024;
/// Longest file name (bytes), as most file systems allow.
pub const MAX_NAME_BYTES: usize = 255;
/// How many leading bytes the sniffer looks at.
pub const SNIFF_BYTES: usize = 8192;

/// The site's rules for inbox files (`noexit-operator api --inbox-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxPolicy {
    pub max_bytes: u64,
    /// Accepted extensions, lower case without the dot.
    pub extensions: Vec<String>,
    /// Accept archives (zip, gzip, tar, 7z …) whose extension is listed. Off by default: their
    /// content is not what anyone looked at.
    pub allow_archives: bool,
}

impl Default for InboxPolicy {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            extensions: DEFAULT_EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
            allow_archives: false,
        }
    }
}

/// A refusal: stable code and a message naming the file and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}

fn refused(code: &'static str, message: String) -> Refused {
    Refused { code, message }
}

/// Checks a submitted file name: one plain name (no directory parts), not hidden, printable,
/// at most [`MAX_NAME_BYTES`], with an accepted extension. Returns the lower-case extension.
pub fn check_name(name: &str, policy: &InboxPolicy) -> Result<String, Refused> {
    let bad = |why: &str| Err(refused("invalidFileName", format!("fileName {name:?}: {why}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(&format!("is longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.contains('/') || name.contains('\\') {
        return bad("must be a plain file name without '/' or '\\'");
    }
    if name.starts_with('.') {
        return bad("must not start with '.' (hidden files and '..' are refused)");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    if name.trim() != name {
        return bad("starts or ends with white space");
    }
    let Some((_, ext)) = name.rsplit_once('.') else {
        return Err(refused(
            "typeNotAllowed",
            format!("fileName {name:?} has no extension; accepted: {}", policy.extensions.join(", ")),
        ));
    };
    let ext = ext.to_ascii_lowercase();
    if !policy.extensions.iter().any(|e| e.eq_ignore_ascii_case(&ext)) {
        return Err(refused(
            "typeNotAllowed",
            format!("fileName {name:?}: .{ext} files are not accepted; accepted: {}", policy.extensions.join(", ")),
        ));
    }
    Ok(ext)
}

/// Executables by their leading bytes.
fn executable(head: &[u8]) -> Option<&'static str> {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"\x7fELF", "an ELF executable or library"),
        (b"MZ", "a Windows (PE) executable"),
        (b"\xfe\xed\xfa\xce", "a Mach-O executable"),
        (b"\xfe\xed\xfa\xcf", "a Mach-O executable"),
        (b"\xce\xfa\xed\xfe", "a Mach-O executable"),
        (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
        (b"\xca\xfe\xba\xbe", "a Mach-O universal binary or Java class"),
        (b"\0asm", "a WebAssembly module"),
    ];
    MAGIC.iter().find(|(m, _)| head.starts_with(m)).map(|(_, what)| *what)
}

/// Archives and compressed files by their leading bytes (tar by its `ustar` mark at 257).
fn archive(head: &[u8]) -> Option<&'static str> {
    const MAGIC: &[(&[u8], &str)] = &[
        (b"PK\x03\x04", "a zip archive"),
        (b"PK\x05\x06", "a zip archive"),
        (b"\x1f\x8b", "gzip-compressed data"),
        (b"BZh", "bzip2-compressed data"),
        (b"\xfd7zXZ\0", "xz-compressed data"),
        (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
        (b"Rar!\x1a\x07", "a RAR archive"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    ];
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Some("a tar archive");
    }
    MAGIC.iter().find(|(m, _)| head.starts_with(m)).map(|(_, what)| *what)
}

/// What the content is (for the record), or why it is refused. `head` is the first
/// [`SNIFF_BYTES`] (or fewer) bytes of the file; `ext` its accepted extension.
pub fn sniff(name: &str, ext: &str, head: &[u8], policy: &InboxPolicy) -> Result<&'static str, Refused> {
    if let Some(what) = executable(head) {
        return Err(refused("executableRefused", format!("{name:?} is {what}; executables are never let in")));
    }
    if let Some(what) = archive(head) {
        if !policy.allow_archives {
            return Err(refused(
                "archiveRefused",
                format!("{name:?} is {what}; archives are refused (their content is not what was reviewed)"),
            ));
        }
        return Ok("archive");
    }
    if ext == "pdf" {
        if !head.starts_with(b"%PDF-") {
            return Err(refused("contentMismatch", format!("{name:?} is named .pdf but does not start with %PDF-")));
        }
        return Ok("pdf");
    }
    // Everything else listed by default is text: a NUL byte means it is not.
    if let Some(at) = head.iter().position(|b| *b == 0) {
        return Err(refused(
            "contentMismatch",
            format!("{name:?} is named .{ext} but holds binary data (a NUL byte at offset {at})"),
        ));
    }
    Ok("text")
}

/// Decodes one `application/x-www-form-urlencoded` query value (`%XX`, `+` for space).
pub fn decode_query_value(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The value of `key` in a raw query string, decoded.
pub fn query_value(query: Option<&str>, key: &str) -> Option<Option<String>> {
    let raw = query?.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))?;
    Some(decode_query_value(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<impl std::fmt::Debug, Refused>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.code)
    }

    #[test]
    fn names_are_plain_visible_short_and_of_an_accepted_type() {
        let p = InboxPolicy::default();
        assert_eq!(check_name("codebook.csv", &p).unwrap(), "csv");
        assert_eq!(check_name("Analysis Plan.R", &p).unwrap(), "r");
        for bad in [
            "",
            "../etc/passwd.csv",
            "a/b.csv",
            "a\\b.csv",
            ".bashrc",
            "..",
            ".hidden.csv",
            "x\n.csv",
            " x.csv",
            "x.csv ",
            "x\0.csv",
        ] {
            assert_eq!(code(check_name(bad, &p)), "invalidFileName", "{bad:?}");
        }
        assert_eq!(code(check_name(&format!("{}.csv", "a".repeat(252)), &p)), "invalidFileName");
        assert_eq!(code(check_name(&format!("{}.csv", "a".repeat(251)), &p)), "ok");
        for bad in ["tool.exe", "lib.so", "data.zip", "README", "x.csv.gz"] {
            assert_eq!(code(check_name(bad, &p)), "typeNotAllowed", "{bad:?}");
        }
        let zips = InboxPolicy { extensions: vec!["zip".into()], allow_archives: true, ..p };
        assert_eq!(check_name("data.ZIP", &zips).unwrap(), "zip");
    }

    #[test]
    fn executables_archives_and_binary_text_are_refused_by_content() {
        let p = InboxPolicy::default();
        assert_eq!(sniff("a.csv", "csv", b"id,label\n1,a\n", &p).unwrap(), "text");
        assert_eq!(sniff("a.pdf", "pdf", b"%PDF-1.7\n%\xe2\xe3", &p).unwrap(), "pdf");
        assert_eq!(code(sniff("a.csv", "csv", b"\x7fELF\x02\x01\x01", &p)), "executableRefused");
        assert_eq!(code(sniff("a.txt", "txt", b"MZ\x90\0", &p)), "executableRefused");
        assert_eq!(code(sniff("a.csv", "csv", b"PK\x03\x04rest", &p)), "archiveRefused");
        assert_eq!(code(sniff("a.csv", "csv", b"\x1f\x8b\x08\0", &p)), "archiveRefused");
        let mut tar = vec![b'a'; 300];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(code(sniff("a.txt", "txt", &tar, &p)), "archiveRefused");
        assert_eq!(code(sniff("a.pdf", "pdf", b"hello", &p)), "contentMismatch");
        assert_eq!(code(sniff("a.csv", "csv", b"a,b\n\0\0", &p)), "contentMismatch");
        // Archives only when the site allows them; executables never.
        let open = InboxPolicy { allow_archives: true, ..p };
        assert_eq!(sniff("a.zip", "zip", b"PK\x03\x04", &open).unwrap(), "archive");
        assert_eq!(code(sniff("a.zip", "zip", b"\x7fELF", &open)), "executableRefused");
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_value(Some("fileName=code%20book.csv"), "fileName"), Some(Some("code book.csv".into())));
        assert_eq!(query_value(Some("a=1&fileName=x+y.csv"), "fileName"), Some(Some("x y.csv".into())));
        assert_eq!(query_value(Some("fileName=..%2Fx.csv"), "fileName"), Some(Some("../x.csv".into())));
        assert_eq!(query_value(Some("fileName=%zz"), "fileName"), Some(None));
        assert_eq!(query_value(Some("fileName=%ff"), "fileName"), Some(None));
        assert_eq!(query_value(Some("other=1"), "fileName"), None);
        assert_eq!(query_value(None, "fileName"), None);
    }
}
