//! `Authorization: Token <token>` parsing, byte for byte as `knox.auth.TokenAuthentication` does.

use super::decide::DenyReason;
use super::token::PresentedToken;

/// What the `Authorization` header(s) of a request carry, as knox would classify them.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A token string to look up (not yet known to be valid).
    Token(&'a str),
    /// Knox refuses the header before any lookup.
    Refused(DenyReason),
}

/// Python's `bytes.split()` separators: space, \t, \n, \r, \x0b, \x0c.
fn is_python_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Classifies the `Authorization` header values of a request.
///
/// `values` are all `Authorization` headers in order. Knox sees one header; several are joined
/// with `", "` as RFC 9110 §5.3 allows a recipient to do, which makes them "more than two words",
/// so duplicates are refused rather than letting either copy win.
pub fn parse_authorization<'a>(values: &[&'a [u8]], keyword: &str) -> Credential<'a> {
    let value: &'a [u8] = match values {
        [] => return Credential::Refused(DenyReason::NoCredentials),
        [one] => one,
        _ => return Credential::Refused(DenyReason::TokenHasSpaces),
    };
    let mut words = value
        .split(|b| is_python_whitespace(*b))
        .filter(|w| !w.is_empty());
    let Some(scheme) = words.next() else {
        return Credential::Refused(DenyReason::NoCredentials);
    };
    // Knox lowercases both sides; for non-ASCII bytes Python's bytes.lower() leaves them as they
    // are, which is exactly eq_ignore_ascii_case.
    if !scheme.eq_ignore_ascii_case(keyword.as_bytes()) {
        return Credential::Refused(DenyReason::NoCredentials);
    }
    let Some(token) = words.next() else {
        return Credential::Refused(DenyReason::NoToken);
    };
    if words.next().is_some() {
        return Credential::Refused(DenyReason::TokenHasSpaces);
    }
    // Knox answers 500 for a token that is not UTF-8 (an uncaught UnicodeDecodeError);
    // django-rest-knox-redis answers 401 "Invalid token.", which is what a client deserves.
    match std::str::from_utf8(token) {
        Ok(token) => Credential::Token(token),
        Err(_) => Credential::Refused(DenyReason::InvalidToken),
    }
}

impl<'a> Credential<'a> {
    /// The token, checked against the length cap, ready for hashing.
    pub fn into_presented(self, max_token_chars: usize) -> Result<PresentedToken<'a>, DenyReason> {
        match self {
            Credential::Token(t) if t.chars().count() <= max_token_chars => {
                Ok(PresentedToken::new(t))
            }
            // No real knox token is this long; hashing it would only cost us CPU.
            Credential::Token(_) => Err(DenyReason::InvalidToken),
            Credential::Refused(reason) => Err(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Credential<'_> {
        parse_authorization(&[v.as_bytes()], "Token")
    }

    #[test]
    fn cases_recorded_from_knox() {
        let tok = "cf5daa07b0ead9ba70514851eea827972cc27b2d95fd0afdad22b0c8e4385b77";
        assert_eq!(parse(&format!("Token {tok}")), Credential::Token(tok));
        assert_eq!(parse(&format!("token {tok}")), Credential::Token(tok));
        assert_eq!(parse(&format!("TOKEN {tok}")), Credential::Token(tok));
        assert_eq!(parse(&format!("Token  \t{tok} ")), Credential::Token(tok));
        assert_eq!(
            parse(&format!("Bearer {tok}")),
            Credential::Refused(DenyReason::NoCredentials)
        );
        assert_eq!(parse("Token"), Credential::Refused(DenyReason::NoToken));
        assert_eq!(
            parse("Token a b"),
            Credential::Refused(DenyReason::TokenHasSpaces)
        );
        assert_eq!(parse(""), Credential::Refused(DenyReason::NoCredentials));
        assert_eq!(parse("   "), Credential::Refused(DenyReason::NoCredentials));
        assert_eq!(
            parse_authorization(&[], "Token"),
            Credential::Refused(DenyReason::NoCredentials)
        );
    }

    #[test]
    fn non_utf8_token_is_invalid_not_a_crash() {
        let v: &[u8] = b"Token \xff\xfe\xfd";
        assert_eq!(
            parse_authorization(&[v], "Token"),
            Credential::Refused(DenyReason::InvalidToken)
        );
    }

    #[test]
    fn duplicate_headers_are_refused() {
        let a: &[u8] = b"Token aaaa";
        let b: &[u8] = b"Token bbbb";
        assert_eq!(
            parse_authorization(&[a, b], "Token"),
            Credential::Refused(DenyReason::TokenHasSpaces)
        );
    }

    #[test]
    fn configured_keyword_is_used() {
        let v: &[u8] = b"bearer abc";
        assert_eq!(
            parse_authorization(&[v], "Bearer"),
            Credential::Token("abc")
        );
        assert_eq!(
            parse_authorization(&[v], "Token"),
            Credential::Refused(DenyReason::NoCredentials)
        );
    }

    #[test]
    fn vertical_tab_and_form_feed_separate_words_like_python() {
        let v: &[u8] = b"Token\x0babc\x0c";
        assert_eq!(parse_authorization(&[v], "Token"), Credential::Token("abc"));
        // A non-breaking space is not ASCII whitespace: it stays inside the word.
        let v = "Token\u{a0}abc".as_bytes();
        assert_eq!(
            parse_authorization(&[v], "Token"),
            Credential::Refused(DenyReason::NoCredentials)
        );
    }

    #[test]
    fn oversized_token_is_invalid() {
        let long = "a".repeat(300);
        let c = Credential::Token(&long);
        assert_eq!(c.into_presented(256).err(), Some(DenyReason::InvalidToken));
        assert!(Credential::Token("abc").into_presented(256).is_ok());
    }
}
