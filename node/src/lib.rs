//! A partner's cleanroom node.
//!
//! The node holds the partner's datasets and its agreement with each partner (an allow-list
//! today; the full policy language comes later). It dials the coordinator for control (outbound
//! only) and listens on a QUIC endpoint for the data plane with other nodes. The coordinator can
//! *offer* a job; the node decides, against its own agreement and the peer's certificate
//! identity, whether its data takes part.
//!
//! Layout:
//! - [`config`]: the node's TOML config (endpoints, certificates, datasets, agreements);
//! - [`normalise`], [`dataset`]: CSV ingestion and identifier normalisation;
//! - [`agreement`]: the allow-list check run on every offer, before any data is read;
//! - [`control`]: the control session with the coordinator (hello, offers, start, report);
//! - [`dataplane`]: the node's data-plane endpoint and the hand-over of incoming connections;
//! - [`psi_job`]: drives the sans-IO ECDH-PSI session of `cleanroom-circuits` over QUIC.
#![warn(missing_docs)]

pub mod agreement;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod dataset;
pub mod error;
pub mod normalise;
pub mod policy;
pub mod psi_job;
pub mod transparency;

use std::sync::Arc;

use cleanroom_transport::{Credentials, Identity, TransportTuning};
use tokio::sync::watch;

pub use config::NodeConfig;
pub use error::NodeError;

/// Runs a node until `shutdown` turns true: binds the data plane, then keeps a control session
/// with the coordinator open (reconnecting with backoff when it drops).
pub async fn run(cfg: NodeConfig, shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
    let creds = Credentials::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let me = creds.identity()?;
    let expected = Identity::node(&cfg.name)?;
    if me != expected {
        return Err(NodeError::Config(format!(
            "the certificate {} is for {me}, but the config names this node '{}'; issue a \
             certificate with `cleanroom pki issue node {}`",
            cfg.tls.cert.display(),
            cfg.name,
            cfg.name
        )));
    }
    let tuning = TransportTuning::default();
    let listen = cfg.listen;
    let endpoint = cleanroom_transport::server_endpoint(listen, &creds, &tuning)?;
    let bound = endpoint.local_addr().map_err(|e| NodeError::Io {
        what: format!("reading the data-plane address bound at {listen}"),
        source: e,
    })?;
    let advertise = cfg.advertise.unwrap_or(bound);
    tracing::info!(node = %cfg.name, data_plane = %bound, advertise = %advertise, "node listening");

    let state = Arc::new(control::NodeState::new(cfg, advertise));
    let dataplane = tokio::spawn(dataplane::serve(
        endpoint.clone(),
        state.clone(),
        shutdown.clone(),
    ));
    let control = control::run(endpoint.clone(), state, shutdown.clone()).await;
    endpoint.close(0u32.into(), b"node shutting down");
    dataplane.abort();
    endpoint.wait_idle().await;
    control
}
