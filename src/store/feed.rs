//! The Postgres change feed: a dedicated LISTEN connection (`postgres.feed_url`) that evicts
//! what the triggers installed by `knoxgate migrate` report, from every cache tier.
//!
//! Nothing is lost across disconnects. While the listener is down the store is told so, and
//! confirms cached answers with Postgres instead of trusting them. On (re)connect it LISTENs
//! first, then replays the revocation log over the window in which a cached entry could still
//! exist (max cache TTL plus a slack for transactions that commit late), clears the in-process
//! tier, and only then declares itself live.
//!
//! A connected listener is not proof of a hearing one: behind PgBouncer in transaction mode the
//! LISTEN lands on a server connection that goes back to PgBouncer's pool, and notifications
//! never arrive. So the feed proves it hears: after catching up, on every health tick while
//! requests use the pool, and while deaf (ever less often when idle: see
//! [`IDLE_DEAF_ECHO_MAX_INTERVAL`]), it sends a NOTIFY through the pool on a channel of its own (payload
//! `h|<instance>|<seq>`) and expects it back within `cache.feed_echo_timeout`. Until the first echo it is not live; when
//! one is missed it is reported deaf (not live, `/readyz` not ready) and answers are confirmed
//! with Postgres. If it starts hearing again it reconnects, to replay what it may have missed.
//! Its statements are unnamed, so that even through a transaction pooler it gets that far.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_postgres::{AsyncMessage, Socket, tls::MakeTlsConnect, types::Type};

use super::{
    Change, Store, StoreError,
    change::{Message, kind_label, parse_message, parse_payload, payload},
    pg,
    relay::{self, Publisher},
    schema,
};
use crate::{config::Config, metrics::Metrics};

/// How often the revocation log is pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The self-test's channel and payloads for one instance. The channel is the instance's own,
/// so other instances' listeners are not woken by it.
#[derive(Debug, Clone)]
pub struct Echo {
    instance: String,
    seq: u64,
}

impl Echo {
    pub fn new() -> Echo {
        let mut nonce = [0u8; 8];
        rand::fill(&mut nonce[..]);
        Echo {
            instance: hex::encode(nonce),
            seq: 0,
        }
    }

    /// The channel this instance listens on for its own echoes (a plain identifier).
    pub fn channel(&self) -> String {
        format!("{}_echo_{}", schema::CHANNEL, self.instance)
    }

    /// The next payload to send, with its sequence number.
    pub fn next_payload(&mut self) -> (u64, String) {
        self.seq += 1;
        (self.seq, format!("h|{}|{}", self.instance, self.seq))
    }

    /// Whether `message` is this instance's echo number `seq`.
    pub fn is_answer(&self, message: &Message, seq: u64) -> bool {
        matches!(message, Message::Echo { instance, seq: s } if *instance == self.instance && *s == seq)
    }
}

impl Default for Echo {
    fn default() -> Self {
        Echo::new()
    }
}

/// Flattens a timed-out-or-failed statement into one error, classified and counted like the
/// pool's (`knoxgate_postgres_errors_total{kind}`), with the server's message kept.
fn timed<T>(
    metrics: &Metrics,
    what: &str,
    r: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
) -> Result<T, StoreError> {
    let error = match r {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => pg::classify(what, &e),
        Err(_) => StoreError::Timeout(format!("{what}: no answer within the statement deadline")),
    };
    metrics.postgres_error(error.kind());
    Err(error)
}

/// Log rows one prune statement deletes: each is short whatever the backlog (a bulk cleanup of
/// tokens logs a row per token).
const PRUNE_BATCH: i64 = 5_000;
/// How long one prune may go on deleting batches before it yields to the feed's own work
/// (echo, health check), and the pause before it goes on with a backlog.
const PRUNE_BUDGET: Duration = Duration::from_millis(500);
const PRUNE_BACKLOG_PAUSE: Duration = Duration::from_secs(1);

/// The longest a deaf feed with no requests waits between two echoes: it asks at the first
/// health tick, then twice as long after each unanswered one, up to this. (Behind a transaction
/// pooler it never hears, and each echo opens a pooled connection that is closed as idle.)
const IDLE_DEAF_ECHO_MAX_INTERVAL: Duration = Duration::from_secs(60);

/// When a deaf feed with no requests asks for its echo next (see
/// [`IDLE_DEAF_ECHO_MAX_INTERVAL`]).
struct IdleDeafEcho {
    next: Instant,
    wait: Duration,
}

impl IdleDeafEcho {
    fn new(now: Instant, first_wait: Duration) -> Self {
        IdleDeafEcho {
            next: now,
            wait: first_wait,
        }
    }

    /// Whether to ask at `now`; when so, the next time comes twice as late.
    fn due(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.wait;
        self.wait = (self.wait * 2).min(IDLE_DEAF_ECHO_MAX_INTERVAL);
        true
    }
}

/// Deletes revocation-log rows older than `cache.feed_retention`, oldest first, in batches,
/// for at most `PRUNE_BUDGET`. Returns true when rows are left to delete. A failure is logged,
/// not fatal: an unpruned log only grows until the next prune, while a feed that went down
/// with every failed prune would never come back up against a large backlog.
async fn prune_log(client: &tokio_postgres::Client, config: &Config, metrics: &Metrics) -> bool {
    let sql = format!(
        "DELETE FROM {log} WHERE id IN (SELECT id FROM {log} \
         WHERE logged_at < now() - make_interval(secs => $1) ORDER BY logged_at LIMIT $2)",
        log = schema::LOG_TABLE
    );
    let retention = config.cache.feed_retention.as_secs_f64();
    let started = tokio::time::Instant::now();
    let mut pruned = 0;
    loop {
        let r = tokio::time::timeout(
            config.postgres.feed_bulk_deadline(),
            client.execute_typed(
                &sql,
                &[(&retention, Type::FLOAT8), (&PRUNE_BATCH, Type::INT8)],
            ),
        )
        .await;
        match timed(metrics, "prune", r) {
            Ok(n) => {
                pruned += n;
                if n < PRUNE_BATCH as u64 {
                    tracing::debug!(pruned, "revocation log pruned");
                    return false;
                }
                if started.elapsed() >= PRUNE_BUDGET {
                    tracing::debug!(pruned, "revocation log: pruning a backlog");
                    return true;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, pruned, "could not prune the revocation log; trying again later");
                return false;
            }
        }
    }
}

/// While the feed cannot get back, a warning per `FEED_WARNING_INTERVAL` (with the number of
/// attempts since the last one) rather than one per `cache.feed_reconnect_delay` (0.5 s: 7,200
/// lines an hour); a reason not yet met in this outage is warned of at once, and every attempt
/// is logged at debug.
const FEED_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Distinct reasons an outage remembers; beyond them, even a new one waits for the interval,
/// so that errors whose text varies cannot bring back a warning per attempt.
const FEED_OUTAGE_REASONS: usize = 8;

/// The reconnect attempts of one outage of the feed, for [`run`]'s log.
#[derive(Default)]
struct OutageLog {
    /// Attempts failed since the last warning.
    unreported: u64,
    /// When the last warning was logged.
    last_warning: Option<Instant>,
    /// The reasons already warned of in this outage: one that comes back (two causes taking
    /// turns) waits for the interval like a repeat.
    reasons: Vec<String>,
}

impl OutageLog {
    /// Logs a failed session; `was_live`: it had gone live, so this failure begins an outage.
    fn failed(&mut self, was_live: bool, error: &StoreError) {
        match self.warn_of(was_live, error.to_string(), Instant::now()) {
            Some(attempts) => {
                tracing::warn!(%error, attempts, "change feed disconnected; confirming cached answers with postgres until it is back")
            }
            None => tracing::debug!(%error, "change feed still disconnected"),
        }
    }

    /// Whether a failure for `cause` at `now` is warned of, and if so with how many attempts
    /// since the last warning (this one included).
    fn warn_of(&mut self, was_live: bool, cause: String, now: Instant) -> Option<u64> {
        if was_live {
            *self = OutageLog::default();
        }
        self.unreported += 1;
        let new_reason = !self.reasons.contains(&cause) && self.reasons.len() < FEED_OUTAGE_REASONS;
        let due = new_reason
            || self
                .last_warning
                .is_none_or(|at| now.duration_since(at) >= FEED_WARNING_INTERVAL);
        if !due {
            return None;
        }
        if new_reason {
            self.reasons.push(cause);
        }
        self.last_warning = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// Runs the listener until `shutdown` flips to true, reconnecting after every failure. With a
/// `publisher` (`knoxgate relay`), every change heard or replayed is also appended to the Redis
/// stream, and a heartbeat while live; a failed append, or one that finds the stream lost the
/// previous one, fails the session, so that the reconnect's replay appends again what might not
/// have reached (or stayed in) the stream.
pub async fn run(
    store: Arc<Store>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    publisher: Option<Arc<Publisher>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let publisher = publisher.as_deref();
    let mut echo = Echo::new();
    let mut outage = OutageLog::default();
    loop {
        let result = match pg::feed_config(&config.postgres).and_then(|pg| {
            let tls = pg::tls_connector(&config.postgres, &pg)?;
            Ok((pg, tls))
        }) {
            Ok((pg, Some(tls))) => {
                session(
                    &store,
                    &config,
                    &metrics,
                    publisher,
                    pg,
                    tls,
                    &mut echo,
                    &mut shutdown,
                )
                .await
            }
            Ok((pg, None)) => {
                let tls = tokio_postgres::NoTls;
                session(
                    &store,
                    &config,
                    &metrics,
                    publisher,
                    pg,
                    tls,
                    &mut echo,
                    &mut shutdown,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let was_live = store.feed_live();
        store.set_feed_live(false);
        store.set_feed_deaf(false);
        store.feed_unapplied_dropped();
        match result {
            Ok(()) => return, // shutdown
            Err(e) => outage.failed(was_live, &e),
        }
        if let Some(publisher) = publisher {
            publisher
                .reconnect_if_connected(config.redis.connect_timeout)
                .await;
        }
        tokio::select! {
            _ = tokio::time::sleep(config.cache.feed_reconnect_delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How long a statement of the feed's own may run on the listening connection before the
/// notifications it holds back count as waiting: a health check or an empty prune takes a
/// millisecond, and answers cached meanwhile stay unconfirmed; one that waits (on a lock, on a
/// slow server) makes hits confirm from then until it ends. Adds at most this much to the
/// revocation bound of a change made during such a statement.
const HOLD_BACK_GRACE: Duration = Duration::from_millis(100);

/// Runs `statement`, a statement of the feed's own on the listening connection. Postgres
/// delivers no notification to a session inside a transaction, a single statement's included,
/// so what is revoked meanwhile is heard only once it ends (a prune waiting on a row lock:
/// until its deadline). Past [`HOLD_BACK_GRACE`], it counts in `waiting` until it ends, and
/// cached answers are confirmed, as when a change is heard but not yet applied.
async fn holding_back_notifications<F: Future>(
    waiting: Arc<AtomicUsize>,
    statement: F,
) -> F::Output {
    let mut statement = std::pin::pin!(statement);
    tokio::select! {
        done = &mut statement => return done,
        _ = tokio::time::sleep(HOLD_BACK_GRACE) => {}
    }
    waiting.fetch_add(1, Ordering::SeqCst);
    // Given back however this ends, the future dropped included.
    let _held = Held(waiting);
    statement.await
}

/// Takes one back from `waiting` when dropped.
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where the self-test stands on the current connection.
enum Hearing {
    /// No echo has come back on this connection yet: not live.
    Unproven,
    /// The last echo came back: live.
    Live,
    /// An echo was missed: not live, reported deaf.
    Deaf,
}

/// One connection's life: connect, LISTEN, catch up, prove it hears, then apply events until
/// it fails.
#[allow(clippy::too_many_arguments)]
async fn session<T>(
    store: &Store,
    config: &Config,
    metrics: &Metrics,
    publisher: Option<&Publisher>,
    mut pg: tokio_postgres::Config,
    tls: T,
    echo: &mut Echo,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StoreError>
where
    T: MakeTlsConnect<Socket> + 'static,
    T::Stream: Send + 'static,
{
    pg.application_name(pg::FEED_APPLICATION_NAME);
    // Bounded as a whole: `connect_timeout` covers only the TCP connect, and a server that
    // accepts but never completes the startup exchange would hold the feed (and a shutdown
    // waiting for it) for ever.
    let connecting = tokio::time::timeout(
        config.postgres.connect_and_query_deadline(),
        pg.connect(tls),
    );
    let connected = tokio::select! {
        r = connecting => r,
        _ = shutdown.changed() => return Ok(()),
    };
    let (client, mut connection) = match connected {
        Ok(Ok(connected)) => connected,
        Ok(Err(e)) => {
            let error = pg::classify("feed connect", &e);
            metrics.postgres_error(error.kind());
            return Err(error);
        }
        Err(_) => {
            let error = StoreError::Timeout(
                "feed connect: no session within postgres.connect_timeout + statement_timeout"
                    .into(),
            );
            metrics.postgres_error(error.kind());
            return Err(error);
        }
    };
    // The connection must be polled for notifications to arrive; pooled connections cannot.
    let (events_tx, mut events) = mpsc::unbounded_channel::<String>();
    let waiting = store.feed_heard();
    let heard = Arc::clone(&waiting);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // Counted before it is queued: cached answers are confirmed from now until
                    // the loop has applied it, whatever the loop is waiting on meanwhile.
                    heard.fetch_add(1, Ordering::SeqCst);
                    if events_tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                // The client's next statement fails with the cause; the health tick sends one.
                Some(Err(_)) | None => return,
            }
        }
    });
    let result = async {
        let deadline = config.postgres.feed_query_deadline();
        if !timed(metrics, "trigger check", tokio::time::timeout(deadline, schema::triggers_installed(&client, &config.postgres, config.verify.needs_identity())).await)? {
            return Err(StoreError::Query("the change-feed triggers are not installed: run `knoxgate migrate`".into()));
        }
        // One simple-query message, so even a pooler runs both on one server connection.
        let listen = format!("LISTEN {}; LISTEN {}", schema::CHANNEL, echo.channel());
        timed(metrics, "LISTEN", tokio::time::timeout(deadline, client.batch_execute(&listen)).await)?;
        // Catch up on everything that could still be cached anywhere. Only a relay needs the
        // INSERTs (this process's own key filter is reloaded now anyway), and only those made
        // since a relay last heartbeated: asked now that LISTEN hears whatever comes next.
        let inserts = match publisher {
            Some(publisher) => Some(config.insert_replay_window(
                publisher.since_last_heartbeat().await?,
            )),
            None => None,
        };
        let replay = read_log(&client, config, metrics, inserts).await?;
        // Whatever became of the previous session's appends, this replay appends them again.
        if let Some(publisher) = publisher {
            publisher.start_over();
        }
        store.apply(&Change::Everything).await;
        let replayed = replay.len();
        apply_replayed(store, publisher, replay).await?;
        tracing::info!(replayed, "change feed caught up; checking that it hears");

        let mut hearing = Hearing::Unproven;
        let mut pending = send_echo(store, echo, config).await;
        let mut idle_deaf_echo = IdleDeafEcho::new(Instant::now(), config.cache.feed_health_interval);
        let mut health = tokio::time::interval(config.cache.feed_health_interval);
        health.tick().await;
        // The first prune as soon as the feed is live, off the path to going live.
        let mut next_prune = tokio::time::Instant::now();
        let mut heartbeat = tokio::time::interval(config.cache.feed_heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A relay's heartbeat tells instances it hears. A listener connection that died silently
        // would go on being vouched for until the next health tick, longer than
        // `cache.feed_relay_timeout`, so each heartbeat waits for the connection to answer a
        // query first; the loop goes on applying changes meanwhile.
        let mut vouching = None;
        loop {
            let echo_due = async {
                match pending {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                payload = events.recv() => {
                    let Some(payload) = payload else {
                        // The driver stopped: ask the connection why.
                        let r = tokio::time::timeout(deadline, client.simple_query("SELECT 1")).await;
                        timed(metrics, "connection", r)?;
                        return Err(StoreError::Unavailable("feed: notification stream ended".into()));
                    };
                    // Every notification already waiting is taken with it: a burst (a bulk
                    // DELETE) is evicted from Redis in batches (see `Store::apply_all`) and a
                    // relay appends it at once (see `Publisher::publish_all`), instead of a
                    // round trip per change.
                    let mut batch = vec![payload];
                    while batch.len() < relay::READ_BATCH as usize {
                        match events.try_recv() {
                            Ok(payload) => batch.push(payload),
                            Err(_) => break,
                        }
                    }
                    let mut relayed: Vec<&str> = Vec::new();
                    let mut changes = Vec::new();
                    let mut echoes = Vec::new();
                    for payload in &batch {
                        match parse_message(payload) {
                            Some(Message::Change(change)) => {
                                changes.push(change);
                                relayed.push(payload);
                            }
                            Some(message @ Message::Echo { .. }) => echoes.push(message),
                            None => tracing::warn!(payload_len = payload.len(), "unreadable change-feed payload ignored"),
                        }
                    }
                    // Until the batch is applied (and whatever arrives or waits behind it),
                    // cached answers are confirmed: the driver counted each as it arrived.
                    store.apply_all(&changes).await;
                    store.feed_applied(batch.len());
                    for change in &changes {
                        metrics.feed_event_applied(kind_label(change));
                    }
                    if let Some(publisher) = publisher {
                        publisher.publish_all(&relayed).await?;
                    }
                    for message in echoes {
                        let Some((seq, _)) = pending else { continue };
                        if !echo.is_answer(&message, seq) {
                            continue;
                        }
                        pending = None;
                        match hearing {
                            Hearing::Live => {}
                            Hearing::Unproven => {
                                hearing = Hearing::Live;
                                tracing::info!("change feed live");
                                store.set_feed_live(true);
                            }
                            // Whatever was sent while deaf is lost: reconnect to replay it.
                            Hearing::Deaf => return Err(StoreError::Unavailable(
                                "feed: hears its own notifications again; reconnecting to replay the revocation log".into(),
                            )),
                        }
                    }
                }
                _ = echo_due => {
                    pending = None;
                    if !matches!(hearing, Hearing::Deaf) {
                        hearing = Hearing::Deaf;
                        store.set_feed_live(false);
                        store.set_feed_deaf(true);
                        tracing::warn!(
                            timeout = ?config.cache.feed_echo_timeout,
                            "change feed is deaf: its own NOTIFY, sent through the pool, did not come back on the \
                             listener connection within cache.feed_echo_timeout. Likely cause: postgres.feed_url \
                             goes through PgBouncer in transaction mode (LISTEN needs a direct connection). \
                             Confirming cached answers with postgres meanwhile"
                        );
                    }
                }
                _ = health.tick() => {
                    // A dead peer goes quiet rather than failing: ask it something.
                    let check = tokio::time::timeout(deadline, client.simple_query("SELECT 1"));
                    let r = holding_back_notifications(Arc::clone(&waiting), check).await;
                    timed(metrics, "health check", r)?;
                    // Re-checked only while requests use the pool anyway: an idle instance's
                    // self-test must not hold a pooled connection open. A session that heard
                    // once keeps hearing (LISTEN belongs to the session); the check at each
                    // (re)connect is the one that catches a transaction pooler. A deaf feed
                    // (its first echo came back late) asks while idle too, and a relay always
                    // is: it would stay deaf, and not ready, for good; but less and less often
                    // while nothing answers. So does one whose first echo could not be sent
                    // (the pool's Postgres refused while the feed's own connection was up).
                    let unanswered = matches!(hearing, Hearing::Deaf | Hearing::Unproven);
                    let asks = !store.postgres().quiet()
                        || (unanswered && idle_deaf_echo.due(Instant::now()));
                    if pending.is_none() && asks {
                        pending = send_echo(store, echo, config).await;
                    }
                }
                _ = heartbeat.tick(), if publisher.is_some() && vouching.is_none() && matches!(hearing, Hearing::Live) => {
                    let check = tokio::time::timeout(deadline, client.simple_query("SELECT 1"));
                    vouching = Some(Box::pin(holding_back_notifications(Arc::clone(&waiting), check)));
                }
                r = async { vouching.as_mut().expect("guarded").await }, if vouching.is_some() => {
                    vouching = None;
                    timed(metrics, "heartbeat check", r)?;
                    // Not while deaf: an echo missed meanwhile withdrew what this would vouch for.
                    if let Some(publisher) = publisher.filter(|_| matches!(hearing, Hearing::Live)) {
                        publisher.heartbeat().await?;
                    }
                }
                // Only once live: a prune must never hold up the echo that makes the feed live.
                _ = tokio::time::sleep_until(next_prune), if matches!(hearing, Hearing::Live) => {
                    let prune = prune_log(&client, config, metrics);
                    let more = holding_back_notifications(Arc::clone(&waiting), prune).await;
                    next_prune = tokio::time::Instant::now()
                        + if more { PRUNE_BACKLOG_PAUSE } else { PRUNE_INTERVAL };
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    // Stopped for good before the caller forgets what it counted.
    let _ = driver.await;
    result
}

/// A change of the revocation log, and its payload as the triggers write it.
type Logged = (Change, String);

/// The revocation log: removals over the window in which anything could still be cached, and
/// INSERTs over `inserts` (a relay's [`Config::insert_replay_window`]; `None`: none).
async fn read_log(
    client: &tokio_postgres::Client,
    config: &Config,
    metrics: &Metrics,
    inserts: Option<Duration>,
) -> Result<Vec<Logged>, StoreError> {
    let window = config.log_read_window();
    let replay = tokio::time::timeout(
        config.postgres.feed_bulk_deadline(),
        client.query_typed(
            &format!(
                "SELECT kind, user_id, coalesce(token_key, '') FROM {} \
                 WHERE logged_at > now() - make_interval(secs => $1) \
                   AND (kind <> 'i' OR ($3 AND logged_at > now() - make_interval(secs => $2))) \
                 ORDER BY id",
                schema::LOG_TABLE
            ),
            &[
                (&window.as_secs_f64(), Type::FLOAT8),
                (&inserts.unwrap_or_default().as_secs_f64(), Type::FLOAT8),
                (&inserts.is_some(), Type::BOOL),
            ],
        ),
    )
    .await;
    let rows = timed(metrics, "replay", replay)?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let (kind, user_id, token_key): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            // Written as the triggers write it (the log keeps user ids as they are), for the
            // stream, and read back as any payload is.
            let payload = payload(&kind, &user_id, &token_key);
            parse_payload(&payload).map(|change| (change, payload))
        })
        .collect())
}

/// Applies what [`read_log`] read to the store and, for a relay, appends it to the stream:
/// first, so that instances hear it before the relay's Redis evictions are done.
async fn apply_replayed(
    store: &Store,
    publisher: Option<&Publisher>,
    replay: Vec<Logged>,
) -> Result<(), StoreError> {
    let (changes, payloads): (Vec<Change>, Vec<String>) = replay.into_iter().unzip();
    if let Some(publisher) = publisher {
        for chunk in payloads.chunks(relay::READ_BATCH as usize) {
            publisher.publish_all(chunk).await?;
        }
    }
    store.apply_all(&changes).await;
    Ok(())
}

/// Sends the next self-test notification through the pool; returns its sequence number and
/// when it is due back. `None` when it could not be sent (the pool's failure is logged and
/// counted there): that proves nothing either way, and the next health tick tries again.
async fn send_echo(store: &Store, echo: &mut Echo, config: &Config) -> Option<(u64, Instant)> {
    let (seq, payload) = echo.next_payload();
    store
        .postgres()
        .notify(&echo.channel(), &payload)
        .await
        .ok()?;
    Some((seq, Instant::now() + config.cache.feed_echo_timeout))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_outage_is_warned_of_once_a_minute_and_at_each_new_cause() {
        let mut log = super::OutageLog::default();
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + std::time::Duration::from_millis(ms);
        let refused = || "feed connect: connection refused".to_owned();
        // The first failure, then every 0.5 s: one warning a minute, with the attempts since.
        assert_eq!(log.warn_of(false, refused(), at(0)), Some(1));
        for i in 1..120 {
            assert_eq!(
                log.warn_of(false, refused(), at(i * 500)),
                None,
                "attempt {i}"
            );
        }
        assert_eq!(log.warn_of(false, refused(), at(60_000)), Some(120));
        // Another cause is warned of at once.
        let full = "feed connect: too many clients".to_owned();
        assert_eq!(log.warn_of(false, full.clone(), at(60_500)), Some(1));
        assert_eq!(log.warn_of(false, full.clone(), at(61_000)), None);
        // Live again, then lost: a new outage, warned of at once even for the same cause.
        assert_eq!(log.warn_of(true, full, at(62_000)), Some(1));
    }

    #[test]
    fn causes_taking_turns_or_ever_changing_are_warned_of_once_a_minute() {
        let mut log = super::OutageLog::default();
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + std::time::Duration::from_millis(ms);
        let causes = [
            "feed connect: connection refused",
            "feed connect: timed out",
        ];
        // Two causes in turn: each warned of when first met, then neither until the minute.
        assert_eq!(log.warn_of(false, causes[0].into(), at(0)), Some(1));
        assert_eq!(log.warn_of(false, causes[1].into(), at(500)), Some(1));
        for i in 2..120 {
            let cause = causes[i as usize % 2].to_owned();
            assert_eq!(log.warn_of(false, cause, at(i * 500)), None, "attempt {i}");
        }
        assert_eq!(log.warn_of(false, causes[0].into(), at(60_500)), Some(119));
        // A text that changes at every attempt: new reasons are warned of at once only up to
        // FEED_OUTAGE_REASONS per outage (the first 3.5 s), then once a minute (at 63.5 s).
        let mut log = super::OutageLog::default();
        let warned = (0..130u64)
            .filter(|i| {
                log.warn_of(false, format!("feed connect: port {i}"), at(i * 500))
                    .is_some()
            })
            .count();
        assert_eq!(warned, super::FEED_OUTAGE_REASONS + 1);
    }

    use super::*;

    #[test]
    fn an_idle_deaf_feed_asks_ever_less_often() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut echo = IdleDeafEcho::new(start, second);
        let asked_at: Vec<u64> = (0..200)
            .filter(|s| echo.due(start + second * *s))
            .map(u64::from)
            .collect();
        // 1, 2, 4, ... seconds apart, then once a minute.
        assert_eq!(asked_at, [0, 1, 3, 7, 15, 31, 63, 123, 183]);
    }

    #[test]
    fn echoes_are_recognised_by_instance_and_sequence() {
        let mut mine = Echo::new();
        let other = Echo::new();
        let (seq, payload) = mine.next_payload();
        let message = parse_message(&payload).unwrap();
        assert!(mine.is_answer(&message, seq));
        assert!(!mine.is_answer(&message, seq + 1));
        assert!(!other.is_answer(&message, seq));
        let (seq2, _) = mine.next_payload();
        assert_eq!(seq2, seq + 1);
        assert!(!mine.is_answer(&message, seq2));
        assert_eq!(parse_message("h|abcd|x"), None);
        assert_ne!(mine.channel(), other.channel());
        assert!(
            mine.channel()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        );
    }
}
