//! A table of hostile requests: each gets the right 4xx — never a 5xx, never a 200.

use crate::support::*;

struct Case {
    what: &'static str,
    request: Vec<u8>,
    status: u16,
}

fn req(method: &str, path: &str, headers: &[(&str, &[u8])], body: &[u8]) -> Vec<u8> {
    let mut r =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n").into_bytes();
    for (k, v) in headers {
        r.extend_from_slice(k.as_bytes());
        r.extend_from_slice(b": ");
        r.extend_from_slice(v);
        r.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() {
        r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn hostile_requests_get_the_right_4xx() {
    let db = TestDb::migrated().await;
    let t = user_with_token(&db, "alice").await;
    let s = TestServer::start(&db, "").await;
    let wrong_tail = {
        let last = if t.token.ends_with('a') { 'b' } else { 'a' };
        format!("Token {}{last}", &t.token[..63])
    };
    // The first of a, c, e in the token swapped for its Cyrillic twin (а, с, е); a token
    // without any of them (one in 600,000) gets а for its first character. Either way it
    // differs from the real token by one non-ASCII character.
    let lookalike = {
        let at = t.token.find(['a', 'c', 'e']).unwrap_or(0);
        let twin = match &t.token[at..=at] {
            "c" => "\u{441}",
            "e" => "\u{435}",
            _ => "\u{430}",
        };
        format!("Token {}{twin}{}", &t.token[..at], &t.token[at + 1..])
    };
    assert!(!lookalike.is_ascii(), "{lookalike}");
    let huge_json = format!(
        "{{\"username\": \"alice\", \"password\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let login = "/api/auth/login/";
    let cases = vec![
        Case {
            what: "non-UTF-8 token",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", b"Token \xc3\x28\xa0\xa1")],
                b"",
            ),
            status: 401,
        },
        // Control bytes make the header itself invalid HTTP: refused by the parser.
        Case {
            what: "control bytes in token",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", b"Token abc\x01\x02def")],
                b"",
            ),
            status: 400,
        },
        Case {
            what: "tab-separated keyword (knox accepts)",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", format!("Token\t{}", t.token).as_bytes())],
                b"",
            ),
            status: 200,
        },
        Case {
            what: "unicode look-alike token",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", lookalike.as_bytes())],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "unicode look-alike keyword",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", format!("Тoken {}", t.token).as_bytes())],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "SQL metacharacters in token",
            request: req(
                "GET",
                "/verify",
                &[(
                    "Authorization",
                    b"Token ' OR '1'='1'; DROP TABLE knox_authtoken;--",
                )],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "SQL metacharacters as one word",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", b"Token 'OR'1'='1'--")],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "right token_key, wrong tail",
            request: req(
                "GET",
                "/verify",
                &[("Authorization", wrong_tail.as_bytes())],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "token_key alone",
            request: req(
                "GET",
                "/verify",
                &[(
                    "Authorization",
                    format!("Token {}", &t.token[..15]).as_bytes(),
                )],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "duplicate Authorization headers",
            request: req(
                "GET",
                "/verify",
                &[
                    ("Authorization", format!("Token {}", t.token).as_bytes()),
                    ("Authorization", b"Token x"),
                ],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "64 KiB header",
            request: req(
                "GET",
                "/verify",
                &[(
                    "Authorization",
                    format!("Token {}", "a".repeat(64 * 1024)).as_bytes(),
                )],
                b"",
            ),
            status: 431,
        },
        Case {
            what: "forged identity header without token",
            request: req("GET", "/verify", &[("X-Auth-User-Id", b"1")], b""),
            status: 401,
        },
        Case {
            what: "SQL metacharacters in username",
            request: req(
                "POST",
                login,
                &[("Authorization", b"Basic JyBPUiAnMSc9JzE7LS06eA==")],
                b"",
            ),
            status: 401,
        },
        Case {
            what: "NUL in username",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"application/json")],
                b"{\"username\": \"ali\\u0000ce\", \"password\": \"pw\"}",
            ),
            status: 401,
        },
        Case {
            what: "huge JSON body on login",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"application/json")],
                huge_json.as_bytes(),
            ),
            status: 413,
        },
        Case {
            what: "wrong content type on login",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"text/plain")],
                b"username=alice&password=pw",
            ),
            status: 415,
        },
        Case {
            what: "form-encoded login",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"application/x-www-form-urlencoded")],
                b"username=alice&password=pw",
            ),
            status: 415,
        },
        Case {
            what: "JSON that is not an object",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"application/json")],
                b"[\"alice\", \"pw\"]",
            ),
            status: 400,
        },
        Case {
            what: "JSON with wrong types",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"application/json")],
                b"{\"username\": 1, \"password\": true}",
            ),
            status: 400,
        },
        Case {
            what: "truncated JSON",
            request: req(
                "POST",
                login,
                &[("Content-Type", b"application/json")],
                b"{\"username\": \"al",
            ),
            status: 400,
        },
        Case {
            what: "non-UTF-8 Basic credentials",
            request: req("POST", login, &[("Authorization", b"Basic \xff\xfe")], b""),
            status: 401,
        },
        Case {
            what: "logout with a forged token",
            request: req(
                "POST",
                "/api/auth/logout/",
                &[("Authorization", b"Token '; DELETE FROM knox_authtoken;--")],
                b"",
            ),
            status: 401,
        },
    ];
    for case in cases {
        let r = raw(s.addr(), &case.request).await;
        assert_eq!(r.status, case.status, "{}: {}", case.what, r.body_text());
        if case.status != 200 {
            assert_eq!(r.header("x-auth-user-id"), None, "{}", case.what);
        }
    }
    // None of it hurt the real token or the tables.
    assert_eq!(s.verify(&t.token).await.status, 200);
    let rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM knox_authtoken", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    s.stop().await;
}
