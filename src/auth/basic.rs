//! HTTP Basic credentials for login, parsed as DRF's `BasicAuthentication` does.

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
    let decoded = python_b64decode(encoded).ok_or(BasicError::BadEncoding)?;
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

/// Python's `base64.b64decode(s)` (what DRF's `BasicAuthentication` calls), which is CPython's
/// `binascii.a2b_base64` in its lenient mode: bytes outside the alphabet are skipped, the bits
/// left over in a final group are dropped, and decoding stops at the padding that completes a
/// group (more `=` or data after it are ignored). A group left without its padding, or a lone
/// character, is an error. A strict RFC 4648 decoder would refuse headers knox accepts.
fn python_b64decode(input: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u8> {
        match c {
            b'A'..=b'Z' => Some(c - b'A'),
            b'a'..=b'z' => Some(c - b'a' + 26),
            b'0'..=b'9' => Some(c - b'0' + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let (mut quad_pos, mut left, mut pads) = (0u8, 0u8, 0u8);
    for &c in input {
        if c == b'=' {
            pads += 1;
            if quad_pos >= 2 && quad_pos + pads >= 4 {
                return Some(out);
            }
            continue;
        }
        let Some(v) = value(c) else { continue };
        pads = 0;
        match quad_pos {
            0 => left = v,
            1 => {
                out.push((left << 2) | (v >> 4));
                left = v & 0x0f;
            }
            2 => {
                out.push((left << 4) | (v >> 2));
                left = v & 0x03;
            }
            _ => out.push((left << 6) | v),
        }
        quad_pos = (quad_pos + 1) % 4;
    }
    (quad_pos == 0).then_some(out)
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
    fn base64_is_decoded_as_python_decodes_it() {
        // Each case as Python 3.11's base64.b64decode answers it (None: binascii.Error).
        let cases: [(&str, Option<&[u8]>); 13] = [
            ("YWxpY2U6YWxpY2UtcGFzcx==", Some(b"alice:alice-pass")), // bits left over
            ("YWxpY2U6YWxpY2UtcGFzcw===", Some(b"alice:alice-pass")), // excess padding
            ("YWxpY2U6YWxpY2UtcGFzcw==YQ==", Some(b"alice:alice-pass")), // data after it
            ("YWxpY2U6YWxpY2UtcGFzcw", None),                        // padding missing
            ("YWxp=Y2U6cHc", None),
            ("YWxp!Y2U6cHc=", Some(b"alice:pw")), // outside the alphabet: skipped
            ("YW=x", None),
            ("Y", None),
            ("YWx", None),
            ("=YWxpY2U6cHc=", Some(b"alice:pw")),
            ("YWxpY2U6cHc=\0", Some(b"alice:pw")),
            ("YWxpY2U6cHc9", Some(b"alice:pw=")),
            ("", Some(b"")),
        ];
        for (input, want) in cases {
            assert_eq!(
                python_b64decode(input.as_bytes()).as_deref(),
                want,
                "{input:?}"
            );
        }
        let c = parse("Basic YWxpY2U6YWxpY2UtcGFzcx==").unwrap();
        assert_eq!(c.password, "alice-pass");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = parse("Basic YWxpY2U6YWxpY2UtcGFzcw==").unwrap();
        assert!(!format!("{c:?}").contains("alice-pass"));
    }
}
