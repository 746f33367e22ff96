//! The privacy dashboard: what this node has agreed to and what it has given away, for the
//! partner's privacy officer; with `/metrics` (Prometheus text) and `/healthz` on the same
//! listener, `[dashboard] listen` of the node's config.
//!
//! - Transport: plain HTTP on a loopback address (`127.0.0.1:7600`). A non-loopback address is
//!   refused when the config is loaded unless `allow_non_loopback = true` (then the node warns
//!   at every start). docs/SECURITY.md says why: the reader sits at the node's host (or comes
//!   through an SSH tunnel), and the node's TLS certificates are for the consortium's parties,
//!   not for a person's browser.
//! - Requests whose `Host` is not a loopback name are refused (403) on a loopback listener: a
//!   web page elsewhere cannot read the dashboard by pointing its own domain at 127.0.0.1 (DNS
//!   rebinding). Every route is a GET: nothing on the dashboard changes the node.
//! - What it shows comes from the node's own records — the policy in force, the ledger, the
//!   audit log, the results directory — and is made of names, counts, ε, times and hashes of
//!   the log. No page reads a dataset, a membership file or the forget list, and none shows a
//!   record's identifier or a forgotten key's hash ([`pages`] says what each page shows).
//!
//! [`pages`] are the HTML pages (maud), [`chart`] the ε-over-time charts (plotters, inline SVG:
//! the pages load nothing from the network).

pub mod chart;
pub mod pages;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::NodeError;
use crate::policy::DashboardConfig;
use crate::state::NodeState;

/// A bound dashboard listener, not yet serving.
#[derive(Debug)]
pub struct Dashboard {
    listener: TcpListener,
    addr: SocketAddr,
    loopback_only: bool,
}

impl Dashboard {
    /// Binds `[dashboard] listen`.
    pub async fn bind(cfg: &DashboardConfig) -> Result<Dashboard, NodeError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| NodeError::Io {
                what: format!("listening on {} for the privacy dashboard", cfg.listen),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| NodeError::Io {
            what: "reading the dashboard's address".into(),
            source: e,
        })?;
        let loopback_only = addr.ip().is_loopback();
        if !loopback_only {
            tracing::warn!(
                listen = %addr,
                "the privacy dashboard listens on a non-loopback address (allow_non_loopback): \
                 anyone who can reach it reads this node's agreements, budgets and decisions"
            );
        }
        Ok(Dashboard {
            listener,
            addr,
            loopback_only,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` turns true.
    pub async fn serve(self, state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
        let app = router(state, self.loopback_only);
        tracing::info!(listen = %self.addr, "privacy dashboard listening on http://{}/", self.addr);
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "the privacy dashboard stopped");
        }
    }
}

/// Every route of the dashboard. With `loopback_only`, requests naming another host are
/// refused.
pub fn router(state: Arc<NodeState>, loopback_only: bool) -> Router {
    let app = Router::new()
        .merge(pages::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state);
    if loopback_only {
        app.layer(middleware::from_fn(require_loopback_host))
    } else {
        app
    }
}

/// Whether a `Host` header names this machine's loopback interface.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [::1]:7600
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn require_loopback_host(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !is_loopback_host(host) {
        tracing::warn!(
            host,
            "privacy dashboard: refused a request for another host"
        );
        return (
            StatusCode::FORBIDDEN,
            "403: the dashboard answers requests for localhost / 127.0.0.1 only\n",
        )
            .into_response();
    }
    next.run(req).await
}

async fn healthz(State(state): State<Arc<NodeState>>) -> Response {
    // The ledger answers and the audit log can still be appended to.
    let ledger = state.ledger.scopes();
    let audit = state.audit.writable();
    match (ledger, audit) {
        (Ok(_), Ok(())) => (StatusCode::OK, "ok\n").into_response(),
        (Err(e), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the ledger cannot be read: {e}\n"),
        )
            .into_response(),
        (_, Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the audit log refuses appends: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<NodeState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "127.0.0.1:7600",
            "localhost:7600",
            "LOCALHOST",
            "[::1]:7600",
            "127.0.0.2",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:7600",
            "10.0.0.1:7600",
            "",
            "localhost.evil.example",
            "[::2]:1",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
