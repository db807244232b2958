//! Which peers may send a PROXY protocol header (`-proxyfrom`).
//!
//! A PROXY header says who the client is; anyone who can reach the port
//! could say it. So, as nginx's `set_real_ip_from`, a port names the
//! networks its proxies connect from, and a connection whose real TCP peer
//! (the address `accept` reported, never the header's) is outside them is
//! closed before its header is read and counted (`proxyuntrusted`). The
//! check runs in the worker, where the header is read.
//!
//! An IPv4 peer seen on an IPv6 socket (`::ffff:a.b.c.d`) is the IPv4 peer
//! it is, and matches IPv4 networks; an IPv4-mapped network is the IPv4
//! network it maps.

use std::net::{IpAddr, SocketAddr};

/// One network: an address and the length of its prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Network {
    V4 { address: u32, prefix: u8 },
    V6 { address: u128, prefix: u8 },
}

impl Network {
    /// Parses `address/prefix` or a bare address (a network of one).
    fn parse(text: &str) -> Result<Network, String> {
        let bad = || format!("bad network \"{text}\": must be an IPv4 or IPv6 address, with an optional /prefix");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => {
                // Digits only: "+8" or " 8" are not prefixes.
                if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                (address, Some(prefix.parse::<u8>().map_err(|_| bad())?))
            }
            None => (text, None),
        };
        let network = match address.parse::<IpAddr>().map_err(|_| bad())? {
            IpAddr::V4(v4) => {
                let prefix = prefix.unwrap_or(32);
                if prefix > 32 {
                    return Err(bad());
                }
                Network::V4 { address: u32::from(v4), prefix }
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.unwrap_or(128);
                if prefix > 128 {
                    return Err(bad());
                }
                match v6.to_ipv4_mapped() {
                    Some(v4) if prefix >= 96 => Network::V4 { address: u32::from(v4), prefix: prefix - 96 },
                    _ => Network::V6 { address: u128::from(v6), prefix },
                }
            }
        };
        Ok(network)
    }

    fn contains(&self, peer: IpAddr) -> bool {
        match (*self, canonical(peer)) {
            (Network::V4 { address, prefix }, IpAddr::V4(peer)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(peer) & mask == address & mask
            }
            (Network::V6 { address, prefix }, IpAddr::V6(peer)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(peer) & mask == address & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    }
}

/// The networks a port's proxies connect from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<Network>,
}

impl TrustedProxies {
    /// Parses the words of `-proxyfrom`: at least one network.
    pub fn parse<S: AsRef<str>>(words: &[S]) -> Result<TrustedProxies, String> {
        if words.is_empty() {
            return Err("no network in -proxyfrom: name at least one, as 10.0.0.0/8 or ::1".to_string());
        }
        let networks = words.iter().map(|w| Network::parse(w.as_ref())).collect::<Result<_, _>>()?;
        Ok(TrustedProxies { networks })
    }

    /// Whether the real TCP peer `peer` may send a header. A connection
    /// with no address (not TCP) is from no network.
    pub fn admits(&self, peer: Option<SocketAddr>) -> bool {
        peer.is_some_and(|peer| self.networks.iter().any(|n| n.contains(peer.ip())))
    }
}

/// What `proxy_header` passes to `Next::rejected` for a peer outside the
/// list, so that it is counted apart from malformed headers.
pub const UNTRUSTED: &str = "peer not in -proxyfrom";

/// The check the header reader makes first: true when the port trusts
/// every peer (no `-proxyfrom`) or `peer` is in its list.
pub fn admits(trusted: Option<&TrustedProxies>, peer: Option<SocketAddr>) -> bool {
    trusted.is_none_or(|list| list.admits(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(text.parse().unwrap(), 4242))
    }

    fn list(words: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(words).unwrap()
    }

    #[test]
    fn ipv4_networks() {
        let trusted = list(&["127.0.0.2/32", "10.0.0.0/8"]);
        assert!(trusted.admits(peer("127.0.0.2")));
        assert!(!trusted.admits(peer("127.0.0.3")));
        assert!(trusted.admits(peer("10.255.1.2")));
        assert!(!trusted.admits(peer("11.0.0.1")));
        assert!(!trusted.admits(peer("::1")));
        assert!(!trusted.admits(None));
    }

    #[test]
    fn ipv6_networks() {
        let trusted = list(&["2001:db8::/32", "::1"]);
        assert!(trusted.admits(peer("2001:db8:1::5")));
        assert!(!trusted.admits(peer("2001:db9::5")));
        assert!(trusted.admits(peer("::1")));
        assert!(!trusted.admits(peer("::2")));
        assert!(!trusted.admits(peer("127.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_peers_and_networks() {
        let trusted = list(&["192.168.1.0/24"]);
        assert!(trusted.admits(peer("::ffff:192.168.1.7")));
        assert!(!trusted.admits(peer("::ffff:192.168.2.7")));
        let mapped = list(&["::ffff:192.168.1.0/120"]);
        assert!(mapped.admits(peer("192.168.1.7")));
        assert!(mapped.admits(peer("::ffff:192.168.1.7")));
        assert!(!mapped.admits(peer("192.168.2.7")));
    }

    #[test]
    fn prefix_zero_and_host_bits() {
        assert!(list(&["0.0.0.0/0"]).admits(peer("203.0.113.9")));
        assert!(list(&["::/0"]).admits(peer("2001:db8::1")));
        // Bits past the prefix are ignored, as nginx ignores them.
        assert!(list(&["10.1.2.3/8"]).admits(peer("10.9.9.9")));
    }

    #[test]
    fn bad_networks() {
        for bad in ["", "10.0.0.0/33", "::1/129", "10.0.0.0/", "10.0.0.0/+8", "host.example", "10.0.0/8", "1.2.3.4/ 8"]
        {
            assert!(TrustedProxies::parse(&[bad]).is_err(), "{bad:?} was accepted");
        }
        assert!(TrustedProxies::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn no_list_admits_everyone() {
        assert!(admits(None, peer("203.0.113.9")));
        assert!(!admits(Some(&list(&["127.0.0.2"])), peer("127.0.0.3")));
    }
}
