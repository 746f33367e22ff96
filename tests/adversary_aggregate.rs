//! End to end with a hostile party in `aggregate` jobs (N = 3, additive secret sharing): node
//! "mallory" has a valid certificate and aggregate agreements with acme and globex, joins an
//! aggregate with them and then sends both honest nodes, on the data plane, something an honest
//! party never would — a hello for another spec, a seed of the wrong length, absurd terms, a
//! second hello, a frame of another kind or phase, undecodable, oversized or truncated frames,
//! no hello at all, a hello replayed from an earlier job — or sends the coordinator a bad
//! partial sum. For every case the job fails with the violation named, the honest nodes audit a
//! `JobError` carrying it (data-plane cases), nothing is released (no aggregate result), both
//! stay up and serve a normal aggregate job (acme, globex, initech) next, and acme's memory
//! stays bounded.
//!
//! All cases run against one consortium, one after another, so the suite stays fast. The one
//! case that must wait out the honest nodes' 60 s peer deadline (node "trudy": a verbatim replay
//! of its hello from an earlier job to acme, a hello naming another job to globex — frames a
//! node cannot tell from an honest peer's late connection for a job already over, so they end
//! nothing by themselves) runs in the background meanwhile.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cleanroom_e2e::fake_node::{self, FakeParty};
use cleanroom_e2e::{Consortium, aggregate_job};
use cleanroom_proto::MAX_FRAME_LEN;
use cleanroom_proto::v1::{AggregateHello, Envelope, Phase, PointBatch, envelope::Body};
use serde_json::Value;

/// How far acme's peak resident memory may rise over the attacks, above its peak after an
/// honest job (the test prints both). The attacks' own data is at most a few MiB (the largest
/// is a hello of almost 1 MiB). A growth, not a total: the total holds the debug binary's code
/// pages, which grew to about 60 MiB as DataFusion and Ballista were linked in.
const RSS_GROWTH_CAP_KIB: u64 = 32 * 1024;

/// The honest parties of every hostile job.
const HONEST: [&str; 2] = ["acme", "globex"];

/// What mallory sends both honest parties on the data plane, instead of an honest hello.
#[derive(Clone, Debug)]
enum Attack {
    /// A hello whose spec digest is not the job's.
    WrongSpecDigest,
    /// A hello of almost 1 MiB (the frame cap): its spec digest is that long.
    HelloOfAlmostAMebibyte,
    /// A seed of 31 bytes.
    SeedOfWrongLength,
    /// Terms with ε = NaN.
    EpsilonNan,
    /// Terms with ε = −1.
    EpsilonNegative,
    /// Terms with ε = +∞.
    EpsilonInfinite,
    /// Terms with as many colluders as parties (3).
    TooManyColluders,
    /// Terms with one sensitivity for a job of two columns (count and amount).
    SensitivitiesOfWrongCount,
    /// Terms with 100,000 sensitivities for a job of two columns.
    HundredThousandSensitivities,
    /// Terms with a sensitivity no `i64` clipping bound gives (2^64 − 1).
    SensitivityTooLarge,
    /// A hello that says it is from globex.
    ClaimsToBeAnotherParty,
    /// Two hellos on the stream.
    SecondHello,
    /// A PSI point batch (phase `PSI_BLINDED`) as the first frame.
    PointBatchFirst,
    /// A correct hello stamped with the PSI size phase.
    HelloInAnotherPhase,
    /// A frame whose body is not a protobuf envelope.
    UndecodableFrame,
    /// A length prefix of 4 GiB − 1.
    OversizedLengthPrefix,
    /// A length prefix announcing 100 bytes, 10 bytes, and the end of the stream.
    TruncatedFrame,
    /// A connection with a stream on which nothing is ever written.
    Stall,
    /// mallory's hello from an earlier job, re-stamped with this job's id.
    ReplayRestamped(Box<Envelope>),
}

impl Attack {
    /// What each honest node's reason must contain (lowercase).
    fn expect(&self) -> String {
        match self {
            Attack::WrongSpecDigest => "the peer runs a different job spec".into(),
            Attack::HelloOfAlmostAMebibyte => "the peer runs a different job spec".into(),
            Attack::SeedOfWrongLength => "a share seed is 32 bytes, got 31".into(),
            Attack::EpsilonNan => "hello declares epsilon nan".into(),
            Attack::EpsilonNegative => "hello declares epsilon -1".into(),
            Attack::EpsilonInfinite => "hello declares epsilon inf".into(),
            Attack::TooManyColluders => "hello declares 3 colluders among 3 parties".into(),
            Attack::SensitivitiesOfWrongCount => {
                "hello declares 1 column sensitivities for a job of 2 columns".into()
            }
            Attack::HundredThousandSensitivities => {
                "hello declares 100000 column sensitivities for a job of 2 columns".into()
            }
            Attack::SensitivityTooLarge => {
                "hello declares a column sensitivity of 18446744073709551615".into()
            }
            Attack::ClaimsToBeAnotherParty => {
                "hello claims to be from 'globex' on a connection certified as 'mallory'".into()
            }
            Attack::SecondHello => "sent more than its hello".into(),
            Attack::PointBatchFirst => {
                "connection was refused: first frame (phase 11) is not a psihello".into()
            }
            Attack::HelloInAnotherPhase => {
                "connection was refused: first frame (phase 10) is not a psihello".into()
            }
            Attack::UndecodableFrame => {
                "connection was refused: unreadable hello: malformed".into()
            }
            Attack::OversizedLengthPrefix => {
                format!(
                    "unreadable hello: frame of 4294967295 bytes exceeds the {MAX_FRAME_LEN}-byte cap"
                )
            }
            Attack::TruncatedFrame => "unreadable hello: stream ended inside a frame".into(),
            Attack::Stall => "connection was refused: opened no stream within 10s".into(),
            Attack::ReplayRestamped(_) => "the peer runs a different job spec".into(),
        }
    }

    /// The variant's name, without a recording's contents.
    fn label(&self) -> String {
        let debug = format!("{self:?}");
        debug.split('(').next().unwrap_or_default().to_owned()
    }

    /// The frames (or raw bytes) mallory sends `party`'s peers, and whether it ends the stream.
    fn bytes(&self, party: &FakeParty) -> (Vec<u8>, bool) {
        let frame = |env: &Envelope| cleanroom_proto::encode_frame(env).unwrap();
        let with_terms = |edit: fn(&mut cleanroom_proto::v1::AggregateTerms)| {
            let mut hello = party.hello();
            edit(hello.terms.as_mut().unwrap());
            frame(&party.envelope(hello))
        };
        let bytes = match self {
            Attack::WrongSpecDigest => frame(&party.envelope(AggregateHello {
                spec_digest: vec![7; 32],
                ..party.hello()
            })),
            Attack::HelloOfAlmostAMebibyte => frame(&party.envelope(AggregateHello {
                spec_digest: vec![7; MAX_FRAME_LEN - 1024],
                ..party.hello()
            })),
            Attack::SeedOfWrongLength => frame(&party.envelope(AggregateHello {
                share_seed: vec![7; 31],
                ..party.hello()
            })),
            Attack::EpsilonNan => with_terms(|t| t.epsilon = f64::NAN),
            Attack::EpsilonNegative => with_terms(|t| t.epsilon = -1.0),
            Attack::EpsilonInfinite => with_terms(|t| t.epsilon = f64::INFINITY),
            Attack::TooManyColluders => with_terms(|t| t.max_colluders = 3),
            Attack::SensitivitiesOfWrongCount => with_terms(|t| t.sensitivities = vec![1]),
            Attack::HundredThousandSensitivities => {
                with_terms(|t| t.sensitivities = vec![u64::MAX; 100_000])
            }
            Attack::SensitivityTooLarge => with_terms(|t| t.sensitivities[1] = u64::MAX),
            Attack::ClaimsToBeAnotherParty => frame(&party.envelope(AggregateHello {
                sender: "globex".into(),
                ..party.hello()
            })),
            Attack::SecondHello => {
                let mut bytes = frame(&party.envelope(party.hello()));
                bytes.extend(frame(&party.envelope(party.hello())));
                bytes
            }
            Attack::PointBatchFirst => frame(&Envelope {
                job_id: party.job_id.clone(),
                phase: Phase::PsiBlinded as i32,
                body: Some(Body::Points(PointBatch {
                    seq: 0,
                    points: fake_node::BASEPOINT.to_vec(),
                })),
            }),
            Attack::HelloInAnotherPhase => {
                let mut env = party.envelope(party.hello());
                env.phase = Phase::PsiSize as i32;
                frame(&env)
            }
            Attack::UndecodableFrame => {
                let mut bytes = 8u32.to_be_bytes().to_vec();
                bytes.extend_from_slice(&[0xff; 8]);
                bytes
            }
            Attack::OversizedLengthPrefix => {
                let mut bytes = u32::MAX.to_be_bytes().to_vec();
                // A body would follow; the reader must refuse before waiting for it.
                bytes.extend_from_slice(&[0; 1024]);
                return (bytes, false);
            }
            Attack::TruncatedFrame => {
                let mut bytes = 100u32.to_be_bytes().to_vec();
                bytes.extend_from_slice(&[7; 10]);
                bytes
            }
            Attack::Stall => return (Vec::new(), false),
            Attack::ReplayRestamped(recorded) => {
                let mut env = (**recorded).clone();
                env.job_id = party.job_id.clone();
                frame(&env)
            }
        };
        (bytes, true)
    }
}

/// What mallory reports to the coordinator after an honest exchange of hellos.
#[derive(Clone, Copy, Debug)]
enum BadPartial {
    /// Batch 1 first.
    WrongSequence,
    /// One cell fewer than the job has, and an outcome claiming them all.
    TooFewCells,
    /// One cell more than the job has.
    TooManyCells,
    /// A length prefix of 4 GiB − 1 on the job's control stream.
    OversizedFrame,
    /// A failure report whose reason is almost 1 MiB of text with terminal escapes in it.
    HugeFailureReason,
}

impl BadPartial {
    /// What the coordinator's reason must contain (lowercase), for a job of `cells` cells.
    fn expect(self, cells: usize) -> String {
        match self {
            BadPartial::WrongSequence => {
                "node 'mallory' sent partial batch 1 where 0 was due".into()
            }
            BadPartial::TooFewCells => {
                format!("node 'mallory' sent {} of {cells} partial cells", cells - 1)
            }
            BadPartial::TooManyCells => format!(
                "node 'mallory' sent a bad partial (after 0 cells): received {} cells, the vector has {cells}",
                cells + 1
            ),
            BadPartial::OversizedFrame => format!(
                "node 'mallory' sent an unreadable frame: frame of 4294967295 bytes exceeds the {MAX_FRAME_LEN}-byte cap"
            ),
            // Cut to 4 KiB, the escape made inert.
            BadPartial::HugeFailureReason => "mallory: hostile \\u{1b}[2jxxx".into(),
        }
    }
}

/// A node config with the synthetic `chargebacks` dataset of `data_of` and an aggregate
/// agreement (exact totals) with every one of `partners` but itself.
fn write_config(c: &Consortium, name: &str, data_of: &str, partners: &[&str]) {
    let mut cfg = format!(
        "[[dataset]]\nname = \"chargebacks\"\npath = \"data/{data_of}-chargebacks.csv\"\n\n\
         [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 10000000\n\n"
    );
    for other in partners.iter().filter(|p| **p != name) {
        cfg.push_str(&format!(
            "[[agreement]]\npartner = \"{other}\"\npurposes = [\"fraud-benchmark\"]\n\n\
             [[agreement.allow]]\ncomputation = \"aggregate\"\ndataset = \"chargebacks\"\n\
             group_by = [\"category\"]\nvalue_columns = [{{ column = \"amount\", min = 0, max = 200000 }}]\n\
             min_result = 1\n\n"
        ));
    }
    c.write_node_toml(name, &cfg);
}

fn submit_args(parties: &str) -> Vec<&str> {
    let mut args = aggregate_job(parties, "electronics,fashion,home,grocery,luxury").to_vec();
    args.push("--count");
    args
}

fn aggregate(c: &Consortium, parties: &str) -> Value {
    c.submit(&submit_args(parties)).0
}

fn aggregate_nowait(c: &Consortium, parties: &str) -> String {
    c.submit_nowait(&submit_args(parties))
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// Plays mallory for one job: joins it, sends both honest parties what `attack` says, and
/// waits for the coordinator to end the job.
async fn mallory(dir: PathBuf, coordinator: SocketAddr, attack: Attack) {
    let mut party = fake_node::join_next_aggregate(&dir, coordinator, "mallory").await;
    let (bytes, finish) = attack.bytes(&party);
    for peer in HONEST {
        party.send_raw_to(peer, &bytes, finish).await;
    }
    party.wait_for_the_end(Duration::from_secs(90)).await;
}

/// Plays `name` for one job: sends both honest parties a correct hello, waits for theirs, then
/// reports `bad` to the coordinator. Returns the hello it sent acme (material for replays).
async fn bad_partial(
    dir: PathBuf,
    coordinator: SocketAddr,
    name: &str,
    bad: BadPartial,
) -> Envelope {
    let mut party = fake_node::join_next_aggregate(&dir, coordinator, name).await;
    let to_acme = party.envelope(party.hello());
    party.send_to("acme", std::slice::from_ref(&to_acme)).await;
    let to_globex = party.envelope(party.hello());
    party.send_to("globex", &[to_globex]).await;
    assert!(
        party.wait_for_hellos(2, Duration::from_secs(30)).await,
        "the honest parties sent no hellos"
    );
    let cells = party.cells();
    match bad {
        BadPartial::WrongSequence => party.send_partial(1, &vec![0; cells]).await,
        BadPartial::TooFewCells => {
            party.send_partial(0, &vec![0; cells - 1]).await;
            party.send_outcome(cells as u64).await;
        }
        BadPartial::TooManyCells => party.send_partial(0, &vec![0; cells + 1]).await,
        BadPartial::OversizedFrame => {
            party.send_control_raw(&u32::MAX.to_be_bytes()).await;
            party.send_control_raw(&[0; 1024]).await;
        }
        BadPartial::HugeFailureReason => {
            let reason = format!("hostile \u{1b}[2J{}", "x".repeat(MAX_FRAME_LEN - 2048));
            let report = cleanroom_proto::v1::Report {
                outcome: Some(cleanroom_proto::v1::report::Outcome::Failure(reason)),
                signed_head: None,
            };
            party
                .send_control(Phase::Report, Body::Report(report))
                .await;
        }
    }
    party.wait_for_the_end(Duration::from_secs(60)).await;
    to_acme
}

#[test]
fn every_bad_message_of_an_aggregate_party_ends_the_job_with_a_named_error_and_nothing_is_released()
{
    let everyone = ["acme", "globex", "initech", "mallory", "trudy"];
    let (mut c, _) = Consortium::with_coordinator("acme,globex,initech", 300, 0.3, 13);
    let coordinator = c.addr.unwrap();
    for name in everyone {
        c.issue_node(name);
    }
    for name in ["acme", "globex", "initech"] {
        write_config(&c, name, name, &everyone);
        c.start_node(name);
    }
    c.wait_connected(&["acme", "globex", "initech"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acme_pid = c.node("acme").pid();
    let honest_job = aggregate(&c, "acme,globex,initech");
    assert_eq!(honest_job["state"], "succeeded", "{honest_job}");
    let honest_peak = peak_rss_kib(acme_pid);
    let t_all = Instant::now();
    let mut report = Vec::new();

    // The next honest job after a hostile one: it succeeds, with the first job's totals.
    let next_job_succeeds = |c: &Consortium, label: &str| {
        let next = aggregate(c, "acme,globex,initech");
        assert_eq!(next["state"], "succeeded", "{label}: the next job: {next}");
        assert_eq!(
            next["result"]["groups"], honest_job["result"]["groups"],
            "{label}: the next job's totals"
        );
    };
    let still_up = |c: &mut Consortium, label: &str| {
        for name in HONEST {
            let p = c.nodes.iter_mut().find(|p| p.name == name).unwrap();
            assert!(p.is_running(), "{label}: {name} died");
        }
    };

    // Bad partials to the coordinator, after a correct exchange of hellos. trudy plays the first
    // one, to record a hello of its own for the background replay below; mallory's recorded
    // hellos are replayed (re-stamped) later.
    let mut recorded: Vec<(&str, String, Envelope)> = Vec::new();
    for (player, bad) in [
        ("trudy", BadPartial::WrongSequence),
        ("mallory", BadPartial::TooFewCells),
        ("mallory", BadPartial::TooManyCells),
        ("mallory", BadPartial::OversizedFrame),
        ("mallory", BadPartial::HugeFailureReason),
    ] {
        let label = format!("{bad:?}");
        let t0 = Instant::now();
        let evil = rt.spawn(bad_partial(c.path().to_owned(), coordinator, player, bad));
        c.wait_connected(&[player]);
        let job = aggregate(&c, &format!("acme,globex,{player}"));
        let took = t0.elapsed();
        let cells = 6 * 2;
        let expect = bad.expect(cells).replace("mallory", player);
        assert_eq!(job["state"], "failed", "{label}: {job}");
        let reason = job["reason"].as_str().unwrap();
        assert!(
            reason.to_lowercase().contains(&expect) && reason.contains("no partial result"),
            "{label}: the reason names the violation ({expect}): {reason}"
        );
        assert!(job["result"].is_null(), "{label}: released {job}");
        assert!(
            !reason.contains('\u{1b}') && reason.len() < 8 * 1024,
            "{label}: a node's text reaches the analyst bounded and inert"
        );
        let hello = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), evil)
                .await
                .unwrap()
                .unwrap()
        });
        recorded.push((player, job["job_id"].as_str().unwrap().to_owned(), hello));
        still_up(&mut c, &label);
        next_job_succeeds(&c, &label);
        let shown: String = reason.chars().take(160).collect();
        report.push(format!(
            "partial {label}: failed after {took:.1?} with \"{shown}\" ({} bytes); no result; next job succeeded",
            reason.len()
        ));
        eprintln!("{}", report.last().unwrap());
    }
    let recording_of = |name: &str| {
        recorded
            .iter()
            .find(|(player, _, _)| *player == name)
            .map(|(_, job, hello)| (job.clone(), hello.clone()))
            .unwrap()
    };
    let (old_job, trudys) = recording_of("trudy");
    let (_, mallorys) = recording_of("mallory");

    // In the background: trudy replays its recorded hello verbatim (the old job's id) to acme
    // and sends globex a hello naming another job. Neither frame gets to this job: the honest
    // nodes refuse both connections and go on waiting for trudy's real one, until their 60 s
    // peer deadline.
    let replay_t0 = Instant::now();
    let replay = {
        let dir = c.path().to_owned();
        rt.spawn(async move {
            let mut party = fake_node::join_next_aggregate(&dir, coordinator, "trudy").await;
            party.send_to("acme", &[trudys]).await;
            let mut other = party.envelope(party.hello());
            other.job_id = "job-of-someone-else".into();
            party.send_to("globex", &[other]).await;
            party.wait_for_the_end(Duration::from_secs(120)).await;
        })
    };
    c.wait_connected(&["trudy"]);
    let replay_job = aggregate_nowait(&c, "acme,globex,trudy");

    let attacks = vec![
        Attack::WrongSpecDigest,
        Attack::HelloOfAlmostAMebibyte,
        Attack::SeedOfWrongLength,
        Attack::EpsilonNan,
        Attack::EpsilonNegative,
        Attack::EpsilonInfinite,
        Attack::TooManyColluders,
        Attack::SensitivitiesOfWrongCount,
        Attack::HundredThousandSensitivities,
        Attack::SensitivityTooLarge,
        Attack::ClaimsToBeAnotherParty,
        Attack::SecondHello,
        Attack::PointBatchFirst,
        Attack::HelloInAnotherPhase,
        Attack::UndecodableFrame,
        Attack::OversizedLengthPrefix,
        Attack::TruncatedFrame,
        Attack::Stall,
        Attack::ReplayRestamped(Box::new(mallorys)),
    ];
    for attack in attacks {
        let label = attack.label();
        let expect = attack.expect();
        let t0 = Instant::now();
        let evil = rt.spawn(mallory(c.path().to_owned(), coordinator, attack));
        c.wait_connected(&["mallory"]);
        let job = aggregate(&c, "acme,globex,mallory");
        let took = t0.elapsed();
        assert_eq!(job["state"], "failed", "{label}: {job}");
        let reason = job["reason"].as_str().unwrap();
        let lower = reason.to_lowercase();
        assert!(
            lower.contains("mallory") && lower.contains(&expect),
            "{label}: the reason names the violation ({expect}): {reason}"
        );
        assert!(job["result"].is_null(), "{label}: released {job}");
        let job_id = job["job_id"].as_str().unwrap();
        // Every honest node audits the job's end. Each sees the bad hello, but the first to
        // report it makes the coordinator stop the job at the other, which may then end it on
        // that stop before it has read the hello: its audit then says so. At least one names
        // the violation (and the coordinator's reason above names it).
        let mut named = 0;
        for name in HONEST {
            let audited = c
                .audited_error(name, job_id)
                .unwrap_or_else(|| panic!("{label}: {name} audited no JobError for {job_id}"));
            let lower = audited.to_lowercase();
            if lower.contains(&expect) {
                named += 1;
            } else {
                assert!(
                    lower.contains("the coordinator stopped the job"),
                    "{label}: {name}'s audited reason names the violation ({expect}) or the \
                     coordinator's stop: {audited}"
                );
            }
        }
        assert!(named >= 1, "{label}: no honest node audited the violation");
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(30), evil).await;
        });
        still_up(&mut c, &label);
        next_job_succeeds(&c, &label);
        let rss = peak_rss_kib(acme_pid);
        report.push(format!(
            "{label}: failed after {took:.1?} with \"{reason}\"; audited by acme and globex; next job succeeded; acme VmHWM {rss} KiB"
        ));
        eprintln!("{}", report.last().unwrap());
    }

    // The background replay: failed at the peer deadline, naming trudy, nothing released.
    let job = c.wait_job(&replay_job, Duration::from_secs(120));
    let took = replay_t0.elapsed();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(30), replay).await;
    });
    assert_eq!(job["state"], "failed", "replay: {job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("party 'trudy' did not connect in time"),
        "replay: {reason}"
    );
    assert!(job["result"].is_null(), "replay: released {job}");
    for name in HONEST {
        let audited = c
            .audited_error(name, &replay_job)
            .unwrap_or_else(|| panic!("replay: {name} audited no JobError"));
        assert!(audited.contains("did not connect in time"), "{audited}");
    }
    for (name, refused_job) in [
        ("acme", old_job.as_str()),
        ("globex", "job-of-someone-else"),
    ] {
        let log = c.node(name).log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("refused data-plane connection") && l.contains(refused_job)),
            "{name} logged no refusal of trudy's hello for job {refused_job}"
        );
    }
    next_job_succeeds(&c, "replay");
    report.push(format!(
        "replay (verbatim to acme, another job's id to globex): failed after {took:.1?} with \"{reason}\"; audited; next job succeeded"
    ));
    eprintln!("{}", report.last().unwrap());

    let rss = peak_rss_kib(acme_pid);
    let growth = rss.saturating_sub(honest_peak);
    eprintln!(
        "{} bad inputs tried in {:.0?}, all refused with a named error; acme peak RSS {rss} KiB, \
         {growth} KiB over its {honest_peak} KiB after the honest job (cap {RSS_GROWTH_CAP_KIB} KiB)",
        report.len() + 1,
        t_all.elapsed()
    );
    assert!(
        growth < RSS_GROWTH_CAP_KIB,
        "acme's peak RSS grew {growth} KiB over the attacks, over {RSS_GROWTH_CAP_KIB} KiB"
    );
    for name in HONEST {
        let log = c.node(name).log_text();
        assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
    }
    let log = c.coordinator.as_ref().unwrap().log_text();
    assert!(
        !log.contains("panicked"),
        "the coordinator panicked:\n{log}"
    );
}
