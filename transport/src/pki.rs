//! The consortium PKI: a CA, certificate requests, certificates for nodes, the coordinator and
//! analysts, and the CA's revocation list.
//!
//! Every party generates its own key: [`request`] writes a key (mode 0600) and a certificate
//! signing request (CSR) on the party's own machine; the CA operator runs [`sign`] on the CSR and
//! sends back the certificate. The CA directory holds the CA key, the CA certificate, a copy of
//! every certificate it issued (`issued/<serial>.pem`) and the CRL (`crl.pem`), never a party's
//! private key. [`issue`] generates a key and a certificate in one step: it exists for the demo
//! and the tests only.
//!
//! Everything is PEM on disk. Private keys are written with mode 0600 and never overwritten; a
//! certificate carries its identity as one SAN DNS name ([`Identity::dns_name`]), the name as CN
//! and the role as OU, both the serverAuth and clientAuth EKUs (every party may dial and listen),
//! and a random 128-bit serial number (the CRL names certificates by serial).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use crate::{Identity, PeerRole, TransportError};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CA's certificate revocation list inside the CA directory.
pub const CRL_FILE: &str = "crl.pem";
/// Directory (inside the CA directory) holding a copy of every certificate the CA issued,
/// named by serial number.
pub const ISSUED_DIR: &str = "issued";

/// How long a CA is valid.
const CA_VALIDITY: Duration = Duration::days(10 * 365);
/// How long an issued certificate is valid by default.
pub const CERT_VALIDITY: Duration = Duration::days(365);
/// The `nextUpdate` of a CRL. Verifiers here do not enforce it (a stale CRL still revokes what
/// it lists); it tells other tools when to expect a new one.
const CRL_VALIDITY: Duration = Duration::days(365);
/// Back-dating of `not_before`, to tolerate clock skew between partners.
const BACKDATE: Duration = Duration::hours(1);
/// Largest CSR, certificate or CRL file read (a CSR is under 1 KiB; a CRL grows by ~40 bytes per
/// revoked certificate).
const MAX_PKI_FILE: u64 = 4 << 20;

/// Where [`init_ca`] wrote the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPaths {
    /// The CA certificate (distribute it to every party).
    pub cert: PathBuf,
    /// The CA private key (keep it offline).
    pub key: PathBuf,
    /// The CA's certificate revocation list (empty at first; distribute it to every party).
    pub crl: PathBuf,
}

/// Where [`issue`] wrote a certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
}

/// What [`request`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestPaths {
    /// The private key (mode 0600); it stays on this machine.
    pub key: PathBuf,
    /// The certificate signing request to send to the CA operator.
    pub csr: PathBuf,
    /// Whether an existing key was reused (a renewal: pins on the key stay valid).
    pub reused_key: bool,
    /// The key's fingerprint, `sha256:<hex>` over its SubjectPublicKeyInfo (what agreements pin).
    pub key_fingerprint: String,
}

/// A certificate the CA issued (see [`sign`], [`issued`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// Whom it certifies.
    pub identity: Identity,
    /// Serial number, lower-case hex without leading zeros.
    pub serial: String,
    /// Fingerprint of the certified key, `sha256:<hex>` over the SubjectPublicKeyInfo.
    pub key_fingerprint: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Where the certificate was written (for [`issued`], the CA's own copy).
    pub path: PathBuf,
}

fn pki_err(path: &Path, reason: impl fmt::Display) -> TransportError {
    TransportError::Pki {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn open_options(secret: bool) -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    opts
}

/// Creates `path` with `contents`, failing if it exists. `secret` files get mode 0600 from
/// creation on, so the key is never readable by others, not even briefly.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TransportError> {
    let mut file = open_options(secret).open(path).map_err(|e| {
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

/// Replaces (or creates) the public file `path` atomically: a process that watches it (a node
/// reloading its certificate or the CRL) reads either the old or the new contents, never half.
fn write_replace(path: &Path, contents: &str) -> Result<(), TransportError> {
    let name = path
        .file_name()
        .ok_or_else(|| pki_err(path, "not a file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, false)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        pki_err(path, format!("cannot replace: {e}"))
    })
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

/// Reads a (small) text file, refusing one over [`MAX_PKI_FILE`] before reading it.
fn read_text(path: &Path, what: &str) -> Result<String, TransportError> {
    let len = fs::metadata(path)
        .map_err(|e| pki_err(path, format!("cannot read {what}: {e}")))?
        .len();
    if len > MAX_PKI_FILE {
        return Err(pki_err(
            path,
            format!("{what} of {len} bytes is larger than the {MAX_PKI_FILE}-byte limit"),
        ));
    }
    fs::read_to_string(path).map_err(|e| pki_err(path, format!("cannot read {what}: {e}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of a SubjectPublicKeyInfo (DER).
fn spki_fingerprint(spki: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex(ring::digest::digest(&ring::digest::SHA256, spki).as_ref())
    )
}

/// The fingerprint agreements pin: `sha256:<hex>` of the certificate's SubjectPublicKeyInfo. It
/// names the key, so a renewed certificate for the same key has the same fingerprint.
pub fn key_fingerprint(cert: &CertificateDer<'_>) -> Result<String, TransportError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TransportError::NoIdentity {
            reason: format!("unparsable certificate: {e}"),
        })?;
    Ok(spki_fingerprint(parsed.public_key().raw))
}

/// Serial number as lower-case hex without leading zero bytes (DER may add one).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    hex(&raw[start..])
}

fn parse_serial_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_start_matches("0x").replace(':', "");
    if s.is_empty() || s.len() > 40 || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A fresh random serial: 16 bytes from the OS CSPRNG, top bit clear (DER integers are signed)
/// and first byte non-zero (so its hex form is always 32 digits).
fn random_serial(path: &Path) -> Result<SerialNumber, TransportError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| pki_err(path, "the OS random number generator failed"))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// Creates the consortium CA in `dir` (`ca.pem`, `ca.key`, an empty `crl.pem`). Refuses to
/// overwrite an existing CA.
pub fn init_ca(dir: &Path, consortium: &str) -> Result<CaPaths, TransportError> {
    if consortium.trim().is_empty() {
        return Err(pki_err(dir, "the consortium name must not be empty"));
    }
    fs::create_dir_all(dir).map_err(|e| pki_err(dir, format!("cannot create directory: {e}")))?;
    let paths = CaPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
        crl: dir.join(CRL_FILE),
    };
    refuse_existing(&[&paths.cert, &paths.key, &paths.crl])?;

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
    params.serial_number = Some(random_serial(&paths.cert)?);
    let cert = params
        .self_signed(&key)
        .map_err(|e| pki_err(&paths.cert, format!("cannot sign the CA certificate: {e}")))?;

    write_new(&paths.key, &key.serialize_pem(), true)?;
    write_new(&paths.cert, &cert.pem(), false)?;
    write_crl(dir, Vec::new())?;
    Ok(paths)
}

/// The CA of `ca_dir`, ready to sign.
fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, TransportError> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_key = KeyPair::from_pem(&read_text(&ca_key_path, "the CA key")?)
        .map_err(|e| pki_err(&ca_key_path, format!("not a usable PEM private key: {e}")))?;
    Issuer::from_ca_cert_pem(&read_text(&ca_cert_path, "the CA certificate")?, ca_key).map_err(
        |e| {
            pki_err(
                &ca_cert_path,
                format!("not a usable PEM CA certificate: {e}"),
            )
        },
    )
}

/// The certificate profile for `identity`: only what this CA decides, nothing a request asked
/// for.
fn leaf_params(
    identity: &Identity,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    path: &Path,
) -> Result<CertificateParams, TransportError> {
    if not_after <= not_before {
        return Err(pki_err(path, "validity period ends before it starts"));
    }
    let mut params = CertificateParams::new(vec![identity.dns_name()])
        .map_err(|e| pki_err(path, format!("bad subject name: {e}")))?;
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
    params.serial_number = Some(random_serial(path)?);
    Ok(params)
}

/// Keeps the CA's copy of a certificate it issued, `issued/<serial>.pem`, and describes it.
fn record_issued(
    ca_dir: &Path,
    identity: &Identity,
    cert: &rcgen::Certificate,
    path: PathBuf,
    not_after: OffsetDateTime,
) -> Result<IssuedCert, TransportError> {
    let der = cert.der();
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| pki_err(&path, format!("cannot read back the certificate: {e}")))?;
    let serial = serial_hex(parsed.raw_serial());
    let key_fingerprint = spki_fingerprint(parsed.public_key().raw);
    let issued_dir = ca_dir.join(ISSUED_DIR);
    fs::create_dir_all(&issued_dir)
        .map_err(|e| pki_err(&issued_dir, format!("cannot create directory: {e}")))?;
    write_new(
        &issued_dir.join(format!("{serial}.pem")),
        &cert.pem(),
        false,
    )?;
    Ok(IssuedCert {
        identity: identity.clone(),
        serial,
        key_fingerprint,
        not_after,
        path,
    })
}

/// Issues a certificate for `identity`, valid from an hour ago for a year, signed by the CA in
/// `ca_dir`; generates its key too and writes `out_dir/<file_stem>.pem` and `.key` (see
/// [`Identity::file_stem`]).
///
/// **For the demo and tests only**: whoever runs this holds the party's private key. Real
/// parties use [`request`] on their own machine and the CA operator [`sign`]s the request.
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
/// certificates). For the demo and tests only.
pub fn issue_with_validity(
    ca_dir: &Path,
    identity: &Identity,
    out_dir: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertPaths, TransportError> {
    let issuer = load_issuer(ca_dir)?;
    fs::create_dir_all(out_dir)
        .map_err(|e| pki_err(out_dir, format!("cannot create directory: {e}")))?;
    let stem = identity.file_stem();
    let paths = CertPaths {
        cert: out_dir.join(format!("{stem}.pem")),
        key: out_dir.join(format!("{stem}.key")),
    };
    refuse_existing(&[&paths.cert, &paths.key])?;
    let params = leaf_params(identity, not_before, not_after, &paths.cert)?;

    let key =
        KeyPair::generate().map_err(|e| pki_err(&paths.key, format!("key generation: {e}")))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| pki_err(&paths.cert, format!("cannot sign the certificate: {e}")))?;

    write_new(&paths.key, &key.serialize_pem(), true)?;
    write_new(&paths.cert, &cert.pem(), false)?;
    record_issued(ca_dir, identity, &cert, paths.cert.clone(), not_after)?;
    Ok(paths)
}

/// Generates a private key for `identity` on this machine and a certificate signing request for
/// it: writes `out_dir/<file_stem>.key` (mode 0600) and `out_dir/<file_stem>.csr`. The key never
/// leaves `out_dir`; send the CSR to the CA operator, who runs [`sign`].
///
/// With `reuse_key` (a renewal), the existing key is kept and only a new CSR written, so pins on
/// the key stay valid. Without it, an existing key is never overwritten.
pub fn request(
    identity: &Identity,
    out_dir: &Path,
    reuse_key: bool,
) -> Result<RequestPaths, TransportError> {
    fs::create_dir_all(out_dir)
        .map_err(|e| pki_err(out_dir, format!("cannot create directory: {e}")))?;
    let stem = identity.file_stem();
    let key_path = out_dir.join(format!("{stem}.key"));
    let csr_path = out_dir.join(format!("{stem}.csr"));
    let key = if reuse_key {
        KeyPair::from_pem(&read_text(&key_path, "the key to renew")?)
            .map_err(|e| pki_err(&key_path, format!("not a usable PEM private key: {e}")))?
    } else {
        if key_path.exists() {
            return Err(pki_err(
                &key_path,
                "already exists; refusing to overwrite a private key (to renew the certificate \
                 for this key, pass --renew)",
            ));
        }
        KeyPair::generate().map_err(|e| pki_err(&key_path, format!("key generation: {e}")))?
    };
    let params = CertificateParams::new(vec![identity.dns_name()])
        .map_err(|e| pki_err(&csr_path, format!("bad subject name: {e}")))?;
    let mut params = params;
    params
        .distinguished_name
        .push(DnType::CommonName, identity.name.as_str());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| pki_err(&csr_path, format!("cannot write the request: {e}")))?;
    if !reuse_key {
        write_new(&key_path, &key.serialize_pem(), true)?;
    }
    write_replace(&csr_path, &csr)?;
    use rcgen::PublicKeyData;
    Ok(RequestPaths {
        key: key_path,
        csr: csr_path,
        reused_key: reuse_key,
        key_fingerprint: spki_fingerprint(&key.subject_public_key_info()),
    })
}

/// The identity a CSR asks for: exactly one SAN, a cleanroom identity name. Anything else in it
/// is refused rather than dropped, so the requester learns that the CA would not certify it.
fn requested_identity(
    csr: &CertificateSigningRequestParams,
    path: &Path,
) -> Result<Identity, TransportError> {
    let sans = &csr.params.subject_alt_names;
    let [SanType::DnsName(dns)] = sans.as_slice() else {
        return Err(pki_err(
            path,
            format!(
                "the request must name exactly one identity (one SAN DNS name such as \
                 acme.node.cleanroom); it has {} subject alternative names",
                sans.len()
            ),
        ));
    };
    Identity::from_dns_name(dns.as_str()).map_err(|e| pki_err(path, e))
}

/// Signs the certificate signing request at `csr_path` with the CA in `ca_dir`: a certificate
/// for the identity the request names, for the requester's key, valid from an hour ago for
/// `validity`. Writes it to `out` (refusing to overwrite an existing file unless `replace`,
/// which swaps it atomically so a running node reloads it whole) and keeps a copy in
/// `ca_dir/issued/`. The request's signature is verified (the requester holds the key); every
/// extension of the certificate is this CA's choice, whatever the request asked for.
pub fn sign(
    ca_dir: &Path,
    csr_path: &Path,
    out: &Path,
    validity: Duration,
    replace: bool,
) -> Result<IssuedCert, TransportError> {
    let issuer = load_issuer(ca_dir)?;
    let text = read_text(csr_path, "the certificate request")?;
    let csr = CertificateSigningRequestParams::from_pem(&text).map_err(|e| {
        pki_err(
            csr_path,
            format!("not a usable PEM certificate request (from `cleanroom pki request`): {e}"),
        )
    })?;
    let identity = requested_identity(&csr, csr_path)?;
    if validity <= Duration::ZERO {
        return Err(pki_err(out, "the validity period must be positive"));
    }
    if !replace {
        refuse_existing(&[out])?;
    }
    let now = OffsetDateTime::now_utc();
    let not_after = now + validity;
    let params = leaf_params(&identity, now - BACKDATE, not_after, out)?;
    let cert = CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    }
    .signed_by(&issuer)
    .map_err(|e| pki_err(out, format!("cannot sign the certificate: {e}")))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .map_err(|e| pki_err(parent, format!("cannot create directory: {e}")))?;
    }
    if replace {
        write_replace(out, &cert.pem())?;
    } else {
        write_new(out, &cert.pem(), false)?;
    }
    record_issued(ca_dir, &identity, &cert, out.to_owned(), not_after)
}

/// Every certificate the CA in `ca_dir` has issued (its copies in `issued/`), oldest expiry
/// first.
pub fn issued(ca_dir: &Path) -> Result<Vec<IssuedCert>, TransportError> {
    let dir = ca_dir.join(ISSUED_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(pki_err(&dir, format!("cannot list: {e}"))),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| pki_err(&dir, format!("cannot list: {e}")))?
            .path();
        if path.extension().is_none_or(|e| e != "pem") {
            continue;
        }
        out.push(cert_info(&path)?);
    }
    out.sort_by(|a, b| (a.not_after, &a.serial).cmp(&(b.not_after, &b.serial)));
    Ok(out)
}

/// Reads the certificate at `path` (the first in the file) and describes it.
pub fn cert_info(path: &Path) -> Result<IssuedCert, TransportError> {
    let text = read_text(path, "a certificate")?;
    let der = CertificateDer::from_pem_slice(text.as_bytes())
        .map_err(|e| pki_err(path, format!("malformed PEM certificate: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| pki_err(path, format!("unparsable certificate: {e}")))?;
    let identity = Identity::from_cert(&der).map_err(|e| pki_err(path, e))?;
    let not_after = OffsetDateTime::from_unix_timestamp(parsed.validity().not_after.timestamp())
        .map_err(|e| pki_err(path, format!("bad validity: {e}")))?;
    Ok(IssuedCert {
        identity,
        serial: serial_hex(parsed.raw_serial()),
        key_fingerprint: spki_fingerprint(parsed.public_key().raw),
        not_after,
        path: path.to_owned(),
    })
}

/// One entry of the CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Serial number of the revoked certificate (lower-case hex).
    pub serial: String,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
}

/// The entries of the CRL in `ca_dir` (none when there is no CRL yet).
pub fn revocations(ca_dir: &Path) -> Result<Vec<Revocation>, TransportError> {
    Ok(read_crl(ca_dir)?.0)
}

/// Entries and CRL number of the CRL in `ca_dir`.
fn read_crl(ca_dir: &Path) -> Result<(Vec<Revocation>, u128), TransportError> {
    let path = ca_dir.join(CRL_FILE);
    if !path.exists() {
        return Ok((Vec::new(), 0));
    }
    let text = read_text(&path, "the CRL")?;
    let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(text.as_bytes())
        .map_err(|e| pki_err(&path, format!("malformed PEM CRL: {e}")))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| pki_err(&path, format!("unparsable CRL: {e}")))?;
    let number = crl
        .crl_number()
        .map(|n| {
            n.to_bytes_be()
                .iter()
                .fold(0u128, |acc, b| acc.wrapping_shl(8) | u128::from(*b))
        })
        .unwrap_or(0);
    let mut entries = Vec::new();
    for r in crl.iter_revoked_certificates() {
        entries.push(Revocation {
            serial: serial_hex(r.raw_serial()),
            revoked_at: OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .map_err(|e| pki_err(&path, format!("bad revocation date: {e}")))?,
        });
    }
    Ok((entries, number))
}

/// Signs and writes `ca_dir/crl.pem` listing `entries`, with a CRL number one above the old
/// one's. Returns its path.
fn write_crl(ca_dir: &Path, entries: Vec<Revocation>) -> Result<PathBuf, TransportError> {
    let path = ca_dir.join(CRL_FILE);
    let issuer = load_issuer(ca_dir)?;
    let (_, number) = read_crl(ca_dir)?;
    let number = number.saturating_add(1);
    let mut revoked_certs = Vec::with_capacity(entries.len());
    for e in entries {
        let serial =
            parse_serial_hex(&e.serial).ok_or_else(|| pki_err(&path, "bad serial number"))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: e.revoked_at,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let now = OffsetDateTime::now_utc();
    let number_bytes = number.to_be_bytes();
    let first = number_bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(number_bytes.len() - 1);
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_VALIDITY,
        crl_number: SerialNumber::from_slice(&number_bytes[first..]),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .map_err(|e| pki_err(&path, format!("cannot sign the CRL: {e}")))?;
    let pem = crl
        .pem()
        .map_err(|e| pki_err(&path, format!("cannot encode the CRL: {e}")))?;
    write_replace(&path, &pem)?;
    Ok(path)
}

/// Which certificates [`revoke`] revokes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// Every certificate issued to this name; with a role, only those of that role. Without
    /// one, the name must belong to one role only.
    Name {
        /// The party's name (`acme`, `alice`, `coordinator`).
        name: String,
        /// Its role, when the name alone is ambiguous.
        role: Option<PeerRole>,
    },
    /// The one certificate with this serial number (hex, as `pki list` prints it).
    Serial(String),
}

/// What [`revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The certificates newly revoked.
    pub newly: Vec<IssuedCert>,
    /// Matching certificates that were already on the CRL.
    pub already: usize,
    /// The CRL written (distribute it to every node and the coordinator).
    pub crl: PathBuf,
}

/// Revokes certificates issued by the CA in `ca_dir` and rewrites its CRL (`crl.pem`). Nodes
/// and the coordinator that name the CRL in their config reload it on change (or on SIGHUP) and
/// then refuse the revoked certificates on every new connection and close connections that use
/// them.
pub fn revoke(ca_dir: &Path, target: &RevokeTarget) -> Result<Revoked, TransportError> {
    let all = issued(ca_dir)?;
    let matching: Vec<IssuedCert> = match target {
        RevokeTarget::Serial(s) => {
            let want = parse_serial_hex(s).map(|b| serial_hex(&b)).ok_or_else(|| {
                pki_err(ca_dir, format!("'{s}' is not a hexadecimal serial number"))
            })?;
            all.into_iter().filter(|c| c.serial == want).collect()
        }
        RevokeTarget::Name { name, role } => {
            let hits: Vec<IssuedCert> = all
                .into_iter()
                .filter(|c| {
                    c.identity.name == *name && role.as_ref().is_none_or(|r| *r == c.identity.role)
                })
                .collect();
            let mut roles: Vec<&str> = hits.iter().map(|c| c.identity.role.as_str()).collect();
            roles.sort_unstable();
            roles.dedup();
            if role.is_none() && roles.len() > 1 {
                return Err(pki_err(
                    ca_dir,
                    format!(
                        "'{name}' has certificates as {}; say which with --role",
                        roles.join(" and ")
                    ),
                ));
            }
            hits
        }
    };
    if matching.is_empty() {
        let what = match target {
            RevokeTarget::Serial(s) => format!("serial {s}"),
            RevokeTarget::Name { name, role: None } => format!("'{name}'"),
            RevokeTarget::Name {
                name,
                role: Some(r),
            } => format!("{r} '{name}'"),
        };
        return Err(pki_err(
            &ca_dir.join(ISSUED_DIR),
            format!("no certificate issued to {what} is on record here (`cleanroom pki list`)"),
        ));
    }
    let (mut entries, _) = read_crl(ca_dir)?;
    let now = OffsetDateTime::now_utc();
    let mut newly = Vec::new();
    let mut already = 0;
    for cert in matching {
        if entries.iter().any(|e| e.serial == cert.serial) {
            already += 1;
        } else {
            entries.push(Revocation {
                serial: cert.serial.clone(),
                revoked_at: now,
            });
            newly.push(cert);
        }
    }
    let crl = if newly.is_empty() {
        ca_dir.join(CRL_FILE)
    } else {
        write_crl(ca_dir, entries)?
    };
    Ok(Revoked {
        newly,
        already,
        crl,
    })
}

/// Re-signs the CRL of `ca_dir` with the same entries and a fresh date (creates an empty one
/// when there is none). Returns its path.
pub fn refresh_crl(ca_dir: &Path) -> Result<PathBuf, TransportError> {
    let (entries, _) = read_crl(ca_dir)?;
    write_crl(ca_dir, entries)
}
