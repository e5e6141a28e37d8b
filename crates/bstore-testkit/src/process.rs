//! The service itself, run as a real child process (so it can be killed
//! with SIGKILL, restarted, or run twice).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use crate::{child, wait_for};

/// A running `baileys-store serve`.
pub struct ServiceProcess {
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ServiceProcess {
    /// Starts `bin serve` with `env` (added to a clean `BSTORE_*`-free
    /// environment), logging into `log_dir`, and waits until it serves.
    pub fn start(bin: &Path, env: &[(&str, &str)], log_dir: &Path) -> Self {
        std::fs::create_dir_all(log_dir).unwrap();
        let n = std::fs::read_dir(log_dir).map(|d| d.count()).unwrap_or(0);
        let mut p = Self {
            bin: bin.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log: log_dir.join(format!("service-{n}.log")),
            child: None,
            starts: 0,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve");
        for (k, _) in std::env::vars() {
            if k.starts_with("BSTORE") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NO_COLOR", "1").env("BSTORE_LOG", "info,bstore_session=debug");
        // The metrics endpoint on a free port (`<data_dir>/http.addr` says
        // which), so that services started at once never contend for the
        // embedded default's fixed one.
        cmd.env("BSTORE__HTTP__LISTEN", "127.0.0.1:0");
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.child = Some(child::spawn_logged(cmd, &self.log, "baileys-store"));
        self.starts += 1;
        let want = self.starts;
        wait_for(30, "the service to serve", || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the service exited with {status}; log:\n{}", self.log_text());
            }
            (self.log_text().matches("serving requests").count() >= want as usize).then_some(())
        });
    }

    /// The combined log of every start.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown work at all.
    pub fn kill9(&mut self) {
        child::kill(&mut self.child);
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        child::terminate(&mut self.child)
    }

    /// Starts it again with the same environment.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    /// Starts a stopped service again.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        child::terminate(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- service log {} ---\n{}", self.log.display(), self.log_text());
        }
    }
}
