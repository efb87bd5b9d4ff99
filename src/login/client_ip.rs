//! Which address a login comes from: the peer, or what a trusted proxy in front of knoxgate
//! says the client is. The login throttle counts failures per this address.

use std::net::IpAddr;

use hyper::HeaderMap;
use ipnet::IpNet;

/// The client's address: the peer, or what a trusted proxy in front of us says it is.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    if !is_trusted(peer) {
        return peer;
    }
    // Walk X-Forwarded-For from the right: the first hop we do not trust is the client.
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    if let Some(ip) = forwarded.iter().rev().find(|ip| !is_trusted(**ip)) {
        return *ip;
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(peer)
}
