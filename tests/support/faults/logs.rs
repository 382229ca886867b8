//! Log capture: the library's log lines of this test binary, found by the span that carries them.

use std::io::Write;
use std::sync::{Mutex, Once};

pub static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of this test binary to [`LOG`]; tests find theirs by span.
pub fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

pub fn logged_lines(marker: &str) -> Vec<String> {
    String::from_utf8_lossy(&LOG.lock().unwrap())
        .lines()
        .filter(|l| l.contains(marker))
        .map(str::to_owned)
        .collect()
}
