//! Running a node: the checks before start ([`preflight`]), the state directory's lock, and the
//! tasks of a running node — the control session, the data plane, policy reloads and retention.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cleanroom_transport::{Credentials, Identity, TransportTuning};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::audit::{AuditEvent, AuditLog};
use crate::error::NodeError;
use crate::policy::{NodeConfig, PolicyHolder};
use crate::state::NodeState;
use crate::{audit, control, dataplane, ledger, policy};

/// Runs a node from its config file until `shutdown` turns true. Like [`run`], and also
/// reloads the policy on SIGHUP (a reload that fails keeps the last good policy).
pub async fn run_from(
    config_path: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let (cfg, creds) = preflight(&config_path)?;
    serve(cfg, creds, Some(config_path), shutdown).await
}

/// Runs a node until `shutdown` turns true: opens the audit log, binds the data plane, then
/// keeps a control session with the coordinator open (reconnecting with backoff when it drops).
pub async fn run(cfg: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    let creds = credentials(&cfg)?;
    serve(cfg, creds, None, shutdown).await
}

/// Everything `run` checks before it starts, without starting anything or writing a file:
/// the config (with every dataset file's header: identifier, value and consent columns), the
/// certificates (they load, are this node's, and are a node's), and, when they exist, that the
/// audit log verifies and the ledger opens. `cleanroom-node check` is this; `run` does it first.
pub fn preflight(config_path: &Path) -> Result<(NodeConfig, Credentials), NodeError> {
    let cfg = policy::load_checked(config_path).map_err(|e| NodeError::Config(e.to_string()))?;
    let creds = credentials(&cfg)?;
    let log = cfg.audit_path();
    if log.exists() {
        let report = audit::verify(&log, None).map_err(|e| NodeError::Config(e.to_string()))?;
        // A torn last line is repaired at start; anything else refuses it.
        let torn_only = matches!(
            report.problems.as_slice(),
            [] | [audit::Tamper::Incomplete { .. }]
        );
        if !torn_only {
            return Err(NodeError::Config(format!(
                "the audit log {} does not verify ({} problem(s), the first: {}); run \
                 `cleanroom-node audit verify`",
                log.display(),
                report.problems.len(),
                report.problems[0]
            )));
        }
    }
    if cfg.ledger_path().exists() {
        open_ledger(&cfg)?;
    }
    Ok((cfg, creds))
}

/// Loads the node's certificates and checks that they name this node, as a node.
fn credentials(cfg: &NodeConfig) -> Result<Credentials, NodeError> {
    let creds = Credentials::load_files(cleanroom_transport::TlsFiles {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        crl: cfg.tls.crl.clone(),
    })?;
    let me = creds.identity()?;
    let expected = Identity::node(&cfg.name)?;
    if me != expected {
        return Err(NodeError::Config(format!(
            "the certificate {} is for {me}, but the config names this node '{}'; request one with \
             `cleanroom pki request --role node --name {}` and have the CA sign it",
            cfg.tls.cert.display(),
            cfg.name,
            cfg.name
        )));
    }
    Ok(creds)
}

async fn serve(
    cfg: NodeConfig,
    creds: Credentials,
    config_path: Option<PathBuf>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    // One node per state directory: two would share the audit log, the ledger and the
    // coordinator's registration. Held until this function returns.
    let _lock = lock_state_dir(&cfg.state_dir)?;
    // A node killed during a job left its blinded points on disk: nobody will read them.
    let shared = cfg.engine.shared_dir.clone();
    for dir in std::iter::once(cfg.spill_dir()).chain(shared) {
        match crate::job::spill::sweep(&dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                dir = %dir.display(),
                "removed spill directories left by an earlier run"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                dir = %dir.display(),
                "could not sweep a spill directory"
            ),
        }
    }
    // No audit log, no node: every access must be recorded.
    let audit = AuditLog::open(&cfg.audit_path()).map_err(|e| NodeError::Config(e.to_string()))?;
    let loaded = policy_loaded(&cfg, config_path.as_deref());
    // No ledger, no node: ε spent must survive restarts, and a node that cannot record it
    // must not start releasing.
    let ledger = open_ledger(&cfg)?;
    let tuning = TransportTuning::default();
    let listen = cfg.listen;
    let endpoint = cleanroom_transport::server_endpoint(listen, &creds, &tuning)?;
    let bound = endpoint.local_addr().map_err(|e| NodeError::Io {
        what: format!("reading the data-plane address bound at {listen}"),
        source: e,
    })?;
    // The CA, certificate, key and CRL are reloaded on change or SIGHUP: the next handshake
    // presents a renewed certificate and refuses a revoked peer.
    let tls_reloader = creds.spawn_reloader(cleanroom_transport::RELOAD_POLL);
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.into());
    tracing::info!(node = %cfg.name, data_plane = %bound, advertise = %advertise, "node listening");

    let path = config_path.clone().unwrap_or_default();
    // Bound before anything runs: a dashboard that cannot listen stops the start.
    let dashboard = match &cfg.dashboard {
        Some(d) => Some(crate::dashboard::Dashboard::bind(d).await?),
        None => None,
    };
    let audit_key = load_audit_key(&cfg.state_dir)?;
    let state = Arc::new(
        NodeState::new(PolicyHolder::new(cfg), path, audit, ledger, advertise)
            .map_err(|e| NodeError::Config(e.to_string()))?
            .with_audit_key(audit_key),
    );
    // Appended once the metrics observe the log (NodeState::new), before any job can run.
    state
        .audit
        .append(loaded, crate::clock::now_ms())
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let reloads = config_path.map(|_| tokio::spawn(reload_on_sighup(state.clone())));
    let purger = tokio::spawn(purge_results(state.clone()));
    let dashboard = dashboard.map(|d| tokio::spawn(d.serve(state.clone(), shutdown.clone())));
    let check: dataplane::PeerCheck = {
        let state = state.clone();
        Arc::new(move |peer, conn| crate::pin::check(&state, &peer.name, conn))
    };
    let dataplane = tokio::spawn(dataplane::serve(
        endpoint.clone(),
        state.waiting.clone(),
        check,
        shutdown.clone(),
    ));
    let control = control::run(endpoint.clone(), state, shutdown.clone()).await;
    endpoint.close(0u32.into(), b"node shutting down");
    dataplane.abort();
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    purger.abort();
    if let Some(dashboard) = dashboard {
        dashboard.abort();
    }
    tls_reloader.abort();
    endpoint.wait_idle().await;
    drop(creds);
    control
}

/// The file of a node's audit signing key in its state directory.
pub const AUDIT_KEY_FILE: &str = "audit-signing.key";

/// The node's audit signing key (`<state_dir>/audit-signing.key`): read, or made on first start
/// from the OS CSPRNG and written with mode 0600 (never overwritten). It signs every audit head
/// the node reports; no other party holds it.
pub fn load_audit_key(
    state_dir: &Path,
) -> Result<cleanroom_circuits::audit_head::AuditSigningKey, NodeError> {
    use cleanroom_circuits::audit_head::AuditSigningKey;
    use std::io::Write;
    let path = state_dir.join(AUDIT_KEY_FILE);
    let io = |what: String| move |source| NodeError::Io { what, source };
    match std::fs::read_to_string(&path) {
        Ok(text) => AuditSigningKey::from_text(&text)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(state_dir).map_err(io(format!(
                "creating the state directory {}",
                state_dir.display()
            )))?;
            let key = AuditSigningKey::generate();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut file = opts
                .open(&path)
                .map_err(io(format!("creating {}", path.display())))?;
            file.write_all(key.to_text().as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(format!("writing {}", path.display())))?;
            tracing::info!(file = %path.display(), "audit signing key created");
            Ok(key)
        }
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// The state directory's lock file, held (an advisory `flock`) by the running node.
pub const LOCK_FILE: &str = "node.lock";

/// Takes the state directory's lock for this process (creating the directory and the lock
/// file) and writes this process's id into it. Refused, naming the holder's process id, if
/// another process holds it. The lock is released when the returned file is dropped or the
/// process ends (however it ends).
pub fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, NodeError> {
    use std::io::{Read, Seek, Write};
    let io = |what: String| move |source| NodeError::Io { what, source };
    std::fs::create_dir_all(state_dir).map_err(io(format!(
        "creating the state directory {}",
        state_dir.display()
    )))?;
    let path = state_dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(NodeError::Config(format!(
                "the state directory {} is in use by another node process (pid {}); stop it \
                 first, or give this node its own state_dir",
                state_dir.display(),
                if holder.is_empty() { "unknown" } else { holder }
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io(format!("locking {}", path.display()))(e));
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.sync_data())
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(file)
}

/// The process id holding the state directory's lock, if a process holds it (read without
/// taking it).
pub fn state_dir_holder(state_dir: &Path) -> Option<String> {
    let file = std::fs::File::open(state_dir.join(LOCK_FILE)).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => Some(
            std::fs::read_to_string(state_dir.join(LOCK_FILE))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        ),
    }
}

/// Opens the node's privacy-budget ledger (creating its directory on first start).
pub fn open_ledger(cfg: &NodeConfig) -> Result<ledger::Ledger, NodeError> {
    let path = cfg.ledger_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| NodeError::Io {
            what: format!("creating the ledger's directory {}", dir.display()),
            source: e,
        })?;
    }
    ledger::Ledger::open(&path)
        .map_err(|e| NodeError::Config(format!("ledger {}: {e}", path.display())))
}

/// The audit entry for a loaded policy: the file's digest and the partners it names.
fn policy_loaded(cfg: &NodeConfig, path: Option<&Path>) -> AuditEvent {
    let bytes = path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
    AuditEvent::PolicyLoaded {
        digest: audit::to_hex(&Sha256::digest(&bytes)),
        agreements: cfg.agreements.iter().map(|a| a.partner.clone()).collect(),
    }
}

/// Purges job results older than the policy's retention, at start and every hour.
async fn purge_results(state: Arc<NodeState>) {
    loop {
        let cfg = state.cfg();
        if let Some(days) = cfg.retention_days {
            let dir = cfg.state_dir.clone();
            let purged = tokio::task::spawn_blocking(move || {
                crate::data::retention::purge(
                    &dir,
                    crate::data::retention::days(days),
                    std::time::SystemTime::now(),
                )
            })
            .await;
            match purged {
                Ok(Ok(report)) => {
                    tracing::info!(?report, retention_days = days, "purged old job results")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "purging old job results failed"),
                Err(e) => tracing::warn!(error = %e, "purging old job results failed"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}

/// Reloads the policy on SIGHUP; a reload that fails keeps the last good policy and says why.
async fn reload_on_sighup(state: Arc<NodeState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match state.policy.reload(&state.config_path) {
                Ok(()) => {
                    let cfg = state.cfg();
                    let event = policy_loaded(&cfg, Some(&state.config_path));
                    if let Err(e) = state.audit.append(event, crate::clock::now_ms()) {
                        tracing::error!(error = %e, "could not audit the policy reload");
                    }
                    tracing::info!(config = %state.config_path.display(), "policy reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed; keeping the last good policy")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}
