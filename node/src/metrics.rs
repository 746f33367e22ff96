//! The node's Prometheus metrics (`/metrics` on the dashboard's listener).
//!
//! Most figures come from one hook: every event the audit log makes durable is shown to
//! [`NodeMetrics::audited`] (see [`crate::audit::AuditLog::observe`]). A job's outcome, its
//! duration, the rows it read, the ε it charged and a veto's reason are all in the audit log
//! before the node acts on them, so the metrics count what the log holds. Two figures have
//! their own call site: bytes sent to a peer (the control loop, from the job's report) and
//! control-plane reconnects (the control loop).
//!
//! Label values come from closed sets: computations, outcomes, veto categories, and the
//! (partner, purpose) of accepted jobs, which the agreements list. A purpose an analyst made up
//! is vetoed and counted under its category only, so a hostile offer cannot add series.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::audit::AuditEvent;

/// A job's computation and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindOutcome {
    /// `overlap`, `match`, `aggregate`, `overlap-sum`, or `unknown` (a job that failed before
    /// the node decided on it).
    pub kind: String,
    /// `completed`, `failed` or `vetoed`.
    pub outcome: String,
}

/// A computation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The computation.
    pub kind: String,
}

/// A privacy budget's scope.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Scope {
    /// The partner (several, comma-separated, for an aggregate).
    pub partner: String,
    /// The purpose.
    pub purpose: String,
}

/// Why an offer was vetoed, as a category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// One of [`VETO_REASONS`].
    pub reason: String,
}

/// The veto categories, in the order they are tried against the reason text.
pub const VETO_REASONS: [&str; 8] = [
    "no-agreement",
    "expired",
    "budget",
    "rate-limit",
    "purpose",
    "dataset",
    "keys",
    "other",
];

/// The category of a veto's reason (the text itself is free and is not a label).
pub fn veto_category(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("no agreement") {
        "no-agreement"
    } else if r.contains("expired") {
        "expired"
    } else if r.contains("budget") || r.contains('ε') || r.contains("epsilon") {
        "budget"
    } else if r.contains("rate") || r.contains("runs per") || r.contains("too many") {
        "rate-limit"
    } else if r.contains("purpose") {
        "purpose"
    } else if r.contains("dataset") || r.contains("column") {
        "dataset"
    } else if r.contains("key") {
        "keys"
    } else {
        "other"
    }
}

type DurationFamily = Family<KindOutcome, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 50 ms to ~7 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// What the node remembers of a job between its decision and its end.
#[derive(Clone, Debug)]
struct Open {
    kind: String,
    scope: Scope,
    decided_ms: i64,
}

/// Jobs decided but not ended, and the last ones ended (a second release of an aggregate, or
/// an error after a release, still finds its job). Both bounded.
#[derive(Debug, Default)]
struct Jobs {
    open: HashMap<String, Open>,
    ended: VecDeque<(String, Open)>,
}

const MAX_OPEN: usize = 10_000;
const MAX_ENDED: usize = 1_000;

impl Jobs {
    fn find(&self, job_id: &str) -> Option<&Open> {
        self.open.get(job_id).or_else(|| {
            self.ended
                .iter()
                .rev()
                .find(|(id, _)| id == job_id)
                .map(|(_, o)| o)
        })
    }

    /// Ends the job if it is open; returns it and how long it ran.
    fn end(&mut self, job_id: &str) -> Option<Open> {
        let open = self.open.remove(job_id)?;
        self.push_ended(job_id, open.clone());
        Some(open)
    }

    fn push_ended(&mut self, job_id: &str, open: Open) {
        if self.ended.len() == MAX_ENDED {
            self.ended.pop_front();
        }
        self.ended.push_back((job_id.to_owned(), open));
    }

    fn has_ended(&self, job_id: &str) -> bool {
        self.ended.iter().any(|(id, _)| id == job_id)
    }
}

/// The node's metrics.
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    jobs: Family<KindOutcome, Counter>,
    durations: DurationFamily,
    items: Family<KindLabel, Counter>,
    bytes: Family<KindLabel, Counter>,
    epsilon: Family<Scope, Counter<f64, AtomicU64>>,
    rho: Family<Scope, Counter<f64, AtomicU64>>,
    vetoes: Family<ReasonLabel, Counter>,
    appends: Family<KindLabel, Counter>,
    reconnects: Counter,
    connected: Gauge,
    open: Mutex<Jobs>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    /// Registers every metric.
    pub fn new() -> NodeMetrics {
        let mut registry = Registry::with_prefix("cleanroom_node");
        let jobs = Family::<KindOutcome, Counter>::default();
        registry.register(
            "jobs",
            "Jobs this process ended, by computation and outcome (from the audit log)",
            jobs.clone(),
        );
        let durations: DurationFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "job_duration_seconds",
            "Time from the node's decision on a job to its release or failure",
            durations.clone(),
        );
        let items = Family::<KindLabel, Counter>::default();
        registry.register(
            "items_processed",
            "Rows read from the node's datasets for jobs (the audit log's Access entries)",
            items.clone(),
        );
        let bytes = Family::<KindLabel, Counter>::default();
        registry.register(
            "bytes_sent",
            "Bytes of protocol frames sent to the peer on the data plane by finished two-party \
             jobs",
            bytes.clone(),
        );
        let epsilon = Family::<Scope, Counter<f64, AtomicU64>>::default();
        registry.register(
            "epsilon_charged",
            "Pure ε charged by noised releases (discrete Laplace), by partner and purpose",
            epsilon.clone(),
        );
        let rho = Family::<Scope, Counter<f64, AtomicU64>>::default();
        registry.register(
            "rho_charged",
            "zCDP ρ charged by noised releases (an aggregate's discrete Gaussian), by partner \
             and purpose",
            rho.clone(),
        );
        let vetoes = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "vetoes",
            "Offers this node vetoed, by category of reason",
            vetoes.clone(),
        );
        let appends = Family::<KindLabel, Counter>::default();
        registry.register(
            "audit_appends",
            "Entries this process appended to the audit log, by kind",
            appends.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "control_reconnects",
            "Times the control session with the coordinator ended and the node dialled again",
            reconnects.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "coordinator_connected",
            "1 while the node is registered with the coordinator, else 0",
            connected.clone(),
        );
        NodeMetrics {
            registry,
            jobs,
            durations,
            items,
            bytes,
            epsilon,
            rho,
            vetoes,
            appends,
            reconnects,
            connected,
            open: Mutex::new(Jobs::default()),
        }
    }

    /// Counts one event the audit log made durable at `at_ms`.
    pub fn audited(&self, event: &AuditEvent, at_ms: i64) {
        self.appends
            .get_or_create(&KindLabel {
                kind: event.kind().to_owned(),
            })
            .inc();
        let mut jobs = self.open.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            AuditEvent::Decision {
                job_id,
                partner,
                purpose,
                computation,
                accepted: true,
                ..
            } => {
                if jobs.open.len() < MAX_OPEN && !jobs.has_ended(job_id) {
                    jobs.open.entry(job_id.clone()).or_insert(Open {
                        kind: computation.clone(),
                        scope: Scope {
                            partner: partner.clone(),
                            purpose: purpose.clone(),
                        },
                        decided_ms: at_ms,
                    });
                }
            }
            AuditEvent::Decision {
                job_id,
                computation,
                accepted: false,
                reason,
                ..
            } => {
                self.vetoes
                    .get_or_create(&ReasonLabel {
                        reason: veto_category(reason).to_owned(),
                    })
                    .inc();
                // An aggregate's other peers may have been accepted first: the job ends here.
                if let Some(open) = jobs.end(job_id) {
                    let took = (at_ms - open.decided_ms).max(0) as f64 / 1000.0;
                    self.ended(&open.kind, "vetoed", took);
                } else if !jobs.has_ended(job_id) {
                    let kind = known_kind(computation);
                    // Remembered, so a second veto of the same job is not a second job.
                    jobs.push_ended(
                        job_id,
                        Open {
                            kind: kind.clone(),
                            scope: Scope {
                                partner: String::new(),
                                purpose: String::new(),
                            },
                            decided_ms: at_ms,
                        },
                    );
                    self.ended(&kind, "vetoed", 0.0);
                }
            }
            AuditEvent::Access {
                job_id, rows_read, ..
            } => {
                let kind = jobs
                    .find(job_id)
                    .map_or_else(|| "unknown".to_owned(), |o| o.kind.clone());
                self.items
                    .get_or_create(&KindLabel { kind })
                    .inc_by(*rows_read);
            }
            AuditEvent::Release {
                job_id,
                epsilon,
                rho,
                ..
            } => {
                if let Some(open) = jobs.end(job_id) {
                    let took = (at_ms - open.decided_ms).max(0) as f64 / 1000.0;
                    self.ended(&open.kind, "completed", took);
                }
                if let Some(open) = jobs.find(job_id) {
                    match rho {
                        Some(r) if *r > 0.0 => {
                            self.rho.get_or_create(&open.scope).inc_by(*r);
                        }
                        Some(_) => {}
                        None if *epsilon > 0.0 => {
                            self.epsilon.get_or_create(&open.scope).inc_by(*epsilon);
                        }
                        None => {}
                    }
                }
            }
            AuditEvent::JobError { job_id, .. } => {
                if let Some(open) = jobs.end(job_id) {
                    let took = (at_ms - open.decided_ms).max(0) as f64 / 1000.0;
                    self.ended(&open.kind, "failed", took);
                } else if !jobs.has_ended(job_id) {
                    // Failed before the node decided on it (an unreadable offer).
                    self.ended("unknown", "failed", 0.0);
                }
            }
            AuditEvent::PolicyLoaded { .. }
            | AuditEvent::Forget { .. }
            | AuditEvent::ConnectionRefused { .. } => {}
        }
    }

    fn ended(&self, kind: &str, outcome: &str, took_secs: f64) {
        let labels = KindOutcome {
            kind: kind.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.jobs.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(took_secs);
    }

    /// Counts the bytes a finished two-party job of `kind` (a proto `JobKind`) sent its peer.
    pub fn bytes_sent(&self, kind: i32, bytes: u64) {
        self.bytes
            .get_or_create(&KindLabel {
                kind: crate::spec::computation_name(kind).to_owned(),
            })
            .inc_by(bytes);
    }

    /// The control session registered with the coordinator.
    pub fn control_registered(&self) {
        self.connected.set(1);
    }

    /// The control session ended; the node will dial again.
    pub fn control_lost(&self) {
        self.connected.set(0);
        self.reconnects.inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A computation name from a vetoed offer, kept only if it is one of ours.
fn known_kind(computation: &str) -> String {
    match computation {
        "overlap" | "match" | "aggregate" | "overlap-sum" => computation.to_owned(),
        _ => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(job: &str, accepted: bool, reason: &str) -> AuditEvent {
        AuditEvent::Decision {
            job_id: job.into(),
            partner: "globex".into(),
            purpose: "overlap-reporting".into(),
            computation: "overlap".into(),
            dataset: "customers".into(),
            keys: vec!["email".into()],
            accepted,
            reason: reason.into(),
        }
    }

    fn release(job: &str, epsilon: f64) -> AuditEvent {
        AuditEvent::Release {
            job_id: job.into(),
            partner: "globex".into(),
            what: "intersection count".into(),
            to: vec!["coordinator".into()],
            value: Some(10),
            epsilon,
            rho: None,
        }
    }

    #[test]
    fn the_audit_hook_counts_outcomes_vetoes_and_epsilon() {
        let m = NodeMetrics::new();
        m.audited(&decision("j1", true, "allowed"), 1_000);
        m.audited(
            &AuditEvent::Access {
                job_id: "j1".into(),
                dataset: "customers".into(),
                columns: vec!["email".into()],
                rows_read: 300,
                rows_rejected: 0,
                rows_excluded_consent: 0,
                rows_excluded_deleted: 0,
                rows_other: None,
                persons: None,
                rejected: Default::default(),
            },
            1_100,
        );
        m.audited(&release("j1", 0.5), 3_000);
        // A second release of the same job charges ε but is not a second job.
        m.audited(&release("j1", 0.25), 3_001);
        m.audited(
            &decision("j2", false, "purpose 'resale' is not agreed with globex"),
            4_000,
        );
        m.audited(&decision("j3", true, "allowed"), 5_000);
        m.audited(
            &AuditEvent::JobError {
                job_id: "j3".into(),
                partner: "globex".into(),
                reason: "peer went away".into(),
            },
            6_000,
        );
        m.bytes_sent(cleanroom_proto::v1::JobKind::Overlap as i32, 4_096);
        m.control_registered();
        m.control_lost();
        let text = m.encode();
        for line in [
            "cleanroom_node_jobs_total{kind=\"overlap\",outcome=\"completed\"} 1",
            "cleanroom_node_jobs_total{kind=\"overlap\",outcome=\"vetoed\"} 1",
            "cleanroom_node_jobs_total{kind=\"overlap\",outcome=\"failed\"} 1",
            "cleanroom_node_job_duration_seconds_sum{kind=\"overlap\",outcome=\"completed\"} 2.0",
            "cleanroom_node_items_processed_total{kind=\"overlap\"} 300",
            "cleanroom_node_bytes_sent_total{kind=\"overlap\"} 4096",
            "cleanroom_node_epsilon_charged_total{partner=\"globex\",purpose=\"overlap-reporting\"} 0.75",
            "cleanroom_node_vetoes_total{reason=\"purpose\"} 1",
            "cleanroom_node_audit_appends_total{kind=\"Decision\"} 3",
            "cleanroom_node_control_reconnects_total 1",
            "cleanroom_node_coordinator_connected 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // The vetoed purpose is not a label.
        assert!(!text.contains("resale"), "{text}");
    }

    #[test]
    fn veto_reasons_fall_in_closed_categories() {
        assert_eq!(veto_category("no agreement with initech"), "no-agreement");
        assert_eq!(
            veto_category("agreement with globex expired 2026-06-30"),
            "expired"
        );
        assert_eq!(veto_category("whatever a hostile peer says"), "other");
        for r in ["no agreement", "expired", "ε budget", "x"] {
            assert!(VETO_REASONS.contains(&veto_category(r)));
        }
    }
}
