//! The change feed through Redis, for fleets (`cache.feed = "redis"`).
//!
//! A few `knoxgate relay` processes hold the Postgres `LISTEN` connection ([`super::feed`]) and
//! append every change they hear, and every change they replay from the revocation log, to one
//! Redis stream; instances read the stream instead of listening themselves, so a fleet costs
//! Postgres one connection per relay instead of one per instance. Changes are idempotent
//! evictions, so two relays may publish the same one: no leader is needed.
//!
//! Nothing is lost across disconnects. A relay that cannot append fails its feed session, and the
//! reconnect replays the revocation log over the window in which anything could still be cached,
//! appending it again. Replication is asynchronous, so a failover can also lose entries Redis
//! acknowledged, and an instance whose last entry read survived would go on past the lost ones:
//! so every append (changes and heartbeats alike) is made, in one script, only if the stream
//! still holds the relay's previous one or lost it only to a trim (everything before it gone
//! too), and a relay whose previous append was lost starts a new session, replaying the log. No
//! instance whose last entry survived a loss is told that the stream is whole. INSERTs are in the
//! log too, so the replay also brings back the ones a gap missed (those since the stream's last
//! heartbeat: everything before it some relay heard and appended), and instances' key filters
//! learn them as they learn any other: a relay's restart costs the fleet no reload.
//!
//! An instance resumes from the last entry id it read; when that entry is no longer in the stream
//! (trimmed past it, or the stream lost with Redis), or a read that returned a full batch started
//! after it was trimmed, it may have missed changes, so it drops its in-process tier and reloads
//! its key filter (Redis entries are evicted by the relays themselves). A live relay appends a
//! heartbeat every `cache.feed_heartbeat_interval`; an instance counts its feed as live only
//! while it reads the stream and has read a heartbeat appended within `cache.feed_relay_timeout`
//! (by Redis's clock: one read late, after the process stood still, is as old as it is), and
//! confirms cached answers with Postgres otherwise.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface, LuaInterface, StreamsInterface},
    prelude::Options,
    types::{config::UnresponsiveConfig, streams::XReadResponse},
};
use tokio::{sync::watch, time::Instant};

use super::{Change, Store, StoreError, change, redis::fred_builder};
use crate::{config::Config, metrics::Metrics};

/// The field of a stream entry that carries its payload.
const FIELD: &str = "c";

/// Entries read at most per `XREAD`, and appended at most per call of the append script.
pub const READ_BATCH: u64 = 512;
// A read that follows trimmed entries is told by its full batch, and one relay's batch of appends
// never trims past a reader that is caught up (see `read_once`).
const _: () = assert!(crate::config::MIN_FEED_STREAM_MAX_LEN >= 2 * READ_BATCH);

/// The stream's key, under the configured Redis prefix.
pub fn stream_key(key_prefix: &str) -> String {
    format!("{key_prefix}:knoxgate:feed")
}

/// What a stream entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEntry {
    /// A change, in the triggers' payload format (see [`change::parse_payload`]).
    Change(Change),
    /// A relay's `b|<relay>|<seq>`: that relay's feed is live.
    Heartbeat,
    /// `l|<relay>|<seq>`, appended by relays of earlier versions when their feed became live on a
    /// new `LISTEN`: their triggers did not log INSERTs, so the replay could not bring back those
    /// a gap missed, and instances reload their key filters on it. Relays now replay INSERTs
    /// (the triggers log them) and append no such entry; it is still honoured during an upgrade.
    Listening,
}

/// Reads one entry's payload; `None` for anything unreadable.
pub fn parse_entry(payload: &str) -> Option<StreamEntry> {
    let relay_entry = |rest: &str, entry: StreamEntry| {
        let (relay, seq) = rest.split_once('|')?;
        (!relay.is_empty() && seq.parse::<u64>().is_ok()).then_some(entry)
    };
    if let Some(rest) = payload.strip_prefix("b|") {
        return relay_entry(rest, StreamEntry::Heartbeat);
    }
    if let Some(rest) = payload.strip_prefix("l|") {
        return relay_entry(rest, StreamEntry::Listening);
    }
    change::parse_payload(payload).map(StreamEntry::Change)
}

fn redis_error(what: &str, e: fred::error::Error) -> StoreError {
    StoreError::Unavailable(format!("feed stream {what}: {e}"))
}

/// A relay's writer: appends to the stream. Built by `knoxgate relay` only.
pub struct Publisher {
    client: Client,
    key: String,
    max_len: u64,
    relay: String,
    seq: AtomicU64,
    /// This relay's latest append (its id and payload), which the next append requires the
    /// stream to still hold; `None` at the start of a feed session.
    last_append: Mutex<Option<(String, String)>>,
}

/// Appends `ARGV[5..]` (as field `ARGV[4]`) to the stream `KEYS[1]`, trimmed to about `ARGV[3]`
/// entries, and returns the last new id; or appends nothing and returns nil when the relay's
/// previous append (id `ARGV[1]`, payload `ARGV[2]`; none when empty) was lost: its id holds
/// another payload (a new master reusing the id), or it is gone while an older entry survives
/// (a trim takes the oldest first) or with the whole stream. Gone with everything before it, it
/// was trimmed, which loses nothing: a reader that falls behind a trim tells by itself. One
/// script, so nothing can be lost between the check and the appends, and readers waiting on the
/// stream are woken once for all of them.
const APPEND_SCRIPT: &str = "\
local stream, prev = KEYS[1], ARGV[1] \
if prev ~= '' then \
  local found = redis.call('XRANGE', stream, prev, prev) \
  if #found == 0 then \
    if redis.call('XLEN', stream) == 0 \
      or #redis.call('XRANGE', stream, '-', prev, 'COUNT', 1) > 0 then return nil end \
  elseif found[1][2][2] ~= ARGV[2] then return nil end \
end \
local id \
for i = 5, #ARGV do \
  id = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[i]) \
end \
return id";

/// How long ago, by the Redis server's clock, a relay last heartbeated on the stream `KEYS[1]`
/// (an entry's id is the time it was appended), in milliseconds, looking through its newest
/// `ARGV[1]` entries (field `ARGV[2]`); -1 when none of them is a heartbeat (or an earlier
/// relay's `l|`, also appended only while it heard), or when the clock is behind the entry's
/// time (a failover to a node whose clock lags): then how long is unknown. A script, so that
/// the clock read is that of the node holding the stream.
const LAST_HEARTBEAT_SCRIPT: &str = "\
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', tonumber(ARGV[1])) \
for _, entry in ipairs(newest) do \
  local fields = entry[2] \
  for i = 1, #fields, 2 do \
    local kind = string.sub(fields[i + 1], 1, 2) \
    if fields[i] == ARGV[2] and (kind == 'b|' or kind == 'l|') then \
      local now = redis.call('TIME') \
      local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) \
      local appended_ms = tonumber(string.match(entry[1], '^(%d+)')) \
      if now_ms < appended_ms then return -1 end \
      return now_ms - appended_ms \
    end \
  end \
end \
return -1";

/// How many of the stream's newest entries [`Publisher::since_last_heartbeat`] looks through:
/// live relays heartbeat every `cache.feed_heartbeat_interval`, so only a burst of changes (or
/// a replay) can bury the last heartbeat deeper, and then the replay reads the longest window.
const HEARTBEAT_SEARCH_DEPTH: u64 = 2 * READ_BATCH;

impl Publisher {
    /// Builds the client and starts connecting in the background.
    pub fn connect(config: &Config) -> Result<Publisher, StoreError> {
        let url = config.redis.url.as_deref().ok_or_else(|| {
            StoreError::Unavailable("knoxgate relay needs redis.url to publish to".into())
        })?;
        let client = fred_builder(&config.redis, url)
            .and_then(|b| b.build().map_err(Into::into))
            .map_err(|e| StoreError::Unavailable(format!("feed stream client: {e:?}")))?;
        client.on_error(|(error, server)| {
            let server = server.map(|s| s.to_string()).unwrap_or_default();
            tracing::warn!(%error, %server, "relay: redis unavailable; changes are appended again once it is back");
            std::future::ready(Ok(()))
        });
        // The connection task runs on its own; its handle is not needed.
        drop(client.connect());
        let mut nonce = [0u8; 6];
        rand::fill(&mut nonce[..]);
        Ok(Publisher {
            client,
            key: stream_key(&config.redis.key_prefix),
            max_len: config.cache.feed_stream_max_len,
            relay: hex::encode(nonce),
            seq: Default::default(),
            last_append: Mutex::default(),
        })
    }

    /// How long ago a relay last heartbeated on the stream; `None` when that is unknown (no
    /// heartbeat among its newest entries: new, lost with Redis, or buried under a burst). A
    /// relay heartbeats only while it hears, after appending what it heard, so whatever was
    /// logged before a heartbeat is on the stream, and a relay that starts (or starts over)
    /// replays only the INSERTs since (see [`Config::insert_replay_window`]). Any other entry
    /// vouches for nothing: a replay cut short, or changes appended before the feed proved
    /// that it hears.
    pub async fn since_last_heartbeat(&self) -> Result<Option<Duration>, StoreError> {
        let ms: i64 = self
            .client
            .eval(
                LAST_HEARTBEAT_SCRIPT,
                vec![self.key.as_str()],
                vec![HEARTBEAT_SEARCH_DEPTH.to_string(), FIELD.to_owned()],
            )
            .await
            .map_err(|e| redis_error("last heartbeat", e))?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    /// Forgets the latest append, so that the next one is made whatever became of it: for a
    /// feed session's start, whose replay appends again whatever the stream may have lost.
    pub fn start_over(&self) {
        *self.last_append.lock().expect("last append lock") = None;
    }

    /// Appends one payload (a change as the triggers write it, or a relay's own entry).
    pub async fn publish(&self, payload: &str) -> Result<(), StoreError> {
        self.publish_all(&[payload]).await
    }

    /// Appends payloads in order, at once (see [`APPEND_SCRIPT`]); a fleet of readers keeps up
    /// with a burst of changes only if each of them is woken once for it. Fails, appending
    /// nothing, when the stream lost this relay's previous append: replication is
    /// asynchronous, so a failover can lose entries Redis acknowledged, and an instance whose
    /// last entry read survived would go on past them. The feed session then ends, and the
    /// next one replays the revocation log.
    pub async fn publish_all<S: AsRef<str>>(&self, payloads: &[S]) -> Result<(), StoreError> {
        let Some(last) = payloads.last() else {
            return Ok(());
        };
        let (previous_id, previous_payload) = self
            .last_append
            .lock()
            .expect("last append lock")
            .clone()
            .unwrap_or_default();
        let mut args = Vec::with_capacity(payloads.len() + 4);
        args.extend([
            previous_id,
            previous_payload,
            self.max_len.to_string(),
            FIELD.to_owned(),
        ]);
        args.extend(payloads.iter().map(|p| p.as_ref().to_owned()));
        let id: Option<String> = self
            .client
            .eval(APPEND_SCRIPT, vec![self.key.as_str()], args)
            .await
            .map_err(|e| redis_error("append", e))?;
        let Some(id) = id else {
            return Err(StoreError::Unavailable(
                "feed stream: the stream no longer holds this relay's last append (lost in a failover or a restart of redis); reconnecting to replay the revocation log".into(),
            ));
        };
        *self.last_append.lock().expect("last append lock") = Some((id, last.as_ref().to_owned()));
        Ok(())
    }

    /// Says on the stream that this relay's feed is live; like every append, only if the
    /// stream still holds what the relay appended before.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.publish(&format!("b|{}|{seq}", self.relay)).await
    }

    /// After a failed session: a connection fred still holds may be to a server that went
    /// silent (stopped, or a host gone without a reset while a replica is promoted), which fred
    /// does not notice by itself once commands have timed out; a new one finds the current
    /// master. Bounded by `within`.
    pub async fn reconnect_if_connected(&self, within: Duration) {
        reconnect_if_connected(&self.client, within).await;
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
}

/// Where an instance stands with the stream.
struct Reader {
    /// The last entry read; `None` before the first read on a fresh start.
    last_id: Option<String>,
    /// When the newest heartbeat read while caught up was appended (its age by Redis's
    /// clock, taken from now).
    heartbeat_at: Option<Instant>,
    /// When the last read returned caught up (fewer entries than asked for) on the current
    /// connection. Shortly after that, nothing can have been trimmed past `last_id`, so the next
    /// read goes on from it without asking whether it is still there; after a longer pause (the
    /// process stalled), a read behind, a failed read or any reconnection (the stream may have
    /// been lost with Redis) it asks first. Saves each of a fleet's readers a round trip per
    /// change.
    caught_up_at: Option<Instant>,
    /// The client's reconnections (fred reconnects on its own, possibly between two reads).
    reconnections: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
}

impl Reader {
    /// Whether the next read may go on from `last_id` without checking that the stream still
    /// holds it: caught up within `window`, and no reconnection since.
    fn positioned(&mut self, now: Instant, window: Duration) -> bool {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match self.reconnections.try_recv() {
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                // A reconnection (or so many that some were dropped).
                Ok(_) | Err(TryRecvError::Lagged(_)) => self.caught_up_at = None,
            }
        }
        self.caught_up_at
            .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    fn live(&self, now: Instant, timeout: Duration) -> bool {
        self.heartbeat_at
            .is_some_and(|at| now.saturating_duration_since(at) < timeout)
    }
}

/// An instance's reader: follows the stream until `shutdown` flips to true, reconnecting after
/// every failure, and keeps the store's feed state (read by `/readyz` and `knoxgate_feed_connected`).
pub async fn subscribe(
    store: Arc<Store>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(url) = config.redis.url.as_deref() else {
        return; // refused by config validation
    };
    // A blocking XREAD must not count as an unresponsive server; the command timeout below
    // bounds each read instead.
    let client = match fred_builder(&config.redis, url).and_then(|mut b| {
        b.with_connection_config(|c| c.unresponsive = UnresponsiveConfig::default());
        b.build().map_err(Into::into)
    }) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = ?e, "change feed: cannot build the redis stream client");
            return;
        }
    };
    drop(client.connect());
    let key = stream_key(&config.redis.key_prefix);
    let block = config.cache.feed_heartbeat_interval;
    let options = Options {
        timeout: Some(block + config.redis.command_timeout + config.redis.connect_timeout),
        max_attempts: Some(1),
        ..Default::default()
    };
    let mut reader = Reader {
        last_id: None,
        heartbeat_at: None,
        caught_up_at: None,
        reconnections: client.reconnect_rx(),
    };
    let mut was_live = false;
    let mut failing = false;
    loop {
        let result = tokio::select! {
            r = read_once(&client, &options, &key, block, &store, &metrics, &mut reader) => r,
            _ = shutdown.changed() => break,
        };
        match result {
            Ok(()) => {
                if failing {
                    tracing::info!("change feed: reading the redis stream again");
                    failing = false;
                }
            }
            Err(e) => {
                // Nothing heard meanwhile can be trusted as heard: confirm with Postgres.
                reader.heartbeat_at = None;
                reader.caught_up_at = None;
                if !failing {
                    tracing::warn!(error = %e, "change feed: cannot read the redis stream; confirming cached answers with postgres until it is back");
                    failing = true;
                }
            }
        }
        let live = reader.live(Instant::now(), config.cache.feed_relay_timeout);
        if live != was_live {
            if live {
                tracing::info!("change feed live (redis stream, relays heard)");
            } else if !failing {
                tracing::warn!(
                    timeout = ?config.cache.feed_relay_timeout,
                    "change feed: no relay heartbeat within cache.feed_relay_timeout (is `knoxgate relay` running?); confirming cached answers with postgres"
                );
            }
            was_live = live;
        }
        // Live until the heartbeat ages past the timeout, even while the next read is still
        // blocked on the stream (up to a heartbeat interval, longer if Redis hangs).
        let timeout = config.cache.feed_relay_timeout;
        store.set_feed_live_until(reader.heartbeat_at.map(|at| at + timeout));
        store.set_feed_live(live);
        if failing {
            // fred times a command out on the caller's side only: the connection stays, later
            // commands queue behind the read still waiting on it, and with unresponsive
            // detection off (above) nothing notices a server that went silent (stopped, or a
            // host gone without a reset while a replica is promoted). A failure on a
            // connection fred still holds therefore starts a new one, which finds the current
            // master; only now, once the feed is no longer counted live (above).
            let reconnect = async {
                reconnect_if_connected(&client, config.redis.connect_timeout).await;
                tokio::time::sleep(config.cache.feed_reconnect_delay).await;
            };
            tokio::select! {
                _ = reconnect => {}
                _ = shutdown.changed() => break,
            }
        }
    }
    store.set_feed_live(false);
    let _ = client.quit().await;
}

/// One step: positions the reader if it is not (resuming, or dropping the in-process tier when
/// it cannot), then reads and applies the next batch.
async fn read_once(
    client: &Client,
    options: &Options,
    key: &str,
    block: Duration,
    store: &Store,
    metrics: &Metrics,
    reader: &mut Reader,
) -> Result<(), StoreError> {
    let client = client.with_options(options);
    let positioned = reader.positioned(Instant::now(), block);
    let from = match reader.last_id.clone() {
        Some(id) if positioned => id,
        // Nothing read yet, from a stream that was empty: no entry to look for, and what was
        // appended since may have been trimmed. Nothing to warn about either.
        Some(id) if id == STREAM_START => start_at_end(&client, key, store, reader).await?,
        Some(id) => {
            // Resume only if the entry last read is still there: otherwise entries after it
            // may have been trimmed unread, or the stream is a new one.
            if holds(&client, key, &id).await? {
                id
            } else {
                lose_position(&client, key, store, reader, &id).await?
            }
        }
        // A fresh start: nothing is cached yet, so only what comes next matters, and which
        // Redis entries the recent changes make doubtful.
        None => start_at_end(&client, key, store, reader).await?,
    };
    let block_ms = block.as_millis().min(u128::from(u64::MAX)) as u64;
    let reply: fred::types::Value = client
        .xread(Some(READ_BATCH), Some(block_ms), key, from.as_str())
        .await
        .map_err(|e| redis_error("read", e))?;
    // Nothing appended within `block`: a nil reply, which fred's map conversion refuses.
    let entries = if reply.is_null() {
        Vec::new()
    } else {
        let streams: XReadResponse<String, String, String, String> = reply
            .into_xread_response()
            .map_err(|e| redis_error("read", e))?;
        streams.into_values().next().unwrap_or_default()
    };
    let caught_up = (entries.len() as u64) < READ_BATCH;
    // A read returns what follows `from`, whether or not `from` is still there. A burst of
    // appends during the read (or since the check above) can trim past it: then this batch
    // starts after a gap. The stream always keeps at least `cache.feed_stream_max_len` entries,
    // two batches or more, so only a full batch can follow one, and `from` goes only once more
    // entries than that came after it: almost always a gap. A full batch from an empty
    // stream's start cannot be checked, so it counts as one (a new stream, so it is rare).
    if !caught_up && from == STREAM_START {
        tracing::warn!(
            "change feed: a full batch from the start of a new redis stream, trimmed meanwhile or not; dropping the in-process cache"
        );
        start_at_end(&client, key, store, reader).await?;
        reader.caught_up_at = None;
        return Ok(());
    }
    if !caught_up && !holds(&client, key, &from).await? {
        lose_position(&client, key, store, reader, &from).await?;
        reader.caught_up_at = None;
        return Ok(());
    }
    // The batch's changes are applied together (a run of removals walks the in-process tier
    // once: `Store::apply_all`), and only then does a heartbeat in it count.
    let mut changes = Vec::new();
    let mut heartbeat = None;
    let mut reload_key_filter = false;
    let mut last_id = None;
    for (id, fields) in entries {
        match fields.get(FIELD).and_then(|p| parse_entry(p)) {
            Some(StreamEntry::Change(change)) => changes.push(change),
            Some(StreamEntry::Heartbeat) => heartbeat = Some(id.clone()),
            Some(StreamEntry::Listening) => {
                tracing::info!(%id, "change feed: a relay of an earlier version says INSERTs may be missing from the stream; reloading the token key filter");
                reload_key_filter = true;
            }
            None => tracing::warn!(%id, "unreadable change-feed stream entry ignored"),
        }
        last_id = Some(id);
    }
    store.apply_all_relayed(&changes).await;
    for change in &changes {
        metrics.feed_event_applied(change::kind_label(change));
    }
    if reload_key_filter {
        store.reload_key_filter();
    }
    if let Some(id) = heartbeat.filter(|_| caught_up) {
        // As old as its id says, by Redis's clock: a heartbeat read late (this process stood
        // still, or its reads failed, while the relays died) must not vouch for the time since.
        let age = age_on_redis(&client, &id).await?;
        let heard = Instant::now().checked_sub(age);
        reader.heartbeat_at = reader.heartbeat_at.max(heard);
    }
    if last_id.is_some() {
        reader.last_id = last_id;
    }
    reader.caught_up_at = caught_up.then(Instant::now);
    Ok(())
}

/// How long ago, by Redis's clock, stream entry `id` was appended: an entry id begins with the
/// milliseconds of Redis's clock when it was added. Zero for an id ahead of the clock (Redis
/// keeps ids increasing when its clock steps back).
async fn age_on_redis(
    client: &fred::clients::WithOptions<Client>,
    id: &str,
) -> Result<Duration, StoreError> {
    let appended_ms = id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse::<u64>().ok())
        .ok_or_else(|| StoreError::Unavailable(format!("feed stream entry id {id:?}")))?;
    let time: Vec<String> = client
        .custom(fred::cmd!("TIME"), Vec::<String>::new())
        .await
        .map_err(|e| redis_error("clock read", e))?;
    let now_ms = match time.as_slice() {
        [secs, micros] => secs
            .parse::<u64>()
            .ok()
            .zip(micros.parse::<u64>().ok())
            .map(|(secs, micros)| secs * 1000 + micros / 1000),
        _ => None,
    }
    .ok_or_else(|| StoreError::Unavailable(format!("redis TIME answered {time:?}")))?;
    Ok(Duration::from_millis(now_ms.saturating_sub(appended_ms)))
}

/// Starts a new connection for `client` if fred still counts it as connected (see
/// [`Publisher::reconnect_if_connected`] and [`subscribe`]), waiting at most `within`.
async fn reconnect_if_connected(client: &Client, within: Duration) {
    if client.is_connected() {
        let _ = tokio::time::timeout(within, client.force_reconnection()).await;
    }
}

/// Whether the stream still holds entry `id`.
async fn holds(
    client: &fred::clients::WithOptions<Client>,
    key: &str,
    id: &str,
) -> Result<bool, StoreError> {
    let found: Vec<(String, Vec<(String, String)>)> = client
        .xrange(key, id, id, Some(1))
        .await
        .map_err(|e| redis_error("check", e))?;
    Ok(!found.is_empty())
}

/// The stream no longer holds `last_id`: entries after it may be gone unread (trimmed, or the
/// stream lost with Redis). Starts again at the end, as a fresh start does.
async fn lose_position(
    client: &fred::clients::WithOptions<Client>,
    key: &str,
    store: &Store,
    reader: &mut Reader,
    last_id: &str,
) -> Result<String, StoreError> {
    tracing::warn!(%last_id, "change feed: the redis stream no longer holds the last entry read (trimmed or lost); dropping the in-process cache");
    start_at_end(client, key, store, reader).await
}

/// Positions the reader at the stream's end with nothing kept from before: drops the
/// in-process tier and recalls what the stream says about the tombstone horizon. Returns the
/// end, where reading goes on.
async fn start_at_end(
    client: &fred::clients::WithOptions<Client>,
    key: &str,
    store: &Store,
    reader: &mut Reader,
) -> Result<String, StoreError> {
    // The end first: what is appended meanwhile is read next, not skipped.
    let end = stream_end(client, key).await?;
    store.apply(&Change::Everything).await;
    reader.heartbeat_at = None;
    recall_recent(client, key, store, &end).await?;
    reader.last_id = Some(end.clone());
    Ok(end)
}

/// Reads back the stream's changes of the tombstone horizon (`redis.max_cache_ttl` and
/// slack) as tombstones, as an instance on its own feed does from its replay of the
/// revocation log. A Redis entry can outlive the relays' DEL (a fill that raced the
/// revocation, a DEL still queued while Redis refused writes); running instances know from
/// their tombstones to confirm it with Postgres, and one that starts (or loses its place)
/// now must know it too. When the stream does not reach back over the horizon (new, trimmed
/// or lost), no entry written before now is trusted until the horizon has passed.
///
/// `end` is the stream's newest entry, where reading goes on from: its id is Redis's clock
/// (a relay heartbeats every second), so no local clock skew enters the horizon.
async fn recall_recent(
    client: &fred::clients::WithOptions<Client>,
    key: &str,
    store: &Store,
    end: &str,
) -> Result<(), StoreError> {
    let horizon = store.tombstones.horizon();
    let Some(end_ms) = id_millis(end).filter(|ms| *ms > 0) else {
        // An empty stream says nothing of what came before.
        store.apply_relayed(&Change::Truncated).await;
        return Ok(());
    };
    let since_ms = end_ms.saturating_sub(horizon.as_millis());
    let oldest: Vec<(String, Vec<(String, String)>)> = client
        .xrange(key, "-", "+", Some(1))
        .await
        .map_err(|e| redis_error("recall", e))?;
    let reaches_back = oldest
        .first()
        .and_then(|(id, _)| id_millis(id))
        .is_some_and(|oldest_ms| oldest_ms <= since_ms);
    if !reaches_back {
        store.apply_relayed(&Change::Truncated).await;
        return Ok(());
    }
    let mut from = since_ms.to_string();
    let mut recalled = 0usize;
    loop {
        let entries: Vec<(String, HashMap<String, String>)> = client
            .xrange(key, from.as_str(), end, Some(READ_BATCH))
            .await
            .map_err(|e| redis_error("recall", e))?;
        let full = entries.len() as u64 == READ_BATCH;
        let mut changes = Vec::new();
        for (id, fields) in entries {
            if let Some(StreamEntry::Change(change)) =
                fields.get(FIELD).and_then(|p| parse_entry(p))
            {
                changes.push(change);
            }
            from = format!("({id}");
        }
        store.apply_all_relayed(&changes).await;
        recalled += changes.len();
        if !full {
            break;
        }
    }
    tracing::debug!(
        recalled,
        "change feed: recent changes recalled from the redis stream"
    );
    Ok(())
}

/// The milliseconds part of a stream entry id (`<ms>-<seq>`).
fn id_millis(id: &str) -> Option<u128> {
    id.split('-').next()?.parse().ok()
}

/// Where reading starts on an empty (or absent) stream: before any entry.
const STREAM_START: &str = "0-0";

/// The id of the stream's newest entry, or [`STREAM_START`] when it is empty or absent.
async fn stream_end(
    client: &fred::clients::WithOptions<Client>,
    key: &str,
) -> Result<String, StoreError> {
    let newest: Vec<(String, Vec<(String, String)>)> = client
        .xrevrange(key, "+", "-", Some(1))
        .await
        .map_err(|e| redis_error("end", e))?;
    Ok(newest
        .into_iter()
        .next()
        .map_or_else(|| STREAM_START.to_owned(), |(id, _)| id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_changes_or_heartbeats() {
        assert_eq!(
            parse_entry("t|12|abc"),
            Some(StreamEntry::Change(Change::Token {
                token_key: "abc".into(),
                user_id: "12".into()
            }))
        );
        assert_eq!(
            parse_entry("u|7|"),
            Some(StreamEntry::Change(Change::User {
                user_id: "7".into()
            }))
        );
        assert_eq!(parse_entry("b|a1b2c3|42"), Some(StreamEntry::Heartbeat));
        assert_eq!(parse_entry("b||42"), None);
        assert_eq!(parse_entry("b|a1|x"), None);
        assert_eq!(parse_entry("l|a1b2c3|43"), Some(StreamEntry::Listening));
        assert_eq!(parse_entry("l||43"), None);
        assert_eq!(parse_entry("l|a1"), None);
        assert_eq!(
            parse_entry("h|a1|1"),
            None,
            "a feed's self-test is never relayed"
        );
        assert_eq!(parse_entry(""), None);
    }

    #[test]
    fn the_stream_lives_under_the_prefix() {
        assert_eq!(stream_key("knox"), "knox:knoxgate:feed");
    }

    fn reader() -> (
        Reader,
        tokio::sync::broadcast::Sender<fred::types::config::Server>,
    ) {
        let (reconnected, reconnections) = tokio::sync::broadcast::channel(4);
        let reader = Reader {
            last_id: Some("1-0".into()),
            heartbeat_at: None,
            caught_up_at: None,
            reconnections,
        };
        (reader, reconnected)
    }

    #[tokio::test(start_paused = true)]
    async fn the_position_is_checked_again_after_a_pause_or_a_reconnection() {
        let window = Duration::from_secs(1);
        let (mut r, reconnected) = reader();
        assert!(!r.positioned(Instant::now(), window), "never checked");
        r.caught_up_at = Some(Instant::now());
        assert!(r.positioned(Instant::now(), window));
        tokio::time::advance(window).await;
        assert!(
            !r.positioned(Instant::now(), window),
            "a pause: trimmed meanwhile?"
        );
        r.caught_up_at = Some(Instant::now());
        reconnected
            .send(fred::types::config::Server::new("127.0.0.1", 6379))
            .unwrap();
        assert!(
            !r.positioned(Instant::now(), window),
            "a new connection: a new Redis?"
        );
        r.caught_up_at = Some(Instant::now());
        assert!(
            r.positioned(Instant::now(), window),
            "the reconnection was taken into account"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn live_only_within_the_relay_timeout_of_a_heartbeat() {
        let timeout = Duration::from_secs(3);
        let mut r = reader().0;
        assert!(!r.live(Instant::now(), timeout), "no heartbeat yet");
        r.heartbeat_at = Some(Instant::now());
        tokio::time::advance(Duration::from_millis(2999)).await;
        assert!(r.live(Instant::now(), timeout));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!r.live(Instant::now(), timeout));
    }
}
