//! Checks against the hashes the real Django 5.2 made (`shared/knox-compat/passwords.json`), plus
//! hostile stored strings and cheap self-made hashes for the paths the vectors don't reach.

use super::*;
use serde_json::Value;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Django's default-cost vectors take ~0.1–0.25 s each; these cheap ones keep loops fast.
const CHEAP_ITERATIONS: u32 = 1_000;

fn fixtures() -> &'static Value {
    static FIXTURES: OnceLock<Value> = OnceLock::new();
    FIXTURES.get_or_init(|| crate::knox_compat("passwords.json"))
}

fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {value}"))
}

fn bool_at(value: &Value, key: &str) -> bool {
    value[key]
        .as_bool()
        .unwrap_or_else(|| panic!("{key} is not a bool in {value}"))
}

fn vectors() -> &'static [Value] {
    fixtures()["vectors"].as_array().expect("vectors array")
}

/// Runs every Django vector of one algorithm once (right and wrong password), and checks the
/// Django 5.2 and 6.0 rehash answers and the 6.0 cross-check alongside.
fn check_django_vectors(algorithm: &str) {
    // The cross-check lists the vectors that have a hash, in the same order.
    let crosscheck = fixtures()["django_6_0_crosscheck"]["results"]
        .as_array()
        .expect("crosscheck results");
    let hashed: Vec<&Value> = vectors()
        .iter()
        .filter(|v| v.get("encoded").is_some())
        .collect();
    assert_eq!(hashed.len(), crosscheck.len());

    let mut checked = 0;
    for (vector, cross) in hashed.iter().zip(crosscheck) {
        if str_at(vector, "algorithm") != algorithm {
            continue;
        }
        let (password, wrong) = (str_at(vector, "password"), str_at(vector, "wrong_password"));
        let encoded = str_at(vector, "encoded");
        assert_eq!(hex::encode(password), str_at(vector, "password_utf8_hex"));
        assert_eq!(
            hex::encode(wrong),
            str_at(vector, "wrong_password_utf8_hex")
        );
        assert_eq!(algorithm_of(encoded), Some(algorithm));

        // Both checks at once: at Django's default costs each takes up to ~2 s in a debug build.
        let (right_ok, wrong_ok) = std::thread::scope(|scope| {
            let wrong_ok = scope.spawn(|| check_password(wrong, encoded));
            let right_ok = check_password(password, encoded);
            (
                right_ok,
                wrong_ok.join().expect("check_password never panics"),
            )
        });
        assert_eq!(right_ok, bool_at(vector, "check_password"), "{encoded}");
        assert_eq!(
            wrong_ok,
            bool_at(vector, "check_wrong_password"),
            "{encoded}"
        );
        assert_eq!(
            must_update(encoded, DJANGO_DEFAULT_PBKDF2_ITERATIONS),
            bool_at(vector, "must_update_under_default_pbkdf2_first"),
            "{encoded}"
        );

        assert_eq!(str_at(cross, "algorithm"), algorithm);
        assert!(password.starts_with(str_at(cross, "password")));
        assert_eq!(right_ok, bool_at(cross, "accepted_by_6_0"), "{encoded}");
        assert_eq!(!wrong_ok, bool_at(cross, "wrong_rejected"), "{encoded}");
        assert_eq!(
            must_update(encoded, DJANGO_6_0_PBKDF2_ITERATIONS),
            bool_at(cross, "must_update_in_6_0"),
            "{encoded}"
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} {algorithm} vectors");
}

#[test]
fn django_pbkdf2_sha256_vectors() {
    check_django_vectors("pbkdf2_sha256");
}

#[test]
fn django_pbkdf2_sha1_vectors() {
    check_django_vectors("pbkdf2_sha1");
}

#[test]
fn django_argon2_vectors() {
    check_django_vectors("argon2");
}

#[test]
fn django_bcrypt_sha256_vectors() {
    check_django_vectors("bcrypt_sha256");
}

#[test]
fn django_bcrypt_vectors() {
    check_django_vectors("bcrypt");
}

#[test]
fn django_scrypt_vectors() {
    check_django_vectors("scrypt");
}

#[test]
fn django_md5_vectors() {
    check_django_vectors("md5");
}

#[test]
fn every_vector_algorithm_is_supported_and_covered() {
    assert_eq!(vectors().len(), 28);
    for vector in vectors() {
        let algorithm = str_at(vector, "algorithm");
        assert!(ALGORITHMS.contains(&algorithm), "{algorithm}");
        if vector.get("encoded").is_none() {
            // Django + bcrypt 5 cannot hash a 100-byte password with plain bcrypt at all.
            assert_eq!(algorithm, "bcrypt");
            assert!(str_at(vector, "make_password_error").contains("longer than 72 bytes"));
        }
    }
}

#[test]
fn unusable_passwords_never_verify() {
    let special = &fixtures()["special"];
    let unusable = str_at(special, "unusable_example");
    assert!(!is_password_usable(unusable));
    assert_eq!(
        is_password_usable(unusable),
        bool_at(special, "unusable_is_password_usable")
    );
    assert!(!check_password("", unusable));
    assert!(!check_password(unusable, unusable));
    assert_eq!(
        check_password(&unusable[1..], unusable),
        bool_at(special, "unusable_check_password_of_its_own_suffix")
    );
    assert_eq!(algorithm_of(unusable), None);
    assert!(!must_update(unusable, DJANGO_DEFAULT_PBKDF2_ITERATIONS));

    // A real hash behind the prefix stays unusable.
    let hidden = format!("!{}", make_password("pw", CHEAP_ITERATIONS));
    assert!(!check_password("pw", &hidden));
}

#[test]
fn empty_and_unknown_stored_values_never_verify() {
    let special = &fixtures()["special"];
    assert_eq!(
        is_password_usable(""),
        bool_at(special, "is_password_usable('')")
    );
    assert_eq!(
        check_password("", ""),
        bool_at(special, "check_password('', '')")
    );
    assert_eq!(
        check_password("x", ""),
        bool_at(special, "check_password('x', '')")
    );

    let unknown = &special["unknown_algorithm_prefix"];
    let encoded = str_at(unknown, "encoded");
    assert_eq!(
        check_password("abc", encoded),
        bool_at(unknown, "check_password")
    );
    assert_eq!(algorithm_of(encoded), None);
    assert!(!must_update(encoded, DJANGO_DEFAULT_PBKDF2_ITERATIONS));
}

#[test]
fn legacy_bcrypt_hash_of_long_password_needs_its_first_72_bytes() {
    let legacy = &fixtures()["special"]["bcrypt_plain_legacy_long_password"];
    let made = &legacy["generated_with_bcrypt_4"];
    let (password, encoded) = (str_at(made, "password"), str_at(made, "encoded"));
    assert_eq!(password.len(), 100);

    // Django + bcrypt 5 raises for the full 100 bytes (and for any change past byte 72); we
    // refuse instead of truncating.
    assert!(!check_password(password, encoded));
    let mut changed = password.to_owned();
    changed.pop();
    changed.push('!');
    assert!(!check_password(&changed, encoded));

    assert_eq!(
        check_password(&password[..72], encoded),
        bool_at(legacy, "check_password(first 72 bytes) with bcrypt 5")
    );
    assert_eq!(
        check_password(&password[..71], encoded),
        bool_at(made, "check_password(first 71 bytes)")
    );
}

#[test]
fn rehash_on_login_matches_django() {
    let rehash = &fixtures()["rehash_on_login"];
    for case in [
        "pbkdf2_sha1_stored_then_login",
        "pbkdf2_sha256_600000_then_login",
    ] {
        let before = str_at(&rehash[case], "before");
        let after = str_at(&rehash[case], "after");
        assert!(
            must_update(before, DJANGO_DEFAULT_PBKDF2_ITERATIONS),
            "{before}"
        );
        assert!(
            !must_update(after, DJANGO_DEFAULT_PBKDF2_ITERATIONS),
            "{after}"
        );
        assert!(must_update(after, DJANGO_6_0_PBKDF2_ITERATIONS), "{after}");
        assert_django_pbkdf2_shape(after, DJANGO_DEFAULT_PBKDF2_ITERATIONS);
    }
}

#[test]
fn must_update_flags_short_salts_and_other_counts() {
    let salt22 = "a".repeat(22);
    assert!(!must_update(
        &format!("pbkdf2_sha256$1000${salt22}$x"),
        1000
    ));
    assert!(must_update(
        &format!("pbkdf2_sha256$1000${}$x", "a".repeat(21)),
        1000
    ));
    assert!(must_update(&format!("pbkdf2_sha256$1001${salt22}$x"), 1000));
    assert!(!must_update(
        &format!("pbkdf2_sha256$1000000${salt22}$x"),
        0
    ));
    assert!(must_update("pbkdf2_sha256", 1000));
    assert!(must_update("pbkdf2_sha256$abc$salt$x", 1000));
}

/// Asserts `encoded` looks like what Django's (and our) default hasher writes.
fn assert_django_pbkdf2_shape(encoded: &str, iterations: u32) {
    let parts: Vec<&str> = encoded.split('$').collect();
    assert_eq!(parts.len(), 4, "{encoded}");
    assert_eq!(parts[0], "pbkdf2_sha256");
    assert_eq!(parts[1], iterations.to_string());
    assert_eq!(parts[2].len(), 22, "{encoded}");
    assert!(
        parts[2].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{encoded}"
    );
    assert_eq!(parts[3].len(), 44, "{encoded}");
    assert_eq!(STANDARD.decode(parts[3]).map(|key| key.len()), Ok(32));
}

#[test]
fn make_password_round_trips_with_django_shape() {
    for password in ["", "correct horse battery staple", "pässwörd✓", "a$b!c"] {
        let encoded = make_password(password, CHEAP_ITERATIONS);
        assert_django_pbkdf2_shape(&encoded, CHEAP_ITERATIONS);
        assert!(check_password(password, &encoded), "{encoded}");
        assert!(!check_password(&format!("{password} "), &encoded));
        assert!(!must_update(&encoded, CHEAP_ITERATIONS));
        assert!(must_update(&encoded, DJANGO_DEFAULT_PBKDF2_ITERATIONS));
        assert_eq!(algorithm_of(&encoded), Some("pbkdf2_sha256"));
    }
    // NFD is a different password from NFC.
    let nfc = make_password("pässwörd✓", CHEAP_ITERATIONS);
    assert!(!check_password("pa\u{308}sswo\u{308}rd\u{2713}", &nfc));
}

#[test]
fn make_password_at_zero_uses_django_default() {
    // One derivation at 1M iterations; the round trip itself is covered at cheaper counts.
    let encoded = make_password("s3cret", 0);
    assert_django_pbkdf2_shape(&encoded, DJANGO_DEFAULT_PBKDF2_ITERATIONS);
    assert!(!must_update(&encoded, DJANGO_DEFAULT_PBKDF2_ITERATIONS));
    assert!(!must_update(&encoded, 0));
}

#[test]
fn make_password_salts_differ() {
    let a = make_password("same", 1);
    let b = make_password("same", 1);
    assert_ne!(a, b);
    let salts: std::collections::HashSet<String> = (0..200)
        .map(|_| random_salt())
        .inspect(|salt| assert_eq!(salt.len(), SALT_LEN))
        .collect();
    assert_eq!(salts.len(), 200);
}

#[test]
fn timing_dummy_is_well_formed_and_matches_nothing_obvious() {
    let dummy = timing_dummy("pbkdf2_sha256", CHEAP_ITERATIONS);
    assert_django_pbkdf2_shape(&dummy, CHEAP_ITERATIONS);
    // Well-formed means checked with the full derivation, not refused early as malformed.
    assert!(!must_update(&dummy, CHEAP_ITERATIONS));
    for guess in ["", "password", "admin", &dummy] {
        assert!(!check_password(guess, &dummy));
    }
}

#[test]
fn the_timing_dummy_is_a_hash_of_the_preferred_hasher_at_djangos_cost() {
    // Django runs the preferred hasher for an unknown user: a site preferring argon2 must not
    // answer unknown usernames at PBKDF2's cost. Each dummy must parse as its hasher's hash
    // (so that checking it runs the whole derivation, not an early refusal) at Django's cost.
    for preferred in ALGORITHMS {
        let dummy = timing_dummy(preferred, CHEAP_ITERATIONS);
        assert_eq!(algorithm_of(&dummy), Some(preferred), "{dummy}");
        assert!(dummy.len() <= MAX_ENCODED_LEN);
    }
    let argon2 = parse_argon2(
        &timing_dummy("argon2", CHEAP_ITERATIONS),
        &CostCaps::default(),
    )
    .expect("parses");
    assert_eq!(
        (argon2.m_cost, argon2.t_cost, argon2.p_cost),
        (102_400, 2, 8)
    );
    assert_eq!((argon2.salt.len(), argon2.hash.len()), (16, 16));
    assert!(argon2::Params::new(102_400, 2, 8, Some(argon2.hash.len())).is_ok());
    for (name, hasher) in [
        ("bcrypt_sha256", Hasher::BcryptSha256),
        ("bcrypt", Hasher::Bcrypt),
    ] {
        let dummy = timing_dummy(name, CHEAP_ITERATIONS);
        let data = parse_bcrypt(&dummy, hasher, &CostCaps::default()).expect("parses");
        let parts = data
            .parse::<bcrypt::HashParts>()
            .expect("the bcrypt crate takes it");
        assert_eq!(parts.get_cost(), 12);
    }
    let scrypt_dummy = timing_dummy("scrypt", CHEAP_ITERATIONS);
    let scrypt = parse_scrypt(&scrypt_dummy, &CostCaps::default()).expect("parses");
    assert_eq!((scrypt.n, scrypt.r, scrypt.p), (1 << 14, 8, 5));
    assert!(scrypt::Params::new(14, 8, 5).is_ok());
    // The cheap ones are checked for real.
    for preferred in ["pbkdf2_sha256", "pbkdf2_sha1", "md5"] {
        let dummy = timing_dummy(preferred, CHEAP_ITERATIONS);
        for guess in ["", "password", &dummy] {
            assert!(!check_password(guess, &dummy), "{dummy}");
        }
    }
    let sha1 = timing_dummy("pbkdf2_sha1", CHEAP_ITERATIONS);
    let parsed = parse_pbkdf2(&sha1, Hasher::Pbkdf2Sha1, &CostCaps::default()).expect("parses");
    assert_eq!(parsed.iterations, CHEAP_ITERATIONS);
}

// === self-made hashes for parameters the Django vectors don't cover ===

fn argon2_hash(algorithm: argon2::Algorithm, version: argon2::Version, password: &str) -> String {
    use argon2::PasswordHasher as _;
    let params = argon2::Params::new(64, 2, 2, Some(32)).expect("valid params");
    let phc = argon2::Argon2::new(algorithm, version, params)
        .hash_password_with_salt(password.as_bytes(), b"abcdefghijklmnopqrstuv")
        .expect("argon2 hashes");
    format!("argon2{phc}")
}

fn scrypt_hash(password: &str, log_n: u8, r: u32, p: u32) -> String {
    let salt = "FkOzygHDPU2ITdNC9yyBnr";
    let params = scrypt::Params::new(log_n, r, p).expect("valid params");
    let mut out = [0u8; 64];
    scrypt::scrypt(password.as_bytes(), salt.as_bytes(), &params, &mut out).expect("scrypt");
    format!(
        "scrypt${}${salt}${r}${p}${}",
        1u64 << log_n,
        STANDARD.encode(out)
    )
}

fn bcrypt_hash(input: &[u8], prefix: &str, version: bcrypt::Version) -> String {
    let parts = bcrypt::hash_with_salt(input, 4, *b"0123456789abcdef").expect("bcrypt");
    format!("{prefix}${}", parts.format_for_version(version))
}

fn md5_hash(password: &str, salt: &str) -> String {
    let digest = md5::Md5::digest(format!("{salt}{password}").as_bytes());
    format!("md5${salt}${}", hex::encode(digest))
}

/// One cheap valid hash per algorithm (and variant), all of the password `pw`.
fn cheap_hashes(pw: &str) -> Vec<String> {
    use argon2::{Algorithm, Version};
    vec![
        make_password(pw, 1),
        format!(
            "pbkdf2_sha1$1$abc${}",
            pbkdf2_b64(Hasher::Pbkdf2Sha1, pw, "abc", 1)
        ),
        argon2_hash(Algorithm::Argon2id, Version::V0x13, pw),
        argon2_hash(Algorithm::Argon2i, Version::V0x13, pw),
        argon2_hash(Algorithm::Argon2d, Version::V0x13, pw),
        argon2_hash(Algorithm::Argon2id, Version::V0x10, pw),
        bcrypt_hash(
            hex::encode(sha2::Sha256::digest(pw.as_bytes())).as_bytes(),
            "bcrypt_sha256",
            bcrypt::Version::TwoB,
        ),
        bcrypt_hash(pw.as_bytes(), "bcrypt", bcrypt::Version::TwoB),
        bcrypt_hash(pw.as_bytes(), "bcrypt", bcrypt::Version::TwoA),
        bcrypt_hash(pw.as_bytes(), "bcrypt", bcrypt::Version::TwoY),
        scrypt_hash(pw, 4, 1, 1),
        scrypt_hash(pw, 5, 2, 3),
        md5_hash(pw, "salt"),
    ]
}

#[test]
fn other_parameters_and_variants_verify() {
    for encoded in cheap_hashes("pässwörd✓") {
        assert!(check_password("pässwörd✓", &encoded), "{encoded}");
        assert!(!check_password("passwörd✓", &encoded), "{encoded}");
        assert!(algorithm_of(&encoded).is_some(), "{encoded}");
    }
}

#[test]
fn argon2_without_version_field_means_version_16() {
    use argon2::{Algorithm, Version};
    let v16 = argon2_hash(Algorithm::Argon2id, Version::V0x10, "pw");
    let bare = v16.replace("$v=16", "");
    assert_ne!(bare, v16);
    assert!(check_password("pw", &bare), "{bare}");
    let v19 = argon2_hash(Algorithm::Argon2id, Version::V0x13, "pw").replace("$v=19", "");
    assert!(!check_password("pw", &v19), "{v19}");
}

#[test]
fn bcrypt_2x_prefix_is_refused() {
    assert!(!check_password(
        "pw",
        &bcrypt_hash(b"pw", "bcrypt", bcrypt::Version::TwoX)
    ));
}

#[test]
fn every_truncation_and_single_change_of_a_valid_hash_fails() {
    for encoded in cheap_hashes("pw") {
        for (end, _) in encoded.char_indices().skip(1) {
            assert!(
                !check_password("pw", &encoded[..end]),
                "{}",
                &encoded[..end]
            );
        }
        // A change anywhere (parameters, salt, hash) must not verify nor panic.
        for (at, ch) in encoded.char_indices() {
            let replacement = if ch == 'A' { "B" } else { "A" };
            let mut changed = encoded.clone();
            changed.replace_range(at..at + ch.len_utf8(), replacement);
            assert!(!check_password("pw", &changed), "{changed}");
        }
        assert!(!check_password("pw", &format!("{encoded}=")), "{encoded}=");
        assert!(!check_password("pw", &format!("{encoded}$")), "{encoded}$");
        assert!(!check_password("pw", &format!(" {encoded}")), " {encoded}");
    }
}

#[test]
fn non_canonical_numbers_do_not_verify() {
    let encoded = make_password("pw", 1000);
    assert!(!check_password("pw", &encoded.replace("$1000$", "$01000$")));
    assert!(!check_password("pw", &encoded.replace("$1000$", "$+1000$")));
    assert!(!check_password("pw", &encoded.replace("$1000$", "$1_000$")));
    let scrypt = scrypt_hash("pw", 4, 1, 1);
    assert!(!check_password("pw", &scrypt.replace("$16$", "$016$")));
}

#[test]
fn hostile_stored_strings_are_refused_without_panic() {
    let long_dollars = "$".repeat(100_000);
    let oversized = format!("{}{}", make_password("pw", 1), "A".repeat(MAX_ENCODED_LEN));
    let lossy = String::from_utf8_lossy(b"pbkdf2_sha256$1000$\xff\xfe$\xc3\x28").into_owned();
    let hostile = [
        "",
        "$",
        "$$$$",
        "!",
        "\0",
        "\u{FFFD}\u{FFFD}",
        lossy.as_str(),
        long_dollars.as_str(),
        oversized.as_str(),
        "pbkdf2_sha256",
        "pbkdf2_sha256$",
        "pbkdf2_sha256$$$",
        "pbkdf2_sha256$1000$salt$",
        "pbkdf2_sha256$1000$$hash",
        "pbkdf2_sha256$0$salt$hash",
        "pbkdf2_sha256$-1$salt$hash",
        "pbkdf2_sha256$abc$salt$hash",
        "pbkdf2_sha256$４２$salt$hash",
        "pbkdf2_sha256$4294967296$salt$hash",
        "pbkdf2_sha256$99999999999999999999999$salt$hash",
        "pbkdf2_sha256$1000$säl✓t$6pUHkO7UF25zDYS8pKgC",
        "pbkdf2_sha1$1000$salt$C+/+NP8fcgs2KUetIuwv8Zc0ff",
        "sha1$abc$0000000000000000000000000000000000000000",
        "unsalted_md5$$5f4dcc3b5aa765d61d8327deb882cf99",
        "5f4dcc3b5aa765d61d8327deb882cf99",
        "md5$$5f4dcc3b5aa765d61d8327deb882cf99",
        "md5$",
        "md5$salt",
        "md5$$",
        "crypt$$abN0rGnbNOfHU",
        "PBKDF2_SHA256$1000$salt$hash",
        "argon2",
        "argon2$",
        "argon2$argon2id",
        "argon2$argon2id$v=19$m=65536,t=2,p=1$$",
        "argon2$argon2x$v=19$m=64,t=2,p=2$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=20$m=64,t=2,p=2$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=64,t=0,p=2$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=64,t=2,p=0$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=8,t=2,p=2$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=64,t=2,p=2$YWJj$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=64,t=2,p=2$YWJjZGVmZ2hpamtsbW5vcA$aGE",
        "argon2$argon2id$v=19$m=64,t=2,p=2$YWJjZGVmZ2hpamtsbW5vcA==$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$t=2,m=64,p=2$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=4294967295,t=4294967295,p=16777215$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "argon2$argon2id$v=19$m=4294967296,t=1,p=1$YWJjZGVmZ2hpamtsbW5vcA$aGFzaGhhc2hoYXNo",
        "bcrypt",
        "bcrypt$",
        "bcrypt$$2b$12$",
        "bcrypt$$2b$12$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx",
        "bcrypt$$2b$xx$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.",
        "bcrypt$$2b$03$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.",
        "bcrypt$$2b$31$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.",
        "bcrypt$$2b$12$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx\u{e9}",
        "bcrypt$$2b$1\u{e9}$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjs",
        "bcrypt_sha256$2b$12$/eIva9KcVo5tvdo.1zgUPOTvWOUD.j7ZLqrtjZGDWlw6euPZLgjG.",
        "scrypt",
        "scrypt$16384$salt$8$5",
        "scrypt$16384$salt$8$5$",
        "scrypt$16384$$8$5$hash",
        "scrypt$16383$salt$8$5$hash",
        "scrypt$1$salt$8$5$hash",
        "scrypt$0$salt$8$5$hash",
        "scrypt$16384$salt$0$5$hash",
        "scrypt$16384$salt$8$0$hash",
        "scrypt$16384$salt$8$4294967295$hash",
        "scrypt$9223372036854775808$salt$8$1$hash",
        "scrypt$18446744073709551616$salt$8$1$hash",
        "scrypt$1048576$salt$8$1$hash",
    ];
    for encoded in hostile {
        for password in ["", "pw", "hash", "salt"] {
            assert!(!check_password(password, encoded), "{encoded:?}");
        }
        // Neither may panic.
        let _ = algorithm_of(encoded);
        let _ = must_update(encoded, 0);
    }
}

#[test]
fn cost_caps_refuse_before_doing_the_work() {
    let started = Instant::now();
    let salt = "YWJjZGVmZ2hpamtsbW5vcA";
    let hash = "aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
    let over_cap = [
        format!("pbkdf2_sha256${}$salt$hash", MAX_PBKDF2_ITERATIONS + 1),
        format!("pbkdf2_sha1${}$salt$hash", u32::MAX),
        format!(
            "argon2$argon2id$v=19$m={},t=1,p=1${salt}${hash}",
            MAX_ARGON2_MEMORY_KIB + 1
        ),
        format!(
            "argon2$argon2id$v=19$m=1024,t={},p=1${salt}${hash}",
            u32::MAX
        ),
        format!(
            "bcrypt$$2b${}$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.",
            MAX_BCRYPT_COST + 1
        ),
        "bcrypt_sha256$$2b$31$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.".to_owned(),
        "scrypt$1048576$salt$8$1$hash".to_owned(),
        "scrypt$16384$salt$8$1000$hash".to_owned(),
        "scrypt$2$salt$1$1073741823$hash".to_owned(),
    ];
    for encoded in &over_cap {
        assert!(!check_password("pw", encoded), "{encoded}");
    }
    // Without the caps these would run for minutes or allocate gigabytes.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn caps_admit_parameters_up_to_their_limits() {
    let at_cap = format!("pbkdf2_sha256${MAX_PBKDF2_ITERATIONS}$salt$hash");
    assert!(parse_pbkdf2(&at_cap, Hasher::Pbkdf2Sha256, &CostCaps::default()).is_some());
    let over = format!("pbkdf2_sha256${}$salt$hash", MAX_PBKDF2_ITERATIONS + 1);
    assert!(parse_pbkdf2(&over, Hasher::Pbkdf2Sha256, &CostCaps::default()).is_none());

    // Django's own defaults are well inside every cap.
    assert!(parse_scrypt("scrypt$16384$salt$8$5$hash", &CostCaps::default()).is_some());
    assert!(parse_scrypt("scrypt$65536$salt$8$16$hash", &CostCaps::default()).is_some());
    assert!(
        parse_scrypt("scrypt$65536$salt$8$17$hash", &CostCaps::default()).is_none(),
        "work"
    );
    assert!(parse_scrypt("scrypt$32768$salt$16$1$hash", &CostCaps::default()).is_some());
    assert!(
        parse_scrypt("scrypt$131072$salt$8$1$hash", &CostCaps::default()).is_none(),
        "memory"
    );
    let salt = "YWJjZGVmZ2hpamtsbW5vcA";
    let django = format!("argon2$argon2id$v=19$m=102400,t=2,p=8${salt}$aGFzaA");
    assert!(parse_argon2(&django, &CostCaps::default()).is_some());
    let at_cap = format!("argon2$argon2id$v=19$m={MAX_ARGON2_MEMORY_KIB},t=8,p=8${salt}$aGFzaA");
    assert!(parse_argon2(&at_cap, &CostCaps::default()).is_some());
    let over = format!("argon2$argon2id$v=19$m={MAX_ARGON2_MEMORY_KIB},t=9,p=8${salt}$aGFzaA");
    assert!(parse_argon2(&over, &CostCaps::default()).is_none());
    let bcrypt = |cost: u32| {
        format!("bcrypt$$2b${cost:02}$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.")
    };
    assert!(
        parse_bcrypt(
            &bcrypt(MAX_BCRYPT_COST),
            Hasher::Bcrypt,
            &CostCaps::default()
        )
        .is_some()
    );
    assert!(
        parse_bcrypt(
            &bcrypt(MAX_BCRYPT_COST + 1),
            Hasher::Bcrypt,
            &CostCaps::default()
        )
        .is_none()
    );
}

#[test]
fn algorithm_of_follows_django_identify_hasher() {
    for name in ALGORITHMS {
        assert_eq!(algorithm_of(&format!("{name}$x")), Some(name));
        assert_eq!(algorithm_of(name), Some(name));
    }
    assert_eq!(algorithm_of("md5$$5f4dcc3b5aa765d61d8327deb882cf99"), None);
    assert_eq!(
        algorithm_of("md5$s$5f4dcc3b5aa765d61d8327deb882cf99"),
        Some("md5")
    );
    assert_eq!(algorithm_of("sha1$abc$def"), None);
    assert_eq!(algorithm_of("argon2id$x"), None);
    assert_eq!(algorithm_of(""), None);
    assert_eq!(algorithm_of("!pbkdf2_sha256$1$a$b"), None);
}

#[test]
fn long_passwords_are_fine_except_for_plain_bcrypt() {
    let long = "x".repeat(10_000);
    let encoded = make_password(&long, 1);
    assert!(check_password(&long, &encoded));
    assert!(!check_password(&long[1..], &encoded));

    let exactly_72 = "y".repeat(72);
    let plain = bcrypt_hash(exactly_72.as_bytes(), "bcrypt", bcrypt::Version::TwoB);
    assert!(check_password(&exactly_72, &plain));
    assert!(!check_password(&format!("{exactly_72}y"), &plain));

    let prehashed = hex::encode(sha2::Sha256::digest(long.as_bytes()));
    let sha = bcrypt_hash(prehashed.as_bytes(), "bcrypt_sha256", bcrypt::Version::TwoB);
    assert!(check_password(&long, &sha));
}

#[test]
fn a_hash_over_a_cap_names_its_setting_and_a_raised_cap_checks_it() {
    let low = CostCaps {
        pbkdf2_iterations: 1_000,
        ..CostCaps::default()
    };
    let stored = make_password("pw", 2_000);
    assert!(!check_password_within("pw", &stored, &low));
    assert_eq!(
        low.exceeded_by(&stored),
        Some("sessions.max_pbkdf2_iterations")
    );
    let raised = CostCaps {
        pbkdf2_iterations: 2_000,
        ..low
    };
    assert!(check_password_within("pw", &stored, &raised));
    assert_eq!(raised.exceeded_by(&stored), None);

    let caps = CostCaps::default();
    let salt = "YWJjZGVmZ2hpamtsbW5vcA";
    let hash = "aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
    let over = [
        (
            format!(
                "argon2$argon2id$v=19$m={},t=1,p=1${salt}${hash}",
                MAX_ARGON2_MEMORY_KIB + 1
            ),
            "sessions.max_argon2_memory_kib",
        ),
        (
            format!(
                "argon2$argon2id$v=19$m=1024,t={},p=1${salt}${hash}",
                u32::MAX
            ),
            "sessions.max_argon2_work_kib",
        ),
        (
            format!(
                "bcrypt_sha256$$2b${}$58JZqXWg00rKJ7In8k8SqORqS58tw7UgP9UTxJU6hxbgS2fYjsAx.",
                MAX_BCRYPT_COST + 1
            ),
            "sessions.max_bcrypt_cost",
        ),
        (
            "scrypt$1048576$salt$8$1$hash".to_owned(),
            "sessions.max_scrypt_memory_bytes",
        ),
        (
            "scrypt$16384$salt$8$1000$hash".to_owned(),
            "sessions.max_scrypt_work",
        ),
    ];
    for (encoded, key) in &over {
        assert_eq!(caps.exceeded_by(encoded), Some(*key), "{encoded}");
    }
    // Within the caps, malformed, unusable, unknown or without a cost: nothing to report.
    for encoded in [
        make_password("pw", 1_000).as_str(),
        "pbkdf2_sha256$many$salt$hash",
        "scrypt$1000$salt$8$1$hash",
        "!unusable",
        "sha1$salt$hash",
        "md5$salt$0123456789abcdef0123456789abcdef",
        "",
    ] {
        assert_eq!(caps.exceeded_by(encoded), None, "{encoded}");
    }
}

#[test]
fn every_timing_dummy_is_within_djangos_default_costs() {
    // The lowest caps the configuration takes: each dummy must still be checked, not refused.
    for preferred in ALGORITHMS {
        let dummy = timing_dummy(preferred, CHEAP_ITERATIONS);
        let caps = CostCaps {
            pbkdf2_iterations: CHEAP_ITERATIONS,
            ..DJANGO_DEFAULT_COSTS
        };
        assert_eq!(caps.exceeded_by(&dummy), None, "{dummy}");
        if preferred != "md5" {
            assert!(parses_within(&dummy, &caps), "{dummy}");
        }
        let lower = CostCaps {
            bcrypt_cost: caps.bcrypt_cost - 1,
            scrypt_memory_bytes: caps.scrypt_memory_bytes - 1,
            argon2_memory_kib: caps.argon2_memory_kib - 1,
            pbkdf2_iterations: CHEAP_ITERATIONS - 1,
            ..caps
        };
        if preferred != "md5" {
            assert!(
                !parses_within(&dummy, &lower),
                "{dummy} is at the defaults exactly"
            );
        }
    }
}
