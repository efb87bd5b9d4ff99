//! The change format: what the triggers installed by `knoxgate migrate` write into NOTIFY
//! payloads (`t|user|key`, `i|user|key`, `u|user|`, `a||`), and the feed's own self-test
//! payload. The Postgres feed reads it from its listener; the relays copy it verbatim into the
//! Redis stream, whose readers parse it again here. A user id comes with `%` and `|`
//! percent-escaped (`%25`, `%7C`): a text primary key (an email address) may hold `|`, and a
//! token key (free-text prefix) may too, so only one of them can be taken as it is.

use super::Change;

/// What arrives on the listener connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A change written by the triggers.
    Change(Change),
    /// A self-test notification: the sending instance's nonce and sequence number.
    Echo { instance: String, seq: u64 },
}

/// Reads one NOTIFY payload written by the triggers: `t|user|key`, `i|user|key`, `u|user|`,
/// `a||` (a TRUNCATE).
pub fn parse_payload(payload: &str) -> Option<Change> {
    match parse_message(payload)? {
        Message::Change(change) => Some(change),
        Message::Echo { .. } => None,
    }
}

/// Reads one NOTIFY payload: a change (see [`parse_payload`]) or a self-test `h|instance|seq`.
pub fn parse_message(payload: &str) -> Option<Message> {
    let mut parts = payload.splitn(3, '|');
    let (kind, first, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let first = unescape_user_id(first);
    let change = match kind {
        "t" => Change::Token {
            token_key: rest.into(),
            user_id: first.into(),
        },
        "i" => Change::Inserted {
            token_key: rest.into(),
        },
        "u" => Change::User {
            user_id: first.into(),
        },
        "a" => Change::Truncated,
        "h" => {
            return Some(Message::Echo {
                instance: first.into(),
                seq: rest.parse().ok()?,
            });
        }
        _ => return None,
    };
    Some(Message::Change(change))
}

/// A payload as the triggers write it, from a revocation log row's columns (the relays' replay
/// appends what it read from the log).
pub fn payload(kind: &str, user_id: &str, token_key: &str) -> String {
    format!("{kind}|{}|{token_key}", escape_user_id(user_id))
}

/// A user id as payloads carry it (the triggers' `replace` twice, in the same order).
fn escape_user_id(user_id: &str) -> String {
    user_id.replace('%', "%25").replace('|', "%7C")
}

/// The user id a payload carries. Only the two escapes the triggers write are undone; a `%`
/// followed by anything else (triggers installed before ids were escaped) is kept as it is.
fn unescape_user_id(field: &str) -> std::borrow::Cow<'_, str> {
    if !field.contains('%') {
        return field.into();
    }
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..];
        if let Some(after) = escape.strip_prefix("%25") {
            out.push('%');
            rest = after;
        } else if let Some(after) = escape.strip_prefix("%7C") {
            out.push('|');
            rest = after;
        } else {
            out.push('%');
            rest = &escape[1..];
        }
    }
    out.push_str(rest);
    out.into()
}

/// The `kind` label a change is counted under (`knoxgate_feed_events_total`).
pub fn kind_label(change: &Change) -> &'static str {
    match change {
        Change::Token { .. } => "token",
        Change::Inserted { .. } => "insert",
        Change::User { .. } => "user",
        Change::Everything => "resync",
        Change::Truncated => "truncate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_logged_row_reads_back_as_written() {
        let odd = "x|y%7C@example.com%";
        let key = "p|refix12345678";
        for (kind, user_id, token_key, change) in [
            (
                "t",
                odd,
                key,
                Change::Token {
                    token_key: key.into(),
                    user_id: odd.into(),
                },
            ),
            (
                "u",
                odd,
                "",
                Change::User {
                    user_id: odd.into(),
                },
            ),
            (
                "i",
                odd,
                key,
                Change::Inserted {
                    token_key: key.into(),
                },
            ),
            ("a", "", "", Change::Truncated),
        ] {
            assert_eq!(
                parse_payload(&payload(kind, user_id, token_key)),
                Some(change)
            );
        }
    }

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
        assert_eq!(parse_payload("a||"), Some(Change::Truncated));
        // A user id holding '|' or '%' comes escaped; the key after it is taken as it is.
        assert_eq!(
            parse_payload("t|x%7Cy@example.com%25|a|b"),
            Some(Change::Token {
                token_key: "a|b".into(),
                user_id: "x|y@example.com%".into()
            })
        );
        assert_eq!(
            parse_payload("u|x%7Cy@example.com|"),
            Some(Change::User {
                user_id: "x|y@example.com".into()
            })
        );
        // Any other '%' is kept (triggers installed before ids were escaped).
        assert_eq!(
            parse_payload("u|50%off|"),
            Some(Change::User {
                user_id: "50%off".into()
            })
        );
        assert_eq!(parse_payload("x|1|k"), None);
        assert_eq!(parse_payload("garbage"), None);
        // A self-test echo is not a change.
        assert_eq!(parse_payload("h|abcd|7"), None);
    }
}
