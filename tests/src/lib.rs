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

pub mod ballista;
pub mod fake_node;
pub mod operator;
pub mod proxy;
pub mod raw_coordinator;
pub mod s3;
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
        // the same feature set as this crate's own dependency on the transport. The whole
        // workspace with its test targets is named so that cargo unifies features exactly as
        // `cargo test --workspace` does: with only the two binaries selected, some shared
        // crates got other features, and the DataFusion stack was compiled a second time
        // (≈5 min on the 2-core CI machine). After `cargo test --workspace` it is all fresh.
        cmd.args([
            "build",
            "--quiet",
            "--workspace",
            "--all-targets",
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

/// Like [`cleanroom`] but asserts success; its standard output.
pub fn cleanroom_ok(dir: &Path, args: &[&str]) -> String {
    stdout_of_success("cleanroom", args, cleanroom(dir, args))
}

/// The standard output of `program ARGS`, which must have succeeded (else both its outputs
/// are in the failure).
pub(crate) fn stdout_of_success(program: &str, args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
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
    stdout_of_success("cleanroom-node", args, cleanroom_node(dir, args))
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

    /// The bytes a node said it spilled, one figure per job that spilled ("spill files
    /// written"), in log order.
    pub fn spilled_bytes(&self) -> Vec<u64> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("spill files written"))
            .map(|l| {
                l.split("spilled_bytes=")
                    .nth(1)
                    .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no byte count in: {l}"))
            })
            .collect()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends the process SIGHUP (a node reloads its policy and TLS files on it).
    pub fn hang_up(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -HUP {} failed", self.pid());
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process and waits for it.
    pub fn stop(&mut self) {
        stop_gracefully(&mut self.child, self.stdin.take());
    }
}

/// Stops a process started with `--stop-on-stdin-eof`: closes its `stdin` and waits for it to
/// exit, killing it if it has not within 10 s.
pub fn stop_gracefully(child: &mut Child, stdin: Option<ChildStdin>) {
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
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
    /// Top-level keys written into node configs from now on, by node name (e.g.
    /// `memory_limit = "256MiB"`).
    pub node_top: std::collections::HashMap<String, String>,
    /// Environment variables set on nodes started from now on, by node name (e.g. the `AWS_*`
    /// variables of an S3 service, [`s3::S3::env`]).
    pub node_env: std::collections::HashMap<String, Vec<(String, String)>>,
    /// The Ballista cluster the nodes read on, if one was started ([`ballista::Ballista`]).
    pub ballista: Option<ballista::Ballista>,
}

impl Consortium {
    /// A CA, a coordinator certificate and an analyst certificate ("alice").
    pub fn new() -> Self {
        let c = Self::with_ca("pki");
        cleanroom_ok(c.path(), &["pki", "issue", "--dir", "pki", "coordinator"]);
        cleanroom_ok(
            c.path(),
            &["pki", "issue", "--dir", "pki", "analyst", "alice"],
        );
        c
    }

    /// A temporary directory with a CA in `pki/` and nothing running; the parties' certificates
    /// and keys will be in `keys` ([`Consortium::keys`]).
    fn with_ca(keys: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cleanroom-e2e-")
            .tempdir()
            .expect("tempdir");
        cleanroom_ok(dir.path(), &["pki", "init", "--dir", "pki"]);
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        Self {
            dir,
            coordinator: None,
            addr: None,
            nodes: Vec::new(),
            transcripts: None,
            keys: keys.into(),
            crl: false,
            coordinator_extra: String::new(),
            serve_web: false,
            web: None,
            log_json: false,
            node_top: std::collections::HashMap::new(),
            node_env: std::collections::HashMap::new(),
            ballista: None,
        }
    }

    /// A consortium with `cleanroom synth` data for `partners` (`rows` customers each, a share
    /// `overlap` of them shared, from `seed`) and its coordinator running. Returns it with the
    /// ground truth.
    pub fn with_coordinator(partners: &str, rows: u64, overlap: f64, seed: u64) -> (Self, Value) {
        let mut c = Self::new();
        let truth = c.synth(partners, rows, overlap, seed);
        c.start_coordinator();
        (c, truth)
    }

    /// Like [`Consortium::with_coordinator`] for acme and globex, both running and connected
    /// under the open agreement ([`Consortium::start_open_pair`]).
    pub fn open_pair(rows: u64, overlap: f64, seed: u64) -> (Self, Value) {
        let (mut c, truth) = Self::with_coordinator("acme,globex", rows, overlap, seed);
        c.start_open_pair();
        (c, truth)
    }

    /// Like [`Consortium::new`], but the coordinator and alice enrol as real parties do: each
    /// generates its key and a request in `keys/` (`cleanroom pki request`), and the CA in
    /// `pki/` signs the request (`cleanroom pki sign`). The CA directory never holds their keys.
    pub fn enrolled() -> Self {
        let c = Self::with_ca("keys");
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

    /// The TLS credentials of party `stem` (e.g. `node-acme`, `analyst-alice`) where this
    /// consortium keeps them ([`Consortium::keys`]).
    pub fn credentials(&self, stem: &str) -> cleanroom_transport::Credentials {
        load_credentials(self.path(), &self.keys, stem)
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
        self.synth_as("data", "csv", partners, (rows, overlap, seed))
    }

    /// Writes synthetic data for `partners` in `format` (`csv`, `parquet`, `jsonl`) into the
    /// directory `out`; returns the ground truth. The same `(rows, overlap, seed)` give the same
    /// customers in every format.
    pub fn synth_as(
        &self,
        out: &str,
        format: &str,
        partners: &str,
        (rows, overlap, seed): (u64, f64, u64),
    ) -> Value {
        let out = cleanroom_ok(
            self.path(),
            &[
                "synth",
                "--out",
                out,
                "--partners",
                partners,
                "--rows",
                &rows.to_string(),
                "--overlap",
                &overlap.to_string(),
                "--seed",
                &seed.to_string(),
                "--format",
                format,
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
        self.write_node_toml(
            name,
            &format!(
                "[[dataset]]\nname = \"customers\"\npath = \"data/{csv_of}.csv\"\n\n\
                 [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
                 [[dataset.identifier]]\nname = \"phone\"\ncolumn = \"phone\"\nnormaliser = \"phone\"\n\n{agreements}"
            ),
        )
    }

    /// Writes the node config `<name>.toml`: the node's name, coordinator, listen address,
    /// state directory and TLS files, then `tables` (its datasets, budget and agreements as
    /// TOML) verbatim. Returns its path.
    pub fn write_node_toml(&self, name: &str, tables: &str) -> PathBuf {
        let addr = self.addr.expect("start the coordinator first");
        let cfg = self.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\ncoordinator = \"{addr}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state-{name}\"\n{top}\n\
                 [tls]\nca = \"pki/ca.pem\"\ncert = \"{keys}/node-{name}.pem\"\nkey = \"{keys}/node-{name}.key\"\n{crl}\n{tables}",
                keys = self.keys,
                crl = self.crl_line(),
                top = self.node_top.get(name).map_or("", String::as_str)
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

    /// Gives node `name` a certificate the way this consortium's parties get theirs, unless it
    /// has one: issued by the CA ([`Consortium::new`]) or enrolled by request
    /// ([`Consortium::enrolled`]).
    pub fn admit_node(&self, name: &str) {
        if self.keys == "keys" {
            if !self.path().join(format!("keys/node-{name}.pem")).exists() {
                self.enrol_node(name);
            }
        } else {
            self.issue_node(name);
        }
    }

    /// Makes node `name` (its config written, not started) advertise `addr` as its data plane:
    /// a proxy's, so that its partner dials the proxy ([`proxy::UdpProxy`]).
    pub fn advertise(&self, name: &str, addr: SocketAddr) {
        let cfg = self.path().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&cfg).unwrap().replacen(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:0\"\nadvertise = \"{addr}\"\n"),
            1,
        );
        std::fs::write(&cfg, text).unwrap();
    }

    /// Runs an overlap between acme and globex on `customers` by email, and checks that it
    /// succeeds with the count `expected`; returns the job as `job submit` printed it.
    pub fn overlap_counts(&self, expected: u64) -> Value {
        let (job, code) = self.submit(&overlap_between("acme,globex"));
        assert_eq!(code, Some(0), "{job}");
        assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
        job
    }

    /// The row numbers in node `name`'s membership file of `job_id`.
    pub fn membership_rows(&self, name: &str, job_id: &str) -> Vec<u64> {
        let file = self
            .path()
            .join(format!("state-{name}/results/{job_id}-membership.csv"));
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .lines()
            .skip(1)
            .map(|l| l.parse().unwrap())
            .collect()
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
        for (key, value) in self.node_env.get(name).into_iter().flatten() {
            cmd.env(key, value);
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
        serde_json::from_str(&self.as_analyst_ok(&["nodes", "--format", "json"])).unwrap()
    }

    /// The data-plane address node `name` registered with the coordinator.
    pub fn data_addr(&self, name: &str) -> SocketAddr {
        self.nodes_json()
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["data_addr"].as_str())
            .unwrap_or_else(|| panic!("node {name} registered no data address"))
            .parse()
            .unwrap()
    }

    /// Admits ([`Consortium::admit_node`]), configures (each with [`open_agreement`] toward the
    /// other) and starts the nodes `acme` and `globex` on the dataset `customers` of their own
    /// names, and waits until both are connected. The coordinator must be running.
    pub fn start_open_pair(&mut self) {
        self.start_pair(&open_agreement("globex"));
    }

    /// Like [`Consortium::start_open_pair`], but acme's agreements are `acme_agreements` (TOML);
    /// globex keeps the open agreement with acme, so any refusal comes from acme.
    pub fn start_pair(&mut self, acme_agreements: &str) {
        self.admit_node("acme");
        self.admit_node("globex");
        self.write_node_config("acme", "acme", acme_agreements);
        self.write_node_config("globex", "globex", &open_agreement("acme"));
        self.start_node("acme");
        self.start_node("globex");
        self.wait_connected(&["acme", "globex"]);
    }

    /// Like [`Consortium::start_open_pair`], with a certificate for `mallory` (a fake node a
    /// test plays) whom acme's agreements also allow.
    pub fn start_pair_open_to_mallory(&mut self) {
        self.admit_node("mallory");
        self.start_pair(&format!(
            "{}{}",
            open_agreement("globex"),
            open_agreement("mallory")
        ));
    }

    /// Admits `name` and `peer` (a fake node the test plays), starts `name` on its own
    /// customers with `agreements`, and waits until it is connected.
    pub fn start_node_for_fake_peer(&mut self, name: &str, peer: &str, agreements: &str) {
        self.admit_node(name);
        self.admit_node(peer);
        self.write_node_config(name, name, agreements);
        self.start_node(name);
        self.wait_connected(&[name]);
    }

    /// Waits until the coordinator lists node `name` as disconnected (or not at all), for at most
    /// `within`; returns its node list then.
    pub fn wait_disconnected(&self, name: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let nodes = self.nodes_json();
            let up = nodes
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == name && n["connected"] == true);
            if !up {
                return nodes;
            }
            assert!(Instant::now() < deadline, "{name} still connected: {nodes}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What node `name` has logged so far.
    pub fn node_log(&self, name: &str) -> String {
        self.nodes
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no node {name} was started"))
            .log_text()
    }

    /// Waits until every node of `names` is connected to the coordinator (at most 30 s).
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

    /// `cleanroom ARGS` as the analyst alice: her connection flags follow `args` (so `args` must
    /// not end in words after `--`).
    pub fn as_analyst(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.analyst_args());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        cleanroom(self.path(), &all)
    }

    /// Like [`Consortium::as_analyst`] but asserts success; its standard output.
    pub fn as_analyst_ok(&self, args: &[&str]) -> String {
        stdout_of_success("cleanroom", args, self.as_analyst(args))
    }

    /// `cleanroom job submit ARGS --wait --format json`: the job as JSON and the exit code.
    pub fn submit(&self, args: &[&str]) -> (Value, Option<i32>) {
        let mut all = vec!["job", "submit"];
        all.extend(args);
        all.extend(["--wait", "--timeout", "120", "--format", "json"]);
        let out = self.as_analyst(&all);
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
        let mut all = vec!["job", "submit"];
        all.extend(args);
        all.extend(["--format", "json"]);
        let out = self.as_analyst(&all);
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
        let out = self.as_analyst(&["job", "status", job_id, "--format", "json"]);
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

/// Asserts that `dataset preview`'s output `text` has the row of `identifier` with these figures:
/// rows read, rejected, without consent, forgotten, distinct keys; and names each of `reasons`.
pub fn assert_preview(text: &str, identifier: &str, figures: [u64; 5], reasons: &[&str]) {
    let want: Vec<String> = figures.iter().map(u64::to_string).collect();
    assert!(
        text.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&identifier) && words[1..] == want
        }),
        "want {identifier} {want:?}:\n{text}"
    );
    for reason in reasons {
        assert!(text.contains(reason), "{reason}: {text}");
    }
}

/// Asserts that `job` (as `job submit` or `job status` print it) ended in `state`; returns the
/// reason it gives.
pub fn reason_of<'a>(job: &'a Value, state: &str) -> &'a str {
    assert_eq!(job["state"], state, "{job}");
    job["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("a {state} job gives no reason: {job}"))
}

/// A party's TLS credentials in the consortium directory `dir`: the CA's certificate
/// `pki/ca.pem`, and the party's certificate and key `<keys>/<stem>.pem` and `.key` (`keys` is
/// `pki` for parties the CA issued, `keys` for enrolled ones; `stem` e.g. `node-acme`).
pub fn load_credentials(dir: &Path, keys: &str, stem: &str) -> cleanroom_transport::Credentials {
    cleanroom_transport::Credentials::load(
        &dir.join("pki/ca.pem"),
        &dir.join(format!("{keys}/{stem}.pem")),
        &dir.join(format!("{keys}/{stem}.key")),
    )
    .unwrap_or_else(|e| panic!("credentials of {stem} in {keys}/: {e}"))
}

/// A loopback TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A loopback UDP port (QUIC listens on UDP) that was free a moment ago.
pub fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// The words of a two-party job of `kind` (`overlap`, `match`) on each party's dataset
/// `customers`: `KIND --between PAIR --dataset customers --on KEY --purpose PURPOSE`.
pub const fn psi_job<'a>(
    kind: &'a str,
    pair: &'a str,
    key: &'a str,
    purpose: &'a str,
) -> [&'a str; 9] {
    [
        kind,
        "--between",
        pair,
        "--dataset",
        "customers",
        "--on",
        key,
        "--purpose",
        purpose,
    ]
}

/// The words of an overlap job on the dataset `customers` ([`psi_job`]).
pub const fn overlap_job<'a>(pair: &'a str, key: &'a str, purpose: &'a str) -> [&'a str; 9] {
    psi_job("overlap", pair, key, purpose)
}

/// An overlap job between `pair` by email, for overlap-reporting (what [`open_agreement`]
/// allows).
pub const fn overlap_between(pair: &str) -> [&str; 9] {
    overlap_job(pair, "email", "overlap-reporting")
}

/// The overlap job most tests run: acme and globex by email, for overlap-reporting.
pub const OVERLAP: [&str; 9] = overlap_between("acme,globex");

/// The words of an overlap-sum job between `pair` on the dataset `customers` by email: the
/// value holder (second of the pair) sums `amount_cents` and counts, for fraud-detection.
pub const fn overlap_sum_between(pair: &str) -> [&str; 11] {
    [
        "overlap-sum",
        "--between",
        pair,
        "--dataset",
        "customers",
        "--on",
        "email",
        "--sum",
        "amount_cents,count",
        "--purpose",
        "fraud-detection",
    ]
}

/// The words of an aggregate job over `parties` on their dataset `chargebacks`, summing
/// `amount` per `category` for the labels `groups`, for fraud-benchmark (add `--count` to count
/// rows too).
pub const fn aggregate_job<'a>(parties: &'a str, groups: &'a str) -> [&'a str; 13] {
    [
        "aggregate",
        "--parties",
        parties,
        "--dataset",
        "chargebacks",
        "--group-by",
        "category",
        "--groups",
        groups,
        "--sum",
        "amount",
        "--purpose",
        "fraud-benchmark",
    ]
}

/// The words of a match job in which acme learns which of its rows globex holds:
/// `match --between acme,globex --dataset acme:customers --dataset globex:customers --on email
/// --purpose fraud-detection --reveal-to acme`.
pub const MATCH_REVEALED_TO_ACME: [&str; 13] = [
    "match",
    "--between",
    "acme,globex",
    "--dataset",
    "acme:customers",
    "--dataset",
    "globex:customers",
    "--on",
    "email",
    "--purpose",
    "fraud-detection",
    "--reveal-to",
    "acme",
];

/// Asserts that no node of `names` has loaded a dataset (its log says so when it reads one),
/// after giving a late read a moment to show.
pub fn assert_no_dataset_loaded(c: &Consortium, names: &[&str]) {
    std::thread::sleep(Duration::from_millis(200));
    for node in names {
        let log = c.node(node).log_text();
        assert!(
            !log.contains("dataset loaded"),
            "{node} read data for a vetoed job:\n{log}"
        );
    }
}
