//! The preamble most tests share: a migrated database, a client on it, Django users, and the
//! server running against them.
//!
//! ```ignore
//! let (db, client, s) = Fixture::new().user("alice").start().await;
//! let alice = user_id(&client, "alice").await;
//! ```

use super::{TestDb, TestServer, insert_user};

/// What [`Fixture::start`] sets up.
#[derive(Default)]
pub struct Fixture {
    /// (username, active)
    users: Vec<(String, bool)>,
    config: String,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::default()
    }

    /// An active user whose password is `<username>-pass`.
    pub fn user(mut self, username: &str) -> Self {
        self.users.push((username.to_owned(), true));
        self
    }

    /// Extra configuration TOML (see [`config_for`](super::config_for)).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_owned();
        self
    }

    /// Creates the database and the users, then starts the server and waits until it is ready.
    /// Keep the database bound until the end of the test: dropping it drops the database.
    pub async fn start(self) -> (TestDb, tokio_postgres::Client, TestServer) {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        for (name, active) in &self.users {
            insert_user(&client, name, &format!("{name}-pass"), *active).await;
        }
        let s = TestServer::start(&db, &self.config).await;
        (db, client, s)
    }
}
