//! Progress display on a terminal: a block of lines at the bottom of stderr, redrawn in place,
//! that log lines written through [`LogWriter`] never tear (the block is erased before a log line
//! and drawn again on the next tick). Off a terminal nothing is drawn; callers log instead.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Lines of the block currently on screen.
static DRAWN: Mutex<usize> = Mutex::new(0);

fn erase(stderr: &mut impl Write, drawn: &mut usize) {
    if *drawn > 0 {
        // To the start of the block's first line, then clear to the end of the screen.
        let _ = write!(stderr, "\x1b[{}F\x1b[J", *drawn);
        *drawn = 0;
    }
}

/// Whether progress is drawn (stderr is a terminal).
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Replaces the block on screen with `lines`.
pub fn draw(lines: &[String]) {
    let mut drawn = DRAWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut stderr = std::io::stderr().lock();
    erase(&mut stderr, &mut drawn);
    for line in lines {
        let _ = writeln!(stderr, "{line}");
    }
    let _ = stderr.flush();
    *drawn = lines.len();
}

/// Removes the block (when the work is done).
pub fn clear() {
    let mut drawn = DRAWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut stderr = std::io::stderr().lock();
    erase(&mut stderr, &mut drawn);
    let _ = stderr.flush();
}

/// stderr for log lines: erases the progress block first, so a log line never lands inside it.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut drawn = DRAWN.lock().unwrap_or_else(|e| e.into_inner());
        let mut stderr = std::io::stderr().lock();
        erase(&mut stderr, &mut drawn);
        stderr.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A bar of `width` cells, `fraction` of them filled.
pub fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_fill_in_proportion_and_stay_in_bounds() {
        assert_eq!(bar(0.0, 4), "[....]");
        assert_eq!(bar(0.5, 4), "[##..]");
        assert_eq!(bar(1.0, 4), "[####]");
        assert_eq!(bar(7.0, 4), "[####]");
        assert_eq!(bar(-1.0, 4), "[....]");
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn a_log_line_erases_the_block_first() {
        let mut out = Vec::new();
        let mut drawn = 3;
        erase(&mut out, &mut drawn);
        assert_eq!(out, b"\x1b[3F\x1b[J");
        assert_eq!(drawn, 0);
        out.clear();
        erase(&mut out, &mut drawn);
        assert!(out.is_empty());
    }
}
