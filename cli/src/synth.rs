//! Synthetic partner data with a known overlap, for `cleanroom synth`, the demo and benchmarks.
//!
//! The generator thinks in *customers*, numbered in one index space: customers `0..shared` are
//! in every partner's file, and each partner then gets its own disjoint range of customers no
//! other partner has. A customer's identity (name, email, phone) is a pure function of the seed
//! and its index, so a shared customer has the same email and phone everywhere; what differs
//! per partner is the *surface form* (letter case, stray spaces, phone layout), which the
//! node's normalisers undo. Every email ends its local part with the customer index, so no two
//! distinct customers share an email, and the ground truth follows from the index ranges alone.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// Partner names; each gets `<name>.csv`. Names are 1 to 63 of `a-z`, `0-9`, `-`.
    pub partners: Vec<String>,
    /// Rows (= distinct customers) per partner.
    pub rows: u64,
    /// Fraction of each partner's rows that are customers shared by all partners, `0..=1`.
    pub overlap: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

/// What the generated files contain, from the generator's own knowledge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroundTruth {
    /// Partner names, in the order given.
    pub partners: Vec<String>,
    /// The seed used.
    pub seed: u64,
    /// Rows (= distinct customers) in each partner's file.
    pub rows_per_partner: u64,
    /// Customers present in every partner's file.
    pub shared_by_all: u64,
    /// For each pair of partners, keyed `"a,b"` with the names in byte order: the number of
    /// distinct normalised emails both files contain, |A ∩ B|.
    pub pairwise_overlap: BTreeMap<String, u64>,
    /// The customers file of each partner (CSV unless `synth --format` says otherwise).
    pub files: BTreeMap<String, PathBuf>,
    /// The `chargebacks` file of each partner (`chargeback_id,category,amount,bucket`, amounts
    /// in integer cents, buckets integers in `0..CHARGEBACK_BUCKETS`), for aggregate jobs.
    pub chargeback_files: BTreeMap<String, PathBuf>,
    /// Per partner, per category: the rows and the summed amount of its chargebacks file.
    pub chargebacks: BTreeMap<String, BTreeMap<String, GroupTruth>>,
    /// Per category, over all partners: what an exact aggregate returns.
    pub chargebacks_total: BTreeMap<String, GroupTruth>,
    /// Per partner as the value holder of an `overlap-sum` on `email` with any other partner
    /// (every pair shares the same customers), per `category` of its customers file: the
    /// shared customers (`count`) and the sum of their `amount_cents` (`amount`).
    pub shared_sums: BTreeMap<String, BTreeMap<String, GroupTruth>>,
}

/// One group's plaintext figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GroupTruth {
    /// Rows in the group.
    pub count: u64,
    /// Sum of the amounts (integer cents).
    pub amount: u64,
    /// Sum of the `orders` column (customers files only; 0 for chargebacks).
    pub orders: u64,
}

/// The CSV header of every generated chargebacks file.
pub const CHARGEBACK_COLUMNS: [&str; 4] = ["chargeback_id", "category", "amount", "bucket"];

/// The `bucket` column of the chargebacks holds integers in `0..CHARGEBACK_BUCKETS`, uniform
/// and independent of the other columns: a fine-grained integer group domain for aggregate jobs
/// (`--group-by bucket --group-range 0..1000000`). Its per-bucket truth is not in `truth.json`
/// (10^6 entries); [`chargeback_bucket`] recomputes it, or read the files.
pub const CHARGEBACK_BUCKETS: u64 = 1_000_000;

/// The bucket of chargeback row `row` (from 0) of partner number `partner` (from 0) under
/// `seed`: a hash, so the random stream of the other columns is unchanged by it.
pub fn chargeback_bucket(seed: u64, partner: usize, row: u64) -> u64 {
    mix(mix(seed ^ 0xb0c4_e7b0_c4e7) ^ mix(partner as u64 + 1) ^ row) % CHARGEBACK_BUCKETS
}

/// Largest chargeback amount generated, in cents.
pub const MAX_CHARGEBACK_CENTS: u64 = 200_000;

/// The CSV header of every generated file.
pub const COLUMNS: [&str; 8] = [
    "customer_id",
    "email",
    "phone",
    "amount_cents",
    "category",
    "consent_marketing",
    "consent_fraud",
    "orders",
];

/// Largest value of the `orders` column (orders of one customer, 1 to this).
pub const MAX_ORDERS: u64 = 20;

/// Values of the `category` column.
pub const CATEGORIES: [&str; 5] = ["electronics", "fashion", "home", "grocery", "travel"];

const FIRST: [&str; 32] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "karl",
    "laura", "mallory", "nina", "oscar", "peggy", "quinn", "rupert", "sybil", "trent", "ursula",
    "victor", "wendy", "xavier", "yasmin", "zoe", "amir", "bea", "chen", "dmitri", "elena",
    "fatima",
];

const LAST: [&str; 32] = [
    "smith", "jones", "garcia", "miller", "davis", "martin", "lopez", "wilson", "anderson",
    "thomas", "taylor", "moore", "jackson", "white", "harris", "clark", "lewis", "walker", "hall",
    "young", "king", "wright", "scott", "green", "baker", "adams", "nelson", "hill", "campbell",
    "mitchell", "roberts", "carter",
];

/// Domains under reserved names (RFC 2606 / 6761), so no real mailbox is ever named.
const DOMAINS: [&str; 6] = [
    "example.com",
    "example.org",
    "example.net",
    "mail.example",
    "inbox.example",
    "post.test",
];

/// Writes `<out_dir>/<partner>.csv` for each partner and `<out_dir>/truth.json`, creating
/// `out_dir` if needed, and returns the ground truth.
///
/// Shared customers are shuffled through each file, not bunched at the top. Output is a pure
/// function of `spec` — the same spec gives byte-identical files — for one version of this
/// program: a change to the generator or to `rand`'s `StdRng` algorithm (ChaCha12 today) may change it.
pub fn write_synth(spec: &SynthSpec, out_dir: &Path) -> anyhow::Result<GroundTruth> {
    validate(spec)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let rows = spec.rows;
    // Rounding keeps `shared <= rows` since overlap <= 1.
    let shared = ((spec.overlap * rows as f64).round() as u64).min(rows);
    let own = rows - shared;
    let identity_key = mix(spec.seed ^ 0x5eed_1de7_7175_0000);

    let mut files = BTreeMap::new();
    let mut shared_sums = BTreeMap::new();
    for (p, partner) in spec.partners.iter().enumerate() {
        let path = out_dir.join(format!("{partner}.csv"));
        let own_start = shared + p as u64 * own;
        let mut customers: Vec<u64> = (0..shared).chain(own_start..own_start + own).collect();
        let mut rng = StdRng::seed_from_u64(mix(spec.seed ^ mix(p as u64 + 1)));
        customers.shuffle(&mut rng);
        let sums = write_partner(&path, partner, &customers, shared, identity_key, &mut rng)
            .with_context(|| format!("writing {}", path.display()))?;
        files.insert(partner.clone(), path);
        shared_sums.insert(partner.clone(), sums);
    }

    // Each partner's own range is disjoint from every other's, so any two partners share
    // exactly the customers shared by all; and each customer has one distinct email.
    let mut pairwise_overlap = BTreeMap::new();
    for (i, a) in spec.partners.iter().enumerate() {
        for b in &spec.partners[i + 1..] {
            let (x, y) = if a <= b { (a, b) } else { (b, a) };
            pairwise_overlap.insert(format!("{x},{y}"), shared);
        }
    }
    // Chargebacks: one row per fifth of a partner's customers (at least one), from a random
    // stream of their own so that the customer files do not change.
    let mut chargeback_files = BTreeMap::new();
    let mut chargebacks = BTreeMap::new();
    let mut chargebacks_total: BTreeMap<String, GroupTruth> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), GroupTruth::default()))
        .collect();
    for (p, partner) in spec.partners.iter().enumerate() {
        let path = out_dir.join(format!("{partner}-chargebacks.csv"));
        let mut rng = StdRng::seed_from_u64(mix(spec.seed ^ mix(p as u64 + 1) ^ 0xc4a2_6eba_c000));
        let bucket = |row: u64| chargeback_bucket(spec.seed, p, row);
        let per_group =
            write_chargebacks(&path, partner, rows.div_ceil(5).max(1), &mut rng, bucket)
                .with_context(|| format!("writing {}", path.display()))?;
        for (category, g) in &per_group {
            let t = chargebacks_total.entry(category.clone()).or_default();
            t.count += g.count;
            t.amount += g.amount;
        }
        chargebacks.insert(partner.clone(), per_group);
        chargeback_files.insert(partner.clone(), path);
    }
    let truth = GroundTruth {
        partners: spec.partners.clone(),
        seed: spec.seed,
        rows_per_partner: rows,
        shared_by_all: shared,
        pairwise_overlap,
        files,
        chargeback_files,
        chargebacks,
        chargebacks_total,
        shared_sums,
    };
    write_truth(&truth, out_dir)?;
    Ok(truth)
}

/// [`write_synth`], then the files rewritten in `format` (CSV: unchanged), and `truth.json`
/// naming them.
pub fn write_synth_as(
    spec: &SynthSpec,
    out_dir: &Path,
    format: cleanroom_node::data::DataFormat,
) -> anyhow::Result<GroundTruth> {
    let mut truth = write_synth(spec, out_dir)?;
    if format != cleanroom_node::data::DataFormat::Csv {
        crate::synth_format::convert(&mut truth, format)?;
        write_truth(&truth, out_dir)?;
    }
    Ok(truth)
}

/// Writes `<out_dir>/truth.json`.
fn write_truth(truth: &GroundTruth, out_dir: &Path) -> anyhow::Result<()> {
    let truth_path = out_dir.join("truth.json");
    let mut text = serde_json::to_string_pretty(truth)?;
    text.push('\n');
    std::fs::write(&truth_path, text).with_context(|| format!("writing {}", truth_path.display()))
}

fn validate(spec: &SynthSpec) -> anyhow::Result<()> {
    ensure!(
        !spec.partners.is_empty(),
        "synth needs at least one partner"
    );
    for (i, p) in spec.partners.iter().enumerate() {
        let ok = !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ensure!(
            ok,
            "partner name '{}' is not 1 to 63 characters of a-z, 0-9 and '-'",
            p.escape_default()
        );
        if spec.partners[..i].contains(p) {
            bail!("partner '{p}' is listed twice");
        }
    }
    ensure!(
        spec.overlap.is_finite() && (0.0..=1.0).contains(&spec.overlap),
        "overlap must be between 0 and 1, got {}",
        spec.overlap
    );
    // Customer indices must fit in u64: shared + partners * rows.
    ensure!(
        spec.rows
            .checked_mul(spec.partners.len() as u64 + 1)
            .is_some(),
        "{} rows per partner is too many",
        spec.rows
    );
    Ok(())
}

/// SplitMix64's finaliser: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reusable field buffers, so a row costs no allocation.
#[derive(Default)]
struct Row {
    id: Vec<u8>,
    email: Vec<u8>,
    phone: Vec<u8>,
    amount: Vec<u8>,
}

/// Writes one partner's customers file; returns, per category, the customers below `shared`
/// (those every partner has) and the sum of their amounts.
fn write_partner(
    path: &Path,
    partner: &str,
    customers: &[u64],
    shared: u64,
    identity_key: u64,
    rng: &mut StdRng,
) -> anyhow::Result<BTreeMap<String, GroupTruth>> {
    let mut sums: BTreeMap<String, GroupTruth> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), GroupTruth::default()))
        .collect();
    let file = File::create(path)?;
    let mut out = csv::WriterBuilder::new()
        .buffer_capacity(1 << 16)
        .from_writer(BufWriter::with_capacity(1 << 16, file));
    out.write_record(COLUMNS)?;
    let mut row = Row::default();
    for (n, &customer) in customers.iter().enumerate() {
        let identity = mix(identity_key ^ customer);
        row.id.clear();
        write!(row.id, "{partner}-{:07}", n + 1)?;
        canonical_email(&mut row.email, customer, identity)?;
        disguise_email(&mut row.email, rng);
        phone(&mut row.phone, identity, rng.random_range(0..6u8))?;
        row.amount.clear();
        let amount = rng.random_range(100..=500_000u32);
        write!(row.amount, "{amount}")?;
        let category = CATEGORIES[rng.random_range(0..CATEGORIES.len())];
        // A function of the customer, not of the random stream, so adding the column left
        // every other column of a seed's files unchanged.
        let orders = 1 + (identity >> 17) % MAX_ORDERS;
        if customer < shared {
            let t = sums.entry(category.to_owned()).or_default();
            t.count += 1;
            t.amount += u64::from(amount);
            t.orders += orders;
        }
        let marketing = if rng.random_bool(0.6) {
            "true"
        } else {
            "false"
        };
        let fraud = if rng.random_bool(0.9) {
            "true"
        } else {
            "false"
        };
        out.write_record([
            &row.id[..],
            &row.email,
            &row.phone,
            &row.amount,
            category.as_bytes(),
            marketing.as_bytes(),
            fraud.as_bytes(),
            orders.to_string().as_bytes(),
        ])?;
    }
    let inner = out.into_inner().map_err(|e| e.into_error())?;
    inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(sums)
}

/// Writes one partner's chargebacks: `rows` rows, categories drawn with a skew of the
/// partner's own (so partners differ), amounts uniform in 1..=MAX_CHARGEBACK_CENTS cents, the
/// bucket of row `n` from `bucket(n)`.
/// Returns the plaintext count and sum per category (every category present, zeros included).
fn write_chargebacks(
    path: &Path,
    partner: &str,
    rows: u64,
    rng: &mut StdRng,
    bucket: impl Fn(u64) -> u64,
) -> anyhow::Result<BTreeMap<String, GroupTruth>> {
    let file = File::create(path)?;
    let mut out = csv::WriterBuilder::new()
        .buffer_capacity(1 << 16)
        .from_writer(BufWriter::with_capacity(1 << 16, file));
    out.write_record(CHARGEBACK_COLUMNS)?;
    // Weights 1..=5 in a partner-specific order: the first category is the rarest.
    let mut weights: Vec<u32> = (1..=CATEGORIES.len() as u32).collect();
    weights.shuffle(rng);
    let total_weight: u32 = weights.iter().sum();
    let mut truth: BTreeMap<String, GroupTruth> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), GroupTruth::default()))
        .collect();
    for n in 0..rows {
        let mut pick = rng.random_range(0..total_weight);
        let mut index = 0;
        while pick >= weights[index] {
            pick -= weights[index];
            index += 1;
        }
        let category = CATEGORIES[index];
        let amount = rng.random_range(1..=MAX_CHARGEBACK_CENTS);
        let id = format!("{partner}-cb-{:07}", n + 1);
        out.write_record([
            id.as_str(),
            category,
            &amount.to_string(),
            &bucket(n).to_string(),
        ])?;
        let t = truth.entry(category.to_owned()).or_default();
        t.count += 1;
        t.amount += amount;
    }
    let inner = out.into_inner().map_err(|e| e.into_error())?;
    inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(truth)
}

/// The customer's email in lower case. The local part ends with the customer index after a
/// non-digit, and names hold no digits, so distinct customers have distinct emails.
fn canonical_email(buf: &mut Vec<u8>, customer: u64, identity: u64) -> std::io::Result<()> {
    let first = FIRST[(identity % FIRST.len() as u64) as usize];
    let last = LAST[((identity >> 8) % LAST.len() as u64) as usize];
    let domain = DOMAINS[((identity >> 16) % DOMAINS.len() as u64) as usize];
    buf.clear();
    match (identity >> 24) % 4 {
        0 => write!(buf, "{first}.{last}+{customer}@{domain}"),
        1 => write!(buf, "{first}{last}{customer}@{domain}"),
        2 => write!(buf, "{}.{last}.{customer}@{domain}", &first[..1]),
        _ => write!(buf, "{last}_{first}{customer}@{domain}"),
    }
}

/// Changes the surface form of an email without changing its normalised value: letter case and
/// stray leading or trailing spaces.
fn disguise_email(buf: &mut Vec<u8>, rng: &mut StdRng) {
    let at = buf.iter().position(|&b| b == b'@').unwrap_or(buf.len());
    match rng.random_range(0..10u8) {
        // Capitalised name parts: "Alice.Smith+7@example.com".
        5 | 6 => {
            let mut start = true;
            for b in &mut buf[..at] {
                if start {
                    b.make_ascii_uppercase();
                }
                start = matches!(*b, b'.' | b'_' | b'+');
            }
        }
        7 => buf.make_ascii_uppercase(),
        8 => buf[at..].make_ascii_uppercase(),
        _ => {}
    }
    match rng.random_range(0..20u8) {
        0 => buf.insert(0, b' '),
        1 => buf.extend_from_slice(b"  "),
        2 => {
            buf.insert(0, b' ');
            buf.push(b' ');
        }
        _ => {}
    }
}

/// A North American number derived from the customer's identity, written in one of six layouts
/// that all normalise to the same E.164 value.
fn phone(buf: &mut Vec<u8>, identity: u64, layout: u8) -> std::io::Result<()> {
    let p = mix(identity);
    let area = 201 + p % 798;
    let exchange = 200 + (p >> 16) % 800;
    let line = (p >> 32) % 10_000;
    buf.clear();
    match layout {
        0 => write!(buf, "+1 {area}-{exchange}-{line:04}"),
        1 => write!(buf, "({area}) {exchange}-{line:04}"),
        2 => write!(buf, "{area}.{exchange}.{line:04}"),
        3 => write!(buf, "1-{area}-{exchange}-{line:04}"),
        4 => write!(buf, "+1{area}{exchange}{line:04}"),
        _ => write!(buf, "001 {area} {exchange} {line:04}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_node::data::normalise::Normaliser;
    use std::collections::{BTreeSet, HashMap};

    struct Parsed {
        /// (normalised email, raw email, normalised phone), in file order.
        rows: Vec<(String, String, String)>,
    }

    fn read(path: &Path) -> Parsed {
        let mut r = csv::Reader::from_path(path).unwrap();
        assert_eq!(r.headers().unwrap().iter().collect::<Vec<_>>(), COLUMNS);
        let mut rows = Vec::new();
        for rec in r.records() {
            let rec = rec.unwrap();
            let raw = rec[1].to_string();
            let email = Normaliser::Email.normalise(&raw).unwrap();
            let phone = Normaliser::Phone.normalise(&rec[2]).unwrap();
            assert!(CATEGORIES.contains(&&rec[4]));
            assert!(["true", "false"].contains(&&rec[5]));
            assert!(["true", "false"].contains(&&rec[6]));
            let cents: u64 = rec[3].parse().unwrap();
            assert!((100..=500_000).contains(&cents));
            rows.push((email, raw, phone));
        }
        Parsed { rows }
    }

    fn spec() -> SynthSpec {
        SynthSpec {
            partners: vec!["globex".into(), "acme".into(), "initech".into()],
            rows: 400,
            overlap: 0.25,
            seed: 11,
        }
    }

    #[test]
    fn truth_equals_independent_intersection() {
        let dir = tempfile::tempdir().unwrap();
        let truth = write_synth(&spec(), dir.path()).unwrap();
        assert_eq!(truth.shared_by_all, 100);
        let mut sets = HashMap::new();
        let mut phones: HashMap<String, String> = HashMap::new();
        for p in &truth.partners {
            let parsed = read(&dir.path().join(format!("{p}.csv")));
            assert_eq!(parsed.rows.len(), 400);
            let set: BTreeSet<String> = parsed.rows.iter().map(|r| r.0.clone()).collect();
            assert_eq!(set.len(), 400, "a partner has two rows for one customer");
            // One customer, one phone, at every partner.
            for (email, _, phone) in &parsed.rows {
                let known = phones.entry(email.clone()).or_insert_with(|| phone.clone());
                assert_eq!(known, phone);
            }
            sets.insert(p.clone(), set);
        }
        let mut expected = BTreeMap::new();
        for a in &truth.partners {
            for b in &truth.partners {
                if a < b {
                    let n = sets[a].intersection(&sets[b]).count() as u64;
                    expected.insert(format!("{a},{b}"), n);
                }
            }
        }
        assert_eq!(truth.pairwise_overlap, expected);
        assert_eq!(truth.pairwise_overlap.len(), 3);
        assert!(truth.pairwise_overlap.contains_key("acme,globex"));

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("truth.json")).unwrap()).unwrap();
        assert_eq!(json["pairwise_overlap"]["acme,globex"], 100);
        assert_eq!(json["rows_per_partner"], 400);
    }

    #[test]
    fn shared_customers_differ_in_surface_form_and_are_spread() {
        let dir = tempfile::tempdir().unwrap();
        write_synth(&spec(), dir.path()).unwrap();
        let acme = read(&dir.path().join("acme.csv"));
        let globex = read(&dir.path().join("globex.csv"));
        let globex_raw: HashMap<&str, &str> = globex
            .rows
            .iter()
            .map(|(e, raw, _)| (e.as_str(), raw.as_str()))
            .collect();
        let mut differing = 0;
        let mut positions = Vec::new();
        for (i, (email, raw, _)) in acme.rows.iter().enumerate() {
            if let Some(other) = globex_raw.get(email.as_str()) {
                positions.push(i);
                if raw != other {
                    differing += 1;
                }
            }
        }
        assert_eq!(positions.len(), 100);
        assert!(
            differing >= 20,
            "only {differing} shared emails differ in form"
        );
        // Spread: every quarter of the file holds some shared customers.
        for q in 0..4 {
            let n = positions.iter().filter(|&&i| i / 100 == q).count();
            assert!(n >= 5, "quarter {q} has {n} shared rows");
        }
        let raws: Vec<&str> = acme.rows.iter().map(|r| r.1.as_str()).collect();
        assert!(raws.iter().any(|r| r.starts_with(' ') || r.ends_with(' ')));
        assert!(
            raws.iter()
                .any(|r| r.bytes().any(|b| b.is_ascii_uppercase()))
        );
    }

    #[test]
    fn reproducible_from_the_seed() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        write_synth(&spec(), a.path()).unwrap();
        write_synth(&spec(), b.path()).unwrap();
        write_synth(&SynthSpec { seed: 12, ..spec() }, c.path()).unwrap();
        let file = |d: &tempfile::TempDir| std::fs::read(d.path().join("acme.csv")).unwrap();
        assert_eq!(file(&a), file(&b));
        assert_ne!(file(&a), file(&c));
    }

    #[test]
    fn edge_overlaps() {
        for (overlap, shared) in [(0.0, 0), (1.0, 50)] {
            let dir = tempfile::tempdir().unwrap();
            let s = SynthSpec {
                partners: vec!["acme".into(), "globex".into()],
                rows: 50,
                overlap,
                seed: 3,
            };
            let truth = write_synth(&s, dir.path()).unwrap();
            assert_eq!(truth.pairwise_overlap["acme,globex"], shared);
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for s in [
            SynthSpec {
                overlap: 1.5,
                ..spec()
            },
            SynthSpec {
                overlap: f64::NAN,
                ..spec()
            },
            SynthSpec {
                partners: vec![],
                ..spec()
            },
            SynthSpec {
                partners: vec!["acme".into(), "acme".into()],
                ..spec()
            },
            SynthSpec {
                partners: vec!["../etc".into()],
                ..spec()
            },
            SynthSpec {
                rows: u64::MAX,
                ..spec()
            },
        ] {
            assert!(write_synth(&s, dir.path()).is_err(), "{s:?}");
        }
    }

    /// `cargo test --release -- --ignored large`: 2^20 rows per partner.
    #[test]
    #[ignore]
    fn large_instance_is_fast() {
        let dir = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let s = SynthSpec {
            partners: vec!["acme".into(), "globex".into()],
            rows: 1 << 20,
            overlap: 0.3,
            seed: 1,
        };
        let truth = write_synth(&s, dir.path()).unwrap();
        eprintln!("2 x 2^20 rows in {:?}", start.elapsed());
        assert_eq!(truth.rows_per_partner, 1 << 20);
    }

    #[test]
    fn shared_sums_equal_an_independent_join() {
        let dir = tempfile::tempdir().unwrap();
        let truth = write_synth(&spec(), dir.path()).unwrap();
        let emails = |p: &str| -> BTreeSet<String> {
            read(&dir.path().join(format!("{p}.csv")))
                .rows
                .into_iter()
                .map(|r| r.0)
                .collect()
        };
        let keys = emails("acme");
        let mut r = csv::Reader::from_path(dir.path().join("globex.csv")).unwrap();
        let mut mine: BTreeMap<String, GroupTruth> = CATEGORIES
            .iter()
            .map(|c| ((*c).to_owned(), GroupTruth::default()))
            .collect();
        for rec in r.records() {
            let rec = rec.unwrap();
            if keys.contains(&Normaliser::Email.normalise(&rec[1]).unwrap()) {
                let g = mine.get_mut(&rec[4]).unwrap();
                g.count += 1;
                g.amount += rec[3].parse::<u64>().unwrap();
                g.orders += rec[7].parse::<u64>().unwrap();
            }
        }
        assert_eq!(truth.shared_sums["globex"], mine);
        let shared: u64 = mine.values().map(|g| g.count).sum();
        assert_eq!(shared, truth.shared_by_all);
    }

    #[test]
    fn chargebacks_match_their_truth() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            partners: vec!["acme".into(), "globex".into(), "initech".into()],
            rows: 500,
            overlap: 0.2,
            seed: 3,
        };
        let truth = write_synth(&spec, dir.path()).unwrap();
        let mut total: BTreeMap<String, GroupTruth> = BTreeMap::new();
        for partner in &spec.partners {
            let mut r = csv::Reader::from_path(&truth.chargeback_files[partner]).unwrap();
            assert_eq!(
                r.headers().unwrap().iter().collect::<Vec<_>>(),
                CHARGEBACK_COLUMNS
            );
            let mut mine: BTreeMap<String, GroupTruth> = BTreeMap::new();
            let mut rows = 0;
            for rec in r.records() {
                let rec = rec.unwrap();
                let amount: u64 = rec[2].parse().unwrap();
                assert!((1..=MAX_CHARGEBACK_CENTS).contains(&amount));
                let bucket: u64 = rec[3].parse().unwrap();
                let p = spec.partners.iter().position(|x| x == partner).unwrap();
                assert_eq!(bucket, chargeback_bucket(spec.seed, p, rows));
                assert!(bucket < CHARGEBACK_BUCKETS);
                let g = mine.entry(rec[1].to_owned()).or_default();
                g.count += 1;
                g.amount += amount;
                let t = total.entry(rec[1].to_owned()).or_default();
                t.count += 1;
                t.amount += amount;
                rows += 1;
            }
            assert_eq!(rows, 100);
            for (c, g) in &truth.chargebacks[partner] {
                assert_eq!(
                    mine.get(c).copied().unwrap_or_default(),
                    *g,
                    "{partner} {c}"
                );
            }
        }
        for (c, g) in &truth.chargebacks_total {
            assert_eq!(total.get(c).copied().unwrap_or_default(), *g, "{c}");
        }
        // Deterministic.
        let again = write_synth(&spec, dir.path()).unwrap();
        assert_eq!(again.chargebacks_total, truth.chargebacks_total);
    }
}
