//! The coordinator's config file (TOML).
//!
//! ```toml
//! listen = "127.0.0.1:7400"      # QUIC endpoint for nodes and analysts (port 0: ephemeral)
//! database = "coordinator.db"    # SQLite job store, created on first start
//! offer_timeout_secs = 15        # how long a node may take to accept or refuse an offer
//! job_timeout_secs = 3600        # how long a running job may take
//! max_running_jobs = 8           # jobs offered or running at once; later ones wait, pending
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/coordinator.pem"
//! key = "pki/coordinator.key"
//! [web]                          # optional: the web console, JSON API, /metrics, /healthz
//! listen = "127.0.0.1:7443"      # HTTPS with the same certificates (port 0: ephemeral)
//! ```
//! Relative paths are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::CoordinatorError;

/// The coordinator's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where the QUIC endpoint listens.
    pub listen: SocketAddr,
    /// The SQLite database file.
    pub database: PathBuf,
    /// Seconds a node has to answer an offer.
    #[serde(default = "default_offer_timeout")]
    pub offer_timeout_secs: u64,
    /// Seconds a running job may take.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_secs: u64,
    /// Most jobs offered or running at once; the others wait in `pending`, in submission
    /// order. Each job keeps both nodes' CPUs busy, so running many at once only slows all.
    #[serde(default = "default_max_running_jobs")]
    pub max_running_jobs: usize,
    /// Certificates.
    pub tls: TlsFiles,
    /// The web console (HTTPS), if it is served.
    #[serde(default)]
    pub web: Option<WebConfig>,
}

/// The web console's server (`[web]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Where the HTTPS server listens.
    pub listen: SocketAddr,
}

/// PEM files of the coordinator's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The consortium CA certificate.
    pub ca: PathBuf,
    /// The coordinator's certificate.
    pub cert: PathBuf,
    /// The coordinator's private key.
    pub key: PathBuf,
}

fn default_offer_timeout() -> u64 {
    15
}
fn default_job_timeout() -> u64 {
    3600
}
fn default_max_running_jobs() -> usize {
    8
}

/// Largest `max_running_jobs` accepted.
const MAX_RUNNING_JOBS_LIMIT: usize = 1024;

impl CoordinatorConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, CoordinatorError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoordinatorError::Config(format!("cannot read {}: {e}", path.display()))
        })?;
        let mut cfg: CoordinatorConfig = toml::from_str(&text)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.database,
            &mut cfg.tls.ca,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if cfg.offer_timeout_secs == 0 || cfg.job_timeout_secs == 0 {
            return Err(CoordinatorError::Config(format!(
                "{}: timeouts must be at least 1 second",
                path.display()
            )));
        }
        if !(1..=MAX_RUNNING_JOBS_LIMIT).contains(&cfg.max_running_jobs) {
            return Err(CoordinatorError::Config(format!(
                "{}: max_running_jobs must be between 1 and {MAX_RUNNING_JOBS_LIMIT}, not {}",
                path.display(),
                cfg.max_running_jobs
            )));
        }
        Ok(cfg)
    }

    /// The offer timeout.
    pub fn offer_timeout(&self) -> Duration {
        Duration::from_secs(self.offer_timeout_secs)
    }

    /// The job timeout.
    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.job_timeout_secs)
    }
}
