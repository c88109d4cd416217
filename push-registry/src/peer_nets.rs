//! Which node addresses a registry record may send secrets and payloads to.
//!
//! A record's `node_addr` is written by whoever can write to the registry's storage. Nodes
//! and message processors send the internal secret and users' messages there, so they check
//! it first against an allow-list of networks (`--peer-nets`, CIDRs). A host name is resolved
//! and every address it resolves to must be allowed; the caller then connects to the address
//! that was checked, so a second resolution cannot point elsewhere.

use std::net::{IpAddr, SocketAddr};

/// The default allow-list: loopback only. Safe for one machine; a cluster on a private
/// network names its subnet (`--peer-nets 10.0.0.0/8`).
pub const DEFAULT_PEER_NETS: &str = "127.0.0.0/8,::1/128";

/// Why a `--peer-nets` list does not parse, or a node address is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerNetsError {
    /// An item of the list is neither an IP address nor a CIDR.
    #[error("`{0}`: not an IP address or CIDR")]
    NotAnAddress(String),
    /// An item's prefix length is beyond its address's bits.
    #[error("`{item}`: prefix length must be 0 to {max}")]
    PrefixLength {
        /// The item as written.
        item: String,
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
    /// The list names no network.
    #[error("empty list: name at least one network (or `any`)")]
    Empty,
    /// A node's host name did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// `host:port` as the record has it.
        addr: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// A node's host name resolved to no address.
    #[error("{0} resolves to nothing")]
    NoAddress(String),
    /// A node's address is in none of the networks.
    #[error("{ip} is outside --peer-nets ({allowed})")]
    Outside {
        /// The address refused.
        ip: IpAddr,
        /// The allow-list, as `--peer-nets` writes it.
        allowed: String,
    },
}

/// An allow-list of networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNets {
    nets: Vec<(IpAddr, u8)>,
}

impl Default for PeerNets {
    fn default() -> Self {
        Self::parse(DEFAULT_PEER_NETS).expect("the default list parses")
    }
}

impl std::fmt::Display for PeerNets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (ip, len)) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{ip}/{len}")?;
        }
        Ok(())
    }
}

impl PeerNets {
    /// Parses `a.b.c.d/n,x::/m,…`; a bare address is a single host. `any` allows every
    /// address (for operators who check records otherwise).
    pub fn parse(s: &str) -> Result<Self, PeerNetsError> {
        let mut nets = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if item == "any" {
                nets.push(("0.0.0.0".parse().expect("literal"), 0));
                nets.push(("::".parse().expect("literal"), 0));
                continue;
            }
            let (ip, len) = match item.split_once('/') {
                Some((ip, len)) => (ip, Some(len)),
                None => (item, None),
            };
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| PeerNetsError::NotAnAddress(item.to_owned()))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(l) => l.parse::<u8>().ok().filter(|&l| l <= max).ok_or_else(|| {
                    PeerNetsError::PrefixLength {
                        item: item.to_owned(),
                        max,
                    }
                })?,
                None => max,
            };
            nets.push((ip, len));
        }
        if nets.is_empty() {
            return Err(PeerNetsError::Empty);
        }
        Ok(Self { nets })
    }

    /// Whether `ip` is in one of the networks. An IPv4-mapped IPv6 address counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|&(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(u128::from(u32::from(n)), u128::from(u32::from(a)), len, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(u128::from(n), u128::from(a), len, 128),
            _ => false,
        })
    }

    /// Resolves `host:port` and returns the address to connect to, if every address it
    /// resolves to is allowed.
    pub async fn resolve(&self, addr: &str) -> Result<SocketAddr, PeerNetsError> {
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            return self.check(sa);
        }
        let all: Vec<SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| PeerNetsError::Resolve {
                addr: addr.to_owned(),
                source,
            })?
            .collect();
        let first = *all
            .first()
            .ok_or_else(|| PeerNetsError::NoAddress(addr.to_owned()))?;
        for sa in &all {
            self.check(*sa)?;
        }
        Ok(first)
    }

    fn check(&self, sa: SocketAddr) -> Result<SocketAddr, PeerNetsError> {
        if self.contains(sa.ip()) {
            Ok(sa)
        } else {
            Err(PeerNetsError::Outside {
                ip: sa.ip(),
                allowed: self.to_string(),
            })
        }
    }
}

fn prefix_eq(a: u128, b: u128, len: u8, bits: u32) -> bool {
    if len == 0 {
        return true;
    }
    let shift = bits - u32::from(len);
    (a >> shift) == (b >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_is_loopback_only() {
        let n = PeerNets::default();
        assert!(n.contains(ip("127.0.0.1")));
        assert!(n.contains(ip("127.9.9.9")));
        assert!(n.contains(ip("::1")));
        assert!(n.contains(ip("::ffff:127.0.0.1")));
        assert!(!n.contains(ip("10.0.0.1")));
        assert!(!n.contains(ip("169.254.169.254")));
        assert!(!n.contains(ip("::2")));
    }

    #[test]
    fn cidrs_and_hosts() {
        let n = PeerNets::parse("10.1.0.0/16, 192.168.1.7, fd00::/8").unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("192.168.1.7")));
        assert!(!n.contains(ip("192.168.1.8")));
        assert!(n.contains(ip("fd12::1")));
        assert!(!n.contains(ip("127.0.0.1")));
        assert!(PeerNets::parse("any").unwrap().contains(ip("8.8.8.8")));
        for bad in ["", "10.0.0.0/33", "nonsense", "::/129"] {
            assert!(PeerNets::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(n.to_string(), "10.1.0.0/16,192.168.1.7/32,fd00::/8");
    }

    #[tokio::test]
    async fn resolve_checks_every_address() {
        let n = PeerNets::default();
        assert_eq!(
            n.resolve("127.0.0.1:9090").await.unwrap(),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert!(n.resolve("localhost:9090").await.is_ok());
        let err = n.resolve("10.0.0.1:9090").await.unwrap_err().to_string();
        assert!(err.contains("outside --peer-nets"), "{err}");
    }
}
