//! Which address a login comes from: the peer, or what a trusted proxy in front of knoxgate
//! says the client is. The login throttle counts failures per this address.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
};

use hyper::HeaderMap;
use ipnet::IpNet;

/// One `X-Forwarded-For` hop as proxies write it: an address, `[v6]`, or with a port
/// (`ip:port`, `[v6]:port`, as some front ends append). Anything else is `None`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| s.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// The client's address: the peer, or what the trusted proxies in front of us say it is.
///
/// `X-Forwarded-For` is walked from the right (the hop our peer appended) while hops are
/// trusted proxies; the first untrusted hop is the client. A hop that is not an address ends
/// the walk at the last trusted hop: skipping it would make whatever the client wrote to its
/// left "the client", which is how a client dodges the throttle. `X-Real-IP` is believed only
/// if `trust_x_real_ip`, and only when `X-Forwarded-For` names no untrusted hop.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    trust_x_real_ip: bool,
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .flat_map(|v| v.split(','))
        .collect();
    let mut last_trusted = peer;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            None => return last_trusted,
            Some(ip) if !is_trusted(ip) => return ip,
            Some(ip) => last_trusted = ip,
        }
    }
    if trust_x_real_ip
        && let Some(ip) = headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_hop)
    {
        return ip;
    }
    last_trusted
}

/// Logs once per process that logins arrive with `X-Forwarded-For` while no proxy is trusted:
/// knoxgate then sits behind a proxy it does not know, every client has the proxy's address,
/// and the per-address part of the throttle counts all of them together.
pub fn warn_if_untrusted_proxy(headers: &HeaderMap, trusted: &[IpNet]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if trusted.is_empty()
        && headers.contains_key("x-forwarded-for")
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            "a login arrived with X-Forwarded-For but sessions.trusted_proxies is empty: every \
             client then has the proxy's address; list the proxy in sessions.trusted_proxies"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const PEER: &str = "127.0.0.1";

    fn client(pairs: &[(&'static str, &str)], real_ip: bool) -> IpAddr {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        client_ip(ip(PEER), &headers(pairs), &trusted, real_ip)
    }

    #[test]
    fn untrusted_peers_are_the_client() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &[], true), ip("9.9.9.9"));
    }

    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        assert_eq!(
            client(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.5")], false),
            ip("1.2.3.4")
        );
        assert_eq!(
            client(
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-for", "1.2.3.4")
                ],
                false
            ),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn hops_with_ports_and_brackets_are_addresses() {
        assert_eq!(
            client(&[("x-forwarded-for", "1.2.4.9, 203.0.113.10:51234")], false),
            ip("203.0.113.10")
        );
        assert_eq!(
            client(&[("x-forwarded-for", "1.2.5.9, [2001:db8::7]")], false),
            ip("2001:db8::7")
        );
        assert_eq!(
            client(&[("x-forwarded-for", "1.2.5.9, [2001:db8::7]:443")], false),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn an_unparseable_hop_ends_the_walk_at_the_last_trusted_hop() {
        // Skipping "garbage" would make the spoofed 6.6.6.6 the client.
        assert_eq!(
            client(&[("x-forwarded-for", "6.6.6.6, garbage")], false),
            ip(PEER)
        );
        assert_eq!(
            client(&[("x-forwarded-for", "6.6.6.6, garbage, 10.0.0.5")], false),
            ip("10.0.0.5")
        );
        assert_eq!(client(&[("x-forwarded-for", "6.6.6.6, ")], false), ip(PEER));
    }

    #[test]
    fn x_real_ip_only_when_configured_and_xff_names_no_client() {
        assert_eq!(client(&[("x-real-ip", "9.9.9.9")], false), ip(PEER));
        assert_eq!(client(&[("x-real-ip", "9.9.9.9")], true), ip("9.9.9.9"));
        assert_eq!(
            client(
                &[("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "9.9.9.9")],
                true
            ),
            ip("1.2.3.4")
        );
    }
}
