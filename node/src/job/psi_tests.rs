//! The PSI protocol's wire order, without sockets: a [`Pair`] of protocols exchanges frames in
//! memory (running their CPU work inline), and a tamper hook plays a hostile peer by changing,
//! dropping, repeating or inventing the frames one side sends. Every hostile case that
//! `tests/adversary.rs` needs processes for is here at the protocol level.

use std::path::Path;

use cleanroom_circuits::spill::{SpilledMatches, TagKey};
use cleanroom_circuits::{ItemSet, JobKey};
use cleanroom_proto::v1::JobSpec;

use super::*;
use crate::data::cluster_merge::merge_in_process;
use crate::data::cluster_pass::SealingKey;
use crate::job::test_pair::{Side, abort_at, first_of, hello, is_end, is_points, nth, on_points};
use crate::policy::NodeConfig;
use crate::test_fixtures::{NOW, node_head, two_party_spec};

/// `me`'s config with one agreement, with `partner`, allowing `allow` (TOML inline-table keys)
/// on its dataset `customers` for partner sets of up to `max_set` keys.
fn node_config(me: &str, partner: &str, allow: &str, max_set: u64) -> NodeConfig {
    let text = node_head(me)
        + &format!(
            r#"dataset = [{{ name = "customers", path = "customers.csv", identifier = [{{ name = "email", column = "email", normaliser = "email" }}] }}]
agreement = [{{ partner = "{partner}", purposes = ["reporting"], allow = [{{ dataset = "customers", keys = ["email"], min_set_size = 1, max_set_size = {max_set}, {allow} }}] }}]
"#
        );
    NodeConfig::parse(&text, Path::new("/nonexistent/node.toml")).expect("test config")
}

fn spec(kind: JobKind, learns: bool) -> JobSpec {
    two_party_spec(kind, "reporting", learns)
}

/// Items `from..to`, as a node's distinct keys.
fn items(from: u32, to: u32) -> ItemSet {
    let mut set = ItemSet::new();
    for i in from..to {
        set.push(format!("person-{i}@example.com").as_bytes())
            .expect("room");
    }
    set.dedup();
    set
}

/// One side's protocol config for job `job-1`, as its policy permits it.
fn config(me: usize, kind: JobKind) -> PsiConfig {
    config_up_to(me, kind, 1000)
}

/// [`config`] for partner sets of up to `max_set` keys.
fn config_up_to(me: usize, kind: JobKind, max_set: u64) -> PsiConfig {
    let names = ["acme", "globex"];
    let allow = match kind {
        JobKind::Match => r#"computation = "match", membership = "both""#,
        _ => r#"computation = "overlap""#,
    };
    let cfg = node_config(names[me], names[1 - me], allow, max_set);
    let spec = spec(kind, kind == JobKind::Match);
    let permit = crate::policy::psi::check_offer_at(&cfg, &spec, me, NOW).expect("permitted");
    PsiConfig {
        job_id: "job-1".into(),
        me: names[me].into(),
        kind,
        permit,
        digest: crate::spec::spec_digest("job-1", &spec),
        noise: None,
        reblind: ReblindPlace::Node,
        merge: MergePlace::Node,
    }
}

fn noise_for(me: &str) -> NoiseCommit {
    let own = noise::draw(0.5).expect("noise");
    NoiseCommit {
        term: own.term(me),
        noise: own.noise,
        nonce: own.nonce_bytes().expect("nonce"),
    }
}

/// Two protocols wired back to back; `tamper` rewrites each frame globex sends to acme (the
/// hostile peer is globex, acme the honest node under test).
struct Pair {
    acme: Side<PsiProtocol>,
    globex: Side<PsiProtocol>,
}

impl Pair {
    fn new(acme: PsiConfig, acme_items: ItemSet, globex: PsiConfig, globex_items: ItemSet) -> Pair {
        Pair {
            acme: Side::new(PsiProtocol::start(acme, JobKey::generate(), acme_items)),
            globex: Side::new(PsiProtocol::start(globex, JobKey::generate(), globex_items)),
        }
    }

    /// Batches of 256 points: acme holds items 0..9000, globex 3000..12000 (6000 in common).
    fn batched(acme: PsiConfig, globex: PsiConfig) -> Pair {
        Pair {
            acme: Side::new(PsiProtocol::start_batched(
                acme,
                JobKey::generate(),
                items(0, 9000),
                256,
            )),
            globex: Side::new(PsiProtocol::start_batched(
                globex,
                JobKey::generate(),
                items(3000, 12000),
                256,
            )),
        }
    }

    fn honest(kind: JobKind) -> Pair {
        Pair::new(
            config(0, kind),
            items(0, 30),
            config(1, kind),
            items(10, 50),
        )
    }

    /// Runs both sides until neither moves, passing globex's frames through `tamper`.
    fn run(&mut self, mut tamper: impl FnMut(Envelope) -> Vec<Envelope>) {
        loop {
            let from_acme = self.acme.drain();
            self.globex.inbox.extend(from_acme);
            let from_globex = self.globex.drain();
            for env in from_globex {
                self.acme.inbox.extend(tamper(env));
            }
            // Pieces come back only when no frame waits, so that several are out at once.
            let moved_a = self.acme.step() || self.acme.finish_pieces();
            let moved_g = self.globex.step() || self.globex.finish_pieces();
            if !moved_a
                && !moved_g
                && self.acme.proto.poll_is_empty()
                && self.globex.proto.poll_is_empty()
            {
                return;
            }
        }
    }

    fn run_honest(&mut self) {
        self.run(|env| vec![env]);
    }

    /// Acme's error after globex's frames went through `tamper`.
    fn acme_error(mut self, tamper: impl FnMut(Envelope) -> Vec<Envelope>) -> JobError {
        self.run(tamper);
        self.acme.error.expect("acme failed the job")
    }
}

impl PsiProtocol {
    fn poll_is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

fn by_globex(e: &JobError) -> &Violation {
    match e {
        JobError::Violation {
            by: Party::Node(n),
            violation,
        } if n == "globex" => violation,
        other => panic!("not a violation by globex: {other:?}"),
    }
}

/// What a side did, in order, when driven as the node's driver does: each CPU work it ran and
/// each frame it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Blind,
    PeerBatch,
    PeerEnd,
    Returned,
    ReturnedEnd,
    Reblind,
    Sent(Phase, &'static str),
}

fn work_event(w: &Work) -> Event {
    match w {
        Work::BlindNext(_) => Event::Blind,
        Work::PeerBatches(..) => Event::PeerBatch,
        Work::PeerEnd(..) => Event::PeerEnd,
        Work::Returned(..) => Event::Returned,
        Work::ReturnedEnd(..) => Event::ReturnedEnd,
        Work::Reblind(..) | Work::TakePieces(..) | Work::PiecesBack(..) => Event::Reblind,
        Work::PeerReblinded(..) => Event::PeerBatch,
        Work::MergeElsewhere(..) => Event::ReturnedEnd,
    }
}

fn sent_event(env: &Envelope) -> Event {
    let what = match env.body {
        Some(Body::Points(_)) => "points",
        Some(Body::BatchEnd(_)) => "end",
        Some(Body::PsiHello(_)) => "hello",
        _ => "other",
    };
    Event::Sent(
        Phase::try_from(env.phase).unwrap_or(Phase::Unspecified),
        what,
    )
}

/// Runs both sides one action at a time, alternately, handing each side every frame that has
/// reached it after each of its CPU works, as the node's driver does; returns each side's events.
fn run_as_driver(pair: &mut Pair) -> [Vec<Event>; 2] {
    let mut events = [Vec::new(), Vec::new()];
    loop {
        let mut moved = false;
        for (i, events) in events.iter_mut().enumerate() {
            let (side, other) = if i == 0 {
                (&mut pair.acme, &mut pair.globex)
            } else {
                (&mut pair.globex, &mut pair.acme)
            };
            let mut out = Vec::new();
            moved |= act(side, &mut out, events);
            other.inbox.extend(out);
        }
        if !moved {
            return events;
        }
    }
}

/// Our points go out batch by batch as they are blinded, the peer's batches take turns with our
/// own, and the wire order holds: every point we return follows our own end marker.
#[test]
fn points_go_out_as_they_are_blinded_and_the_peers_take_turns_with_ours() {
    for kind in [JobKind::Overlap, JobKind::Match] {
        let (a, g) = (config_up_to(0, kind, 20_000), config_up_to(1, kind, 20_000));
        // Batches of 256 points: 36 a side, 9 pieces of CPU work.
        let mut pair = Pair::batched(a, g);
        let [acme, _] = run_as_driver(&mut pair);
        assert!(pair.acme.error.is_none() && pair.globex.error.is_none());
        let blinded = Event::Sent(Phase::PsiBlinded, "points");
        // The first batch leaves before the second is blinded.
        let first_sent = acme.iter().position(|e| *e == blinded).unwrap();
        let blinds: Vec<usize> = (0..acme.len())
            .filter(|&i| acme[i] == Event::Blind)
            .collect();
        assert!(
            blinds.len() >= 3 && first_sent < blinds[1],
            "{kind:?}: {acme:?}"
        );
        // The peer's first batch is re-blinded before our last one is blinded.
        let first_peer = acme.iter().position(|e| *e == Event::PeerBatch).unwrap();
        assert!(first_peer < blinds[blinds.len() - 1], "{kind:?}: {acme:?}");
        // Wire order: our end marker, then what we return.
        let end = acme
            .iter()
            .position(|e| *e == Event::Sent(Phase::PsiBlinded, "end"))
            .unwrap();
        let first_return = acme
            .iter()
            .position(|e| matches!(e, Event::Sent(Phase::PsiDoubleBlinded, _)))
            .unwrap();
        assert!(end < first_return, "{kind:?}: {acme:?}");
        assert!(!acme[end..].contains(&blinded), "{kind:?}");
        let a = pair.acme.proto.into_exchange().expect("finished");
        assert_eq!(a.output.intersection, 6000, "{kind:?}");
        if kind == JobKind::Match {
            assert_eq!(
                matched(&items(0, 9000), a.output.membership),
                items(3000, 9000).iter().collect::<Vec<_>>()
            );
        }
    }
}

/// The items of `set` that `membership` (indices into it) names.
fn matched(set: &ItemSet, membership: Option<Vec<u32>>) -> Vec<&[u8]> {
    membership
        .expect("membership")
        .iter()
        .map(|&i| set.get(i as usize).expect("index"))
        .collect()
}

/// One action of `side`, as the node's driver takes it (after CPU work, every frame that has
/// arrived is handed over); what it sends goes to `out`, and the work it ran and the frames it
/// sent to `events`. Whether anything happened.
fn act(side: &mut Side<PsiProtocol>, out: &mut Vec<Envelope>, events: &mut Vec<Event>) -> bool {
    if side.error.is_some() {
        return false;
    }
    match side.proto.poll() {
        Some(Action::Send(env)) => {
            events.push(sent_event(&env));
            out.push(*env);
        }
        Some(Action::Compute(work)) => {
            events.push(work_event(&work));
            if let Err(e) = side.proto.handle_done(work.run()) {
                side.error = Some(e);
            }
            while side.error.is_none() && side.step() {}
        }
        Some(Action::Reblind(piece)) => side.pieces.push(piece),
        Some(Action::Merge(request)) => {
            let (sealing, dir) = side.merge_dir.as_ref().expect("a shared directory");
            let answers = merge_in_process(sealing, dir, request.merge);
            if let Err(e) = side.proto.handle_merged(answers) {
                side.error = Some(e);
            }
        }
        Some(Action::Finish) => side.finished_stream = true,
        Some(Action::Recheck) => side.rechecks += 1,
        Some(Action::Audit(e)) => side.audited.push(e),
        None => return side.step(),
    }
    true
}

/// The peer's count and reveal may arrive while we still have its returned points to compare:
/// they wait, and are taken in order once our own count is out.
#[test]
fn the_peers_final_frames_may_come_early() {
    let kind = JobKind::Overlap;
    let (mut a, mut g) = (config_up_to(0, kind, 20_000), config_up_to(1, kind, 20_000));
    a.noise = Some(noise_for("acme"));
    g.noise = Some(noise_for("globex"));
    let mut pair = Pair::batched(a, g);
    // Globex's returns of acme's points, and all that follows, reach acme only once globex has
    // finished its stream (its count and reveal sent).
    let mut held = Vec::new();
    loop {
        let mut out = Vec::new();
        let a = act(&mut pair.acme, &mut out, &mut Vec::new());
        pair.globex.inbox.extend(out);
        let mut out = Vec::new();
        let g = act(&mut pair.globex, &mut out, &mut Vec::new());
        for env in out {
            if env.phase == Phase::PsiBlinded as i32 || env.phase == Phase::PsiSize as i32 {
                pair.acme.inbox.push_back(env);
            } else {
                held.push(env);
            }
        }
        let released = pair.globex.finished_stream && !held.is_empty();
        if released {
            assert!(held.iter().any(|e| e.phase == Phase::PsiDone as i32));
            pair.acme.inbox.extend(held.drain(..));
        }
        if !a && !g && !released {
            break;
        }
    }
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    let x = pair.acme.proto.into_exchange().expect("finished");
    assert_eq!(x.output.intersection, 6000);
    assert!(x.peer_noise.is_some());
}

#[test]
fn an_honest_overlap_counts_the_intersection_on_both_sides() {
    let mut pair = Pair::honest(JobKind::Overlap);
    pair.run_honest();
    for side in [&pair.acme, &pair.globex] {
        assert!(side.error.is_none(), "{:?}", side.error);
        assert!(side.finished_stream);
        assert_eq!(
            side.rechecks, 1,
            "the policy is re-checked once the hello is in"
        );
        assert!(
            side.audited.is_empty(),
            "overlap releases no membership to the partner"
        );
    }
    let a = pair.acme.proto.into_exchange().expect("finished");
    let g = pair.globex.proto.into_exchange().expect("finished");
    assert_eq!(a.output.intersection, 20);
    assert_eq!(g.output.intersection, 20);
    assert_eq!((a.output.own_set_size, a.output.peer_set_size), (30, 40));
    assert!(a.peer_noise.is_none() && a.output.membership.is_none());
    assert_eq!(a.joint.min_result, g.joint.min_result);
}

#[test]
fn a_match_gives_each_side_its_own_matched_rows_and_audits_the_partners() {
    let mut pair = Pair::honest(JobKind::Match);
    pair.run_honest();
    assert!(pair.acme.error.is_none() && pair.globex.error.is_none());
    // Each side lets the partner learn membership, so each audits that release before blinding.
    for side in [&pair.acme, &pair.globex] {
        assert!(matches!(
            side.audited.as_slice(),
            [AuditEvent::Release { what, .. }] if what.contains("membership")
        ));
    }
    let a = pair.acme.proto.into_exchange().expect("finished");
    let shared = items(10, 30);
    assert_eq!(
        matched(&items(0, 30), a.output.membership),
        shared.iter().collect::<Vec<_>>()
    );
}

#[test]
fn committed_noise_is_revealed_and_checked() {
    let (mut a, mut g) = (config(0, JobKind::Overlap), config(1, JobKind::Overlap));
    a.noise = Some(noise_for("acme"));
    g.noise = Some(noise_for("globex"));
    let globex_noise = g.noise.as_ref().map(|n| n.noise);
    let mut pair = Pair::new(a, items(0, 30), g, items(10, 50));
    pair.run_honest();
    let x = pair.acme.proto.into_exchange().expect("finished");
    assert_eq!(
        x.peer_noise.map(|(t, n)| (t.node, n)),
        globex_noise.map(|n| ("globex".into(), n))
    );
    assert_eq!(x.output.intersection, 20);
}

#[test]
fn a_hello_from_someone_else_or_for_another_spec_is_refused_before_any_work() {
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| h.sender = "mallory".into()));
    assert_eq!(by_globex(&e), &Violation::WrongSender("mallory".into()));
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| h.spec_digest[0] ^= 1));
    assert_eq!(by_globex(&e), &Violation::SpecMismatch);
}

#[test]
fn bad_release_terms_are_violations() {
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| h.release = None));
    assert_eq!(
        by_globex(&e),
        &Violation::Terms("its hello carries no release terms".into())
    );
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| {
        if let Some(r) = &mut h.release {
            r.min_result = 0;
        }
    }));
    assert!(matches!(by_globex(&e), Violation::Terms(t) if t.contains("minimum result of 0")));
}

#[test]
fn noise_announced_for_a_match_or_without_a_commitment_is_a_violation() {
    let term = noise_for("globex").term;
    let t = term.clone();
    let e = Pair::honest(JobKind::Match).acme_error(hello(move |h| {
        h.noise = Some(t.clone());
        h.noise_commitment = vec![7; 32];
    }));
    assert_eq!(
        by_globex(&e),
        &Violation::Terms("it announced noise for a match job".into())
    );
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(move |h| h.noise = Some(term.clone())));
    assert!(matches!(by_globex(&e), Violation::Terms(_)), "{e}");
}

#[test]
fn a_set_size_outside_the_agreement_is_refused_by_policy() {
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| h.set_size = 1_000_000));
    match e {
        JobError::Refused(v) => assert_eq!(v.0, "globex declares 1000000 keys > max_set_size 1000"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_over_declared_size_is_caught_when_the_points_run_short() {
    // Within policy, but more than globex sends: its end marker does not add up.
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| h.set_size += 5));
    assert!(matches!(by_globex(&e), Violation::Psi(_)), "{e}");
}

#[test]
fn a_second_hello_is_a_frame_of_the_wrong_phase() {
    let e = Pair::honest(JobKind::Overlap).acme_error(nth(0, |env| vec![env.clone(), env]));
    assert_eq!(
        by_globex(&e),
        &Violation::WrongPhase {
            got: Phase::PsiSize as i32,
            expected: Phase::PsiBlinded
        }
    );
}

#[test]
fn batches_out_of_order_or_replayed_are_violations() {
    let e = Pair::honest(JobKind::Overlap).acme_error(first_of(
        Phase::PsiBlinded,
        is_points,
        |mut env| {
            if let Some(Body::Points(b)) = &mut env.body {
                b.seq = 3;
            }
            vec![env]
        },
    ));
    assert_eq!(
        by_globex(&e),
        &Violation::OutOfOrder {
            got: 3,
            expected: 0
        }
    );
    let e =
        Pair::honest(JobKind::Overlap).acme_error(first_of(Phase::PsiBlinded, is_points, |env| {
            vec![env.clone(), env]
        }));
    assert_eq!(
        by_globex(&e),
        &Violation::OutOfOrder {
            got: 0,
            expected: 1
        }
    );
    // A replayed returned batch, in the double-blinded phase.
    let e = Pair::honest(JobKind::Overlap).acme_error(first_of(
        Phase::PsiDoubleBlinded,
        is_points,
        |env| vec![env.clone(), env],
    ));
    assert_eq!(
        by_globex(&e),
        &Violation::OutOfOrder {
            got: 0,
            expected: 1
        }
    );
}

#[test]
fn bad_points_are_the_sessions_violations() {
    // Not a point encoding.
    let e = Pair::honest(JobKind::Overlap)
        .acme_error(on_points(Phase::PsiBlinded, |p| p[..32].fill(0xff)));
    assert!(matches!(by_globex(&e), Violation::Psi(_)), "{e}");
    // Not a whole number of points.
    let e = Pair::honest(JobKind::Overlap).acme_error(on_points(Phase::PsiBlinded, |p| {
        p.pop();
    }));
    assert!(matches!(by_globex(&e), Violation::Psi(_)), "{e}");
    // Returned points that are not ours, double-blinded.
    let e = Pair::honest(JobKind::Overlap)
        .acme_error(on_points(Phase::PsiDoubleBlinded, |p| p.truncate(32)));
    assert!(matches!(by_globex(&e), Violation::Psi(_)), "{e}");
}

#[test]
fn frames_of_another_phase_or_kind_are_violations() {
    let e = Pair::honest(JobKind::Overlap).acme_error(first_of(
        Phase::PsiBlinded,
        is_points,
        |mut env| {
            env.phase = 77;
            vec![env]
        },
    ));
    assert_eq!(
        by_globex(&e),
        &Violation::WrongPhase {
            got: 77,
            expected: Phase::PsiBlinded
        }
    );
    let e = Pair::honest(JobKind::Overlap).acme_error(first_of(
        Phase::PsiBlinded,
        is_points,
        |mut env| {
            env.body = None;
            vec![env]
        },
    ));
    assert_eq!(
        by_globex(&e),
        &Violation::Unexpected {
            what: "an empty frame",
            phase: Phase::PsiBlinded
        }
    );
    // Points where the count is due.
    let e =
        Pair::honest(JobKind::Overlap).acme_error(first_of(Phase::PsiDone, is_end, |mut env| {
            env.body = Some(Body::Points(PointBatch {
                seq: 0,
                points: vec![0; 32],
            }));
            vec![env]
        }));
    assert_eq!(
        by_globex(&e),
        &Violation::Unexpected {
            what: "a point batch",
            phase: Phase::PsiDone
        }
    );
    // A first frame that is not a hello.
    let e = Pair::honest(JobKind::Overlap).acme_error(nth(0, |mut env| {
        env.phase = Phase::PsiBlinded as i32;
        vec![env]
    }));
    assert_eq!(
        by_globex(&e),
        &Violation::WrongPhase {
            got: Phase::PsiBlinded as i32,
            expected: Phase::PsiSize
        }
    );
}

#[test]
fn a_count_that_differs_is_a_violation() {
    let e =
        Pair::honest(JobKind::Overlap).acme_error(first_of(Phase::PsiDone, is_end, |mut env| {
            if let Some(Body::BatchEnd(end)) = &mut env.body {
                end.total += 1;
            }
            vec![env]
        }));
    assert_eq!(
        by_globex(&e),
        &Violation::CountMismatch {
            theirs: 21,
            ours: 20
        }
    );
}

#[test]
fn a_reveal_that_does_not_open_the_commitment_is_a_violation() {
    let (a, mut g) = (config(0, JobKind::Overlap), config(1, JobKind::Overlap));
    g.noise = Some(noise_for("globex"));
    let pair = Pair::new(a, items(0, 30), g, items(10, 50));
    let e = pair.acme_error(|mut env| {
        if let Some(Body::NoiseReveal(r)) = &mut env.body {
            r.noise += 1;
        }
        vec![env]
    });
    assert!(matches!(by_globex(&e), Violation::Terms(_)), "{e}");
    // A committed peer that sends something else where its reveal is due.
    let (a, mut g) = (config(0, JobKind::Overlap), config(1, JobKind::Overlap));
    g.noise = Some(noise_for("globex"));
    let pair = Pair::new(a, items(0, 30), g, items(10, 50));
    let e = pair.acme_error(|env| match env.body {
        Some(Body::NoiseReveal(_)) => {
            vec![Outbox::new("job-1", Phase::PsiDone).end(Phase::PsiDone, 20)]
        }
        _ => vec![env],
    });
    assert_eq!(
        by_globex(&e),
        &Violation::Unexpected {
            what: "an end marker",
            phase: Phase::PsiDone
        }
    );
}

#[test]
fn an_abort_ends_the_job_with_the_peers_reason() {
    let e = Pair::honest(JobKind::Overlap).acme_error(abort_at(1, "disk full"));
    assert_eq!(e.to_string(), "node 'globex' aborted the job: disk full");
}

#[test]
fn a_silent_peer_is_not_finished_and_gets_time_to_read_the_largest_set_before_its_hello() {
    let mut pair = Pair::honest(JobKind::Overlap);
    let max = pair.acme.proto.cfg.permit.max_peer_set;
    assert_eq!(
        pair.acme.proto.silence_allowed(),
        crate::job::wire::stall_deadline(0, max)
    );
    assert!(pair.acme.proto.silence_allowed() > crate::job::wire::STALL_BASE);
    // Globex never speaks: acme sends its hello and waits.
    pair.run(|_| Vec::new());
    assert!(pair.acme.error.is_none());
    assert!(!pair.acme.proto.is_finished());
}

#[test]
fn violations_read_as_they_did_in_the_async_code() {
    let e = Pair::honest(JobKind::Overlap).acme_error(hello(|h| h.sender = "mallory".into()));
    assert_eq!(
        crate::error::NodeError::from(e).to_string(),
        "protocol violation by node 'globex': hello names sender 'mallory'"
    );
}

fn terms(min_result: u64, counts_to_coordinator: bool) -> ReleaseTerms {
    ReleaseTerms {
        min_result,
        counts_to_coordinator,
    }
}

/// Each node applies the stricter terms of both, so neither relies on the coordinator to
/// enforce the other's threshold or its `counts_to`.
#[test]
fn joint_release_terms_are_the_stricter_of_both() {
    let joint = |own, peer| joint_release(&own, Some(&peer)).unwrap();
    assert_eq!(joint(terms(10, true), terms(50, true)), terms(50, true));
    assert_eq!(joint(terms(50, true), terms(10, true)), terms(50, true));
    assert_eq!(joint(terms(1, true), terms(1, false)), terms(1, false));
    assert_eq!(joint(terms(1, false), terms(1, true)), terms(1, false));
    assert_eq!(
        joint_release(&terms(1, true), None).unwrap_err(),
        "its hello carries no release terms"
    );
    assert!(
        joint_release(&terms(1, true), Some(&terms(0, true)))
            .unwrap_err()
            .contains("minimum result of 0")
    );
}

/// Globex's frames of an earlier, completed run of the same job, in order.
fn recorded_run() -> Vec<Envelope> {
    let mut pair = Pair::honest(JobKind::Overlap);
    let mut frames = Vec::new();
    pair.run(|env| {
        frames.push(env.clone());
        vec![env]
    });
    assert!(pair.acme.proto.is_finished());
    frames
}

fn points_frame(phase: Phase, seq: u64, points: Vec<u8>) -> Envelope {
    Envelope {
        job_id: "job-1".into(),
        phase: phase as i32,
        body: Some(Body::Points(PointBatch { seq, points })),
    }
}

type Tamper = Box<dyn FnMut(Envelope) -> Vec<Envelope>>;

/// The hostile cases of `tests/adversary.rs` that are the protocol's to catch, each with the
/// words that e2e test expects in the analyst's reason. (The others are the reader's: frames
/// that do not decode, another job's id, an empty batch, more points than the hello declared
/// or a flood of them; `frame_budget` and the transport's tests pin those.)
#[test]
fn the_adversary_cases_fail_at_the_protocol_with_the_e2e_words() {
    let with_points =
        |phase: Phase, f: fn(&mut Vec<u8>)| -> Tamper { Box::new(on_points(phase, f)) };
    let with_end = |phase: Phase, f: fn(&mut u64)| -> Tamper {
        Box::new(first_of(phase, is_end, move |mut env| {
            if let Some(Body::BatchEnd(e)) = &mut env.body {
                f(&mut e.total);
            }
            vec![env]
        }))
    };
    let replace_first = |phase: Phase, is: fn(&Body) -> bool, with: fn() -> Envelope| -> Tamper {
        Box::new(first_of(phase, is, move |_| vec![with()]))
    };
    let done = || Outbox::new("job-1", Phase::PsiDone).end(Phase::PsiDone, 0);
    let mut old = recorded_run().into_iter().skip(1);
    // Each case runs on a fresh honest overlap pair.
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "undecodable points",
            with_points(Phase::PsiBlinded, |p| p[..32].fill(0xff)),
            "not a valid ristretto255 encoding",
        ),
        (
            "identity points",
            with_points(Phase::PsiBlinded, |p| p[..32].fill(0)),
            "identity",
        ),
        (
            "batch not whole points",
            with_points(Phase::PsiBlinded, |p| p.truncate(33)),
            "batch of 33 bytes is not a whole number",
        ),
        (
            "end total disagrees",
            with_end(Phase::PsiBlinded, |t| *t -= 1),
            "declared 40 points, announced 39 at the end",
        ),
        (
            "end before all declared",
            Box::new(hello(|h| h.set_size += 5)),
            "announced 40 at the end, and sent 40",
        ),
        (
            "double-blinded first",
            replace_first(Phase::PsiBlinded, is_points, || {
                points_frame(Phase::PsiDoubleBlinded, 0, vec![0; 32])
            }),
            "frame for phase 12 while in phase phase_psi_blinded",
        ),
        (
            "second hello",
            Box::new(nth(0, |env| vec![env.clone(), env])),
            "frame for phase 10 while in phase phase_psi_blinded",
        ),
        (
            "done first",
            replace_first(Phase::PsiBlinded, is_points, done),
            "frame for phase 13 while in phase phase_psi_blinded",
        ),
        (
            "returned not whole points",
            with_points(Phase::PsiDoubleBlinded, |p| p.truncate(33)),
            "batch of 33 bytes is not a whole number",
        ),
        (
            "returned end total disagrees",
            with_points(Phase::PsiDoubleBlinded, |p| p.truncate(64)),
            "the peer announced 30 returned and returned 2",
        ),
        (
            "returned out of sequence",
            Box::new(first_of(Phase::PsiDoubleBlinded, is_points, |mut env| {
                if let Some(Body::Points(b)) = &mut env.body {
                    b.seq = 1;
                }
                vec![env]
            })),
            "batch 1 out of order (expected 0)",
        ),
        (
            "blinded after its end",
            Box::new(first_of(Phase::PsiBlinded, is_end, |env| {
                vec![env.clone(), env]
            })),
            "frame for phase 11 while in phase phase_psi_double_blinded",
        ),
        (
            "done before returning",
            replace_first(Phase::PsiDoubleBlinded, is_points, done),
            "frame for phase 13 while in phase phase_psi_double_blinded",
        ),
        (
            "done as hello",
            replace_first(Phase::PsiDone, is_end, || {
                Outbox::new("job-1", Phase::PsiSize)
                    .frame(Phase::PsiSize, Body::PsiHello(PsiHello::default()))
            }),
            "frame for phase 10 while in phase phase_psi_done",
        ),
    ];
    for (label, tamper, expect) in cases {
        let e = Pair::honest(JobKind::Overlap).acme_error(tamper);
        by_globex(&e);
        let reason = crate::error::NodeError::from(e).to_string().to_lowercase();
        assert!(reason.contains(expect), "{label}: {reason}");
    }
    // The replay: globex's hello is fresh, everything after it is an earlier run's.
    let mut i = 0;
    let e = Pair::honest(JobKind::Overlap).acme_error(move |env| {
        i += 1;
        if i == 1 {
            vec![env]
        } else {
            old.next().into_iter().collect()
        }
    });
    let reason = crate::error::NodeError::from(e).to_string();
    assert!(reason.contains("shared items, we counted 0"), "{reason}");
}

/// A spilled side (its set blinded as it was read, kept in a store) runs the same wire as an
/// in-memory side, in batches, and both count the same.
#[test]
fn a_spilled_side_and_an_in_memory_side_count_the_same() {
    let a = config_up_to(0, JobKind::Overlap, 20_000);
    let (mut pair, _) = spilled_acme_pair(a, JobKey::generate(), Side::new);
    pair.run_honest();
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    let a = pair.acme.proto.into_exchange().expect("finished");
    let g = pair.globex.proto.into_exchange().expect("finished");
    assert_eq!((a.output.intersection, g.output.intersection), (6000, 6000));
    assert!(a.output.spilled_bytes >= 3 * 9000 * 32);
    assert_eq!(g.output.spilled_bytes, 0);
}

/// acme spilled into a job directory its "executors" read, merging its buckets there: the same
/// count, the same membership, both ways, as merging them itself. Each run hands out one merge.
#[test]
fn buckets_merged_off_the_node_count_and_match_as_on_it() {
    for kind in [JobKind::Overlap, JobKind::Match] {
        let root = tempfile::tempdir().expect("a directory");
        let mut a = config_up_to(0, kind, 20_000);
        a.merge = MergePlace::Elsewhere;
        let (mut pair, dir) = shared_acme_pair(a, root.path());
        pair.run_honest();
        assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
        assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
        assert_eq!(pair.acme.merges_handed_out, 1);
        let a = pair.acme.proto.into_exchange().expect("finished");
        let g = pair.globex.proto.into_exchange().expect("finished");
        assert_eq!((a.output.intersection, g.output.intersection), (6000, 6000));
        if kind == JobKind::Match {
            assert_eq!(
                matched(&items(3000, 12000), g.output.membership),
                items(3000, 9000).iter().collect::<Vec<_>>()
            );
            let Some(SpilledMatches::Points(points)) = a.output.spilled_matches else {
                panic!("acme's matched points");
            };
            assert_eq!(points.len(), 6000);
        }
        assert!(!dir.exists(), "the job's directory goes with its session");
    }
}

/// A point globex returns twice is found by the merge off the node, and is globex's violation,
/// as on the node.
#[test]
fn a_point_returned_twice_is_the_partners_fault_when_merged_off_the_node() {
    let root = tempfile::tempdir().expect("a directory");
    let mut a = config_up_to(0, JobKind::Overlap, 20_000);
    a.merge = MergePlace::Elsewhere;
    let (pair, _) = shared_acme_pair(a, root.path());
    let e = pair.acme_error(on_points(Phase::PsiDoubleBlinded, |points| {
        let first: Vec<u8> = points[..32].to_vec();
        points[32..64].copy_from_slice(&first);
    }));
    assert!(
        matches!(
            by_globex(&e),
            Violation::Psi(PsiError::DuplicateReturnedPoint)
        ),
        "{e:?}"
    );
}

/// acme spilled into a [`FileStore`](crate::job::spill::FileStore) under `root` (items 0..9000,
/// untagged: its matched points come out), its buckets merged by "executors" that read that
/// directory, against globex in memory; and the job's directory.
fn shared_acme_pair(a: PsiConfig, root: &std::path::Path) -> (Pair, std::path::PathBuf) {
    use cleanroom_circuits::spill::OwnSetBuilder;
    let kind = a.kind;
    let key = JobKey::generate();
    let store = crate::job::spill::FileStore::create(root, "job-shared").expect("a store");
    let dir = store.dir().to_path_buf();
    let mut own = OwnSetBuilder::new(Box::new(store));
    own.add(&key, &dataset::key_name(&a.permit.keys), &items(0, 9000))
        .unwrap();
    let own = own.finish().unwrap();
    let mut acme = Side::new(PsiProtocol::start_spilled_batched(a, key, own, 256));
    let sealing = SealingKey::from_bytes(&[4; 32]).expect("a key");
    acme.merge_dir = Some((sealing, dir.clone()));
    let pair = Pair {
        acme,
        globex: batched_globex(kind),
    };
    (pair, dir)
}

/// acme spilled (items 0..9000, blinded with `key` as they were read, kept in a store) against
/// globex in memory (items 3000..12000), both in batches of 256; `side` wraps acme's protocol.
/// When acme learns membership its set keeps tags: their key comes back too.
fn spilled_acme_pair(
    a: PsiConfig,
    key: JobKey,
    side: impl FnOnce(PsiProtocol) -> Side<PsiProtocol>,
) -> (Pair, Option<TagKey>) {
    use cleanroom_circuits::spill::{MemoryStore, OwnSetBuilder};
    let kind = a.kind;
    let store = Box::new(MemoryStore::default());
    let mut own = if a.permit.i_learn_membership {
        OwnSetBuilder::with_tags(store, TagKey::generate())
    } else {
        OwnSetBuilder::new(store)
    };
    own.add(&key, &dataset::key_name(&a.permit.keys), &items(0, 9000))
        .unwrap();
    let mut own = own.finish().unwrap();
    let tags = own.take_tag_key();
    let acme = PsiProtocol::start_spilled_batched(a, key, own, 256);
    let pair = Pair {
        acme: side(acme),
        globex: batched_globex(kind),
    };
    (pair, tags)
}

/// A spilled match (a node under a `memory_limit`) learns and gives the membership an
/// in-memory one does, re-blinding on the node or off it. Off it, pieces come back last first
/// and acme still returns globex's points in the order they came (globex reads its membership
/// from that order). acme's matched tags are those of the shared items.
#[test]
fn a_spilled_match_learns_and_gives_the_same_membership() {
    for in_flight in [None, Some(3)] {
        let mut a = config_up_to(0, JobKind::Match, 20_000);
        assert!(a.permit.i_learn_membership && a.permit.partner_learns_membership);
        let key = JobKey::generate();
        let (mut pair, tags) = match in_flight {
            Some(in_flight) => {
                a.reblind = ReblindPlace::Elsewhere { in_flight };
                let copy = copy_of(&key);
                spilled_acme_pair(a, key, |acme| Side::with_cluster(acme, copy))
            }
            None => spilled_acme_pair(a, key, Side::new),
        };
        let tags = tags.expect("a match that learns membership keeps tags");
        pair.run_honest();
        assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
        assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
        if in_flight.is_some() {
            assert!(pair.acme.pieces_handed_out > 1);
        }
        let a = pair.acme.proto.into_exchange().expect("finished");
        let g = pair.globex.proto.into_exchange().expect("finished");
        assert_eq!((a.output.intersection, g.output.intersection), (6000, 6000));
        let shared = items(3000, 9000);
        let mut expected: Vec<_> = shared.iter().map(|x| tags.tag(x)).collect();
        expected.sort_unstable();
        assert_eq!(
            a.output.spilled_matches,
            Some(SpilledMatches::Tags(expected))
        );
        assert_eq!(
            matched(&items(3000, 12000), g.output.membership),
            shared.iter().collect::<Vec<_>>()
        );
    }
}

/// globex in memory, items 3000..12000 in batches of 256 (acme's partner in the tests of
/// spilling and of re-blinding off the node).
fn batched_globex(kind: JobKind) -> Side<PsiProtocol> {
    Side::new(PsiProtocol::start_batched(
        config_up_to(1, kind, 20_000),
        JobKey::generate(),
        items(3000, 12000),
        256,
    ))
}

/// The peer's frames a protocol has taken and not worked on are its backlog, which the driver
/// keeps short (the rest waits in its bounded queue); work takes them off.
#[test]
fn the_backlog_counts_frames_taken_and_not_yet_worked_on() {
    let kind = JobKind::Overlap;
    let mut pair = Pair::batched(config_up_to(0, kind, 20_000), config_up_to(1, kind, 20_000));
    let acme_hello = pair.acme.drain();
    pair.globex.inbox.extend(acme_hello);
    // globex: its hello, then (with acme's) all its points and their end marker.
    let mut from_globex = pair.globex.drain();
    while pair.globex.step() {
        from_globex.extend(pair.globex.drain());
    }
    let batches = from_globex
        .iter()
        .filter(|e| matches!(e.body, Some(Body::Points(_))))
        .count();
    assert_eq!(batches, 9000_usize.div_ceil(256));
    assert_eq!(pair.acme.proto.backlog(), 0);
    let mut frames = from_globex.into_iter();
    pair.acme
        .proto
        .handle(frames.next().expect("hello"))
        .expect("globex's hello");
    pair.acme.drain();
    assert_eq!(pair.acme.proto.backlog(), 0);
    // Taken without working: every batch and the end marker wait.
    for env in frames {
        pair.acme.proto.handle(env).expect("an honest frame");
    }
    assert_eq!(pair.acme.proto.backlog(), batches + 1);
    pair.acme.drain();
    assert_eq!(pair.acme.proto.backlog(), 0);
}

fn copy_of(key: &JobKey) -> JobKey {
    JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("a key")
}

/// Acme re-blinds globex's points off the node, at most `in_flight` pieces out at once;
/// globex on its node.
fn pair_off_node(kind: JobKind, in_flight: usize) -> Pair {
    let mut a = config_up_to(0, kind, 20_000);
    a.reblind = ReblindPlace::Elsewhere { in_flight };
    let key = JobKey::generate();
    let copy = copy_of(&key);
    Pair {
        acme: Side::with_cluster(
            PsiProtocol::start_batched(a, key, items(0, 9000), 256),
            copy,
        ),
        globex: batched_globex(kind),
    }
}

/// The partner's points re-blinded off the node (pieces back in any order) give the count and
/// the membership that re-blinding them on the node gives, in memory and spilled.
#[test]
fn reblinding_off_the_node_gives_the_same_results() {
    for kind in [JobKind::Overlap, JobKind::Match] {
        for in_flight in [1, 3] {
            let mut pair = pair_off_node(kind, in_flight);
            pair.run_honest();
            assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
            assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
            assert!(pair.acme.pieces_handed_out > 1, "{kind:?}");
            assert!(pair.acme.pieces.is_empty());
            // Pieces gather batches; what acme returns still goes out in 256-point batches.
            assert_eq!(pair.acme.most_points_in_a_frame, 256, "{kind:?}");
            let a = pair.acme.proto.into_exchange().expect("finished");
            let g = pair.globex.proto.into_exchange().expect("finished");
            assert_eq!((a.output.intersection, g.output.intersection), (6000, 6000));
            if kind == JobKind::Match {
                let shared = items(3000, 9000);
                assert_eq!(
                    matched(&items(0, 9000), a.output.membership),
                    shared.iter().collect::<Vec<_>>()
                );
                // globex learns which of its items matched from the order acme returns its
                // points in: acme must return them in the order they came.
                assert_eq!(
                    matched(&items(3000, 12000), g.output.membership),
                    shared.iter().collect::<Vec<_>>()
                );
            }
        }
    }
    // Spilled: the stored points go out in pieces once all are in.
    let mut a = config_up_to(0, JobKind::Overlap, 20_000);
    a.reblind = ReblindPlace::Elsewhere { in_flight: 2 };
    let key = JobKey::generate();
    let copy = copy_of(&key);
    let (mut pair, _) = spilled_acme_pair(a, key, |acme| Side::with_cluster(acme, copy));
    pair.run_honest();
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    // 9000 points in pieces of at most 8 batches of 256.
    assert_eq!(
        pair.acme.pieces_handed_out,
        9000_usize.div_ceil(BATCHES_PER_PIECE * 256)
    );
    let a = pair.acme.proto.into_exchange().expect("finished");
    let g = pair.globex.proto.into_exchange().expect("finished");
    assert_eq!((a.output.intersection, g.output.intersection), (6000, 6000));
}

/// Off the node, the partner's bad points are its violations as on the node, named by their
/// place in its whole stream; a batch past its declared size never leaves the node; a cluster
/// failure is this node's, with the cluster's reason.
#[test]
fn bad_points_reblinded_off_the_node_are_the_partners_violations() {
    // A point that is not one, in globex's second batch (256 points each): index 256 + 3.
    let second = nth(2, |mut env| {
        if let Some(Body::Points(b)) = &mut env.body {
            b.points[3 * 32..4 * 32].fill(0xff);
        }
        vec![env]
    });
    let e = pair_off_node(JobKind::Overlap, 2).acme_error(second);
    assert!(
        matches!(
            by_globex(&e),
            Violation::Psi(PsiError::InvalidPoint { index: 259 })
        ),
        "{e}"
    );
    // The identity.
    let e = pair_off_node(JobKind::Overlap, 2)
        .acme_error(on_points(Phase::PsiBlinded, |p| p[32..64].fill(0)));
    assert!(
        matches!(
            by_globex(&e),
            Violation::Psi(PsiError::IdentityPoint { index: 1 })
        ),
        "{e}"
    );
    // Not whole points: refused when it arrives, before any piece holds it.
    let mut pair = pair_off_node(JobKind::Overlap, 2);
    let e = {
        pair.run(on_points(Phase::PsiBlinded, |p| {
            p.pop();
        }));
        pair.acme.error.take().expect("acme failed the job")
    };
    assert!(
        matches!(
            by_globex(&e),
            Violation::Psi(PsiError::BatchNotMultipleOfPointLen { .. })
        ),
        "{e}"
    );
    assert_eq!(pair.acme.pieces_handed_out, 0);
    // The cluster fails: this node's error, with the cluster's words.
    let mut proto = pair_off_node(JobKind::Overlap, 2).acme.proto;
    let e = proto
        .handle_reblinded(0, Err(ReblindFailure::Cluster("executor lost".into())))
        .expect_err("a failure");
    assert!(e.to_string().contains("executor lost"), "{e}");
    // A piece that was never handed out.
    let mut proto = pair_off_node(JobKind::Overlap, 2).acme.proto;
    let e = proto
        .handle_reblinded(0, Ok(Vec::new()))
        .expect_err("not out");
    assert!(matches!(e, JobError::Internal(_)), "{e}");
}
