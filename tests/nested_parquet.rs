//! End to end: a Parquet lake of the shape partners keep, read in the node and on a Ballista
//! cluster. acme's customers are two Parquet files in a directory, written by two writers: the
//! email sits in a struct (`customer.email`) that gains a field in the second file, where its
//! integer field also widens (`Int32` to `Int64`); emails, customers, consents and amounts are
//! nullable; the amount is a decimal; the segment is dictionary-encoded; a list column is never
//! read. An overlap (acme's rows read, rejected and without consent audited) and a grouped
//! overlap-sum with acme as the value holder: in process, then with acme's passes on two
//! executors. Both give the same figures, each equal to the truth counted here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use cleanroom_e2e::ballista::Ballista;
use cleanroom_e2e::{Consortium, cleanroom_node, open_agreement};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Decimal128Array, DictionaryArray, Int32Array, Int64Array, ListBuilder,
    RecordBatch, StringArray, StringBuilder, StructArray,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Int32Type, Schema};
use datafusion::parquet::arrow::ArrowWriter;

use crate::formats::rows_of;

/// Each customer's summed amount is clipped to this.
const CLIP: u64 = 30_000;
/// The segments the job lists; anything else is "(other)".
const LISTED: [&str; 2] = ["retail", "travel"];

/// One row of acme's lake, as written.
struct LakeRow {
    /// `None`: the whole `customer` struct is null.
    customer: Option<Option<String>>,
    consent: Option<bool>,
    /// Hundredths (the decimal's scale is 2).
    amount: Option<i128>,
    segment: &'static str,
}

/// What the truth says for the overlap and for the overlap-sum (per group: count, clipped sum).
struct Truth {
    overlap: u64,
    read: u64,
    rejected: u64,
    no_consent: u64,
    groups: BTreeMap<String, (u64, u64)>,
    /// Customers with a row the overlap-sum reads (consent, an email, a whole amount).
    distinct_valued: u64,
}

#[test]
fn a_nested_parquet_lake_reads_alike_in_the_node_and_on_a_cluster() {
    let in_process = lake_jobs(None, None);
    let on_executors = lake_jobs(Some(2), None);
    assert_eq!(in_process, on_executors);
}

/// The same with acme's dataset a SQL view over the lake that takes the email out of the
/// struct and leaves one segment out, on the cluster.
#[test]
fn a_view_over_a_nested_parquet_lake_reads_on_a_cluster() {
    lake_jobs(Some(2), Some("online"));
}

/// Runs the overlap and the overlap-sum over acme's lake (through a view that leaves out the
/// segment `left_out`, if given); returns the overlap, acme's audited row figures and the
/// overlap-sum's shown groups, each checked against the truth.
fn lake_jobs(
    executors: Option<usize>,
    left_out: Option<&str>,
) -> (u64, [u64; 3], BTreeMap<String, (u64, u64)>) {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 600, 0.5, 53);
    let acme = rows_of(&c.path().join("data/acme.csv"));
    let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    // Every customer once, then the first 30 again under other segments: their amounts add
    // up, and each counts in the first listed segment among its rows with a whole amount
    // ("(other)" last), whichever file or part holds them.
    let emails: Vec<&str> = acme
        .iter()
        .map(|(_, e, _)| e.as_str())
        .chain(acme.iter().take(30).map(|(_, e, _)| e.as_str()))
        .collect();
    let lake: Vec<LakeRow> = emails
        .iter()
        .enumerate()
        .map(|(i, email)| lake_row(i as u64 + 1, email, i >= acme.len()))
        .collect();
    let read: Vec<&LakeRow> = lake
        .iter()
        .filter(|r| Some(r.segment) != left_out)
        .collect();
    let truth = truth_of(&read, &globex);
    assert!(
        truth.overlap > 50 && truth.rejected > 20,
        "{}",
        truth.overlap
    );
    let dir = c.path().join("lake");
    std::fs::create_dir_all(&dir).unwrap();
    let half = lake.len() / 2;
    write_part(&dir.join("part-1.parquet"), &lake[..half], false);
    write_part(&dir.join("part-2.parquet"), &lake[half..], true);

    if let Some(executors) = executors {
        let cluster = Ballista::start(c.path(), executors, 600);
        c.node_top.insert("acme".into(), cluster.engine_line(true));
        c.ballista = Some(cluster);
    }
    c.admit_node("acme");
    c.admit_node("globex");
    let sum_terms = "[[agreement.allow]]\ncomputation = \"overlap-sum\"\n\
                     dataset = \"customers\"\nkeys = [\"email\"]\n";
    let (source, table, email) = match left_out {
        None => (
            "path = \"lake\"\nformat = \"parquet\"\n".to_owned(),
            "",
            "customer.email",
        ),
        Some(segment) => (
            format!(
                "sql = \"SELECT customer['email'] AS email, consent, amount, segment FROM lake \
                 WHERE segment <> '{segment}'\"\n"
            ),
            "[[dataset.table]]\nname = \"lake\"\npath = \"lake\"\nformat = \"parquet\"\n\n",
            "email",
        ),
    };
    let config = c.write_node_toml(
        "acme",
        &format!(
            "[[dataset]]\nname = \"customers\"\n{source}\
             consent = {{ \"overlap-reporting\" = \"consent\", \"fraud-detection\" = \"consent\" }}\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"{email}\"\nnormaliser = \"email\"\n\n\
             [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 10000000\n\n\
             {table}{}{sum_terms}roles = [\"value-holder\"]\ngroup_by = [\"segment\"]\n\
             value_columns = [{{ column = \"amount\", min = 0, max = {CLIP} }}]\n",
            open_agreement("globex")
        ),
    );
    c.write_node_toml(
        "globex",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data/globex.csv\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
             {}{sum_terms}roles = [\"key-holder\"]\n",
            open_agreement("acme")
        ),
    );
    // The agreement permits what the lake's columns are read for.
    let check = cleanroom_node(c.path(), &["check", "--config", config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let job = c.overlap_counts(truth.overlap);
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    let figure = |k: &str| {
        access[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {access}"))
    };
    let figures = [
        figure("rows_read"),
        figure("rows_rejected"),
        figure("rows_excluded_consent"),
    ];
    assert_eq!(
        figures,
        [truth.read, truth.rejected, truth.no_consent],
        "{access}"
    );

    let (job, code) = c.submit(&[
        "overlap-sum",
        "--between",
        // The key holder first.
        "globex,acme",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--sum",
        "amount,count",
        "--purpose",
        "fraud-detection",
        "--group-by",
        "segment",
        "--groups",
        &LISTED.join(","),
    ]);
    assert_eq!(code, Some(0), "{job}");
    let mut shown = BTreeMap::new();
    for g in job["result"]["groups"].as_array().unwrap() {
        if g["suppressed"] == true {
            continue;
        }
        let label = g["group"].as_str().unwrap().to_owned();
        let got = (
            g["values"]["count"].as_u64().unwrap(),
            g["values"]["amount"].as_u64().unwrap(),
        );
        assert_eq!(Some(&got), truth.groups.get(&label), "{label}: {job}");
        shown.insert(label, got);
    }
    assert!(shown.len() >= 2, "{job}");
    if executors.is_some() {
        let log = c.node_log("acme");
        assert_eq!(
            log.matches("on_executors=true").count(),
            2,
            "acme's passes ran on the executors: {log}"
        );
        // The executors grouped the value holder's rows: one row a customer came back.
        let line = log
            .lines()
            .find(|l| l.contains("the executors grouped the rows by point"))
            .unwrap_or_else(|| panic!("no grouping on the executors: {log}"));
        let figure = |name: &str| figure_in(line, name);
        assert_eq!(figure("points"), truth.distinct_valued, "{line}");
        assert!(figure("rows") > figure("points"), "{line}");
        // And encrypted them there: one row a point.
        let line = log
            .lines()
            .find(|l| l.contains("encrypted our rows on the cluster"))
            .unwrap_or_else(|| panic!("no encryption on the executors: {log}"));
        assert_eq!(figure_in(line, "rows"), truth.distinct_valued, "{line}");
    }
    (truth.overlap, figures, shown)
}

/// The number after ` name=` in a log `line`.
fn figure_in(line: &str, name: &str) -> u64 {
    let at = line.find(&format!(" {name}=")).unwrap() + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Row `row` of the lake, for `email`: some emails, customers and consents null, some emails
/// not emails, some amounts null or with cents. A `repeat` of a customer has the segment after
/// its first row's.
fn lake_row(row: u64, email: &str, repeat: bool) -> LakeRow {
    let customer = match row {
        r if r % 26 == 0 => None,
        r if r % 13 == 0 => Some(None),
        r if r % 11 == 0 => Some(Some("not-an-email".to_owned())),
        _ => Some(Some(format!(" {} ", email.to_uppercase()))),
    };
    let consent = match row {
        r if r % 7 == 0 => Some(false),
        r if r % 31 == 0 => None,
        _ => Some(true),
    };
    let amount = match row {
        r if r % 9 == 0 => None,
        r if r % 5 == 0 => Some(i128::from(r) * 100 + 50),
        r => Some(i128::from(r % 40 + 1) * 1000 * 100),
    };
    LakeRow {
        customer,
        consent,
        amount,
        segment: ["retail", "travel", "online"][((row + u64::from(repeat)) % 3) as usize],
    }
}

/// The truth, from the rows as written (in file order: the parts in path order).
fn truth_of(lake: &[&LakeRow], globex: &BTreeSet<String>) -> Truth {
    let mut t = Truth {
        overlap: 0,
        read: lake.len() as u64,
        rejected: 0,
        no_consent: 0,
        groups: BTreeMap::new(),
        distinct_valued: 0,
    };
    let mut kept = BTreeSet::new();
    // Per customer: the first listed group among its rows with a whole amount, and the
    // amounts' total.
    let mut valued: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for row in lake {
        if row.consent != Some(true) {
            t.no_consent += 1;
            continue;
        }
        let email = match &row.customer {
            Some(Some(e)) if e.contains('@') => e.trim().to_lowercase(),
            _ => {
                t.rejected += 1;
                continue;
            }
        };
        kept.insert(email.clone());
        // A null amount, or one with cents, skips the row in the overlap-sum.
        let Some(amount) = row.amount.filter(|a| a % 100 == 0) else {
            continue;
        };
        let group = if LISTED.contains(&row.segment) {
            row.segment.to_owned()
        } else {
            "(other)".to_owned()
        };
        let rank = |g: &str| LISTED.iter().position(|l| *l == g).unwrap_or(LISTED.len());
        let entry = valued.entry(email).or_insert((group.clone(), 0));
        if rank(&group) < rank(&entry.0) {
            entry.0 = group;
        }
        entry.1 += u64::try_from(amount / 100).unwrap();
    }
    t.overlap = kept.intersection(globex).count() as u64;
    t.distinct_valued = valued.len() as u64;
    for (email, (group, total)) in valued {
        if globex.contains(&email) {
            let g = t.groups.entry(group).or_default();
            g.0 += 1;
            g.1 += total.min(CLIP);
        }
    }
    t
}

/// Writes `rows` as one Parquet file. `later`: the second writer's schema, whose `customer`
/// struct has a `country` field and whose `since` is 64-bit.
fn write_part(path: &Path, rows: &[LakeRow], later: bool) {
    let emails: StringArray = rows.iter().map(|r| r.customer.clone().flatten()).collect();
    let n = rows.len();
    let (since_type, since): (DataType, ArrayRef) = if later {
        (
            DataType::Int64,
            Arc::new(Int64Array::from(vec![2019i64; n])),
        )
    } else {
        (
            DataType::Int32,
            Arc::new(Int32Array::from(vec![2019i32; n])),
        )
    };
    let mut fields = vec![
        Field::new("email", DataType::Utf8, true),
        Field::new("since", since_type, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(emails), since];
    if later {
        fields.push(Field::new("country", DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from(vec!["DE"; n])));
    }
    let present = NullBuffer::from(
        rows.iter()
            .map(|r| r.customer.is_some())
            .collect::<Vec<_>>(),
    );
    let customer = StructArray::try_new(Fields::from(fields), columns, Some(present)).unwrap();
    let consent: BooleanArray = rows.iter().map(|r| r.consent).collect();
    let amount = Decimal128Array::from(rows.iter().map(|r| r.amount).collect::<Vec<_>>())
        .with_precision_and_scale(12, 2)
        .unwrap();
    let segment: DictionaryArray<Int32Type> = rows.iter().map(|r| r.segment).collect();
    let mut tags = ListBuilder::new(StringBuilder::new());
    for _ in rows {
        tags.values().append_value("vip");
        tags.values().append_value("newsletter");
        tags.append(true);
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("customer", Arc::new(customer)),
        ("consent", Arc::new(consent)),
        ("amount", Arc::new(amount)),
        ("segment", Arc::new(segment)),
        ("tags", Arc::new(tags.finish())),
    ];
    let batch = RecordBatch::try_from_iter_with_nullable(
        columns.into_iter().map(|(name, array)| (name, array, true)),
    )
    .unwrap();
    let schema: Arc<Schema> = batch.schema();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}
