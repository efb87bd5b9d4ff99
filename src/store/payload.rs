//! django-rest-knox-redis cache entries (schema v2): encoding and tolerant decoding.
//!
//! The JSON is written the way Python's `json.dumps` writes it (", " and ": " separators, fields
//! in knox-redis's order) so a Django app reading the same Redis cannot tell who wrote an entry.
//! knoxgate adds one field, `knoxgate`, carrying the user's status (active, staff and superuser
//! flags, group names); knox-redis ignores it. An entry whose `knoxgate` field lacks the flags
//! or the groups (written by a knoxgate from before per-route policies) counts as one without a
//! known user: it is confirmed with Postgres, never read as "not staff, no groups".
//! Anything we cannot read for certain is a miss, never an error and never an allow.
//!
//! With `redis.entry_key` set, knoxgate's field also carries `until` (the entry's own expiry, unix
//! seconds) and `mac`, an HMAC-SHA256 under that key over every field a decision reads (see
//! [`mac_input`]). An entry whose MAC is missing or wrong, or whose `until` has passed, is read as
//! one written by knox-redis: its user must be confirmed with Postgres. So whoever can write Redis
//! but does not hold the key cannot mint an answer, move a token to another user, or replay an
//! entry past the time knoxgate gave it.

use compact_str::CompactString;
use hmac::{KeyInit as _, Mac as _};
use std::borrow::Cow;

use crate::auth::{StoredDigest, TokenRow, UserInfo, format_isoformat, parse_isoformat};

/// A token row as read from a cache entry. `user` is `None` for entries written by
/// django-rest-knox-redis, which does not record the user's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRow {
    pub digest: StoredDigest,
    pub token_key: CompactString,
    pub user_id: CompactString,
    pub created: time::OffsetDateTime,
    pub expiry: Option<time::OffsetDateTime>,
    pub user: Option<UserInfo>,
}

impl CachedRow {
    /// The row with a known user, if the entry carried one.
    pub fn into_row(self) -> Option<TokenRow> {
        match self.user {
            Some(user) => Some(TokenRow {
                digest: self.digest,
                token_key: self.token_key,
                user_id: self.user_id,
                created: self.created,
                expiry: self.expiry,
                user,
            }),
            None => None,
        }
    }
}

/// Largest entry we parse; real ones are ~400 bytes.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// Writes the user id as knox-redis does: a JSON number for integer keys, else a string.
fn json_user_id(id: &str) -> String {
    match id.parse::<i64>() {
        Ok(n) if n.to_string() == id => n.to_string(),
        _ => json_str(id),
    }
}

/// The entry for `row`, byte-compatible with django-rest-knox-redis 0.2.0 plus one field with the
/// user's status. The username and email are added only when `with_identity` (identity headers
/// are configured): knox-redis keeps no personal data in Redis, and neither do we by default.
pub fn encode(row: &TokenRow, with_identity: bool) -> String {
    encode_with(row, with_identity, None)
}

/// How knoxgate seals the entries it writes when `redis.entry_key` is set.
#[derive(Clone, Copy)]
pub struct Seal<'a> {
    pub key: &'a [u8],
    /// Unix seconds at which the entry expires in Redis; a copy read later is not trusted.
    pub until: i64,
}

/// [`encode`], plus `until` and `mac` in knoxgate's field when `seal` is given.
pub fn encode_with(row: &TokenRow, with_identity: bool, seal: Option<Seal<'_>>) -> String {
    let expiry = row
        .expiry
        .map_or_else(|| "null".to_owned(), |e| json_str(&format_isoformat(e)));
    let identity = if with_identity {
        format!(
            ", \"username\": {}, \"email\": {}",
            json_str(&row.user.username),
            json_str(&row.user.email)
        )
    } else {
        String::new()
    };
    let groups = row
        .user
        .groups
        .iter()
        .map(|g| json_str(g))
        .collect::<Vec<_>>()
        .join(", ");
    let sealed = seal.map_or_else(String::new, |seal| {
        let identity =
            with_identity.then_some((row.user.username.as_str(), row.user.email.as_str()));
        let input = mac_input(&Signed {
            token_key: &row.token_key,
            digest: &row.digest.to_text(),
            user_id: &row.user_id,
            created: row.created,
            expiry: row.expiry,
            is_active: row.user.is_active,
            is_staff: row.user.is_staff,
            is_superuser: row.user.is_superuser,
            groups: row.user.groups.iter().map(|g| g.as_str()),
            identity,
            until: seal.until,
        });
        format!(
            ", \"until\": {}, \"mac\": \"{}\"",
            seal.until,
            hex::encode(mac(seal.key, &input))
        )
    });
    format!(
        "{{\"schema_version\": 2, \"digest\": {}, \"user_id\": {}, \"created\": {}, \"expiry\": {}, \"token_key\": {}, \"knoxgate\": {{\"is_active\": {}, \"is_staff\": {}, \"is_superuser\": {}, \"groups\": [{groups}]{identity}{sealed}}}}}",
        json_str(&row.digest.to_text()),
        json_user_id(&row.user_id),
        json_str(&format_isoformat(row.created)),
        expiry,
        json_str(&row.token_key),
        row.user.is_active,
        row.user.is_staff,
        row.user.is_superuser,
    )
}

/// What knoxgate's MAC covers: every field a decision reads, and the entry's own expiry.
pub struct Signed<'a, G> {
    pub token_key: &'a str,
    pub digest: &'a str,
    pub user_id: &'a str,
    pub created: time::OffsetDateTime,
    pub expiry: Option<time::OffsetDateTime>,
    pub is_active: bool,
    pub is_staff: bool,
    pub is_superuser: bool,
    pub groups: G,
    /// Username and email, when the entry records them.
    pub identity: Option<(&'a str, &'a str)>,
    pub until: i64,
}

/// The bytes the MAC is computed over: a version tag, then each field length-prefixed, so no
/// two different entries give the same input (a field cannot leak into its neighbour).
/// Timestamps are taken as unix nanoseconds, so equivalent spellings (`Z`, `+00:00`) agree.
pub fn mac_input<'a, G: Iterator<Item = &'a str> + Clone>(s: &Signed<'a, G>) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(256);
    field(&mut out, b"knoxgate redis entry v1");
    field(&mut out, s.token_key.as_bytes());
    field(&mut out, s.digest.as_bytes());
    field(&mut out, s.user_id.as_bytes());
    field(
        &mut out,
        s.created.unix_timestamp_nanos().to_string().as_bytes(),
    );
    let expiry = s.expiry.map_or_else(
        || "none".to_owned(),
        |e| e.unix_timestamp_nanos().to_string(),
    );
    field(&mut out, expiry.as_bytes());
    field(
        &mut out,
        &[
            u8::from(s.is_active),
            u8::from(s.is_staff),
            u8::from(s.is_superuser),
        ],
    );
    let groups = s.groups.clone();
    field(&mut out, &(groups.clone().count() as u32).to_be_bytes());
    for g in groups {
        field(&mut out, g.as_bytes());
    }
    match s.identity {
        Some((username, email)) => {
            field(&mut out, b"identity");
            field(&mut out, username.as_bytes());
            field(&mut out, email.as_bytes());
        }
        None => field(&mut out, b"no identity"),
    }
    field(&mut out, s.until.to_string().as_bytes());
    out
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// HMAC-SHA256 of `input` under `key`.
pub fn mac(key: &[u8], input: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(input);
    m.finalize().into_bytes().into()
}

/// Whether `tag` (hex) is the MAC of `input` under `key`, compared in constant time.
pub fn mac_matches(key: &[u8], input: &[u8], tag_hex: &str) -> bool {
    let Ok(tag) = hex::decode(tag_hex) else {
        return false;
    };
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(input);
    m.verify_slice(&tag).is_ok()
}

/// An entry as stored, borrowing from the payload. Typed rather than a `serde_json::Value`:
/// this runs on every Redis-tier hit, and a map of owned strings costs more than the lookup.
/// Unknown fields are ignored, as knox-redis ignores them; a field of the wrong type fails
/// the whole entry.
#[derive(serde::Deserialize)]
struct StoredEntry<'a> {
    schema_version: i64,
    #[serde(borrow)]
    digest: Cow<'a, str>,
    user_id: StoredUserId<'a>,
    #[serde(borrow)]
    created: Cow<'a, str>,
    #[serde(default, borrow)]
    expiry: Option<Cow<'a, str>>,
    #[serde(borrow)]
    token_key: Cow<'a, str>,
    #[serde(default, borrow)]
    knoxgate: Option<StoredStatus<'a>>,
}

/// knoxgate's extra field.
#[derive(serde::Deserialize)]
struct StoredStatus<'a> {
    is_active: bool,
    #[serde(default)]
    is_staff: Option<bool>,
    #[serde(default)]
    is_superuser: Option<bool>,
    /// Owned: groups are rare, and borrowing inside a sequence is not supported by serde.
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default, borrow)]
    username: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    email: Option<Cow<'a, str>>,
    #[serde(default)]
    until: Option<i64>,
    #[serde(default, borrow)]
    mac: Option<Cow<'a, str>>,
}

/// `user_id`: a JSON integer (Django's default key) or a string (other key types).
struct StoredUserId<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for StoredUserId<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StoredUserId<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(StoredUserId(n.to_string().into()))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(StoredUserId(n.to_string().into()))
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                s: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(StoredUserId(s.into()))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(StoredUserId(s.to_owned().into()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Reads an entry stored under `token_key`, with knox-redis's acceptance rules. The user's status
/// counts as known only if the entry has it — and, when `need_identity`, the username and email.
/// No MAC is checked: see [`decode_with`].
pub fn decode(token_key: &str, payload: &str, need_identity: bool) -> Option<CachedRow> {
    decode_with(token_key, payload, need_identity, None)
}

/// What an entry's MAC is checked against: the key, and the time now (unix seconds).
#[derive(Clone, Copy)]
pub struct Verifier<'a> {
    pub key: &'a [u8],
    pub now: i64,
}

/// [`decode`]; with `verifier`, the user's status counts as known only if the entry's MAC
/// matches and its `until` has not passed.
pub fn decode_with(
    token_key: &str,
    payload: &str,
    need_identity: bool,
    verifier: Option<Verifier<'_>>,
) -> Option<CachedRow> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return None;
    }
    let entry: StoredEntry = serde_json::from_str(payload).ok()?;
    if entry.schema_version != 2 || entry.token_key != token_key {
        return None;
    }
    // A digest is hex; anything else cannot match a real token anyway. Lowercase hex (what knox
    // writes) is checked by the parse itself; only other text needs looking at again.
    let digest = StoredDigest::parse(&entry.digest);
    let readable = match &digest {
        StoredDigest::Hex(d) => !d.as_bytes().is_empty(),
        StoredDigest::Other(text) => {
            !text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_hexdigit())
        }
    };
    if !readable {
        return None;
    }
    let created = parse_isoformat(&entry.created)?;
    let expiry = match &entry.expiry {
        None => None,
        Some(e) => Some(parse_isoformat(e)?),
    };
    let user_id = entry.user_id.0;
    if user_id.is_empty() || user_id.len() > 64 {
        return None;
    }
    let user = match entry.knoxgate {
        Some(StoredStatus {
            is_active,
            is_staff: Some(is_staff),
            is_superuser: Some(is_superuser),
            groups: Some(groups),
            username,
            email,
            until,
            mac,
        }) if verifier.is_none_or(|v| {
            let (Some(until), Some(mac)) = (until, mac.as_deref()) else {
                return false;
            };
            let input = mac_input(&Signed {
                token_key,
                digest: &digest.to_text(),
                user_id: &user_id,
                created,
                expiry,
                is_active,
                is_staff,
                is_superuser,
                groups: groups.iter().map(String::as_str),
                identity: username.as_deref().zip(email.as_deref()),
                until,
            });
            until > v.now && mac_matches(v.key, &input, mac)
        }) =>
        {
            let known = UserInfo {
                is_active,
                is_staff,
                is_superuser,
                groups: groups.into_iter().map(CompactString::from).collect(),
                ..UserInfo::default()
            };
            match (username, email) {
                (Some(username), Some(email)) => Some(UserInfo {
                    username: username.as_ref().into(),
                    email: email.as_ref().into(),
                    ..known
                }),
                // Status known, identity not recorded: fine unless identity headers need it.
                _ if !need_identity => Some(known),
                _ => None,
            }
        }
        // No knoxgate field, one without the flags and groups, or (with a key) one whose MAC
        // fails or whose time is up: the user must be confirmed.
        _ => None,
    };
    Some(CachedRow {
        digest,
        token_key: token_key.into(),
        user_id: user_id.as_ref().into(),
        created,
        expiry,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use time::macros::datetime;

    fn redis_json() -> Value {
        crate::knox_compat("redis.json")
    }

    fn row() -> TokenRow {
        TokenRow {
            digest: StoredDigest::parse("3c34a6be886bd514"),
            token_key: "3a97fcfba3ee5cc".into(),
            user_id: "13".into(),
            created: datetime!(2026-11-25 04:06:00.570372 UTC),
            expiry: Some(datetime!(2026-11-25 14:06:00.570105 UTC)),
            user: UserInfo {
                is_active: true,
                username: "zoë".into(),
                email: "z@x".into(),
                ..UserInfo::default()
            },
        }
    }

    #[test]
    fn entries_written_by_knox_redis_are_read() {
        let v = redis_json();
        for ex in v["examples"].as_array().unwrap() {
            let key = ex["db_row"]["token_key"].as_str().unwrap();
            let got =
                decode(key, ex["redis_value_raw"].as_str().unwrap(), false).expect("readable");
            assert!(matches!(got.digest, StoredDigest::Hex(_)));
            assert_eq!(
                got.digest.to_text(),
                ex["db_row"]["digest"].as_str().unwrap()
            );
            assert_eq!(got.user_id, ex["db_row"]["user_id"].to_string());
            assert_eq!(
                format_isoformat(got.created),
                ex["db_row"]["created"].as_str().unwrap()
            );
            assert_eq!(
                got.expiry.map(format_isoformat).as_deref(),
                ex["db_row"]["expiry"].as_str()
            );
            assert_eq!(got.user, None);
        }
        let foreign = v["foreign_writer_check"]["payload"].as_str().unwrap();
        assert!(decode("7f84a8dd1717525", foreign, false).is_some());
    }

    #[test]
    fn our_entry_is_knox_redis_bytes_plus_one_field() {
        let v = redis_json();
        let ex = &v["examples"][0];
        let db = &ex["db_row"];
        let mut r = row();
        r.digest = StoredDigest::parse(db["digest"].as_str().unwrap());
        let ours = encode(&r, false);
        let theirs = ex["redis_value_raw"].as_str().unwrap();
        // Same bytes up to the closing brace, then our extra field.
        let prefix = &theirs[..theirs.len() - 1];
        assert!(ours.starts_with(prefix), "{ours}\n{theirs}");
        assert_eq!(
            &ours[prefix.len()..],
            ", \"knoxgate\": {\"is_active\": true, \"is_staff\": false, \"is_superuser\": false, \"groups\": []}}"
        );
        // Without identity the entry still gives the status; with identity required it does not.
        let read = decode(&r.token_key, &ours, false)
            .unwrap()
            .into_row()
            .unwrap();
        assert!(read.user.is_active && read.user.username.is_empty());
        assert_eq!(decode(&r.token_key, &ours, true).unwrap().user, None);
        let full = encode(&r, true);
        assert_eq!(
            decode(&r.token_key, &full, true)
                .unwrap()
                .into_row()
                .unwrap(),
            r
        );
    }

    #[test]
    fn flags_and_groups_round_trip_and_old_entries_need_confirming() {
        let mut r = row();
        r.user.is_staff = true;
        r.user.groups = ["a, \"b\"".into(), "équipe".into()].into();
        for identity in [false, true] {
            let read = decode(&r.token_key, &encode(&r, identity), identity)
                .unwrap()
                .into_row()
                .unwrap();
            assert_eq!(read.user.groups, r.user.groups);
            assert!(read.user.is_staff && !read.user.is_superuser);
        }
        // An entry from a knoxgate without policies: status only. Its flags are not known,
        // so it is not a known user (it gets confirmed), never a user without privileges.
        let old = encode(&r, false).replace(
            ", \"is_staff\": true, \"is_superuser\": false, \"groups\": [\"a, \\\"b\\\"\", \"\u{e9}quipe\"]",
            "",
        );
        assert!(
            old.ends_with("\"knoxgate\": {\"is_active\": true}}"),
            "{old}"
        );
        let read = decode(&r.token_key, &old, false).unwrap();
        assert_eq!(read.user, None);
        // Each of the three missing is enough.
        for field in ["\"is_staff\": true, ", "\"is_superuser\": false, "] {
            let partial = encode(&r, false).replace(field, "");
            assert_ne!(partial, encode(&r, false));
            assert_eq!(decode(&r.token_key, &partial, false).unwrap().user, None);
        }
        let no_groups =
            encode(&r, false).replace(", \"groups\": [\"a, \\\"b\\\"\", \"\u{e9}quipe\"]", "");
        assert_ne!(no_groups, encode(&r, false));
        assert_eq!(decode(&r.token_key, &no_groups, false).unwrap().user, None);
        // Wrong types fail the entry.
        let bad = encode(&r, false).replace("\"is_staff\": true", "\"is_staff\": 1");
        assert_eq!(decode(&r.token_key, &bad, false), None);
    }

    fn decode_any(key: &str, payload: &str) -> Option<CachedRow> {
        decode(key, payload, true)
    }

    #[test]
    fn variants_follow_knox_redis_acceptance() {
        let base = encode(&row(), true);
        let variant = |from: &str, to: &str| base.replace(from, to);
        // Accepted by knox-redis and by us.
        assert!(
            decode_any(
                "3a97fcfba3ee5cc",
                &variant("\"user_id\": 13", "\"user_id\": \"13\"")
            )
            .is_some()
        );
        assert!(
            decode_any(
                "3a97fcfba3ee5cc",
                &variant("04:06:00.570372+00:00", "04:06:00.570372Z")
            )
            .is_some()
        );
        // Upper-case hex is readable, kept as written, and matches nothing.
        let upper = decode_any(
            "3a97fcfba3ee5cc",
            &variant("3c34a6be886bd514", "3C34A6BE886BD514"),
        )
        .unwrap();
        assert_eq!(upper.digest.to_text(), "3C34A6BE886BD514");
        assert!(matches!(upper.digest, StoredDigest::Other(_)));
        // JSON escapes are read as Python writes them (ensure_ascii).
        let escaped = variant("\"username\": \"zo\u{eb}\"", "\"username\": \"zo\\u00eb\"");
        assert_ne!(escaped, base);
        let read = decode_any("3a97fcfba3ee5cc", &escaped).unwrap();
        assert_eq!(read.user.unwrap().username, "zo\u{eb}");
        // Misses.
        for (from, to) in [
            ("\"user_id\": 13", "\"user_id\": 1.5"),
            ("\"user_id\": 13", "\"user_id\": \"\""),
            ("\"knoxgate\": {", "\"knoxgate\": 5, \"other\": {"),
            ("\"username\": \"zo\u{eb}\"", "\"username\": 5"),
            ("\"schema_version\": 2", "\"schema_version\": 1"),
            (
                "\"token_key\": \"3a97fcfba3ee5cc\"",
                "\"token_key\": \"other\"",
            ),
            ("2026-11-25T04:06:00.570372+00:00", "yesterday"),
            ("\"user_id\": 13, ", ""),
            ("\"digest\": \"3c34a6be886bd514\"", "\"digest\": 5"),
            ("\"digest\": \"3c34a6be886bd514\"", "\"digest\": \"\""),
            (
                "\"digest\": \"3c34a6be886bd514\"",
                "\"digest\": \"3c34-not-hex\"",
            ),
            ("\"is_active\": true", "\"is_active\": \"yes\""),
        ] {
            let changed = variant(from, to);
            assert_ne!(changed, base, "{from} not in the entry");
            assert_eq!(
                decode_any("3a97fcfba3ee5cc", &changed),
                None,
                "{from} -> {to}"
            );
        }
        assert_eq!(decode_any("3a97fcfba3ee5cc", "not json"), None);
        assert_eq!(decode_any("3a97fcfba3ee5cc", "[]"), None);
        assert_eq!(
            decode_any("3a97fcfba3ee5cc", &" ".repeat(MAX_PAYLOAD_BYTES + 1)),
            None
        );
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_764_000_000;

    fn sealed(r: &TokenRow, identity: bool, until: i64) -> String {
        encode_with(r, identity, Some(Seal { key: KEY, until }))
    }

    fn verified(r: &TokenRow, payload: &str, identity: bool) -> Option<UserInfo> {
        let v = Verifier { key: KEY, now: NOW };
        decode_with(&r.token_key, payload, identity, Some(v))
            .unwrap()
            .user
    }

    #[test]
    fn a_sealed_entry_is_trusted_under_its_key_and_read_by_anyone() {
        let mut r = row();
        r.user.groups = ["ops".into()].into();
        for identity in [false, true] {
            let e = sealed(&r, identity, NOW + 60);
            assert!(e.contains("\"until\": 1764000060, \"mac\": \""), "{e}");
            let user = verified(&r, &e, identity).expect("trusted");
            assert!(user.is_active && user.groups == r.user.groups);
            // knox-redis's fields are untouched, and without a key it reads as before.
            assert!(e.starts_with("{\"schema_version\": 2, \"digest\": \"3c34a6be886bd514\""));
            assert!(decode(&r.token_key, &e, identity).unwrap().user.is_some());
        }
        // Another key does not verify it.
        let e = sealed(&r, false, NOW + 60);
        let other = Verifier {
            key: b"another key, another key, another",
            now: NOW,
        };
        assert_eq!(
            decode_with(&r.token_key, &e, false, Some(other))
                .unwrap()
                .user,
            None
        );
    }

    #[test]
    fn with_a_key_unsealed_forged_or_stale_entries_are_only_hints() {
        let mut r = row();
        r.user.is_staff = true;
        r.user.groups = ["ops".into()].into();
        let good = sealed(&r, true, NOW + 60);
        assert!(verified(&r, &good, true).is_some());
        // No MAC at all (a knoxgate without the key, or a forger): confirmed, and still readable.
        let unsealed = encode(&r, true);
        let read = decode_with(
            &r.token_key,
            &unsealed,
            true,
            Some(Verifier { key: KEY, now: NOW }),
        )
        .expect("still a readable entry");
        assert_eq!(read.user, None);
        assert_eq!(read.user_id, "13");
        // Every bound field changed under the same MAC fails it.
        for (from, to) in [
            ("\"user_id\": 13", "\"user_id\": 1"),
            ("\"user_id\": 13", "\"user_id\": \"13 \""),
            (
                "\"digest\": \"3c34a6be886bd514\"",
                "\"digest\": \"3c34a6be886bd515\"",
            ),
            ("14:06:00.570105", "15:06:00.570105"),
            ("04:06:00.570372", "04:06:00.570373"),
            ("\"is_active\": true", "\"is_active\": false"),
            ("\"is_staff\": true", "\"is_staff\": false"),
            ("\"is_superuser\": false", "\"is_superuser\": true"),
            ("\"groups\": [\"ops\"]", "\"groups\": [\"ops\", \"admins\"]"),
            ("\"groups\": [\"ops\"]", "\"groups\": []"),
            ("\"username\": \"zo\u{eb}\"", "\"username\": \"root\""),
            ("\"email\": \"z@x\"", "\"email\": \"r@x\""),
            ("\"until\": 1764000060", "\"until\": 1864000060"),
            ("\"mac\": \"", "\"mac\": \"00"),
            (", \"until\": 1764000060", ""),
        ] {
            let changed = good.replace(from, to);
            assert_ne!(changed, good, "{from} not in the entry");
            let read = decode_with(
                &r.token_key,
                &changed,
                true,
                Some(Verifier { key: KEY, now: NOW }),
            );
            assert_eq!(read.and_then(|c| c.user), None, "{from} -> {to}");
        }
        // Identity dropped from the entry: the MAC covered it, so it fails too.
        let without_identity = sealed(&r, true, NOW + 60)
            .replace(", \"username\": \"zo\u{eb}\", \"email\": \"z@x\"", "");
        assert_eq!(verified(&r, &without_identity, false), None);
        // The same entry read after its time is up (a copy replayed later) is not trusted.
        assert!(verified(&r, &sealed(&r, true, NOW + 1), true).is_some());
        assert_eq!(verified(&r, &sealed(&r, true, NOW), true), None);
        // An entry of another token key does not verify under this one, even when renamed.
        let mut other = r.clone();
        other.token_key = "ffffffffffffff0".into();
        let moved = sealed(&other, true, NOW + 60).replace("ffffffffffffff0", &r.token_key);
        assert_eq!(verified(&r, &moved, true), None);
    }

    #[test]
    fn mac_input_keeps_fields_apart() {
        let r = row();
        let input = |user_id: &str, digest: &str, groups: &[&str]| {
            mac_input(&Signed {
                token_key: &r.token_key,
                digest,
                user_id,
                created: r.created,
                expiry: r.expiry,
                is_active: true,
                is_staff: false,
                is_superuser: false,
                groups: groups.iter().copied(),
                identity: None,
                until: NOW,
            })
        };
        // Moving bytes from one field to the next changes the input.
        assert_ne!(input("1", "23", &[]), input("12", "3", &[]));
        assert_ne!(input("1", "2", &["a", "b"]), input("1", "2", &["ab"]));
        assert_ne!(input("1", "2", &["a,b"]), input("1", "2", &["a", "b"]));
        assert_eq!(input("1", "2", &["a"]), input("1", "2", &["a"]));
        assert_eq!(
            hex::encode(mac(b"key", b"The quick brown fox jumps over the lazy dog")),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert!(mac_matches(
            b"key",
            b"The quick brown fox jumps over the lazy dog",
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        ));
        assert!(!mac_matches(b"key", b"x", "zz"));
    }

    #[test]
    fn non_integer_user_ids_are_strings() {
        let mut r = row();
        r.user_id = "2f1e-uuid".into();
        r.expiry = None;
        let e = encode(&r, true);
        assert!(e.contains("\"user_id\": \"2f1e-uuid\"") && e.contains("\"expiry\": null"));
        assert_eq!(
            decode(&r.token_key, &e, true).unwrap().into_row().unwrap(),
            r
        );
    }
}
