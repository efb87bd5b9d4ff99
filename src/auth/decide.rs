//! The allow/deny decision for a presented token, and knox's `renew_token` rule.

use compact_str::CompactString;
use time::{Duration, OffsetDateTime};

use super::token::{StoredDigest, TokenDigest};

/// What knoxgate knows of the user behind a token.
///
/// Strings are `CompactString`s, kept inline up to 24 bytes: these rows fill the in-process
/// cache, and most of their strings are short (or empty when no identity headers are set).
///
/// The flags and groups serve per-route policies (`auth::policy`); they are always loaded with
/// the row, so a policy costs no query of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub is_active: bool,
    pub is_staff: bool,
    pub is_superuser: bool,
    pub username: CompactString,
    pub email: CompactString,
    /// Names of the user's groups, sorted. A boxed slice (two words, no allocation when empty,
    /// as for most users) rather than a `Vec`, since every cached row carries one.
    pub groups: Groups,
}

/// A user's group names.
pub type Groups = Box<[CompactString]>;

/// One `knox_authtoken` row joined with its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub digest: StoredDigest,
    pub token_key: CompactString,
    /// The user's primary key as text: integer for Django's default user, but custom user
    /// models may use other key types, and the value only ever ends up in a header.
    pub user_id: CompactString,
    pub created: OffsetDateTime,
    /// `None` for tokens made with `TOKEN_TTL=None`: they never expire.
    pub expiry: Option<OffsetDateTime>,
    pub user: UserInfo,
}

impl TokenRow {
    /// Knox's test: a token is expired when `expiry < now`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expiry.is_some_and(|e| e < now)
    }
}

/// Why a request is refused. Each maps to knox's exact `detail` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No `Authorization` header, or another scheme than the configured keyword.
    NoCredentials,
    /// The keyword alone.
    NoToken,
    /// More than two words.
    TokenHasSpaces,
    /// Unknown, wrong, expired, revoked or malformed token.
    InvalidToken,
    /// The token is right but its user is inactive.
    UserInactive,
}

impl DenyReason {
    /// DRF/knox's message, word for word.
    pub fn detail(self) -> &'static str {
        match self {
            Self::NoCredentials => "Authentication credentials were not provided.",
            Self::NoToken => "Invalid token header. No credentials provided.",
            Self::TokenHasSpaces => "Invalid token header. Token string should not contain spaces.",
            Self::InvalidToken => "Invalid token.",
            Self::UserInactive => "User inactive or deleted.",
        }
    }

    /// A bounded metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::NoToken => "no_token",
            Self::TokenHasSpaces => "token_has_spaces",
            Self::InvalidToken => "invalid_token",
            Self::UserInactive => "user_inactive",
        }
    }
}

/// The verdict on one presented token against the rows stored under its `token_key`.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'r> {
    Allow(&'r TokenRow),
    /// The digest matches but the token has expired: refuse it, and delete it as knox does.
    Expired(&'r TokenRow),
    /// The digest matches but the user is inactive.
    Inactive(&'r TokenRow),
    /// No row has this digest.
    Unknown,
}

impl Outcome<'_> {
    /// The deny reason, if this outcome refuses the request.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Outcome::Allow(_) => None,
            Outcome::Inactive(_) => Some(DenyReason::UserInactive),
            Outcome::Expired(_) | Outcome::Unknown => Some(DenyReason::InvalidToken),
        }
    }
}

/// Decides on a token whose digest is `digest` given the candidate rows for its `token_key`.
///
/// Every candidate is compared in constant time, so timing does not tell how many rows share
/// a key or which one matched.
pub fn decide<'r>(rows: &'r [TokenRow], digest: &TokenDigest, now: OffsetDateTime) -> Outcome<'r> {
    let mut matched = None;
    for row in rows {
        if row.digest.matches(digest) && matched.is_none() {
            matched = Some(row);
        }
    }
    match matched {
        None => Outcome::Unknown,
        Some(row) if row.is_expired(now) => Outcome::Expired(row),
        Some(row) if !row.user.is_active => Outcome::Inactive(row),
        Some(row) => Outcome::Allow(row),
    }
}

/// Knox's `renew_token`: the expiry to write for a token used at `now`, or `None` when no write
/// is due (no expiry, no TTL, or the move is not strictly greater than `min_interval`).
pub fn refreshed_expiry(
    row: &TokenRow,
    now: OffsetDateTime,
    ttl: Option<Duration>,
    max_ttl: Option<Duration>,
    min_interval: Duration,
) -> Option<OffsetDateTime> {
    let current = row.expiry?;
    let mut new = now + ttl?;
    if let Some(max_ttl) = max_ttl {
        new = new.min(row.created + max_ttl);
    }
    (new - current > min_interval).then_some(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn d(hex: &str) -> TokenDigest {
        TokenDigest::from_hex(hex).unwrap()
    }

    fn row(digest: &str, expiry: Option<OffsetDateTime>, active: bool) -> TokenRow {
        TokenRow {
            digest: StoredDigest::parse(digest),
            token_key: "k".into(),
            user_id: "7".into(),
            created: datetime!(2026-01-01 00:00 UTC),
            expiry,
            user: UserInfo {
                is_active: active,
                username: "u".into(),
                ..UserInfo::default()
            },
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-01-01 05:00 UTC);

    #[test]
    fn valid_token_is_allowed() {
        let rows = [row("aa", Some(datetime!(2026-01-01 10:00 UTC)), true)];
        assert_eq!(decide(&rows, &d("aa"), NOW), Outcome::Allow(&rows[0]));
    }

    #[test]
    fn token_without_expiry_never_expires() {
        let rows = [row("aa", None, true)];
        assert_eq!(
            decide(&rows, &d("aa"), datetime!(2999-01-01 0:00 UTC)),
            Outcome::Allow(&rows[0])
        );
    }

    #[test]
    fn expired_token_is_refused_even_for_inactive_user() {
        let rows = [row(
            "aa",
            Some(datetime!(2026-01-01 04:59:59.999999 UTC)),
            false,
        )];
        let out = decide(&rows, &d("aa"), NOW);
        assert_eq!(out, Outcome::Expired(&rows[0]));
        assert_eq!(out.deny_reason(), Some(DenyReason::InvalidToken));
    }

    #[test]
    fn expiry_equal_to_now_is_still_valid() {
        // knox: expired means expiry < now.
        let rows = [row("aa", Some(NOW), true)];
        assert_eq!(decide(&rows, &d("aa"), NOW), Outcome::Allow(&rows[0]));
    }

    #[test]
    fn inactive_user_is_refused_with_its_own_message() {
        let rows = [row("aa", None, false)];
        let out = decide(&rows, &d("aa"), NOW);
        assert_eq!(out.deny_reason(), Some(DenyReason::UserInactive));
        assert_eq!(
            out.deny_reason().unwrap().detail(),
            "User inactive or deleted."
        );
    }

    #[test]
    fn wrong_digest_and_no_rows_are_unknown() {
        let rows = [row("aa", None, true), row("bb", None, true)];
        assert_eq!(decide(&rows, &d("cc"), NOW), Outcome::Unknown);
        assert_eq!(decide(&[], &d("cc"), NOW), Outcome::Unknown);
        assert_eq!(decide(&rows, &d("bb"), NOW), Outcome::Allow(&rows[1]));
    }

    #[test]
    fn refresh_follows_knox_renew_token() {
        let ttl = Some(Duration::hours(10));
        let min = Duration::seconds(60);
        // Right after login: expiry ~ now + ttl, nothing to write.
        let fresh = row(
            "aa",
            Some(NOW + Duration::hours(10) - Duration::microseconds(400)),
            true,
        );
        assert_eq!(refreshed_expiry(&fresh, NOW, ttl, None, min), None);
        // Expiry one hour out: written as now + ttl.
        let old = row("aa", Some(NOW + Duration::hours(1)), true);
        assert_eq!(
            refreshed_expiry(&old, NOW, ttl, None, min),
            Some(NOW + Duration::hours(10))
        );
        // Capped at created + max_ttl (created = 00:00, max 2h -> 02:00... from http.json shape).
        let mut capped = row(
            "aa",
            Some(NOW - Duration::hours(1) + Duration::minutes(1)),
            true,
        );
        capped.created = NOW - Duration::hours(2);
        assert_eq!(
            refreshed_expiry(&capped, NOW, ttl, Some(Duration::hours(2)), min),
            Some(NOW)
        );
        // Exactly min_interval is not enough: knox wants strictly greater.
        let edge = row(
            "aa",
            Some(NOW + Duration::hours(10) - Duration::seconds(60)),
            true,
        );
        assert_eq!(refreshed_expiry(&edge, NOW, ttl, None, min), None);
        // No expiry, or no TTL: never refreshed.
        assert_eq!(
            refreshed_expiry(&row("aa", None, true), NOW, ttl, None, min),
            None
        );
        assert_eq!(refreshed_expiry(&old, NOW, None, None, min), None);
    }

    #[test]
    fn details_match_knox_word_for_word() {
        let http = crate::knox_compat("http.json");
        let body_of = |name: &str| {
            let case = http["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name);
            case.unwrap()["response"]["body"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        for (name, reason) in [
            ("protected_no_header", DenyReason::NoCredentials),
            ("protected_other_scheme_bearer", DenyReason::NoCredentials),
            ("protected_token_no_credentials", DenyReason::NoToken),
            ("protected_token_with_space", DenyReason::TokenHasSpaces),
            ("protected_unknown_token", DenyReason::InvalidToken),
            ("protected_expired_token", DenyReason::InvalidToken),
            ("protected_inactive_user_token", DenyReason::UserInactive),
        ] {
            let expected = serde_json::json!({ "detail": reason.detail() }).to_string();
            assert_eq!(body_of(name), expected, "{name}");
        }
    }
}
