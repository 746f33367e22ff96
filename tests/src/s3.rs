//! An S3 service on loopback for the `s3://` tests: moto's server (the S3 emulator LocalStack
//! grew from, and a real HTTP server speaking the S3 protocol), installed from PyPI into a
//! virtual environment beside the test binaries the first time a test needs it. Nothing to
//! start by hand: the test installs and starts it, as the browser tests install Chromium.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::bins;

/// What moto needs for S3 and its server mode (its `server` extra would pull every AWS
/// service's dependencies, 30 s more to install).
const PACKAGES: &[&str] = &["moto[s3]==5.2.6", "flask", "flask-cors"];

/// The credentials the tests' nodes get in their environment. moto does not check them; the
/// tests check they never reach a log or a file.
pub const ACCESS_KEY: &str = "AKIACLEANROOMTEST01";
pub const SECRET_KEY: &str = "s3cr3t-Cleanroom-Test-Key-Never-Logged";

/// The virtual environment's Python, installed once per target directory.
fn python() -> &'static PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let profile_dir = bins().0.parent().expect("target dir").to_owned();
        let venv = profile_dir.join("s3-moto-venv");
        let python = venv.join("bin/python");
        let ready = venv.join("installed");
        if ready.exists() {
            return python;
        }
        let _ = std::fs::remove_dir_all(&venv);
        let run = |cmd: &mut Command, what: &str| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                out.status.success(),
                "{what} failed; the s3:// tests need python3 with venv and pip, and PyPI \
                 (install by hand: python3 -m venv {} && {} -m pip install {}):\n{}",
                venv.display(),
                python.display(),
                PACKAGES.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
        run(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(PACKAGES),
            "pip install moto",
        );
        std::fs::write(&ready, "").unwrap();
        python
    })
}

/// A running moto S3 server on an ephemeral loopback port; stopped when dropped.
#[derive(Debug)]
pub struct S3 {
    child: Child,
    pub endpoint: String,
    log: PathBuf,
}

impl S3 {
    /// Installs moto if needed, starts its server (log in `dir/logs/s3.log`) and waits until it
    /// says where it listens.
    pub fn start(dir: &Path) -> S3 {
        let log = dir.join("logs/s3.log");
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let mut child = Command::new(python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting moto's S3 server");
        // It prints "Running on http://127.0.0.1:PORT" (on stderr or stdout, by version); the
        // rest of both streams goes to the log.
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let tx = tx.clone();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            std::thread::spawn(move || {
                use std::io::Write;
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = writeln!(file, "{line}");
                    if let Some(at) = line.find("http://127.0.0.1:") {
                        let url: String = line[at..]
                            .chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect();
                        let _ = tx.send(url);
                    }
                }
            });
        }
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("moto's S3 server did not start: see {}", log.display()));
        let s3 = S3 {
            child,
            endpoint,
            log,
        };
        s3.wait_ready();
        s3
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.client("s3.list_buckets()").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "moto's S3 server never answered: see {}",
            self.log.display()
        );
    }

    /// The environment a node needs to reach this service (`AmazonS3Builder::from_env`).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Runs `statement` in Python with `s3` a boto3 client of this service.
    fn client(&self, statement: &str) -> Result<String, String> {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='{ACCESS_KEY}', aws_secret_access_key='{SECRET_KEY}')\n{statement}\n",
            self.endpoint
        );
        let out = Command::new(python())
            .args(["-c", &script])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.client(&format!("s3.create_bucket(Bucket='{bucket}')"))
            .unwrap();
    }

    /// Deletes `s3://bucket/key`.
    pub fn delete(&self, bucket: &str, key: &str) {
        self.client(&format!("s3.delete_object(Bucket='{bucket}', Key='{key}')"))
            .unwrap();
    }

    /// Uploads the local `file` as `s3://bucket/key`.
    pub fn put(&self, bucket: &str, key: &str, file: &Path) {
        self.client(&format!(
            "s3.upload_file({:?}, '{bucket}', '{key}')",
            file.to_str().unwrap()
        ))
        .unwrap();
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
