//! Redis for tests: private redis-server processes (killed on drop, and can be killed, frozen
//! and restarted on the same port for fault tests) and `redis-cli` against any of them.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{free_port, wait_accepting};

/// A private redis-server (no persistence) on a loopback port; SIGKILLed on drop, even if
/// stopped.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    /// The server's working directory, where a snapshot would be written (default: ours).
    workdir: Option<std::path::PathBuf>,
}

impl PrivateRedis {
    /// Starts one on a spare port.
    pub async fn start() -> PrivateRedis {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> PrivateRedis {
        // Owned by the guard from here on, so it is killed and reaped even if startup fails.
        let mut redis = PrivateRedis {
            port,
            child: None,
            workdir: None,
        };
        redis.restart().await;
        redis
    }

    /// Starts one on a spare port working in `dir` (where `BGSAVE` writes its snapshot).
    pub async fn start_in(dir: &std::path::Path) -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
            workdir: Some(dir.to_owned()),
        };
        redis.restart().await;
        redis
    }

    /// Spawns redis-server again on the same port (after [`kill`](Self::kill)) and waits until
    /// it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let mut command = Command::new("redis-server");
        if let Some(dir) = &self.workdir {
            command.current_dir(dir);
        }
        let child = command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        assert!(
            wait_accepting(self.port, Duration::from_secs(5)).await,
            "private redis-server did not start"
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the kernel still accepts connections, nothing answers.
    pub fn sigstop(&self) {
        self.signal("-STOP");
    }

    pub fn sigcont(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal_pid(c.id(), sig);
        }
    }
}

/// Sends `sig` (as kill(1) spells it, e.g. `-STOP`) to `pid`, and fails the test if it cannot.
pub fn signal_pid(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill(1)");
    assert!(st.success(), "kill {sig} {pid} failed");
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a redis-cli command against the Redis on `port` (6379: the machine's).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
