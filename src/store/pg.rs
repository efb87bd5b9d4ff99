//! Postgres connection set-up shared by the pool, the change-feed listener, migrations and the
//! operator CLI: the URL with every timeout set, and TLS when the URL asks for it.

use std::{sync::Arc, time::Duration};

use super::StoreError;
use crate::config::PostgresConfig;

/// `application_name` of pooled connections, as seen in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "knoxgate";
/// `application_name` of the change-feed listener connection.
pub const FEED_APPLICATION_NAME: &str = "knoxgate-feed";

/// Connection settings shared by the pool and the change-feed listener.
pub fn pg_config(cfg: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| StoreError::Unavailable(format!("bad URL: {e}")))?;
    pg.connect_timeout(cfg.connect_timeout);
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.tcp_user_timeout(cfg.tcp_user_timeout());
    pg.application_name(APPLICATION_NAME);
    let options = format!(
        "{} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        pg.get_options().unwrap_or(""),
        cfg.statement_timeout.as_millis(),
        cfg.idle_in_transaction_timeout().as_millis(),
    );
    pg.options(options.trim());
    Ok(pg)
}

/// TLS for Postgres: rustls when the URL asks for it (`sslmode=require`), plain otherwise.
pub fn tls_connector(
    cfg: &PostgresConfig,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    let pg = pg_config(cfg)?;
    if pg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| StoreError::Unavailable(format!("postgres.ca_file {path}: {e}")))?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    StoreError::Unavailable(format!("postgres.ca_file {path}: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::Unavailable(format!("postgres.ca_file {path}: {e}"))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Unavailable(format!("TLS set-up: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// One dedicated connection (migrations, the operator CLI), driven on its own task.
pub async fn connect_one(cfg: &PostgresConfig) -> Result<tokio_postgres::Client, StoreError> {
    let pg = pg_config(cfg)?;
    let fail = |e: tokio_postgres::Error| classify("connect", &e);
    match tls_connector(cfg)? {
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

/// Turns a driver error into a [`StoreError`] that keeps what the server said: its severity,
/// SQLSTATE and message (the driver's own `Display` says only "db error"), or the I/O cause.
pub fn classify(what: &str, e: &tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let text = format!("{what}: {} {code}: {}", db.severity(), db.message());
        return match code {
            // statement_timeout / lock_timeout fired on the server.
            "57014" | "55P03" => StoreError::Timeout(text),
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
