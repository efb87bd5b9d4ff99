//! The preamble most tests share: a migrated database, a client on it, Django users, and the
//! server running against them.
//!
//! ```ignore
//! let Fixture { db, client, s, users } = Fixture::new().user("alice").start().await;
//! ```

use std::collections::HashMap;

use super::{TestDb, TestServer, insert_user};

/// A running server with its database; built by [`Fixture::new`].
pub struct Fixture {
    pub db: TestDb,
    pub client: tokio_postgres::Client,
    pub s: TestServer,
    /// User ids by username.
    pub users: HashMap<String, i32>,
}

/// What [`FixtureBuilder::start`] sets up.
#[derive(Default)]
pub struct FixtureBuilder {
    /// (username, active)
    users: Vec<(String, bool)>,
    config: String,
}

impl Fixture {
    pub fn new() -> FixtureBuilder {
        FixtureBuilder::default()
    }
}

impl FixtureBuilder {
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
    pub async fn start(self) -> Fixture {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let mut users = HashMap::new();
        for (name, active) in &self.users {
            let id = insert_user(&client, name, &format!("{name}-pass"), *active).await;
            users.insert(name.clone(), id);
        }
        let s = TestServer::start(&db, &self.config).await;
        Fixture {
            db,
            client,
            s,
            users,
        }
    }
}
