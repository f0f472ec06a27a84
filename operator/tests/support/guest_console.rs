//! Drives the root shell the tiny VM TEST image opens on its second serial port (ttyS1, only
//! with `noexit.test=1`), through the unix socket the host's serial chardev listens on: QEMU's
//! `-chardev socket,id=sh,path=SOCK,server=on,wait=off -serial chardev:sh`, or libvirt's
//! `<serial type='unix'><source mode='bind' path='SOCK'/><target port='1'/></serial>`.
//!
//! Each command runs as `( CMD ) </dev/null 2>&1` between two markers carrying a sequence
//! number, so the output of one command is never taken for another's, stale output (boot
//! messages, a command that timed out earlier) is skipped, and the exit status comes back. The
//! markers are written split by `""` in the command, so the terminal's echo of the command line
//! (if any) never looks like a marker. Every wait has a bound; nothing sleeps to synchronise.
//!
//! ```ignore
//! let mut c = GuestConsole::connect(&sock, Duration::from_secs(30))?;
//! c.wait_ready(Duration::from_secs(120))?;
//! let (code, out) = c.run("cat /proc/mounts", Duration::from_secs(20))?;
//! ```
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often [`GuestConsole::wait_ready`] probes the shell.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How much of the console's recent output an error carries.
const TRANSCRIPT_TAIL: usize = 4096;

#[derive(Debug)]
pub enum ConsoleError {
    /// The socket did not accept a connection within the bound.
    Connect {
        path: PathBuf,
        waited: Duration,
        error: std::io::Error,
    },
    /// No answer within the bound; `recent` is the tail of what the guest printed.
    Timeout {
        what: String,
        waited: Duration,
        recent: String,
    },
    /// The guest (or QEMU) closed the console.
    Closed {
        what: String,
        recent: String,
    },
    Io {
        what: String,
        error: std::io::Error,
    },
}

impl std::fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect { path, waited, error } => {
                write!(f, "guest console {}: no connection after {waited:?}: {error}", path.display())
            }
            Self::Timeout { what, waited, recent } => {
                write!(f, "guest console: {what}: no answer after {waited:?}; last output:\n{recent}")
            }
            Self::Closed { what, recent } => write!(f, "guest console: closed during {what}; last output:\n{recent}"),
            Self::Io { what, error } => write!(f, "guest console: {what}: {error}"),
        }
    }
}

impl std::error::Error for ConsoleError {}

pub struct GuestConsole {
    stream: UnixStream,
    /// Bytes read and not yet consumed by a command.
    pending: Vec<u8>,
    /// Tail of everything read, for error messages.
    transcript: Vec<u8>,
    seq: u64,
}

impl GuestConsole {
    /// Connect to the console socket, retrying until it accepts or `bound` passes (QEMU or
    /// libvirt create the socket when the VM starts).
    pub fn connect(path: &Path, bound: Duration) -> Result<Self, ConsoleError> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(Self { stream, pending: Vec::new(), transcript: Vec::new(), seq: 0 }),
                Err(error) if start.elapsed() >= bound => {
                    return Err(ConsoleError::Connect { path: path.into(), waited: start.elapsed(), error });
                }
                // Polling with a bound: the socket appears when the VM process starts.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Wait until the guest's shell answers: sends a probe every second (earlier ones may have
    /// been lost while the guest booted) and returns at the first answer to any of them.
    ///
    /// Probes sent before the shell opened the port queue up, and the guest drops what its UART
    /// held when the port opens, so the shell's first line can be the tail of a probe. A probe
    /// therefore has no quotes: a tail with one open quote left the shell waiting for the closing
    /// one, reading every later probe into that string. (^C would get the shell out, but the test
    /// shell of the tiny image exits on it and is started afresh, losing the probe.)
    pub fn wait_ready(&mut self, bound: Duration) -> Result<(), ConsoleError> {
        self.wait_ready_probing(bound, PROBE_EVERY)
    }

    fn wait_ready_probing(&mut self, bound: Duration, every: Duration) -> Result<(), ConsoleError> {
        let start = Instant::now();
        let mut sent: Vec<String> = Vec::new();
        loop {
            self.seq += 1;
            let n = self.seq;
            // `\O` reads as `O` to the shell but keeps the echoed command line from matching.
            self.send(&format!("echo __NX_READY_{n}_\\OK"))?;
            sent.push(format!("__NX_READY_{n}_OK"));
            let probe_until = (Instant::now() + every).min(start + bound);
            loop {
                if let Some(pos) = sent.iter().filter_map(|m| find(&self.pending, m.as_bytes())).max() {
                    self.pending.drain(..pos);
                    return Ok(());
                }
                if Instant::now() >= probe_until {
                    break;
                }
                self.fill(probe_until, "waiting for the shell")?;
            }
            if start.elapsed() >= bound {
                return Err(self.timeout("waiting for the shell on the console", start));
            }
        }
    }

    /// Run `cmd` (one or more shell lines; stdin is /dev/null, stderr goes with stdout) and return
    /// its exit status and output.
    pub fn run(&mut self, cmd: &str, bound: Duration) -> Result<(i32, String), ConsoleError> {
        self.seq += 1;
        let n = self.seq;
        let begin = format!("__NX_BEGIN_{n}__\n");
        let end = format!("__NX_END_{n}__ ");
        self.send(&format!(
            "echo \"__NX_BEGIN_{n}__\"\"\"; ( {cmd}\n ) </dev/null 2>&1; echo \"__NX_END_{n}__\"\"\" $?"
        ))?;
        let start = Instant::now();
        let deadline = start + bound;
        let what = format!("running {cmd:?}");
        loop {
            let text = normalise(&self.pending);
            if let Some(b) = text.find(&begin) {
                let body_start = b + begin.len();
                if let Some(e) = text[body_start..].find(&end) {
                    let after = &text[body_start + e + end.len()..];
                    if let Some(nl) = after.find('\n') {
                        let code = after[..nl].trim().parse::<i32>().unwrap_or(-1);
                        let output = text[body_start..body_start + e].to_owned();
                        // Keep what came after this command's end for the next one.
                        let consumed = body_start + e + end.len() + nl + 1;
                        self.pending = text.as_bytes()[consumed..].to_vec();
                        return Ok((code, output));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(&what, start));
            }
            self.fill(deadline, &what)?;
        }
    }

    /// [`Self::run`], requiring exit status 0; panics with the output otherwise (for tests).
    pub fn run_ok(&mut self, cmd: &str, bound: Duration) -> String {
        match self.run(cmd, bound) {
            Ok((0, out)) => out,
            Ok((code, out)) => panic!("guest: {cmd:?} exited with {code}:\n{out}"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Write a line to the shell without waiting for anything (e.g. `reboot -f`).
    pub fn send(&mut self, line: &str) -> Result<(), ConsoleError> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        self.stream.write_all(&bytes).map_err(|error| ConsoleError::Io { what: format!("sending {line:?}"), error })
    }

    /// The tail of what the guest printed on this console.
    pub fn recent(&self) -> String {
        String::from_utf8_lossy(&self.transcript).into_owned()
    }

    /// Read what is available, waiting at most until `deadline`.
    fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), ConsoleError> {
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.stream.set_read_timeout(Some(wait)).map_err(|error| ConsoleError::Io { what: what.into(), error })?;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(ConsoleError::Closed { what: what.into(), recent: self.recent() }),
            Ok(k) => {
                self.pending.extend_from_slice(&buf[..k]);
                self.transcript.extend_from_slice(&buf[..k]);
                let excess = self.transcript.len().saturating_sub(TRANSCRIPT_TAIL);
                self.transcript.drain(..excess);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                Ok(())
            }
            Err(error) => Err(ConsoleError::Io { what: what.into(), error }),
        }
    }

    fn timeout(&self, what: &str, start: Instant) -> ConsoleError {
        ConsoleError::Timeout { what: what.into(), waited: start.elapsed(), recent: self.recent() }
    }
}

/// Serial output as text with CR LF turned into LF.
fn normalise(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\n").replace('\r', "")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake guest: a thread that answers like `sh` would, over a socket pair.
    fn fake(script: impl FnOnce(UnixStream) + Send + 'static) -> GuestConsole {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || script(theirs));
        GuestConsole { stream: ours, pending: Vec::new(), transcript: Vec::new(), seq: 0 }
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn output_and_status_between_markers_with_echo_and_stale_text() {
        let mut c = fake(|mut s| {
            let cmd = read_line(&mut s);
            let _rest = read_line(&mut s); // the line after `( cmd\n`
            // echo of the command (a tty with echo on), stale boot text, then the real answer
            s.write_all(format!("{cmd}\r\nboot noise __NX_END_1__ 0\r\n").as_bytes()).unwrap();
            s.write_all(b"__NX_BEGIN_1__\r\nhello\r\nworld\r\n__NX_END_1__ 3\r\nnext").unwrap();
        });
        let (code, out) = c.run("printf 'hello\\nworld\\n'; exit 3", Duration::from_secs(5)).unwrap();
        assert_eq!((code, out.as_str()), (3, "hello\nworld\n"));
        assert_eq!(c.pending, b"next");
    }

    /// A model of the guest's shell: it keeps an open quote across lines (printing the
    /// continuation prompt) and runs `echo` once the command is whole; a backslash quotes the
    /// next character.
    fn shell(mut s: UnixStream, mut dropped: usize) {
        let mut command = String::new();
        let mut open: Option<char> = None;
        loop {
            let mut line = read_line(&mut s);
            if line.is_empty() && command.is_empty() {
                return;
            }
            // The UART's lost bytes: the shell's first line is the tail of what was sent.
            let lost = dropped.min(line.len());
            line.drain(..lost);
            dropped -= lost;
            let mut chars = line.chars();
            while let Some(ch) = chars.next() {
                match (open, ch) {
                    (None, '\\') => command.extend(chars.next()),
                    (None, '"' | '\'') => open = Some(ch),
                    (Some(q), c) if c == q => open = None,
                    (_, c) => command.push(c),
                }
            }
            let reply = if open.is_some() {
                command.push('\n');
                "> ".to_owned()
            } else {
                let out = std::mem::take(&mut command);
                match out.strip_prefix("echo ") {
                    Some(args) => format!("{args}\r\n# "),
                    None => format!("sh: {out}: not found\r\n# "),
                }
            };
            if s.write_all(format!("{line}\r\n{reply}").as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Whatever the shell loses of the first probe, a later probe is answered.
    #[test]
    fn the_shell_answers_whatever_tail_of_a_probe_it_read_first() {
        let probe_len = "echo __NX_READY_1_\\OK".len();
        for dropped in 0..=probe_len {
            let mut c = fake(move |s| shell(s, dropped));
            c.wait_ready_probing(Duration::from_secs(2), Duration::from_millis(20))
                .unwrap_or_else(|e| panic!("first {dropped} bytes lost: {e}"));
            assert!(c.pending.starts_with(b"__NX_READY_"), "{}", c.recent());
        }
    }

    #[test]
    fn a_silent_guest_times_out_within_the_bound() {
        let mut c = fake(|s| {
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let start = Instant::now();
        let e = c.run("true", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ConsoleError::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
