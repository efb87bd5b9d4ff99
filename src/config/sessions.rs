//! `[sessions]`: the login, logout and logoutall endpoints: password hashing, its thread pool,
//! the failed-login throttle and the proxies believed about client addresses.

use std::{net::IpAddr, num::NonZeroUsize, time::Duration};

use ipnet::IpNet;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::password::{self, CostCaps};

use super::{
    ConfigError,
    value::{self, at_most, invalid, nonzero, nonzero_at_most, path_prefix, positive},
};

const DEFAULT_BASE_PATH: &str = "/api/auth/";
// Django 5.2's default for pbkdf2_sha256, so hashes knoxgate writes are ones Django would write.
const DEFAULT_PASSWORD_ITERATIONS: u64 = 1_000_000;
// Below server.request_timeout (2 s) with room for the ~0.1 s check itself.
const DEFAULT_HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
// With two hashing threads beside /verify at 5,000 requests/s on 2 cores, nice +10 took the
// /verify p99 from 2.38 ms to 1.26 ms (README, bench/LOGIN.md): logins yield the core.
const DEFAULT_HASH_NICE: u64 = 10;
const DEFAULT_MAX_BODY_BYTES: u64 = 8_192;
// Far above what the hashing threads get through in a request's time (a few per core), so it
// only stops clients that hold requests open (slow bodies), apart from /verify's own cap.
const DEFAULT_MAX_IN_FLIGHT: u64 = 256;
const DEFAULT_THROTTLE_FAILURES: u64 = 10;
const DEFAULT_THROTTLE_USER_FAILURES: u64 = 50;
const DEFAULT_THROTTLE_WINDOW: Duration = Duration::from_secs(5 * 60);
// Django's default TIME_ZONE in a new project (startproject's settings.py).
const DEFAULT_TIME_ZONE: &str = "UTC";

/// Most memory a cap may allow one hash (scrypt, Argon2): each hashing thread may take it.
const MAX_HASH_MEMORY_BYTES: u64 = 4 << 30;
/// bcrypt's own largest cost.
const MAX_BCRYPT_COST: u64 = 31;

/// Largest `sessions.hash_concurrency`: each slot is a thread started up front.
pub const MAX_HASH_CONCURRENCY: u64 = 1_024;

/// Django 5.2's default `PASSWORD_HASHERS`, by algorithm name, preferred first. `bcrypt` and
/// `md5` are not among them: Django refuses their hashes unless a site lists them.
const DJANGO_DEFAULT_HASHERS: [&str; 5] = [
    "pbkdf2_sha256",
    "pbkdf2_sha1",
    "argon2",
    "bcrypt_sha256",
    "scrypt",
];

/// `[sessions]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsFile {
    pub enabled: bool,
    pub base_path: String,
    pub password_iterations: u64,
    pub password_hashers: Vec<String>,
    pub hash_concurrency: u64,
    #[serde(with = "value::duration")]
    pub hash_queue_timeout: Duration,
    pub hash_nice: u64,
    pub max_body_bytes: u64,
    pub max_in_flight: u64,
    pub throttle_failures: u64,
    pub throttle_user_failures: u64,
    pub throttle_address_failures: u64,
    #[serde(with = "value::duration")]
    pub throttle_window: Duration,
    pub trusted_proxies: Vec<String>,
    pub trust_x_real_ip: bool,
    pub time_zone: String,
    pub max_pbkdf2_iterations: u64,
    pub max_bcrypt_cost: u64,
    pub max_scrypt_work: u64,
    pub max_scrypt_memory_bytes: u64,
    pub max_argon2_memory_kib: u64,
    pub max_argon2_work_kib: u64,
}

impl Default for SessionsFile {
    fn default() -> Self {
        Self {
            enabled: true,
            base_path: DEFAULT_BASE_PATH.into(),
            password_iterations: DEFAULT_PASSWORD_ITERATIONS,
            password_hashers: DJANGO_DEFAULT_HASHERS.map(String::from).to_vec(),
            hash_concurrency: 0,
            hash_queue_timeout: DEFAULT_HASH_QUEUE_TIMEOUT,
            hash_nice: DEFAULT_HASH_NICE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            throttle_failures: DEFAULT_THROTTLE_FAILURES,
            throttle_user_failures: DEFAULT_THROTTLE_USER_FAILURES,
            throttle_address_failures: 0,
            throttle_window: DEFAULT_THROTTLE_WINDOW,
            trusted_proxies: Vec::new(),
            trust_x_real_ip: false,
            time_zone: DEFAULT_TIME_ZONE.into(),
            max_pbkdf2_iterations: u64::from(password::MAX_PBKDF2_ITERATIONS),
            max_bcrypt_cost: u64::from(password::MAX_BCRYPT_COST),
            max_scrypt_work: password::MAX_SCRYPT_WORK,
            max_scrypt_memory_bytes: password::MAX_SCRYPT_MEMORY_BYTES,
            max_argon2_memory_kib: u64::from(password::MAX_ARGON2_MEMORY_KIB),
            max_argon2_work_kib: password::MAX_ARGON2_WORK_KIB,
        }
    }
}

/// The session endpoints and what logging in costs and allows.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// Serve login/, logout/ and logoutall/ at all.
    pub enabled: bool,
    /// Where the endpoints live; always ends with `/`.
    pub base_path: String,
    /// pbkdf2_sha256 iterations of the hashes knoxgate writes.
    pub password_iterations: u32,
    /// The algorithms of the site's `PASSWORD_HASHERS`, preferred first: a stored hash of any
    /// other is refused as Django refuses it. knoxgate re-hashes on login only when the
    /// preferred one is `pbkdf2_sha256`, the one it writes; otherwise Django's own logins do.
    pub password_hashers: Vec<&'static str>,
    /// Password checks at once; 0: see [`SessionsConfig::hash_slots`].
    pub hash_concurrency: usize,
    /// How long a login may wait for a hashing slot before it gets 503; less than
    /// `server.request_timeout`.
    pub hash_queue_timeout: Duration,
    /// Added to the nice value of the password-hashing threads (0–19).
    pub hash_nice: i32,
    /// Largest login request body accepted.
    pub max_body_bytes: NonZeroUsize,
    /// Login, logout and logoutall requests at once, beyond which they get 503: their own cap,
    /// so that clients holding session requests open cannot take `/verify`'s
    /// (`server.max_in_flight`).
    pub max_in_flight: NonZeroUsize,
    /// Failed logins per (client address, username) within `throttle_window` before 429;
    /// 0 disables the throttle.
    pub throttle_failures: u32,
    /// Failed logins per username, from any address, within `throttle_window` before 429;
    /// 0 disables this counter alone.
    pub throttle_user_failures: u32,
    /// Failed logins per client address, for any username, within `throttle_window` before
    /// 429; 0 (the default) disables this counter alone.
    pub throttle_address_failures: u32,
    /// The window `throttle_failures` counts over.
    pub throttle_window: Duration,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` is believed about the client address.
    pub trusted_proxies: Vec<IpNet>,
    /// Believe `X-Real-IP` from a trusted proxy when `X-Forwarded-For` names no client.
    pub trust_x_real_ip: bool,
    /// Django's `TIME_ZONE`: the login response shows the token's expiry in it, as DRF does.
    pub time_zone: TimeZone,
    /// The most work a stored hash may ask for; one over them is refused unchecked, logged
    /// and counted (`knoxgate_password_hashes_over_cap_total`).
    pub hash_cost_caps: CostCaps,
}

impl SessionsConfig {
    /// Whether the site accepts hashes of `encoded`'s algorithm.
    pub fn accepts_hash(&self, encoded: &str) -> bool {
        password::algorithm_of(encoded).is_some_and(|a| self.password_hashers.contains(&a))
    }

    /// Whether a login with `encoded` re-hashes it: as Django's rule, and only when the hash
    /// knoxgate writes (`pbkdf2_sha256`) is the site's preferred one.
    pub fn rehashes(&self, encoded: &str) -> bool {
        self.password_hashers.first() == Some(&"pbkdf2_sha256")
            && password::must_update(encoded, self.password_iterations)
    }

    /// Password checks allowed at once: `hash_concurrency`, or with 0 one core fewer than the
    /// machine has (at least 1), so that logins always leave a core to `/verify`.
    pub fn hash_slots(&self) -> usize {
        if self.hash_concurrency > 0 {
            return self.hash_concurrency;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    }
}

/// The `sessions.max_*` caps. None may be below what the timing dummy of any hasher asks for
/// (Django's default costs; `password_iterations` for PBKDF2, checked with it): a site
/// preferring that hasher would then answer unknown users without the work a check costs.
fn hash_cost_caps(file: &SessionsFile) -> Result<CostCaps, ConfigError> {
    let within = |key: &str, n: u64, least: u64, most: u64| {
        if (least..=most).contains(&n) {
            Ok(n)
        } else {
            Err(invalid(
                key,
                format!("must be between {least} (Django's default cost) and {most}"),
            ))
        }
    };
    let dummy = password::DJANGO_DEFAULT_COSTS;
    Ok(CostCaps {
        pbkdf2_iterations: u32::try_from(file.max_pbkdf2_iterations)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                invalid(
                    "sessions.max_pbkdf2_iterations",
                    "must be between 1 and 4294967295",
                )
            })?,
        bcrypt_cost: within(
            "sessions.max_bcrypt_cost",
            file.max_bcrypt_cost,
            u64::from(dummy.bcrypt_cost),
            MAX_BCRYPT_COST,
        )? as u32,
        scrypt_work: within(
            "sessions.max_scrypt_work",
            file.max_scrypt_work,
            dummy.scrypt_work,
            u64::MAX,
        )?,
        scrypt_memory_bytes: within(
            "sessions.max_scrypt_memory_bytes",
            file.max_scrypt_memory_bytes,
            dummy.scrypt_memory_bytes,
            MAX_HASH_MEMORY_BYTES,
        )?,
        argon2_memory_kib: within(
            "sessions.max_argon2_memory_kib",
            file.max_argon2_memory_kib,
            u64::from(dummy.argon2_memory_kib),
            MAX_HASH_MEMORY_BYTES / 1024,
        )? as u32,
        argon2_work_kib: within(
            "sessions.max_argon2_work_kib",
            file.max_argon2_work_kib,
            dummy.argon2_work_kib,
            u64::MAX,
        )?,
    })
}

/// An address (one host) or a CIDR network.
fn trusted_proxy(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl TryFrom<SessionsFile> for SessionsConfig {
    type Error = ConfigError;

    fn try_from(file: SessionsFile) -> Result<Self, ConfigError> {
        let trusted_proxies = file
            .trusted_proxies
            .iter()
            .map(|s| {
                trusted_proxy(s).ok_or_else(|| {
                    invalid(
                        "sessions.trusted_proxies",
                        format!("`{s}` is not an address or CIDR"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SessionsConfig {
            enabled: file.enabled,
            base_path: {
                let p = path_prefix("sessions.base_path", &file.base_path)?;
                if p.ends_with('/') { p } else { format!("{p}/") }
            },
            password_iterations: {
                let n = nonzero("sessions.password_iterations", file.password_iterations)?.get();
                // Above the verifier's cap our own hashes (and the timing dummy) would not verify.
                if n as u64 > file.max_pbkdf2_iterations {
                    return Err(invalid(
                        "sessions.password_iterations",
                        format!(
                            "at most sessions.max_pbkdf2_iterations ({})",
                            file.max_pbkdf2_iterations
                        ),
                    ));
                }
                n as u32
            },
            hash_cost_caps: hash_cost_caps(&file)?,
            password_hashers: {
                let mut names: Vec<&'static str> = Vec::new();
                for name in &file.password_hashers {
                    let Some(known) = password::ALGORITHMS.iter().find(|a| **a == name.trim())
                    else {
                        return Err(invalid(
                            "sessions.password_hashers",
                            format!("`{name}` is not one of {}", password::ALGORITHMS.join(", ")),
                        ));
                    };
                    if names.contains(known) {
                        return Err(invalid(
                            "sessions.password_hashers",
                            format!("`{name}` is listed twice"),
                        ));
                    }
                    names.push(known);
                }
                if names.is_empty() {
                    return Err(invalid(
                        "sessions.password_hashers",
                        "must name at least one algorithm",
                    ));
                }
                names
            },
            // One thread per slot is started up front: more than this many cores is a typo.
            hash_concurrency: at_most(
                "sessions.hash_concurrency",
                file.hash_concurrency,
                MAX_HASH_CONCURRENCY,
            )? as usize,
            hash_queue_timeout: file.hash_queue_timeout,
            hash_nice: match file.hash_nice {
                n @ 0..=19 => n as i32,
                _ => {
                    return Err(invalid(
                        "sessions.hash_nice",
                        "a nice increment from 0 to 19",
                    ));
                }
            },
            max_body_bytes: nonzero("sessions.max_body_bytes", file.max_body_bytes)?,
            max_in_flight: nonzero_at_most(
                "sessions.max_in_flight",
                file.max_in_flight,
                super::server::MAX_PERMITS,
            )?,
            throttle_failures: u32::try_from(file.throttle_failures)
                .map_err(|_| invalid("sessions.throttle_failures", "too large"))?,
            throttle_user_failures: u32::try_from(file.throttle_user_failures)
                .map_err(|_| invalid("sessions.throttle_user_failures", "too large"))?,
            throttle_address_failures: u32::try_from(file.throttle_address_failures)
                .map_err(|_| invalid("sessions.throttle_address_failures", "too large"))?,
            // A zero window would count nothing and so throttle nothing, silently;
            // throttle_failures = 0 is the way to turn the throttle off.
            throttle_window: positive("sessions.throttle_window", file.throttle_window)?,
            trusted_proxies,
            trust_x_real_ip: file.trust_x_real_ip,
            time_zone: time_zone(&file.time_zone)?,
        })
    }
}

/// A `TIME_ZONE` name: an IANA zone such as `Europe/Berlin`, looked up in the system's time zone
/// database (`/usr/share/zoneinfo`, as Python's `zoneinfo` does) or, on a system without one,
/// in the copy built in.
fn time_zone(name: &str) -> Result<TimeZone, ConfigError> {
    let name = name.trim();
    if name == DEFAULT_TIME_ZONE {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|e| {
        invalid(
            "sessions.time_zone",
            format!("`{name}` is not a time zone name (as Django's TIME_ZONE, e.g. `Europe/Berlin`): {e}"),
        )
    })
}
