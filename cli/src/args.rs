//! The command line, with clap derive. Every command's `--help` says what it does and what it
//! needs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Clean-room computation between business partners: private set intersection over QUIC with
/// mutual TLS, each partner's node enforcing its own agreement.
///
/// Start with `cleanroom demo`: it runs a coordinator and two partner nodes on loopback with
/// synthetic data and prints the results of a real overlap and match job.
#[derive(Debug, Parser)]
#[command(name = "cleanroom", version, about, long_about)]
pub struct Cli {
    /// Log lines as text or as JSON objects (one a line; a job's lines carry its `job_id`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "CLEANROOM_LOG_FORMAT"
    )]
    pub log_format: cleanroom_node::cli::LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator and two partner nodes on loopback with synthetic data, run an overlap
    /// and a match job, and print the results next to the ground truth.
    Demo(DemoArgs),
    /// Submit jobs and read their status and results (the analyst API).
    Job {
        /// How to reach the coordinator.
        #[command(flatten)]
        conn: ConnArgs,
        /// Job subcommand.
        #[command(subcommand)]
        command: JobCli,
    },
    /// Recurring jobs: each run is an ordinary job, linked to its schedule.
    Schedule {
        /// How to reach the coordinator.
        #[command(flatten)]
        conn: ConnArgs,
        /// Schedule subcommand.
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// A schedule's history as an HTML page (trend chart and runs table), CSV or JSON.
    Report {
        /// How to reach the coordinator.
        #[command(flatten)]
        conn: ConnArgs,
        /// Report options.
        #[command(flatten)]
        args: ReportArgs,
    },
    /// List the nodes the coordinator knows and whether each is connected.
    Nodes {
        /// How to reach the coordinator.
        #[command(flatten)]
        conn: ConnArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// The signed audit heads a node reported to the coordinator, one JSON object per line
    /// (node, job_id, head, public_key and signature in hex, received_ms): give the file to the
    /// node's operator for `cleanroom-node audit verify --heads FILE`. Needs the read-all or
    /// admin grant.
    AuditHeads {
        /// How to reach the coordinator.
        #[command(flatten)]
        conn: ConnArgs,
        /// The node.
        #[arg(long)]
        node: String,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The consortium's certificate authority and certificates (PEM files).
    Pki {
        /// PKI subcommand.
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Write synthetic partner datasets (CSV, Parquet or JSON lines) with a known overlap, and
    /// the ground truth.
    Synth(SynthArgs),
    /// Run the coordinator.
    Coordinator {
        /// Coordinator subcommand.
        #[command(subcommand)]
        command: CoordinatorCommand,
    },
    /// Run a partner node (the same as the `cleanroom-node` binary).
    #[command(hide = true)]
    Node(cleanroom_node::cli::NodeCli),
    /// Run a Ballista scheduler for a partner's own cluster: nodes with
    /// `engine = { ballista = "df://HOST:PORT" }` send their dataset reads to it. Prints
    /// `listening ADDR` once bound; runs until SIGINT or SIGTERM.
    Scheduler(SchedulerArgs),
    /// Run a Ballista executor of a partner's cluster: it registers with the scheduler and runs
    /// the tasks of the node's dataset reads. Logs `executor: task done` with its task and row
    /// counts after every task; runs until SIGINT or SIGTERM.
    Executor(ExecutorArgs),
    /// Write a new key a node shares with its Ballista executors: give the file to
    /// `cleanroom executor --sealing-key` and to the node's `engine.sealing_key`. The node seals
    /// each job's secrets under it (the job key; an overlap-sum's Paillier key and rows; an
    /// aggregate's spec), so the plans the scheduler sees carry ciphertexts.
    SealingKey(SealingKeyArgs),
    /// Benchmarks that report throughput against the cryptographic cost floor.
    Bench {
        /// Benchmark to run.
        #[command(subcommand)]
        command: BenchCommand,
    },
}

/// `cleanroom pki …`
///
/// Every party generates its own key: `pki request` on the party's machine, `pki sign` by the CA
/// operator on the request, the certificate sent back. The CA directory never holds a party's
/// private key.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the consortium CA (ca.pem, ca.key, an empty crl.pem) in DIR. Refuses to overwrite
    /// an existing CA.
    Init {
        /// Directory for the CA files.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The consortium's name, written into the CA certificate.
        #[arg(long, default_value = "cleanroom consortium")]
        consortium: String,
    },
    /// Generate your private key (mode 0600) and a certificate request, on your own machine.
    /// Writes OUT/<role>-<name>.key and OUT/<role>-<name>.csr (OUT/coordinator.* for the
    /// coordinator). Send the .csr to the CA operator; the key never leaves OUT.
    Request {
        /// Your name: the partner name agreements use, or the analyst's name (1–63 of a–z, 0–9
        /// and '-'); not given for the coordinator.
        #[arg(long)]
        name: Option<String>,
        /// What the certificate is for.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Directory for the key and the request.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Renewal: keep the existing key in OUT and write a new request for it (pins on the
        /// key stay valid). Without it an existing key is never overwritten.
        #[arg(long)]
        renew: bool,
    },
    /// Sign a certificate request (from `pki request`) with the consortium CA. The certificate
    /// names the identity the request asks for, certifies the requester's key, and is valid
    /// from an hour ago for DAYS days; a copy is kept in DIR/issued/.
    Sign {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The request (.csr).
        request: PathBuf,
        /// Where to write the certificate (default: the request's path with .pem).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Replace an existing certificate at OUT (renewal), atomically: a running node or
        /// coordinator that uses it reloads it whole.
        #[arg(long)]
        replace: bool,
    },
    /// Revoke certificates and rewrite the CA's CRL (DIR/crl.pem). Copy the CRL to every node
    /// and the coordinator (the file their config's `crl` names): they reload it within a
    /// second (or on SIGHUP), refuse the revoked certificates on every new connection and close
    /// open connections that use them.
    Revoke {
        /// Directory holding the CA.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Revoke every certificate issued to this name.
        #[arg(required_unless_present = "serial", conflicts_with = "serial")]
        name: Option<String>,
        /// Only the certificates of this role (needed when the name has two).
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// Revoke the one certificate with this serial number (as `pki list` prints it).
        #[arg(long)]
        serial: Option<String>,
    },
    /// Re-sign the CRL with the same entries and today's date (creates an empty one if missing).
    Crl {
        /// Directory holding the CA.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// List the certificates the CA has issued, with serial, key fingerprint, expiry and
    /// whether each is revoked.
    List {
        /// Directory holding the CA.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Print a certificate's identity, serial, expiry and key fingerprint (the `sha256:…` an
    /// agreement's `partner_key` pins).
    Show {
        /// The certificate (PEM).
        cert: PathBuf,
    },
    /// FOR THE DEMO AND TESTS ONLY: generate a key and a certificate in one step at the CA, so
    /// whoever runs it holds the party's private key. Real parties use `pki request` and
    /// `pki sign`.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Where to write the certificate and key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Whom the certificate is for.
        #[command(subcommand)]
        who: PkiIssue,
    },
}

/// A certificate's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A partner's node.
    Node,
    /// An analyst.
    Analyst,
    /// The coordinator.
    Coordinator,
}

impl RoleArg {
    /// The transport's role.
    pub fn role(self) -> cleanroom_transport::PeerRole {
        match self {
            RoleArg::Node => cleanroom_transport::PeerRole::Node,
            RoleArg::Analyst => cleanroom_transport::PeerRole::Analyst,
            RoleArg::Coordinator => cleanroom_transport::PeerRole::Coordinator,
        }
    }
}

/// The subject of a certificate.
#[derive(Debug, Subcommand)]
pub enum PkiIssue {
    /// A partner's node; NAME is the partner's identity that agreements name.
    Node {
        /// Partner name: 1–63 of a–z, 0–9 and '-'.
        name: String,
    },
    /// The coordinator.
    Coordinator,
    /// An analyst who submits jobs.
    Analyst {
        /// Analyst name: 1–63 of a–z, 0–9 and '-'.
        name: String,
    },
}

/// `cleanroom scheduler`
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Where to listen (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub listen: std::net::SocketAddr,
    /// Seconds a read's output (rows of the dataset) stays in the executors' work directories
    /// after the read's last task; the node must have fetched it by then.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub keep_results_secs: u64,
    /// Also shut down when standard input closes (for supervisors and tests).
    #[arg(long, hide = true)]
    pub stop_on_stdin_eof: bool,
}

/// `cleanroom executor`
#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// The scheduler's address: `host:port`, with a DNS name or an IP address.
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub scheduler: cleanroom_transport::HostPort,
    /// The address to listen on (its ports are picked free).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// Where stage outputs are kept until the node or another executor fetches them.
    #[arg(long)]
    pub work_dir: PathBuf,
    /// Tasks run at once (default: the machine's cores).
    #[arg(long)]
    pub slots: Option<usize>,
    /// The most memory the tasks' buffers take, e.g. `8GiB` (default: Ballista's share of the
    /// machine).
    #[arg(long)]
    pub memory_pool: Option<bytesize::ByteSize>,
    /// The key file the partner's node names as `engine.sealing_key` (64 hex digits; make one
    /// with `cleanroom sealing-key --out FILE`). With it, this executor also filters,
    /// normalises and blinds for an overlap, a match or an overlap-sum, re-blinds the partner's
    /// points, encrypts an overlap-sum value holder's rows and groups an aggregate's; without
    /// it, it only reads.
    #[arg(long)]
    pub sealing_key: Option<PathBuf>,
    /// Also shut down when standard input closes (for supervisors and tests).
    #[arg(long, hide = true)]
    pub stop_on_stdin_eof: bool,
}

/// `cleanroom sealing-key`
#[derive(Debug, Args)]
pub struct SealingKeyArgs {
    /// The file to write (created with mode 0600; an existing file is never overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

/// `cleanroom coordinator …`
#[derive(Debug, Subcommand)]
pub enum CoordinatorCommand {
    /// Run the coordinator until SIGINT or SIGTERM. Prints `listening ADDR` once bound.
    Serve {
        /// The coordinator's config file (see the README for an example).
        #[arg(long, short, env = "CLEANROOM_COORDINATOR_CONFIG")]
        config: PathBuf,
        /// Also shut down when standard input closes (for supervisors and tests).
        #[arg(long, hide = true)]
        stop_on_stdin_eof: bool,
    },
}

/// How the analyst CLI reaches and authenticates to the coordinator.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// The coordinator's address: `host:port`, with a DNS name or an IP address.
    #[arg(
        long,
        env = "CLEANROOM_COORDINATOR",
        default_value = "127.0.0.1:7400",
        global = true
    )]
    pub coordinator: cleanroom_transport::HostPort,
    /// The consortium CA certificate.
    #[arg(
        long,
        env = "CLEANROOM_CA",
        default_value = "pki/ca.pem",
        global = true
    )]
    pub ca: PathBuf,
    /// Your analyst certificate (from `cleanroom pki request --role analyst` and the CA).
    #[arg(long, env = "CLEANROOM_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your analyst key.
    #[arg(long, env = "CLEANROOM_KEY", global = true)]
    pub key: Option<PathBuf>,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
    /// CSV for spreadsheets.
    Csv,
}

/// `cleanroom job …`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job to the coordinator, which offers it to the nodes; each decides by its
    /// agreement.
    Submit(SubmitArgs),
    /// A job's state, history, and (when done) results.
    Status {
        /// The job id printed by `job submit`.
        job_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Wait for a job to finish and print its results.
    Result {
        /// The job id printed by `job submit`.
        job_id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Aggregate jobs: print groups from this index on (0: the first). Large results are
        /// read from the coordinator page by page.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Aggregate jobs: print at most this many groups (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// The most recent jobs.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// `cleanroom job …`: the job commands, and `retry`.
#[derive(Debug, Subcommand)]
pub enum JobCli {
    /// The job commands.
    #[command(flatten)]
    Base(JobCommand),
    /// Resubmit a failed, vetoed or cancelled job as a new job with the same spec (the new
    /// job's history names the old one). Retrying the same job twice gives the same new job.
    Retry {
        /// The job to retry.
        job_id: String,
        /// Idempotency key of the new job (default: `retry:JOB_ID`).
        #[arg(long, default_value = "")]
        idempotency_key: String,
        #[command(flatten)]
        then: WaitArgs,
    },
}

/// What to do with a job just submitted (by `job retry` or `schedule run-now`).
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait for the job to finish and print its result.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `cleanroom schedule …`
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule: `schedule add NAME --cron "0 2 * * *" [--timezone Europe/Paris] --
    /// overlap --between acme,globex --dataset customers --on email --purpose
    /// overlap-reporting`. The job words after `--` are those of `job submit` (the `--` may be
    /// left out); give connection flags before them.
    Add(ScheduleAddArgs),
    /// The live schedules.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// A schedule with its runs and their jobs (a removed schedule's history too).
    Show {
        /// The schedule.
        name: String,
        /// Only runs scheduled in this window before now, e.g. 90d, 12h, 2w.
        #[arg(long)]
        since: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Stop a schedule from firing and retrying until it is resumed.
    Pause {
        /// The schedule.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Resume a paused schedule; occurrences that fell in the pause are not run.
    Resume {
        /// The schedule.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a schedule. Its runs and their jobs stay, and stay reportable.
    Remove {
        /// The schedule.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Submit the schedule's job now, as an extra run (paused schedules too).
    RunNow {
        /// The schedule.
        name: String,
        #[command(flatten)]
        then: WaitArgs,
    },
}

/// `cleanroom schedule add …`
#[derive(Debug, Args)]
pub struct ScheduleAddArgs {
    /// The schedule's name: letters, digits, '.', '_' and '-'.
    pub name: String,
    /// Five-field cron expression: minute hour day-of-month month day-of-week, e.g.
    /// "0 2 * * *" (every day at 02:00).
    #[arg(long)]
    pub cron: String,
    /// IANA time zone of the cron expression, e.g. Europe/Paris (default: UTC).
    #[arg(long, default_value = "")]
    pub timezone: String,
    /// How many times a failed or vetoed run is retried.
    #[arg(long, default_value_t = 3)]
    pub max_retries: u32,
    /// Seconds before the first retry; each further retry waits twice as long.
    #[arg(long, default_value_t = 60)]
    pub backoff: u32,
    /// When a run ends (succeeded, failed or vetoed), the coordinator runs this program on its
    /// host, directly (no shell, no arguments; timeout 30 s), the run's facts in the
    /// environment only: CLEANROOM_SCHEDULE, CLEANROOM_JOB_ID, CLEANROOM_STATE,
    /// CLEANROOM_RESULT (released count, empty if none), CLEANROOM_REASON, CLEANROOM_RUN_JSON.
    /// An absolute path inside a directory the coordinator's operator lists (`on_done_dirs`).
    #[arg(long, value_name = "PROGRAM")]
    pub on_done: Option<String>,
    /// When a run ends, the coordinator writes its JSON into this directory on its host (an
    /// absolute path inside a directory the coordinator's operator lists, `notify_dirs`), one
    /// file per run: SCHEDULE-OCCURRENCE-ATTEMPT-JOB.json.
    #[arg(long, value_name = "DIR")]
    pub notify_dir: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The job, as for `job submit`: `overlap --between acme,globex --dataset customers --on
    /// email --purpose overlap-reporting`.
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "JOB"
    )]
    pub job: Vec<String>,
}

/// The job words of `schedule add`, parsed like `job submit`'s.
#[derive(Debug, Parser)]
#[command(name = "schedule add NAME --cron CRON --", no_binary_name = false)]
pub struct ScheduledJobWords {
    /// The job.
    #[command(flatten)]
    pub submit: SubmitArgs,
}

/// Formats of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// A self-contained page with a trend chart and the runs table.
    Html,
    /// One row per run.
    Csv,
    /// The report's data.
    Json,
}

/// `cleanroom report …`
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The schedule.
    pub name: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Html)]
    pub format: ReportFormat,
    /// Only runs scheduled in this window before now, e.g. 90d, 12h, 2w (default: all).
    #[arg(long)]
    pub since: Option<String>,
    /// Where to write the report (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Job kinds the CLI can submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// How many records do the two partners share? (|A ∩ B| only)
    Overlap,
    /// Which of each side's records does the other side have too? (membership to the sides
    /// the agreements allow, written on the nodes; the coordinator gets counts)
    Match,
    /// The overlaps of every pair of N partners (`--parties a,b,c`): one overlap job per pair,
    /// shown as a matrix; pairs that an agreement forbids or whose count is withheld are
    /// marked as such. Not for schedules (schedule the pairwise overlaps instead).
    OverlapMatrix,
    /// Industry-wide totals per group over N ≥ 3 partners (`--parties a,b,c --group-by
    /// category --groups x,y --sum amount --count`): each partner's figures are secret-shared
    /// among the partners and only the noised total per group is reconstructed, at the
    /// coordinator; groups whose noised count is below an agreement's minimum are suppressed.
    Aggregate,
    /// Sums over the records two partners share (`--between keys,values --dataset
    /// acme:customers --dataset payco:chargebacks --on email --sum amount,count --group-by
    /// reason --groups fraud,dispute`): the first partner holds identifiers only, the second
    /// also the summed columns. Per group: the number of shared identifiers (`count`) and each
    /// column's total over them, clipped to the second partner's bounds and noised under
    /// encryption by the first; only the second decrypts, and only noised totals. The first
    /// partner learns the exact number of shared identifiers.
    OverlapSum,
}

/// Output formats of `job submit`: those of every command, and an HTML page for
/// `overlap-matrix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SubmitFormat {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
    /// CSV for spreadsheets.
    Csv,
    /// A self-contained HTML page (overlap-matrix only).
    Html,
}

impl SubmitFormat {
    /// The format of a single job (HTML is for the matrix only).
    pub fn for_job(self) -> Option<Format> {
        match self {
            SubmitFormat::Table => Some(Format::Table),
            SubmitFormat::Json => Some(Format::Json),
            SubmitFormat::Csv => Some(Format::Csv),
            SubmitFormat::Html => None,
        }
    }
}

/// `cleanroom job submit …`
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The computation.
    #[arg(value_enum)]
    pub kind: KindArg,
    /// The two partners, initiator first: `--between acme,globex`.
    #[arg(long, value_delimiter = ',', required_unless_present = "parties")]
    pub between: Vec<String>,
    /// For `overlap-matrix`: the partners, at least two: `--parties acme,globex,initech`.
    /// Each pair runs with the one listed first as initiator. For `aggregate`: the partners,
    /// at least three.
    #[arg(long, value_delimiter = ',', conflicts_with = "between")]
    pub parties: Vec<String>,
    /// Dataset at each party: `customers` (same name at both) or `acme:customers` once per
    /// party.
    #[arg(long, required = true)]
    pub dataset: Vec<String>,
    /// Join key(s): identifier names declared in the nodes' configs, e.g. `email`, or
    /// `email+phone` (also written `email,phone`) for a composite key.
    #[arg(long, value_delimiter = ',')]
    pub on: Vec<String>,
    /// What an `aggregate` or `overlap-sum` job groups and sums (boxed: the other kinds do not
    /// need it).
    #[command(flatten)]
    pub aggregate: Box<AggregateArgs>,
    /// The purpose, which each node checks against its agreement.
    #[arg(long)]
    pub purpose: String,
    /// For `match`: which parties ask to learn which of their records are shared
    /// (default: both). Each partner's agreement must allow it.
    #[arg(long, value_delimiter = ',')]
    pub reveal_to: Option<Vec<String>>,
    /// Resubmitting with the same key and spec returns the same job instead of a new one.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Wait for the job to finish and print its result.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (overlap-matrix: for all its jobs).
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Output format (`html`: overlap-matrix only).
    #[arg(long, value_enum, default_value_t = SubmitFormat::Table)]
    pub format: SubmitFormat,
    /// For `overlap-matrix`: write the matrix here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl SubmitArgs {
    /// The join key's parts: `--on email+phone` and `--on email,phone` are the same composite
    /// key (as `keys = ["email+phone"]` and `["email,phone"]` are in a node's config).
    pub fn keys(&self) -> Vec<String> {
        self.on
            .iter()
            .flat_map(|k| k.split('+'))
            .map(|k| k.trim().to_owned())
            .collect()
    }
}

/// The `aggregate` and `overlap-sum` options of `job submit`.
#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// For `aggregate` and `overlap-sum`: the categorical column that names each row's group
    /// (optional for `overlap-sum`).
    #[arg(long)]
    pub group_by: Option<String>,
    /// The group labels, in the order to report them (public: every partner sums over the
    /// same list). Rows whose label is not listed are summed into "(other)".
    #[arg(long, value_delimiter = ',', requires = "group_by")]
    pub groups: Vec<String>,
    /// For `aggregate`, instead of --groups: an integer domain LO..HI (HI excluded, e.g.
    /// 0..1000000, at most 2^21 groups). The group-by column must hold integers; a row whose
    /// value is not an integer is rejected, one outside the range is summed into "(other)".
    /// Only the two bounds travel in the job, so large domains are cheap.
    #[arg(long, requires = "group_by", conflicts_with = "groups")]
    pub group_range: Option<String>,
    /// Value column(s) to sum per group, clipped to the partners' bounds. For `overlap-sum`,
    /// `count` in the list asks for the number of shared identifiers (same as --count).
    #[arg(long, value_delimiter = ',')]
    pub sum: Vec<String>,
    /// Also show the (noised) count per group: rows for `aggregate`, shared identifiers for
    /// `overlap-sum`. It is always computed, since it decides which groups are suppressed.
    #[arg(long)]
    pub count: bool,
    /// For `aggregate`: clip per person rather than per row. COLUMN (a CSV header at every
    /// partner) names the person a row belongs to; each partner sums a person's rows in the
    /// first of the job's groups they carry (in --groups order), clips that sum to the bounds
    /// and counts the person once (its rows in other groups are left out), so the noise
    /// protects a person. Required when a
    /// partner's agreement names a `person` column, and must be that column.
    #[arg(long, value_name = "COLUMN")]
    pub per_person: Option<String>,
}

/// Where a node's dataset reads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// DataFusion in the node's own process.
    InProcess,
    /// A Ballista cluster (`engine = { ballista = "df://…" }` in the node's config).
    Ballista,
}

/// Which PSI job `bench psi` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PsiKindArg {
    /// The count only.
    Overlap,
    /// The count and each party's matched rows: a second pass over each dataset finds them.
    Match,
}

/// A dataset file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet (integer columns typed Int64).
    Parquet,
    /// JSON lines, one object per row.
    Jsonl,
}

impl From<FileFormat> for cleanroom_node::data::DataFormat {
    fn from(f: FileFormat) -> Self {
        match f {
            FileFormat::Csv => cleanroom_node::data::DataFormat::Csv,
            FileFormat::Parquet => cleanroom_node::data::DataFormat::Parquet,
            FileFormat::Jsonl => cleanroom_node::data::DataFormat::Jsonl,
        }
    }
}

/// `cleanroom synth …`
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory: one customers and one chargebacks file per partner, and truth.json.
    #[arg(long, default_value = "data")]
    pub out: PathBuf,
    /// File format of the datasets.
    #[arg(long, value_enum, default_value_t = FileFormat::Csv)]
    pub format: FileFormat,
    /// Partner names.
    #[arg(long, value_delimiter = ',', default_value = "acme,globex")]
    pub partners: Vec<String>,
    /// Rows per partner.
    #[arg(long, default_value_t = 10_000)]
    pub rows: u64,
    /// Fraction of each partner's rows that all partners share (0 to 1).
    #[arg(long, default_value_t = 0.3)]
    pub overlap: f64,
    /// Random seed: the same seed gives the same files.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `cleanroom demo …`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Rows per partner.
    #[arg(long, default_value_t = 20_000)]
    pub rows: u64,
    /// Fraction of rows the partners share.
    #[arg(long, default_value_t = 0.3)]
    pub overlap: f64,
    /// Random seed for the synthetic data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// File format of the partners' datasets: each node reads Parquet through DataFusion, and
    /// CSV and JSON lines through its strict readers (on a cluster, line by line there).
    #[arg(long, value_enum, default_value_t = FileFormat::Csv)]
    pub format: FileFormat,
    /// Where each node's dataset reads run: in its own process, or on a local Ballista cluster
    /// (a scheduler and two executors) that the demo starts first and stops last. On the
    /// cluster each node also blinds, re-blinds and compares there (its `sealing_key`, and a
    /// `shared_dir` of its own under the working directory).
    #[arg(long, value_enum, default_value_t = EngineArg::InProcess)]
    pub engine: EngineArg,
    /// Keep the working directory (PKI, data, configs, logs, databases) here instead of a
    /// temporary directory that is removed afterwards.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// After the jobs, keep the consortium running with the coordinator's web console on this
    /// address (e.g. 127.0.0.1:7443) until interrupted, printing the URLs and the analyst's
    /// credentials.
    #[arg(long, value_name = "ADDR")]
    pub web: Option<std::net::SocketAddr>,
}

/// `cleanroom bench …`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// An overlap of N × N items between two node processes over loopback QUIC with mTLS,
    /// submitted through the analyst API, against the cryptographic floor measured in the same
    /// run. Build with --release.
    Psi(BenchPsiArgs),
    /// An aggregate over N node processes (N ≥ 3) of G groups, submitted through the analyst
    /// API: wall time from submission to result, and bytes each party sent. Build with
    /// --release.
    Aggregate(BenchAggregateArgs),
    /// An overlap-sum of N × N items (a count and two value columns, `amount_cents` and
    /// `orders`) between two node processes, and a plain overlap of the same sets in the same
    /// run: wall times, bytes each side sent, and their ratio. Build with --release.
    OverlapSum(BenchPsiArgs),
}

/// `cleanroom bench aggregate …`
#[derive(Debug, Args)]
pub struct BenchAggregateArgs {
    /// Group labels in the job (the five synthetic categories, then `g0`, `g1`, …; at most
    /// 20 000, the spec's cap, unless --in-process or --integer-groups).
    #[arg(long, default_value_t = 10_000)]
    pub groups: u64,
    /// Group by the synthetic integer `bucket` column over the range 0..GROUPS instead of
    /// labels (only the two bounds travel in the job; up to 2^21 groups, e.g. --groups 1000000).
    /// The result is then read back page by page and that read is timed too.
    #[arg(long, conflicts_with = "in_process")]
    pub integer_groups: bool,
    /// Run the protocol core in this process instead (no nodes, no network): every party's
    /// split, share expansion, noise and partial, and the reconstruction, on random vectors of
    /// `groups × 2` cells with ε = 1; bytes are the frames the nodes would send. For domains
    /// beyond the spec's cap (up to 2^23 groups).
    #[arg(long)]
    pub in_process: bool,
    /// Partners (node processes), at least 3.
    #[arg(long, default_value_t = 5)]
    pub parties: u32,
    /// Customers per partner; each partner's chargebacks file has a fifth of that.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    #[command(flatten)]
    pub each: BenchRunArgs,
}

/// What every `cleanroom bench …` takes: how often to run, where to keep the work, JSON.
#[derive(Debug, Args)]
pub struct BenchRunArgs {
    /// Repetitions of the job (the median is reported).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Keep the working directory here.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Print the figures as JSON too.
    #[arg(long)]
    pub json: bool,
}

/// `cleanroom bench psi …`
#[derive(Debug, Args)]
pub struct BenchPsiArgs {
    /// Items per side.
    #[arg(long, default_value_t = 1 << 20)]
    pub n: u64,
    /// Fraction shared.
    #[arg(long, default_value_t = 0.5)]
    pub overlap: f64,
    /// Worker threads per node (the node processes' `RAYON_NUM_THREADS`; bench psi only).
    /// Several, e.g. `--threads 1,2`, run each run once per count with fresh node processes
    /// and report the speed-up of the last count over the one before. Default: one per core.
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Run both nodes under this `memory_limit` (e.g. `1GiB`): the overlap, the match and both
    /// roles of an overlap-sum then keep their sets in spill files, and the bytes each node
    /// spilled are reported.
    #[arg(long)]
    pub memory_limit: Option<bytesize::ByteSize>,
    /// Where the nodes' dataset reads run: in their processes, or on a local Ballista cluster
    /// of two executors (on the same machine, so they share its cores with the nodes), which
    /// also blind, re-blind and compare for them.
    #[arg(long, value_enum, default_value_t = EngineArg::InProcess)]
    pub engine: EngineArg,
    /// The job: `overlap`, or `match` (which reads each dataset a second time, in file order,
    /// to find the matched rows; on a cluster that pass runs on the executors too).
    #[arg(long, value_enum, default_value_t = PsiKindArg::Overlap)]
    pub kind: PsiKindArg,
    #[command(flatten)]
    pub each: BenchRunArgs,
}
