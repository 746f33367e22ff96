//! The coordinator's Prometheus metrics (`/metrics` on the web console's server).
//!
//! Counters and histograms are updated where things happen (a job's end, a node's connection);
//! the gauges of jobs by kind and state and of connected nodes are read from the store and the
//! registry at each scrape, so they agree with `cleanroom job list` and `cleanroom nodes` even
//! across restarts. Label values are drawn from closed sets (kinds, states, node names of the
//! consortium): no free text, so a hostile reason cannot blow up the series count.

use std::time::Duration;

use cleanroom_proto::v1::JobState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A job's kind and state, as labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindState {
    /// `overlap`, `match`, `aggregate`, `overlap-sum`.
    pub kind: String,
    /// `pending`, `offered`, `running`, `succeeded`, `failed`, `vetoed`, `cancelled`.
    pub state: String,
}

/// A job's kind, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The job's kind.
    pub kind: String,
}

/// A node, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    /// The node's name (from its certificate).
    pub node: String,
}

type DurationFamily = Family<KindState, Histogram, fn() -> Histogram>;

/// The coordinator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<KindState, Gauge>,
    ended: Family<KindState, Counter>,
    durations: DurationFamily,
    items: Family<KindLabel, Counter>,
    vetoes: Family<NodeLabel, Counter>,
    connections: Family<NodeLabel, Counter>,
    connected: Gauge,
}

fn duration_histogram() -> Histogram {
    // 50 ms to ~7 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// The label of a stored job kind.
pub fn kind_name(kind: i32) -> String {
    crate::client::kind_name(kind).to_owned()
}

/// The label of a job state.
pub fn state_label(state: i32) -> String {
    JobState::try_from(state)
        .ok()
        .and_then(|s| s.as_str_name().strip_prefix("JOB_STATE_"))
        .map_or_else(|| "unknown".to_owned(), str::to_ascii_lowercase)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cleanroom_coordinator");
        let jobs = Family::<KindState, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs in the job store by kind and state",
            jobs.clone(),
        );
        let ended = Family::<KindState, Counter>::default();
        registry.register(
            "jobs_ended",
            "Jobs this process ran to an end, by kind and final state",
            ended.clone(),
        );
        let durations: DurationFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "job_duration_seconds",
            "Time from a job's start by this process to its end, by kind and final state",
            durations.clone(),
        );
        let items = Family::<KindLabel, Counter>::default();
        registry.register(
            "items_processed",
            "Distinct identifiers the parties of succeeded jobs reported processing (sum of \
             their own set sizes)",
            items.clone(),
        );
        let vetoes = Family::<NodeLabel, Counter>::default();
        registry.register(
            "vetoes",
            "Jobs refused by a node (a job vetoed by two nodes counts for each)",
            vetoes.clone(),
        );
        let connections = Family::<NodeLabel, Counter>::default();
        registry.register(
            "node_connections",
            "Control-plane connections accepted from a node (each one after the first is a \
             reconnect)",
            connections.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "connected_nodes",
            "Nodes connected to the control plane now",
            connected.clone(),
        );
        Metrics {
            registry,
            jobs,
            ended,
            durations,
            items,
            vetoes,
            connections,
            connected,
        }
    }

    /// Records a job's end: its kind, final state, how long this process ran it, the set sizes
    /// its parties reported and the nodes that vetoed it.
    pub fn job_ended(
        &self,
        kind: i32,
        state: JobState,
        took: Duration,
        items: u64,
        vetoed_by: &[String],
    ) {
        let labels = KindState {
            kind: kind_name(kind),
            state: state_label(state as i32),
        };
        self.ended.get_or_create(&labels).inc();
        self.durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if items > 0 {
            self.items
                .get_or_create(&KindLabel { kind: labels.kind })
                .inc_by(items);
        }
        for node in vetoed_by {
            self.vetoes
                .get_or_create(&NodeLabel { node: node.clone() })
                .inc();
        }
    }

    /// Records an accepted node control connection.
    pub fn node_connected(&self, node: &str) {
        self.connections
            .get_or_create(&NodeLabel {
                node: node.to_owned(),
            })
            .inc();
    }

    /// The text exposition, with the gauges set from `jobs` ((kind, state, count) as the store
    /// counts them) and `connected` nodes.
    pub fn encode(&self, jobs: &[(i32, i32, u64)], connected: usize) -> String {
        self.jobs.clear();
        for (kind, state, n) in jobs {
            self.jobs
                .get_or_create(&KindState {
                    kind: kind_name(*kind),
                    state: state_label(*state),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.connected
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::JobKind;

    #[test]
    fn exposition_has_the_gauges_and_counters() {
        let m = Metrics::new();
        m.job_ended(
            JobKind::Overlap as i32,
            JobState::Vetoed,
            Duration::from_millis(300),
            0,
            &["acme".to_owned()],
        );
        m.job_ended(
            JobKind::Overlap as i32,
            JobState::Succeeded,
            Duration::from_secs(2),
            1500,
            &[],
        );
        m.node_connected("acme");
        m.node_connected("acme");
        let text = m.encode(
            &[(JobKind::Overlap as i32, JobState::Succeeded as i32, 3)],
            1,
        );
        for line in [
            "cleanroom_coordinator_jobs{kind=\"overlap\",state=\"succeeded\"} 3",
            "cleanroom_coordinator_jobs_ended_total{kind=\"overlap\",state=\"vetoed\"} 1",
            "cleanroom_coordinator_items_processed_total{kind=\"overlap\"} 1500",
            "cleanroom_coordinator_vetoes_total{node=\"acme\"} 1",
            "cleanroom_coordinator_node_connections_total{node=\"acme\"} 2",
            "cleanroom_coordinator_connected_nodes 1",
            "cleanroom_coordinator_job_duration_seconds_count{kind=\"overlap\",state=\"succeeded\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A second scrape replaces the gauge rather than adding to it.
        let text = m.encode(&[], 0);
        assert!(!text.contains("cleanroom_coordinator_jobs{"), "{text}");
    }
}
