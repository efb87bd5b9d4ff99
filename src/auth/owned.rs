//! The identity headers knoxgate owns: every header an allowed answer can carry (the
//! assertion's even with assertions off), the suggested names of those it is not configured to
//! send, and each of these spelled with underscores for hyphens. A client's copy of any of them
//! must never reach the upstream. Over gRPC the allowed answer names them in
//! `headers_to_remove`; over HTTP a 200 that carries no identity (a CORS preflight, an
//! anonymous request) names them in `x-envoy-auth-headers-to-remove`, which Envoy's HTTP
//! ext_authz applies and other proxies ignore: `allowed_upstream_headers` only overwrites the
//! headers an answer carries, so such a 200 would otherwise let a client's `X-Auth-User-Id`
//! through.

use hyper::header::{HeaderName, HeaderValue};

use crate::config::{Config, SUGGESTED_IDENTITY_HEADERS, VerifyConfig};

/// The header of an HTTP ext_authz answer that tells Envoy which request headers to remove.
pub const ENVOY_HEADERS_TO_REMOVE: HeaderName =
    HeaderName::from_static("x-envoy-auth-headers-to-remove");

/// Every name a client's copy of must not reach the upstream under `config` (see the module
/// doc). Worked out once, at startup.
pub fn owned_identity_headers(config: &Config) -> Vec<HeaderName> {
    let mut names = identity_header_names(&config.verify, Some(&config.assertion.header));
    for name in SUGGESTED_IDENTITY_HEADERS {
        let name = HeaderName::from_static(name);
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut owned = names.clone();
    for name in &names {
        let (twins, complete) = underscore_spellings(name);
        if !complete {
            tracing::warn!(
                header = %name,
                "an identity header name with more than {MAX_SPELLED_HYPHENS} hyphens: only its \
                 all-underscore spelling is named for removal from client requests (gRPC \
                 headers_to_remove, x-envoy-auth-headers-to-remove), not the mixed ones; drop \
                 underscore headers in the proxy (Envoy: headers_with_underscores_action)"
            );
        }
        owned.extend(twins.into_iter().filter(|twin| !names.contains(twin)));
    }
    owned
}

/// `names` as the value of [`ENVOY_HEADERS_TO_REMOVE`]: comma-separated.
pub fn envoy_headers_to_remove(names: &[HeaderName]) -> HeaderValue {
    let list = names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::try_from(list).expect("header names are valid header value characters")
}

/// Every identity header `http::respond::allow` can set under `cfg`, and `assertion`'s.
fn identity_header_names(cfg: &VerifyConfig, assertion: Option<&HeaderName>) -> Vec<HeaderName> {
    let optional = [
        &cfg.username_header,
        &cfg.email_header,
        &cfg.staff_header,
        &cfg.superuser_header,
        &cfg.groups_header,
        &cfg.expiry_header,
    ];
    std::iter::once(cfg.user_id_header.clone())
        .chain(optional.into_iter().flatten().cloned())
        .chain(assertion.cloned())
        .collect()
}

/// Names with up to this many hyphens have every spelling with underscores removed (2^n - 1 of
/// them); longer ones only the all-underscore one, so that a long configured name cannot make
/// every answer carry hundreds of names.
const MAX_SPELLED_HYPHENS: u32 = 5;

/// `name` with some or all of its hyphens written as underscores (`x_auth_user_id`,
/// `x-auth_user-id`, ...), and whether that is every such spelling. Envoy keeps headers with
/// underscores unless `headers_with_underscores_action` says otherwise, and a WSGI server that
/// maps `_` and `-` alike (gunicorn before 22, uWSGI) gives the application each of them as the
/// identity header's own variable.
fn underscore_spellings(name: &HeaderName) -> (Vec<HeaderName>, bool) {
    let text = name.as_str();
    let hyphens: Vec<usize> = text.match_indices('-').map(|(at, _)| at).collect();
    let count = u32::try_from(hyphens.len()).unwrap_or(u32::MAX);
    let spell = |mask: u64| {
        let mut bytes = text.as_bytes().to_vec();
        for (bit, &at) in hyphens.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                bytes[at] = b'_';
            }
        }
        // Only hyphens became underscores: still a valid (lower-case) header name.
        HeaderName::from_bytes(&bytes).expect("underscores are token characters")
    };
    if count == 0 {
        return (Vec::new(), true);
    }
    if count > MAX_SPELLED_HYPHENS {
        let all = HeaderName::from_bytes(text.replace('-', "_").as_bytes())
            .expect("underscores are token characters");
        return (vec![all], false);
    }
    ((1..1u64 << count).map(spell).collect(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spellings(name: &'static str) -> (Vec<String>, bool) {
        let (twins, complete) = underscore_spellings(&HeaderName::from_static(name));
        let mut twins: Vec<String> = twins.iter().map(|n| n.as_str().to_owned()).collect();
        twins.sort();
        (twins, complete)
    }

    #[test]
    fn every_underscore_spelling_of_an_identity_header_is_named() {
        let (twins, complete) = spellings("x-auth-user-id");
        assert!(complete);
        assert_eq!(
            twins,
            [
                "x-auth-user_id",
                "x-auth_user-id",
                "x-auth_user_id",
                "x_auth-user-id",
                "x_auth-user_id",
                "x_auth_user-id",
                "x_auth_user_id",
            ]
        );
        assert_eq!(spellings("authorization"), (vec![], true));
        // Five hyphens: all 31; six: only the all-underscore one, and said so.
        assert_eq!(spellings("a-b-c-d-e-f").0.len(), 31);
        assert_eq!(
            spellings("a-b-c-d-e-f-g"),
            (vec!["a_b_c_d_e_f_g".into()], false)
        );
        // More hyphens than a 64-bit mask has bits.
        let long = format!("x{}", "-x".repeat(70));
        let (twins, complete) = underscore_spellings(&HeaderName::try_from(long.as_str()).unwrap());
        assert!(!complete);
        assert_eq!(twins.len(), 1);
        assert_eq!(twins[0].as_str(), long.replace('-', "_"));
    }

    #[test]
    fn every_owned_name_is_in_the_envoy_list() {
        let config = Config::from_toml_str("").expect("the default configuration");
        let owned = owned_identity_headers(&config);
        for name in [
            "x-auth-user-id",
            "x_auth_user_id",
            "x-auth-assertion",
            "x-auth-username",
        ] {
            assert!(
                owned.iter().any(|n| n == name),
                "{name} missing from {owned:?}"
            );
        }
        let value = envoy_headers_to_remove(&owned);
        let listed: Vec<&str> = value.to_str().unwrap().split(", ").collect();
        assert_eq!(listed.len(), owned.len());
        assert!(listed.contains(&"x-auth-user_id"));
    }
}
