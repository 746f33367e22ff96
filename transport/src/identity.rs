//! Who is at the other end: identities as certified by the consortium CA.
//!
//! An identity is a role and a name. It lives in the certificate as one SAN DNS name of the form
//! `<name>.node.cleanroom`, `<name>.analyst.cleanroom` or `coordinator.cleanroom`; the CN and OU
//! are informational only. Since every certificate is verified against the consortium CA before
//! we look at it, the SAN is the peer's identity.

use std::fmt;

use rustls_pki_types::CertificateDer;

use crate::TransportError;

const SUFFIX: &str = "cleanroom";

/// The role a certificate was issued for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// A partner's node.
    Node,
    /// The coordinator.
    Coordinator,
    /// An analyst using the CLI.
    Analyst,
}

impl PeerRole {
    /// Lower-case name of the role, as used in DNS names, file names and the certificate's OU.
    pub fn as_str(&self) -> &'static str {
        match self {
            PeerRole::Node => "node",
            PeerRole::Coordinator => "coordinator",
            PeerRole::Analyst => "analyst",
        }
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role and a name, as certified by the consortium CA.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The role.
    pub role: PeerRole,
    /// The partner's, analyst's name, or "coordinator".
    pub name: String,
}

fn check_name(name: &str) -> Result<(), TransportError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(TransportError::BadName {
            name: name.to_owned(),
        })
    }
}

impl Identity {
    /// The node of partner `name`.
    pub fn node(name: &str) -> Result<Identity, TransportError> {
        check_name(name)?;
        Ok(Identity {
            role: PeerRole::Node,
            name: name.to_owned(),
        })
    }

    /// The analyst `name`.
    pub fn analyst(name: &str) -> Result<Identity, TransportError> {
        check_name(name)?;
        Ok(Identity {
            role: PeerRole::Analyst,
            name: name.to_owned(),
        })
    }

    /// The coordinator (there is one per consortium).
    pub fn coordinator() -> Identity {
        Identity {
            role: PeerRole::Coordinator,
            name: "coordinator".to_owned(),
        }
    }

    /// The SAN DNS name that certifies this identity.
    pub fn dns_name(&self) -> String {
        match self.role {
            PeerRole::Coordinator => format!("coordinator.{SUFFIX}"),
            PeerRole::Node | PeerRole::Analyst => {
                format!("{}.{}.{SUFFIX}", self.name, self.role.as_str())
            }
        }
    }

    /// Parses a SAN DNS name produced by [`Identity::dns_name`].
    pub fn from_dns_name(dns: &str) -> Result<Identity, TransportError> {
        let no_identity = || TransportError::NoIdentity {
            reason: format!("'{dns}' is not a cleanroom identity name"),
        };
        let rest = dns
            .strip_suffix(SUFFIX)
            .and_then(|r| r.strip_suffix('.'))
            .ok_or_else(no_identity)?;
        if rest == "coordinator" {
            return Ok(Identity::coordinator());
        }
        let (name, role) = rest.rsplit_once('.').ok_or_else(no_identity)?;
        match role {
            "node" => Identity::node(name),
            "analyst" => Identity::analyst(name),
            _ => Err(no_identity()),
        }
    }

    /// File stem for this identity's certificate and key: `node-acme`, `analyst-alice`,
    /// `coordinator`.
    pub fn file_stem(&self) -> String {
        match self.role {
            PeerRole::Coordinator => "coordinator".to_owned(),
            PeerRole::Node | PeerRole::Analyst => format!("{}-{}", self.role.as_str(), self.name),
        }
    }

    /// Reads the identity from a certificate's SAN DNS names. The certificate must already be
    /// verified against the consortium CA; exactly one SAN must be a cleanroom identity.
    pub fn from_cert(cert: &CertificateDer<'_>) -> Result<Identity, TransportError> {
        let parsed =
            webpki::EndEntityCert::try_from(cert).map_err(|e| TransportError::NoIdentity {
                reason: format!("unparsable certificate: {e}"),
            })?;
        let mut found: Option<Identity> = None;
        for dns in parsed.valid_dns_names() {
            if let Ok(id) = Identity::from_dns_name(dns) {
                if let Some(prev) = &found
                    && *prev != id
                {
                    return Err(TransportError::NoIdentity {
                        reason: format!("certificate names both {prev} and {id}"),
                    });
                }
                found = Some(id);
            }
        }
        found.ok_or_else(|| TransportError::NoIdentity {
            reason: "no SAN DNS name of the form <name>.node.cleanroom, \
                     <name>.analyst.cleanroom or coordinator.cleanroom"
                .to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            PeerRole::Coordinator => f.write_str("coordinator"),
            PeerRole::Node | PeerRole::Analyst => write!(f, "{} {}", self.role, self.name),
        }
    }
}

/// The certificate chain the peer of an established connection presented.
pub(crate) fn peer_chain(
    conn: &quinn::Connection,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| TransportError::NoIdentity {
            reason: "the peer presented no certificate".to_owned(),
        })?;
    any.downcast::<Vec<CertificateDer<'static>>>()
        .map(|b| *b)
        .map_err(|_| TransportError::NoIdentity {
            reason: "the peer's credentials are not an X.509 chain".to_owned(),
        })
}

/// The error for a peer whose chain holds no certificate.
pub(crate) fn empty_chain() -> TransportError {
    TransportError::NoIdentity {
        reason: "the peer presented an empty certificate chain".to_owned(),
    }
}

/// The leaf certificate the peer of an established connection presented.
fn peer_leaf(conn: &quinn::Connection) -> Result<CertificateDer<'static>, TransportError> {
    peer_chain(conn)?.into_iter().next().ok_or_else(empty_chain)
}

/// The identity of the peer of an established connection, read from its (already CA-verified)
/// certificate's SAN DNS name.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TransportError> {
    Identity::from_cert(&peer_leaf(conn)?)
}

/// The key fingerprint (`sha256:<hex>` of the SubjectPublicKeyInfo, see
/// [`crate::key_fingerprint`]) of the peer's certificate on an established connection.
pub fn peer_key_fingerprint(conn: &quinn::Connection) -> Result<String, TransportError> {
    crate::pki::key_fingerprint(&peer_leaf(conn)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_validated() {
        for ok in ["acme", "a", "globex-2", &"a".repeat(63)] {
            assert!(Identity::node(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-acme",
            "acme-",
            "Acme",
            "ac.me",
            "ac me",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(Identity::node(bad), Err(TransportError::BadName { .. })),
                "{bad}"
            );
            assert!(Identity::analyst(bad).is_err());
        }
    }

    #[test]
    fn dns_names_round_trip() {
        let ids = [
            Identity::node("acme").unwrap(),
            Identity::analyst("alice").unwrap(),
            Identity::coordinator(),
        ];
        let dns: Vec<String> = ids.iter().map(Identity::dns_name).collect();
        assert_eq!(
            dns,
            [
                "acme.node.cleanroom",
                "alice.analyst.cleanroom",
                "coordinator.cleanroom"
            ]
        );
        for (id, d) in ids.iter().zip(&dns) {
            assert_eq!(&Identity::from_dns_name(d).unwrap(), id);
        }
        assert_eq!(ids[0].to_string(), "node acme");
        assert_eq!(ids[1].to_string(), "analyst alice");
        assert_eq!(ids[2].to_string(), "coordinator");
        assert_eq!(ids[0].file_stem(), "node-acme");
        assert_eq!(ids[1].file_stem(), "analyst-alice");
        assert_eq!(ids[2].file_stem(), "coordinator");
        for bad in [
            "acme.cleanroom",
            "acme.node.example",
            "x.y.node.cleanroom",
            "-a.node.cleanroom",
            "cleanroom",
        ] {
            assert!(Identity::from_dns_name(bad).is_err(), "{bad}");
        }
    }
}
