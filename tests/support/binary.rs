//! The real `knoxgate` binary as a child process, for what only a process shows: signals,
//! exit codes, the global log and tracing set-up. Only the test binaries build it (cargo gives
//! them the binary's path).

use std::{net::SocketAddr, time::Duration};

use super::unique;

/// The real `knoxgate serve` binary, on fresh loopback ports, against `db_url` and the machine's
/// Redis under a key prefix of its own; `env` adds or overrides `KNOXGATE_*` variables.
pub struct Binary {
    /// `None` once it has been waited for.
    child: Option<std::process::Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Where its stderr (the log) goes.
    log: tempfile::NamedTempFile,
}

impl Binary {
    pub fn spawn(db_url: &str, env: &[(&str, String)]) -> Binary {
        Self::spawn_command("serve", db_url, env)
    }

    /// The same for another command (`relay`).
    pub fn spawn_command(command: &str, db_url: &str, env: &[(&str, String)]) -> Binary {
        let (port, admin) = (super::free_port(), super::free_port());
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_knoxgate"))
            .arg(command)
            .env("KNOXGATE_POSTGRES_URL", db_url)
            .env("KNOXGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
            .env("KNOXGATE_REDIS_KEY_PREFIX", unique("kgbin"))
            .env("KNOXGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KNOXGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("start the knoxgate binary");
        Binary {
            child: Some(child),
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        }
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits until the admin port accepts connections.
    pub async fn wait_up(&self, limit: Duration) -> bool {
        let admin = self.admin;
        super::eventually(limit, || async move {
            tokio::net::TcpStream::connect(admin).await.is_ok()
        })
        .await
        .is_some()
    }

    /// `GET /verify` with `token`.
    pub async fn verify(&self, token: &str) -> super::Response {
        let authorization = format!("Token {token}");
        super::http(
            self.addr,
            "GET",
            "/verify",
            &[("Authorization", &authorization)],
            b"",
        )
        .await
    }

    /// SIGSTOP: the process stands still, its sockets open; nothing it holds changes.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Binary::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        super::signal_pid(self.child.as_ref().expect("running").id(), sig);
    }

    /// SIGKILL: a crash, with nothing flushed or closed cleanly.
    pub async fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait")
    }
}

impl Drop for Binary {
    /// A test that fails half-way must not leave the process running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
