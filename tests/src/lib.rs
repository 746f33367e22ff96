//! Harness for end-to-end tests: builds the real binaries, and starts a consortium of real
//! processes on loopback (ephemeral ports) driven only through the command line, as an operator
//! and an analyst would.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod fake_node;
pub mod proxy;
pub mod raw_coordinator;
pub mod web;

/// Paths of the `cleanroom` and `cleanroom-node` binaries, built once per test process with
/// the same profile as the tests.
pub fn bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        // target/<profile>/deps/<test-binary> → target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // With the transport's test instrumentation (`transcript`): a process started with
        // CLEANROOM_TRANSCRIPT set records what it receives (tests/views.rs reads it). It is
        // the same feature set as this crate's own dependency on the transport, so the two
        // builds share their artefacts.
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "cleanroom",
            "-p",
            "cleanroom-node",
            "--bins",
            "--features",
            "cleanroom-transport/transcript",
        ]);
        if release {
            cmd.arg("--release");
        }
        // Cargo sets these for the test process; some build scripts (ring's) rerun when they
        // change, so passing them on would rebuild half the tree on every test run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "OUT_DIR",
                ]
                .contains(&name.as_str())
            {
                cmd.env_remove(name);
            }
        }
        let status = cmd.status().expect("running cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        (
            profile_dir.join("cleanroom"),
            profile_dir.join("cleanroom-node"),
        )
    })
}

/// Runs `cleanroom ARGS` in `dir` and returns its output.
pub fn cleanroom(dir: &Path, args: &[&str]) -> Output {
    Command::new(&bins().0)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .output()
        .expect("running cleanroom")
}

/// Like [`cleanroom`] but asserts success.
pub fn cleanroom_ok(dir: &Path, args: &[&str]) -> String {
    let out = cleanroom(dir, args);
    assert!(
        out.status.success(),
        "cleanroom {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cleanroom-node ARGS` in `dir` and returns its output.
pub fn cleanroom_node(dir: &Path, args: &[&str]) -> Output {
    Command::new(&bins().1)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running cleanroom-node")
}

/// Like [`cleanroom_node`] but asserts success; its standard output.
pub fn cleanroom_node_ok(dir: &Path, args: &[&str]) -> String {
    let out = cleanroom_node(dir, args);
    assert!(
        out.status.success(),
        "cleanroom-node {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process that stops gracefully when dropped (its stdin is closed) and is killed if it does
/// not stop in time.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process and waits for it.
    pub fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment variable that makes a process record every envelope it receives (the
/// transport's `transcript` feature, which the binaries the tests run are built with).
pub const TRANSCRIPT_ENV: &str = "CLEANROOM_TRANSCRIPT";

/// A consortium in a temporary directory: PKI, data, configs, coordinator and nodes.
#[derive(Debug)]
pub struct Consortium {
    pub dir: tempfile::TempDir,
    pub coordinator: Option<Process>,
    pub addr: Option<SocketAddr>,
    pub nodes: Vec<Process>,
    /// When set, every process started from now on records what it receives in
    /// `<this dir>/<process name>.frames` (see [`Consortium::record_transcripts`]).
    pub transcripts: Option<PathBuf>,
    /// The directory (relative to the consortium's) holding each party's certificate and key:
    /// `pki` (the CA's own directory) when the CA issued them, `keys` for a consortium whose
    /// parties enrolled by certificate request ([`Consortium::enrolled`]).
    pub keys: String,
    /// When set, the coordinator's and nodes' configs name the CA's CRL (`pki/crl.pem`), which
    /// they reload on change.
    pub crl: bool,
    /// TOML appended to the coordinator's config (after its `[tls]` table: `[[role]]` tables).
    pub coordinator_extra: String,
    /// Whether coordinators started from now on serve the web console (`[web]`), and where the
    /// running one does.
    pub serve_web: bool,
    pub web: Option<SocketAddr>,
    /// Whether processes started from now on log JSON lines (`CLEANROOM_LOG_FORMAT=json`).
    pub log_json: bool,
}

impl Consortium {
    /// A CA, a coordinator certificate and an analyst certificate ("alice").
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cleanroom-e2e-")
            .tempdir()
            .expect("tempdir");
        cleanroom_ok(dir.path(), &["pki", "init", "--dir", "pki"]);
        cleanroom_ok(dir.path(), &["pki", "issue", "--dir", "pki", "coordinator"]);
        cleanroom_ok(
            dir.path(),
            &["pki", "issue", "--dir", "pki", "analyst", "alice"],
        );
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        Self {
            dir,
            coordinator: None,
            addr: None,
            nodes: Vec::new(),
            transcripts: None,
            keys: "pki".into(),
            crl: false,
            coordinator_extra: String::new(),
            serve_web: false,
            web: None,
            log_json: false,
        }
    }

    /// Like [`Consortium::new`], but the coordinator and alice enrol as real parties do: each
    /// generates its key and a request in `keys/` (`cleanroom pki request`), and the CA in
    /// `pki/` signs the request (`cleanroom pki sign`). The CA directory never holds their keys.
    pub fn enrolled() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cleanroom-e2e-")
            .tempdir()
            .expect("tempdir");
        cleanroom_ok(dir.path(), &["pki", "init", "--dir", "pki"]);
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let c = Self {
            dir,
            coordinator: None,
            addr: None,
            nodes: Vec::new(),
            transcripts: None,
            keys: "keys".into(),
            crl: false,
            coordinator_extra: String::new(),
            serve_web: false,
            web: None,
            log_json: false,
        };
        c.enrol(&["--role", "coordinator"], "coordinator");
        c.enrol(&["--role", "analyst", "--name", "alice"], "analyst-alice");
        c
    }

    /// `cleanroom pki request ROLE_ARGS --out keys` then `cleanroom pki sign keys/STEM.csr`.
    pub fn enrol(&self, role_args: &[&str], stem: &str) {
        let mut args = vec!["pki", "request", "--out", "keys"];
        args.extend(role_args);
        cleanroom_ok(self.path(), &args);
        cleanroom_ok(
            self.path(),
            &["pki", "sign", "--dir", "pki", &format!("keys/{stem}.csr")],
        );
    }

    /// The `[tls]` line naming the CRL, when [`Consortium::crl`] is set.
    fn crl_line(&self) -> &'static str {
        if self.crl {
            "crl = \"pki/crl.pem\"\n"
        } else {
            ""
        }
    }

    /// Enrols partner `name`'s node by certificate request (see [`Consortium::enrolled`]).
    pub fn enrol_node(&self, name: &str) {
        self.enrol(&["--role", "node", "--name", name], &format!("node-{name}"));
    }

    /// Makes every process started from now on record the envelopes it receives, in
    /// `transcripts/<name>.frames` (the coordinator's name is `coordinator`). Returns the
    /// directory.
    pub fn record_transcripts(&mut self) -> PathBuf {
        let dir = self.path().join("transcripts");
        std::fs::create_dir_all(&dir).unwrap();
        self.transcripts = Some(dir.clone());
        dir
    }

    /// The transcript file of the process `name`, if transcripts are recorded.
    pub fn transcript_of(&self, name: &str) -> Option<PathBuf> {
        self.transcripts
            .as_ref()
            .map(|d| d.join(format!("{name}.frames")))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes synthetic data for `partners` and returns the ground truth.
    pub fn synth(&self, partners: &str, rows: u64, overlap: f64, seed: u64) -> Value {
        let out = cleanroom_ok(
            self.path(),
            &[
                "synth",
                "--out",
                "data",
                "--partners",
                partners,
                "--rows",
                &rows.to_string(),
                "--overlap",
                &overlap.to_string(),
                "--seed",
                &seed.to_string(),
            ],
        );
        serde_json::from_str(&out).expect("synth prints the ground truth as JSON")
    }

    /// Starts the coordinator on an ephemeral port.
    pub fn start_coordinator(&mut self) -> SocketAddr {
        self.spawn_coordinator("127.0.0.1:0", "coordinator")
    }

    /// Stops the coordinator gracefully and starts a new coordinator process on the same
    /// address and database, logging to `logs/<name>.log` (and recording its transcript as
    /// `<name>`). The nodes reconnect by themselves.
    pub fn restart_coordinator(&mut self, name: &str) -> SocketAddr {
        let addr = self.addr.expect("start the coordinator first");
        if let Some(mut old) = self.coordinator.take() {
            old.stop();
        }
        self.spawn_coordinator(&addr.to_string(), name)
    }

    /// Starts a coordinator listening on `listen` (the database is kept across restarts),
    /// logging to `logs/<name>.log`.
    pub fn start_coordinator_at(&mut self, listen: &str, name: &str) -> SocketAddr {
        self.spawn_coordinator(listen, name)
    }

    fn spawn_coordinator(&mut self, listen: &str, name: &str) -> SocketAddr {
        let cfg = self.path().join("coordinator.toml");
        std::fs::write(
            &cfg,
            format!("listen = \"{listen}\"\ndatabase = \"coordinator.db\"\noffer_timeout_secs = 10\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"{keys}/coordinator.pem\"\nkey = \"{keys}/coordinator.key\"\n{crl}\n{web}{extra}", keys = self.keys, crl = self.crl_line(), web = if self.serve_web { "\n[web]\nlisten = \"127.0.0.1:0\"\n" } else { "" }, extra = self.coordinator_extra),
        )
        .unwrap();
        let log = self.path().join(format!("logs/{name}.log"));
        let mut cmd = Command::new(&bins().0);
        if let Some(t) = self.transcript_of(name) {
            cmd.env(TRANSCRIPT_ENV, t);
        }
        let mut child = cmd
            .env(
                "CLEANROOM_LOG_FORMAT",
                if self.log_json { "json" } else { "text" },
            )
            .args(["coordinator", "serve", "--config"])
            .arg(&cfg)
            .arg("--stop-on-stdin-eof")
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the coordinator");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        self.web = None;
        if self.serve_web {
            let mut web = String::new();
            stdout.read_line(&mut web).unwrap();
            self.web = Some(
                web.trim()
                    .strip_prefix("web ")
                    .unwrap_or_else(|| {
                        panic!("coordinator said {web:?} instead of its web address")
                    })
                    .parse()
                    .unwrap(),
            );
        }
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| {
                panic!(
                    "coordinator said {line:?}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .parse()
            .unwrap();
        let stdin = child.stdin.take();
        self.coordinator = Some(Process {
            name: name.into(),
            child,
            stdin,
            log,
        });
        self.addr = Some(addr);
        addr
    }

    /// Writes a node config. `agreements` is TOML appended verbatim (the `[[agreement]]`
    /// tables); the dataset `customers` is `data/<csv_of>.csv` with email and phone identifiers.
    pub fn write_node_config(&self, name: &str, csv_of: &str, agreements: &str) -> PathBuf {
        let addr = self.addr.expect("start the coordinator first");
        let cfg = self.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\ncoordinator = \"{addr}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state-{name}\"\n\n\
                 [tls]\nca = \"pki/ca.pem\"\ncert = \"{keys}/node-{name}.pem\"\nkey = \"{keys}/node-{name}.key\"\n{crl}\n\
                 [[dataset]]\nname = \"customers\"\npath = \"data/{csv_of}.csv\"\n\n\
                 [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
                 [[dataset.identifier]]\nname = \"phone\"\ncolumn = \"phone\"\nnormaliser = \"phone\"\n\n{agreements}",
                keys = self.keys,
                crl = self.crl_line()
            ),
        )
        .unwrap();
        cfg
    }

    /// Issues a node certificate (from this consortium's CA) unless it exists.
    pub fn issue_node(&self, name: &str) {
        if !self.path().join(format!("pki/node-{name}.pem")).exists() {
            cleanroom_ok(self.path(), &["pki", "issue", "--dir", "pki", "node", name]);
        }
    }

    /// Starts `cleanroom-node run` with the config `<name>.toml`.
    pub fn start_node(&mut self, name: &str) {
        self.spawn_node(name, false);
    }

    /// Like [`Consortium::start_node`], but ready for a file-size limit to be imposed on the
    /// running node later (`prlimit --pid PID --fsize=N`), which models a full disk: the node
    /// starts with SIGXFSZ ignored (`sh`'s `trap ''` survives `exec`), so a write past the limit
    /// fails with EFBIG instead of killing it, and its log goes through a pipe that a thread of
    /// the test copies to the log file, so the limit does not silence the log.
    pub fn start_node_limitable(&mut self, name: &str) {
        self.spawn_node(name, true);
    }

    fn spawn_node(&mut self, name: &str, limitable: bool) {
        let cfg = self.path().join(format!("{name}.toml"));
        let log = self.path().join(format!("logs/{name}.log"));
        let mut cmd = if limitable {
            let mut sh = Command::new("sh");
            sh.args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
                .arg(&bins().1);
            sh
        } else {
            Command::new(&bins().1)
        };
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .arg("--stop-on-stdin-eof")
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        if limitable {
            cmd.stderr(Stdio::piped());
        } else {
            cmd.stderr(std::fs::File::create(&log).unwrap());
        }
        if let Some(t) = self.transcript_of(name) {
            cmd.env(TRANSCRIPT_ENV, t);
        }
        let mut child = cmd.spawn().expect("starting a node");
        if let Some(mut stderr) = child.stderr.take() {
            let mut file = std::fs::File::create(&log).unwrap();
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut file));
        }
        let stdin = child.stdin.take();
        self.nodes.push(Process {
            name: name.into(),
            child,
            stdin,
            log,
        });
    }

    /// The analyst connection flags.
    pub fn analyst_args(&self) -> Vec<String> {
        vec![
            "--coordinator".into(),
            self.addr.expect("coordinator").to_string(),
            "--ca".into(),
            "pki/ca.pem".into(),
            "--cert".into(),
            format!("{}/analyst-alice.pem", self.keys),
            "--key".into(),
            format!("{}/analyst-alice.key", self.keys),
        ]
    }

    /// `cleanroom nodes --format json`.
    pub fn nodes_json(&self) -> Value {
        let mut args = vec!["nodes".to_owned(), "--format".into(), "json".into()];
        args.extend(self.analyst_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&cleanroom_ok(self.path(), &args)).unwrap()
    }

    /// Waits until the named nodes are connected to the coordinator.
    /// Issues, configures (each with [`open_agreement`] toward the other) and starts the nodes
    /// `acme` and `globex` on the dataset `customers` of their own names, and waits until both
    /// are connected. The coordinator must be running.
    pub fn start_open_pair(&mut self) {
        for (me, other) in [("acme", "globex"), ("globex", "acme")] {
            self.issue_node(me);
            self.write_node_config(me, me, &open_agreement(other));
            self.start_node(me);
        }
        self.wait_connected(&["acme", "globex"]);
    }

    /// Like [`Consortium::start_open_pair`], with a certificate for `mallory` (a fake node a
    /// test plays) whom acme's agreements also allow.
    pub fn start_pair_open_to_mallory(&mut self) {
        for name in ["acme", "globex", "mallory"] {
            self.issue_node(name);
        }
        let acme_agreements = format!("{}{}", open_agreement("globex"), open_agreement("mallory"));
        self.write_node_config("acme", "acme", &acme_agreements);
        self.write_node_config("globex", "globex", &open_agreement("acme"));
        self.start_node("acme");
        self.start_node("globex");
        self.wait_connected(&["acme", "globex"]);
    }

    pub fn wait_connected(&self, names: &[&str]) {
        self.wait_connected_within(names, Duration::from_secs(30));
    }

    /// Waits until every node of `names` is connected to the coordinator, for at most `within`.
    pub fn wait_connected_within(&self, names: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let nodes = self.nodes_json();
            let up = names.iter().all(|n| {
                nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["name"] == *n && v["connected"] == true)
            });
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {names:?} did not connect: {nodes}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `cleanroom job submit ARGS --wait --format json`: the job as JSON and the exit code.
    pub fn submit(&self, args: &[&str]) -> (Value, Option<i32>) {
        let mut all: Vec<String> = vec!["job".into(), "submit".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend([
            "--wait".into(),
            "--timeout".into(),
            "120".into(),
            "--format".into(),
            "json".into(),
        ]);
        all.extend(self.analyst_args());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = cleanroom(self.path(), &all);
        let text = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!(
                "job submit printed no JSON: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (json, out.status.code())
    }

    /// `cleanroom job submit ARGS --format json` without waiting: the job id.
    pub fn submit_nowait(&self, args: &[&str]) -> String {
        let mut all: Vec<String> = vec!["job".into(), "submit".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend(["--format".into(), "json".into()]);
        all.extend(self.analyst_args());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = cleanroom(self.path(), &all);
        let job: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "job submit printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        job["job_id"].as_str().expect("job id").to_owned()
    }

    /// `cleanroom job status JOB --format json`.
    pub fn job_status(&self, job_id: &str) -> Value {
        let mut all: Vec<String> = vec![
            "job".into(),
            "status".into(),
            job_id.into(),
            "--format".into(),
            "json".into(),
        ];
        all.extend(self.analyst_args());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = cleanroom(self.path(), &all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "job status printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Polls the job until it has finished or `limit` has passed, and returns it.
    pub fn wait_job(&self, job_id: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job_status(job_id);
            let finished = ["succeeded", "failed", "vetoed", "cancelled"]
                .iter()
                .any(|s| job["state"] == *s);
            if finished || Instant::now() > deadline {
                return job;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn node(&self, name: &str) -> &Process {
        self.nodes.iter().find(|p| p.name == name).expect("node")
    }
}

impl Default for Consortium {
    fn default() -> Self {
        Self::new()
    }
}

/// An agreement allowing overlap and match on customers by email, with membership revealed.
pub fn open_agreement(partner: &str) -> String {
    format!(
        "[[agreement]]\npartner = \"{partner}\"\npurposes = [\"overlap-reporting\", \"fraud-detection\"]\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\n\n\
         [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"email\"]\nreveal_membership_to_partner = true\n\n"
    )
}
