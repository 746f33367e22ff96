//! What the coordinator's tasks share: the configuration, the job store, the connected nodes,
//! and this process's identity as a lease holder. It depends on nothing above it, so the API,
//! the runners and the scheduler can all hold it without importing one another.

use std::sync::atomic::AtomicBool;

use tokio::sync::Semaphore;

use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{JobStore, LeaseHolder};

/// What the coordinator's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: CoordinatorConfig,
    /// The job store.
    pub store: JobStore,
    /// Connected nodes.
    pub registry: Registry,
    /// This process as the holder of job leases.
    pub holder: LeaseHolder,
    /// One permit per job that may be offered or running at once (`max_running_jobs`).
    pub slots: Semaphore,
    /// Set at a graceful stop: runners still waiting for a slot leave their job pending.
    pub stopping: AtomicBool,
    /// Prometheus metrics (`/metrics`).
    pub metrics: Metrics,
}

impl Shared {
    /// The shared state of a coordinator that has just opened its store.
    pub fn new(cfg: CoordinatorConfig, store: JobStore, holder: LeaseHolder) -> Shared {
        let slots = Semaphore::new(cfg.max_running_jobs);
        Shared {
            cfg,
            store,
            registry: Registry::default(),
            holder,
            slots,
            stopping: AtomicBool::new(false),
            metrics: Metrics::new(),
        }
    }
}
