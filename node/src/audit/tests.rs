use std::fs::OpenOptions;
use std::sync::Mutex;

use super::writer::{FileStamp, Inner};
use super::*;

pub(crate) fn sample_events() -> Vec<AuditEvent> {
    vec![
        AuditEvent::PolicyLoaded {
            digest: "ab".repeat(32),
            agreements: vec!["globex".into(), "initech".into()],
        },
        AuditEvent::Decision {
            job_id: "j1".into(),
            partner: "globex".into(),
            purpose: "ad measurement".into(),
            computation: "overlap".into(),
            dataset: "customers".into(),
            keys: vec!["email".into()],
            accepted: true,
            reason: "allowed by agreement with globex".into(),
        },
        AuditEvent::Access {
            job_id: "j1".into(),
            dataset: "customers".into(),
            columns: vec!["email".into()],
            rows_read: 1000,
            rows_rejected: 3,
            rows_excluded_consent: 20,
            rows_excluded_deleted: 1,
            rows_other: None,
            persons: None,
            rejected: Default::default(),
        },
        AuditEvent::Release {
            job_id: "j1".into(),
            partner: "globex".into(),
            what: "intersection count".into(),
            to: vec!["coordinator".into(), "globex".into()],
            value: Some(412),
            epsilon: 0.5,
            rho: None,
        },
        AuditEvent::Decision {
            job_id: "j2".into(),
            partner: "initech".into(),
            purpose: "fraud".into(),
            computation: "match".into(),
            dataset: "customers".into(),
            keys: vec!["phone".into()],
            accepted: false,
            reason: "no agreement allows match with initech".into(),
        },
        AuditEvent::Decision {
            job_id: "j3".into(),
            partner: "globex".into(),
            purpose: "ad measurement".into(),
            computation: "overlap".into(),
            dataset: "customers".into(),
            keys: vec!["email".into()],
            accepted: true,
            reason: "allowed".into(),
        },
        AuditEvent::JobError {
            job_id: "j3".into(),
            partner: "globex".into(),
            reason: "peer disconnected".into(),
        },
        AuditEvent::Forget {
            dataset: "customers".into(),
            key_hash: "cd".repeat(32),
        },
    ]
}

/// A log with `n` entries (cycling through the sample events), at `dir/audit.log`.
pub(crate) fn make_log(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    let events = sample_events();
    for i in 0..n {
        log.append(
            events[i % events.len()].clone(),
            1_700_000_000_000 + i as i64 * 1000,
        )
        .unwrap();
    }
    path
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let (lines, tail) = split_lines(&bytes);
    assert!(tail.is_none());
    lines.into_iter().map(<[u8]>::to_vec).collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    std::fs::write(path, out).unwrap();
}

fn problems(path: &Path, expected: Option<&AuditHead>) -> Vec<Tamper> {
    verify(path, expected).unwrap().problems
}

#[test]
fn audit_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/audit.log");
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.head(), AuditHead::genesis());
    let mut heads = vec![];
    for (i, e) in sample_events().into_iter().enumerate() {
        heads.push(log.append(e, i as i64).unwrap());
    }
    assert_eq!(log.head(), *heads.last().unwrap());
    assert_eq!(log.head().seq, 8);
    drop(log);

    let entries = read_entries(&path).unwrap();
    assert_eq!(entries.len(), 8);
    assert_eq!(
        entries.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        sample_events()
    );
    assert_eq!(entries[0].prev, genesis_hash());
    for w in entries.windows(2) {
        assert_eq!(w[1].prev, w[0].hash);
        assert_eq!(w[1].seq, w[0].seq + 1);
    }

    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.head(), heads[7]);
    let h9 = log.append(sample_events()[1].clone(), 99).unwrap();
    assert_eq!(h9.seq, 9);
    let report = verify(&path, Some(&heads[3])).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.entries, 9);
    assert_eq!(report.head, h9);
    // Head display round trip.
    assert_eq!(h9.to_string().parse::<AuditHead>().unwrap(), h9);
    assert!(
        std::fs::read_to_string(head_path(&path))
            .unwrap()
            .starts_with("9:")
    );
}

#[test]
fn audit_verify_clean_and_empty() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.log");
    let r = verify(&missing, None).unwrap();
    assert!(r.is_ok());
    assert_eq!(r.head, AuditHead::genesis());
    let path = make_log(dir.path(), 5);
    let r = verify(&path, None).unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!(r.entries, 5);
    assert_eq!(r.head.seq, 5);
}

/// An aggregate's own figures (rows in "(other)", per-person counts) are kept in its Access
/// entry; entries without them (older ones, other job kinds) keep their exact encoding.
#[test]
fn access_keeps_an_aggregates_own_figures_and_old_entries_stay_canonical() {
    let old = &sample_events()[2];
    let line = serde_json::to_string(old).unwrap();
    assert!(
        !line.contains("rows_other") && !line.contains("persons"),
        "{line}"
    );
    let agg = AuditEvent::Access {
        job_id: "j2".into(),
        dataset: "chargebacks".into(),
        columns: vec!["category".into(), "amount".into(), "customer".into()],
        rows_read: 900,
        rows_rejected: 2,
        rows_excluded_consent: 0,
        rows_excluded_deleted: 0,
        rows_other: Some(17),
        persons: Some(PersonCounts {
            persons: 400,
            rows_outside_group: 12,
        }),
        rejected: Default::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.log");
    let log = AuditLog::open(&path).unwrap();
    log.append(old.clone(), 1).unwrap();
    log.append(agg.clone(), 2).unwrap();
    drop(log);
    let entries = read_entries(&path).unwrap();
    assert_eq!(entries[1].event, agg);
    assert!(verify(&path, None).unwrap().is_ok());
    assert!(
        agg.summary().ends_with(
            ", 17 in (other), 400 persons (12 rows outside their person's group left out)"
        ),
        "{}",
        agg.summary()
    );
}

#[test]
fn audit_event_json_is_tagged_and_strict() {
    let e = &sample_events()[3];
    let json = serde_json::to_string(e).unwrap();
    assert!(json.starts_with(r#"{"kind":"Release","#), "{json}");
    let extra = json.replacen('{', r#"{"secret":"x","#, 1);
    assert!(serde_json::from_str::<AuditEvent>(&extra).is_err());
    // Non-finite ε is refused rather than written as null.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&dir.path().join("a.log")).unwrap();
    let mut bad = e.clone();
    if let AuditEvent::Release { epsilon, .. } = &mut bad {
        *epsilon = f64::NAN;
    }
    assert!(matches!(log.append(bad, 0), Err(AuditError::Invalid(_))));
    assert_eq!(log.head().seq, 0);
}

#[test]
fn audit_flip_in_json_and_in_hash_each_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 6);
    let clean = lines_of(&path);
    for (i, line) in clean.iter().enumerate() {
        let text = std::str::from_utf8(line).unwrap();
        // A byte in the JSON of the event, one in the stored hash, one in prev, one in seq.
        let in_event = text.find("\"kind\":\"").unwrap() + 9;
        let in_hash = text.find("\"hash\":\"").unwrap() + 20;
        let in_prev = text.find("\"prev\":\"").unwrap() + 30;
        let in_time = text.find("\"at_ms\":").unwrap() + 10;
        for pos in [in_event, in_hash, in_prev, in_time, 0, line.len() - 1] {
            let mut lines = clean.clone();
            // Change a letter/digit to another of the same class so it still parses.
            lines[i][pos] = match lines[i][pos] {
                b'0'..=b'8' | b'a'..=b'e' => lines[i][pos] + 1,
                b'9' => b'0',
                b'f' => b'a',
                b => b ^ 1,
            };
            write_lines(&path, &lines);
            let p = problems(&path, None);
            let line_no = i as u64 + 1;
            assert!(
                p.iter().any(|t| matches!(t,
                    Tamper::BadHash { line, .. } | Tamper::Corrupted { line } if *line == line_no)),
                "line {line_no} pos {pos}: {p:?}"
            );
        }
    }
}

#[test]
fn audit_flipping_any_byte_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 20);
    let clean = std::fs::read(&path).unwrap();
    // Every byte with its low bit flipped; every 5th byte also with a high bit flipped.
    for pos in 0..clean.len() {
        let masks: &[u8] = if pos % 5 == 0 { &[0x01, 0x40] } else { &[0x01] };
        for &mask in masks {
            let mut bytes = clean.clone();
            bytes[pos] ^= mask;
            std::fs::write(&path, &bytes).unwrap();
            let report = verify(&path, None).unwrap();
            assert!(!report.is_ok(), "flip {mask:#x} at byte {pos} undetected");
        }
    }
    std::fs::write(&path, &clean).unwrap();
    assert!(verify(&path, None).unwrap().is_ok());
}

#[test]
fn audit_deleted_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 6);
    let clean = lines_of(&path);
    let head = verify(&path, None).unwrap().head;

    let mut l = clean.clone();
    l.remove(0);
    write_lines(&path, &l);
    assert_eq!(
        problems(&path, None),
        vec![Tamper::Gap {
            line: 1,
            expected_seq: 1,
            found_seq: 2
        }]
    );

    let mut l = clean.clone();
    l.remove(3);
    write_lines(&path, &l);
    let p = problems(&path, None);
    assert_eq!(
        p,
        vec![Tamper::Gap {
            line: 4,
            expected_seq: 4,
            found_seq: 5
        }]
    );
    assert!(
        p[0].to_string().contains("entries 4..=4 deleted"),
        "{}",
        p[0]
    );

    // The last entry: only the heads can tell.
    let mut l = clean.clone();
    l.pop();
    write_lines(&path, &l);
    assert_eq!(
        problems(&path, None),
        vec![Tamper::Truncated {
            entries: 5,
            expected_at_least: 6,
            source: HeadSource::HeadFile
        }]
    );
    // With the head file rewritten to match, the coordinator's head still catches it.
    std::fs::write(
        head_path(&path),
        "5:".to_string() + &to_hex(&clean_hash(&l[4])),
    )
    .unwrap();
    assert!(problems(&path, None).is_empty());
    assert_eq!(
        problems(&path, Some(&head)),
        vec![Tamper::Truncated {
            entries: 5,
            expected_at_least: 6,
            source: HeadSource::Expected
        }]
    );
}

fn clean_hash(line: &[u8]) -> [u8; 32] {
    decode_line(line).unwrap().hash
}

#[test]
fn audit_swapped_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 6);
    let mut l = lines_of(&path);
    l.swap(2, 3);
    write_lines(&path, &l);
    let p = problems(&path, None);
    assert_eq!(
        p,
        vec![
            Tamper::OutOfOrder {
                line: 3,
                seq: 4,
                expected_seq: 3
            },
            Tamper::OutOfOrder {
                line: 4,
                seq: 3,
                expected_seq: 5
            },
        ]
    );
    assert!(p[0].to_string().contains("reordered"));
}

#[test]
fn audit_inserted_forged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 6);
    let mut l = lines_of(&path);
    // A forged seq-4 entry with a correct own hash but linked to the wrong predecessor.
    let mut forged = AuditEntry {
        seq: 4,
        at_ms: 5,
        prev: decode_line(&l[0]).unwrap().hash,
        event: sample_events()[3].clone(),
        hash: [0; 32],
    };
    forged.hash = forged.compute_hash();
    let mut line = encode_line(&forged);
    line.pop();
    l.insert(3, line.clone());
    write_lines(&path, &l);
    let p = problems(&path, None);
    assert_eq!(p, vec![Tamper::BrokenLink { line: 4, seq: 4 }], "{p:?}");

    // An exact replay of an existing line.
    let mut l = lines_of_clean(dir.path());
    let copy = l[1].clone();
    l.insert(4, copy);
    write_lines(&path, &l);
    let p = problems(&path, None);
    assert_eq!(p, vec![Tamper::Duplicate { line: 5, seq: 2 }], "{p:?}");

    // A forged entry appended at the end that links nowhere.
    let mut l = lines_of_clean(dir.path());
    forged.seq = 7;
    forged.hash = forged.compute_hash();
    let mut line = encode_line(&forged);
    line.pop();
    l.push(line);
    write_lines(&path, &l);
    let p = problems(&path, None);
    assert_eq!(p, vec![Tamper::BrokenLink { line: 7, seq: 7 }], "{p:?}");
}

fn lines_of_clean(dir: &Path) -> Vec<Vec<u8>> {
    let sub = tempfile::tempdir_in(dir).unwrap();
    lines_of(&make_log(sub.path(), 6))
}

#[test]
fn audit_truncation_mid_line_and_rewritten_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 4);
    let clean = std::fs::read(&path).unwrap();
    std::fs::write(&path, &clean[..clean.len() - 10]).unwrap();
    let p = problems(&path, None);
    assert!(p.contains(&Tamper::Incomplete { line: 4 }), "{p:?}");
    assert!(p.contains(&Tamper::Truncated {
        entries: 3,
        expected_at_least: 4,
        source: HeadSource::HeadFile
    }));
    // open refuses: the head file shows this is not a torn write.
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::Broken { .. })
    ));

    // Rewritten history: a different log with the same length.
    std::fs::write(&path, &clean).unwrap();
    let head = verify(&path, None).unwrap().head;
    let other = tempfile::tempdir().unwrap();
    let other_path = other.path().join("audit.log");
    let log = AuditLog::open(&other_path).unwrap();
    for i in 0..4 {
        log.append(sample_events()[7 - i].clone(), 0).unwrap();
    }
    let p = problems(&other_path, Some(&head));
    assert!(
        matches!(p.as_slice(), [Tamper::HeadMismatch { seq: 4, .. }]),
        "{p:?}"
    );
}

#[test]
fn audit_open_repairs_only_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 3);
    let head = verify(&path, None).unwrap().head;
    // A crash mid-append: part of line 4 written, head file not yet updated.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(br#"{"seq":4,"at_ms":1,"pre"#);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(problems(&path, None), vec![Tamper::Incomplete { line: 4 }]);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.head(), head);
    log.append(sample_events()[0].clone(), 2).unwrap();
    drop(log);
    assert!(verify(&path, None).unwrap().is_ok());
}

#[test]
fn audit_open_refuses_broken_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 5);
    let mut l = lines_of(&path);
    l.remove(2);
    write_lines(&path, &l);
    let err = AuditLog::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("audit verify"), "{msg}");
    assert!(matches!(err, AuditError::Broken { .. }));
    // Deleting the head file of a non-empty log is itself a problem.
    let sub = tempfile::tempdir_in(dir.path()).unwrap();
    let path = make_log(sub.path(), 2);
    std::fs::remove_file(head_path(&path)).unwrap();
    assert!(matches!(
        problems(&path, None).as_slice(),
        [Tamper::HeadFile { .. }]
    ));
}

#[cfg(unix)]
#[test]
fn audit_write_failure_is_an_error_not_a_panic() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let running_as_root = std::fs::write(ro.join("probe"), b"x").is_ok();
    if !running_as_root {
        assert!(matches!(
            AuditLog::open(&ro.join("audit.log")),
            Err(AuditError::Io { .. })
        ));
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A full disk, where available: /dev/full fails every write with ENOSPC.
    let full = Path::new("/dev/full");
    if full.exists() {
        let file = OpenOptions::new().append(true).open(full).unwrap();
        let log = AuditLog {
            path: full.to_owned(),
            head_path: dir.path().join("full.head"),
            inner: Mutex::new(Inner {
                stamp: file.metadata().ok().map(|m| FileStamp::of(&m)),
                file,
                head: AuditHead::genesis(),
                len: 0,
                poisoned: None,
                tampered: None,
                // No head file was ever written for it.
                head_stale: true,
            }),
            observer: Default::default(),
        };
        let err = log.append(sample_events()[0].clone(), 0).unwrap_err();
        assert!(
            matches!(err, AuditError::Io { .. } | AuditError::Poisoned { .. }),
            "{err}"
        );
        assert_eq!(log.head(), AuditHead::genesis());
        assert!(log.append(sample_events()[0].clone(), 0).is_err());
    }

    // A log file made read-only after opening for reading only: appends fail cleanly.
    let path = make_log(dir.path(), 1);
    let file = OpenOptions::new().read(true).open(&path).unwrap();
    let log = AuditLog {
        path: path.clone(),
        head_path: head_path(&path),
        inner: Mutex::new(Inner {
            stamp: file.metadata().ok().map(|m| FileStamp::of(&m)),
            file,
            head: verify(&path, None).unwrap().head,
            len: std::fs::metadata(&path).unwrap().len(),
            poisoned: None,
            tampered: None,
            head_stale: false,
        }),
        observer: Default::default(),
    };
    assert!(log.append(sample_events()[0].clone(), 0).is_err());
    assert_eq!(log.head().seq, 1);
    drop(log);
    assert!(verify(&path, None).unwrap().is_ok());
}

/// A log of the sample events, open, and its path.
fn open_log_with_entries(dir: &Path) -> (AuditLog, PathBuf) {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    for (i, e) in sample_events().into_iter().enumerate() {
        log.append(e, i as i64).unwrap();
    }
    // Coarse file timestamps: let the clock tick past our last append.
    std::thread::sleep(std::time::Duration::from_millis(20));
    (log, path)
}

fn assert_refused_for_good(log: &AuditLog, wording: &str) {
    for _ in 0..2 {
        match log.append(sample_events()[0].clone(), 100) {
            Err(AuditError::Tampered { reason, .. }) => {
                assert!(reason.contains(wording), "{reason}")
            }
            other => panic!("expected a tampered log, got {other:?}"),
        }
    }
}

/// A fresh open log whose files `tamper` changes behind its back (given the log's folder, its
/// path and its text): appends must then be refused for good, with `wording` in the reason.
fn assert_tamper_refused(tamper: impl FnOnce(&Path, &Path, &str), wording: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = open_log_with_entries(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    tamper(dir.path(), &path, &text);
    assert_refused_for_good(&log, wording);
}

/// [`assert_tamper_refused`] for an edit of the log's text that keeps its length (so only the
/// content tells).
fn assert_same_length_edit_refused(edit: impl FnOnce(&str) -> String, wording: &str) {
    assert_tamper_refused(
        |_, path, text| {
            let tampered = edit(text);
            assert_ne!(tampered, text);
            assert_eq!(tampered.len(), text.len());
            std::fs::write(path, tampered).unwrap();
        },
        wording,
    );
}

#[test]
fn a_running_log_whose_last_entry_changes_refuses_appends() {
    // One digit of the last entry's time changed.
    assert_same_length_edit_refused(
        |text| {
            let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
            format!(
                "{}{}",
                &text[..cut],
                text[cut..].replacen("\"at_ms\":7", "\"at_ms\":8", 1)
            )
        },
        "last entry (seq 8)",
    );
}

#[test]
fn a_running_log_changed_in_the_middle_refuses_appends() {
    assert_same_length_edit_refused(
        |text| text.replacen("\"at_ms\":2", "\"at_ms\":3", 1),
        "line 3",
    );
}

#[test]
fn a_running_log_replaced_or_cut_or_with_another_head_refuses_appends() {
    // Replaced by an identical copy under the same name (as `sed -i` or an editor does).
    assert_tamper_refused(
        |dir, path, text| {
            let copy = dir.join("copy");
            std::fs::write(&copy, text).unwrap();
            std::fs::rename(&copy, path).unwrap();
        },
        "another file was put in place",
    );
    assert_tamper_refused(
        |_, path, text| {
            let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(cut as u64)
                .unwrap();
        },
        "truncated",
    );
    assert_tamper_refused(
        |_, path, _| {
            std::fs::write(head_path(path), "3:".to_owned() + &"ab".repeat(32) + "\n").unwrap();
        },
        "the head file says 3:",
    );
}

#[test]
fn appends_of_another_writer_are_followed_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, path) = open_log_with_entries(dir.path());
    // `cleanroom-node forget` appends through its own handle while the node runs.
    let other = AuditLog::open(&path).unwrap();
    other.append(sample_events()[2].clone(), 50).unwrap();
    drop(other);
    let head = log.append(sample_events()[3].clone(), 51).unwrap();
    assert_eq!(head.seq, 10);
    assert!(verify(&path, Some(&head)).unwrap().is_ok());
    // An appended line that does not chain from ours is not an append.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut text = std::fs::read_to_string(&path).unwrap();
    let last = text.lines().last().unwrap().to_owned();
    text.push_str(&last);
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    assert_refused_for_good(&log, "does not follow ours");
}

#[test]
fn audit_log_is_send_sync_and_concurrent() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AuditLog>();
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(AuditLog::open(&dir.path().join("a.log")).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    log.append(sample_events()[(t + i) % 8].clone(), i as i64)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let r = verify(&dir.path().join("a.log"), Some(&log.head())).unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!(r.entries, 40);
}
