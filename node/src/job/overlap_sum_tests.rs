//! The overlap-sum protocol's wire order, without sockets: a [`Pair`] runs the key holder (acme)
//! and the value holder (globex) against each other in memory, doing their CPU work inline and
//! drawing their noise as the driver would (the draws are kept here, so the noised sums can be
//! checked exactly). Tamper hooks play either side hostile by changing, dropping, repeating or
//! inventing its frames. The hostile cases `tests/overlap_sum.rs` needs processes for are here
//! at the protocol level; what the reader catches (frames that do not decode, another job's id,
//! oversize frames, a flood of points) is pinned by `frame_budget` and the transport's tests,
//! and a stream that ends early by the driver (`JobError::ClosedEarly`).

use std::path::Path;

use cleanroom_circuits::spill::{MemoryStore, OwnSetBuilder, SpilledOwn};
use cleanroom_circuits::{ItemSet, JobKey, ahe};
use cleanroom_proto::v1::{JobKind, JobSpec, OverlapSumSpec};

use super::*;
use crate::data::dataset::KeyedRowCounts;
use crate::job::psi::{BATCH_POINTS, MergePlace, ReblindPlace};
use crate::job::test_pair::{Side, abort_at, first_of, hello, is_points, nth, on_points};
use crate::policy::NodeConfig;
use crate::test_fixtures::{NOW, node_head, two_party_spec};

/// Each side's clipping bound for `amount_cents`.
const BOUND: u64 = 1000;

/// `me`'s config with one overlap-sum agreement with `partner`; `extra` adds allow-entry keys.
fn node_config(me: &str, partner: &str, extra: &str) -> NodeConfig {
    let text = node_head(me)
        + &format!(
            r#"dataset = [{{ name = "customers", path = "customers.csv", identifier = [{{ name = "email", column = "email", normaliser = "email" }}], value = [{{ column = "amount_cents", min = 0, max = 100000 }}] }}]
agreement = [{{ partner = "{partner}", purposes = ["fraud-detection"], budget_per_purpose = {{ epsilon_per_period = 10, period = "day" }}, allow = [{{ computation = "overlap-sum", dataset = "customers", keys = ["email"], min_set_size = 1, max_set_size = 1000, value_columns = [{{ column = "amount_cents", min = 0, max = {BOUND} }}] {extra} }}] }}]
"#
        );
    NodeConfig::parse(&text, Path::new("/nonexistent/node.toml")).expect("test config")
}

fn spec() -> JobSpec {
    JobSpec {
        overlap_sum: Some(OverlapSumSpec {
            sums: vec!["amount_cents".into()],
            group_by: String::new(),
            groups: Vec::new(),
            count: true,
        }),
        ..two_party_spec(JobKind::OverlapSum, "fraud-detection", false)
    }
}

/// One side's protocol config for job `job-1` (0 = acme, the key holder).
fn config(me: usize, extra: &str) -> SumConfig {
    let names = ["acme", "globex"];
    let cfg = node_config(names[me], names[1 - me], extra);
    let spec = spec();
    let permit = crate::policy::psi::check_offer_at(&cfg, &spec, me, NOW).expect("permitted");
    let sum = spec.overlap_sum.as_ref().expect("sum spec");
    SumConfig {
        job_id: "job-1".into(),
        me: names[me].into(),
        permit,
        digest: crate::spec::spec_digest("job-1", &spec),
        shape: SumShape::of(sum),
        show_count: sum.count,
        reblind: ReblindPlace::Node,
        encrypt: EncryptPlace::Node,
        merge: MergePlace::Node,
        batch_points: BATCH_POINTS,
    }
}

fn email(i: u32) -> String {
    format!("person-{i}@example.com")
}

fn amount(i: u32) -> u64 {
    u64::from(i) * 7
}

/// Items `from..to`, as a node's distinct keys.
fn items(from: u32, to: u32) -> ItemSet {
    let mut set = ItemSet::new();
    for i in from..to {
        set.push(email(i).as_bytes()).expect("room");
    }
    set.dedup();
    set
}

/// The value holder's input over items `from..to`: a count and an amount per item, in the set's
/// order, laid out as the loader lays them out.
fn input(from: u32, to: u32) -> SumInput {
    let items = items(from, to);
    let mut values = Vec::new();
    for item in items.iter() {
        let i = (from..to)
            .find(|&i| email(i).as_bytes() == item)
            .expect("an item of ours");
        values.extend([1, amount(i)]);
    }
    let sensitivities = vec![1, BOUND];
    let layout = ahe::SlotLayout::for_maxima(&sensitivities).expect("layout");
    SumInput {
        keys: SumKeys::Items(items),
        values,
        layout,
        sensitivities,
        counts: KeyedRowCounts::default(),
        rows_bad_value: 0,
        keys_with_several_groups: 0,
    }
}

type Tamper = Box<dyn FnMut(Envelope) -> Vec<Envelope>>;

fn honest() -> Tamper {
    Box::new(|env| vec![env])
}

/// The key holder (acme) and the value holder (globex), back to back.
struct Pair {
    acme: Side<KeyHolder>,
    globex: Side<ValueHolder>,
}

impl Pair {
    fn with(acme_extra: &str, globex_extra: &str) -> Pair {
        let acme = KeyHolder::start(config(0, acme_extra), JobKey::generate(), items(0, 30))
            .expect("key holder starts");
        let globex = ValueHolder::start(
            config(1, globex_extra),
            input(10, 50),
            ahe::keygen().expect("paillier key"),
        )
        .expect("value holder starts");
        Pair {
            acme: Side::new(acme),
            globex: Side::new(globex),
        }
    }

    fn honest() -> Pair {
        Pair::with("", "")
    }

    /// Runs both sides until neither moves, passing acme's frames through `to_globex` and
    /// globex's through `to_acme`.
    fn run(&mut self, mut to_globex: Tamper, mut to_acme: Tamper) {
        loop {
            for env in self.acme.drain() {
                self.globex.inbox.extend(to_globex(env));
            }
            for env in self.globex.drain() {
                self.acme.inbox.extend(to_acme(env));
            }
            let moved_a = self.acme.step();
            let moved_g = self.globex.step();
            // A cluster finishes pieces while frames wait: one piece each when nothing else
            // moves (the last handed out first).
            if !moved_a && !moved_g && !self.acme.finish_pieces() && !self.globex.finish_pieces() {
                return;
            }
        }
    }

    /// Globex's error after acme's frames went through `tamper`.
    fn globex_error(mut self, tamper: impl FnMut(Envelope) -> Vec<Envelope> + 'static) -> JobError {
        self.run(Box::new(tamper), honest());
        self.globex.error.expect("globex failed the job")
    }

    /// Acme's error after globex's frames went through `tamper`.
    fn acme_error(mut self, tamper: impl FnMut(Envelope) -> Vec<Envelope> + 'static) -> JobError {
        self.run(honest(), Box::new(tamper));
        self.acme.error.expect("acme failed the job")
    }
}

fn by(name: &str, e: &JobError) -> Violation {
    match e {
        JobError::Violation {
            by: Party::Node(n),
            violation,
        } if n == name => violation.clone(),
        other => panic!("not a violation by {name}: {other:?}"),
    }
}

/// `f` applied to the overlap-sum terms of the hello.
fn sum_terms(mut f: impl FnMut(&mut SumTerms) + 'static) -> impl FnMut(Envelope) -> Vec<Envelope> {
    hello(move |h| {
        if let Some(t) = &mut h.sum {
            f(t);
        }
    })
}

/// The exact sums over the intersection (items 10..30): the count, then the amounts.
/// A second holder of `key` (the session, and the executors that re-blind with it).
fn copy(key: &JobKey) -> JobKey {
    JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("a key")
}

/// A key holder's points as its executors blind them on a cluster: spilled to buckets (in
/// memory here), as the driver keeps them.
fn spilled(points: &[cleanroom_circuits::EncodedPoint]) -> SpilledOwn {
    let mut own = OwnSetBuilder::new(Box::new(MemoryStore::default()));
    own.add_points(points).expect("spilled");
    own.finish().expect("sorted")
}

/// A key holder over items 0..30 whose points were blinded and spilled as its dataset was read
/// (a node under a `memory_limit`), sending batches of 4.
fn spilled_key_holder() -> KeyHolder {
    let a = SumConfig {
        batch_points: 4,
        ..config(0, "")
    };
    let key = JobKey::generate();
    let mut own = OwnSetBuilder::new(Box::new(MemoryStore::default()));
    own.add(&key, &a.params().key_name, &items(0, 30))
        .expect("spilled");
    KeyHolder::start_spilled(a, key, own.finish().expect("sorted")).expect("key holder starts")
}

/// A key holder whose points were blinded and spilled as its dataset was read sends them in
/// batches, and the value holder gets the same exact sums.
#[test]
fn a_spilled_key_holder_gives_the_same_sums() {
    let acme = spilled_key_holder();
    let globex = ValueHolder::start(
        config(1, ""),
        input(10, 50),
        ahe::keygen().expect("paillier key"),
    )
    .expect("value holder starts");
    let (kh, vh) = run_honestly(acme, globex);
    assert_eq!(vh.cells, truth());
    assert_eq!(kh.sizes, (30, 40));
}

/// A spilled key holder whose buckets are merged off the node (by "executors" reading its job
/// directory) finds the same rows matched: the value holder gets the same exact sums, and one
/// merge was handed out.
#[test]
fn a_key_holder_merging_off_the_node_gives_the_same_sums() {
    let root = tempfile::tempdir().expect("a directory");
    let a = SumConfig {
        batch_points: 4,
        merge: MergePlace::Elsewhere,
        ..config(0, "")
    };
    let key = JobKey::generate();
    let store = crate::job::spill::FileStore::create(root.path(), "job-kh").expect("a store");
    let dir = store.dir().to_path_buf();
    let mut own = OwnSetBuilder::new(Box::new(store));
    own.add(&key, &a.params().key_name, &items(0, 30))
        .expect("spilled");
    let acme =
        KeyHolder::start_spilled(a, key, own.finish().expect("sorted")).expect("key holder starts");
    let globex = ValueHolder::start(
        config(1, ""),
        input(10, 50),
        ahe::keygen().expect("paillier key"),
    )
    .expect("value holder starts");
    let mut acme = Side::new(acme);
    let sealing = crate::data::cluster_pass::SealingKey::from_bytes(&[5; 32]).expect("a key");
    acme.merge_dir = Some((sealing, dir));
    let mut pair = Pair {
        acme,
        globex: Side::new(globex),
    };
    pair.run(honest(), honest());
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    assert_eq!(pair.acme.merges_handed_out, 1);
    let kh = pair
        .acme
        .proto
        .into_exchange()
        .expect("key holder finished");
    let vh = pair
        .globex
        .proto
        .into_exchange()
        .expect("value holder finished");
    assert_eq!(vh.cells, truth());
    assert_eq!(kh.sizes, (30, 40));
}

/// Runs both sides honestly to the end: neither may fail.
fn run_honestly(acme: KeyHolder, globex: ValueHolder) -> (KhExchange, VhExchange) {
    let mut pair = Pair {
        acme: Side::new(acme),
        globex: Side::new(globex),
    };
    pair.run(honest(), honest());
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    let kh = pair.acme.proto.into_exchange();
    let vh = pair.globex.proto.into_exchange();
    (
        kh.expect("key holder finished"),
        vh.expect("value holder finished"),
    )
}

/// [`input`] as a value holder under a `memory_limit` holds it: its rows blinded with a fresh
/// key and put, one record per point, in buckets (in memory here), each bucket sorted.
fn spilled_input(from: u32, to: u32) -> SumInput {
    use cleanroom_circuits::intersection_sum::SpilledValues;
    use cleanroom_circuits::spill::{BUCKETS, PointSet, PointStore, bucket_of};
    let SumInput {
        keys: SumKeys::Items(items),
        values,
        layout,
        sensitivities,
        ..
    } = input(from, to)
    else {
        panic!("identifiers in memory");
    };
    let key = JobKey::generate();
    let points = cleanroom_circuits::blind_items(&key, "email", &items);
    let mut buckets = vec![Vec::<Vec<u8>>::new(); BUCKETS];
    for (point, cells) in points.iter().zip(values.chunks(2)) {
        let mut record = point.to_vec();
        for cell in cells {
            record.extend_from_slice(&cell.to_le_bytes());
        }
        buckets[bucket_of(point)].push(record);
    }
    let mut store = MemoryStore::default();
    for (b, mut records) in buckets.into_iter().enumerate() {
        records.sort();
        store
            .put(PointSet::ValueCells, b, &records.concat())
            .expect("in memory");
    }
    let own = SpilledValues::new(Box::new(store), points.len() as u64, 2);
    SumInput {
        keys: SumKeys::Spilled(key, own),
        values: Vec::new(),
        layout,
        sensitivities,
        counts: KeyedRowCounts::default(),
        rows_bad_value: 0,
        keys_with_several_groups: 0,
    }
}

/// A value holder whose rows were spilled as its dataset was read sends its points and returns
/// the key holder's in batches (after the key holder's last point), and gets the same exact
/// sums, facing a key holder in memory or a spilled one.
#[test]
fn a_spilled_value_holder_gives_the_same_sums() {
    for spilled in [false, true] {
        let acme = if spilled {
            spilled_key_holder()
        } else {
            KeyHolder::start(config(0, ""), JobKey::generate(), items(0, 30))
                .expect("key holder starts")
        };
        let b = SumConfig {
            batch_points: 4,
            ..config(1, "")
        };
        let globex = ValueHolder::start(b, spilled_input(10, 50), ahe::keygen().expect("key"))
            .expect("value holder starts");
        let (_, vh) = run_honestly(acme, globex);
        assert_eq!(vh.cells, truth());
        assert_eq!(vh.sizes, (40, 30));
        // Its rows as put (48 bytes each), and the key holder's points twice (32 bytes each).
        assert_eq!(vh.spilled_bytes, 40 * 48 + 2 * 30 * 32);
    }
}

fn truth() -> [i128; 2] {
    [20, (10..30).map(|i| i128::from(amount(i))).sum()]
}

#[test]
fn an_honest_run_gives_the_value_holder_the_exact_sums_and_the_key_holder_nothing() {
    let mut pair = Pair::honest();
    pair.run(honest(), honest());
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    assert!(pair.acme.finished_stream && pair.globex.finished_stream);
    // One re-check after the hello, one before the result leaves the key holder.
    assert_eq!(pair.acme.rechecks, 2);
    assert_eq!(pair.globex.rechecks, 1);
    // Nobody sets ε: nothing charged, zeros drawn.
    for (loss, noise) in pair.acme.charges.iter().chain(&pair.globex.charges) {
        assert!(loss.is_none());
        assert_eq!(noise, &vec![0, 0]);
    }
    let kh = pair
        .acme
        .proto
        .into_exchange()
        .expect("key holder finished");
    let vh = pair
        .globex
        .proto
        .into_exchange()
        .expect("value holder finished");
    assert_eq!(kh.sizes, (30, 40));
    assert_eq!(vh.sizes, (40, 30));
    assert_eq!(vh.cells, truth());
    assert!(!vh.charged);
    // Both describe the same release, so the coordinator can compare them.
    assert_eq!(kh.release, vh.release);
    assert!(kh.release.noise.is_empty());
}

/// Both parties re-blind the other's points off the node, as their executors do, in pieces of 8
/// batches of 4 points that come back last first: the value holder gets the same exact sums.
/// Each side takes the pieces back in the other's order (the key holder matches positions in
/// the value holder's order; a piece taken out of order would sum other rows).
#[test]
fn reblinding_off_the_node_gives_the_same_sums() {
    let off_node = |me: usize, in_flight: usize| SumConfig {
        reblind: ReblindPlace::Elsewhere { in_flight },
        batch_points: 4,
        ..config(me, "")
    };
    let (a, g) = (off_node(0, 2), off_node(1, 3));
    let key_name = a.params().key_name;
    let (acme_key, globex_key) = (JobKey::generate(), JobKey::generate());
    let points = cleanroom_circuits::blind_items(&acme_key, &key_name, &items(0, 30));
    let acme =
        KeyHolder::start_spilled(a, copy(&acme_key), spilled(&points)).expect("key holder starts");
    let mut globex_input = input(10, 50);
    let points = cleanroom_circuits::blind_items(&globex_key, &key_name, &items(10, 50));
    globex_input.keys = SumKeys::Blinded(copy(&globex_key), points);
    let globex = ValueHolder::start(g, globex_input, ahe::keygen().expect("paillier key"))
        .expect("value holder starts");
    let mut pair = Pair {
        acme: Side::with_cluster(acme, acme_key),
        globex: Side::with_cluster(globex, globex_key),
    };
    pair.run(honest(), honest());
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    // 40 of globex's points in pieces of at most 32 (as they wait), 30 of acme's.
    assert!(pair.acme.pieces_handed_out > 1);
    assert!(pair.globex.pieces_handed_out >= 1);
    let vh = pair
        .globex
        .proto
        .into_exchange()
        .expect("value holder finished");
    assert_eq!(vh.cells, truth());
    assert!(pair.acme.proto.into_exchange().is_some());
}

/// The value holder's rows encrypted off the node, as its executors do, in pieces of 7 rows, 3
/// out at once, that come back last first: the sums are the same, so the ciphertexts went out
/// in the order the points did (the key holder sums by position).
#[test]
fn encrypting_off_the_node_gives_the_same_sums() {
    let g = SumConfig {
        reblind: ReblindPlace::Elsewhere { in_flight: 2 },
        encrypt: EncryptPlace::Elsewhere {
            in_flight: 3,
            piece_rows: 7,
        },
        batch_points: 4,
        ..config(1, "")
    };
    let key_name = g.params().key_name;
    let acme = KeyHolder::start(config(0, ""), JobKey::generate(), items(0, 30))
        .expect("key holder starts");
    let globex_key = JobKey::generate();
    let mut globex_input = input(10, 50);
    let points = cleanroom_circuits::blind_items(&globex_key, &key_name, &items(10, 50));
    globex_input.keys = SumKeys::Blinded(copy(&globex_key), points);
    let layout = globex_input.layout.clone();
    let paillier = ahe::keygen().expect("paillier key");
    let copy_of_paillier =
        ahe::SecretKey::from_prime_bytes(&paillier.prime_bytes()).expect("a copy");
    let globex = ValueHolder::start(g, globex_input, paillier).expect("value holder starts");
    let mut globex = Side::with_cluster(globex, globex_key);
    globex.cluster_paillier = Some((copy_of_paillier, layout));
    let mut pair = Pair {
        acme: Side::new(acme),
        globex,
    };
    pair.run(honest(), honest());
    assert!(pair.acme.error.is_none(), "{:?}", pair.acme.error);
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    // 40 rows in pieces of 7.
    assert_eq!(pair.globex.encrypt_pieces_handed_out, 6);
    let vh = pair
        .globex
        .proto
        .into_exchange()
        .expect("value holder finished");
    assert_eq!(vh.cells, truth());
}

/// Pieces of rows back from the cluster go out in the order they were handed out, whole, cut
/// in the key holder's batches; a piece that was not out, came back twice or holds the wrong
/// number of bytes fails the job as this node's own error.
#[test]
fn encrypted_pieces_go_out_in_order_and_only_whole() {
    let mut rows = OffNodeRows::new(2, 3);
    rows.row_bytes = 10;
    let first = rows.hand_out(vec![1, 2, 3], 1).expect("a piece");
    let second = rows.hand_out(vec![4, 5], 1).expect("a piece");
    assert_eq!((first.offset, first.row_count), (0, 3));
    assert_eq!((second.offset, second.row_count), (3, 2));
    assert!(rows.hand_out(vec![1, 2, 3], 2).is_err(), "not whole rows");
    rows.take_back(3, vec![2; 20]).expect("taken");
    assert!(rows.ready().is_empty(), "waits for the first piece");
    assert!(rows.waiting());
    for bad in [(3, vec![2; 20]), (9, vec![0; 10]), (0, vec![1; 29])] {
        let err = rows.take_back(bad.0, bad.1).expect_err("refused");
        assert!(matches!(err, JobError::Compute { .. }), "{err:?}");
    }
    rows.take_back(0, vec![1; 30]).expect("taken");
    assert!(!rows.waiting());
    let sent: Vec<u8> = rows.ready().concat();
    assert_eq!(sent, [vec![1; 30], vec![2; 20]].concat());
    assert!(rows.pending.is_empty());
}

/// Off the node, the partner's bad point is its violation, named by its place in its whole
/// stream, as on the node; a failure of the cluster is this node's.
#[test]
fn bad_points_reblinded_off_the_node_are_the_partners_violations() {
    let a = SumConfig {
        reblind: ReblindPlace::Elsewhere { in_flight: 2 },
        batch_points: 4,
        ..config(0, "")
    };
    let key_name = a.params().key_name;
    let key = JobKey::generate();
    let points = cleanroom_circuits::blind_items(&key, &key_name, &items(0, 30));
    let acme =
        KeyHolder::start_spilled(a, copy(&key), spilled(&points)).expect("key holder starts");
    let globex = ValueHolder::start(
        SumConfig {
            batch_points: 4,
            ..config(1, "")
        },
        input(10, 50),
        ahe::keygen().expect("paillier key"),
    )
    .expect("value holder starts");
    let pair = Pair {
        acme: Side::with_cluster(acme, key),
        globex: Side::new(globex),
    };
    // globex's third batch of points (frame 3: hello, then batches of 4): its second point is
    // not one.
    let err = pair.acme_error(nth(3, |mut env| {
        if let Some(Body::Points(b)) = &mut env.body {
            b.points[32..64].copy_from_slice(&[0xff; 32]);
        }
        vec![env]
    }));
    assert_eq!(
        by("globex", &err),
        Violation::Psi(cleanroom_circuits::PsiError::InvalidPoint { index: 9 })
    );
}

#[test]
fn each_party_adds_its_own_noise_and_asks_to_be_charged_for_the_joint_epsilon() {
    let mut pair = Pair::with(", epsilon = 0.5", ", epsilon = 1.0");
    pair.run(honest(), honest());
    assert!(pair.globex.error.is_none(), "{:?}", pair.globex.error);
    let [(kh_loss, kh_noise)] = pair.acme.charges.as_slice() else {
        panic!("one charge at the key holder")
    };
    let [(vh_loss, vh_noise)] = pair.globex.charges.as_slice() else {
        panic!("one charge at the value holder")
    };
    // The joint ε is the smaller one, at both.
    assert_eq!(*kh_loss, Some(Loss::Epsilon(0.5)));
    assert_eq!(*vh_loss, Some(Loss::Epsilon(0.5)));
    let vh = pair.globex.proto.into_exchange().expect("finished");
    assert!(vh.charged);
    let t = truth();
    for c in 0..2 {
        assert_eq!(
            vh.cells[c],
            t[c] + i128::from(kh_noise[c]) + i128::from(vh_noise[c]),
            "cell {c}: the truth plus both parties' noise, exactly"
        );
    }
    assert_eq!(vh.release.noise.len(), 4, "both parties, each column");
}

#[test]
fn a_bad_key_holder_hello_is_refused_before_any_work() {
    let e = Pair::honest().globex_error(hello(|h| h.sender = "mallory".into()));
    assert_eq!(by("acme", &e), Violation::WrongSender("mallory".into()));
    let e = Pair::honest().globex_error(hello(|h| h.spec_digest = vec![0; 32]));
    assert_eq!(by("acme", &e), Violation::SpecMismatch);
    let e = Pair::honest().globex_error(hello(|h| h.sum = None));
    assert_eq!(
        by("acme", &e),
        Violation::Terms("its hello carries no overlap-sum terms".into())
    );
    let e = Pair::honest().globex_error(hello(|h| h.noise_commitment = vec![1; 32]));
    assert_eq!(
        by("acme", &e),
        Violation::Terms("it announced overlap noise for an overlap-sum".into())
    );
    let e = Pair::honest().globex_error(sum_terms(|t| {
        t.public_key = vec![1; 256];
    }));
    assert!(
        by("acme", &e)
            .to_string()
            .contains("a value holder's layout or key")
    );
    let e = Pair::honest().globex_error(sum_terms(|t| {
        t.min_result = 0;
        t.epsilon = f64::NAN;
    }));
    assert!(
        by("acme", &e)
            .to_string()
            .starts_with("its overlap-sum terms: ")
    );
    // A size the agreement does not allow is this node's policy refusing, not a violation.
    let e = Pair::honest().globex_error(hello(|h| h.set_size = 5000));
    assert!(matches!(e, JobError::Refused(_)), "{e:?}");
}

#[test]
fn a_bad_value_holder_hello_is_refused_before_any_work() {
    let e = Pair::honest().acme_error(sum_terms(|t| {
        t.widths.push(8);
    }));
    assert_eq!(
        by("globex", &e),
        Violation::Terms("its slot layout does not match the bounds it declared".into())
    );
    let e = Pair::honest().acme_error(sum_terms(|t| {
        t.public_key = vec![2; 256];
    }));
    assert!(matches!(by("globex", &e), Violation::Sum(_)), "{e:?}");
    // No work was handed out before the hello was checked.
    let mut pair = Pair::honest();
    pair.run(
        honest(),
        Box::new(hello(|h| {
            h.sender = "mallory".into();
        })),
    );
    assert_eq!(pair.acme.rechecks, 0);
    assert!(pair.acme.charges.is_empty());
}

#[test]
fn frames_of_another_phase_or_kind_are_violations() {
    // A second hello where blinded points are due.
    let e = Pair::honest().globex_error(nth(1, |env| {
        let mut second = env.clone();
        second.phase = Phase::PsiSize as i32;
        second.body = Some(Body::PsiHello(PsiHello::default()));
        vec![second, env]
    }));
    assert!(
        matches!(by("acme", &e), Violation::WrongPhase { .. }),
        "{e:?}"
    );
    // An end marker in the result phase, where the sums are due.
    let e = Pair::honest().globex_error(first_of(Phase::SumResult, is_points, |mut env| {
        env.body = Some(Body::BatchEnd(BatchEnd { total: 0 }));
        vec![env]
    }));
    assert!(
        matches!(by("acme", &e), Violation::Unexpected { .. }),
        "{e:?}"
    );
    // The rows sent before the points were returned.
    let e = Pair::honest().acme_error(first_of(Phase::PsiDoubleBlinded, is_points, |mut env| {
        env.phase = Phase::SumRows as i32;
        vec![env]
    }));
    assert!(
        matches!(by("globex", &e), Violation::WrongPhase { .. }),
        "{e:?}"
    );
}

#[test]
fn batches_out_of_order_or_replayed_are_violations() {
    // The value holder's first blinded batch, sent twice.
    let e = Pair::honest().acme_error(first_of(Phase::PsiBlinded, is_points, |env| {
        vec![env.clone(), env]
    }));
    assert_eq!(
        by("globex", &e),
        Violation::OutOfOrder {
            got: 0,
            expected: 1
        }
    );
    // A batch numbered ahead.
    let e = Pair::honest().globex_error(first_of(Phase::PsiBlinded, is_points, |mut env| {
        if let Some(Body::Points(b)) = &mut env.body {
            b.seq = 3;
        }
        vec![env]
    }));
    assert_eq!(
        by("acme", &e),
        Violation::OutOfOrder {
            got: 3,
            expected: 0
        }
    );
    // A row batch dropped: the key holder's count of rows falls short.
    let e = Pair::honest().acme_error(first_of(Phase::SumRows, is_points, |_| Vec::new()));
    assert!(matches!(by("globex", &e), Violation::Sum(_)), "{e:?}");
}

#[test]
fn a_bad_result_ciphertext_is_the_key_holders_violation_with_the_e2e_words() {
    let result = |f: fn(&mut Vec<u8>)| -> Tamper { Box::new(on_points(Phase::SumResult, f)) };
    let words = |tamper: Tamper| by("acme", &Pair::honest().globex_error(tamper)).to_string();
    assert!(words(result(|p| p.fill(0xff))).contains("not below n²"));
    assert!(words(result(|p| p.fill(0))).contains("shares a factor with n"));
    assert!(
        words(result(|p| {
            p.pop();
        }))
        .contains("encoding of")
    );
}

#[test]
fn an_abort_ends_the_job_with_the_peers_reason() {
    let e = Pair::honest().globex_error(abort_at(1, "disk full"));
    assert_eq!(e.to_string(), "node 'acme' aborted the job: disk full");
}

#[test]
fn a_peer_that_stops_early_leaves_the_protocol_unfinished_with_its_silence_allowance() {
    let mut pair = Pair::honest();
    assert_eq!(pair.globex.proto.silence_allowed(), STALL_BASE);
    // Acme sends its hello and its blinded points, then nothing more.
    let mut sent = 0;
    pair.run(
        Box::new(move |env| {
            sent += 1;
            if sent <= 2 { vec![env] } else { Vec::new() }
        }),
        honest(),
    );
    assert!(pair.globex.error.is_none());
    assert!(!pair.globex.proto.is_finished());
    // Once both sizes are known the allowance covers both sets and our rows' encryption.
    assert!(pair.globex.proto.silence_allowed() > stall_deadline(40, 30));
    assert!(pair.globex.proto.into_exchange().is_none());
}

#[test]
fn violations_read_as_they_did_in_the_async_code() {
    let e = Pair::honest().globex_error(hello(|h| h.sum = None));
    assert_eq!(
        crate::error::NodeError::from(e).to_string(),
        "protocol violation by node 'acme': its hello carries no overlap-sum terms"
    );
}
