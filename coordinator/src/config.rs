//! The coordinator's config file (TOML).
//!
//! ```toml
//! listen = "127.0.0.1:7400"      # QUIC endpoint for nodes and analysts (port 0: ephemeral)
//! database = "coordinator.db"    # SQLite job store, created on first start
//! offer_timeout_secs = 15        # how long a node may take to accept or refuse an offer
//! job_timeout_secs = 3600        # how long a running job may take
//! max_running_jobs = 8           # jobs offered or running at once; later ones wait, pending
//! notify_dirs = ["/srv/cleanroom/notify"]   # where schedules may write `--notify-dir` files
//! on_done_dirs = ["/srv/cleanroom/hooks"]   # where `--on-done` programs must live
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/coordinator.pem"
//! key = "pki/coordinator.key"
//! crl = "pki/crl.pem"              # the CA's revocation list; reloaded on change or SIGHUP
//!
//! [[role]]                         # analysts see and act on their own jobs and schedules;
//! name = "auditors"                # a role grants more: read-all, schedule-admin or admin
//! grants = ["read-all"]
//! analysts = ["carol"]
//!
//! [web]                            # optional: the web console, JSON API, /metrics, /healthz
//! listen = "127.0.0.1:7443"        # HTTPS with the same certificates (port 0: ephemeral)
//! ```
//! Relative paths are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::fmt;

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
    /// Directories a schedule's `--notify-dir` must be inside (absolute). Empty: no schedule
    /// may write notification files.
    #[serde(default)]
    pub notify_dirs: Vec<PathBuf>,
    /// Directories a schedule's `--on-done` program must be in (absolute). Empty: no schedule
    /// may run a program on this host.
    #[serde(default)]
    pub on_done_dirs: Vec<PathBuf>,
    /// Roles granting analysts more than their own jobs and schedules (see `api::authz`).
    #[serde(default, rename = "role")]
    pub roles: Vec<RoleConfig>,
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
    /// The consortium CA's certificate revocation list (`cleanroom pki revoke` writes it).
    /// Reloaded on change or SIGHUP; a revoked node or analyst is refused and its open
    /// connection closed.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// A permission a role grants beyond an analyst's own jobs and schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// See every job, result, schedule and report.
    ReadAll,
    /// See and act on every schedule (pause, resume, remove, run now), and see its runs.
    ScheduleAdmin,
    /// See and act on everything.
    Admin,
}

impl Grant {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::ReadAll => "read-all",
            Grant::ScheduleAdmin => "schedule-admin",
            Grant::Admin => "admin",
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[role]]` of the coordinator's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// The role's name (for messages and logs).
    pub name: String,
    /// What it grants.
    pub grants: Vec<Grant>,
    /// The analysts (certificate names) who hold it.
    pub analysts: Vec<String>,
}

/// Whether `path` is absolute and has no `.` or `..` component (so a prefix check on it means
/// what it says).
pub fn is_plain_absolute(path: &Path) -> bool {
    use std::path::Component;
    path.is_absolute()
        && path.components().all(|c| {
            matches!(
                c,
                Component::RootDir | Component::Prefix(_) | Component::Normal(_)
            )
        })
}

/// Checks the `[[role]]` tables: a non-empty unique name, at least one grant and one analyst,
/// analyst names a certificate can carry.
pub fn validate_roles(roles: &[RoleConfig]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for role in roles {
        if role.name.trim().is_empty() {
            return Err("a [[role]] has an empty name".into());
        }
        if !names.insert(role.name.as_str()) {
            return Err(format!("[[role]] '{}' is defined twice", role.name));
        }
        if role.grants.is_empty() || role.analysts.is_empty() {
            return Err(format!(
                "[[role]] '{}' needs at least one grant and one analyst",
                role.name
            ));
        }
        for analyst in &role.analysts {
            cleanroom_transport::Identity::analyst(analyst)
                .map_err(|e| format!("[[role]] '{}': {e}", role.name))?;
        }
    }
    Ok(())
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
        ]
        .into_iter()
        .chain(cfg.tls.crl.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for (key, dirs) in [
            ("notify_dirs", &cfg.notify_dirs),
            ("on_done_dirs", &cfg.on_done_dirs),
        ] {
            if let Some(d) = dirs.iter().find(|d| !is_plain_absolute(d)) {
                return Err(CoordinatorError::Config(format!(
                    "{}: {key} must list absolute paths without '..', not '{}'",
                    path.display(),
                    d.display()
                )));
            }
        }
        validate_roles(&cfg.roles)
            .map_err(|e| CoordinatorError::Config(format!("{}: {e}", path.display())))?;
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

    /// The TLS files, for the transport.
    pub fn tls_files(&self) -> cleanroom_transport::TlsFiles {
        cleanroom_transport::TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
            crl: self.tls.crl.clone(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_role_configs_are_refused() {
        let role = |name: &str, grants: Vec<Grant>, analysts: Vec<&str>| RoleConfig {
            name: name.into(),
            grants,
            analysts: analysts.into_iter().map(String::from).collect(),
        };
        for (roles, why) in [
            (vec![role("", vec![Grant::Admin], vec!["a"])], "empty name"),
            (
                vec![
                    role("x", vec![Grant::Admin], vec!["a"]),
                    role("x", vec![Grant::ReadAll], vec!["b"]),
                ],
                "twice",
            ),
            (vec![role("x", vec![], vec!["a"])], "at least one"),
            (vec![role("x", vec![Grant::Admin], vec![])], "at least one"),
            (
                vec![role("x", vec![Grant::Admin], vec!["Bob"])],
                "invalid name",
            ),
        ] {
            let e = validate_roles(&roles).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
