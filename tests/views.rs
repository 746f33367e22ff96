//! View tests: what each party actually receives, for every job kind (issue 12).
//!
//! Each scenario runs one job kind three times (twice for aggregate) in one consortium of real
//! processes: on base inputs, then on inputs one customer apart at one party, then one apart at
//! the other. For every run it records each party's **view**:
//!
//! - a node: every envelope it received for the job (data plane and control plane), as its
//!   transport decoded it — the binaries are built with the transport's `transcript` feature,
//!   which appends each received frame to the file `CLEANROOM_TRANSCRIPT` names (received frames
//!   only: never a key, an identifier or anything else the node holds);
//! - the coordinator: every envelope it received for the job from the nodes, and every row its
//!   SQLite database holds for the job (every table with a `job_id` column; protobuf blobs
//!   decoded);
//! - the analyst: the envelopes `cleanroom job status` received and the JSON it printed (and
//!   `cleanroom job result` for aggregates; overlap and match jobs run as runs of a schedule,
//!   and the schedule report's entry for the job is in the view too).
//!
//! A view is the list of fields seen, each path with the values it took. Every protobuf field
//! is walked from the descriptors of `proto/cleanroom.proto` (compiled at run time), so a field
//! added to a message is in the views without touching this file. Values that are fresh for
//! every job whatever the data (ids, times, digests, keys, blinded points, ciphertexts, seeds,
//! masked partials, noise draws: [`FRESH`]) are compared by size only.
//!
//! **The spec** is the `views` block in docs/SECURITY.md: per scenario and party, the fields
//! that may differ between neighbouring inputs — what that party learns about the data. The
//! test fails when a field differs between neighbouring runs and the block does not list it
//! for that party (the docs would claim less than what is received), and when the block lists a
//! field no run received (a stale line). Noised fields are also checked to differ only as their
//! noise allows. The views are written to `target/tmp/views/` for reading.
//!
//! The attacks of issue 12 are tests of their own below: each would have succeeded before the
//! fixes of the `leaks` and `sumcrypto` branches.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cleanroom_e2e::{Consortium, TRANSCRIPT_ENV, bins};
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, Value as Field};
use serde_json::Value;

// ---------------------------------------------------------------- the consortium

/// The purpose every agreement of these tests names.
const PURPOSE: &str = "views";

/// Customers of each node's `customers` file: acme has 0..200, globex 120..320 (80 shared).
const ACME_CUSTOMERS: std::ops::Range<u64> = 0..200;
const GLOBEX_CUSTOMERS: std::ops::Range<u64> = 120..320;
/// Chargebacks (`chargebacks` file): 60 rows per node, one per customer of these ranges.
const CHARGEBACKS: [(&str, std::ops::Range<u64>); 3] =
    [("acme", 0..60), ("globex", 120..180), ("initech", 400..460)];
/// The shared customer the neighbouring inputs leave out at one party (category "books").
const NEIGHBOUR: u64 = 150;
/// The chargeback the aggregate's neighbouring input leaves out at acme (category "books").
const NEIGHBOUR_CHARGEBACK: u64 = 9;
/// The groups overlap-sum jobs list; customers 130 and 131 are "rare" (shared: 2 of them),
/// which is not listed, so they end up in "(other)", below min_result 5.
const GROUPS: &str = "books,games,music";
/// The groups aggregate jobs list: "luxury" has no row, so it is suppressed; "rare" (2 rows, at
/// globex) ends up in "(other)".
const AGGREGATE_GROUPS: &str = "books,games,music,luxury";
/// Value bound of the summed column per customer: above 65,535 on purpose (two 16-bit limbs in
/// the old overlap-sum encryption).
const VALUE_MAX: u64 = 500_000;

fn email(i: u64) -> String {
    format!("c{i}@example.com")
}

fn category(i: u64) -> &'static str {
    if i == 130 || i == 131 {
        "rare"
    } else {
        ["books", "games", "music"][(i % 3) as usize]
    }
}

fn amount(i: u64) -> u64 {
    1_000 + (i * 7_919) % 90_000
}

/// The customers of `node` (empty for initech, which only has chargebacks).
fn customers(node: &str) -> std::ops::Range<u64> {
    match node {
        "acme" => ACME_CUSTOMERS,
        "globex" => GLOBEX_CUSTOMERS,
        _ => 0..0,
    }
}

/// Writes every node's two files, leaving out the customers in `left_out` (node, customer).
fn write_data(c: &Consortium, left_out: &[(&str, u64)]) {
    let data = c.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let keep = |node: &str, i: u64| !left_out.contains(&(node, i));
    for node in ["acme", "globex", "initech"] {
        let mut text = String::from("id,email,amount,category\n");
        for i in customers(node).filter(|i| keep(node, *i)) {
            text.push_str(&format!(
                "{node}-{i},{},{},{}\n",
                email(i),
                amount(i),
                category(i)
            ));
            if node == "globex" && i == NEIGHBOUR {
                // A second row of the same customer in another group.
                text.push_str(&format!("{node}-{i}b,{},{},games\n", email(i), amount(i)));
            }
        }
        replace_file(&data.join(format!("{node}.csv")), &text);
        let range = CHARGEBACKS
            .iter()
            .find(|(n, _)| *n == node)
            .unwrap()
            .1
            .clone();
        let mut text = String::from("id,email,amount,category\n");
        for i in range.filter(|i| keep(node, *i)) {
            text.push_str(&format!(
                "cb-{node}-{i},{},{},{}\n",
                email(i),
                amount(i),
                category(i)
            ));
        }
        replace_file(&data.join(format!("{node}-cb.csv")), &text);
    }
}

/// Replaces a file atomically (a node may be reading it for another job).
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A dataset block: `customers…` datasets read `data/<node>.csv`, `chargebacks…` ones
/// `data/<node>-cb.csv`.
fn dataset(name: &str, file: &str) -> String {
    format!(
        "[[dataset]]\nname = \"{name}\"\npath = \"data/{file}\"\n\n\
         [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
         [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 1000000\n\n"
    )
}

/// The datasets every node declares. The aliases exist so one consortium can hold agreements
/// with different terms for the same kind: `-dp` entries set ε, `-k` entries a high
/// `min_result`.
const DATASETS: [(&str, bool); 6] = [
    ("customers", false),
    ("customers-dp", false),
    ("customers-dp1", false),
    ("customers-k", false),
    ("chargebacks", true),
    ("chargebacks-dp", true),
];

/// acme's (or globex's) allow entries with the other of the two.
fn pair_entries(me: &str) -> String {
    let acme = me == "acme";
    let values = format!("value_columns = [{{ column = \"amount\", min = 0, max = {VALUE_MAX} }}]");
    let mut out = String::new();
    let mut allow = |computation: &str, dataset: &str, extra: &str| {
        out.push_str(&format!(
            "[[agreement.allow]]\ncomputation = \"{computation}\"\ndataset = \"{dataset}\"\nkeys = [\"email\"]\n{extra}\n"
        ));
    };
    allow("overlap", "customers", "");
    allow("overlap", "customers-dp", "epsilon = 0.5\n");
    // ε at acme only (the replay test).
    allow(
        "overlap",
        "customers-dp1",
        if acme { "epsilon = 0.5\n" } else { "" },
    );
    // overlap-withheld: globex's agreement withholds any count below 1000 (the overlap is 80).
    allow(
        "overlap",
        "customers-k",
        if acme { "" } else { "min_result = 1000\n" },
    );
    // match: acme learns which of its rows globex has.
    allow(
        "match",
        "customers",
        if acme {
            "membership = \"self\"\n"
        } else {
            "membership = \"partner\"\n"
        },
    );
    // match-withheld: acme's own agreement withholds counts below 1000.
    allow(
        "match",
        "customers-k",
        if acme {
            "membership = \"self\"\nmin_result = 1000\n"
        } else {
            "membership = \"partner\"\n"
        },
    );
    let role = if acme { "key-holder" } else { "value-holder" };
    for (dataset, extra) in [
        ("customers", "min_result = 5\n"),
        ("customers-dp", "min_result = 10\nepsilon = 1.0\n"),
        // ε at the key holder only (the replay test).
        (
            "customers-dp1",
            if acme {
                "min_result = 5\nepsilon = 1.0\n"
            } else {
                "min_result = 5\n"
            },
        ),
    ] {
        allow(
            "overlap-sum",
            dataset,
            &format!("roles = [\"{role}\"]\ngroup_by = [\"category\"]\n{values}\n{extra}"),
        );
    }
    out
}

/// One node's config: every dataset, a node-wide ε budget, the pair entries with its partner
/// (acme–globex) and aggregate entries with both others.
fn write_config(c: &Consortium, me: &str) {
    let mut cfg = String::from("[budget]\nepsilon_per_period = 1000.0\nperiod = \"day\"\n\n");
    for (name, cb) in DATASETS {
        let file = if cb {
            format!("{me}-cb.csv")
        } else {
            format!("{me}.csv")
        };
        cfg.push_str(&dataset(name, &file));
    }
    let values = format!("value_columns = [{{ column = \"amount\", min = 0, max = {VALUE_MAX} }}]");
    for other in ["acme", "globex", "initech"].iter().filter(|o| **o != me) {
        cfg.push_str(&format!(
            "[[agreement]]\npartner = \"{other}\"\npurposes = [\"{PURPOSE}\"]\n\n"
        ));
        if me != "initech" && *other != "initech" {
            cfg.push_str(&pair_entries(me));
        }
        for (dataset, extra) in [
            ("chargebacks", "min_result = 1\n"),
            ("chargebacks-dp", "min_result = 10\nepsilon = 1.0\n"),
        ] {
            cfg.push_str(&format!(
                "[[agreement.allow]]\ncomputation = \"aggregate\"\ndataset = \"{dataset}\"\n\
                 group_by = [\"category\"]\n{values}\n{extra}\n"
            ));
        }
    }
    c.write_node_toml(me, &cfg);
}

/// A consortium of acme, globex and initech on the base data, recording transcripts.
fn consortium() -> Consortium {
    let mut c = Consortium::new();
    c.record_transcripts();
    c.start_coordinator();
    write_data(&c, &[]);
    for name in ["acme", "globex", "initech"] {
        c.issue_node(name);
        write_config(&c, name);
        c.start_node(name);
    }
    c.wait_connected(&["acme", "globex", "initech"]);
    c
}

// ---------------------------------------------------------------- jobs

/// `job submit` words of each scenario.
fn submit_args(scenario: &str) -> Vec<String> {
    let psi = |kind: &str, dataset: &str| -> Vec<String> {
        let mut v: Vec<String> = [
            kind,
            "--between",
            "acme,globex",
            "--dataset",
            dataset,
            "--on",
            "email",
            "--purpose",
            PURPOSE,
        ]
        .map(str::to_owned)
        .to_vec();
        if kind == "match" {
            v.extend(["--reveal-to".to_owned(), "acme".to_owned()]);
        }
        if kind == "overlap-sum" {
            v.extend(
                [
                    "--sum",
                    "amount,count",
                    "--group-by",
                    "category",
                    "--groups",
                    GROUPS,
                ]
                .map(str::to_owned),
            );
        }
        v
    };
    let aggregate = |dataset: &str, groups: &str| -> Vec<String> {
        [
            "aggregate",
            "--parties",
            "acme,globex,initech",
            "--dataset",
            dataset,
            "--group-by",
            "category",
            "--groups",
            groups,
            "--sum",
            "amount",
            "--count",
            "--purpose",
            PURPOSE,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    match scenario {
        "overlap" => psi("overlap", "customers"),
        "overlap-noised" => psi("overlap", "customers-dp"),
        "overlap-withheld" => psi("overlap", "customers-k"),
        "overlap-noised-one-side" => psi("overlap", "customers-dp1"),
        "match" => psi("match", "customers"),
        "match-withheld" => psi("match", "customers-k"),
        "overlap-sum" => psi("overlap-sum", "customers"),
        "overlap-sum-noised" => psi("overlap-sum", "customers-dp"),
        "overlap-sum-noised-one-side" => psi("overlap-sum", "customers-dp1"),
        "aggregate" => aggregate("chargebacks", AGGREGATE_GROUPS),
        "aggregate-noised" => aggregate("chargebacks-dp", AGGREGATE_GROUPS),
        // One group, below min_result: suppressed, yet every other row is in "(other)".
        "aggregate-one-group" => aggregate("chargebacks-dp", "rare"),
        other => panic!("no scenario {other}"),
    }
}

/// The nodes of a scenario with the role each plays.
fn roles(scenario: &str) -> Vec<(&'static str, &'static str)> {
    if scenario.starts_with("aggregate") {
        vec![("peer", "acme"), ("peer", "globex"), ("peer", "initech")]
    } else if scenario.starts_with("overlap-sum") {
        vec![("key-holder", "acme"), ("value-holder", "globex")]
    } else {
        vec![("initiator", "acme"), ("responder", "globex")]
    }
}

/// Whether a scenario's jobs run as runs of a schedule (overlap and match, the kinds schedule
/// reports are for), so that the analyst's view includes the schedule's report.
fn scheduled(scenario: &str) -> bool {
    roles(scenario)[0].0 == "initiator"
}

/// Runs a scenario's job to its end and returns the job (as `job submit --wait` or
/// `schedule run-now --wait` prints it).
fn run_job(c: &Consortium, scenario: &str) -> Value {
    let args = submit_args(scenario);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if !scheduled(scenario) {
        let (job, _) = c.submit(&args);
        assert!(job["job_id"].is_string(), "{scenario}: {job}");
        return job;
    }
    // A schedule whose cron (02:00 on 1 January) does not fire during the test; added once.
    let name = format!("views-{scenario}");
    // Connection flags go before the job's words.
    let out = Command::new(&bins().0)
        .args(["schedule", "add", &name, "--cron", "0 2 1 1 *"])
        .args(c.analyst_args())
        .arg("--")
        .args(&args)
        .current_dir(c.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("already exists"),
        "schedule add: {err}"
    );
    let (out, _) = analyst(
        c,
        &[
            "schedule",
            "run-now",
            &name,
            "--wait",
            "--timeout",
            "120",
            "--format",
            "json",
        ],
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(job["job_id"].is_string(), "{scenario}: {job}");
    job
}

static ANALYST_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Runs `cleanroom ARGS` as the analyst, recording what it receives in a transcript of its
/// own; returns the output and that transcript.
fn analyst(c: &Consortium, args: &[&str]) -> (Output, PathBuf) {
    let n = ANALYST_CALLS.fetch_add(1, Ordering::Relaxed);
    let transcript = c
        .transcripts
        .as_ref()
        .expect("transcripts are recorded")
        .join(format!("analyst-{n}.frames"));
    let out = Command::new(&bins().0)
        .args(args)
        .args(c.analyst_args())
        .current_dir(c.path())
        .env("RUST_LOG", "warn")
        .env(TRANSCRIPT_ENV, &transcript)
        .output()
        .expect("running cleanroom");
    assert!(
        out.status.success(),
        "cleanroom {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, transcript)
}

// ---------------------------------------------------------------- views

/// What one party saw in one run: field path → the values it took, sorted (a field seen in
/// several messages, or a repeated one, has several).
type View = BTreeMap<String, Vec<String>>;

/// Views of one run, keyed `"<role> <node>"`, `"coordinator"` or `"analyst"`.
type Views = BTreeMap<String, View>;

/// Fields whose value is fresh for every job whatever the data, with why: compared by size
/// only (bytes) or not at all (text, numbers). A path matches an entry when it ends with it at
/// a field boundary.
const FRESH: &[(&str, &str)] = &[
    ("job_id", "the job's id"),
    (
        "jobs.seq",
        "the job's row number in the coordinator's database",
    ),
    ("job_history.id", "a history row's number"),
    ("created_ms", "a time"),
    ("updated_ms", "a time"),
    ("at_ms", "a time"),
    ("stored_ms", "a time"),
    ("expires_ms", "a time"),
    ("scheduled_for_ms", "a time"),
    ("recorded_ms", "a time"),
    ("schedule_runs.id", "a schedule run's row number"),
    (
        "idempotency_key",
        "a submission's key: chosen by the analyst, or a schedule's name and occurrence time",
    ),
    ("scheduled_for", "a time"),
    (
        "job_leases.holder",
        "the coordinator process holding a job lease",
    ),
    ("spec_digest", "a hash of the job id and spec"),
    (
        "terms_digest",
        "a hash of the job id, spec and public terms",
    ),
    (
        "audit_head",
        "a node's audit-log head: a hash, and the log's length",
    ),
    ("signed_head.head", "a node's audit-log head, as audit_head"),
    (
        "signature",
        "an Ed25519 signature by the node's audit key over its audit head",
    ),
    (
        "audit_heads.hash",
        "the hash of a node's audit-log head, as audit_head",
    ),
    (
        "audit_heads.seq",
        "the length of a node's audit log at a head, as audit_head",
    ),
    ("audit_heads.id", "a kept head's row number"),
    ("received_ms", "a time"),
    (
        "membership_file",
        "a path named after the job id, on the node's own disk",
    ),
    (
        "points.points",
        "blinded points or ciphertexts under keys fresh for the job (their number is listed where it depends on the data)",
    ),
    ("public_key", "the value holder's key, fresh for the job"),
    ("share_seed", "a random seed"),
    (
        "agg_partial.cells",
        "a masked partial sum: uniform on its own (masks from seeds the coordinator never sees)",
    ),
    ("noise_commitment", "a hash over a random nonce"),
    ("nonce", "random bytes"),
    (
        "noise_reveal.noise",
        "a noise draw, independent of the data",
    ),
];

fn is_fresh(path: &str) -> bool {
    let path = path.replace("[]", "");
    FRESH.iter().any(|(suffix, _)| {
        path == *suffix
            || path
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') || head.ends_with('/'))
    })
}

/// A field value before it is rendered into a view.
enum Seen {
    Bytes(Vec<u8>),
    Text(String),
    Number(String),
    Message,
}

fn push(view: &mut View, path: &str, seen: Seen) {
    let fresh = is_fresh(path);
    let text = match seen {
        Seen::Bytes(b) if fresh => format!("<{} bytes>", b.len()),
        Seen::Bytes(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Seen::Text(_) | Seen::Number(_) if fresh => "<fresh>".to_owned(),
        Seen::Text(t) => format!("{t:?}"),
        Seen::Number(n) => n,
        Seen::Message => "{…}".to_owned(),
    };
    let values = view.entry(path.to_owned()).or_default();
    values.push(text);
    values.sort();
}

fn child(prefix: &str, name: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{name}")
    } else {
        format!("{prefix}.{name}")
    }
}

/// Adds every set field of a message (proto3: a field at its default value is not on the
/// wire, so it is not seen).
fn add_message(view: &mut View, prefix: &str, msg: &DynamicMessage) {
    for (field, value) in msg.fields() {
        add_field(view, &child(prefix, field.name()), &field.kind(), value);
    }
    for unknown in msg.unknown_fields() {
        push(
            view,
            &child(prefix, &format!("unknown#{}", unknown.number())),
            Seen::Text(format!("{unknown:?}")),
        );
    }
}

fn add_field(view: &mut View, path: &str, kind: &Kind, value: &Field) {
    let seen = match value {
        Field::Message(m) => {
            push(view, path, Seen::Message);
            add_message(view, path, m);
            return;
        }
        Field::List(items) => {
            let path = format!("{path}[]");
            for item in items {
                add_field(view, &path, kind, item);
            }
            return;
        }
        Field::Map(entries) => {
            for (k, v) in entries {
                add_field(view, &format!("{path}[{k:?}]"), kind, v);
            }
            return;
        }
        Field::Bool(x) => Seen::Number(x.to_string()),
        Field::I32(x) => Seen::Number(x.to_string()),
        Field::I64(x) => Seen::Number(x.to_string()),
        Field::U32(x) => Seen::Number(x.to_string()),
        Field::U64(x) => Seen::Number(x.to_string()),
        Field::F32(x) => Seen::Number(x.to_string()),
        Field::F64(x) => Seen::Number(x.to_string()),
        Field::String(s) => Seen::Text(s.clone()),
        Field::Bytes(b) => Seen::Bytes(b.to_vec()),
        Field::EnumNumber(n) => Seen::Number(
            kind.as_enum()
                .and_then(|e| e.get_value(*n))
                .map_or_else(|| n.to_string(), |v| v.name().to_owned()),
        ),
    };
    push(view, path, seen);
}

fn add_json(view: &mut View, path: &str, value: &Value) {
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                add_json(view, &child(path, k), v);
            }
        }
        Value::Array(a) => {
            for v in a {
                add_json(view, &format!("{path}[]"), v);
            }
        }
        Value::String(s) => push(view, path, Seen::Text(s.clone())),
        other => push(view, path, Seen::Number(other.to_string())),
    }
}

/// The message descriptors of `proto/cleanroom.proto`, compiled once.
fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto");
        let mut compiler = protox::Compiler::new([dir]).expect("proto include dir");
        compiler
            .open_file("cleanroom.proto")
            .expect("proto/cleanroom.proto compiles");
        compiler.descriptor_pool()
    })
}

fn message(name: &str) -> MessageDescriptor {
    pool()
        .get_message_by_name(&format!("cleanroom.v1.{name}"))
        .unwrap_or_else(|| panic!("no message {name}"))
}

/// One received envelope: its job, its phase and the whole envelope.
#[derive(Debug)]
struct Received {
    job_id: String,
    phase: String,
    envelope: DynamicMessage,
}

/// Every envelope in a transcript file (none if the file does not exist).
fn read_transcript(path: &Path) -> Vec<Received> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 12, "{}: truncated record", path.display());
        // rest[..8]: the stream's number in the recording process (unused here).
        let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
        let body = &rest[12..12 + len];
        rest = &rest[12 + len..];
        let envelope = DynamicMessage::decode(message("Envelope"), body).unwrap();
        let job_id = envelope
            .get_field_by_name("job_id")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let phase = envelope
            .get_field_by_name("phase")
            .and_then(|v| v.as_enum_number())
            .and_then(|n| {
                message("Envelope")
                    .get_field_by_name("phase")?
                    .kind()
                    .as_enum()?
                    .get_value(n)
            })
            .map_or_else(
                || "UNSPECIFIED".to_owned(),
                |v| v.name().trim_start_matches("PHASE_").to_owned(),
            );
        out.push(Received {
            job_id,
            phase,
            envelope,
        });
    }
    out
}

/// Adds received envelopes to a view: per `<PHASE>/<body>` the number of messages, then
/// every field of the body.
fn add_frames<'a>(view: &mut View, frames: impl IntoIterator<Item = &'a Received>) {
    for r in frames {
        for (field, value) in r.envelope.fields() {
            if matches!(field.name(), "job_id" | "phase") {
                continue;
            }
            add_field(
                view,
                &format!("{}/{}", r.phase, field.name()),
                &field.kind(),
                value,
            );
        }
    }
}

/// The protobuf message stored in a BLOB column of the coordinator's database.
fn blob_message(column: &str) -> Option<MessageDescriptor> {
    Some(message(match column {
        "spec" => "JobSpec",
        "outcome" => "PsiOutcome",
        "result" => "AggregateResult",
        "page" => "AggregatePage",
        _ => return None,
    }))
}

/// Adds every row the coordinator's database holds for the job: every table with a `job_id`
/// column, every column, protobuf blobs decoded.
fn add_database(view: &mut View, db: &Path, job_id: &str) {
    use rusqlite::types::ValueRef;
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for table in tables {
        let has_job = conn
            .prepare(&format!("SELECT * FROM \"{table}\" LIMIT 0"))
            .unwrap()
            .column_names()
            .any(|c| c == "job_id");
        if !has_job {
            continue;
        }
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" WHERE job_id = ?1"))
            .unwrap();
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let mut rows = stmt.query([job_id]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            push(view, &format!("db/{table}"), Seen::Message);
            for (i, name) in names.iter().enumerate() {
                let path = format!("db/{table}.{name}");
                match row.get_ref(i).unwrap() {
                    ValueRef::Null => push(view, &path, Seen::Text("NULL".into())),
                    ValueRef::Integer(x) => push(view, &path, Seen::Number(x.to_string())),
                    ValueRef::Real(x) => push(view, &path, Seen::Number(x.to_string())),
                    ValueRef::Text(t) => push(
                        view,
                        &path,
                        Seen::Text(String::from_utf8_lossy(t).into_owned()),
                    ),
                    ValueRef::Blob(b) => match blob_message(name) {
                        Some(desc) => {
                            let msg = DynamicMessage::decode(desc, b).unwrap();
                            push(view, &path, Seen::Message);
                            add_message(view, &path, &msg);
                        }
                        None => push(view, &path, Seen::Bytes(b.to_vec())),
                    },
                }
            }
        }
    }
}

/// Records every party's view of a finished job.
fn record_views(c: &Consortium, scenario: &str, job_id: &str) -> Views {
    // Frames that arrive after the coordinator stored the end (a node's last acknowledgements)
    // are part of the view too.
    std::thread::sleep(Duration::from_millis(500));
    let mut views = Views::new();
    for (role, node) in roles(scenario) {
        let frames = read_transcript(&c.transcript_of(node).unwrap());
        let mut view = View::new();
        add_frames(&mut view, frames.iter().filter(|r| r.job_id == job_id));
        assert!(
            !view.is_empty(),
            "{scenario}: {node} received nothing for {job_id}"
        );
        views.insert(format!("{role} {node}"), view);
    }

    // The coordinator: what the nodes sent it (analysts' requests are not about the data),
    // and what it stored.
    let mut view = View::new();
    let coordinator = c.coordinator.as_ref().unwrap().name.clone();
    let frames = read_transcript(&c.transcript_of(&coordinator).unwrap());
    add_frames(
        &mut view,
        frames
            .iter()
            .filter(|r| r.job_id == job_id && r.phase != "ANALYST"),
    );
    add_database(&mut view, &c.path().join("coordinator.db"), job_id);
    views.insert("coordinator".into(), view);

    // The analyst: `job status` (and for aggregates `job result`), frames and JSON.
    let mut view = View::new();
    let (out, transcript) = analyst(c, &["job", "status", job_id, "--format", "json"]);
    add_frames(&mut view, &read_transcript(&transcript));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    add_json(&mut view, "status/", &status);
    if scheduled(scenario) {
        // The schedule's report: this job's run (the report also lists the schedule's earlier
        // runs, which are other jobs).
        let name = format!("views-{scenario}");
        let (out, _) = analyst(c, &["report", &name, "--format", "json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let run = report["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["job_id"] == job_id)
            .unwrap_or_else(|| panic!("{scenario}: no run of {job_id} in {report}"));
        add_json(&mut view, "report/", run);
    }
    if scenario.starts_with("aggregate") {
        let (out, transcript) = analyst(c, &["job", "result", job_id, "--format", "json"]);
        add_frames(&mut view, &read_transcript(&transcript));
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        add_json(&mut view, "result/", &result);
    }
    views.insert("analyst".into(), view);
    views
}

/// Writes a run's views under `target/tmp/views/<scenario>/<run>/`, one file per party.
fn dump(scenario: &str, run: &str, views: &Views) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("views")
        .join(scenario)
        .join(run);
    std::fs::create_dir_all(&dir).unwrap();
    for (party, view) in views {
        let mut text = String::new();
        for (path, values) in view {
            text.push_str(&format!("{path} = {}\n", values.join(" | ")));
        }
        std::fs::write(dir.join(format!("{}.txt", party.replace(' ', "-"))), text).unwrap();
    }
}

// ---------------------------------------------------------------- the spec (docs/SECURITY.md)

/// One line of the `views` block: in these scenarios, these parties may see these fields
/// change with the data.
#[derive(Debug)]
struct Entry {
    line: usize,
    scenarios: Vec<String>,
    parties: Vec<String>,
    pattern: String,
}

/// Every scenario name the block may use, and the parties of each.
const SCENARIOS: [&str; 10] = [
    "overlap",
    "overlap-noised",
    "overlap-withheld",
    "match",
    "match-withheld",
    "overlap-sum",
    "overlap-sum-noised",
    "aggregate",
    "aggregate-noised",
    "aggregate-one-group",
];

fn parties_of(scenario: &str) -> Vec<&'static str> {
    let mut p: Vec<&str> = roles(scenario).into_iter().map(|(r, _)| r).collect();
    p.dedup();
    p.extend(["coordinator", "analyst"]);
    p
}

/// The `views` block of docs/SECURITY.md: sections headed `[scenario scenario …]`, each line
/// under a header `parties field what-it-is`, where `parties` is a comma-separated list of
/// roles and `field` a path pattern (`*` matches anything; `-` means nothing is learned).
fn spec() -> &'static [Entry] {
    static SPEC: OnceLock<Vec<Entry>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SECURITY.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines().enumerate();
        lines
            .by_ref()
            .find(|(_, l)| l.trim() == "```views")
            .expect("docs/SECURITY.md has a ```views block");
        let mut entries = Vec::new();
        let mut scenarios: Vec<String> = Vec::new();
        for (n, line) in lines {
            let line = line.trim();
            if line == "```" {
                return entries;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(header) = line.strip_prefix('[') {
                let header = header
                    .strip_suffix(']')
                    .unwrap_or_else(|| panic!("docs/SECURITY.md:{}: unclosed [", n + 1));
                scenarios = header.split_whitespace().map(str::to_owned).collect();
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(
                words.len() >= 3 && !scenarios.is_empty(),
                "docs/SECURITY.md:{}: a views line is `parties field what` under a [scenarios] \
                 header: {line}",
                n + 1
            );
            entries.push(Entry {
                line: n + 1,
                scenarios: scenarios.clone(),
                parties: words[0].split(',').map(str::to_owned).collect(),
                pattern: words[1].to_owned(),
            });
        }
        panic!("the views block of docs/SECURITY.md is not closed");
    })
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// The block's line that lets `party` (a role) see `path` change in `scenario`.
fn allowed(scenario: &str, party: &str, path: &str) -> Option<&'static Entry> {
    spec().iter().find(|e| {
        e.scenarios.iter().any(|s| s == scenario)
            && e.parties.iter().any(|p| p == party)
            && glob(&e.pattern, path)
    })
}

/// Compares the base run with each neighbouring run, party by party: every field that
/// differs must be listed for that party; every listed line must match something received.
/// Returns the problems found, each a sentence.
fn check_against_spec(scenario: &str, runs: &[Run]) -> Vec<String> {
    let mut problems = Vec::new();
    let base = &runs[0].views;
    for Run {
        name, views: run, ..
    } in &runs[1..]
    {
        let parties: BTreeSet<&String> = base.keys().chain(run.keys()).collect();
        for party in parties {
            let role = party.split(' ').next().unwrap();
            let empty = View::new();
            let (a, b) = (
                base.get(party).unwrap_or(&empty),
                run.get(party).unwrap_or(&empty),
            );
            let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for path in paths {
                let (va, vb) = (a.get(path), b.get(path));
                if comparable(va) == comparable(vb) {
                    continue;
                }
                if allowed(scenario, role, path).is_none() {
                    problems.push(format!(
                        "{scenario} ({name}): {party} receives {path}, which changed between \
                         neighbouring inputs ({} → {}), and docs/SECURITY.md does not list it",
                        show(va),
                        show(vb)
                    ));
                }
            }
        }
    }
    // Stale lines: listed for this scenario and party, but no run received such a field.
    for e in spec()
        .iter()
        .filter(|e| e.pattern != "-" && e.scenarios.iter().any(|s| s == scenario))
    {
        for party in &e.parties {
            let received = runs.iter().any(|run| {
                run.views.iter().any(|(p, view)| {
                    p.split(' ').next() == Some(party.as_str())
                        && view.keys().any(|path| glob(&e.pattern, path))
                })
            });
            if !received {
                problems.push(format!(
                    "docs/SECURITY.md:{}: lists {} for {party} in {scenario}, but no run received \
                     such a field",
                    e.line, e.pattern
                ));
            }
        }
    }
    problems
}

/// What is compared of a field: its values, without fresh scalars (a fresh number that
/// happens to be 0 is not on the wire, so it may be absent from one run and present in another);
/// fresh bytes keep their size.
fn comparable(values: Option<&Vec<String>>) -> Vec<&str> {
    values
        .into_iter()
        .flatten()
        .map(String::as_str)
        .filter(|v| *v != "<fresh>")
        .collect()
}

fn show(values: Option<&Vec<String>>) -> String {
    match values {
        None => "absent".into(),
        Some(v) => {
            let text = v.join(" | ");
            if text.len() > 120 {
                format!("{}…", &text[..text.floor_char_boundary(120)])
            } else {
                text
            }
        }
    }
}

/// The values of `path` in a party's view, as numbers.
fn numbers(view: &View, path: &str) -> Vec<i64> {
    view.get(path)
        .map(|v| v.iter().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// One run of a scenario: which input, the job as the analyst got it, every party's view.
#[derive(Debug)]
struct Run {
    name: String,
    job: Value,
    views: Views,
}

/// Runs a scenario on the base inputs and on each neighbouring input, records and dumps the
/// views, and returns the runs (base first) with the problems the checks found.
fn run_scenario(
    c: &Consortium,
    scenario: &str,
    neighbours: &[(&str, &[(&str, u64)])],
) -> (Vec<Run>, Vec<String>) {
    let mut runs = Vec::new();
    let all = std::iter::once(("base", &[][..])).chain(neighbours.iter().copied());
    for (name, left_out) in all {
        write_data(c, left_out);
        let job = run_job(c, scenario);
        let job_id = job["job_id"].as_str().unwrap().to_owned();
        assert_eq!(job["state"], "succeeded", "{scenario} ({name}): {job}");
        let views = record_views(c, scenario, &job_id);
        dump(scenario, name, &views);
        runs.push(Run {
            name: name.to_owned(),
            job,
            views,
        });
    }
    write_data(c, &[]);
    let mut problems = check_against_spec(scenario, &runs);
    problems.extend(check_noise(scenario, &runs));
    (runs, problems)
}

/// A rational such as "2" or "10/3" (a noise scale).
fn rational(text: &str) -> f64 {
    match text.split_once('/') {
        Some((p, q)) => p.parse::<f64>().unwrap() / q.parse::<f64>().unwrap(),
        None => text.parse().unwrap(),
    }
}

/// Noised figures differ between neighbouring runs only as their noise allows: by at most
/// what one customer changes plus both runs' noise, each bounded by 40 Laplace scales
/// (probability e^-40 of more) or 12 Gaussian standard deviations. Released groups are
/// compared by label, column by column.
fn check_noise(scenario: &str, runs: &[Run]) -> Vec<String> {
    // (label, column) → value, and column → bound on one run's noise.
    type Figures = BTreeMap<(String, String), i64>;
    let figures = |job: &Value| -> (Figures, BTreeMap<String, f64>) {
        let mut values = Figures::new();
        let mut bound = BTreeMap::new();
        if scenario.starts_with("overlap-noised") {
            if let Some(v) = job["intersection"].as_i64() {
                values.insert(("(all)".into(), "count".into()), v);
            }
            let scales: f64 = job["noise"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| rational(t["scale"].as_str().unwrap()))
                .sum();
            bound.insert("count".to_owned(), 40.0 * scales);
        } else {
            for g in job["result"]["groups"].as_array().into_iter().flatten() {
                for (column, v) in g["values"].as_object().into_iter().flatten() {
                    values.insert(
                        (g["group"].as_str().unwrap().to_owned(), column.clone()),
                        v.as_i64().unwrap(),
                    );
                }
            }
            for n in job["result"]["noise"].as_array().into_iter().flatten() {
                let column = n["column"].as_str().unwrap().to_owned();
                let b = match (n["scale"].as_str(), n["total_sd"].as_f64()) {
                    (Some(scale), _) => 40.0 * rational(scale),
                    (None, Some(sd)) => 12.0 * sd,
                    _ => panic!("{scenario}: noise without a scale: {n}"),
                };
                *bound.entry(column).or_insert(0.0) += b;
            }
        }
        (values, bound)
    };
    if !scenario.contains("noised") {
        return Vec::new();
    }
    let mut problems = Vec::new();
    let (base, bound) = figures(&runs[0].job);
    assert!(!base.is_empty(), "{scenario}: no noised figure released");
    for run in &runs[1..] {
        let (other, _) = figures(&run.job);
        for (key, a) in &base {
            let Some(b) = other.get(key) else { continue };
            let one_customer = if key.1 == "count" {
                1.0
            } else {
                VALUE_MAX as f64
            };
            let allowed = one_customer + 2.0 * bound[&key.1];
            if ((a - b) as f64).abs() > allowed {
                problems.push(format!(
                    "{scenario} ({}): {key:?} moved from {a} to {b}, more than one customer and \
                     the noise allow ({allowed})",
                    run.name
                ));
            }
        }
    }
    problems
}

/// The two neighbouring inputs of a two-party scenario: the shared customer left out at one
/// party, then at the other.
fn pair_neighbours() -> [(&'static str, &'static [(&'static str, u64)]); 2] {
    [
        ("without-globex-customer", &[("globex", NEIGHBOUR)]),
        ("without-acme-customer", &[("acme", NEIGHBOUR)]),
    ]
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Every (party, path, values) of a run's coordinator and analyst views whose values include
/// `needle` as a whole number (or a whole word of a text).
fn mentions(views: &Views, needle: i64) -> Vec<String> {
    let needle = needle.to_string();
    let mut out = Vec::new();
    for party in ["coordinator", "analyst"] {
        for (path, values) in &views[party] {
            let hit = values.iter().any(|v| {
                v.trim_matches('"')
                    .split(|c: char| !c.is_ascii_digit() && c != '-')
                    .any(|w| w == needle)
            });
            if hit {
                out.push(format!("{party}: {path} = {}", values.join(" | ")));
            }
        }
    }
    out
}

// ---------------------------------------------------------------- scenario tests

#[test]
fn the_views_block_names_known_scenarios_and_parties() {
    assert!(!spec().is_empty());
    for e in spec() {
        for s in &e.scenarios {
            assert!(
                SCENARIOS.contains(&s.as_str()),
                "docs/SECURITY.md:{}: unknown scenario {s}",
                e.line
            );
            for p in &e.parties {
                assert!(
                    parties_of(s).contains(&p.as_str()),
                    "docs/SECURITY.md:{}: {s} has no party {p} (it has {:?})",
                    e.line,
                    parties_of(s)
                );
            }
        }
    }
    // Every scenario is covered by the block, every party of it at least once.
    for s in SCENARIOS {
        for p in parties_of(s) {
            assert!(
                spec()
                    .iter()
                    .any(|e| e.scenarios.iter().any(|x| x == s) && e.parties.iter().any(|x| x == p)),
                "docs/SECURITY.md lists nothing {p} learns in {s}"
            );
        }
    }
    // The matching the block relies on.
    assert!(glob("*intersection", "REPORT/report.psi.intersection"));
    assert!(glob(
        "*groups[].values*",
        "status/result.groups[].values.count"
    ));
    assert!(!glob("*intersection", "REPORT/report.psi.intersection_x"));
    assert!(glob("a*b*c", "a-b-c"));
    assert!(!glob("a*b*c", "a-c-b"));
    assert!(is_fresh("PSI_BLINDED/points.points"));
    assert!(!is_fresh("PSI_BLINDED/points.seq"));
    assert!(is_fresh("db/jobs.seq"));
    assert!(is_fresh("status/history[].at_ms"));
    assert!(is_fresh("AGG_PARTIAL/agg_partial.cells"));
    assert!(!is_fresh("REPORT/report.aggregate.cells"));
    assert_eq!(
        mentions(
            &Views::from([
                (
                    "coordinator".into(),
                    View::from([("a".into(), vec!["\"intersection 80 (x)\"".into()])])
                ),
                (
                    "analyst".into(),
                    View::from([("b".into(), vec!["180".into(), "80".into()])])
                ),
            ]),
            80
        ),
        [
            "coordinator: a = \"intersection 80 (x)\"",
            "analyst: b = 180 | 80"
        ]
    );
}

#[test]
fn overlap_views() {
    let c = consortium();
    let mut problems = Vec::new();
    for scenario in ["overlap", "overlap-noised", "overlap-withheld"] {
        let (runs, found) = run_scenario(&c, scenario, &pair_neighbours());
        problems.extend(found);
        let released: Vec<Option<i64>> = runs
            .iter()
            .map(|r| r.job["intersection"].as_i64())
            .collect();
        match scenario {
            "overlap" => assert_eq!(released, [Some(80), Some(79), Some(79)]),
            "overlap-withheld" => assert_eq!(released, [None, None, None]),
            _ => assert!(released.iter().all(Option::is_some), "{released:?}"),
        }
    }
    assert_no_problems(&problems);
}

#[test]
fn match_views() {
    let c = consortium();
    let mut problems = Vec::new();
    for scenario in ["match", "match-withheld"] {
        let (runs, found) = run_scenario(&c, scenario, &pair_neighbours());
        problems.extend(found);
        let released: Vec<Option<i64>> = runs
            .iter()
            .map(|r| r.job["intersection"].as_i64())
            .collect();
        if scenario == "match" {
            assert_eq!(released, [Some(80), Some(79), Some(79)]);
        } else {
            assert_eq!(released, [None, None, None]);
        }
    }
    assert_no_problems(&problems);
}

/// The released count of each group of an overlap-sum or aggregate job.
fn group_counts(job: &Value) -> BTreeMap<String, Option<i64>> {
    job["result"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap().to_owned(),
                g["values"]["count"].as_i64(),
            )
        })
        .collect()
}

/// In an exact job, each neighbouring input moves the count of "books" (the group of the
/// customer or chargeback left out) by exactly one, and nothing else: the runs are neighbours.
fn assert_one_apart(runs: &[Run]) {
    let base = group_counts(&runs[0].job);
    for run in &runs[1..] {
        let mut expected = base.clone();
        let books = expected.get_mut("books").unwrap();
        *books = books.map(|n| n - 1);
        assert_eq!(group_counts(&run.job), expected, "{}", run.name);
    }
}

#[test]
fn overlap_sum_views() {
    let c = consortium();
    let mut problems = Vec::new();
    for scenario in ["overlap-sum", "overlap-sum-noised"] {
        let (runs, found) = run_scenario(&c, scenario, &pair_neighbours());
        problems.extend(found);
        if scenario == "overlap-sum" {
            assert_one_apart(&runs);
        }
    }
    assert_no_problems(&problems);
}

#[test]
fn aggregate_views() {
    let c = consortium();
    let mut problems = Vec::new();
    for scenario in ["aggregate", "aggregate-noised", "aggregate-one-group"] {
        let (runs, found) = run_scenario(
            &c,
            scenario,
            &[("without-acme-chargeback", &[("acme", NEIGHBOUR_CHARGEBACK)])],
        );
        problems.extend(found);
        if scenario == "aggregate" {
            assert_one_apart(&runs);
        }
    }
    assert_no_problems(&problems);
}

// ---------------------------------------------------------------- attacks (issue 12)

/// Runs one job of a scenario on the base data and returns it with its views.
fn run_once(c: &Consortium, scenario: &str) -> Run {
    let job = run_job(c, scenario);
    assert_eq!(job["state"], "succeeded", "{scenario}: {job}");
    let views = record_views(c, scenario, job["job_id"].as_str().unwrap());
    dump(scenario, "attack", &views);
    Run {
        name: "attack".into(),
        job,
        views,
    }
}

/// Attack: an aggregate with one listed group and `--count` gives each partner's exact count of
/// that group as rows_read − rows_excluded_consent − rows_excluded_deleted − rows_other (every
/// other row is in "(other)"), past the masks, the noise and the suppression: here the group is
/// "rare", 2 rows at globex, suppressed by min_result 10 (unless its noise is 8 or more). Nothing
/// party-specific may leave a node but its masked partial and its public terms.
#[test]
fn attack_aggregate_one_group_does_not_give_a_partners_count() {
    let c = consortium();
    let run = run_once(&c, "aggregate-one-group");
    // globex's chargebacks in "rare": 2, below min_result 10.
    let truth = CHARGEBACKS[1]
        .1
        .clone()
        .filter(|i| category(*i) == "rare")
        .count() as i64;
    assert_eq!(truth, 2);
    assert_eq!(
        run.job["result"]["groups"][0]["group"], "rare",
        "{}",
        run.job
    );
    let parties = run.job["result"]["parties"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let derived: Vec<(String, i64)> = parties
        .iter()
        .filter_map(|p| {
            let read = p["rows_read"].as_i64()?;
            let out = [
                "rows_excluded_consent",
                "rows_excluded_deleted",
                "rows_other",
            ]
            .iter()
            .map(|f| p[f].as_i64().unwrap_or(0))
            .sum::<i64>();
            Some((p["node"].as_str().unwrap_or("?").to_owned(), read - out))
        })
        .collect();
    assert!(
        derived.is_empty(),
        "the analyst derives each partner's exact count of the suppressed group 'rare' from job \
         status: {derived:?} (globex's true count: {truth})"
    );
    // Nor does the coordinator receive or store such a figure.
    let figures: Vec<String> = ["coordinator", "analyst"]
        .iter()
        .flat_map(|party| {
            run.views[*party].iter().filter_map(move |(path, values)| {
                let own = [
                    "rows_read",
                    "rows_excluded_consent",
                    "rows_excluded_deleted",
                    "rows_other",
                    "rows_rejected",
                ]
                .iter()
                .any(|f| path.ends_with(f));
                own.then(|| format!("{party}: {path} = {}", values.join(" | ")))
            })
        })
        .collect();
    assert!(
        figures.is_empty(),
        "a partner's own row counts leave its node:\n{}",
        figures.join("\n")
    );
}

/// Attack: overlap-sum's released `intersection` summed every group's count, suppressed groups
/// included, so total − shown = the suppressed group (exactly, in an exact job). Here "(other)"
/// holds 2 shared customers, below min_result 5.
#[test]
fn attack_suppressed_group_is_not_recomputed_from_an_overlap_sum_total() {
    let c = consortium();
    let run = run_once(&c, "overlap-sum");
    let result = &run.job["result"];
    let groups = result["groups"].as_array().unwrap();
    let other = groups.iter().find(|g| g["group"] == "(other)").unwrap();
    assert_eq!(other["suppressed"], true, "{}", run.job);
    let truth = GLOBEX_CUSTOMERS
        .filter(|i| ACME_CUSTOMERS.contains(i) && category(*i) == "rare")
        .count() as i64;
    assert_eq!(truth, 2);
    let shown: i64 = groups
        .iter()
        .filter(|g| g["suppressed"] == false)
        .map(|g| g["values"]["count"].as_i64().unwrap())
        .sum();
    let derived = result["intersection"].as_i64().map(|total| total - shown);
    assert_ne!(
        derived,
        Some(truth),
        "the analyst recomputes the suppressed group: intersection {} − shown {shown} = {truth}",
        result["intersection"]
    );
    // Nor does the coordinator receive a total that does it.
    let totals: Vec<i64> = [
        "REPORT/report.psi.sum.intersection",
        "REPORT/report.psi.intersection",
    ]
    .iter()
    .flat_map(|p| numbers(&run.views["coordinator"], p))
    .collect();
    for t in totals {
        assert_ne!(
            t - shown,
            truth,
            "the coordinator receives a total ({t}) that recomputes the suppressed group"
        );
    }
}

/// Runs `scenario`, whose agreements withhold its true count (80), and checks that the job
/// shows no count and that no figure equal to it reaches the coordinator or the analyst.
fn assert_the_withheld_count_reaches_neither_coordinator_nor_analyst(scenario: &str) {
    let c = consortium();
    let run = run_once(&c, scenario);
    assert!(run.job["intersection"].is_null(), "{}", run.job);
    let found = mentions(&run.views, 80);
    assert!(
        found.is_empty(),
        "the withheld count (80) reaches the coordinator or the analyst:\n{}",
        found.join("\n")
    );
}

/// Attack: `match` reported `matched_rows` (and the peer, not knowing the threshold, its
/// count) even when the count is withheld: here acme's agreement withholds counts below 1000
/// and the true count is 80. No figure equal to it may reach the coordinator or the analyst.
#[test]
fn attack_match_reports_no_rows_when_the_count_is_withheld() {
    assert_the_withheld_count_reaches_neither_coordinator_nor_analyst("match-withheld");
}

/// Attack (thresholds in the hello): globex's agreement withholds overlap counts below 1000;
/// acme must withhold the count itself, not trust the coordinator to drop it.
#[test]
fn attack_a_count_below_the_partners_threshold_never_reaches_the_coordinator() {
    assert_the_withheld_count_reaches_neither_coordinator_nor_analyst("overlap-withheld");
}

/// Sets finished jobs back to pending in the coordinator's database, as a coordinator that
/// replays them would (the coordinator must be stopped).
fn reset_to_pending(db: &Path, jobs: &[&str]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    for job in jobs {
        conn.execute(
            "UPDATE jobs SET state = 1, reason = 'replayed' WHERE job_id = ?1",
            [job],
        )
        .unwrap();
        for table in [
            "job_results",
            "aggregate_result_pages",
            "aggregate_results",
            "job_leases",
        ] {
            conn.execute(&format!("DELETE FROM {table} WHERE job_id = ?1"), [job])
                .unwrap();
        }
    }
}

/// `cleanroom-node forget` of one customer's email on one dataset.
fn forget(c: &Consortium, node: &str, dataset: &str, customer: u64) {
    c.forget_ok(node, dataset, &format!("email={}", email(customer)));
}

/// Attack: a repeated offer of the same job id and spec reused the ledger's noise draw over
/// data that had changed since (here a `forget`), so a coordinator that replays a job gets
/// T₂ + N beside T₁ + N: the exact difference, without any ε charged. Replayed here for an
/// overlap with ε at one node only, an overlap-sum with ε at the key holder only (a node whose
/// own entry sets ε returns the value it stored for the job, so the leak shows where a node
/// without ε releases over its peer's reused noise) and an aggregate: after the forget, every
/// figure the coordinator receives for the replayed job must equal the one released before (or
/// the node must refuse the replay).
#[test]
fn attack_a_replayed_job_never_pairs_old_noise_with_new_data() {
    let mut c = consortium();
    let jobs: Vec<(&str, Run)> = [
        "overlap-noised-one-side",
        "overlap-sum-noised-one-side",
        "aggregate-noised",
    ]
    .into_iter()
    .map(|s| (s, run_once(&c, s)))
    .collect();

    // The subjects ask to be forgotten: a shared customer at globex, a chargeback at acme.
    forget(&c, "globex", "customers-dp1", NEIGHBOUR);
    forget(&c, "acme", "chargebacks-dp", NEIGHBOUR_CHARGEBACK);

    // A coordinator that replays the three jobs: same ids, same specs.
    c.coordinator.as_mut().unwrap().stop();
    let ids: Vec<String> = jobs
        .iter()
        .map(|(_, r)| r.job["job_id"].as_str().unwrap().to_owned())
        .collect();
    reset_to_pending(
        &c.path().join("coordinator.db"),
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    c.restart_coordinator("coordinator-replay");
    let replays: Vec<Value> = ids
        .iter()
        .map(|id| c.wait_job(id, Duration::from_secs(150)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let received = read_transcript(&c.transcript_of("coordinator-replay").unwrap());

    let mut problems = Vec::new();
    for (((scenario, first), id), replay) in jobs.iter().zip(&ids).zip(&replays) {
        let mut view = View::new();
        add_frames(&mut view, received.iter().filter(|r| &r.job_id == id));
        dump(
            scenario,
            "replay-coordinator",
            &Views::from([("coordinator".into(), view.clone())]),
        );
        eprintln!(
            "{scenario}: replay ended {} ({})",
            replay["state"], replay["reason"]
        );
        // The released figures of the first run, and those received or stored for the replay.
        let (before, after): (Vec<i64>, Vec<i64>) = match *scenario {
            "overlap-noised-one-side" => (
                vec![first.job["intersection"].as_i64().unwrap()],
                numbers(&view, "REPORT/report.psi.intersection"),
            ),
            "overlap-sum-noised-one-side" => (
                numbers(
                    &first.views["coordinator"],
                    "REPORT/report.psi.sum.groups[].values[]",
                ),
                numbers(&view, "REPORT/report.psi.sum.groups[].values[]"),
            ),
            _ => {
                let stored = |job: &Value| -> Vec<i64> {
                    let mut v: Vec<i64> = job["result"]["groups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|g| g["values"].as_object().cloned().unwrap_or_default())
                        .filter_map(|(_, v)| v.as_i64())
                        .collect();
                    v.sort();
                    v
                };
                (stored(&first.job), stored(replay))
            }
        };
        let released_again = !after.is_empty();
        let mut expected = before.clone();
        if *scenario == "overlap-noised-one-side" {
            // Both nodes report the one released count.
            expected = after.iter().map(|_| before[0]).collect();
        }
        if released_again && after != expected {
            problems.push(format!(
                "{scenario}: the replay of job {id} after the forget gave the coordinator \
                 {after:?} where the first run released {before:?}; the difference is exact"
            ));
        }
    }
    assert_no_problems(&problems);
}
