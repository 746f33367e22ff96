//! What a process needs for mutual TLS — the consortium CA, its own certificate and key, and the
//! CA's revocation list — kept current while it runs.
//!
//! [`Credentials`] is a handle on the files' last good contents. Every endpoint built from it
//! ([`crate::server_endpoint`], [`crate::client_endpoint`]) asks it, at each handshake, for the
//! certificate to present and for the verifier to check the peer with, so a reload
//! ([`Credentials::reload`], or the task [`Credentials::spawn_reloader`] starts: on change or
//! SIGHUP) takes effect on the next handshake without a restart: a renewed certificate is
//! presented, a new CRL refuses what it revokes. Connections already open are not re-checked by
//! rustls; [`Credentials::until_untrusted`] resolves when a reload makes an open connection's
//! peer untrusted, so a server can close it.
//!
//! A reload that fails (a half-copied file, a key that does not match the certificate, a CRL
//! from another CA, a certificate for another identity) keeps the last good contents and logs
//! why; the next change is tried again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use tokio::sync::watch;

use crate::identity::{empty_chain, peer_chain};
use crate::{Identity, TransportError};

/// Largest CA, certificate, key or CRL file read.
const MAX_TLS_FILE: u64 = 4 << 20;

/// How often [`Credentials::spawn_reloader`] looks at the files by default.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// The files a process's TLS is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The consortium CA certificate.
    pub ca: PathBuf,
    /// Own certificate (possibly followed by intermediates).
    pub cert: PathBuf,
    /// Own private key.
    pub key: PathBuf,
    /// The CA's certificate revocation list; without one, nothing is revoked.
    pub crl: Option<PathBuf>,
}

/// The crypto provider every config of this crate is built with (ring). Passing it explicitly
/// means no process-wide default needs to be installed.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pki_err(path: &Path, reason: impl fmt::Display) -> TransportError {
    TransportError::Pki {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// One loaded, consistent set of the files.
struct Snapshot {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    certified: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    identity: Identity,
    revoked_entries: usize,
    /// The raw bytes each file had (ca, cert, key, crl), to notice a change.
    contents: Vec<Vec<u8>>,
}

pub(crate) struct Shared {
    files: TlsFiles,
    current: RwLock<Arc<Snapshot>>,
    generation: watch::Sender<u64>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = self.snapshot();
        f.debug_struct("Credentials")
            .field("cert", &self.files.cert)
            .field("crl", &self.files.crl)
            .field("identity", &now.identity)
            .field("trusted_cas", &now.roots.len())
            .field("revoked_entries", &now.revoked_entries)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Shared {
    fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock still holds a consistent snapshot (it is only ever swapped whole).
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// What a process needs for mutual TLS: the consortium CA to trust, the CA's revocation list,
/// its own certificate chain and its private key — reloadable (see the module docs). `Debug`
/// does not print the key; there is no `Clone` (share it with `Arc`).
pub struct Credentials {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, TransportError> {
    let len = std::fs::metadata(path)
        .map_err(|e| pki_err(path, format!("cannot read {what}: {e}")))?
        .len();
    if len > MAX_TLS_FILE {
        return Err(pki_err(
            path,
            format!("{what} of {len} bytes is larger than the {MAX_TLS_FILE}-byte limit"),
        ));
    }
    std::fs::read(path).map_err(|e| pki_err(path, format!("cannot read {what}: {e}")))
}

fn read_contents(files: &TlsFiles) -> Result<Vec<Vec<u8>>, TransportError> {
    let mut out = vec![
        read_file(&files.ca, "CA certificate")?,
        read_file(&files.cert, "certificate")?,
        read_file(&files.key, "private key")?,
    ];
    if let Some(crl) = &files.crl {
        out.push(read_file(crl, "CRL")?);
    }
    Ok(out)
}

fn parse_certs(
    bytes: &[u8],
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
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

fn load_snapshot(files: &TlsFiles, contents: Vec<Vec<u8>>) -> Result<Snapshot, TransportError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(&contents[0], &files.ca, "CA certificate")? {
        roots
            .add(c)
            .map_err(|e| pki_err(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let chain = parse_certs(&contents[1], &files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&contents[2]).map_err(|e| {
        pki_err(
            &files.key,
            format!("cannot read a PEM private key (PKCS#8, SEC1 or RSA): {e}"),
        )
    })?;
    let crls = match (&files.crl, contents.get(3)) {
        (Some(path), Some(bytes)) => {
            let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pki_err(path, format!("malformed PEM CRL: {e}")))?;
            if crls.is_empty() {
                return Err(pki_err(path, "no PEM CRL (BEGIN X509 CRL) found"));
            }
            crls
        }
        _ => Vec::new(),
    };
    let mut revoked_entries = 0;
    for (crl, path) in crls.iter().zip(files.crl.iter().cycle()) {
        webpki::OwnedCertRevocationList::from_der(crl)
            .map_err(|e| pki_err(path, format!("unparsable CRL: {e:?}")))?;
        revoked_entries += x509_parser::parse_x509_crl(crl)
            .map(|(_, c)| c.iter_revoked_certificates().count())
            .unwrap_or(0);
    }

    let provider = provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| pki_err(&files.key, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    certified.keys_match().map_err(|e| {
        pki_err(
            &files.key,
            format!(
                "does not belong to the certificate {}: {e}",
                files.cert.display()
            ),
        )
    })?;
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))?;

    // Own certificate, under the same rules peers apply: issued by the CA (else an error), and
    // not expired or revoked (else a warning: peers will refuse it, but the operator may be
    // about to install a renewal). A CRL the CA did not sign leaves every certificate's status
    // unknown, which would refuse every peer: an error here.
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(pki_err(&files.cert, "holds no certificate"));
    };
    match client_verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
        Ok(_) => {}
        Err(rustls::Error::InvalidCertificate(
            e @ (CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. }),
        )) => {
            tracing::warn!(cert = %files.cert.display(), "own certificate is not valid now: {e}");
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => {
            tracing::warn!(cert = %files.cert.display(), "own certificate is revoked by the CRL; peers will refuse it");
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus)) => {
            return Err(pki_err(
                files.crl.as_deref().unwrap_or(&files.ca),
                format!(
                    "this CRL is not from the CA in {} (it would leave every certificate's \
                     status unknown)",
                    files.ca.display()
                ),
            ));
        }
        Err(e) => {
            return Err(pki_err(
                &files.cert,
                format!(
                    "not a valid client certificate from the CA in {}: {e}",
                    files.ca.display()
                ),
            ));
        }
    }
    let identity = Identity::from_cert(leaf).map_err(|e| pki_err(&files.cert, e))?;
    Ok(Snapshot {
        roots,
        chain,
        key,
        certified: Arc::new(certified),
        client_verifier,
        server_verifier,
        identity,
        revoked_entries,
        contents,
    })
}

impl Credentials {
    /// Loads PEM files: `ca` (the consortium CA certificate), `cert` (own certificate, possibly
    /// followed by intermediates) and `key` (own private key), with no CRL. See
    /// [`Credentials::load_files`].
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials, TransportError> {
        Credentials::load_files(TlsFiles {
            ca: ca.to_owned(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            crl: None,
        })
    }

    /// Loads the files. Checks that the key belongs to the certificate, that the certificate was
    /// issued by the CA and that the CRL (if any) was signed by it; an expired, not yet valid or
    /// revoked own certificate only logs a warning here (peers will refuse it at the handshake).
    pub fn load_files(files: TlsFiles) -> Result<Credentials, TransportError> {
        let contents = read_contents(&files)?;
        let snapshot = load_snapshot(&files, contents)?;
        Ok(Credentials {
            shared: Arc::new(Shared {
                files,
                current: RwLock::new(Arc::new(snapshot)),
                generation: watch::Sender::new(0),
            }),
        })
    }

    /// Own identity, from own certificate (it cannot change on reload).
    pub fn identity(&self) -> Result<Identity, TransportError> {
        Ok(self.shared.snapshot().identity.clone())
    }

    /// Own certificate chain, leaf first (as currently loaded).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.shared.snapshot().chain.clone()
    }

    /// The trusted consortium CA(s) (as currently loaded).
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.shared.snapshot().roots.clone()
    }

    /// How many entries the loaded CRL lists.
    pub fn revoked_entries(&self) -> usize {
        self.shared.snapshot().revoked_entries
    }

    /// The files these credentials come from.
    pub fn files(&self) -> &TlsFiles {
        &self.shared.files
    }

    /// The private key's DER, for the restart keys of a serving endpoint.
    /// The caller zeroizes it.
    pub(crate) fn secret_key_der(&self) -> Vec<u8> {
        self.shared.snapshot().key.secret_der().to_vec()
    }

    /// The dynamic resolver/verifier endpoints are built with.
    pub(crate) fn live(&self) -> Arc<Live> {
        Arc::new(Live {
            shared: self.shared.clone(),
            client_cert_mandatory: true,
        })
    }

    /// [`Self::live`] with one difference: as a server it lets a client that presents no
    /// certificate finish the handshake (one it does present is verified all the same).
    pub(crate) fn live_client_cert_optional(&self) -> Arc<Live> {
        Arc::new(Live {
            shared: self.shared.clone(),
            client_cert_mandatory: false,
        })
    }

    /// Reads the files again and, when any changed and they still load (same identity), makes
    /// them current for every later handshake. `Ok(true)` when something changed; on an error
    /// the last good contents stay in use.
    pub fn reload(&self) -> Result<bool, TransportError> {
        let files = &self.shared.files;
        let contents = read_contents(files)?;
        let old = self.shared.snapshot();
        if contents == old.contents {
            return Ok(false);
        }
        let new = load_snapshot(files, contents)?;
        if new.identity != old.identity {
            return Err(pki_err(
                &files.cert,
                format!(
                    "now certifies {}, not {}; a process cannot change its identity without a \
                     restart",
                    new.identity, old.identity
                ),
            ));
        }
        let revoked = new.revoked_entries;
        match self.shared.current.write() {
            Ok(mut g) => *g = Arc::new(new),
            Err(p) => *p.into_inner() = Arc::new(new),
        }
        self.shared.generation.send_modify(|g| *g += 1);
        tracing::info!(cert = %files.cert.display(), revoked_entries = revoked, "TLS files reloaded");
        Ok(true)
    }

    /// Starts a task that calls [`Credentials::reload`] every `poll` and on SIGHUP, logging
    /// each reload and each failure (a failure once until the files change again). Must be
    /// called inside a tokio runtime; the task ends when these credentials are dropped.
    pub fn spawn_reloader(&self, poll: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.shared);
        // Registered before returning, so a SIGHUP sent once this returns is never the default
        // action (which ends the process).
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let signalled = tokio::select! {
                    _ = tokio::time::sleep(poll) => false,
                    _ = hangup => true,
                };
                let Some(shared) = weak.upgrade() else { return };
                let creds = Credentials { shared };
                match creds.reload() {
                    Ok(changed) => {
                        last_error = None;
                        if signalled && !changed {
                            tracing::info!("SIGHUP: TLS files unchanged");
                        }
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if signalled || last_error.as_ref() != Some(&e) {
                            tracing::warn!(reason = %e, "TLS files not reloaded; the last good ones stay in use");
                        }
                        last_error = Some(e);
                    }
                }
            }
        })
    }

    /// Whether the peer of `conn` is still trusted under the current CA and CRL: its
    /// certificate chain is verified again, now.
    pub fn check_peer(&self, conn: &quinn::Connection) -> Result<(), TransportError> {
        let chain = peer_chain(conn)?;
        let (leaf, intermediates) = chain.split_first().ok_or_else(empty_chain)?;
        let peer = Identity::from_cert(leaf)
            .map(|i| i.to_string())
            .unwrap_or_else(|_| "the peer".to_owned());
        self.shared
            .snapshot()
            .client_verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| TransportError::Untrusted {
                peer,
                reason: describe_cert_error(&e),
            })
    }

    /// Resolves when a reload makes the peer of `conn` untrusted (revoked, expired, or no
    /// longer from the CA), with the reason; pending otherwise. Servers select on it for
    /// long-lived connections and close them when it fires.
    pub async fn until_untrusted(&self, conn: &quinn::Connection) -> TransportError {
        let mut rx = self.shared.generation.subscribe();
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Err(e) = self.check_peer(conn) {
                return e;
            }
        }
    }
}

/// A certificate error as an operator reads it.
pub(crate) fn describe_cert_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            "its certificate is revoked by the consortium CA's CRL".to_owned()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "its certificate has expired".to_owned(),
        e => e.to_string(),
    }
}

/// The handshake-signature algorithms of [`provider`]. Both WebPKI verifiers of a snapshot are
/// built with that provider and check a handshake signature with these alone (not with the
/// roots), so the client and server sides of [`Live`] share them.
fn signature_algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGS: OnceLock<WebPkiSupportedAlgorithms> = OnceLock::new();
    ALGS.get_or_init(|| provider().signature_verification_algorithms)
}

/// The three handshake-signature methods that [`ClientCertVerifier`] and [`ServerCertVerifier`]
/// both declare, checked as the WebPKI verifiers check them. They are the same in both impls
/// of [`Live`]; two traits' methods can share one body only through a macro.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, signature_algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, signature_algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            signature_algorithms().supported_schemes()
        }
    };
}

/// The certificate resolver and peer verifier of every endpoint: each call reads the current
/// snapshot, so a reload applies at the next handshake.
#[derive(Debug)]
pub(crate) struct Live {
    shared: Arc<Shared>,
    /// Whether a client must present a certificate (false only for HTTPS, whose application
    /// answers such a client with a readable 401).
    client_cert_mandatory: bool,
}

impl ResolvesServerCert for Live {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.snapshot().certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for Live {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.shared.snapshot().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Live {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_cert_mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (an empty list means "send your certificate"); the current ones
        // cannot be borrowed out of a reloadable snapshot, and each party has one certificate.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.shared
            .snapshot()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    signature_checks!();
}

impl ServerCertVerifier for Live {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.shared.snapshot().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    signature_checks!();
}
