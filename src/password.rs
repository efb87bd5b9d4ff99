//! Django password hashes: verify every hasher Django 5.2/6.0 ships, and make `pbkdf2_sha256` hashes.
//!
//! knoxgate's login path reads `auth_user.password` and must accept exactly what Django's
//! `django.contrib.auth.hashers.check_password` accepts, then write back hashes Django can read.
//! The formats (split on `$`) are:
//!
//! | algorithm | stored string |
//! | --- | --- |
//! | `pbkdf2_sha256` | `pbkdf2_sha256$<iterations>$<salt>$<b64 PBKDF2-HMAC-SHA256, 32 bytes>` |
//! | `pbkdf2_sha1` | `pbkdf2_sha1$<iterations>$<salt>$<b64 PBKDF2-HMAC-SHA1, 20 bytes>` |
//! | `argon2` | `argon2` + argon2-cffi's PHC string, e.g. `argon2$argon2id$v=19$m=102400,t=2,p=8$<salt>$<hash>` |
//! | `bcrypt_sha256` | `bcrypt_sha256$` + bcrypt over the lowercase hex of SHA-256(password) |
//! | `bcrypt` | `bcrypt$` + bcrypt over the password itself |
//! | `scrypt` | `scrypt$<N>$<salt>$<r>$<p>$<b64 scrypt, 64 bytes>` |
//! | `md5` | `md5$<salt>$<hex MD5(salt + password)>` |
//!
//! Like Django, verification re-derives the hash with the stored parameters and compares in
//! constant time; for the `$`-separated formats the whole re-encoded string is compared, so a
//! non-canonical string (leading zeros, missing base64 padding) fails as it does in Django.
//! Passwords are hashed as their UTF-8 bytes with no Unicode normalisation.
//!
//! Where Django would raise instead of answering (malformed strings, empty salts, bcrypt
//! passwords over 72 bytes), [`check_password`] answers `false`. It never panics, whatever the
//! database holds. A stored string's cost parameters are also checked against caps
//! ([`CostCaps`], the `sessions.max_*` settings; the `MAX_*` constants by default) before any
//! work starts, so one poisoned row cannot pin a core or allocate gigabytes.
//!
//! Every function that derives a hash is deliberately slow (about 0.1 s for `pbkdf2_sha256` at
//! 1M iterations, up to a few seconds at the caps). Run it off the async runtime, behind a
//! concurrency limit.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

#[cfg(test)]
mod tests;

/// Django 5.2's default iteration count for `pbkdf2_sha256` (and `pbkdf2_sha1`).
pub const DJANGO_DEFAULT_PBKDF2_ITERATIONS: u32 = 1_000_000;

/// Django 6.0's default iteration count for `pbkdf2_sha256`; a 6.0 site re-hashes 5.2 hashes
/// to this on the next successful login.
pub const DJANGO_6_0_PBKDF2_ITERATIONS: u32 = 1_200_000;

/// Django's `UNUSABLE_PASSWORD_PREFIX`: a stored value starting with it never verifies.
pub const UNUSABLE_PASSWORD_PREFIX: &str = "!";

/// Every algorithm [`check_password`] understands, as Django names them (the text before the
/// first `$`). [`algorithm_of`] only ever returns one of these, so they suit metric labels.
pub const ALGORITHMS: [&str; 7] = [
    "pbkdf2_sha256",
    "pbkdf2_sha1",
    "argon2",
    "bcrypt_sha256",
    "bcrypt",
    "scrypt",
    "md5",
];

/// Longest password (in UTF-8 bytes) that plain `bcrypt$` hashes can check. bcrypt itself only
/// reads 72 bytes; bcrypt 5 (what Django 5.2 installs) raises on longer input rather than
/// silently truncate, and we refuse the same input by answering `false`.
pub const BCRYPT_MAX_PASSWORD_BYTES: usize = 72;

/// Longest stored string we look at. `auth_user.password` is `varchar(128)` and every Django
/// format fits in it; the cap keeps a corrupt row from costing more than the hash itself.
pub const MAX_ENCODED_LEN: usize = 1024;

// The default caps below each allow roughly ten times the work of Django's default parameters,
// i.e. a second or two of one core, which leaves room for sites that raised their cost settings.

/// Most PBKDF2 iterations accepted from a stored hash (Django 5.2 uses 1,000,000).
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;

/// Highest bcrypt cost accepted from a stored hash (Django uses 12; each step doubles the work).
pub const MAX_BCRYPT_COST: u32 = 15;

/// Most scrypt work, `N · r · p`, accepted from a stored hash (Django's 16384 · 8 · 5 = 655,360).
pub const MAX_SCRYPT_WORK: u64 = 1 << 23;

/// Most memory a stored scrypt hash may ask for, `128 · r · (N + p)` bytes (Django's defaults
/// need 16 MiB, and stock Django cannot go past OpenSSL's 32 MiB limit anyway).
pub const MAX_SCRYPT_MEMORY_BYTES: u64 = 128 << 20;

/// Most memory a stored Argon2 hash may ask for, in KiB (Django uses `m=102400`, 100 MiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 256 << 10;

/// Most Argon2 work, memory times passes (`m · t`, KiB), accepted from a stored hash
/// (Django's `m=102400, t=2` is 204,800).
pub const MAX_ARGON2_WORK_KIB: u64 = 2 << 20;

/// The most work a stored hash may ask for: one over any of these is refused without being
/// checked (`sessions.max_pbkdf2_iterations` and the other `sessions.max_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostCaps {
    pub pbkdf2_iterations: u32,
    pub bcrypt_cost: u32,
    /// scrypt's `N · r · p`.
    pub scrypt_work: u64,
    /// scrypt's `128 · r · (N + p)` bytes.
    pub scrypt_memory_bytes: u64,
    pub argon2_memory_kib: u32,
    /// Argon2's `m · t`, KiB.
    pub argon2_work_kib: u64,
}

impl Default for CostCaps {
    fn default() -> Self {
        CostCaps {
            pbkdf2_iterations: MAX_PBKDF2_ITERATIONS,
            bcrypt_cost: MAX_BCRYPT_COST,
            scrypt_work: MAX_SCRYPT_WORK,
            scrypt_memory_bytes: MAX_SCRYPT_MEMORY_BYTES,
            argon2_memory_kib: MAX_ARGON2_MEMORY_KIB,
            argon2_work_kib: MAX_ARGON2_WORK_KIB,
        }
    }
}

impl CostCaps {
    /// No cap at all: what a hash's format alone allows.
    const NONE: CostCaps = CostCaps {
        pbkdf2_iterations: u32::MAX,
        bcrypt_cost: u32::MAX,
        scrypt_work: u64::MAX,
        scrypt_memory_bytes: u64::MAX,
        argon2_memory_kib: u32::MAX,
        argon2_work_kib: u64::MAX,
    };

    /// The setting whose cap a well-formed `encoded` exceeds, if one does: a hash Django may
    /// well accept (a site that raised its hasher's cost) that [`check_password_within`]
    /// refuses unchecked, which an operator must hear of.
    #[must_use]
    pub fn exceeded_by(&self, encoded: &str) -> Option<&'static str> {
        if !parses_within(encoded, &Self::NONE) || parses_within(encoded, self) {
            return None;
        }
        let none = Self::NONE;
        let each = [
            (
                "sessions.max_pbkdf2_iterations",
                CostCaps {
                    pbkdf2_iterations: self.pbkdf2_iterations,
                    ..none
                },
            ),
            (
                "sessions.max_bcrypt_cost",
                CostCaps {
                    bcrypt_cost: self.bcrypt_cost,
                    ..none
                },
            ),
            (
                "sessions.max_scrypt_work",
                CostCaps {
                    scrypt_work: self.scrypt_work,
                    ..none
                },
            ),
            (
                "sessions.max_scrypt_memory_bytes",
                CostCaps {
                    scrypt_memory_bytes: self.scrypt_memory_bytes,
                    ..none
                },
            ),
            (
                "sessions.max_argon2_memory_kib",
                CostCaps {
                    argon2_memory_kib: self.argon2_memory_kib,
                    ..none
                },
            ),
            (
                "sessions.max_argon2_work_kib",
                CostCaps {
                    argon2_work_kib: self.argon2_work_kib,
                    ..none
                },
            ),
        ];
        each.into_iter()
            .find(|(_, only)| !parses_within(encoded, only))
            .map(|(key, _)| key)
    }
}

/// Whether `encoded` parses as its hasher's hash within `caps` (an unusable, unknown or md5
/// string has no cost: `false`).
fn parses_within(encoded: &str, caps: &CostCaps) -> bool {
    match Hasher::identify(encoded) {
        Some(h @ (Hasher::Pbkdf2Sha256 | Hasher::Pbkdf2Sha1)) => {
            parse_pbkdf2(encoded, h, caps).is_some()
        }
        Some(Hasher::Argon2) => parse_argon2(encoded, caps).is_some(),
        Some(h @ (Hasher::BcryptSha256 | Hasher::Bcrypt)) => {
            parse_bcrypt(encoded, h, caps).is_some()
        }
        Some(Hasher::Scrypt) => parse_scrypt(encoded, caps).is_some(),
        Some(Hasher::Md5) | None => false,
    }
}

/// Length of the salts Django generates (`ceil(128 / log2(62))` characters of [`SALT_CHARS`]).
const SALT_LEN: usize = 22;

/// Django's `RANDOM_STRING_CHARS`, the alphabet of its salts.
const SALT_CHARS: &[u8; 62] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// Verifies `password` against a hash string stored by Django (`auth_user.password`), within
/// the default [`CostCaps`].
///
/// Returns `false` for unusable passwords (`!` prefix), an empty or malformed string, an
/// algorithm that isn't in [`ALGORITHMS`], costs above the caps, and a plain `bcrypt$`
/// hash with a password longer than [`BCRYPT_MAX_PASSWORD_BYTES`]. Never panics.
///
/// Note that Django's default `PASSWORD_HASHERS` leaves out `bcrypt` and `md5`; a caller that
/// wants Django's default behaviour exactly can refuse those via [`algorithm_of`] first.
#[must_use]
pub fn check_password(password: &str, encoded: &str) -> bool {
    check_password_within(password, encoded, &CostCaps::default())
}

/// [`check_password`] within `caps`.
#[must_use]
pub fn check_password_within(password: &str, encoded: &str, caps: &CostCaps) -> bool {
    if encoded.len() > MAX_ENCODED_LEN || !is_password_usable(encoded) {
        return false;
    }
    let Some(hasher) = Hasher::identify(encoded) else {
        return false;
    };
    match hasher {
        Hasher::Pbkdf2Sha256 | Hasher::Pbkdf2Sha1 => check_pbkdf2(password, encoded, hasher, caps),
        Hasher::Argon2 => check_argon2(password, encoded, caps),
        Hasher::BcryptSha256 => check_bcrypt_sha256(password, encoded, caps),
        Hasher::Bcrypt => check_bcrypt(password, encoded, caps),
        Hasher::Scrypt => check_scrypt(password, encoded, caps),
        Hasher::Md5 => check_md5(password, encoded),
    }
}

/// Hashes `password` the way Django 5.2's default hasher does:
/// `pbkdf2_sha256$<iterations>$<22-char random salt>$<base64 of the 32-byte key>`.
///
/// `iterations == 0` means [`DJANGO_DEFAULT_PBKDF2_ITERATIONS`], as in Django's `encode`.
/// Validate configured counts against the PBKDF2 cap: [`check_password_within`] refuses hashes
/// above it. The salt comes from `rand`'s thread-local CSPRNG, seeded by the OS.
#[must_use]
pub fn make_password(password: &str, iterations: u32) -> String {
    let iterations = effective_iterations(iterations);
    let salt = random_salt();
    let hash = pbkdf2_b64(Hasher::Pbkdf2Sha256, password, &salt, iterations);
    encode_pbkdf2(Hasher::Pbkdf2Sha256, iterations, &salt, &hash)
}

/// Django's rehash-on-login rule for `pbkdf2_sha256` with `iterations` as the preferred count
/// (`0` meaning [`DJANGO_DEFAULT_PBKDF2_ITERATIONS`]).
///
/// `true` when `encoded` is a recognised hash of another algorithm, or a `pbkdf2_sha256` hash
/// with a different iteration count or a salt shorter than Django's 22 characters. `false` for
/// unusable and unrecognised strings, as Django's `verify_password` reports. Only meaningful
/// after [`check_password`] succeeded: Django writes the fresh hash only on a correct password.
#[must_use]
pub fn must_update(encoded: &str, iterations: u32) -> bool {
    match Hasher::identify(encoded) {
        None => false,
        Some(Hasher::Pbkdf2Sha256) => {
            let mut parts = encoded.splitn(4, '$').skip(1);
            let (Some(stored), Some(salt)) = (parts.next(), parts.next()) else {
                return true;
            };
            parse_decimal::<u32>(stored) != Some(effective_iterations(iterations))
                || salt.chars().count() < SALT_LEN
        }
        Some(_) => true,
    }
}

/// The algorithm name of a stored hash, if it is one [`check_password`] understands.
///
/// Always one of [`ALGORITHMS`], so the result is safe as a metric label. Unusable passwords
/// and unknown prefixes (e.g. Django's removed `sha1$`) give `None`.
#[must_use]
pub fn algorithm_of(encoded: &str) -> Option<&'static str> {
    Hasher::identify(encoded).map(Hasher::name)
}

/// Django's `is_password_usable`: `false` only for values starting with
/// [`UNUSABLE_PASSWORD_PREFIX`] (an empty string counts as usable, yet never verifies).
#[must_use]
pub fn is_password_usable(encoded: &str) -> bool {
    !encoded.starts_with(UNUSABLE_PASSWORD_PREFIX)
}

/// Django 5.2's `Argon2PasswordHasher` cost (`memory_cost`, `time_cost`, `parallelism`).
const DJANGO_ARGON2_COST: &str = "m=102400,t=2,p=8";
/// Django 5.2's `BCryptSHA256PasswordHasher` / `BCryptPasswordHasher` rounds.
const DJANGO_BCRYPT_ROUNDS: u32 = 12;
/// Django 5.2's `ScryptPasswordHasher` cost: `work_factor` (N), `block_size` (r), `parallelism` (p).
const DJANGO_SCRYPT_COST: (u64, u32, u32) = (1 << 14, 8, 5);

/// The work Django 5.2's hashers ask for by default, which [`timing_dummy`] asks for too (its
/// PBKDF2 count aside: the configured one): caps below it would refuse the dummy unchecked.
pub const DJANGO_DEFAULT_COSTS: CostCaps = {
    let (n, r, p) = DJANGO_SCRYPT_COST;
    CostCaps {
        pbkdf2_iterations: DJANGO_DEFAULT_PBKDF2_ITERATIONS,
        bcrypt_cost: DJANGO_BCRYPT_ROUNDS,
        scrypt_work: n * r as u64 * p as u64,
        scrypt_memory_bytes: 128 * r as u64 * (n + p as u64),
        argon2_memory_kib: 102_400,
        argon2_work_kib: 102_400 * 2,
    }
};

/// A well-formed hash that no password matches, made with the site's `preferred` hasher (the
/// first of `sessions.password_hashers`) at the configured PBKDF2 `iterations` or Django's
/// default cost for the others. Checked when the username is unknown, and by
/// [`harden_runtime`] for unusable or malformed hashes, so that those cost what Django spends:
/// it runs the preferred hasher once (`make_password`) in both cases. Its checksum is not the
/// output of any derivation, so making it costs nothing; checking it runs the full derivation.
#[must_use]
pub fn timing_dummy(preferred: &str, iterations: u32) -> String {
    const SALT: &str = "knoxgatetimingsalt0000";
    let iterations = effective_iterations(iterations);
    match Hasher::identify(&format!("{preferred}$")) {
        Some(Hasher::Pbkdf2Sha1) => {
            format!("pbkdf2_sha1${iterations}${SALT}${}=", "A".repeat(27))
        }
        // argon2-cffi's default salt and hash lengths (16 bytes each), unpadded base64.
        Some(Hasher::Argon2) => format!(
            "argon2$argon2id$v=19${DJANGO_ARGON2_COST}${}${}",
            "A".repeat(22),
            "A".repeat(22)
        ),
        Some(h @ (Hasher::BcryptSha256 | Hasher::Bcrypt)) => {
            format!("{}$$2b${DJANGO_BCRYPT_ROUNDS}${}", h.name(), ".".repeat(53))
        }
        Some(Hasher::Scrypt) => {
            let (n, r, p) = DJANGO_SCRYPT_COST;
            format!("scrypt${n}${SALT}${r}${p}${}==", "A".repeat(86))
        }
        Some(Hasher::Md5) => format!("md5${SALT}${}", "0".repeat(32)),
        Some(Hasher::Pbkdf2Sha256) | None => {
            format!("pbkdf2_sha256${iterations}${SALT}${}=", "A".repeat(43))
        }
    }
}

/// After a wrong password, does the work that makes the attempt cost what a check at the
/// configured `iterations` costs, so timing does not tell which users have a cheaper hash or
/// none at all. Django does the same: `harden_runtime` runs the missing PBKDF2 iterations, and
/// since CVE-2024-39329 an unusable password runs the default hasher.
///
/// - a hash the check never ran (`checked` false: an algorithm the site does not list),
///   unusable (`!`), unknown algorithm, over-long, malformed or over its cost caps, `md5`, a
///   plain `bcrypt$` hash with a password it cannot take: one check of `dummy`, the
///   [`timing_dummy`] of the site's preferred hasher (these answered `false` with next to no
///   work);
/// - `pbkdf2_*` with fewer iterations: the difference, with the same hasher and salt;
/// - `argon2`, `bcrypt*`, `scrypt` that were checked: nothing, as in Django (their costs do not
///   compare to PBKDF2 iterations; Django's own defaults for them are close to its PBKDF2 cost).
pub fn harden_runtime(
    password: &str,
    encoded: &str,
    checked: bool,
    iterations: u32,
    dummy: &str,
    caps: &CostCaps,
) {
    match padding_after(password, encoded, checked, iterations, caps) {
        Padding::Nothing => {}
        Padding::DummyCheck => {
            std::hint::black_box(check_password_within(password, dummy, caps));
        }
        Padding::MissingIterations {
            hasher,
            salt,
            iterations,
        } => {
            std::hint::black_box(pbkdf2_b64(hasher, password, salt, iterations));
        }
    }
}

/// The work [`harden_runtime`] adds after a wrong password, decided without doing it.
#[derive(Debug, PartialEq, Eq)]
enum Padding<'a> {
    Nothing,
    /// A whole check of the [`timing_dummy`].
    DummyCheck,
    /// This many more iterations of the stored hash's own hasher and salt.
    MissingIterations {
        hasher: Hasher,
        salt: &'a str,
        iterations: u32,
    },
}

/// What [`harden_runtime`] adds: a dummy check when the refusal did no hashing at all.
fn padding_after<'a>(
    password: &str,
    encoded: &'a str,
    checked: bool,
    iterations: u32,
    caps: &CostCaps,
) -> Padding<'a> {
    if checked {
        padding(password, encoded, iterations, caps)
    } else {
        Padding::DummyCheck
    }
}

/// What a checked, refused `encoded` needs; `password` only tells whether a plain bcrypt check
/// could take it.
fn padding<'a>(password: &str, encoded: &'a str, iterations: u32, caps: &CostCaps) -> Padding<'a> {
    let iterations = effective_iterations(iterations);
    if encoded.len() > MAX_ENCODED_LEN || !is_password_usable(encoded) {
        return Padding::DummyCheck;
    }
    // Each of these refused without hashing.
    let ran = |did_work: bool| {
        if did_work {
            Padding::Nothing
        } else {
            Padding::DummyCheck
        }
    };
    match Hasher::identify(encoded) {
        None | Some(Hasher::Md5) => Padding::DummyCheck,
        Some(Hasher::Argon2) => ran(parse_argon2(encoded, caps).is_some()),
        Some(Hasher::Scrypt) => ran(parse_scrypt(encoded, caps).is_some()),
        Some(h @ Hasher::BcryptSha256) => ran(parse_bcrypt(encoded, h, caps).is_some()),
        Some(h @ Hasher::Bcrypt) => {
            ran(password.len() <= BCRYPT_MAX_PASSWORD_BYTES
                && parse_bcrypt(encoded, h, caps).is_some())
        }
        Some(h @ (Hasher::Pbkdf2Sha256 | Hasher::Pbkdf2Sha1)) => {
            match parse_pbkdf2(encoded, h, caps) {
                None => Padding::DummyCheck,
                Some(p) if p.iterations < iterations => Padding::MissingIterations {
                    hasher: h,
                    salt: p.salt,
                    iterations: iterations - p.iterations,
                },
                Some(_) => Padding::Nothing,
            }
        }
    }
}

#[cfg(test)]
mod padding_tests {
    use super::*;

    #[test]
    fn every_refusal_costs_what_a_check_at_the_configured_cost_costs() {
        const COST: u32 = 300_000;
        let cheap = make_password("pw", 1_000);
        let salt = cheap.split('$').nth(2).unwrap();
        assert_eq!(
            padding("pw", &cheap, COST, &CostCaps::default()),
            Padding::MissingIterations {
                hasher: Hasher::Pbkdf2Sha256,
                salt,
                iterations: COST - 1_000
            }
        );
        assert_eq!(
            padding("pw", &make_password("pw", COST), COST, &CostCaps::default()),
            Padding::Nothing
        );
        assert_eq!(
            padding(
                "pw",
                &make_password("pw", COST + 1),
                COST,
                &CostCaps::default()
            ),
            Padding::Nothing
        );
        for answered_at_once in [
            "!Zq1x8sd0unusablepasswordmarker",
            "",
            "sha1$salt$0123456789abcdef0123456789abcdef01234567",
            "md5$salt$0123456789abcdef0123456789abcdef",
            "pbkdf2_sha256$not-a-number$salt$hash",
        ] {
            assert_eq!(
                padding("pw", answered_at_once, COST, &CostCaps::default()),
                Padding::DummyCheck,
                "{answered_at_once:?}"
            );
        }
    }

    /// Django's own argon2, bcrypt and scrypt hashes (shared/knox-compat/passwords.json).
    fn django_hash(algorithm: &str) -> String {
        let fixtures = crate::knox_compat("passwords.json");
        let vectors = fixtures["vectors"].as_array().expect("vectors");
        vectors
            .iter()
            .filter(|v| v["algorithm"] == algorithm)
            .find_map(|v| v["encoded"].as_str())
            .expect("a hash of the algorithm")
            .to_string()
    }

    #[test]
    fn a_costly_hash_pads_only_when_its_check_did_the_hashing() {
        const COST: u32 = 300_000;
        for algorithm in ["argon2", "bcrypt_sha256", "bcrypt", "scrypt"] {
            let encoded = django_hash(algorithm);
            // Checked and refused: its own hasher did the work.
            assert_eq!(
                padding("pw", &encoded, COST, &CostCaps::default()),
                Padding::Nothing,
                "{algorithm}"
            );
            // Refused without hashing: the site does not list the algorithm (timing told which
            // users have such a hash), or the string does not parse.
            assert_eq!(
                padding_after("pw", &encoded, false, COST, &CostCaps::default()),
                Padding::DummyCheck,
                "{algorithm} unlisted"
            );
            let truncated = &encoded[..algorithm.len() + 4];
            assert_eq!(
                padding("pw", truncated, COST, &CostCaps::default()),
                Padding::DummyCheck,
                "{algorithm} malformed"
            );
        }
        // Over the cost caps: refused before hashing.
        let bcrypt = django_hash("bcrypt");
        let costly = bcrypt.replacen("$12$", &format!("${}$", MAX_BCRYPT_COST + 1), 1);
        assert_ne!(costly, bcrypt);
        assert_eq!(
            padding("pw", &costly, COST, &CostCaps::default()),
            Padding::DummyCheck
        );
        // A plain bcrypt hash refuses a password longer than bcrypt takes without hashing.
        let long = "p".repeat(BCRYPT_MAX_PASSWORD_BYTES + 1);
        assert_eq!(
            padding(&long, &bcrypt, COST, &CostCaps::default()),
            Padding::DummyCheck
        );
        assert_eq!(
            padding(
                &long,
                &django_hash("bcrypt_sha256"),
                COST,
                &CostCaps::default()
            ),
            Padding::Nothing
        );
    }
}

/// The hashers Django ships, by the name stored before the first `$`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hasher {
    Pbkdf2Sha256,
    Pbkdf2Sha1,
    Argon2,
    BcryptSha256,
    Bcrypt,
    Scrypt,
    Md5,
}

impl Hasher {
    const ALL: [Hasher; 7] = [
        Hasher::Pbkdf2Sha256,
        Hasher::Pbkdf2Sha1,
        Hasher::Argon2,
        Hasher::BcryptSha256,
        Hasher::Bcrypt,
        Hasher::Scrypt,
        Hasher::Md5,
    ];

    fn name(self) -> &'static str {
        match self {
            Hasher::Pbkdf2Sha256 => "pbkdf2_sha256",
            Hasher::Pbkdf2Sha1 => "pbkdf2_sha1",
            Hasher::Argon2 => "argon2",
            Hasher::BcryptSha256 => "bcrypt_sha256",
            Hasher::Bcrypt => "bcrypt",
            Hasher::Scrypt => "scrypt",
            Hasher::Md5 => "md5",
        }
    }

    /// Django's `identify_hasher`, limited to the hashers it ships.
    fn identify(encoded: &str) -> Option<Hasher> {
        // Django sends a 37-character `md5$$<hex>` to its removed `unsalted_md5` hasher, not to
        // `md5`, so it is unknown rather than a malformed md5 hash.
        if encoded.starts_with("md5$$") && encoded.chars().count() == 37 {
            return None;
        }
        let name = encoded.split('$').next()?;
        Hasher::ALL.into_iter().find(|hasher| hasher.name() == name)
    }
}

// === PBKDF2 ===

/// The parameters of a `pbkdf2_*` string; the hash part is checked by re-encoding.
struct Pbkdf2Params<'a> {
    iterations: u32,
    salt: &'a str,
}

fn parse_pbkdf2<'a>(encoded: &'a str, hasher: Hasher, caps: &CostCaps) -> Option<Pbkdf2Params<'a>> {
    let mut parts = encoded.splitn(4, '$');
    if parts.next()? != hasher.name() {
        return None;
    }
    let iterations = parse_decimal::<u32>(parts.next()?)?;
    let salt = parts.next()?;
    parts.next()?;
    // Django re-encodes `0` iterations as its default, so such a string can never match.
    let sane = (1..=caps.pbkdf2_iterations).contains(&iterations) && !salt.is_empty();
    sane.then_some(Pbkdf2Params { iterations, salt })
}

fn check_pbkdf2(password: &str, encoded: &str, hasher: Hasher, caps: &CostCaps) -> bool {
    let Some(params) = parse_pbkdf2(encoded, hasher, caps) else {
        return false;
    };
    let hash = pbkdf2_b64(hasher, password, params.salt, params.iterations);
    ct_eq_str(
        &encode_pbkdf2(hasher, params.iterations, params.salt, &hash),
        encoded,
    )
}

/// Standard padded base64 of PBKDF2-HMAC over the UTF-8 password and salt, with the digest's
/// own output length as the key length (Django's `dklen=None`).
fn pbkdf2_b64(hasher: Hasher, password: &str, salt: &str, iterations: u32) -> String {
    let (password, salt) = (password.as_bytes(), salt.as_bytes());
    if hasher == Hasher::Pbkdf2Sha1 {
        STANDARD.encode(pbkdf2::pbkdf2_hmac_array::<sha1::Sha1, 20>(
            password, salt, iterations,
        ))
    } else {
        STANDARD.encode(pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(
            password, salt, iterations,
        ))
    }
}

fn encode_pbkdf2(hasher: Hasher, iterations: u32, salt: &str, hash: &str) -> String {
    format!("{}${iterations}${salt}${hash}", hasher.name())
}

fn effective_iterations(iterations: u32) -> u32 {
    if iterations == 0 {
        DJANGO_DEFAULT_PBKDF2_ITERATIONS
    } else {
        iterations
    }
}

// === Argon2 ===

/// A parsed `argon2$…` string, after the cost caps were checked.
struct Argon2Hash {
    algorithm: argon2::Algorithm,
    version: argon2::Version,
    m_cost: u32,
    t_cost: u32,
    p_cost: u32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

/// Parses the PHC string after Django's `argon2` prefix the way libargon2 (under argon2-cffi)
/// does: fields in the fixed order `$v=`, `$m=`, `,t=`, `,p=`; a missing `v=` means version
/// 0x10; salt and hash are unpadded standard base64.
fn parse_argon2(encoded: &str, caps: &CostCaps) -> Option<Argon2Hash> {
    let phc = encoded.strip_prefix("argon2$")?;
    let (algorithm, rest) = if let Some(rest) = phc.strip_prefix("argon2id") {
        (argon2::Algorithm::Argon2id, rest)
    } else if let Some(rest) = phc.strip_prefix("argon2i") {
        (argon2::Algorithm::Argon2i, rest)
    } else {
        (argon2::Algorithm::Argon2d, phc.strip_prefix("argon2d")?)
    };
    let (version, rest) = match rest.strip_prefix("$v=") {
        Some(rest) => {
            let (version, rest) = take_decimal(rest)?;
            (argon2::Version::try_from(version).ok()?, rest)
        }
        None => (argon2::Version::V0x10, rest),
    };
    let (m_cost, rest) = take_decimal(rest.strip_prefix("$m=")?)?;
    let (t_cost, rest) = take_decimal(rest.strip_prefix(",t=")?)?;
    let (p_cost, rest) = take_decimal(rest.strip_prefix(",p=")?)?;
    let (salt, hash) = rest.strip_prefix('$')?.split_once('$')?;

    let work = u64::from(m_cost) * u64::from(t_cost);
    if m_cost > caps.argon2_memory_kib || work > caps.argon2_work_kib {
        return None;
    }
    Some(Argon2Hash {
        algorithm,
        version,
        m_cost,
        t_cost,
        p_cost,
        salt: STANDARD_NO_PAD.decode(salt).ok()?,
        hash: STANDARD_NO_PAD.decode(hash).ok()?,
    })
}

fn check_argon2(password: &str, encoded: &str, caps: &CostCaps) -> bool {
    let Some(stored) = parse_argon2(encoded, caps) else {
        return false;
    };
    // `Params::new` and `hash_password_into` reject what libargon2 rejects: m < 8·p, t = 0,
    // p outside 1..2^24, salts under 8 bytes, hashes under 4 bytes.
    let Ok(params) = argon2::Params::new(
        stored.m_cost,
        stored.t_cost,
        stored.p_cost,
        Some(stored.hash.len()),
    ) else {
        return false;
    };
    let mut derived = vec![0u8; stored.hash.len()];
    argon2::Argon2::new(stored.algorithm, stored.version, params)
        .hash_password_into(password.as_bytes(), &stored.salt, &mut derived)
        .is_ok_and(|()| derived.ct_eq(&stored.hash).into())
}

// === bcrypt ===

/// The modular-crypt part of a `bcrypt$` / `bcrypt_sha256$` string (`$2b$12$` + 22 salt
/// characters + 31 hash characters), after the cost cap was checked.
fn parse_bcrypt<'a>(encoded: &'a str, hasher: Hasher, caps: &CostCaps) -> Option<&'a str> {
    let data = encoded.strip_prefix(hasher.name())?.strip_prefix('$')?;
    if data.len() != 60 || !data.is_ascii() {
        return None;
    }
    let cost = parse_decimal::<u32>(data.get(4..6)?)?;
    (cost <= caps.bcrypt_cost).then_some(data)
}

fn check_bcrypt_sha256(password: &str, encoded: &str, caps: &CostCaps) -> bool {
    // Django pre-hashes so that bcrypt's 72-byte limit never bites; bcrypt sees the 64 ASCII
    // bytes of the lowercase hex digest.
    let prehashed = hex::encode(sha2::Sha256::digest(password.as_bytes()));
    bcrypt_matches(prehashed.as_bytes(), encoded, Hasher::BcryptSha256, caps)
}

fn check_bcrypt(password: &str, encoded: &str, caps: &CostCaps) -> bool {
    // Hashes made with bcrypt < 5 silently used the first 72 bytes. Django 5.2 with bcrypt 5
    // raises here (a 500 at login); truncating would accept passwords the site never had, so
    // refuse. Users with such hashes can still log in with the first 72 bytes.
    password.len() <= BCRYPT_MAX_PASSWORD_BYTES
        && bcrypt_matches(password.as_bytes(), encoded, Hasher::Bcrypt, caps)
}

/// Django's bcrypt check: `hashpw` with the stored string as salt (pyca/bcrypt, itself built on
/// the `bcrypt` crate), then a constant-time comparison of the whole re-encoded string.
fn bcrypt_matches(input: &[u8], encoded: &str, hasher: Hasher, caps: &CostCaps) -> bool {
    let Some(data) = parse_bcrypt(encoded, hasher, caps) else {
        return false;
    };
    // pyca/bcrypt's hashpw accepts these three prefixes, not the buggy `$2x$`.
    let version = match data.get(1..3) {
        Some("2a") => bcrypt::Version::TwoA,
        Some("2b") => bcrypt::Version::TwoB,
        Some("2y") => bcrypt::Version::TwoY,
        _ => return false,
    };
    let Ok(parts) = data.parse::<bcrypt::HashParts>() else {
        return false;
    };
    let Ok(derived) = bcrypt::hash_with_salt(input, parts.get_cost(), parts.get_salt_raw()) else {
        return false;
    };
    ct_eq_str(&derived.format_for_version(version), data)
}

// === scrypt ===

/// The parameters of a `scrypt$` string; the hash part is checked by re-encoding.
struct ScryptParams<'a> {
    n: u64,
    salt: &'a str,
    r: u32,
    p: u32,
}

fn parse_scrypt<'a>(encoded: &'a str, caps: &CostCaps) -> Option<ScryptParams<'a>> {
    let mut parts = encoded.splitn(6, '$');
    if parts.next()? != Hasher::Scrypt.name() {
        return None;
    }
    let n = parse_decimal::<u64>(parts.next()?)?;
    let salt = parts.next()?;
    let r = parse_decimal::<u32>(parts.next()?)?;
    let p = parse_decimal::<u32>(parts.next()?)?;
    parts.next()?;
    // Python's hashlib.scrypt wants N a power of two above 1 and positive r and p.
    if n < 2 || !n.is_power_of_two() || r == 0 || p == 0 || salt.is_empty() {
        return None;
    }
    let (r64, p64) = (u64::from(r), u64::from(p));
    // Saturating: a product past u64 is past any cap but the format's own.
    let work = n.saturating_mul(r64).saturating_mul(p64);
    let memory = n
        .saturating_add(p64)
        .saturating_mul(r64)
        .saturating_mul(128);
    (work <= caps.scrypt_work && memory <= caps.scrypt_memory_bytes).then_some(ScryptParams {
        n,
        salt,
        r,
        p,
    })
}

fn check_scrypt(password: &str, encoded: &str, caps: &CostCaps) -> bool {
    let Some(stored) = parse_scrypt(encoded, caps) else {
        return false;
    };
    let Ok(log_n) = u8::try_from(stored.n.trailing_zeros()) else {
        return false;
    };
    let Ok(params) = scrypt::Params::new(log_n, stored.r, stored.p) else {
        return false;
    };
    let mut derived = [0u8; 64];
    if scrypt::scrypt(
        password.as_bytes(),
        stored.salt.as_bytes(),
        &params,
        &mut derived,
    )
    .is_err()
    {
        return false;
    }
    let reencoded = format!(
        "scrypt${}${}${}${}${}",
        stored.n,
        stored.salt,
        stored.r,
        stored.p,
        STANDARD.encode(derived)
    );
    ct_eq_str(&reencoded, encoded)
}

// === MD5 ===

fn check_md5(password: &str, encoded: &str) -> bool {
    let mut parts = encoded.splitn(3, '$').skip(1);
    let (Some(salt), Some(_hash)) = (parts.next(), parts.next()) else {
        return false;
    };
    if salt.is_empty() {
        return false;
    }
    let digest = md5::Md5::new()
        .chain_update(salt.as_bytes())
        .chain_update(password.as_bytes())
        .finalize();
    ct_eq_str(&format!("md5${salt}${}", hex::encode(digest)), encoded)
}

// === helpers ===

/// Constant-time equality of two strings (only their lengths leak, as in Django's
/// `constant_time_compare`).
fn ct_eq_str(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A non-empty run of ASCII digits, nothing else. Django's `int()` is laxer (`+5`, `1_000`),
/// but such strings never equal Django's re-encoding, so refusing them changes no answer.
fn parse_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits a leading decimal `u32` off `s`, as libargon2's `decode_decimal` reads parameters.
fn take_decimal(s: &str) -> Option<(u32, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    let (digits, rest) = s.split_at(end);
    Some((parse_decimal(digits)?, rest))
}

/// A Django-style salt: [`SALT_LEN`] characters drawn uniformly from [`SALT_CHARS`].
fn random_salt() -> String {
    let mut salt = String::with_capacity(SALT_LEN);
    let mut bytes = [0u8; 32];
    while salt.len() < SALT_LEN {
        rand::fill(&mut bytes);
        // Rejecting bytes >= 248 (4 · 62) keeps every character equally likely.
        for &byte in bytes.iter().filter(|&&byte| byte < 248) {
            if salt.len() < SALT_LEN {
                salt.push(char::from(SALT_CHARS[usize::from(byte % 62)]));
            }
        }
    }
    salt
}
