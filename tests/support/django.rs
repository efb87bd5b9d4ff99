//! Rows as Django and django-rest-knox write them (`auth_user`, `knox_authtoken`), and queries
//! that read them back.

use std::time::Duration;

use knoxgate::auth::{HashAlgorithm, generate_token, token_key_of};
use time::OffsetDateTime;

use super::TestDb;

/// A token row inserted the way Django/knox writes it.
pub struct Token {
    pub token: String,
    /// The hex digest stored in the row.
    pub digest: String,
    pub user_id: i32,
}

/// Inserts a user (Django column set) and returns its id.
pub async fn insert_user(
    client: &tokio_postgres::Client,
    username: &str,
    password: &str,
    active: bool,
) -> i32 {
    let encoded = knoxgate::password::make_password(password, 1000);
    client
        .query_one(
            "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, \
             is_staff, is_active, date_joined) VALUES ($1, false, $2, '', '', $3, false, $4, now()) \
             RETURNING id",
            &[&encoded, &username, &format!("{username}@example.com"), &active],
        )
        .await
        .expect("insert user")
        .get(0)
}

/// Deletes `token`'s row by SQL, as Django's logout does.
pub async fn delete_token(client: &tokio_postgres::Client, token: &str) {
    client
        .execute(
            "DELETE FROM knox_authtoken WHERE token_key = $1",
            &[&token_key_of(token)],
        )
        .await
        .expect("delete token");
}

/// Inserts a knox token row for `user_id` expiring `ttl` from now (`None`: never).
pub async fn insert_token(
    client: &tokio_postgres::Client,
    user_id: i32,
    ttl: Option<Duration>,
    prefix: &str,
    alg: HashAlgorithm,
) -> Token {
    let token = generate_token(prefix, 64);
    let digest = alg.hex_digest(token.as_bytes());
    let expiry = ttl.map(|t| time::OffsetDateTime::now_utc() + t);
    client
        .execute(
            "INSERT INTO knox_authtoken (digest, created, user_id, expiry, token_key) \
             VALUES ($1, now(), $2, $3, $4)",
            &[&digest, &user_id, &expiry, &token_key_of(&token)],
        )
        .await
        .expect("insert token");
    Token {
        token,
        digest,
        user_id,
    }
}

/// knox's defaults: SHA-512, no prefix, ten hours to live.
pub async fn insert_default_token(client: &tokio_postgres::Client, user_id: i32) -> Token {
    insert_token(
        client,
        user_id,
        Some(Duration::from_secs(36000)),
        "",
        HashAlgorithm::Sha512,
    )
    .await
}

/// `n` tokens with knox's defaults for `user_id`.
pub async fn insert_default_tokens(
    client: &tokio_postgres::Client,
    user_id: i32,
    n: usize,
) -> Vec<Token> {
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(insert_default_token(client, user_id).await);
    }
    tokens
}

pub async fn user_with_token(db: &TestDb, username: &str) -> Token {
    let client = db.client().await;
    let id = insert_user(&client, username, "pw", true).await;
    insert_default_token(&client, id).await
}

/// The row's expiry as Python's isoformat() with `Z` would print it, computed by Postgres.
pub async fn db_expiry_text(client: &tokio_postgres::Client, token: &str) -> Option<String> {
    db_expiry_text_in(client, token, "UTC").await
}

/// The row's expiry as DRF shows it with Django's `TIME_ZONE = zone`, worked out by Postgres
/// from its own time zone data: `isoformat()`, a zero offset written `Z`.
pub async fn db_expiry_text_in(
    client: &tokio_postgres::Client,
    token: &str,
    zone: &str,
) -> Option<String> {
    let row = client
        .query_one(
            "SELECT to_char(expiry AT TIME ZONE $2, 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), \
                    extract(epoch FROM (expiry AT TIME ZONE $2) - (expiry AT TIME ZONE 'UTC'))::int \
             FROM knox_authtoken WHERE token_key = left($1, 15)",
            &[&token, &zone],
        )
        .await
        .expect("token row");
    let local: Option<String> = row.get(0);
    let offset: Option<i32> = row.get(1);
    local.map(|t| {
        let t = t.strip_suffix(".000000").unwrap_or(&t).to_owned();
        let offset = offset.expect("an offset beside the expiry");
        if offset == 0 {
            return format!("{t}Z");
        }
        let sign = if offset < 0 { '-' } else { '+' };
        let minutes = offset.unsigned_abs() / 60;
        format!("{t}{sign}{:02}:{:02}", minutes / 60, minutes % 60)
    })
}

pub async fn db_expiry(client: &tokio_postgres::Client, token: &str) -> Option<OffsetDateTime> {
    client
        .query_one(
            "SELECT expiry FROM knox_authtoken WHERE token_key = left($1, 15)",
            &[&token],
        )
        .await
        .expect("token row")
        .get(0)
}

/// Rows whose digest is the SHA-512 (hex) of `token` and whose token_key is its first 15
/// characters, hashed by Postgres itself.
pub async fn rows_matching(client: &tokio_postgres::Client, token: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM knox_authtoken \
             WHERE digest = encode(sha512(convert_to($1, 'UTF8')), 'hex') \
             AND token_key = left($1, 15)",
            &[&token],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn rows_of_user(client: &tokio_postgres::Client, user_id: i32) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM knox_authtoken WHERE user_id = $1",
            &[&user_id],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn stored_password(client: &tokio_postgres::Client, username: &str) -> String {
    client
        .query_one(
            "SELECT password FROM auth_user WHERE username = $1",
            &[&username],
        )
        .await
        .unwrap()
        .get(0)
}

pub fn within(a: OffsetDateTime, b: OffsetDateTime, tolerance: time::Duration) -> bool {
    (a - b).abs() <= tolerance
}

/// The id of the user called `username`.
pub async fn user_id(client: &tokio_postgres::Client, username: &str) -> i32 {
    client
        .query_one("SELECT id FROM auth_user WHERE username = $1", &[&username])
        .await
        .expect("user row")
        .get(0)
}

/// A user with a token, the given flags and group memberships (groups created as needed).
pub async fn member(
    db: &TestDb,
    username: &str,
    staff: bool,
    superuser: bool,
    groups: &[&str],
) -> Token {
    let t = user_with_token(db, username).await;
    let c = db.client().await;
    c.execute(
        "UPDATE auth_user SET is_staff = $2, is_superuser = $3 WHERE id = $1",
        &[&t.user_id, &staff, &superuser],
    )
    .await
    .unwrap();
    for g in groups {
        join_group(db, t.user_id, g).await;
    }
    t
}

/// Puts `user_id` in `group`, creating the group if needed.
pub async fn join_group(db: &TestDb, user_id: i32, group: &str) {
    let c = db.client().await;
    c.execute(
        "INSERT INTO auth_group (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        &[&group],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO auth_user_groups (user_id, group_id) SELECT $1, id FROM auth_group WHERE name = $2",
        &[&user_id, &group],
    )
    .await
    .unwrap();
}

/// The users every policy test asks about: no flags, staff, superuser, in group "ops", and staff
/// in "Team A" and "a,b" (a name with the groups header's separator).
pub struct PolicyCast {
    pub plain: Token,
    pub staff: Token,
    pub root: Token,
    pub ops: Token,
    pub team: Token,
}

impl PolicyCast {
    pub async fn new(db: &TestDb) -> PolicyCast {
        PolicyCast {
            plain: member(db, "plain", false, false, &[]).await,
            staff: member(db, "staff", true, false, &[]).await,
            root: member(db, "root", false, true, &[]).await,
            ops: member(db, "ops", false, false, &["ops"]).await,
            team: member(db, "team", true, false, &["Team A", "a,b"]).await,
        }
    }

    /// Their raw tokens, in the order above, as the tables of cases take them.
    pub fn tokens(&self) -> [Option<&str>; 5] {
        [&self.plain, &self.staff, &self.root, &self.ops, &self.team]
            .map(|t| Some(t.token.as_str()))
    }
}
