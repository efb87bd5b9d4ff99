//! The real `knoxgate` binary as a child process, for what only a process shows: signals,
//! exit codes, the global log and tracing set-up. Only the test binaries build it (cargo gives
//! them the binary's path).

use std::{net::SocketAddr, time::Duration};

use super::unique;

/// The real `knoxgate serve` binary, on fresh loopback ports, against `db_url` and the machine's
/// Redis under a key prefix of its own; `env` adds or overrides `KNOXGATE_*` variables.
pub struct Binary {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Binary {
    pub fn spawn(db_url: &str, env: &[(&str, String)]) -> Binary {
        let (port, admin) = (super::free_port(), super::free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_knoxgate"))
            .arg("serve")
            .env("KNOXGATE_POSTGRES_URL", db_url)
            .env("KNOXGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
            .env("KNOXGATE_REDIS_KEY_PREFIX", unique("kgbin"))
            .env("KNOXGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KNOXGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the knoxgate binary");
        Binary {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        }
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

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .expect("join")
            .expect("wait")
    }
}
