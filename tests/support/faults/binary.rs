//! The stagingprop binary as a child process a test can stop or kill.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{BIN, FaultPair};

/// Starts `stagingprop sync` with its stderr in a file (a pipe nobody reads would block it).
pub fn spawn_sync(pair: &FaultPair, args: &[&str], log: &str) -> (Child, PathBuf) {
    let log_path = pair.scratch.0.join(log);
    let log_file = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&pair.config_path)
        .arg("sync")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("spawn stagingprop");
    (child, log_path)
}

/// Sends SIGTERM to the child (sync finishes its batch, confirms and exits 0).
pub fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(kill.success());
}

/// Waits for the child to exit, at most `within` (then kills it and returns None).
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
