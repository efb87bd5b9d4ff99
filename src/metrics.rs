//! Prometheus metrics: one struct of typed families, registered once and shared.
//!
//! Labels are bounded enums (tier, result, outcome, reason, route); never tokens, user ids or
//! paths. Each enum's exported text is written once, where the enum is declared.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::auth::DenyReason;

/// Declares a label-value enum with the text each variant exports.
macro_rules! label_value {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The exported text.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_value! {
    /// A tier of the token store.
    pub enum Tier {
        Memory = "memory",
        Redis = "redis",
        Postgres = "postgres",
        /// The filter of existing token keys (`store::known_keys`): a refusal without asking.
        KeyFilter = "key_filter",
    }
}

label_value! {
    /// What a tier said about a key.
    pub enum LookupResult {
        Hit = "hit",
        /// The key is known to hold no token.
        NegativeHit = "negative_hit",
        Miss = "miss",
        Error = "error",
    }
}

label_value! {
    /// How a `/verify` request ended.
    pub enum VerifyOutcome { Allow = "allow", Deny = "deny", Error = "error" }
}

label_value! {
    /// Which endpoint of the main listener a request was for.
    pub enum Route {
        Verify = "verify",
        Login = "login",
        Logout = "logout",
        LogoutAll = "logoutall",
        NotFound = "not_found",
        /// Envoy ext_authz over gRPC (`Authorization/Check`), by the HTTP status it stands for.
        GrpcCheck = "grpc_check",
    }
}

label_value! {
    /// A listener of the server.
    pub enum Listener { Main = "main", Grpc = "grpc", Admin = "admin" }
}

label_value! {
    /// What a listener did with a new connection that found its connection cap full.
    pub enum AtCap {
        /// Made room by closing the oldest connection yet to send a request (on the admin
        /// port, else the one idle the longest).
        Evicted = "evicted",
        /// Closed the new one: no open connection could be evicted.
        Refused = "refused",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabels {
    pub listener: Listener,
    pub action: AtCap,
}

/// Why a `/verify` request ended as it did.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    /// A valid token of an active user.
    Valid,
    /// A CORS pre-flight, answered without a token.
    CorsPreflight,
    /// No knox credentials on an `anonymous=allow` route.
    Anonymous,
    /// A valid token whose user the route's policy does not admit (403).
    Forbidden,
    Denied(DenyReason),
    /// A failure, by `error::Error::label`.
    Failed(&'static str),
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let text = match self {
            Reason::Valid => "valid",
            Reason::CorsPreflight => "cors_preflight",
            Reason::Anonymous => "anonymous",
            Reason::Forbidden => "forbidden",
            Reason::Denied(d) => d.label(),
            Reason::Failed(label) => label,
        };
        std::fmt::Write::write_str(encoder, text)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: Tier,
    pub result: LookupResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: VerifyOutcome,
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Route,
    /// The status class: 2xx, 4xx, 5xx.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatementLabels {
    pub statement: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlgorithmLabels {
    pub algorithm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Every metric knoxgate exports.
pub struct Metrics {
    registry: Registry,
    /// Cache lookups by tier (memory, redis) and result (hit, miss, negative_hit).
    pub cache_lookups: Family<TierLabels, Counter>,
    /// `/verify` answers by outcome (allow, deny, error) and reason.
    pub verify_outcomes: Family<OutcomeLabels, Counter>,
    /// Every answer of the main listener, by route and status class (counted in one place,
    /// `http::main_service`).
    pub requests: Family<RequestLabels, Counter>,
    /// `/verify` latency, from request head to response.
    pub verify_duration: Histogram,
    /// SQL statements sent, by statement.
    pub sql_statements: Family<StatementLabels, Counter>,
    /// Postgres failures by kind (timeout, unavailable, query).
    pub postgres_errors: Family<KindLabels, Counter>,
    /// Redis commands sent, by operation.
    pub redis_commands: Family<OpLabels, Counter>,
    /// Redis failures (disconnected, timeout, error), by operation.
    pub redis_errors: Family<OpLabels, Counter>,
    /// Answers served from cache while Postgres could not be reached (stale-if-error).
    pub stale_answers: Counter,
    /// Concurrent cache misses that waited for another request's lookup instead of querying.
    pub coalesced_misses: Counter,
    /// Postgres lookups of other keys that joined a lookup waiting for a connection and were
    /// answered by its query (`store::lookup_batch`).
    pub batched_lookups: Counter,
    /// Login attempts by result.
    pub logins: Family<ResultLabels, Counter>,
    /// Logouts by kind (logout, logoutall).
    pub logouts: Family<KindLabels, Counter>,
    /// Time spent checking a password hash.
    pub password_check_duration: Histogram,
    /// Stored password hashes refused unchecked for asking more work than a `sessions.max_*`
    /// cap allows, by algorithm: users who cannot log in until the cap is raised.
    pub password_hashes_over_cap: Family<AlgorithmLabels, Counter>,
    /// `/verify` requests and gRPC checks refused with 503 because `server.max_in_flight` was
    /// reached.
    pub load_shed: Counter,
    /// Login, logout and logoutall requests refused with 503 because `sessions.max_in_flight`
    /// was reached (apart: a flood of slow logins is not a capacity problem of `/verify`).
    pub sessions_load_shed: Counter,
    /// New connections that found a listener's connection cap full, by what was done.
    pub connections_at_cap: Family<CapLabels, Counter>,
    /// HTTP/1 connections moved to the demoted lane after `server.demote_after_refusals`
    /// answers of 401 in a row.
    pub connections_demoted: Counter,
    /// Demoted connections let go (told to close) after as many answers in a row that were not
    /// 401: their clients reconnect on the main threads.
    pub connections_released: Counter,
    /// Identity assertions signed (`[assertion]`); hot tokens reuse theirs, so this grows far
    /// slower than allowed answers.
    pub assertions_signed: Counter,
    /// 1 while the change-feed listener is connected and caught up.
    pub feed_connected: Gauge,
    /// Change-feed events applied, by kind (token, user, insert).
    pub feed_events: Family<KindLabels, Counter>,
    /// When the last change-feed event was applied to this instance's caches, in seconds since
    /// the Unix epoch; 0 before the first. Subtracting a change's commit time gives how long it
    /// took to reach this instance (how `bench/scale.sh` times a revocation across a fleet).
    pub feed_last_change: Gauge<f64, AtomicU64>,
    /// 1 while Redis is connected.
    pub redis_connected: Gauge,
    /// Entries in the in-process cache (sampled at scrape).
    pub memory_entries: Gauge,
    /// Worker threads of the runtime that serves the listeners (`server.worker_threads`; set
    /// when the admin listener starts).
    pub runtime_worker_threads: Gauge,
    /// Keys in the filter of existing token keys; 0 while none is current (sampled at scrape).
    pub key_filter_keys: Gauge,
    /// Bytes of that filter (sampled at scrape).
    pub key_filter_bytes: Gauge,
    /// Loads of that filter completed: one each time the feed becomes live, a relay starts
    /// listening again, or the filter outgrows its size. Each reads every token key.
    pub key_filter_loads: Counter,
    /// Pre-resolved series of the two labels every hot request bumps, so the hot path skips
    /// the family's map lookup.
    memory_hits: Counter,
    allowed: Counter,
    verify_2xx: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("knoxgate");
        let m = Metrics {
            cache_lookups: Family::default(),
            verify_outcomes: Family::default(),
            requests: Family::default(),
            // 50 µs … ~1.6 s
            verify_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16),
            ),
            sql_statements: Family::default(),
            postgres_errors: Family::default(),
            redis_commands: Family::default(),
            redis_errors: Family::default(),
            stale_answers: Counter::default(),
            coalesced_misses: Counter::default(),
            batched_lookups: Counter::default(),
            logins: Family::default(),
            logouts: Family::default(),
            password_check_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 10),
            ),
            password_hashes_over_cap: Family::default(),
            load_shed: Counter::default(),
            sessions_load_shed: Counter::default(),
            connections_at_cap: Family::default(),
            connections_demoted: Counter::default(),
            connections_released: Counter::default(),
            assertions_signed: Counter::default(),
            feed_connected: Gauge::default(),
            feed_events: Family::default(),
            feed_last_change: Gauge::default(),
            redis_connected: Gauge::default(),
            memory_entries: Gauge::default(),
            runtime_worker_threads: Gauge::default(),
            key_filter_keys: Gauge::default(),
            key_filter_bytes: Gauge::default(),
            key_filter_loads: Counter::default(),
            memory_hits: Counter::default(),
            allowed: Counter::default(),
            verify_2xx: Counter::default(),
            registry: Registry::default(),
        };
        let memory_hits = m
            .cache_lookups
            .get_or_create(&TierLabels {
                tier: Tier::Memory,
                result: LookupResult::Hit,
            })
            .clone();
        // Every kind exported from the start, at 0, so rates and alerts see the series before the
        // first failure.
        for kind in ["timeout", "unavailable", "query"] {
            m.postgres_errors
                .get_or_create(&KindLabels { kind })
                .inc_by(0);
        }
        let allowed = m
            .verify_outcomes
            .get_or_create(&OutcomeLabels {
                outcome: VerifyOutcome::Allow,
                reason: Reason::Valid,
            })
            .clone();
        registry.register(
            "cache_lookups",
            "Cache lookups by tier and result",
            m.cache_lookups.clone(),
        );
        registry.register(
            "verify",
            "/verify answers by outcome and reason",
            m.verify_outcomes.clone(),
        );
        registry.register(
            "requests",
            "Answers of the main listener by route and status class",
            m.requests.clone(),
        );
        registry.register(
            "verify_duration_seconds",
            "/verify latency in seconds",
            m.verify_duration.clone(),
        );
        registry.register(
            "sql_statements",
            "SQL statements sent to Postgres",
            m.sql_statements.clone(),
        );
        registry.register(
            "postgres_errors",
            "Postgres failures by kind (timeout, unavailable, query)",
            m.postgres_errors.clone(),
        );
        registry.register(
            "redis_commands",
            "Redis commands sent",
            m.redis_commands.clone(),
        );
        registry.register("redis_errors", "Redis failures", m.redis_errors.clone());
        registry.register(
            "stale_answers",
            "Answers served from cache while Postgres was unreachable",
            m.stale_answers.clone(),
        );
        registry.register(
            "coalesced_misses",
            "Cache misses that shared another request's lookup",
            m.coalesced_misses.clone(),
        );
        registry.register(
            "batched_lookups",
            "Postgres lookups answered by another lookup's query, sent while they waited",
            m.batched_lookups.clone(),
        );
        registry.register("logins", "Login attempts by result", m.logins.clone());
        registry.register("logouts", "Logouts by kind", m.logouts.clone());
        registry.register(
            "password_check_duration_seconds",
            "Time to check a password hash",
            m.password_check_duration.clone(),
        );
        registry.register(
            "password_hashes_over_cap",
            "Stored password hashes refused unchecked for exceeding a sessions.max_* cost cap",
            m.password_hashes_over_cap.clone(),
        );
        registry.register(
            "load_shed",
            "Verify requests and gRPC checks refused because server.max_in_flight was reached",
            m.load_shed.clone(),
        );
        registry.register(
            "sessions_load_shed",
            "Login and logout requests refused because sessions.max_in_flight was reached",
            m.sessions_load_shed.clone(),
        );
        registry.register(
            "connections_at_cap",
            "New connections that found a listener's connection cap full: the oldest connection \
             yet to send a request evicted to make room, or the new one closed",
            m.connections_at_cap.clone(),
        );
        registry.register(
            "connections_demoted",
            "Connections moved to the low-priority lane after answers of 401 in a row",
            m.connections_demoted.clone(),
        );
        registry.register(
            "connections_released",
            "Demoted connections told to close after as many answers in a row that were not 401",
            m.connections_released.clone(),
        );
        registry.register(
            "assertions_signed",
            "Identity assertions signed (a cached token reuses its own until it nears expiry)",
            m.assertions_signed.clone(),
        );
        registry.register(
            "feed_connected",
            "1 while the Postgres change feed is connected and caught up",
            m.feed_connected.clone(),
        );
        registry.register(
            "feed_events",
            "Change-feed events applied",
            m.feed_events.clone(),
        );
        registry.register(
            "feed_last_change_timestamp_seconds",
            "When the last change-feed event was applied here (Unix time, seconds)",
            m.feed_last_change.clone(),
        );
        registry.register(
            "redis_connected",
            "1 while Redis is connected",
            m.redis_connected.clone(),
        );
        registry.register(
            "memory_cache_entries",
            "Entries in the in-process cache",
            m.memory_entries.clone(),
        );
        registry.register(
            "runtime_worker_threads",
            "Worker threads of the runtime that serves the listeners",
            m.runtime_worker_threads.clone(),
        );
        registry.register(
            "key_filter_keys",
            "Token keys in the filter of existing keys; 0 while it is not current",
            m.key_filter_keys.clone(),
        );
        registry.register(
            "key_filter_bytes",
            "Bytes of the filter of existing token keys",
            m.key_filter_bytes.clone(),
        );
        registry.register(
            "key_filter_loads",
            "Loads of the filter of existing token keys completed (each reads every token key)",
            m.key_filter_loads.clone(),
        );
        let verify_2xx = m
            .requests
            .get_or_create(&RequestLabels {
                route: Route::Verify,
                status: "2xx",
            })
            .clone();
        Metrics {
            registry,
            memory_hits,
            allowed,
            verify_2xx,
            ..m
        }
    }

    /// The registry in Prometheus text format (0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a change-feed event of this kind and stamps when it was applied.
    pub fn feed_event_applied(&self, kind: &'static str) {
        self.feed_events.get_or_create(&KindLabels { kind }).inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.feed_last_change.set(now.as_secs_f64());
    }

    pub fn sql(&self, statement: &'static str) {
        self.sql_statements
            .get_or_create(&StatementLabels { statement })
            .inc();
    }

    pub fn postgres_error(&self, kind: &'static str) {
        self.postgres_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn redis_command(&self, op: &'static str) {
        self.redis_commands.get_or_create(&OpLabels { op }).inc();
    }

    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.get_or_create(&OpLabels { op }).inc();
    }

    pub fn lookup(&self, tier: Tier, result: LookupResult) {
        if (tier, result) == (Tier::Memory, LookupResult::Hit) {
            self.memory_hits.inc();
        } else {
            self.cache_lookups
                .get_or_create(&TierLabels { tier, result })
                .inc();
        }
    }

    /// Counts a `/verify` answer.
    pub fn verify_outcome(&self, outcome: VerifyOutcome, reason: Reason) {
        if (outcome, reason) == (VerifyOutcome::Allow, Reason::Valid) {
            self.allowed.inc();
        } else {
            self.verify_outcomes
                .get_or_create(&OutcomeLabels { outcome, reason })
                .inc();
        }
    }

    /// Counts one answer of the main listener.
    pub fn request(&self, route: Route, status: hyper::StatusCode) {
        if route == Route::Verify && status.is_success() {
            // The hot path's series, resolved once.
            self.verify_2xx.inc();
            return;
        }
        let status = match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    /// The exported label texts are the ones dashboards and alerts query.
    #[test]
    fn typed_labels_export_their_text() {
        let m = Metrics::new();
        m.lookup(Tier::Redis, LookupResult::NegativeHit);
        m.verify_outcome(
            VerifyOutcome::Deny,
            Reason::Denied(DenyReason::InvalidToken),
        );
        m.verify_outcome(VerifyOutcome::Error, Reason::Failed("deadline_exceeded"));
        m.request(Route::LogoutAll, hyper::StatusCode::NO_CONTENT);
        m.request(Route::Verify, hyper::StatusCode::OK);
        m.postgres_error("too_many");
        let text = m.encode();
        for line in [
            r#"knoxgate_cache_lookups_total{tier="redis",result="negative_hit"} 1"#,
            r#"knoxgate_cache_lookups_total{tier="memory",result="hit"} 0"#,
            r#"knoxgate_verify_total{outcome="deny",reason="invalid_token"} 1"#,
            r#"knoxgate_verify_total{outcome="error",reason="deadline_exceeded"} 1"#,
            r#"knoxgate_verify_total{outcome="allow",reason="valid"} 0"#,
            r#"knoxgate_requests_total{route="logoutall",status="2xx"} 1"#,
            r#"knoxgate_requests_total{route="verify",status="2xx"} 1"#,
            r#"knoxgate_postgres_errors_total{kind="too_many"} 1"#,
            r#"knoxgate_postgres_errors_total{kind="timeout"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
