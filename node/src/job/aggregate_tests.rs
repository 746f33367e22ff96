//! The aggregate session without a network: three sessions (acme, globex, initech) exchange
//! their hellos in memory, load test vectors, and their partials are summed as the coordinator
//! sums them. Hostile hellos and terms are played by rewriting one party's hello.

use cleanroom_proto::v1::JobSpec;
use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::policy::NodeConfig;
use crate::test_fixtures::{aggregate_spec, chargebacks_config};

const NAMES: [&str; 3] = ["acme", "globex", "initech"];

/// `me`'s config: one aggregate agreement with each other party (`extra` adds entry keys).
fn node_config(me: &str, extra: &str) -> NodeConfig {
    let allow =
        format!("  value_columns = [{{ column = \"amount\", min = 0, max = 5000 }}]\n{extra}");
    let agreements: Vec<(&str, &str)> = NAMES
        .iter()
        .filter(|n| **n != me)
        .map(|n| (*n, allow.as_str()))
        .collect();
    chargebacks_config(me, &agreements)
}

fn spec() -> JobSpec {
    aggregate_spec(&NAMES)
}

/// Party `me`'s session config, as its policy permits the job.
fn config(me: usize, extra: &str) -> AggConfig {
    let cfg = node_config(NAMES[me], extra);
    let spec = spec();
    let terms = crate::policy::aggregate::check_offer_at(&cfg, &spec, me, 0).expect("permitted");
    let mut sensitivities = vec![1u64];
    sensitivities.extend(
        terms
            .permit
            .value_columns
            .iter()
            .map(|v| v.min.unsigned_abs().max(v.max.unsigned_abs()).max(1)),
    );
    AggConfig {
        job_id: "job-1".into(),
        me: NAMES[me].into(),
        peers: terms.peers.clone(),
        digest: crate::spec::spec_digest("job-1", &spec),
        own_terms: AggregateTerms {
            epsilon: terms.permit.epsilon.map_or(0.0, |e| e.get()),
            max_colluders: terms.max_colluders,
            min_result: terms.permit.min_result,
            sensitivities,
        },
        permit: terms.permit,
        columns: vec!["count".into(), "amount".into()],
        per_person: false,
        delta: 1e-9,
    }
}

/// Party `me`'s vector: 3 groups (a, b, other) × (count, amount).
fn vector(me: usize) -> GroupVector {
    let mut v = GroupVector::zeros(3, 2).expect("shape");
    for g in 0..3 {
        v.add(g, 0, (me + g + 1) as i64).expect("count");
        v.add(g, 1, (100 * (me + 1) + g) as i64).expect("sum");
    }
    v
}

/// One party: its session and what it handed out.
struct Node {
    session: AggregateSession,
    inbox: VecDeque<(String, Envelope)>,
    partial: Vec<u64>,
    outcome: Option<AggregateOutcome>,
    rechecks: usize,
    audits: usize,
    charges: Vec<Option<Loss>>,
    error: Option<JobError>,
}

type Tamper = Box<dyn FnMut(&str, Envelope) -> Envelope>;

/// Three sessions wired together; `tamper(to, hello)` rewrites each hello globex sends.
struct Net {
    parties: Vec<Node>,
}

impl Net {
    fn new(extra: &str) -> Net {
        let parties = (0..3)
            .map(|me| {
                let seeds = (0..2)
                    .map(|_| ShareSeed::generate().expect("seed"))
                    .collect();
                Node {
                    session: AggregateSession::start(config(me, extra), seeds),
                    inbox: VecDeque::new(),
                    partial: Vec::new(),
                    outcome: None,
                    rechecks: 0,
                    audits: 0,
                    charges: Vec::new(),
                    error: None,
                }
            })
            .collect();
        Net { parties }
    }

    fn run(&mut self, mut tamper: Tamper) {
        loop {
            let mut moved = false;
            for (me, name) in NAMES.iter().enumerate() {
                let mut mail: Vec<(String, Envelope)> = Vec::new();
                let party = &mut self.parties[me];
                while party.error.is_none() {
                    let Some(step) = party.session.next_step() else {
                        break;
                    };
                    moved = true;
                    let r = match step {
                        AggStep::Hello { peer, hello } => {
                            let hello = if *name == "globex" {
                                tamper(&peer, *hello)
                            } else {
                                *hello
                            };
                            mail.push((peer, hello));
                            Ok(())
                        }
                        AggStep::Load => party.session.on_loaded(10, vector(me)),
                        AggStep::Compute(work) => party.session.handle_done(work.run()),
                        AggStep::AwaitDelivery => party.session.on_delivered(),
                        AggStep::Charge(NoiseRequest { loss, draw }) => {
                            party.charges.push(loss);
                            let noise = draw().expect("noise");
                            party.session.handle_noise(noise, loss.is_some())
                        }
                        AggStep::Recheck => {
                            party.rechecks += 1;
                            Ok(())
                        }
                        AggStep::Audit(_) => {
                            party.audits += 1;
                            party.session.on_audited("7:abc".into())
                        }
                        AggStep::Partial(frame) => {
                            if let Some(Body::AggPartial(p)) = frame.body {
                                aggregate::decode_cells(&p.cells, &mut party.partial, 6)
                                    .expect("cells");
                            }
                            Ok(())
                        }
                        AggStep::Report(outcome) => {
                            party.outcome = Some(*outcome);
                            Ok(())
                        }
                    };
                    if let Err(e) = r {
                        party.error = Some(e);
                    }
                }
                for (to, env) in mail {
                    let i = NAMES.iter().position(|n| *n == to).expect("a party");
                    self.parties[i].inbox.push_back(((*name).into(), env));
                }
            }
            for party in &mut self.parties {
                if party.error.is_some() {
                    continue;
                }
                if let Some((from, env)) = party.inbox.pop_front() {
                    moved = true;
                    if let Err(e) = party.session.on_peer_hello(&from, env) {
                        party.error = Some(e);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn honest(&mut self) {
        self.run(Box::new(|_, env| env));
    }
}

fn truth() -> Vec<u64> {
    let mut sum = vec![0u64; 6];
    for me in 0..3 {
        for (s, c) in sum.iter_mut().zip(vector(me).cells()) {
            *s = s.wrapping_add(*c);
        }
    }
    sum
}

#[test]
fn the_partials_of_an_honest_run_sum_to_the_truth_and_the_terms_agree() {
    let mut net = Net::new("");
    net.honest();
    let mut sum = vec![0u64; 6];
    for p in &net.parties {
        assert!(p.error.is_none(), "{:?}", p.error);
        assert!(p.session.is_finished());
        assert_eq!((p.rechecks, p.audits), (1, 1));
        assert_eq!(p.charges, vec![None], "exact: nothing to charge");
        assert_eq!(p.partial.len(), 6);
        for (s, c) in sum.iter_mut().zip(&p.partial) {
            *s = s.wrapping_add(*c);
        }
    }
    assert_eq!(sum, truth());
    // No partial alone is the party's vector.
    for (me, p) in net.parties.iter().enumerate() {
        assert_ne!(p.partial, vector(me).cells());
    }
    let digests: Vec<_> = net
        .parties
        .iter()
        .map(|p| p.outcome.as_ref().expect("reported").terms_digest.clone())
        .collect();
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    let o = net.parties[0].outcome.as_ref().expect("reported");
    assert_eq!((o.cells, o.audit_head.as_str()), (6, "7:abc"));
}

#[test]
fn a_noised_run_asks_each_party_to_charge_the_same_rho() {
    let mut net = Net::new("  epsilon = 1.0");
    net.honest();
    let losses: Vec<_> = net
        .parties
        .iter()
        .map(|p| {
            assert!(p.error.is_none(), "{:?}", p.error);
            p.charges.clone()
        })
        .collect();
    assert!(matches!(losses[0].as_slice(), [Some(Loss::Rho(r))] if *r > 0.0));
    assert!(losses.windows(2).all(|w| w[0] == w[1]));
}

fn globex_hello(mut f: impl FnMut(&mut AggregateHello) + 'static) -> Tamper {
    Box::new(move |_, mut env| {
        if let Some(Body::AggHello(h)) = &mut env.body {
            f(h);
        }
        env
    })
}

/// What acme says of globex's hello.
fn acme_error(tamper: Tamper) -> String {
    let mut net = Net::new("");
    net.run(tamper);
    let e = net.parties[0].error.take().expect("acme failed the job");
    match &e {
        JobError::Violation {
            by: Party::Peer(p), ..
        } if p == "globex" => {}
        other => panic!("not globex's violation: {other:?}"),
    }
    e.to_string()
}

#[test]
fn bad_hellos_are_the_senders_violations_with_the_e2e_words() {
    assert!(
        acme_error(globex_hello(|h| h.sender = "initech".into()))
            .contains("hello claims to be from 'initech' on a connection certified as 'globex'")
    );
    assert!(
        acme_error(globex_hello(|h| h.spec_digest = vec![0; 32])).contains("different job spec")
    );
    assert!(
        acme_error(globex_hello(|h| {
            h.share_seed.pop();
        }))
        .contains("32 bytes")
    );
    assert!(acme_error(globex_hello(|h| h.terms = None)).contains("hello without terms"));
    assert!(
        acme_error(globex_hello(|h| {
            if let Some(t) = &mut h.terms {
                t.max_colluders = 3;
            }
        }))
        .contains("3 colluders among 3 parties")
    );
    assert!(
        acme_error(globex_hello(|h| {
            if let Some(t) = &mut h.terms {
                t.epsilon = f64::NAN;
            }
        }))
        .contains("epsilon NaN")
    );
    assert!(
        acme_error(Box::new(|_, mut env| {
            env.phase = Phase::AggPartial as i32;
            env
        }))
        .starts_with("protocol violation by globex: ")
    );
}

#[test]
fn nothing_is_released_before_every_share_is_in() {
    let mut net = Net::new("");
    // Globex's hellos never arrive.
    net.run(Box::new(|_, mut env| {
        env.job_id = "lost".into();
        env
    }));
    // Acme and initech refuse the hello of another job.
    assert!(net.parties[0].error.is_some() && net.parties[2].error.is_some());
    for p in [&net.parties[0], &net.parties[2]] {
        assert!(p.outcome.is_none() && p.audits == 0, "no release");
    }
    let mut net = Net::new("");
    net.parties[1].session = AggregateSession::start(config(1, ""), Vec::new());
    net.honest();
    let acme = &net.parties[0];
    assert!(acme.error.is_none() && acme.outcome.is_none());
    assert_eq!(acme.session.waiting_for(), vec!["globex"]);
}

#[test]
fn a_second_hello_from_a_peer_is_refused() {
    let mut net = Net::new("");
    let seeds = (0..2)
        .map(|_| ShareSeed::generate().expect("seed"))
        .collect();
    let mut extra = AggregateSession::start(config(1, ""), seeds);
    let mut copies = BTreeMap::new();
    while let Some(step) = extra.next_step() {
        if let AggStep::Hello { peer, hello } = step {
            copies.insert(peer, *hello);
        }
    }
    net.parties[0]
        .inbox
        .push_back(("globex".into(), copies["acme"].clone()));
    net.honest();
    let e = net.parties[0].error.take().expect("acme failed the job");
    assert!(
        e.to_string().contains("a second share from one peer"),
        "{e}"
    );
}
