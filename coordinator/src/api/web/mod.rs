//! The web console: HTTPS pages for analysts, a JSON API that mirrors the CLI, `/metrics` and
//! `/healthz`, on `[web] listen` of the coordinator's config.
//!
//! - Transport: TLS over TCP with the consortium's certificates
//!   ([`cleanroom_transport::https_server_config`]). A client presents its certificate like a
//!   QUIC client does; who it is comes from that certificate alone.
//! - Who may do what: `/healthz` answers anyone; `/metrics` needs a certificate of the
//!   consortium (any role); everything else needs an analyst's certificate (401 without a
//!   certificate, 403 with another role's). Every page and every JSON call then goes through
//!   [`super::analyst::answer`], the QUIC API's own entry point, so both APIs show an analyst
//!   exactly the same things.
//! - Cross-site requests: a browser sends the client certificate with any request to the
//!   console, even one started by another site. Requests that change something (POST, DELETE)
//!   are refused (403) when the browser says they come from another origin (`Origin`,
//!   `Sec-Fetch-Site`).
//!
//! [`json`] is the JSON API, [`pages`] the HTML pages (maud), [`chart`] the trend charts
//! (plotters, SVG inlined in the page: the pages load nothing from the network).

pub mod chart;
pub mod json;
pub mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cleanroom_transport::{Credentials, Identity, PeerRole};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::authz::Roles;
use crate::error::CoordinatorError;
use crate::shared::Shared;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling, from the connection's verified client certificate.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No client certificate.
    Anonymous,
    /// A certificate of the consortium.
    Known(Identity),
}

/// An analyst's identity and the consortium's roles, for handlers that need one (the middleware
/// has checked the role); what the analyst may see and do is decided by [`super::authz`].
#[derive(Clone, Debug)]
pub struct Analyst(pub Identity, pub Arc<Roles>);

/// A bound web server, not yet serving.
pub struct WebServer {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    addr: SocketAddr,
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl WebServer {
    /// Binds `listen` with the coordinator's credentials.
    pub async fn bind(
        listen: SocketAddr,
        creds: &Credentials,
    ) -> Result<WebServer, CoordinatorError> {
        let tls = cleanroom_transport::https_server_config(creds)?;
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            CoordinatorError::Config(format!(
                "cannot listen on {listen} for the web console: {e}"
            ))
        })?;
        let addr = listener.local_addr().map_err(|e| {
            CoordinatorError::Config(format!("cannot read the web console's address: {e}"))
        })?;
        Ok(WebServer {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            addr,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` turns true.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        roles: Arc<Roles>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let app = router(shared, roles);
        tracing::info!(listen = %self.addr, "web console listening");
        loop {
            let (tcp, remote) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "web console: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            };
            let acceptor = self.acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "web console: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let caller = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    None => Caller::Anonymous,
                    // rustls has verified the chain against the consortium CA.
                    Some(leaf) => match Identity::from_cert(leaf) {
                        Ok(id) => Caller::Known(id),
                        Err(e) => {
                            tracing::warn!(%remote, error = %e, "web console: a certificate without a cleanroom identity");
                            Caller::Anonymous
                        }
                    },
                };
                let svc = TowerToHyperService::new(app.layer(axum::Extension(caller)));
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
                if let Err(e) = conn {
                    tracing::debug!(%remote, error = %e, "web console: connection ended");
                }
            });
        }
    }
}

/// Every route of the console.
pub fn router(shared: Arc<Shared>, roles: Arc<Roles>) -> Router {
    let analyst_routes = Router::new()
        .merge(pages::routes())
        .nest("/api/v1", json::routes())
        .layer(middleware::from_fn(require_analyst));
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(metrics).layer(middleware::from_fn(require_member)),
        )
        .merge(analyst_routes)
        .layer(axum::Extension(roles))
        .with_state(shared)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    // The store answers: the process is alive and its database readable.
    match shared.store.count_by_kind_and_state() {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the job store cannot be read: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let jobs = match shared.store.count_by_kind_and_state() {
        Ok(jobs) => jobs,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the job store cannot be read: {e}\n"),
            )
                .into_response();
        }
    };
    let text = shared.metrics.encode(&jobs, shared.registry.names().len());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn caller_of(req: &Request) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous)
}

fn unauthenticated() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "401: present your analyst certificate (see docs/API.md: import your .p12 into the browser, \
         or pass --cert and --key to curl)\n",
    )
        .into_response()
}

/// Lets through holders of any consortium certificate (`/metrics`).
async fn require_member(req: Request, next: Next) -> Response {
    match caller_of(&req) {
        Caller::Anonymous => unauthenticated(),
        Caller::Known(_) => next.run(req).await,
    }
}

/// Lets through analysts only, and refuses cross-site requests that change something.
async fn require_analyst(mut req: Request, next: Next) -> Response {
    let id = match caller_of(&req) {
        Caller::Anonymous => return unauthenticated(),
        Caller::Known(id) if id.role == PeerRole::Analyst => id,
        Caller::Known(id) => {
            tracing::warn!(peer = %id, "web console: refused a certificate that is not an analyst's");
            return (
                StatusCode::FORBIDDEN,
                format!("403: {id} is not an analyst; the console serves analysts only\n"),
            )
                .into_response();
        }
    };
    if changes_something(req.method()) && cross_site(req.headers()) {
        tracing::warn!(analyst = %id.name, path = %req.uri().path(), "web console: refused a cross-site request");
        return (StatusCode::FORBIDDEN, "403: cross-site request refused\n").into_response();
    }
    let Some(roles) = req.extensions().get::<Arc<Roles>>().cloned() else {
        // The router always carries the roles; a route mounted without them sees nothing.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "500: the console has no roles\n",
        )
            .into_response();
    };
    req.extensions_mut().insert(Analyst(id, roles));
    next.run(req).await
}

fn changes_something(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the browser says the request comes from another site: `Sec-Fetch-Site` other than
/// `same-origin` or `none`, or an `Origin` whose host is not this request's `Host`. Clients that
/// are not browsers send neither.
fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return true;
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        return origin.strip_prefix("https://") != Some(host);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn cross_site_requests_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!cross_site(&h), "curl sends neither header");
        h.insert(
            header::HOST,
            HeaderValue::from_static("coordinator.cleanroom:7443"),
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://coordinator.cleanroom:7443"),
        );
        assert!(!cross_site(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(cross_site(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&h));
    }
}
