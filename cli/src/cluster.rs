//! A whole consortium on loopback, for `cleanroom demo` and `cleanroom bench`: a PKI, a
//! coordinator process and one node process per partner, each started from this very binary
//! with its own config file, exactly as an operator would start them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use cleanroom_coordinator::AnalystClient;

use crate::args::EngineArg;
use cleanroom_proto::v1::{JobKind, JobSpec, PartySpec};
use cleanroom_transport::{Credentials, Identity, pki};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// One partner: its name and its customers dataset (with an `email` column).
#[derive(Debug, Clone)]
pub struct Partner {
    /// Partner name (the node's identity).
    pub name: String,
    /// The partner's customers file (CSV, Parquet or JSON lines); its chargebacks are
    /// `<name>-chargebacks` beside it, in the same format.
    pub csv: PathBuf,
}

impl Partner {
    /// Partners `names`, each with its CSV `<name>.csv` in `data_dir` (as `synth` writes them).
    pub fn all_in(data_dir: &Path, names: &[impl AsRef<str>]) -> Vec<Partner> {
        names
            .iter()
            .map(|n| Partner {
                name: n.as_ref().to_owned(),
                csv: data_dir.join(format!("{}.csv", n.as_ref())),
            })
            .collect()
    }

    /// The partners of a `synth` run, with the files it wrote (in whatever format).
    pub fn from_truth(truth: &crate::synth::GroundTruth) -> Vec<Partner> {
        truth
            .files
            .iter()
            .map(|(name, file)| Partner {
                name: name.clone(),
                csv: file.clone(),
            })
            .collect()
    }
}

/// A running consortium.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    coordinator: Child,
    nodes: BTreeMap<String, Child>,
    /// The coordinator's address.
    pub addr: SocketAddr,
    /// Its web console's address, if it serves one.
    pub web: Option<SocketAddr>,
    /// Each node's privacy dashboard (with `/metrics`), when the console is served.
    pub dashboards: BTreeMap<String, SocketAddr>,
    /// The Ballista cluster the nodes read on, if any; stopped after them.
    pub engine: Option<crate::scale::LocalCluster>,
}

impl Cluster {
    /// Issues the PKI, writes the configs, starts the coordinator and the nodes, and waits
    /// until every node is connected.
    pub async fn start(dir: &Path, partners: &[Partner]) -> anyhow::Result<Cluster> {
        Self::start_with(dir, partners, None, &[], "", EngineArg::InProcess).await
    }

    /// [`Cluster::start`], the coordinator also serving its web console on `web` if given, with
    /// `node_env` set in every node process's environment
    /// (e.g. `RAYON_NUM_THREADS`, the node's worker threads) and `node_top` written at the top
    /// of every node's config (e.g. `memory_limit = "1GiB"`). With `EngineArg::Ballista`, a
    /// local Ballista cluster of two executors is started first and the nodes read on it.
    pub async fn start_with(
        dir: &Path,
        partners: &[Partner],
        web: Option<SocketAddr>,
        node_env: &[(&str, String)],
        node_top: &str,
        engine: EngineArg,
    ) -> anyhow::Result<Cluster> {
        let engine = match engine {
            EngineArg::InProcess => None,
            EngineArg::Ballista => Some(crate::scale::LocalCluster::start(dir, 2).await?),
        };
        let pki_dir = dir.join("pki");
        pki::init_ca(&pki_dir, "cleanroom demo consortium")?;
        pki::issue(&pki_dir, &Identity::coordinator(), &pki_dir)?;
        pki::issue(&pki_dir, &Identity::analyst("demo")?, &pki_dir)?;
        for p in partners {
            pki::issue(&pki_dir, &Identity::node(&p.name)?, &pki_dir)?;
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;

        let coordinator_cfg = dir.join("coordinator.toml");
        std::fs::write(
            &coordinator_cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase = \"coordinator.db\"\n\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator.key\"\n{}",
                web.map_or(String::new(), |w| format!("\n[web]\nlisten = \"{w}\"\n"))
            ),
        )?;
        let mut coordinator = spawn(
            &["coordinator", "serve", "--config"],
            &coordinator_cfg,
            &logs.join("coordinator.log"),
            true,
            &[],
        )?;
        let (addr, web) = read_listen_lines(&mut coordinator, web.is_some())
            .await
            .with_context(|| {
                format!(
                    "the coordinator did not start; see {}",
                    logs.join("coordinator.log").display()
                )
            })?;

        let mut nodes = BTreeMap::new();
        let mut dashboards = BTreeMap::new();
        for p in partners {
            let cfg_path = dir.join(format!("{}.toml", p.name));
            let top = match &engine {
                Some(engine) => format!("{node_top}{}", engine.engine_line(&p.name)),
                None => node_top.to_owned(),
            };
            let mut cfg = node_config(&p.name, addr, &p.csv, partners, &top);
            if web.is_some() {
                // A free loopback port, found by binding and releasing it: the node binds it a
                // moment later (and fails to start, with the reason in its log, if taken).
                let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
                cfg.push_str(&format!("\n[dashboard]\nlisten = \"{listen}\"\n"));
                dashboards.insert(p.name.clone(), listen);
            }
            std::fs::write(&cfg_path, cfg)?;
            let child = spawn(
                &["node", "run", "--config"],
                &cfg_path,
                &logs.join(format!("{}.log", p.name)),
                false,
                node_env,
            )?;
            nodes.insert(p.name.clone(), child);
        }
        let cluster = Cluster {
            dir: dir.to_owned(),
            coordinator,
            nodes,
            addr,
            web,
            dashboards,
            engine,
        };
        cluster.wait_connected(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// The largest `spilled_bytes` node `name` has logged ("spill files written"), if any.
    pub fn spilled_bytes(&self, name: &str) -> Option<u64> {
        self.spilled_bytes_where(name, |_| true)
    }

    /// The `spilled_bytes` node `name` logged for job `job_id`, if it spilled.
    pub fn spilled_bytes_of_job(&self, name: &str, job_id: &str) -> Option<u64> {
        let tag = format!("job_id={job_id}");
        self.spilled_bytes_where(name, |line| line.contains(&tag))
    }

    fn spilled_bytes_where(&self, name: &str, keep: impl Fn(&str) -> bool) -> Option<u64> {
        let log =
            std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log"))).ok()?;
        log.lines()
            .filter(|l| keep(l))
            .filter_map(|l| l.split("spilled_bytes=").nth(1))
            .filter_map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u64>().ok()
            })
            .max()
    }

    /// Credentials of the analyst "demo".
    pub fn analyst_credentials(&self) -> anyhow::Result<Credentials> {
        let pki_dir = self.dir.join("pki");
        Ok(Credentials::load(
            &pki_dir.join("ca.pem"),
            &pki_dir.join("analyst-demo.pem"),
            &pki_dir.join("analyst-demo.key"),
        )?)
    }

    /// A connected analyst client.
    pub async fn client(&self) -> anyhow::Result<AnalystClient> {
        Ok(AnalystClient::connect(self.addr, &self.analyst_credentials()?).await?)
    }

    async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let client = self.client().await?;
        loop {
            let nodes = client.nodes().await?;
            let up = self
                .nodes
                .keys()
                .all(|name| nodes.iter().any(|n| &n.name == name && n.connected));
            if up {
                client.close().await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the nodes did not connect to the coordinator; see the logs in {}",
                    self.dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The peak resident set size of each named node, in bytes (`None` where unavailable).
    pub fn peak_rss(&self, names: &[impl AsRef<str>]) -> Vec<(String, Option<u64>)> {
        names
            .iter()
            .map(|n| {
                let n = n.as_ref();
                (
                    n.to_owned(),
                    self.node_pid(n).and_then(crate::measure::peak_rss),
                )
            })
            .collect()
    }

    /// The OS process id of a node.
    pub fn node_pid(&self, name: &str) -> Option<u32> {
        self.nodes.get(name).and_then(|c| c.id())
    }

    /// Stops every process gracefully (closing its standard input), killing any that does not
    /// stop within a few seconds.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut children: Vec<(String, Child)> =
            std::mem::take(&mut self.nodes).into_iter().collect();
        children.push((
            "coordinator".into(),
            std::mem::replace(&mut self.coordinator, dummy_child()?),
        ));
        stop_all(&mut children).await;
        if let Some(engine) = self.engine.take() {
            engine.stop().await;
        }
        Ok(())
    }
}

/// Stops processes started with `--stop-on-stdin-eof`: closes every standard input, then waits
/// for each, killing any that has not stopped within 10 s.
pub(crate) async fn stop_all(children: &mut [(String, Child)]) {
    for (_, child) in children.iter_mut() {
        drop(child.stdin.take());
    }
    for (name, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(_)) => {}
            _ => {
                tracing::warn!(process = %name, "did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

fn dummy_child() -> anyhow::Result<Child> {
    Ok(Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?)
}

/// Starts this binary with `args CONFIG --stop-on-stdin-eof`, stderr to `log`, `env` added to
/// its environment.
pub(crate) fn spawn(
    args: &[&str],
    config: &Path,
    log: &Path,
    stdout: bool,
    env: &[(&str, String)],
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg(config)
        .arg("--stop-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(if stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::from(log_file))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("starting {}", args.join(" ")))
}

/// Reads `listening ADDR` and, when `web`, `web ADDR` from the coordinator's output.
pub(crate) async fn read_listen_lines(
    child: &mut Child,
    web: bool,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next = async |prefix: &str| -> anyhow::Result<SocketAddr> {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("timed out"))??
            .ok_or_else(|| anyhow!("exited before listening"))?;
        let addr = line
            .strip_prefix(prefix)
            .ok_or_else(|| anyhow!("unexpected output: {line}"))?;
        Ok(addr.trim().parse()?)
    };
    let addr = next("listening ").await?;
    let web = if web { Some(next("web ").await?) } else { None };
    Ok((addr, web))
}

/// A node config that allows overlap and match on `customers` by email with every other
/// partner, for the purposes the demo uses, and lets partners learn membership; and `aggregate`
/// on `chargebacks` (the synthetic `<name>-chargebacks.csv` beside the customers file) by
/// category or by the integer bucket, summing `amount` clipped to [0, 200000] cents, with ε = 1,
/// k = 10 and the default collusion tolerance (all but one party); and `overlap-sum` on
/// `customers` by email (either role), grouped by category, summing `amount_cents` clipped to
/// [0, 500000] and `orders` to [0, 100] per customer, with ε = 1 and k = 10. Each purpose with
/// each partner may spend ε 100 a day (an aggregate of ε 1 costs ≈ 6.9 of it on its own at the
/// default δ), enough for the demo and the benches.
fn node_config(
    name: &str,
    coordinator: SocketAddr,
    csv: &Path,
    partners: &[Partner],
    top: &str,
) -> String {
    let mut cfg = format!(
        "name = \"{name}\"\ncoordinator = \"{coordinator}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state-{name}\"\n{top}\n\
         [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/node-{name}.pem\"\nkey = \"pki/node-{name}.key\"\n\n\
         [[dataset]]\nname = \"customers\"\npath = \"{}\"\n\n\
         [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
         [[dataset.identifier]]\nname = \"phone\"\ncolumn = \"phone\"\nnormaliser = \"phone\"\n\n\
         [[dataset.value]]\ncolumn = \"amount_cents\"\nmin = 0\nmax = 10000000\n\n\
         [[dataset.value]]\ncolumn = \"orders\"\nmin = 0\nmax = 1000\n\n\
         [[dataset]]\nname = \"chargebacks\"\npath = \"{}\"\n\n\
         [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 10000000\n",
        csv.display(),
        csv.with_file_name(format!(
            "{name}-chargebacks.{}",
            csv.extension().and_then(|e| e.to_str()).unwrap_or("csv")
        ))
        .display()
    );
    for other in partners.iter().filter(|p| p.name != name) {
        cfg.push_str(&format!(
            "\n[[agreement]]\npartner = \"{}\"\npurposes = [\"overlap-reporting\", \"fraud-detection\", \"fraud-benchmark\"]\n\
             budget_per_purpose = {{ epsilon_per_period = 100.0, period = \"day\" }}\n\n\
             [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\n\n\
             [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"email\"]\nreveal_membership_to_partner = true\n\n\
             [[agreement.allow]]\ncomputation = \"aggregate\"\ndataset = \"chargebacks\"\ngroup_by = [\"category\", \"bucket\"]\n\
             value_columns = [{{ column = \"amount\", min = 0, max = 200000 }}]\nepsilon = 1.0\nmin_result = 10\n\n\
             [[agreement.allow]]\ncomputation = \"overlap-sum\"\ndataset = \"customers\"\nkeys = [\"email\"]\ngroup_by = [\"category\"]\n\
             value_columns = [{{ column = \"amount_cents\", min = 0, max = 500000 }}, {{ column = \"orders\", min = 0, max = 100 }}]\nepsilon = 1.0\nmin_result = 10\n",
            other.name
        ));
    }
    cfg
}

/// A `kind` job between `partners` (initiator first) on the `customers` dataset by email, as
/// [`node_config`] allows it; for `match`, every party asks to learn membership.
pub fn customers_spec(partners: &[&str], kind: JobKind, purpose: &str) -> JobSpec {
    JobSpec {
        analyst: String::new(),
        kind: kind as i32,
        parties: partners
            .iter()
            .map(|node| PartySpec {
                node: (*node).to_owned(),
                dataset: "customers".into(),
                keys: vec!["email".into()],
                learns_membership: kind == JobKind::Match,
            })
            .collect(),
        purpose: purpose.into(),
        aggregate: None,
        overlap_sum: None,
    }
}
