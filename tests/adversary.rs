//! End to end with a hostile peer: node "mallory" has a valid certificate and an agreement with
//! acme, joins a job with acme and then sends, at each phase, something an honest node never
//! would — poisoned points, malformed frames, frames for another job or phase, batches of the
//! wrong length, a flood of points, and replays of an earlier job's frames; also after a valid
//! blinded phase (while returning acme's points) and after an honest exchange (the count). For every case acme
//! must end the job with a named error (the analyst sees it), audit a `JobError` carrying it,
//! stay up, serve an honest job next, and keep its memory bounded.
//!
//! All cases run against one consortium, one after another, so the suite stays fast.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cleanroom_circuits::{ItemSet, JobKey, blind_items};
use cleanroom_e2e::ballista::Ballista;
use cleanroom_e2e::fake_node::{self, BASEPOINT, FakeJob};
use cleanroom_e2e::{Consortium, open_agreement, overlap_between, reason_of};
use cleanroom_node::data::dataset::KeySpec;
use cleanroom_proto::MAX_FRAME_LEN;
use cleanroom_proto::v1::{BatchEnd, Envelope, Phase, PointBatch, PsiOutcome, envelope::Body};

/// How far acme's peak resident memory may rise over the attacks, above its peak after an
/// honest job. The attacks' own data is a few MiB (the test prints the figures); the flood case
/// sends 32 MiB, and without the reader's budget one could make it buffer up to 10^8 points
/// (3.2 GB). A growth, not a total: the total holds the debug binary's code pages, which grew
/// from about 20 to about 59 MiB as DataFusion and Ballista were linked in.
const RSS_GROWTH_CAP_KIB: u64 = 32 * 1024;

/// The points mallory declares in every attack's hello.
const DECLARED: u64 = 4;

/// What mallory does after its (valid) hello.
#[derive(Clone, Debug)]
enum Attack {
    /// 32 bytes of 0xff per point: not a canonical field element, does not decode.
    UndecodablePoints,
    /// The identity point (all zeros), which a blinded point can never be.
    IdentityPoints,
    /// Twice as many (valid) points as declared.
    MorePointsThanDeclared,
    /// A length prefix announcing 100 bytes, 10 bytes, and the end of the stream.
    TruncatedFrame,
    /// A length prefix of 4 GiB − 1.
    OversizedLengthPrefix,
    /// A frame whose body is not a protobuf envelope.
    UndecodableEnvelope,
    /// An envelope whose only message is in a field this version does not know.
    UnknownMessageType,
    /// An end marker whose phase is a number no phase has.
    UnknownPhase,
    /// A point batch of 33 bytes.
    BatchNotWholePoints,
    /// A point batch with no points.
    EmptyBatch,
    /// All declared points, then an end marker announcing one fewer.
    EndTotalDisagrees,
    /// Half the declared points, and an end marker that agrees with what was sent.
    EndBeforeAllDeclared,
    /// A batch numbered 3 first.
    BatchOutOfSequence,
    /// A batch stamped with another job's id.
    AnotherJobsId,
    /// Double-blinded points before any blinded one.
    DoubleBlindedFirst,
    /// A second hello.
    SecondHello,
    /// The final count before any point.
    DoneFirst,
    /// Point batches of almost 1 MiB each, 32 of them, against a declaration of 4 points.
    PointFlood,
    // After a valid blinded phase (4 distinct valid points and their end marker), in the phase
    // of acme's points returned double-blinded:
    /// A returned batch of 33 bytes.
    ReturnedNotWholePoints,
    /// An empty returned batch.
    ReturnedEmptyBatch,
    /// 2 returned points and an end marker saying 2 (acme sent about 300).
    ReturnedEndTotalDisagrees,
    /// Returned batch number 1 first.
    ReturnedOutOfSequence,
    /// A second blinded end marker. (More blinded points after the end are cut off by the
    /// reader's budget, as in `MorePointsThanDeclared`.)
    BlindedAfterItsEnd,
    /// The final count before any returned point.
    DoneBeforeReturning,
    // After an honest exchange (mallory holds acme's emails), as the last frame:
    /// The true count plus one.
    DoneWrongCount,
    /// A point batch instead of the count.
    DoneAsPointBatch,
    /// A hello instead of the count.
    DoneAsHello,
    /// The frames an honest mallory sent in an earlier, completed job, replayed verbatim.
    ReplayVerbatim(Vec<Envelope>),
    /// The same frames re-stamped with the new job's id.
    ReplayRestamped(Vec<Envelope>),
}

impl Attack {
    /// What acme's reason must contain (lowercase).
    fn expect(&self) -> String {
        match self {
            Attack::UndecodablePoints => "not a valid ristretto255 encoding".into(),
            Attack::IdentityPoints => "identity".into(),
            Attack::MorePointsThanDeclared => "sent more blinded points than the 4 it may".into(),
            Attack::TruncatedFrame => "stream ended inside a frame".into(),
            Attack::OversizedLengthPrefix => format!("exceeds the {MAX_FRAME_LEN}-byte cap"),
            Attack::UndecodableEnvelope => "malformed frame".into(),
            Attack::UnknownMessageType => "sent an empty frame in phase phase_psi_blinded".into(),
            Attack::UnknownPhase => "frame for phase 77 while in phase phase_psi_blinded".into(),
            Attack::BatchNotWholePoints => "batch of 33 bytes is not a whole number".into(),
            Attack::EmptyBatch => "sent an empty point batch".into(),
            Attack::EndTotalDisagrees => "declared 4 points, announced 3 at the end".into(),
            Attack::EndBeforeAllDeclared => "announced 2 at the end, and sent 2".into(),
            Attack::BatchOutOfSequence => "batch 3 out of order (expected 0)".into(),
            Attack::AnotherJobsId => "frame for job 'job-of-someone-else'".into(),
            Attack::DoubleBlindedFirst => {
                "frame for phase 12 while in phase phase_psi_blinded".into()
            }
            Attack::SecondHello => "frame for phase 10 while in phase phase_psi_blinded".into(),
            Attack::DoneFirst => "frame for phase 13 while in phase phase_psi_blinded".into(),
            Attack::PointFlood => "sent more blinded points than the 4 it may".into(),
            Attack::ReturnedNotWholePoints => "batch of 33 bytes is not a whole number".into(),
            Attack::ReturnedEmptyBatch => "sent an empty point batch".into(),
            Attack::ReturnedEndTotalDisagrees => {
                "the peer announced 2 returned and returned 2".into()
            }
            Attack::ReturnedOutOfSequence => "batch 1 out of order (expected 0)".into(),
            Attack::BlindedAfterItsEnd => {
                "frame for phase 11 while in phase phase_psi_double_blinded".into()
            }
            Attack::DoneBeforeReturning => {
                "frame for phase 13 while in phase phase_psi_double_blinded".into()
            }
            Attack::DoneWrongCount => "it counted 301 shared items, we counted 300".into(),
            Attack::DoneAsPointBatch => "sent a point batch in phase phase_psi_done".into(),
            Attack::DoneAsHello => "frame for phase 10 while in phase phase_psi_done".into(),
            Attack::ReplayVerbatim(_) => "on the stream of job".into(),
            Attack::ReplayRestamped(_) => "shared items, we counted 0".into(),
        }
    }

    /// The variant's name, without a recording's contents.
    fn label(&self) -> String {
        let debug = format!("{self:?}");
        debug.split('(').next().unwrap_or_default().to_owned()
    }

    /// Whether mallory runs the protocol honestly up to the last frame (with acme's emails).
    fn honest_until_done(&self) -> bool {
        matches!(
            self,
            Attack::DoneWrongCount | Attack::DoneAsPointBatch | Attack::DoneAsHello
        )
    }

    /// How many points mallory declares in its hello (when it does not run honestly).
    fn declared(&self) -> u64 {
        match self {
            Attack::ReplayVerbatim(frames) | Attack::ReplayRestamped(frames) => {
                match &frames[0].body {
                    Some(Body::PsiHello(h)) => h.set_size,
                    _ => panic!("a recording starts with the hello"),
                }
            }
            _ => DECLARED,
        }
    }

    async fn run(&self, job: &mut FakeJob, items: Option<ItemSet>) {
        let n = DECLARED as usize;
        let points = |p: Vec<u8>| Body::Points(PointBatch { seq: 0, points: p });
        match self {
            Attack::UndecodablePoints => job.send_blinded(vec![0xff; 32 * n], Some(DECLARED)).await,
            Attack::IdentityPoints => job.send_blinded(vec![0; 32 * n], Some(DECLARED)).await,
            Attack::MorePointsThanDeclared => {
                job.send_blinded(BASEPOINT.repeat(2 * n), Some(DECLARED))
                    .await;
            }
            Attack::TruncatedFrame => {
                let mut bytes = 100u32.to_be_bytes().to_vec();
                bytes.extend_from_slice(&[7; 10]);
                job.send_raw(&bytes).await;
                job.finish();
            }
            Attack::OversizedLengthPrefix => {
                job.send_raw(&u32::MAX.to_be_bytes()).await;
                // A body would follow; the reader must refuse before waiting for it.
                job.send_raw(&[0; 1024]).await;
            }
            Attack::UndecodableEnvelope => {
                let mut bytes = 8u32.to_be_bytes().to_vec();
                bytes.extend_from_slice(&[0xff; 8]);
                job.send_raw(&bytes).await;
            }
            Attack::UnknownMessageType => {
                // A valid envelope of this job and phase, plus field 99 (length-delimited,
                // tag 99 << 3 | 2 = 794 = varint 0x9a 0x06), which no message uses.
                let mut frame = cleanroom_proto::encode_frame(&Envelope {
                    job_id: job.job_id.clone(),
                    phase: Phase::PsiBlinded as i32,
                    body: None,
                })
                .unwrap();
                frame.extend_from_slice(&[0x9a, 0x06, 3, b'a', b'b', b'c']);
                let len = (frame.len() - 4) as u32;
                frame[..4].copy_from_slice(&len.to_be_bytes());
                job.send_raw(&frame).await;
            }
            Attack::UnknownPhase => {
                let env = Envelope {
                    job_id: job.job_id.clone(),
                    phase: 77,
                    body: Some(Body::BatchEnd(BatchEnd { total: DECLARED })),
                };
                job.send_envelope(env).await;
            }
            Attack::BatchNotWholePoints => job.send_blinded(vec![1; 33], None).await,
            Attack::EmptyBatch => job.send_blinded(Vec::new(), Some(0)).await,
            Attack::EndTotalDisagrees => {
                job.send_blinded(BASEPOINT.repeat(n), Some(DECLARED - 1))
                    .await;
            }
            Attack::EndBeforeAllDeclared => {
                job.send_blinded(BASEPOINT.repeat(n / 2), Some(DECLARED / 2))
                    .await;
            }
            Attack::BatchOutOfSequence => {
                let batch = PointBatch {
                    seq: 3,
                    points: BASEPOINT.repeat(n),
                };
                job.send(Phase::PsiBlinded, Body::Points(batch)).await;
            }
            Attack::AnotherJobsId => {
                let env = Envelope {
                    job_id: "job-of-someone-else".into(),
                    phase: Phase::PsiBlinded as i32,
                    body: Some(points(BASEPOINT.repeat(n))),
                };
                job.send_envelope(env).await;
            }
            Attack::DoubleBlindedFirst => {
                job.send(Phase::PsiDoubleBlinded, points(BASEPOINT.repeat(n)))
                    .await;
            }
            Attack::SecondHello => {
                let hello = job.sent[0].clone();
                job.send_envelope(hello).await;
            }
            Attack::DoneFirst => {
                job.send(Phase::PsiDone, Body::BatchEnd(BatchEnd { total: 1 }))
                    .await;
            }
            Attack::PointFlood => {
                // Under the frame cap with the envelope's few bytes of overhead.
                let per_frame = (MAX_FRAME_LEN - 1024) / 32;
                for seq in 0..32 {
                    let batch = PointBatch {
                        seq,
                        points: BASEPOINT.repeat(per_frame),
                    };
                    job.send(Phase::PsiBlinded, Body::Points(batch)).await;
                }
            }
            Attack::ReturnedNotWholePoints => {
                blinded_phase(job).await;
                job.send(Phase::PsiDoubleBlinded, points(vec![1; 33])).await;
            }
            Attack::ReturnedEmptyBatch => {
                blinded_phase(job).await;
                job.send(Phase::PsiDoubleBlinded, points(Vec::new())).await;
            }
            Attack::ReturnedEndTotalDisagrees => {
                let valid = blinded_phase(job).await;
                job.send(Phase::PsiDoubleBlinded, points(valid[..64].to_vec()))
                    .await;
                job.send(
                    Phase::PsiDoubleBlinded,
                    Body::BatchEnd(BatchEnd { total: 2 }),
                )
                .await;
            }
            Attack::ReturnedOutOfSequence => {
                let valid = blinded_phase(job).await;
                let batch = PointBatch {
                    seq: 1,
                    points: valid,
                };
                job.send(Phase::PsiDoubleBlinded, Body::Points(batch)).await;
            }
            Attack::BlindedAfterItsEnd => {
                blinded_phase(job).await;
                job.send(
                    Phase::PsiBlinded,
                    Body::BatchEnd(BatchEnd { total: DECLARED }),
                )
                .await;
            }
            Attack::DoneBeforeReturning => {
                blinded_phase(job).await;
                job.send(Phase::PsiDone, Body::BatchEnd(BatchEnd { total: 0 }))
                    .await;
            }
            Attack::DoneWrongCount | Attack::DoneAsPointBatch | Attack::DoneAsHello => {
                let items = items.expect("an honest run needs items");
                let hello = job.sent[0].clone();
                let attack = self.clone();
                let finale = move |job_id: &str, count: u64| {
                    let (phase, body) = match attack {
                        Attack::DoneWrongCount => (
                            Phase::PsiDone,
                            Body::BatchEnd(BatchEnd { total: count + 1 }),
                        ),
                        Attack::DoneAsPointBatch => (Phase::PsiDone, points(BASEPOINT.to_vec())),
                        _ => (Phase::PsiSize, hello.body.expect("hello")),
                    };
                    Envelope {
                        job_id: job_id.to_owned(),
                        phase: phase as i32,
                        body: Some(body),
                    }
                };
                // acme refuses the last frame, so the honest run ends in an error.
                let _ = job.run_honestly_then(items, "email", finale).await;
            }
            Attack::ReplayVerbatim(frames) => {
                // After the fresh hello: everything else exactly as recorded (old job id).
                for env in &frames[1..] {
                    job.send_envelope(env.clone()).await;
                }
            }
            Attack::ReplayRestamped(frames) => {
                for env in &frames[1..] {
                    let mut env = env.clone();
                    env.job_id = job.job_id.clone();
                    job.send_envelope(env).await;
                }
            }
        }
    }
}

/// A valid blinded phase: 4 distinct valid points (4 made-up items blinded under a fresh key)
/// and their end marker. Returns the points, valid material for later batches.
async fn blinded_phase(job: &mut FakeJob) -> Vec<u8> {
    let mut items = ItemSet::new();
    for item in [b"a", b"b", b"c", b"d"] {
        items.push(item).unwrap();
    }
    let valid = blind_items(&JobKey::generate(), "email", &items).concat();
    job.send_blinded(valid.clone(), Some(DECLARED)).await;
    valid
}

/// mallory's items for an honest run: the emails of `data/acme.csv` (its config says so), so
/// the count is not zero.
fn mallory_items(dir: &Path) -> ItemSet {
    let cfg = cleanroom_node::NodeConfig::load(dir.join("mallory.toml")).expect("mallory.toml");
    let keys = KeySpec::new(["email"]);
    cleanroom_node::data::dataset::load_keys(
        cfg.dataset("customers").expect("dataset"),
        &keys,
        1_000_000,
    )
    .expect("mallory's data")
    .items
}

/// Plays node "mallory" for one job: joins it as initiator, carries out `attack`, and keeps the
/// connection open until acme gives up on it.
async fn mallory(dir: PathBuf, coordinator: SocketAddr, attack: Attack) {
    let items = attack.honest_until_done().then(|| mallory_items(&dir));
    let declared = items
        .as_ref()
        .map_or_else(|| attack.declared(), |i| i.len() as u64);
    let mut job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", declared).await;
    attack.run(&mut job, items).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), job.conn.closed()).await;
}

/// Plays node "mallory" honestly for one job and returns the count and every frame it sent.
async fn honest_mallory(dir: PathBuf, coordinator: SocketAddr) -> (u64, Vec<Envelope>) {
    let items = mallory_items(&dir);
    let declared = items.len() as u64;
    let mut job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", declared).await;
    let count = job
        .run_honestly(items, "email")
        .await
        .expect("an honest run");
    job.report(PsiOutcome {
        intersection: count,
        own_set_size: declared,
        ..PsiOutcome::default()
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(30), job.conn.closed()).await;
    (count, job.sent)
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

#[test]
fn every_bad_message_at_every_phase_ends_the_job_with_a_named_error_and_the_node_keeps_serving() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.5, 5);
    let coordinator = c.addr.unwrap();
    acme_open_to_mallory(&mut c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acme_pid = c.node("acme").pid();

    // An honest job with mallory first: its frames are the material of the replays.
    let honest = rt.spawn(honest_mallory(c.path().to_owned(), coordinator));
    c.wait_connected(&["mallory"]);
    let (job, _) = c.submit(&overlap_between("mallory,acme"));
    assert_eq!(job["state"], "succeeded", "{job}");
    let (count, recording) = rt.block_on(honest).unwrap();
    assert!(count > 0, "the recorded job shares items");
    assert_eq!(job["intersection"], count, "{job}");
    let old_job = job["job_id"].as_str().unwrap().to_owned();
    assert!(recording.iter().all(|e| e.job_id == old_job));
    let honest_peak = peak_rss_kib(acme_pid);

    let attacks = vec![
        Attack::UndecodablePoints,
        Attack::IdentityPoints,
        Attack::MorePointsThanDeclared,
        Attack::TruncatedFrame,
        Attack::OversizedLengthPrefix,
        Attack::UndecodableEnvelope,
        Attack::UnknownMessageType,
        Attack::UnknownPhase,
        Attack::BatchNotWholePoints,
        Attack::EmptyBatch,
        Attack::EndTotalDisagrees,
        Attack::EndBeforeAllDeclared,
        Attack::BatchOutOfSequence,
        Attack::AnotherJobsId,
        Attack::DoubleBlindedFirst,
        Attack::SecondHello,
        Attack::DoneFirst,
        Attack::PointFlood,
        Attack::ReturnedNotWholePoints,
        Attack::ReturnedEmptyBatch,
        Attack::ReturnedEndTotalDisagrees,
        Attack::ReturnedOutOfSequence,
        Attack::BlindedAfterItsEnd,
        Attack::DoneBeforeReturning,
        Attack::DoneWrongCount,
        Attack::DoneAsPointBatch,
        Attack::DoneAsHello,
        Attack::ReplayVerbatim(recording.clone()),
        Attack::ReplayRestamped(recording),
    ];
    let mut report = Vec::new();
    for attack in attacks {
        report.push(refused(&mut c, &rt, coordinator, attack));
        eprintln!("{}", report.last().unwrap());
    }
    let rss = peak_rss_kib(acme_pid);
    let growth = rss.saturating_sub(honest_peak);
    eprintln!(
        "{} bad inputs tried, all refused with a named error; acme peak RSS {rss} KiB, \
         {growth} KiB over its {honest_peak} KiB after the honest job (cap {RSS_GROWTH_CAP_KIB} KiB)",
        report.len()
    );
    assert!(
        growth < RSS_GROWTH_CAP_KIB,
        "acme's peak RSS grew {growth} KiB over the attacks, over {RSS_GROWTH_CAP_KIB} KiB"
    );
    let log = c.node("acme").log_text();
    assert!(!log.contains("panicked"), "acme panicked:\n{log}");
}

/// acme (agreements with globex and mallory) and globex (with acme) running; mallory's
/// certificate issued and its config written, for the fake node.
fn acme_open_to_mallory(c: &mut Consortium) {
    for name in ["acme", "globex", "mallory"] {
        c.issue_node(name);
    }
    let acme_agreements = format!("{}{}", open_agreement("globex"), open_agreement("mallory"));
    c.write_node_config("acme", "acme", &acme_agreements);
    c.write_node_config("globex", "globex", &open_agreement("acme"));
    // Only read by the fake node, for its honest run: acme's own data, so every item is shared.
    c.write_node_config("mallory", "acme", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
}

/// Runs one attack by mallory on a job with acme: the job fails with a reason that names
/// mallory and the violation, acme audits it, stays up and serves globex's honest job next.
/// Returns the line for the report.
fn refused(
    c: &mut Consortium,
    rt: &tokio::runtime::Runtime,
    coordinator: SocketAddr,
    attack: Attack,
) -> String {
    let label = attack.label();
    let expect = attack.expect();
    let t0 = Instant::now();
    let evil = rt.spawn(mallory(c.path().to_owned(), coordinator, attack));
    c.wait_connected(&["mallory"]);
    let (job, _) = c.submit(&overlap_between("mallory,acme"));
    let took = t0.elapsed();
    assert_eq!(job["state"], "failed", "{label}: {job}");
    let reason = job["reason"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("mallory") && reason.contains(&expect),
        "{label}: the reason names the violation ({expect}): {reason}"
    );
    assert!(job["intersection"].is_null(), "{label}: {job}");
    let job_id = job["job_id"].as_str().unwrap();
    let audited = c
        .audited_error("acme", job_id)
        .unwrap_or_else(|| panic!("{label}: acme audited no JobError for {job_id}"));
    assert!(
        audited.to_lowercase().contains(&expect),
        "{label}: the audited reason names the violation ({expect}): {audited}"
    );
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(30), evil).await;
    });
    // acme is still up and serves an honest job.
    assert!(
        c.nodes
            .iter_mut()
            .find(|p| p.name == "acme")
            .unwrap()
            .is_running(),
        "{label}: acme died"
    );
    let (next, _) = c.submit(&overlap_between("globex,acme"));
    assert_eq!(next["state"], "succeeded", "{label}: the next job: {next}");
    let rss = peak_rss_kib(c.node("acme").pid());
    format!(
        "{label}: failed after {took:.1?} with \"{}\"; audited; next job succeeded; acme VmHWM {rss} KiB",
        job["reason"].as_str().unwrap()
    )
}

/// acme re-blinds its partners' points on its own Ballista executors (its engine names their
/// sealing key). A point that does not decode, or the identity, fails the job there with the
/// words the node itself uses, audited; acme serves the next job, whose partner's points the
/// cluster re-blinded (acme's log says how many).
#[test]
fn bad_points_reblinded_on_the_nodes_cluster_fail_the_job_with_the_same_words() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.5, 5);
    let coordinator = c.addr.unwrap();
    let cluster = Ballista::start(c.path(), 2, 600);
    c.node_top.insert("acme".into(), cluster.engine_line(true));
    c.ballista = Some(cluster);
    acme_open_to_mallory(&mut c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for attack in [Attack::UndecodablePoints, Attack::IdentityPoints] {
        eprintln!("{}", refused(&mut c, &rt, coordinator, attack));
    }
    let log = c.node("acme").log_text();
    // Each honest job after an attack had globex's points re-blinded on the cluster.
    assert_eq!(
        log.matches("re-blinded the partner's points on the cluster")
            .count(),
        2,
        "{log}"
    );
    assert!(!log.contains("panicked"), "acme panicked:\n{log}");
}

/// acme's peak resident memory in the flood test: its 200,000-row dataset loaded and blinded,
/// but none of the flood buffered.
const FLOOD_RSS_CAP_KIB: u64 = 128 * 1024;

/// A peer that declares 4 points and then pushes 512 MiB of point batches while acme is busy
/// loading and blinding a large set (the reader drains the stream meanwhile). Before the
/// reader's budget lowered its cap to the declared size, acme buffered the whole flood (1 GiB
/// sent: peak RSS 1.06 GB); now the first batch ends the job.
#[test]
fn a_point_flood_while_the_node_is_busy_is_not_buffered() {
    let (mut c, _) = Consortium::with_coordinator("acme", 200_000, 0.5, 6);
    let coordinator = c.addr.unwrap();
    c.start_node_for_fake_peer("acme", "mallory", &open_agreement("mallory"));
    let pid = c.node("acme").pid();
    let before = peak_rss_kib(pid);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = c.path().to_owned();
    let evil = rt.spawn(async move {
        let mut job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", 4).await;
        let payload = BASEPOINT.repeat((MAX_FRAME_LEN - 1024) / 32);
        for seq in 0..512 {
            let batch = PointBatch {
                seq,
                points: payload.clone(),
            };
            job.send(Phase::PsiBlinded, Body::Points(batch)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), job.conn.closed()).await;
    });
    c.wait_connected(&["mallory"]);
    let (job, _) = c.submit(&overlap_between("mallory,acme"));
    evil.abort();
    let after = peak_rss_kib(pid);
    eprintln!(
        "point flood: {} — {}; acme VmHWM {before} KiB before, {after} KiB after (cap {FLOOD_RSS_CAP_KIB} KiB)",
        job["state"], job["reason"]
    );
    let reason = reason_of(&job, "failed");
    assert!(
        reason.contains("sent more blinded points than the 4 it may"),
        "{reason}"
    );
    assert!(
        after < FLOOD_RSS_CAP_KIB,
        "acme's peak RSS {after} KiB is over {FLOOD_RSS_CAP_KIB} KiB"
    );
    assert!(c.nodes.iter_mut().all(|p| p.is_running()), "acme died");
}

/// How fast acme must fail a job whose peer's first data-plane frame is bad: the refusal ends
/// the job at once (before the fix it waited for the peer's connection until a deadline). The
/// bound leaves room for a loaded machine; the test prints the figures.
const PROMPT_FAILURE: Duration = Duration::from_secs(5);

/// A first data-plane frame that is not a hello (the data plane refuses the connection): the
/// job waiting for that peer's connection fails at once with the refusal's reason, audited, and
/// acme serves the next job. A connection that never sends its hello is refused after the data
/// plane's 10 s hello deadline, and so is the job.
#[test]
fn a_bad_first_data_plane_frame_fails_the_waiting_job_at_once() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.5, 7);
    let coordinator = c.addr.unwrap();
    c.start_pair_open_to_mallory();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let undecodable = {
        let mut bytes = 8u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff; 8]);
        bytes
    };
    let oversized = {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 1024]);
        bytes
    };
    let truncated = {
        let mut bytes = 100u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[7; 10]);
        bytes
    };
    let cases: Vec<(&str, Option<Vec<u8>>, String, Duration)> = vec![
        (
            "undecodable",
            Some(undecodable),
            "connection was refused: unreadable hello: malformed frame".into(),
            PROMPT_FAILURE,
        ),
        (
            "oversized length prefix",
            Some(oversized),
            format!(
                "unreadable hello: frame of 4294967295 bytes exceeds the {MAX_FRAME_LEN}-byte cap"
            ),
            PROMPT_FAILURE,
        ),
        (
            "truncated",
            Some(truncated),
            "unreadable hello: stream ended inside a frame".into(),
            PROMPT_FAILURE,
        ),
        (
            "point batch first",
            None,
            "connection was refused: first frame (phase 11) is not a psihello".into(),
            PROMPT_FAILURE,
        ),
        (
            "no hello at all",
            Some(Vec::new()),
            "connection was refused: opened no stream within 10s".into(),
            Duration::from_secs(10) + PROMPT_FAILURE,
        ),
    ];
    for (label, bytes, expect, bound) in cases {
        let dir = c.path().to_owned();
        let evil = rt.spawn(async move {
            let mut job =
                fake_node::join_next_job_without_hello(&dir, coordinator, "mallory", "acme").await;
            match bytes {
                Some(bytes) => {
                    job.send_raw(&bytes).await;
                    if bytes.len() == 14 {
                        job.finish();
                    }
                }
                None => {
                    job.send(
                        Phase::PsiBlinded,
                        Body::Points(PointBatch {
                            seq: 0,
                            points: BASEPOINT.to_vec(),
                        }),
                    )
                    .await;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(60), job.conn.closed()).await;
        });
        c.wait_connected(&["mallory"]);
        let job_id = c.submit_nowait(&overlap_between("mallory,acme"));
        // From the moment the job runs (the fake node has its Start) to its failure.
        let mut running_at = None;
        let t0 = Instant::now();
        let job = loop {
            let job = c.job_status(&job_id);
            match job["state"].as_str() {
                Some("running") if running_at.is_none() => running_at = Some(Instant::now()),
                Some("failed" | "succeeded" | "vetoed") => break job,
                _ => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{label}: {job}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = running_at.unwrap_or(t0).elapsed();
        eprintln!(
            "bad first frame, {label}: {} {took:.2?} after it started: {}",
            job["state"], job["reason"]
        );
        assert_eq!(job["state"], "failed", "{label}: {job}");
        let reason = job["reason"].as_str().unwrap().to_lowercase();
        assert!(
            reason.contains("mallory") && reason.contains(&expect),
            "{label}: the reason names the violation ({expect}): {reason}"
        );
        assert!(
            took < bound,
            "{label}: failed {took:?} after it started, not within {bound:?}"
        );
        let audited = c
            .audited_error("acme", &job_id)
            .unwrap_or_else(|| panic!("{label}: acme audited no JobError"));
        assert!(audited.to_lowercase().contains(&expect), "{audited}");
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(30), evil).await;
        });
        let (next, _) = c.submit(&overlap_between("globex,acme"));
        assert_eq!(next["state"], "succeeded", "{label}: the next job: {next}");
    }
    let log = c.node("acme").log_text();
    assert!(!log.contains("panicked"), "acme panicked:\n{log}");
}
