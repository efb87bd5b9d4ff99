//! HTTP Basic credentials for login, parsed as DRF's `BasicAuthentication` does.

use base64::Engine;

/// A username and password from a login request.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for LoginCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Passwords never reach logs, not even through a stray `{:?}`.
        f.debug_struct("LoginCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a Basic header was refused; `detail()` gives DRF's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicError {
    NotProvided,
    NoCredentials,
    HasSpaces,
    BadEncoding,
}

impl BasicError {
    pub fn detail(self) -> &'static str {
        match self {
            Self::NotProvided => "Authentication credentials were not provided.",
            Self::NoCredentials => "Invalid basic header. No credentials provided.",
            Self::HasSpaces => {
                "Invalid basic header. Credentials string should not contain spaces."
            }
            Self::BadEncoding => "Invalid basic header. Credentials not correctly base64 encoded.",
        }
    }
}

/// Parses `Authorization: Basic <b64(user:password)>`.
pub fn parse_basic(value: Option<&[u8]>) -> Result<LoginCredentials, BasicError> {
    let value = value.ok_or(BasicError::NotProvided)?;
    let mut words = value
        .split(|b| b.is_ascii_whitespace() || *b == 0x0b)
        .filter(|w| !w.is_empty());
    match words.next() {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"basic") => {}
        _ => return Err(BasicError::NotProvided),
    }
    let encoded = words.next().ok_or(BasicError::NoCredentials)?;
    if words.next().is_some() {
        return Err(BasicError::HasSpaces);
    }
    // Python's b64decode (validate=False) discards bytes outside the alphabet before decoding.
    let cleaned: Vec<u8> = encoded
        .iter()
        .copied()
        .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        .collect();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&cleaned)
        .map_err(|_| BasicError::BadEncoding)?;
    // DRF tries UTF-8 and falls back to latin-1, where every byte is one code point.
    let text = match String::from_utf8(decoded) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
    };
    let (username, password) = text.split_once(':').ok_or(BasicError::BadEncoding)?;
    Ok(LoginCredentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Result<LoginCredentials, BasicError> {
        parse_basic(Some(v.as_bytes()))
    }

    #[test]
    fn recorded_headers() {
        let c = parse("Basic YWxpY2U6YWxpY2UtcGFzcw==").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "alice-pass")
        );
        let c = parse("Basic ZG9yYTpww6Rzc3fDtnJk4pyT").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("dora", "pässwörd✓")
        );
        assert_eq!(parse("Basic !!!notbase64"), Err(BasicError::BadEncoding));
        assert_eq!(parse_basic(None), Err(BasicError::NotProvided));
    }

    #[test]
    fn shapes() {
        assert_eq!(parse("Basic"), Err(BasicError::NoCredentials));
        assert_eq!(parse("Basic a b"), Err(BasicError::HasSpaces));
        assert_eq!(parse("Token abc"), Err(BasicError::NotProvided));
        // "nocolon" has no ':' separator.
        assert_eq!(parse("Basic bm9jb2xvbg=="), Err(BasicError::BadEncoding));
        // latin-1 fallback: b"\xe9:x"
        let c = parse("Basic 6Tp4").unwrap();
        assert_eq!(c.username, "é");
        // The password may contain ':'.
        let c = parse("basic dTpwOnE=").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p:q"));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = parse("Basic YWxpY2U6YWxpY2UtcGFzcw==").unwrap();
        assert!(!format!("{c:?}").contains("alice-pass"));
    }
}
