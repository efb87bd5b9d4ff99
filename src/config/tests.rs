use std::{path::Path, time::Duration};

use super::*;
use crate::auth::HashAlgorithm;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn empty_file_gives_documented_defaults() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.admin_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(c.knox.hash_algorithm, HashAlgorithm::Sha512);
    assert_eq!(c.knox.token_ttl, Some(Duration::from_secs(36_000)));
    assert_eq!(c.knox.token_limit_per_user, None);
    let limit = |v: &str| {
        Config::from_toml_str(&format!("[knox]\ntoken_limit_per_user = {v}"))
            .unwrap()
            .knox
            .token_limit_per_user
    };
    assert_eq!((limit("0"), limit("3")), (None, Some(3)), "0 is no limit");
    assert_eq!(c.redis.max_cache_ttl, Duration::from_secs(300));
    assert_eq!(c.redis.command_timeout, Duration::from_millis(250));
    assert_eq!(c.cache.consistency, Consistency::Notify);
    assert_eq!(c.verify.path, "/verify");
    assert_eq!(c.sessions.base_path, "/api/auth/");
}

#[test]
fn shipped_config_file_is_valid_and_matches_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/knoxgate.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let file: FileConfig = toml::from_str(&text).unwrap();
    // Every key the code knows is in the documented file, with the same default value.
    let shipped = toml::Table::try_from(&file).unwrap();
    let defaults = toml::Table::try_from(FileConfig::default()).unwrap();
    assert_eq!(shipped, defaults);
    let raw: toml::Table = toml::from_str(&text).unwrap();
    for (section, keys) in &defaults {
        for key in keys.as_table().unwrap().keys() {
            assert!(
                raw[section].as_table().unwrap().contains_key(key),
                "{section}.{key} undocumented"
            );
        }
    }
}

#[test]
fn an_empty_variable_turns_off_a_listener_the_file_turns_on() {
    // The Kubernetes sidecar shares the Deployment's ConfigMap (grpc_listen set) and must not
    // listen for gRPC on the pod IP.
    let file = "[server]\ngrpc_listen = \"0.0.0.0:9001\"\n";
    let on = Config::from_toml_and_env(file, env(&[])).unwrap();
    assert_eq!(on.server.grpc_listen.map(|a| a.port()), Some(9001));
    let off = Config::from_toml_and_env(file, env(&[("KNOXGATE_GRPC_LISTEN", "")])).unwrap();
    assert_eq!(off.server.grpc_listen, None);
}

#[test]
fn the_assertion_header_is_known_and_checked_with_assertions_off() {
    let c = Config::from_toml_str("").unwrap();
    assert!(c.assertion.signer.is_none());
    assert_eq!(c.assertion.header.as_str(), "x-auth-assertion");
    assert!(Config::from_toml_str("[assertion]\nheader = \"\"\n").is_err());
}

#[test]
fn password_hashers_are_djangos_defaults_and_checked() {
    let c = Config::from_toml_str("").unwrap();
    let s = &c.sessions;
    assert_eq!(
        s.password_hashers,
        [
            "pbkdf2_sha256",
            "pbkdf2_sha1",
            "argon2",
            "bcrypt_sha256",
            "scrypt"
        ]
    );
    let md5 = "md5$salt$0123456789abcdef0123456789abcdef";
    assert!(!s.accepts_hash(md5));
    assert!(s.accepts_hash(&crate::password::make_password("pw", 1000)));
    // pbkdf2_sha256 preferred: another iteration count is re-hashed, another algorithm too.
    assert!(s.rehashes(&crate::password::make_password("pw", 1000)));
    let argon2_first = Config::from_toml_and_env(
        "",
        env(&[(
            "KNOXGATE_SESSIONS_PASSWORD_HASHERS",
            "argon2, pbkdf2_sha256, md5",
        )]),
    )
    .unwrap();
    let s = &argon2_first.sessions;
    assert!(s.accepts_hash(md5));
    // knoxgate writes pbkdf2_sha256 only: with argon2 preferred it leaves re-hashing to Django.
    assert!(!s.rehashes(&crate::password::make_password("pw", 1000)));
    for bad in [
        "password_hashers = []",
        "password_hashers = [\"sha1\"]",
        "password_hashers = [\"argon2\", \"argon2\"]",
    ] {
        let err = Config::from_toml_str(&format!("[sessions]\n{bad}\n")).unwrap_err();
        assert!(
            err.to_string().contains("sessions.password_hashers"),
            "{err}"
        );
    }
}

#[test]
fn the_time_zone_is_djangos_default_and_checked() {
    use jiff::tz::TimeZone;
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.sessions.time_zone, TimeZone::UTC);
    let berlin =
        Config::from_toml_and_env("", env(&[("KNOXGATE_SESSIONS_TIME_ZONE", "Europe/Berlin")]))
            .unwrap();
    assert_eq!(berlin.sessions.time_zone.iana_name(), Some("Europe/Berlin"));
    for bad in ["", "Europe/Nowhere", "+01:00", "../../etc/passwd"] {
        let err =
            Config::from_toml_str(&format!("[sessions]\ntime_zone = \"{bad}\"\n")).unwrap_err();
        assert!(err.to_string().contains("sessions.time_zone"), "{err}");
    }
}

#[test]
fn the_expiry_format_is_knoxs_and_checked() {
    use crate::auth::ExpiryFormat;
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.knox.expiry_format, ExpiryFormat::Iso8601);
    let none =
        Config::from_toml_and_env("", env(&[("KNOXGATE_KNOX_EXPIRY_DATETIME_FORMAT", "none")]))
            .unwrap();
    assert_eq!(none.knox.expiry_format, ExpiryFormat::Unconverted);
    let err = Config::from_toml_str("[knox]\nexpiry_datetime_format = \"%c\"\n").unwrap_err();
    assert!(
        err.to_string().contains("knox.expiry_datetime_format"),
        "{err}"
    );
}

#[test]
fn env_overrides_file_and_works_without_file() {
    let c = Config::from_toml_and_env(
        "[server]\nlisten = \"127.0.0.1:1\"\n",
        env(&[
            ("KNOXGATE_LISTEN", "127.0.0.1:8081"),
            ("KNOXGATE_ADMIN_LISTEN", "127.0.0.1:9091"),
            ("KNOXGATE_POSTGRES_URL", "postgres://u@db:5432/app"),
            ("KNOXGATE_REDIS_URL", "redis://cache:6379/2"),
            ("KNOXGATE_KNOX_TOKEN_TTL", "none"),
            ("KNOXGATE_KNOX_AUTO_REFRESH", "true"),
            ("KNOXGATE_SESSIONS_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1"),
            ("KNOXGATE_CACHE_MEMORY_MAX_ENTRIES", "5"),
            ("KNOXGATE_CONFIG", "/ignored"),
            ("KNOXGATE_SERVICE_HOST", "10.0.0.1"),
            ("KNOXGATE_PORT", "tcp://10.0.0.1:8080"),
            ("KNOXGATE_PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("PATH", "/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9091");
    assert_eq!(c.postgres.url, "postgres://u@db:5432/app");
    assert_eq!(c.redis.url.as_deref(), Some("redis://cache:6379/2"));
    assert_eq!(c.knox.token_ttl, None);
    assert!(c.knox.auto_refresh);
    assert_eq!(c.sessions.trusted_proxies.len(), 2);
    assert_eq!(c.cache.memory_max_entries, 5);
}

#[test]
fn errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("[server]\nlisten = \"nowhere\"", "server.listen"),
        (
            "[server]\nrequest_timeout = \"5\"",
            "server.request_timeout",
        ),
        (
            "[server]\nrequest_timeout = \"5 parsecs\"",
            "server.request_timeout",
        ),
        (
            "[knox]\ntoken_prefix = \"elevenchars\"",
            "knox.token_prefix",
        ),
        ("[knox]\nhash_algorithm = \"md5\"", "knox.hash_algorithm"),
        ("[cache]\nconsistency = \"eventual\"", "cache.consistency"),
        (
            "[postgres]\ntoken_table = \"x; drop table y\"",
            "postgres.token_table",
        ),
        ("[postgres]\nurl = \"mysql://nope\"", "postgres.url"),
        ("[redis]\nurl = \"http://nope\"", "redis.url"),
        (
            "[verify]\nuser_id_header = \"bad header\"",
            "verify.user_id_header",
        ),
        ("[log]\nformat = \"xml\"", "log.format"),
        ("[sessions]\nhash_nice = 20", "sessions.hash_nice"),
        (
            "[server]\ndemote_after_refusals = 4294967296",
            "server.demote_after_refusals",
        ),
        ("[server]\ndemoted_threads = 1025", "server.demoted_threads"),
        ("[server]\nworker_threads = 1025", "server.worker_threads"),
        (
            "[server]\nhttp2_max_streams = 0",
            "server.http2_max_streams",
        ),
        (
            "[server]\nhttp2_max_streams = 65537",
            "server.http2_max_streams",
        ),
        (
            "[server]\nhttp2_ping_timeout = \"0s\"",
            "server.http2_ping_timeout",
        ),
        (
            "[sessions]\nmax_bcrypt_cost = 11",
            "sessions.max_bcrypt_cost",
        ),
        (
            "[sessions]\nmax_bcrypt_cost = 32",
            "sessions.max_bcrypt_cost",
        ),
        (
            "[sessions]\nmax_argon2_memory_kib = 102399",
            "sessions.max_argon2_memory_kib",
        ),
        (
            "[sessions]\nmax_argon2_memory_kib = 4194305",
            "sessions.max_argon2_memory_kib",
        ),
        (
            "[sessions]\nmax_argon2_work_kib = 1",
            "sessions.max_argon2_work_kib",
        ),
        (
            "[sessions]\nmax_scrypt_work = 655359",
            "sessions.max_scrypt_work",
        ),
        (
            "[sessions]\nmax_scrypt_memory_bytes = 16782335",
            "sessions.max_scrypt_memory_bytes",
        ),
        (
            "[sessions]\nmax_pbkdf2_iterations = 0",
            "sessions.max_pbkdf2_iterations",
        ),
        (
            "[sessions]\nmax_pbkdf2_iterations = 999999",
            "sessions.password_iterations",
        ),
    ];
    for (text, key) in cases {
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text:?} gave {err:?}");
    }
}

#[test]
fn unknown_keys_and_variables_fail() {
    let err = Config::from_toml_str("[server]\nlisen = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lisen"), "{err}");
    let err = Config::from_toml_str("[nosuch]\na = 1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nosuch"), "{err}");
    let err = Config::from_toml_and_env("", env(&[("KNOXGATE_REDIS_URLL", "x")])).unwrap_err();
    assert!(err.to_string().contains("KNOXGATE_REDIS_URLL"));
    let err =
        Config::from_toml_and_env("", env(&[("KNOXGATE_MAX_CONNECTIONS", "many")])).unwrap_err();
    assert!(err.to_string().contains("KNOXGATE_MAX_CONNECTIONS"));
}

#[test]
fn durations_need_units() {
    assert_eq!(
        parse_duration("k", "250ms").unwrap(),
        Duration::from_millis(250)
    );
    assert_eq!(
        parse_duration("k", "1.5s").unwrap(),
        Duration::from_millis(1500)
    );
    assert_eq!(
        parse_duration("k", "10h").unwrap(),
        Duration::from_secs(36000)
    );
    assert!(parse_duration("k", "10").is_err());
    assert!(parse_duration("k", "s").is_err());
}

#[test]
fn empty_redis_url_disables_redis() {
    let c = Config::from_toml_str("[redis]\nurl = \"\"").unwrap();
    assert!(c.redis.url.is_none());
}

#[test]
fn trusted_proxy_matching() {
    use std::net::IpAddr;
    let c =
        Config::from_toml_str("[sessions]\ntrusted_proxies = [\"10.1.0.0/16\", \"::1\"]").unwrap();
    let (net, host) = (c.sessions.trusted_proxies[0], c.sessions.trusted_proxies[1]);
    // As the client-address check does: v4-mapped v6 peers are matched as their v4 address.
    let contains =
        |net: ipnet::IpNet, ip: &str| net.contains(&ip.parse::<IpAddr>().unwrap().to_canonical());
    assert!(contains(net, "10.1.2.3"));
    assert!(!contains(net, "10.2.0.1"));
    assert!(contains(net, "::ffff:10.1.0.9"));
    let err = Config::from_toml_str("[sessions]\ntrusted_proxies = [\"10.0.0.0/33\"]").unwrap_err();
    assert!(
        err.to_string().contains("sessions.trusted_proxies"),
        "{err}"
    );
    assert!(contains(host, "::1"));
}

#[test]
fn redis_urls_for_tls_sentinel_and_cluster_are_accepted() {
    for url in [
        "redis://:secret@cache:6379/2",
        "rediss://cache.example.com:6380/0",
        "redis-sentinel://sentinel-1:26379/0?sentinelServiceName=mymaster&node=sentinel-2:26379",
        "redis-cluster://node-1:6379?node=node-2:6379&node=node-3:6379",
    ] {
        let c = Config::from_toml_str(&format!("[redis]\nurl = \"{url}\""));
        assert!(c.is_ok(), "{url}: {:?}", c.err());
    }
}

#[test]
fn a_duration_too_long_to_hold_is_an_error_naming_the_key() {
    let huge = "99999999999999999999999999d";
    assert!(parse_duration("k", huge).is_err());
    let err = Config::from_toml_str(&format!("[redis]\ncommand_timeout = \"{huge}\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis.command_timeout"), "{err}");
    let err = Config::from_toml_and_env("", env(&[("KNOXGATE_KNOX_TOKEN_TTL", huge)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("knox.token_ttl"), "{err}");
}

#[test]
fn a_duration_that_fits_but_would_overflow_a_clock_is_an_error() {
    // 10^13 days fits in a Duration, but now + it overflows Instant (a panic, rc 101).
    for huge in ["9999999999999d", "99999999999s"] {
        let err = Config::from_toml_and_env("", env(&[("KNOXGATE_IDLE_TIMEOUT", huge)]));
        assert!(err.is_err(), "{huge}");
    }
    let err = Config::from_toml_and_env("", env(&[("KNOXGATE_KNOX_TOKEN_TTL", "9999999999999d")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("knox.token_ttl") && err.contains("too long"),
        "{err}"
    );
    assert!(parse_duration("k", "36500d").is_ok());
}

#[test]
fn hash_queue_timeout_must_be_under_the_request_deadline() {
    let err = Config::from_toml_str(
        "[server]\nrequest_timeout = \"2s\"\n[sessions]\nhash_queue_timeout = \"5s\"",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("sessions.hash_queue_timeout") && err.contains("server.request_timeout"),
        "{err}"
    );
    assert!(
        Config::from_toml_str(
            "[server]\nrequest_timeout = \"2s\"\n[sessions]\nhash_queue_timeout = \"2s\""
        )
        .is_err()
    );
    // The defaults agree with each other.
    assert!(Config::from_toml_str("").is_ok());
}

#[test]
fn confirm_timeout_must_be_under_the_request_deadline_and_above_zero() {
    let base = "[server]\nrequest_timeout = \"2s\"\n[cache]\n";
    for bad in ["2s", "5s", "0s"] {
        let err = Config::from_toml_str(&format!("{base}confirm_timeout = \"{bad}\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.confirm_timeout"), "{bad}: {err}");
    }
    let ok = Config::from_toml_str(&format!("{base}confirm_timeout = \"1999ms\"")).unwrap();
    assert_eq!(ok.cache.confirm_timeout, Duration::from_millis(1999));
    let defaults = Config::from_toml_str("").unwrap();
    assert_eq!(defaults.cache.confirm_timeout, Duration::from_millis(250));
    assert_eq!(
        defaults.server.grpc_deadline_margin,
        Duration::from_millis(50)
    );
    // Zero answers at the caller's deadline, which the caller (whose clock started first)
    // reaches before knoxgate's answer does.
    for bad in ["0ms", "2s", "5s"] {
        let err = Config::from_toml_str(&format!(
            "[server]\nrequest_timeout = \"2s\"\ngrpc_deadline_margin = \"{bad}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.grpc_deadline_margin"), "{bad}: {err}");
    }
    let margin = Config::from_toml_str("[server]\ngrpc_deadline_margin = \"1ms\"").unwrap();
    assert_eq!(margin.server.grpc_deadline_margin, Duration::from_millis(1));
}

#[test]
fn zero_timeouts_are_refused() {
    for key in [
        "header_read_timeout",
        "idle_timeout",
        "request_timeout",
        "readiness_timeout",
    ] {
        let err = Config::from_toml_str(&format!("[server]\n{key} = \"0s\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("server.{key}")), "{err}");
    }
}

#[test]
fn a_header_cap_outside_its_range_is_refused() {
    // 4 GiB was accepted: every HTTP/2 request then failed (the cap did not fit HTTP/2's
    // 32-bit header-list limit) and HTTP/1 could buffer that much per connection.
    for bytes in [8_191u64, 1_048_577, 4_294_967_296] {
        let err = Config::from_toml_str(&format!("[server]\nmax_header_bytes = {bytes}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.max_header_bytes"), "{err}");
    }
    for bytes in [8_192u64, 1_048_576] {
        let c = Config::from_toml_str(&format!("[server]\nmax_header_bytes = {bytes}")).unwrap();
        assert_eq!(c.server.max_header_bytes as u64, bytes);
    }
}

#[test]
fn http2_streams_and_pings_are_settings() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.server.http2_max_streams, 256);
    assert_eq!(c.server.http2_ping_interval, Some(Duration::from_secs(30)));
    assert_eq!(c.server.http2_ping_timeout, Duration::from_secs(20));
    let c = Config::from_toml_str(
        "[server]\nhttp2_max_streams = 65536\nhttp2_ping_interval = \"0s\"\nhttp2_ping_timeout = \"1s\"",
    )
    .unwrap();
    assert_eq!(c.server.http2_max_streams, 65_536);
    assert_eq!(c.server.http2_ping_interval, None, "0s: no pings");
    assert_eq!(c.server.http2_ping_timeout, Duration::from_secs(1));
}

#[test]
fn a_grpc_message_cap_outside_its_range_is_refused() {
    // Any size was accepted: a cap of gigabytes let each call in flight buffer that much.
    for bytes in [8_191u64, 4_194_305, 1 << 40] {
        let err = Config::from_toml_str(&format!("[server]\ngrpc_max_message_bytes = {bytes}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.grpc_max_message_bytes"), "{err}");
    }
    for bytes in [8_192u64, 4_194_304] {
        let c =
            Config::from_toml_str(&format!("[server]\ngrpc_max_message_bytes = {bytes}")).unwrap();
        assert_eq!(c.server.grpc_max_message_bytes as u64, bytes);
    }
}

#[test]
fn zero_feed_and_connect_timings_are_refused() {
    // A zero health interval panicked the feed's task at its first connect; a zero echo
    // timeout made the feed deaf for ever; a zero reconnect delay spins through an outage.
    for (section, key) in [
        ("cache", "feed_health_interval"),
        ("cache", "feed_echo_timeout"),
        ("cache", "feed_reconnect_delay"),
        ("cache", "feed_retention"),
        ("postgres", "connect_timeout"),
    ] {
        let err = Config::from_toml_str(&format!("[{section}]\n{key} = \"0s\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{section}.{key}")), "{err}");
    }
}

#[test]
fn libpqs_verify_modes_point_to_require() {
    for mode in ["verify-full", "verify-ca"] {
        let err = Config::from_toml_str(&format!(
            "[postgres]\nurl = \"postgres://u@db/x?sslmode={mode}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslmode=require"), "{err}");
    }
    Config::from_toml_str("[postgres]\nurl = \"postgres://u@db/x?sslmode=require\"").unwrap();
}

#[test]
fn the_revocation_log_is_kept_as_long_as_the_replay_reads_it() {
    let err = Config::from_toml_str("[cache]\nfeed_retention = \"5m\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache.feed_retention"), "{err}");
    Config::from_toml_str("[cache]\nfeed_retention = \"6m\"").unwrap();
    Config::from_toml_str("[cache]\nfeed_retention = \"2m\"\n[redis]\nmax_cache_ttl = \"60s\"")
        .unwrap();
    // A relay back within the relay timeout replays over it too (the INSERTs it missed).
    let long_relay_timeout =
        "[redis]\nmax_cache_ttl = \"60s\"\n[cache]\nfeed_relay_timeout = \"5m\"";
    let c =
        Config::from_toml_str(&format!("{long_relay_timeout}\nfeed_retention = \"6m\"")).unwrap();
    assert_eq!(c.log_read_window(), Duration::from_secs(360));
    assert_eq!(c.replay_window(), Duration::from_secs(120));
    // INSERTs since a relay last heartbeated, plus a minute; at most the log read window, which
    // an unknown time gets.
    let quiet = |s| Some(Duration::from_secs(s));
    assert_eq!(c.insert_replay_window(quiet(2)), Duration::from_secs(62));
    assert_eq!(c.insert_replay_window(quiet(290)), Duration::from_secs(350));
    assert_eq!(
        c.insert_replay_window(quiet(3600)),
        Duration::from_secs(360)
    );
    assert_eq!(c.insert_replay_window(None), Duration::from_secs(360));
    let err = Config::from_toml_str(&format!("{long_relay_timeout}\nfeed_retention = \"5m\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache.feed_relay_timeout"), "{err}");
}

#[test]
fn a_missing_postgres_ca_file_is_a_config_error() {
    let err = Config::from_toml_str("[postgres]\nca_file = \"/nonexistent/ca.pem\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("postgres.ca_file"), "{err}");
}

#[test]
fn the_verify_path_is_written_without_a_trailing_slash() {
    let err = Config::from_toml_str("[verify]\npath = \"/verify/\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("verify.path") && err.contains("`/verify`"),
        "{err}"
    );
    let err = Config::from_toml_str("[verify]\npath = \"/\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("must not be `/`"), "{err}");
    let c = Config::from_toml_str("[verify]\npath = \"/auth/verify\"").unwrap();
    assert_eq!(c.verify.path, "/auth/verify");
}

#[test]
fn identity_headers_need_names_of_their_own() {
    let cases: &[(&str, &str)] = &[
        // A username sent under the user id's name would be taken for a user id.
        (
            "[verify]\nusername_header = \"x-auth-user-id\"",
            "verify.username_header",
        ),
        (
            "[verify]\nstaff_header = \"X-Flag\"\nsuperuser_header = \"x-flag\"",
            "verify.superuser_header",
        ),
        (
            "[verify]\ngroups_header = \"X-Auth-Assertion\"",
            "assertion.header",
        ),
        (
            "[assertion]\nheader = \"X-Auth-User-Id\"",
            "assertion.header",
        ),
        (
            "[verify]\nuser_id_header = \"Authorization\"",
            "verify.user_id_header",
        ),
        (
            "[verify]\nemail_header = \"Content-Length\"",
            "verify.email_header",
        ),
    ];
    for (text, key) in cases {
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text:?} gave {err:?}");
    }
}

#[test]
fn the_session_endpoints_cannot_sit_under_the_verify_path() {
    for (verify, base) in [("/api", "/api/auth/"), ("/auth", "/auth/")] {
        let err = Config::from_toml_str(&format!(
            "[verify]\npath = \"{verify}\"\n[sessions]\nbase_path = \"{base}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("sessions.base_path"), "{err}");
        // Without sessions there is nothing to hide.
        Config::from_toml_str(&format!(
            "[verify]\npath = \"{verify}\"\n[sessions]\nenabled = false\nbase_path = \"{base}\""
        ))
        .unwrap();
    }
    // Beside each other, or the verify path under the sessions': fine.
    Config::from_toml_str("[verify]\npath = \"/api/auth/verify\"").unwrap();
    Config::from_toml_str("[verify]\npath = \"/apiv\"\n[sessions]\nbase_path = \"/api/\"").unwrap();
}

#[test]
fn duration_errors_keep_their_messages() {
    let err = Config::from_toml_str("[server]\nrequest_timeout = \"5\"")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "config key `server.request_timeout`: `5` has no unit; write e.g. `5s` or `5ms`"
    );
}

#[test]
fn derived_deadlines_follow_their_timeouts() {
    let c = Config::from_toml_str(
        "[postgres]\nstatement_timeout = \"2s\"\nconnect_timeout = \"1s\"\n\
         [redis]\nunresponsive_timeout = \"20ms\"",
    )
    .unwrap();
    let pg = &c.postgres;
    assert_eq!(pg.query_deadline(), Duration::from_millis(2250));
    assert_eq!(pg.login_transaction_deadline(), Duration::from_millis(9000));
    assert_eq!(pg.idle_in_transaction_timeout(), Duration::from_secs(10));
    assert_eq!(pg.tcp_user_timeout(), Duration::from_secs(5));
    assert_eq!(pg.connect_and_query_deadline(), Duration::from_secs(3));
    assert_eq!(pg.feed_query_deadline(), Duration::from_secs(3));
    assert_eq!(pg.feed_bulk_deadline(), Duration::from_secs(15));
    assert_eq!(
        c.redis.unresponsive_check_interval(),
        Duration::from_millis(10)
    );
}

#[test]
fn zero_limits_are_refused() {
    for (text, key) in [
        ("[server]\nmax_in_flight = 0", "server.max_in_flight"),
        ("[postgres]\npool_size = 0", "postgres.pool_size"),
        (
            "[postgres]\nmax_lookup_batch = 0",
            "postgres.max_lookup_batch",
        ),
        ("[sessions]\nmax_body_bytes = 0", "sessions.max_body_bytes"),
        ("[sessions]\nmax_in_flight = 0", "sessions.max_in_flight"),
    ] {
        let err = Config::from_toml_str(text).unwrap_err().to_string();
        assert_eq!(err, format!("config key `{key}`: must be greater than 0"));
    }
}

#[test]
fn fleet_postgres_keys() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.postgres.pool_size.get(), 4);
    assert_eq!(c.postgres.idle_timeout, Duration::from_secs(30));
    // Unset: detected at startup; until then the plain way.
    assert!(!c.postgres.pgbouncer);
    assert!(c.postgres.detect_pgbouncer);
    assert_eq!(c.postgres.feed_url, c.postgres.url);
    assert_eq!(c.cache.feed_echo_timeout, Duration::from_secs(2));
    let c = Config::from_toml_str(
        "[postgres]\nurl = \"postgres://u@a:6432,b:6432/app?target_session_attrs=read-write\"\n\
         pgbouncer = true\nfeed_url = \"postgres://u@a:5432/app\"\n",
    )
    .unwrap();
    assert!(c.postgres.pgbouncer);
    assert!(!c.postgres.detect_pgbouncer);
    assert_eq!(c.postgres.feed_url, "postgres://u@a:5432/app");
    for (written, set) in [
        ("false", Some(false)),
        ("\"detect\"", None),
        ("\"true\"", Some(true)),
    ] {
        let c = Config::from_toml_str(&format!("[postgres]\npgbouncer = {written}\n")).unwrap();
        assert_eq!(
            (!c.postgres.detect_pgbouncer).then_some(c.postgres.pgbouncer),
            set,
            "{written}"
        );
    }
    let c = Config::from_toml_and_env("", env(&[("KNOXGATE_POSTGRES_PGBOUNCER", "true")])).unwrap();
    assert!(c.postgres.pgbouncer && !c.postgres.detect_pgbouncer);
    let err = Config::from_toml_str("[postgres]\npgbouncer = \"maybe\"\n").unwrap_err();
    assert!(err.to_string().contains("postgres.pgbouncer"), "{err}");
    let err = Config::from_toml_str("[postgres]\nfeed_url = \"nope://\"\n").unwrap_err();
    assert!(err.to_string().contains("postgres.feed_url"), "{err}");
}

#[test]
fn policy_keys_default_to_djangos_schema_and_need_naming_for_custom_models() {
    let c = Config::from_toml_str("").unwrap();
    let g = c.postgres.groups.as_ref().unwrap();
    assert!(g.is_default());
    assert_eq!(
        c.postgres.user_columns.is_staff.as_deref(),
        Some("is_staff")
    );
    assert!(c.verify.staff_header.is_none() && c.verify.groups_header.is_none());
    // A custom user table with the default M2M table would query the wrong table.
    let err = Config::from_toml_str("[postgres]\nuser_table = \"accounts_member\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("postgres.user_groups_table"), "{err}");
    let c = Config::from_toml_str(
        "[postgres]\nuser_table = \"accounts_member\"\nuser_groups_table = \
         \"accounts_member_groups\"\nuser_groups_user_column = \"member_id\"\n\
         is_staff_column = \"\"",
    )
    .unwrap();
    assert_eq!(
        c.postgres.groups.unwrap().user_column,
        "member_id".to_owned()
    );
    assert_eq!(c.postgres.user_columns.is_staff, None);
    let none = Config::from_toml_str("[postgres]\nuser_groups_table = \"\"").unwrap();
    assert!(none.postgres.groups.is_none());
    let err = Config::from_toml_str("[verify]\ngroups_header = \"bad header\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("verify.groups_header"), "{err}");
}

#[test]
fn feed_redis_without_redis_or_notify_is_refused() {
    let err = Config::from_toml_str("[redis]\nurl = \"\"\n[cache]\nfeed = \"redis\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache.feed") && err.contains("redis.url"),
        "{err}"
    );
    let err = Config::from_toml_str("[cache]\nfeed = \"redis\"\nconsistency = \"ttl\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache.feed") && err.contains("notify"),
        "{err}"
    );
    let err = Config::from_toml_str("[cache]\nfeed = \"pubsub\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache.feed"), "{err}");
    let err = Config::from_toml_str(
        "[cache]\nfeed_heartbeat_interval = \"2s\"\nfeed_relay_timeout = \"1s\"",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cache.feed_relay_timeout"), "{err}");
    let err = Config::from_toml_str("[cache]\nfeed_stream_max_len = 1023")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cache.feed_stream_max_len") && err.contains("1024"),
        "{err}"
    );
    let c = Config::from_toml_str("[cache]\nfeed_stream_max_len = 1024").unwrap();
    assert_eq!(c.cache.feed_stream_max_len, 1024);
}

#[test]
fn redis_entry_key_comes_from_the_environment_or_a_file() {
    let key = "0123456789abcdef0123456789abcdef";
    assert_eq!(Config::from_toml_str("").unwrap().redis.entry_key, None);
    let c = Config::from_toml_and_env("", env(&[("KNOXGATE_REDIS_ENTRY_KEY", key)])).unwrap();
    assert_eq!(c.redis.entry_key, Some(EntryKey::new(key.as_bytes())));
    assert!(!format!("{:?}", c.redis).contains(key), "never printed");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entry.key");
    std::fs::write(&path, format!("{key}\n")).unwrap();
    let file = format!("[redis]\nentry_key_file = \"{}\"", path.display());
    let c = Config::from_toml_str(&file).unwrap();
    assert_eq!(c.redis.entry_key, Some(EntryKey::new(key.as_bytes())));
    for (text, env_vars, named) in [
        (
            file.as_str(),
            vec![("KNOXGATE_REDIS_ENTRY_KEY", key)],
            "redis.entry_key",
        ),
        (
            "",
            vec![("KNOXGATE_REDIS_ENTRY_KEY", "short")],
            "redis.entry_key",
        ),
        (
            "[redis]\nentry_key_file = \"/nonexistent/entry.key\"",
            vec![],
            "redis.entry_key_file",
        ),
    ] {
        let err = Config::from_toml_and_env(text, env(&env_vars))
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{err}");
    }
    std::fs::write(&path, "  short \n").unwrap();
    let err = Config::from_toml_str(&file).unwrap_err().to_string();
    assert!(
        err.contains("redis.entry_key_file") && err.contains("32"),
        "{err}"
    );
}

#[test]
fn the_environment_is_read_without_panicking_on_foreign_bytes() {
    use std::{ffi::OsString, os::unix::ffi::OsStringExt};
    let bad = || OsString::from_vec(vec![b'a', 0xff, b'z']);
    let os = |s: &str| OsString::from(s);
    // Someone else's variable, whatever its bytes, is not read.
    let vars = env::utf8_vars([
        (os("PATH"), os("/bin")),
        (os("LC_WHATEVER"), bad()),
        (OsString::from_vec(vec![0xff, b'X']), os("x")),
        (os("KNOXGATE_CONFIG"), bad()),
        (os("KNOXGATE_LISTEN"), os("127.0.0.1:8081")),
    ])
    .unwrap();
    assert_eq!(vars, env(&[("KNOXGATE_LISTEN", "127.0.0.1:8081")]));
    // knoxgate's own: an error naming it.
    let err = env::utf8_vars([(os("KNOXGATE_REDIS_URL"), bad())])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("KNOXGATE_REDIS_URL") && err.contains("UTF-8"),
        "{err}"
    );
    let mut name = b"KNOXGATE_".to_vec();
    name.push(0xff);
    let err = env::utf8_vars([(OsString::from_vec(name), os("x"))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("KNOXGATE_") && err.contains("UTF-8"), "{err}");
}

#[test]
fn zero_redis_timeouts_and_reconnect_delays_are_refused() {
    // fred takes a zero timeout as none at all: a paused Redis held /verify until the request
    // deadline instead of falling back to Postgres.
    for key in [
        "command_timeout",
        "connect_timeout",
        "reconnect_max_delay",
        "unresponsive_timeout",
    ] {
        let err = Config::from_toml_str(&format!("[redis]\n{key} = \"0s\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("redis.{key}")), "{err}");
    }
    // The reconnect delay goes to fred in whole milliseconds.
    let err = Config::from_toml_str("[redis]\nreconnect_max_delay = \"0.5ms\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis.reconnect_max_delay"), "{err}");
    Config::from_toml_str("[redis]\nreconnect_max_delay = \"1ms\"\ncommand_timeout = \"1ms\"")
        .unwrap();
}

#[test]
fn a_statement_timeout_postgres_cannot_take_is_refused() {
    let c = Config::from_toml_str(&format!(
        "[postgres]\nstatement_timeout = \"{}ms\"",
        postgres::MAX_STATEMENT_TIMEOUT.as_millis()
    ))
    .unwrap();
    // Every millisecond setting sent to Postgres fits its int.
    let max = u128::from(i32::MAX as u32);
    assert!(c.postgres.feed_bulk_deadline().as_millis() <= max);
    assert!(c.postgres.idle_in_transaction_timeout().as_millis() <= max);
    for bad in [
        format!("{}ms", postgres::MAX_STATEMENT_TIMEOUT.as_millis() + 1),
        "5d".to_owned(),
        "0s".to_owned(),
        "0.5ms".to_owned(),
    ] {
        let err = Config::from_toml_str(&format!("[postgres]\nstatement_timeout = \"{bad}\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres.statement_timeout"), "{bad}: {err}");
    }
    let err = Config::from_toml_str("[postgres]\nstatement_timeout = \"5d\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("2147483647"), "{err}");
}

#[test]
fn a_zero_throttle_window_is_refused() {
    let err = Config::from_toml_str("[sessions]\nthrottle_window = \"0s\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sessions.throttle_window"), "{err}");
    // throttle_failures = 0 is the way to turn throttling off.
    Config::from_toml_str("[sessions]\nthrottle_failures = 0").unwrap();
}

#[test]
fn limits_beyond_what_serving_can_hold_are_refused() {
    let permits = server::MAX_PERMITS;
    let pg = postgres::MAX_POOL_SIZE;
    let redis = redis::MAX_POOL_SIZE;
    for (section, key, max) in [
        ("server", "max_in_flight", permits),
        ("server", "max_connections", permits),
        ("sessions", "max_in_flight", permits),
        ("postgres", "pool_size", pg),
        ("redis", "pool_size", redis),
        (
            "sessions",
            "hash_concurrency",
            sessions::MAX_HASH_CONCURRENCY,
        ),
    ] {
        let err = Config::from_toml_str(&format!("[{section}]\n{key} = {}", max + 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{section}.{key}")) && err.contains(&max.to_string()),
            "{err}"
        );
        Config::from_toml_str(&format!("[{section}]\n{key} = {max}")).unwrap();
    }
    let err = Config::from_toml_str("[postgres]\npool_size = 1000000000000")
        .unwrap_err()
        .to_string();
    assert!(err.contains("postgres.pool_size"), "{err}");
    // The largest accepted values are semaphores tokio can build.
    let c = Config::from_toml_str(&format!(
        "[server]\nmax_in_flight = {permits}\nmax_connections = {permits}"
    ))
    .unwrap();
    let _ = tokio::sync::Semaphore::new(c.server.max_in_flight.get());
    let _ = tokio::sync::Semaphore::new(c.server.max_connections.get());
}

#[test]
fn the_verify_path_cannot_be_a_session_endpoint() {
    for name in ["login", "logout", "logoutall"] {
        let err = Config::from_toml_str(&format!("[verify]\npath = \"/api/auth/{name}\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("verify.path"), "{name}: {err}");
        // Without sessions there is nothing to hide.
        Config::from_toml_str(&format!(
            "[verify]\npath = \"/api/auth/{name}\"\n[sessions]\nenabled = false"
        ))
        .unwrap();
    }
    // Neither a neighbour nor a path under an endpoint takes any session request
    // (`/api/auth/logout`, `/api/auth/logout/`, `/api/auth/logout//`).
    for ok in [
        "/api/auth/log",
        "/api/auth/logouts",
        "/api/auth/logout/x",
        "/api/authz",
    ] {
        Config::from_toml_str(&format!("[verify]\npath = \"{ok}\"")).unwrap();
    }
}

#[test]
fn paths_no_request_can_match_are_refused() {
    for (section, key) in [("verify", "path"), ("sessions", "base_path")] {
        for bad in [
            "/verify?x=1",
            "/a#b",
            "/a b",
            "/a\\tb",
            "/a\\u0001",
            "/a\\u00a0b",
        ] {
            let err = Config::from_toml_str(&format!("[{section}]\n{key} = \"{bad}\""))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("{section}.{key}")), "{bad}: {err}");
        }
    }
    Config::from_toml_str("[verify]\npath = \"/auth/vérify\"").unwrap();
}

#[test]
fn max_token_chars_must_admit_the_tokens_knox_issues() {
    // 64 hex characters and a 10-character prefix: 74.
    let knox = "[knox]\ntoken_prefix = \"abcdefghij\"\n";
    let err = Config::from_toml_str(&format!("{knox}[verify]\nmax_token_chars = 73"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("verify.max_token_chars") && err.contains("74"),
        "{err}"
    );
    Config::from_toml_str(&format!("{knox}[verify]\nmax_token_chars = 74")).unwrap();
    // An odd length rounds down, as knox does.
    Config::from_toml_str("[knox]\ntoken_character_length = 65\n[verify]\nmax_token_chars = 64")
        .unwrap();
    assert!(Config::from_toml_str("[verify]\nmax_token_chars = 63").is_err());
}

#[test]
fn a_token_prefix_verify_would_refuse_is_refused() {
    for bad in ["my app_", "app\\t", "app\\u0000", "a\\u3000b"] {
        let err = Config::from_toml_str(&format!("[knox]\ntoken_prefix = \"{bad}\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("knox.token_prefix"), "{bad}: {err}");
    }
    Config::from_toml_str("[knox]\ntoken_prefix = \"myapp_\"").unwrap();
}

#[test]
fn a_zero_token_ttl_is_refused_and_none_never_expires() {
    let err = Config::from_toml_str("[knox]\ntoken_ttl = \"0s\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("knox.token_ttl") && err.contains("none"),
        "{err}"
    );
    let c = Config::from_toml_str("[knox]\ntoken_ttl = \"none\"").unwrap();
    assert_eq!(c.knox.token_ttl, None);
}

#[test]
fn listeners_on_one_address_are_refused() {
    for (listen, admin) in [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "0.0.0.0:8080"),
        ("[::]:8080", "127.0.0.1:8080"),
    ] {
        let err = Config::from_toml_str(&format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\""
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.admin_listen"), "{err}");
    }
    let err = Config::from_toml_str("[server]\ngrpc_listen = \"0.0.0.0:9090\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.grpc_listen"), "{err}");
    // Port 0 picks a free port each time; other addresses or ports do not clash.
    for (listen, admin) in [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("[::1]:8080", "0.0.0.0:8080"),
        ("0.0.0.0:8080", "0.0.0.0:8081"),
    ] {
        Config::from_toml_str(&format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\""
        ))
        .unwrap();
    }
}

#[test]
fn a_groups_header_needs_groups_to_be_read() {
    let header = "[verify]\ngroups_header = \"X-Auth-User-Groups\"\n";
    let err = Config::from_toml_str(&format!("{header}[postgres]\nuser_groups_table = \"\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("verify.groups_header"), "{err}");
    assert!(Config::from_toml_str(header).is_ok());
    assert!(Config::from_toml_str("[postgres]\nuser_groups_table = \"\"").is_ok());
}
