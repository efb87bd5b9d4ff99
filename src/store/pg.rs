//! Postgres connection set-up shared by the pool, the change-feed listener, migrations and the
//! operator CLI: the URL with every timeout set, and TLS when the URL asks for it.

use std::time::Duration;

use super::StoreError;
use crate::config::PostgresConfig;

/// `application_name` of pooled connections, as seen in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "knoxgate";
/// `application_name` of the change-feed listener connection.
pub const FEED_APPLICATION_NAME: &str = "knoxgate-feed";

/// `application_name` of the one-off connection that tells PgBouncer from Postgres.
pub const PROBE_APPLICATION_NAME: &str = "knoxgate-probe";

/// Connection settings of the pool (`postgres.url`).
pub fn pg_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    config_for(cfg, &cfg.url, cfg.statement_timeout)
}

/// Connection settings of the direct connection (`postgres.feed_url`): the change feed,
/// migrations and the startup trigger check, which need a session of their own on the primary.
pub fn direct_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    config_for(cfg, &cfg.feed_url, cfg.statement_timeout)
}

/// The change feed's session: the direct connection, whose statements may run for the bulk
/// deadline (its replay reads minutes of changes, its prune deletes batches of them). Given as
/// a startup option, so it never outlives the session, not even behind a pooler (which gets
/// no options: see [`sends_startup_options`]).
pub fn feed_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    config_for(cfg, &cfg.feed_url, cfg.feed_bulk_deadline())
}

/// Whether connections to `url` may carry startup `options`. PgBouncer refuses them
/// ("unsupported startup parameter: options"), so with `postgres.pgbouncer` the pool URL gets
/// none; a distinct `feed_url` is a direct connection and keeps them.
pub fn sends_startup_options(cfg: &PostgresConfig, url: &str) -> bool {
    !(cfg.pgbouncer && url == cfg.url)
}

fn config_for(
    cfg: &PostgresConfig,
    url: &str,
    statement_timeout: Duration,
) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Unavailable(format!("bad URL: {e}")))?;
    pg.connect_timeout(cfg.connect_timeout);
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.tcp_user_timeout(cfg.tcp_user_timeout());
    pg.application_name(APPLICATION_NAME);
    if sends_startup_options(cfg, url) {
        let options = format!(
            "{} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            pg.get_options().unwrap_or(""),
            statement_timeout.as_millis(),
            cfg.idle_in_transaction_timeout().as_millis(),
        );
        pg.options(options.trim());
    }
    Ok(pg)
}

/// TLS for Postgres: rustls when the connection settings ask for it (`sslmode=require`),
/// plain otherwise.
pub fn tls_connector(
    cfg: &PostgresConfig,
    pg: &tokio_postgres::Config,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    if pg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(None);
    }
    let config = super::tls::client_config(cfg.ca_file.as_deref(), None)
        .map_err(|e| StoreError::Unavailable(format!("postgres.ca_file {e}")))?;
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// Why connections made with `pg` will not be encrypted although the user may think so, if
/// that is the case. libpq's `sslmode=prefer` (its default, and the driver's when the URL says
/// nothing) tries TLS first; here it means no TLS at all, since only `require` turns it on.
/// Loopback hosts and Unix sockets are not warned about.
pub fn plaintext_warning(pg: &tokio_postgres::Config) -> Option<String> {
    use tokio_postgres::config::{Host, SslMode};
    if pg.get_ssl_mode() != SslMode::Prefer {
        return None;
    }
    let remote = pg.get_hosts().iter().find_map(|h| match h {
        Host::Tcp(name) => {
            let loopback = name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            (!loopback).then(|| name.clone())
        }
        #[cfg(unix)]
        Host::Unix(_) => None,
    })?;
    Some(format!(
        "connections to postgres host {remote} are not encrypted: sslmode=prefer (the default \
         when the URL names none) does not use TLS here; set sslmode=require for TLS, or \
         sslmode=disable to say plaintext is intended"
    ))
}

/// One dedicated connection over the direct URL (migrations, the operator CLI, the startup
/// trigger check), driven on its own task.
pub async fn connect_one(cfg: &PostgresConfig) -> Result<tokio_postgres::Client, StoreError> {
    connect_with(cfg, &direct_config(cfg)?).await
}

/// One connection made with `pg`, driven on its own task.
async fn connect_with(
    cfg: &PostgresConfig,
    pg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, StoreError> {
    let fail = |e: tokio_postgres::Error| classify("connect", &e);
    match tls_connector(cfg, pg)? {
        Some(tls) => {
            let (client, conn) = pg.connect(tls).await.map_err(fail)?;
            tokio::spawn(conn);
            Ok(client)
        }
        None => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(fail)?;
            tokio::spawn(conn);
            Ok(client)
        }
    }
}

/// A custom setting the startup probe sends among its startup `options`, then reads back: a
/// session that lacks it did not get the options.
const PROBE_SETTING: &str = "knoxgate.startup_probe";

/// What the startup probe of `postgres.url` found (`postgres.pgbouncer` not set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pooler {
    /// `postgres.pgbouncer` is set: nothing was asked.
    NotAsked,
    /// The session carries the startup options: Postgres itself (or a session-level proxy
    /// that passes them on), where prepared statements and startup options work.
    Postgres,
    /// A pooler in the way; the signal that gave it away.
    PgBouncer(&'static str),
    /// `url` did not answer the probe: why.
    Unknown(String),
}

/// Tells PgBouncer from Postgres at `postgres.url`: one connection with knoxgate's startup
/// `options` plus [`PROBE_SETTING`]. PgBouncer refuses `options` at startup ("unsupported
/// startup parameter: options"), or, listed in its `ignore_startup_parameters`, accepts and
/// drops them, so the session then lacks the setting. Postgres accepts and applies them.
/// Bounded by [`PostgresConfig::connect_and_query_deadline`].
pub async fn probe_pooler(cfg: &PostgresConfig) -> Pooler {
    if !cfg.detect_pgbouncer {
        return Pooler::NotAsked;
    }
    let mut plain = cfg.clone();
    plain.pgbouncer = false;
    let mut pg = match config_for(&plain, &cfg.url, plain.statement_timeout) {
        Ok(pg) => pg,
        Err(e) => return Pooler::Unknown(e.to_string()),
    };
    let options = format!("{} -c {PROBE_SETTING}=on", pg.get_options().unwrap_or(""));
    pg.options(options.trim());
    pg.application_name(PROBE_APPLICATION_NAME);
    let attempt = async {
        let client = match connect_with(cfg, &pg).await {
            Ok(client) => client,
            Err(e) if e.to_string().contains("unsupported startup parameter") => {
                return Pooler::PgBouncer("it refused the startup options");
            }
            Err(e) => return Pooler::Unknown(e.to_string()),
        };
        let sql = format!("SELECT current_setting('{PROBE_SETTING}', true)");
        match client.simple_query(&sql).await {
            Ok(messages) => {
                let value = messages.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0)),
                    _ => None,
                });
                match value {
                    Some(Some("on")) => Pooler::Postgres,
                    _ => Pooler::PgBouncer("it accepted the startup options but dropped them"),
                }
            }
            Err(e) => Pooler::Unknown(classify("startup probe", &e).to_string()),
        }
    };
    match tokio::time::timeout(cfg.connect_and_query_deadline(), attempt).await {
        Ok(found) => found,
        Err(_) => Pooler::Unknown("no answer within connect_timeout + statement_timeout".into()),
    }
}

/// Settles `postgres.pgbouncer` when it was left to detection, from what [`probe_pooler`]
/// found, and logs it. An unanswered probe settles on the PgBouncer way: it also works on
/// Postgres (unnamed statements, timeouts per transaction), while the other way fails every
/// connection to a PgBouncer.
pub fn settle_pgbouncer(cfg: &mut PostgresConfig, found: Pooler) {
    if !cfg.detect_pgbouncer {
        return;
    }
    cfg.detect_pgbouncer = false;
    match found {
        Pooler::NotAsked => {}
        Pooler::Postgres => {
            cfg.pgbouncer = false;
            tracing::info!(
                "postgres.url is Postgres (detected: the session carries knoxgate's startup \
                 options); statements are prepared and cached"
            );
        }
        Pooler::PgBouncer(signal) => {
            cfg.pgbouncer = true;
            tracing::info!(
                signal,
                "postgres.url is PgBouncer (detected); no startup options, unnamed statements"
            );
        }
        Pooler::Unknown(error) => {
            cfg.pgbouncer = true;
            tracing::warn!(
                %error,
                "could not tell whether postgres.url is PgBouncer; using the PgBouncer way \
                 (unnamed statements, no startup options), which Postgres serves too; set \
                 postgres.pgbouncer to choose"
            );
        }
    }
}

/// Turns a driver error into a [`StoreError`] that keeps what the server said: its severity,
/// SQLSTATE and message (the driver's own `Display` says only "db error"), or the I/O cause.
pub fn classify(what: &str, e: &tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let text = format!("{what}: {} {code}: {}", db.severity(), db.message());
        return match code {
            // statement_timeout / lock_timeout fired on the server.
            "57014" | "55P03" => StoreError::Timeout(text),
            // read_only_sql_transaction: the server is (now) a standby, e.g. a demoted primary
            // after a failover. Its connections are dropped so new ones find the primary.
            "25006" => StoreError::Unavailable(text),
            // Connection exceptions, "too many clients" and other resource limits, refused
            // authentication, the server shutting down or starting up.
            c if c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("28")
                || c.starts_with("57P") =>
            {
                StoreError::Unavailable(text)
            }
            _ => StoreError::Query(text),
        };
    }
    let mut text = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    if e.is_closed() || text.contains("error connecting") || source_is_io(e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Query(text)
    }
}

fn source_is_io(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Turns a pool error into a [`StoreError`].
pub fn classify_pool(e: &deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::{PoolError, TimeoutType};
    match e {
        PoolError::Timeout(TimeoutType::Wait) => StoreError::Timeout(
            "no pooled connection became free within postgres.pool_wait_timeout".into(),
        ),
        PoolError::Timeout(TimeoutType::Create) => {
            StoreError::Timeout("connect: no answer within postgres.connect_timeout".into())
        }
        PoolError::Timeout(TimeoutType::Recycle) => StoreError::Timeout(
            "a pooled connection failed its check within postgres.pool_recycle_timeout".into(),
        ),
        PoolError::Backend(e) => classify("connect", e),
        other => StoreError::Unavailable(format!("pool: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn postgres(toml: &str) -> PostgresConfig {
        Config::from_toml_str(toml).unwrap().postgres
    }

    #[test]
    fn startup_options_except_to_pgbouncer() {
        let direct = postgres("[postgres]\nstatement_timeout = \"2s\"\n");
        let opts = pg_config(&direct).unwrap();
        assert!(
            opts.get_options()
                .unwrap()
                .contains("-c statement_timeout=2000")
        );
        let bouncer = postgres(
            "[postgres]\nurl = \"postgres://u@h:6432/db\"\npgbouncer = true\n\
             feed_url = \"postgres://u@h:5432/db\"\n",
        );
        assert_eq!(pg_config(&bouncer).unwrap().get_options(), None);
        // The feed's own URL is direct: it keeps the server-side timeouts.
        assert!(direct_config(&bouncer).unwrap().get_options().is_some());
        // Without a feed_url the feed goes to the pooler too, so it sends none either.
        let shared = postgres("[postgres]\nurl = \"postgres://u@h:6432/db\"\npgbouncer = true\n");
        assert_eq!(direct_config(&shared).unwrap().get_options(), None);
    }

    #[test]
    fn prefer_to_a_remote_host_is_warned_about() {
        let warn = |url: &str| {
            plaintext_warning(
                &pg_config(&postgres(&format!("[postgres]\nurl = \"{url}\"\n"))).unwrap(),
            )
        };
        let w = warn("postgres://u@db.internal:5432/app").expect("a warning");
        assert!(
            w.contains("db.internal") && w.contains("sslmode=prefer"),
            "{w}"
        );
        assert!(warn("postgres://u@db.internal:5432/app?sslmode=prefer").is_some());
        assert!(warn("postgres://u@10.1.2.3:5432/app").is_some());
        assert!(warn("postgres://u@db.internal:5432/app?sslmode=require").is_none());
        assert!(warn("postgres://u@db.internal:5432/app?sslmode=disable").is_none());
        assert!(warn("postgres://u@127.0.0.1:5432/app").is_none());
        assert!(warn("postgres://u@localhost:5432/app").is_none());
    }

    #[test]
    fn multi_host_urls_are_kept() {
        let cfg = postgres(
            "[postgres]\nurl = \"postgres://u@a:5432,b:5433/db?target_session_attrs=read-write\"\n",
        );
        let pg = pg_config(&cfg).unwrap();
        assert_eq!(pg.get_hosts().len(), 2);
        assert_eq!(pg.get_ports(), &[5432, 5433]);
        assert_eq!(
            pg.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
    }
}
