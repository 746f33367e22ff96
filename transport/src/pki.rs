//! The consortium PKI: a CA, certificates for nodes, the coordinator and analysts, and the
//! credentials a process loads from them.
//!
//! Everything is PEM on disk. Private keys are written with mode 0600 and never overwritten; a
//! certificate carries its identity as one SAN DNS name ([`Identity::dns_name`]), the name as CN
//! and the role as OU, and both the serverAuth and clientAuth EKUs (every party may dial and
//! listen).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::{Duration, OffsetDateTime};

use crate::{Identity, TransportError};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a CA is valid.
const CA_VALIDITY: Duration = Duration::days(10 * 365);
/// How long an issued certificate is valid by default.
const CERT_VALIDITY: Duration = Duration::days(365);
/// Back-dating of `not_before`, to tolerate clock skew between partners.
const BACKDATE: Duration = Duration::hours(1);

/// Where [`init_ca`] wrote the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPaths {
    /// The CA certificate (distribute it to every party).
    pub cert: PathBuf,
    /// The CA private key (keep it offline).
    pub key: PathBuf,
}

/// Where [`issue`] wrote a certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
}

fn pki_err(path: &Path, reason: impl fmt::Display) -> TransportError {
    TransportError::Pki {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Creates `path` with `contents`, failing if it exists. `secret` files get mode 0600 from
/// creation on, so the key is never readable by others, not even briefly.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TransportError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            pki_err(
                path,
                "already exists; refusing to overwrite it (move it away first)",
            )
        } else {
            pki_err(path, format!("cannot create: {e}"))
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| pki_err(path, format!("cannot write: {e}")))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), TransportError> {
    for p in paths {
        if p.exists() {
            return Err(pki_err(
                p,
                "already exists; refusing to overwrite it (move it away first)",
            ));
        }
    }
    Ok(())
}

fn read_text(path: &Path, what: &str) -> Result<String, TransportError> {
    fs::read_to_string(path).map_err(|e| pki_err(path, format!("cannot read {what}: {e}")))
}

/// Creates the consortium CA in `dir` (`ca.pem`, `ca.key`). Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path, consortium: &str) -> Result<CaPaths, TransportError> {
    if consortium.trim().is_empty() {
        return Err(pki_err(dir, "the consortium name must not be empty"));
    }
    fs::create_dir_all(dir).map_err(|e| pki_err(dir, format!("cannot create directory: {e}")))?;
    let paths = CaPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    refuse_existing(&[&paths.cert, &paths.key])?;

    let key =
        KeyPair::generate().map_err(|e| pki_err(&paths.key, format!("key generation: {e}")))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{consortium} cleanroom CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, consortium);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    let cert = params
        .self_signed(&key)
        .map_err(|e| pki_err(&paths.cert, format!("cannot sign the CA certificate: {e}")))?;

    write_new(&paths.key, &key.serialize_pem(), true)?;
    write_new(&paths.cert, &cert.pem(), false)?;
    Ok(paths)
}

/// Issues a certificate for `identity`, valid from an hour ago for a year, signed by the CA in
/// `ca_dir`; writes `out_dir/<file_stem>.pem` and `.key` (see [`Identity::file_stem`]).
pub fn issue(
    ca_dir: &Path,
    identity: &Identity,
    out_dir: &Path,
) -> Result<CertPaths, TransportError> {
    let now = OffsetDateTime::now_utc();
    issue_with_validity(
        ca_dir,
        identity,
        out_dir,
        now - BACKDATE,
        now + CERT_VALIDITY,
    )
}

/// Like [`issue`] with an explicit validity period (tests use it for expired and not-yet-valid
/// certificates).
pub fn issue_with_validity(
    ca_dir: &Path,
    identity: &Identity,
    out_dir: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertPaths, TransportError> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_key = KeyPair::from_pem(&read_text(&ca_key_path, "the CA key")?)
        .map_err(|e| pki_err(&ca_key_path, format!("not a usable PEM private key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&read_text(&ca_cert_path, "the CA certificate")?, ca_key)
        .map_err(|e| {
            pki_err(
                &ca_cert_path,
                format!("not a usable PEM CA certificate: {e}"),
            )
        })?;
    if not_after <= not_before {
        return Err(pki_err(out_dir, "validity period ends before it starts"));
    }

    fs::create_dir_all(out_dir)
        .map_err(|e| pki_err(out_dir, format!("cannot create directory: {e}")))?;
    let stem = identity.file_stem();
    let paths = CertPaths {
        cert: out_dir.join(format!("{stem}.pem")),
        key: out_dir.join(format!("{stem}.key")),
    };
    refuse_existing(&[&paths.cert, &paths.key])?;

    let key =
        KeyPair::generate().map_err(|e| pki_err(&paths.key, format!("key generation: {e}")))?;
    let mut params = CertificateParams::new(vec![identity.dns_name()])
        .map_err(|e| pki_err(&paths.cert, format!("bad subject name: {e}")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, identity.name.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, identity.role.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| pki_err(&paths.cert, format!("cannot sign the certificate: {e}")))?;

    write_new(&paths.key, &key.serialize_pem(), true)?;
    write_new(&paths.cert, &cert.pem(), false)?;
    Ok(paths)
}

/// The crypto provider every config of this crate is built with (ring). Passing it explicitly
/// means no process-wide default needs to be installed.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a process needs for mutual TLS: the consortium CA to trust, its own certificate chain and
/// its private key. `Debug` does not print the key; there is no `Clone` (share it with `Arc`).
pub struct Credentials {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("cert", &self.cert_path)
            .field("identity", &self.identity().ok())
            .field("trusted_cas", &self.roots.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Loads PEM files: `ca` (the consortium CA certificate), `cert` (own certificate, possibly
    /// followed by intermediates) and `key` (own private key). Checks that the key belongs to the
    /// certificate and that the certificate was issued by the CA; an expired or not yet valid
    /// certificate only logs a warning here (peers will refuse it at the handshake).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials, TransportError> {
        let ca_certs = read_certs(ca, "CA certificate")?;
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| pki_err(ca, format!("not a usable CA certificate: {e}")))?;
        }
        let chain = read_certs(cert, "certificate")?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            pki_err(
                key,
                format!("cannot read a PEM private key (PKCS#8, SEC1 or RSA): {e}"),
            )
        })?;

        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| pki_err(key, format!("unsupported private key: {e}")))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|e| {
                pki_err(
                    key,
                    format!("does not belong to the certificate {}: {e}", cert.display()),
                )
            })?;

        let creds = Credentials {
            roots: Arc::new(roots),
            chain,
            key: key_der,
            cert_path: cert.to_owned(),
        };
        creds.check_issued_by_ca(&provider, ca)?;
        creds.identity().map_err(|e| pki_err(cert, e))?;
        Ok(creds)
    }

    /// Own identity, from own certificate.
    pub fn identity(&self) -> Result<Identity, TransportError> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| TransportError::NoIdentity {
                reason: format!("{} holds no certificate", self.cert_path.display()),
            })?;
        Identity::from_cert(leaf)
    }

    /// Own certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trusted consortium CA(s).
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    fn check_issued_by_ca(
        &self,
        provider: &CryptoProvider,
        ca: &Path,
    ) -> Result<(), TransportError> {
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err(pki_err(&self.cert_path, "holds no certificate"));
        };
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| pki_err(&self.cert_path, format!("unparsable certificate: {e}")))?;
        let verified = ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        );
        match verified {
            Ok(_) => Ok(()),
            Err(
                e @ (webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. }),
            ) => {
                tracing::warn!(cert = %self.cert_path.display(), "own certificate is not valid now: {e}");
                Ok(())
            }
            Err(e) => Err(pki_err(
                &self.cert_path,
                format!(
                    "not a valid client certificate from the CA in {}: {e}",
                    ca.display()
                ),
            )),
        }
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| pki_err(path, format!("cannot read {what}: {e}")))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pki_err(path, format!("malformed PEM {what}: {e}")))?;
    if certs.is_empty() {
        return Err(pki_err(
            path,
            format!("no PEM {what} (BEGIN CERTIFICATE) found"),
        ));
    }
    Ok(certs)
}
