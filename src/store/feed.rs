//! The Postgres change feed: a dedicated LISTEN connection that evicts what the triggers
//! installed by `knoxgate migrate` report, from every cache tier.
//!
//! Nothing is lost across disconnects. While the listener is down the store is told so, and
//! confirms cached answers with Postgres instead of trusting them. On (re)connect it LISTENs
//! first, then replays the revocation log over the window in which a cached entry could still
//! exist (max cache TTL plus a slack for transactions that commit late), clears the in-process
//! tier, and only then declares itself live.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Socket, tls::MakeTlsConnect};

use super::{Change, Store, pg, schema};
use crate::{
    config::Config,
    metrics::{KindLabels, Metrics},
};

/// How far before the max cache TTL window the replay reaches, for transactions whose trigger
/// ran well before their COMMIT (the log stamps trigger time).
pub(super) const REPLAY_SLACK: Duration = Duration::from_secs(60);

/// How often the revocation log is pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Reads one NOTIFY payload written by the triggers: `t|user|key`, `i|user|key`, `u|user|`.
pub fn parse_payload(payload: &str) -> Option<Change> {
    let mut parts = payload.splitn(3, '|');
    let (kind, user_id, token_key) = (parts.next()?, parts.next()?, parts.next()?);
    match kind {
        "t" => Some(Change::Token {
            token_key: token_key.into(),
            user_id: user_id.into(),
        }),
        "i" => Some(Change::Inserted {
            token_key: token_key.into(),
        }),
        "u" => Some(Change::User {
            user_id: user_id.into(),
        }),
        _ => None,
    }
}

fn kind_label(change: &Change) -> &'static str {
    match change {
        Change::Token { .. } => "token",
        Change::Inserted { .. } => "insert",
        Change::User { .. } => "user",
        Change::Everything => "resync",
    }
}

/// Flattens a timed-out-or-failed statement into one message.
fn timed<T>(
    what: &str,
    r: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

/// Runs the listener until `shutdown` flips to true, reconnecting after every failure.
pub async fn run(
    store: Arc<Store>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let result = match pg::tls_connector(&config.postgres) {
            Ok(Some(tls)) => session(&store, &config, &metrics, tls, &mut shutdown).await,
            Ok(None) => {
                session(
                    &store,
                    &config,
                    &metrics,
                    tokio_postgres::NoTls,
                    &mut shutdown,
                )
                .await
            }
            Err(e) => Err(e.to_string()),
        };
        store.set_feed_live(false);
        metrics.feed_connected.set(0);
        match result {
            Ok(()) => return, // shutdown
            Err(e) => {
                tracing::warn!(error = %e, "change feed disconnected; confirming cached answers with postgres until it is back")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.cache.feed_reconnect_delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One connection's life: connect, LISTEN, catch up, then apply events until it fails.
async fn session<T>(
    store: &Store,
    config: &Config,
    metrics: &Metrics,
    tls: T,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String>
where
    T: MakeTlsConnect<Socket> + 'static,
    T::Stream: Send + 'static,
{
    let mut pg = pg::pg_config(&config.postgres).map_err(|e| e.to_string())?;
    pg.application_name(pg::FEED_APPLICATION_NAME);
    let (client, mut connection) = pg.connect(tls).await.map_err(|e| format!("connect: {e}"))?;
    // The connection must be polled for notifications to arrive; pooled connections cannot.
    let (events_tx, mut events) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if events_tx.send(n.payload().to_owned()).is_err() {
                        return "listener gone".to_owned();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("connection: {e}"),
                None => return "connection closed".to_owned(),
            }
        }
    });
    let result = async {
        let deadline = config.postgres.feed_query_deadline();
        if !tokio::time::timeout(deadline, schema::triggers_installed(&client, &config.postgres))
            .await
            .map_err(|_| "trigger check: timed out".to_owned())?
            .map_err(|e| format!("trigger check: {e}"))?
        {
            return Err("the change-feed triggers are not installed: run `knoxgate migrate`".into());
        }
        timed("LISTEN", tokio::time::timeout(deadline, client.batch_execute(&format!("LISTEN {}", schema::CHANNEL))).await)?;
        // Catch up on everything that could still be cached anywhere.
        let window = config.redis.max_cache_ttl + REPLAY_SLACK;
        let replay = tokio::time::timeout(
            config.postgres.feed_bulk_deadline(),
            client.query(
                &format!(
                    "SELECT kind, user_id, coalesce(token_key, '') FROM {} \
                     WHERE logged_at > now() - make_interval(secs => $1) ORDER BY id",
                    schema::LOG_TABLE
                ),
                &[&window.as_secs_f64()],
            ),
        )
        .await;
        let rows = timed("replay", replay)?;
        store.apply(&Change::Everything).await;
        for row in &rows {
            let (kind, user_id, token_key): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            if let Some(change) = parse_payload(&format!("{kind}|{user_id}|{token_key}")) {
                store.apply(&change).await;
            }
        }
        let pruned = tokio::time::timeout(
            config.postgres.feed_bulk_deadline(),
            client.execute(
                &format!(
                    "DELETE FROM {} WHERE logged_at < now() - make_interval(secs => $1)",
                    schema::LOG_TABLE
                ),
                &[&config.cache.feed_retention.as_secs_f64()],
            ),
        )
        .await;
        let pruned = timed("prune", pruned)?;
        tracing::info!(replayed = rows.len(), pruned, "change feed live");
        store.set_feed_live(true);
        metrics.feed_connected.set(1);

        let mut health = tokio::time::interval(config.cache.feed_health_interval);
        health.tick().await;
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.tick().await;
        loop {
            tokio::select! {
                payload = events.recv() => {
                    let Some(payload) = payload else { return Err("notification stream ended".into()) };
                    match parse_payload(&payload) {
                        Some(change) => {
                            metrics.feed_events.get_or_create(&KindLabels { kind: kind_label(&change) }).inc();
                            store.apply(&change).await;
                        }
                        None => tracing::warn!(payload_len = payload.len(), "unreadable change-feed payload ignored"),
                    }
                }
                _ = health.tick() => {
                    // A dead peer goes quiet rather than failing: ask it something.
                    let r = tokio::time::timeout(deadline, client.simple_query("SELECT 1")).await;
                    timed("health check", r)?;
                }
                _ = prune.tick() => {
                    let r = tokio::time::timeout(config.postgres.feed_bulk_deadline(), client.execute(
                        &format!("DELETE FROM {} WHERE logged_at < now() - make_interval(secs => $1)", schema::LOG_TABLE),
                        &[&config.cache.feed_retention.as_secs_f64()],
                    )).await;
                    timed("prune", r)?;
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_written_by_the_triggers() {
        assert_eq!(
            parse_payload("t|12|abc123def456789"),
            Some(Change::Token {
                token_key: "abc123def456789".into(),
                user_id: "12".into()
            })
        );
        assert_eq!(
            parse_payload("i|12|k"),
            Some(Change::Inserted {
                token_key: "k".into()
            })
        );
        assert_eq!(
            parse_payload("u|12|"),
            Some(Change::User {
                user_id: "12".into()
            })
        );
        // A token key may itself contain '|' (prefixes are free text).
        assert_eq!(
            parse_payload("t|1|a|b"),
            Some(Change::Token {
                token_key: "a|b".into(),
                user_id: "1".into()
            })
        );
        assert_eq!(parse_payload("x|1|k"), None);
        assert_eq!(parse_payload("garbage"), None);
    }
}
