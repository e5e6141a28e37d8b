//! The one way this crate runs a server process: output appended to a log
//! file in the server's directory, stopped with SIGTERM (waiting for it) or
//! SIGKILL. Each server keeps its child in an `Option`, empty while stopped.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::sigterm;

/// Starts `cmd` with stdin closed and stdout and stderr appended to `log`.
pub(crate) fn spawn_logged(mut cmd: Command, log: &Path, what: &str) -> Child {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("opening a server log");
    cmd.stdin(Stdio::null()).stdout(file.try_clone().expect("cloning a file handle")).stderr(file);
    cmd.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"))
}

/// SIGTERM, then waits for the exit.
pub(crate) fn terminate(slot: &mut Option<Child>) -> Option<ExitStatus> {
    let mut child = slot.take()?;
    sigterm(child.id());
    child.wait().ok()
}

/// SIGTERM, and SIGKILL if the process has not exited within `grace`.
pub(crate) fn terminate_within(slot: &mut Option<Child>, grace: Duration) {
    let Some(mut child) = slot.take() else { return };
    sigterm(child.id());
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGKILL: no shutdown work at all.
pub(crate) fn kill(slot: &mut Option<Child>) {
    if let Some(mut child) = slot.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
