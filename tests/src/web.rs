//! A small HTTPS client for the coordinator's web console (mutual TLS with a certificate of
//! the consortium, or none), and the headless browser the console tests drive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::ServerName;

/// The DNS name of the coordinator's certificate: the browser and the client connect to it
/// (mapped to 127.0.0.1), so the certificate is verified as a real client would.
pub const COORDINATOR_HOST: &str = "coordinator.cleanroom";

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// A client of the web console at `addr`.
#[derive(Debug, Clone)]
pub struct Https {
    addr: SocketAddr,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
}

impl Https {
    /// A client presenting `pki/<stem>.pem` (e.g. `analyst-alice`, `node-acme`), or no
    /// certificate at all with `None`; `dir` holds `pki/`.
    pub fn new(dir: &Path, addr: SocketAddr, stem: Option<&str>) -> Https {
        Https::with_keys(dir, "pki", addr, stem)
    }

    /// Like [`Https::new`] with the certificate and key in `dir/keys` (the CA stays in
    /// `dir/pki`): parties that enrolled by certificate request.
    pub fn with_keys(dir: &Path, keys: &str, addr: SocketAddr, stem: Option<&str>) -> Https {
        let load = |stem: &str| crate::load_credentials(dir, keys, stem);
        let tls = match stem {
            Some(stem) => cleanroom_transport::https_client_config(&load(stem)).unwrap(),
            // Only the CA is used from the coordinator's credentials here.
            None => {
                cleanroom_transport::https_client_config_anonymous(&load("coordinator")).unwrap()
            }
        };
        Https {
            addr,
            tls: Arc::new(tls),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], None)
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(&body.to_string()),
        )
    }

    /// One request on a fresh connection (`Connection: close`); panics if no HTTP answer comes.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Reply {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET path`, or why no HTTP answer came (e.g. the server refused the certificate).
    pub fn try_get(&self, path: &str) -> Result<Reply, String> {
        self.try_request("GET", path, &[], None)
    }

    /// One request on a fresh connection (`Connection: close`), or why no HTTP answer came.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Reply, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
            let name = ServerName::try_from(COORDINATOR_HOST).unwrap();
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let mut req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {COORDINATOR_HOST}:{}\r\nConnection: close\r\n",
                self.addr.port()
            );
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            let body = body.unwrap_or("");
            req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
            tls.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut raw = Vec::new();
            // A server closing without close_notify is fine here: the body is complete.
            let read = tls.read_to_end(&mut raw).await;
            let text = String::from_utf8_lossy(&raw).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return Err(format!("no HTTP answer ({read:?}): {text:?}"));
            };
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no status: {head}"))?;
            Ok(Reply {
                status,
                head: head.to_owned(),
                body: body.to_owned(),
            })
        })
    }
}

/// Programs the browser tests need, and the Debian packages that hold them.
const TOOLS: [(&str, &str); 5] = [
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
    ("certutil", "libnss3-tools"),
    ("pk12util", "libnss3-tools"),
    ("openssl", "openssl"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Makes sure Chromium, chromedriver and the NSS tools are installed, installing the missing
/// ones with apt-get; panics with what to do if that fails (the test is never skipped).
pub fn ensure_browser_tools() {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return;
    }
    let mut packages = missing.clone();
    packages.dedup();
    eprintln!("installing {packages:?} for the browser tests");
    let ok = Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        ok && TOOLS.iter().all(|(p, _)| on_path(p)),
        "the browser tests need {packages:?} (Debian packages) and could not install them with \
         apt-get; install them (as root: apt-get install chromium chromium-driver libnss3-tools \
         openssl) and run the tests again"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Chromium policy file (`/etc/chromium/policies/managed/`) that makes the browser present
/// the analyst's certificate to the console without asking; removed on drop.
#[derive(Debug)]
pub struct CertificatePolicy(PathBuf);

impl Drop for CertificatePolicy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A headless Chromium driven through chromedriver (WebDriver), with its own home directory
/// whose NSS database trusts the consortium CA and holds the analyst's certificate and key
/// (imported from a PKCS#12 file, as a person would import theirs).
#[derive(Debug)]
pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    _policy: Option<CertificatePolicy>,
    _home: tempfile::TempDir,
}

impl Browser {
    /// Starts the browser for the console at `web` with the certificate `pki/<stem>.pem` of
    /// `dir`.
    pub async fn start(dir: &Path, web: SocketAddr, stem: &str) -> Browser {
        ensure_browser_tools();
        let home = tempfile::Builder::new()
            .prefix("cleanroom-browser-")
            .tempdir()
            .unwrap();
        let nssdb = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        let db = format!("sql:{}", nssdb.display());
        let pki = dir.join("pki");
        run(Command::new("certutil").args(["-N", "-d", &db, "--empty-password"]));
        run(Command::new("certutil")
            .args(["-A", "-d", &db, "-n", "cleanroom CA", "-t", "C,,", "-i"])
            .arg(pki.join("ca.pem")));
        let p12 = home.path().join(format!("{stem}.p12"));
        run(Command::new("openssl")
            .args([
                "pkcs12", "-export", "-passout", "pass:", "-name", stem, "-in",
            ])
            .arg(pki.join(format!("{stem}.pem")))
            .arg("-inkey")
            .arg(pki.join(format!("{stem}.key")))
            .arg("-out")
            .arg(&p12));
        run(Command::new("pk12util")
            .args(["-d", &db, "-W", "", "-i"])
            .arg(&p12));

        let policies = Path::new("/etc/chromium/policies/managed");
        std::fs::create_dir_all(policies).unwrap_or_else(|e| {
            panic!("the browser tests write a Chromium policy to {policies:?} and cannot: {e}")
        });
        let policy = CertificatePolicy(policies.join(format!(
            "cleanroom-e2e-{}-{}.json",
            std::process::id(),
            web.port()
        )));
        let rule = serde_json::json!({
            "pattern": format!("https://{COORDINATOR_HOST}:{}", web.port()),
            "filter": {},
        });
        std::fs::write(
            &policy.0,
            serde_json::json!({ "AutoSelectCertificateForUrls": [rule.to_string()] }).to_string(),
        )
        .unwrap();
        Self::launch(home, Some(policy)).await
    }

    /// Starts the browser without certificates, for a node's privacy dashboard (plain HTTP on
    /// loopback).
    pub async fn start_plain() -> Browser {
        ensure_browser_tools();
        let home = tempfile::Builder::new()
            .prefix("cleanroom-browser-")
            .tempdir()
            .unwrap();
        Self::launch(home, None).await
    }

    async fn launch(home: tempfile::TempDir, policy: Option<CertificatePolicy>) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("HOME", home.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let user_data = home.path().join("profile");
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", user_data.display()),
            format!("--host-resolver-rules=MAP {COORDINATOR_HOST} 127.0.0.1"),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": args }),
        );
        caps.insert(
            "goog:loggingPrefs".into(),
            serde_json::json!({ "browser": "ALL" }),
        );
        // chromedriver speaks plain HTTP on loopback.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session with chromium");
        Browser {
            client,
            driver,
            _policy: policy,
            _home: home,
        }
    }

    /// The browser's console messages since the last call (chromedriver's log endpoint).
    pub async fn console(&self) -> Vec<serde_json::Value> {
        let v = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("browser log");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Asserts that the console holds no error (a SEVERE message) since the last look; `page`
    /// names where the browser is in the failure message.
    pub async fn assert_no_console_errors(&self, page: &str) {
        let errors: Vec<serde_json::Value> = self
            .console()
            .await
            .into_iter()
            .filter(|m| m["level"] == "SEVERE")
            .collect();
        assert!(errors.is_empty(), "console errors on {page}: {errors:?}");
    }

    /// The text of the first element of the current page that `locator` finds.
    pub async fn text_of(&self, locator: fantoccini::Locator<'_>) -> String {
        self.client
            .find(locator)
            .await
            .unwrap_or_else(|e| panic!("no {locator:?} on the page: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Saves a screenshot as `target/browser-screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub async fn stop(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `target/browser-screenshots`, next to the binaries' profile directory.
pub fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap()
        .join("browser-screenshots")
}

/// chromedriver's `POST /session/{id}/se/log {"type": "browser"}`.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// `GET path` over plain HTTP/1.1 to `addr` (a node's dashboard), with `Host: host` (the
/// address itself by default).
pub fn http_get(addr: SocketAddr, path: &str, host: Option<&str>) -> Reply {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let host = host.map_or_else(|| addr.to_string(), str::to_owned);
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    // axum may chunk a body: undo it (on bytes: a chunk may end inside a character).
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Reply {
        status,
        head,
        body: String::from_utf8(body).expect("a UTF-8 body"),
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&body[..eol]).into_owned();
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let rest = &body[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        body = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}
