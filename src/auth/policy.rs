//! Per-route policy: what the proxy asks of a request beyond "a valid token of an active user",
//! read from the query string of the verify URL it is configured with (or, over gRPC, from
//! Envoy's per-route `context_extensions`), and the permission check that applies it. Pure: no I/O, the user's flags and groups are passed in.
//!
//! Keys (each value exactly as written; anything else is a configuration error naming the key):
//!
//! - `anonymous=allow`: a request without knox credentials is let through with no identity
//!   (DRF's `AllowAny` / `IsAuthenticatedOrReadOnly` reads). A token that is sent is still
//!   checked, and a bad one is still refused, as DRF authenticates before permissions.
//! - `require=staff` / `require=superuser`: DRF's `IsAdminUser` (`is_staff`), or `is_superuser`.
//!   Literal flags: a superuser who is not staff does not pass `require=staff`, as in DRF.
//! - `group=<name>` (repeatable): membership of at least one of the named groups.
//!
//! `require` and `group` together must both hold. `anonymous=allow` cannot be combined with
//! them: a rule that lets strangers in but not non-staff users has no DRF equivalent.

use compact_str::CompactString;

use super::UserInfo;

/// Longest group name Django accepts (`auth_group.name` is `varchar(150)`).
const MAX_GROUP_NAME: usize = 150;
/// Longest key echoed into a log line: keys come from configuration, but bound them anyway.
const MAX_LOGGED_KEY: usize = 64;

/// A flag `require=` can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Staff,
    Superuser,
}

/// The policy of one verify URL. The default is knoxgate's rule without parameters: a valid
/// token of an active user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub anonymous: bool,
    pub require: Option<Role>,
    /// Any of these groups will do; empty: no group condition.
    pub groups: Vec<CompactString>,
}

/// A policy parameter knoxgate does not understand: the proxy's configuration is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy parameter `{key}`: {message}")]
pub struct PolicyError {
    /// The offending key, as sent (truncated).
    pub key: String,
    pub message: &'static str,
}

fn bad(key: &str, message: &'static str) -> PolicyError {
    let mut end = key.len().min(MAX_LOGGED_KEY);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    PolicyError {
        key: key[..end].to_owned(),
        message,
    }
}

impl Policy {
    /// Reads the query string of the verify URL (without the `?`). Percent-escapes and `+` are
    /// decoded as in a form, so `group=Team%20A` and `group=Team+A` name the same group.
    /// Escapes that do not decode to UTF-8 are a mistake naming their key, as over gRPC,
    /// rather than a name with U+FFFD in it that no group has.
    pub fn from_query(query: &str) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = form_decoded(key).map_err(|_| bad(key, "a key percent-encoded as UTF-8"))?;
            let value =
                form_decoded(value).map_err(|_| bad(&key, "a value percent-encoded as UTF-8"))?;
            policy.apply(&key, &value)?;
        }
        policy.check()
    }

    /// Reads Envoy's per-route `context_extensions` (gRPC ext_authz): the same keys as the query
    /// string, one value each. A map cannot repeat `group`, so its value is a comma-separated
    /// list of names, each percent-encoded where needed (`%2C` for a comma in a name, `%25` for
    /// `%`), as in the groups identity header. Keys are read in sorted order, so the key a
    /// mistake is reported against does not depend on the map's order.
    pub fn from_context_extensions<'a>(
        extensions: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Policy, PolicyError> {
        let mut pairs: Vec<(&str, &str)> = extensions
            .into_iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        pairs.sort_unstable();
        let mut policy = Policy::default();
        for (key, value) in pairs {
            if key == "group" {
                for name in value.split(',') {
                    let name = percent_encoding::percent_decode_str(name)
                        .decode_utf8()
                        .map_err(|_| bad(key, "a group name percent-encoded as UTF-8"))?;
                    policy.apply(key, &name)?;
                }
            } else {
                policy.apply(key, value)?;
            }
        }
        policy.check()
    }

    /// Adds one parameter.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), PolicyError> {
        match key {
            "anonymous" => {
                if value != "allow" {
                    return Err(bad(key, "the only value is `allow`"));
                }
                self.anonymous = true;
            }
            "require" => {
                let role = match value {
                    "staff" => Role::Staff,
                    "superuser" => Role::Superuser,
                    _ => return Err(bad(key, "use `staff` or `superuser`")),
                };
                if self.require.is_some_and(|r| r != role) {
                    return Err(bad(key, "given twice with different values"));
                }
                self.require = Some(role);
            }
            "group" => {
                if value.is_empty() || value.chars().count() > MAX_GROUP_NAME {
                    return Err(bad(key, "a group name of 1 to 150 characters"));
                }
                if !self.groups.iter().any(|g| *g == value) {
                    self.groups.push(value.into());
                }
            }
            other => {
                return Err(bad(other, "unknown key: use anonymous, require or group"));
            }
        }
        Ok(())
    }

    /// The rules between keys, once all are read.
    fn check(self) -> Result<Policy, PolicyError> {
        if self.anonymous && (self.require.is_some() || !self.groups.is_empty()) {
            return Err(bad("anonymous", "cannot be combined with require or group"));
        }
        Ok(self)
    }

    /// Refuses a policy knoxgate cannot apply with what it reads of users: a group rule when
    /// groups are not read (`postgres.user_groups_table = ""`) would refuse every member of
    /// the group, a denial where the truth is unknown.
    pub fn check_applicable(&self, groups_read: bool) -> Result<(), PolicyError> {
        if !groups_read && !self.groups.is_empty() {
            return Err(bad(
                "group",
                "needs groups, which are not read (postgres.user_groups_table is empty)",
            ));
        }
        Ok(())
    }

    /// Whether the policy looks at the user's flags or groups at all.
    pub fn checks_user(&self) -> bool {
        self.require.is_some() || !self.groups.is_empty()
    }
}

/// One key or value of a form-encoded query: `+` is a space, then percent-escapes are decoded
/// and must make UTF-8.
fn form_decoded(raw: &str) -> Result<String, std::str::Utf8Error> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|text| text.into_owned())
}

/// Whether an authenticated, active `user` passes `policy` (DRF's `has_permission`).
pub fn permits(policy: &Policy, user: &UserInfo) -> bool {
    let role_ok = match policy.require {
        None => true,
        Some(Role::Staff) => user.is_staff,
        Some(Role::Superuser) => user.is_superuser,
    };
    // Group names are compared exactly, as Django's `groups.filter(name=...)` does.
    let group_ok = policy.groups.is_empty()
        || policy
            .groups
            .iter()
            .any(|g| user.groups.iter().any(|mine| mine == g));
    role_ok && group_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_rule_needs_groups_to_be_read() {
        let group = Policy::from_query("group=ops").unwrap();
        assert!(group.check_applicable(true).is_ok());
        let e = group.check_applicable(false).unwrap_err();
        assert_eq!(e.key, "group");
        for other in ["", "require=staff", "anonymous=allow"] {
            let p = Policy::from_query(other).unwrap();
            assert!(p.check_applicable(false).is_ok(), "{other:?}");
        }
    }

    fn parse(q: &str) -> Policy {
        Policy::from_query(q).unwrap_or_else(|e| panic!("{q}: {e}"))
    }

    fn error_key(q: &str) -> String {
        Policy::from_query(q).expect_err(q).key
    }

    fn user(staff: bool, superuser: bool, groups: &[&str]) -> UserInfo {
        UserInfo {
            is_active: true,
            is_staff: staff,
            is_superuser: superuser,
            groups: groups.iter().map(|g| CompactString::from(*g)).collect(),
            ..UserInfo::default()
        }
    }

    #[test]
    fn no_parameters_is_the_default_rule() {
        assert_eq!(parse(""), Policy::default());
        assert_eq!(parse("&&"), Policy::default());
        assert!(!parse("").checks_user());
    }

    #[test]
    fn every_key_is_read() {
        assert!(parse("anonymous=allow").anonymous);
        assert_eq!(parse("require=staff").require, Some(Role::Staff));
        assert_eq!(parse("require=superuser").require, Some(Role::Superuser));
        assert_eq!(
            parse("require=staff&require=staff").require,
            Some(Role::Staff)
        );
        let p = parse("group=ops&group=Team%20A&group=ops&group=b+c");
        assert_eq!(p.groups, ["ops", "Team A", "b c"]);
        let both = parse("require=staff&group=ops");
        assert_eq!(both.require, Some(Role::Staff));
        assert!(both.checks_user());
        // Non-ASCII names, percent-encoded as UTF-8.
        assert_eq!(parse("group=%C3%A9quipe").groups, ["équipe"]);
        // An escaped `+`, `&` or `=` is part of the name; an escape that is not one is kept.
        assert_eq!(parse("group=a%2Bb%26c%3Dd%zz").groups, ["a+b&c=d%zz"]);
        // Only the first `=` splits: the value is `staff=`, not `staff`.
        assert_eq!(error_key("require=staff="), "require");
    }

    #[test]
    fn escapes_that_are_not_utf8_are_a_mistake_not_another_name() {
        // `équipe` in Latin-1: a lossy decoding would make a name no group has, refusing
        // every member of the group instead of saying the URL is wrong.
        assert_eq!(error_key("group=%E9quipe"), "group");
        assert_eq!(error_key("require=staff&group=ok&group=%FF"), "group");
        assert_eq!(error_key("gr%FFoup=ops"), "gr%FFoup");
    }

    #[test]
    fn mistakes_name_their_key() {
        for (q, key) in [
            ("anonymous=yes", "anonymous"),
            ("anonymous", "anonymous"),
            ("anonymous=Allow", "anonymous"),
            ("require=admin", "require"),
            ("require=", "require"),
            ("require=staff&require=superuser", "require"),
            ("group=", "group"),
            ("group", "group"),
            ("groups=ops", "groups"),
            ("Require=staff", "Require"),
            ("require=staff&x=1", "x"),
            ("anonymous=allow&require=staff", "anonymous"),
            ("group=ops&anonymous=allow", "anonymous"),
        ] {
            assert_eq!(error_key(q), key, "{q}");
        }
        assert_eq!(error_key(&format!("group={}", "g".repeat(151))), "group");
        assert_eq!(parse(&format!("group={}", "é".repeat(150))).groups.len(), 1);
        // Keys are bounded in the log line.
        assert_eq!(error_key(&"k".repeat(500)).len(), MAX_LOGGED_KEY);
        assert_eq!(error_key(&"é".repeat(100)).len(), MAX_LOGGED_KEY);
    }

    #[test]
    fn flags_follow_drf() {
        let staff = parse("require=staff");
        let superuser = parse("require=superuser");
        assert!(permits(&staff, &user(true, false, &[])));
        assert!(!permits(&staff, &user(false, false, &[])));
        // IsAdminUser looks at is_staff only.
        assert!(!permits(&staff, &user(false, true, &[])));
        assert!(permits(&superuser, &user(false, true, &[])));
        assert!(!permits(&superuser, &user(true, false, &[])));
        // No conditions: every authenticated user.
        assert!(permits(&Policy::default(), &user(false, false, &[])));
        assert!(permits(&parse("anonymous=allow"), &user(false, false, &[])));
    }

    #[test]
    fn groups_are_any_of_and_exact() {
        let p = parse("group=ops&group=billing");
        assert!(permits(&p, &user(false, false, &["billing"])));
        assert!(permits(&p, &user(false, false, &["a", "ops", "z"])));
        assert!(!permits(&p, &user(false, false, &[])));
        assert!(!permits(&p, &user(false, false, &["Ops", "ops2"])));
        // Flags do not stand in for groups.
        assert!(!permits(&p, &user(true, true, &[])));
        // require and group: both.
        let both = parse("require=staff&group=ops");
        assert!(permits(&both, &user(true, false, &["ops"])));
        assert!(!permits(&both, &user(true, false, &[])));
        assert!(!permits(&both, &user(false, false, &["ops"])));
    }

    fn extensions(pairs: &[(&str, &str)]) -> Result<Policy, PolicyError> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Policy::from_context_extensions(&map)
    }

    #[test]
    fn context_extensions_use_the_query_keys() {
        assert_eq!(extensions(&[]).unwrap(), Policy::default());
        assert!(extensions(&[("anonymous", "allow")]).unwrap().anonymous);
        let p = extensions(&[("require", "superuser"), ("group", "ops")]).unwrap();
        assert_eq!(p.require, Some(Role::Superuser));
        assert_eq!(p.groups, ["ops"]);
        // A list of groups, percent-encoded like the groups header; spaces are not `+`.
        let p = extensions(&[("group", "ops,a%2Cb,100%25,%C3%A9quipe,Team A,ops")]).unwrap();
        assert_eq!(p.groups, ["ops", "a,b", "100%", "équipe", "Team A"]);
        assert_eq!(extensions(&[("group", "b+c")]).unwrap().groups, ["b+c"]);
        // The query form and the map form agree.
        assert_eq!(
            extensions(&[("require", "staff"), ("group", "ops")]).unwrap(),
            parse("require=staff&group=ops")
        );
    }

    #[test]
    fn context_extension_mistakes_name_their_key() {
        for (pairs, key) in [
            (&[("anonymous", "yes")][..], "anonymous"),
            (&[("require", "admin")][..], "require"),
            (&[("group", "")][..], "group"),
            (&[("group", "ops,")][..], "group"),
            (&[("group", "%FF")][..], "group"),
            (&[("groups", "ops")][..], "groups"),
            (&[("x", "1"), ("require", "staff")][..], "x"),
            // Sorted: the same key is named whatever the map's order.
            (&[("zz", "1"), ("aa", "1")][..], "aa"),
            (&[("anonymous", "allow"), ("group", "ops")][..], "anonymous"),
        ] {
            assert_eq!(extensions(pairs).expect_err(key).key, key, "{pairs:?}");
        }
        let long = "g".repeat(151);
        assert_eq!(extensions(&[("group", &long)]).unwrap_err().key, "group");
    }
}
