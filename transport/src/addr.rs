//! Addresses written by people: `host:port`, where the host is a DNS name (`localhost`,
//! `coord.example.internal`) or an IP literal (`10.0.0.1`, `[2001:db8::1]`).
//!
//! A name is resolved when it is dialled (each time: a coordinator that moves to a new address
//! keeps its name), never when it is read. The name is only where to send packets: the TLS
//! server name a connection checks is always the peer's consortium identity
//! ([`crate::Identity::dns_name`]), so a name that resolves to the wrong machine fails the
//! handshake instead of reaching it.

use std::net::SocketAddr;

/// Longest wait for a DNS answer.
pub const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A `host:port` address: an IP literal, or a DNS name resolved when dialled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: String,
    port: u16,
    /// The address itself when the host is an IP literal.
    literal: Option<SocketAddr>,
}

/// Why a `host:port` address is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{}' is not a host:port address (e.g. coord.example.com:7400, 10.0.0.1:7400, \
     [2001:db8::1]:7400): {why}", .text.escape_default()
)]
pub struct BadHostPort {
    /// The text given (an address, not a secret).
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl HostPort {
    /// The host part: a DNS name or an IP literal (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address, without a DNS query, if the host is an IP literal.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.literal
    }

    /// Resolves the address for a socket bound to `local`: an IPv4 socket can reach only IPv4
    /// addresses, so a name is resolved to its first address of `local`'s family (an IPv6
    /// socket takes any). An IP literal is returned as it is. A lookup that takes longer than
    /// [`RESOLVE_TIMEOUT`] fails.
    pub async fn resolve_for(&self, local: SocketAddr) -> Result<SocketAddr, std::io::Error> {
        if let Some(addr) = self.literal {
            return Ok(addr);
        }
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "cannot resolve '{}': no answer within {RESOLVE_TIMEOUT:?}",
                        self.host
                    ),
                )
            })?
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot resolve '{}': {e}", self.host))
            })?
            .collect();
        addrs
            .iter()
            .find(|a| local.is_ipv6() || a.is_ipv4())
            .copied()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "'{}' resolves to no {} address (it gave {addrs:?})",
                        self.host,
                        if local.is_ipv4() { "IPv4" } else { "IP" }
                    ),
                )
            })
    }

    /// Resolves the address for a new dial-only socket: the first address the name has.
    pub async fn resolve(&self) -> Result<SocketAddr, std::io::Error> {
        self.resolve_for((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
            .await
    }
}

impl std::str::FromStr for HostPort {
    type Err = BadHostPort;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadHostPort {
            text: text.to_owned(),
            why,
        };
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: addr.ip().to_string(),
                port: addr.port(),
                literal: Some(addr),
            });
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(bad("no ':port'"));
        };
        let port: u16 = port.parse().map_err(|_| bad("the port is not 0-65535"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.len() > 253 {
            return Err(bad("the host name is longer than 253 characters"));
        }
        // A DNS name (RFC 1123 labels; '_' tolerated, as resolvers do), not an IPv6 literal
        // without brackets.
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !host.trim_end_matches('.').split('.').all(label_ok) {
            return Err(bad(
                "the host is neither an IP address nor a DNS name (IPv6 goes in brackets)",
            ));
        }
        Ok(HostPort {
            host: host.to_owned(),
            port,
            literal: None,
        })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.literal {
            Some(addr) => write!(f, "{addr}"),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl From<SocketAddr> for HostPort {
    fn from(addr: SocketAddr) -> Self {
        HostPort {
            host: addr.ip().to_string(),
            port: addr.port(),
            literal: Some(addr),
        }
    }
}

impl<'de> serde::Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_literals() {
        let h: HostPort = "localhost:7400".parse().unwrap();
        assert_eq!((h.host(), h.port(), h.literal()), ("localhost", 7400, None));
        let h: HostPort = "coord.example.internal:7400".parse().unwrap();
        assert_eq!(h.to_string(), "coord.example.internal:7400");
        let h: HostPort = "10.0.0.1:7400".parse().unwrap();
        assert_eq!(h.literal(), Some("10.0.0.1:7400".parse().unwrap()));
        let h: HostPort = "[2001:db8::1]:7400".parse().unwrap();
        assert_eq!(h.to_string(), "[2001:db8::1]:7400");
        for bad in [
            "localhost",
            ":7400",
            "host:99999",
            "host:port",
            "2001:db8::1:7400",
            "bad host:1",
            "-x.example:1",
            "a..b:1",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn resolves_localhost_to_the_socket_family() {
        let h: HostPort = "localhost:7400".parse().unwrap();
        let v4 = h.resolve_for("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_eq!(v4, "127.0.0.1:7400".parse().unwrap());
        let lit: HostPort = "127.0.0.2:9".parse().unwrap();
        assert_eq!(lit.resolve().await.unwrap(), "127.0.0.2:9".parse().unwrap());
        let none: HostPort = "no-such-host.invalid:1".parse().unwrap();
        assert!(none.resolve().await.is_err());
    }
}
