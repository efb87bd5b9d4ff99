//! The change format: what the triggers installed by `knoxgate migrate` write into NOTIFY
//! payloads and the revocation log (`t|user|key`, `i|user|key`, `u|user|`, `a||`), and the
//! feed's own self-test payload. The Postgres feed reads it from its listener; the relays copy
//! it verbatim into the Redis stream, whose readers parse it again here.

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
        assert_eq!(parse_payload("x|1|k"), None);
        assert_eq!(parse_payload("garbage"), None);
        // A self-test echo is not a change.
        assert_eq!(parse_payload("h|abcd|7"), None);
    }
}
