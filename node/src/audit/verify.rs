//! The verifier: reads a log back and names every flipped, removed, reordered or truncated
//! entry, and what `audit show` lists.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::Path;

use super::{
    AuditEntry, AuditError, AuditHead, decode_line, genesis_hash, head_path, io_err, to_hex,
};

/// Where an expected head came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadSource {
    /// The `<log>.head` file next to the log.
    HeadFile,
    /// A head given by the caller (e.g. from the coordinator's job results).
    Expected,
}

impl fmt::Display for HeadSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeadSource::HeadFile => "the head file",
            HeadSource::Expected => "the expected head",
        })
    }
}

/// One problem found by [`verify`]. Lines are numbered from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// The line is not a well-formed, canonical entry (a changed byte, most likely).
    Corrupted {
        /// The line.
        line: u64,
    },
    /// The last line has no final newline: truncated mid-line, or its newline was changed.
    Incomplete {
        /// The line.
        line: u64,
    },
    /// The entry's stored hash does not match its content (a changed byte).
    BadHash {
        /// The line.
        line: u64,
        /// The seq the entry claims.
        seq: u64,
    },
    /// Entries are missing before this line (deleted).
    Gap {
        /// The line.
        line: u64,
        /// The seq that should have come next.
        expected_seq: u64,
        /// The seq found.
        found_seq: u64,
    },
    /// The entry is not where its seq says it belongs (entries reordered).
    OutOfOrder {
        /// The line.
        line: u64,
        /// The seq found.
        seq: u64,
        /// The seq that should have come next.
        expected_seq: u64,
    },
    /// A second entry with a seq already seen (inserted or replayed).
    Duplicate {
        /// The line.
        line: u64,
        /// The repeated seq.
        seq: u64,
    },
    /// The entry does not link to the entry before it (inserted or replaced).
    BrokenLink {
        /// The line.
        line: u64,
        /// The seq the entry claims.
        seq: u64,
    },
    /// The log has fewer entries than a head it once had (tail cut off).
    Truncated {
        /// Entries found.
        entries: u64,
        /// Entries the head says there were at least.
        expected_at_least: u64,
        /// Which head.
        source: HeadSource,
    },
    /// The entry at a head's seq has another hash (history rewritten).
    HeadMismatch {
        /// The head's seq.
        seq: u64,
        /// The hash the head has.
        expected: String,
        /// The hash the log has at that seq (`None`: that entry is unreadable).
        found: Option<String>,
        /// Which head.
        source: HeadSource,
    },
    /// The head file is missing or unreadable while the log has entries.
    HeadFile {
        /// What is wrong with it.
        problem: String,
    },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Corrupted { line } => write!(
                f,
                "line {line}: not a valid entry (a changed or corrupted byte)"
            ),
            Tamper::Incomplete { line } => write!(
                f,
                "line {line}: incomplete last line (truncated mid-line, or its newline changed)"
            ),
            Tamper::BadHash { line, seq } => write!(
                f,
                "line {line} (seq {seq}): the hash does not match the content (a changed byte)"
            ),
            Tamper::Gap {
                line,
                expected_seq,
                found_seq,
            } => write!(
                f,
                "line {line}: found seq {found_seq} where seq {expected_seq} should be: \
                 entries {expected_seq}..={} deleted",
                found_seq - 1
            ),
            Tamper::OutOfOrder {
                line,
                seq,
                expected_seq,
            } => write!(
                f,
                "line {line}: seq {seq} out of order (expected seq {expected_seq}): entries reordered"
            ),
            Tamper::Duplicate { line, seq } => write!(
                f,
                "line {line}: seq {seq} appears again (an inserted or replayed entry)"
            ),
            Tamper::BrokenLink { line, seq } => write!(
                f,
                "line {line} (seq {seq}): does not link to the previous entry (an inserted or replaced entry)"
            ),
            Tamper::Truncated {
                entries,
                expected_at_least,
                source,
            } => write!(
                f,
                "truncated: the log has {entries} entries but {source} says at least {expected_at_least}"
            ),
            Tamper::HeadMismatch {
                seq,
                expected,
                found,
                source,
            } => match found {
                Some(found) => write!(
                    f,
                    "seq {seq}: hash {found} but {source} says {expected} (history rewritten)"
                ),
                None => write!(
                    f,
                    "seq {seq}: {source} says {expected}, but that entry is unreadable"
                ),
            },
            Tamper::HeadFile { problem } => write!(f, "head file: {problem}"),
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyReport {
    /// Complete lines in the log.
    pub entries: u64,
    /// The head of the log as found: the last readable entry's seq and (recomputed) hash.
    pub head: AuditHead,
    /// Every problem, in file order (then head checks); empty means the log is intact.
    pub problems: Vec<Tamper>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The last complete line of the first `len` bytes of the file (without its newline), reading
/// only the end of the file. `None` for an empty log.
pub(crate) fn last_line(path: &Path, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::{Read, Seek, SeekFrom};
    if len == 0 {
        return Ok(None);
    }
    let mut file = File::open(path)?;
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = Vec::with_capacity((len - start) as usize);
        file.seek(SeekFrom::Start(start))?;
        Read::by_ref(&mut file)
            .take(len - start)
            .read_to_end(&mut buf)?;
        // The byte before `len` is the last entry's newline.
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        match body.iter().rposition(|b| *b == b'\n') {
            Some(p) => return Ok(Some(body[p + 1..].to_vec())),
            None if start == 0 => return Ok(Some(body.to_vec())),
            None => chunk *= 4,
        }
    }
}

/// Splits the file into complete lines (without newline) and an optional incomplete tail.
pub(crate) fn split_lines(bytes: &[u8]) -> (Vec<&[u8]>, Option<&[u8]>) {
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // `split` yields a final empty piece after a trailing newline (or for an empty file).
    let tail = lines.pop().filter(|t| !t.is_empty());
    (lines, tail)
}

/// Reads every entry of a log; fails on the first line that is not a valid entry (use
/// [`verify`] to check the chain).
pub fn read_entries(path: &Path) -> Result<Vec<AuditEntry>, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let (lines, tail) = split_lines(&bytes);
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let entry = decode_line(l).ok_or_else(|| AuditError::Broken {
            path: path.to_owned(),
            problems: vec![Tamper::Corrupted { line: i as u64 + 1 }],
        })?;
        out.push(entry);
    }
    if tail.is_some() {
        return Err(AuditError::Broken {
            path: path.to_owned(),
            problems: vec![Tamper::Incomplete {
                line: lines.len() as u64 + 1,
            }],
        });
    }
    Ok(out)
}

pub(crate) fn read_head_file(path: &Path) -> Result<Option<AuditHead>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.parse().map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Reads and checks the log at `path` (a missing log is an empty one): every line must be a
/// canonical entry whose hash matches its content, seqs must run 1, 2, 3… and each entry must
/// link to the one before. The log is then compared with its head file and with
/// `expected_head` (e.g. a head kept by the coordinator with a job result): a log with fewer
/// entries than a head is truncated; a different hash at a head's seq means rewritten history.
/// A head file one or more entries *behind* the log is fine (a crash between the log's fsync
/// and the head's rename).
pub fn verify(path: &Path, expected_head: Option<&AuditHead>) -> Result<VerifyReport, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let (lines, tail) = split_lines(&bytes);
    let mut problems = Vec::new();

    // Pass 1: parse, and check each entry's own hash. `good` entries are usable for linking.
    let parsed: Vec<Option<AuditEntry>> = lines.iter().map(|l| decode_line(l)).collect();
    let mut good: Vec<Option<(&AuditEntry, [u8; 32])>> = Vec::with_capacity(parsed.len());
    for (i, p) in parsed.iter().enumerate() {
        let line = i as u64 + 1;
        match p {
            None => {
                problems.push(Tamper::Corrupted { line });
                good.push(None);
            }
            Some(e) => {
                let h = e.compute_hash();
                if h != e.hash {
                    problems.push(Tamper::BadHash { line, seq: e.seq });
                    good.push(None);
                } else {
                    good.push(Some((e, h)));
                }
            }
        }
    }
    if tail.is_some() {
        problems.push(Tamper::Incomplete {
            line: lines.len() as u64 + 1,
        });
    }

    // Hashes by seq (every good occurrence), and where each seq occurs.
    let mut by_seq: HashMap<u64, Vec<[u8; 32]>> = HashMap::new();
    let mut lines_of: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, g) in good.iter().enumerate() {
        if let Some((e, h)) = g {
            by_seq.entry(e.seq).or_default().push(*h);
            lines_of.entry(e.seq).or_default().push(i);
        }
    }
    let genesis = genesis_hash();

    // Pass 2: order, duplicates and links, in file order. After an unreadable line the
    // expected seq resynchronises on the next good entry (a changed newline can merge or split
    // lines, so an unreadable line may stand for zero, one or two entries).
    let mut expected: u64 = 1;
    let mut resync = false;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut flagged: HashSet<usize> = HashSet::new();
    let mut ordered: Vec<Tamper> = Vec::new();
    for (i, g) in good.iter().enumerate() {
        let line = i as u64 + 1;
        let Some((e, _)) = g else {
            resync = true;
            continue;
        };
        let s = e.seq;
        // Link: prev must be the hash of (some good occurrence of) seq - 1.
        let linked = if s == 0 {
            false
        } else if s == 1 {
            e.prev == genesis
        } else {
            match by_seq.get(&(s - 1)) {
                Some(hs) => hs.contains(&e.prev),
                None => true, // that entry is missing or unreadable: reported elsewhere
            }
        };
        if !linked {
            ordered.push(Tamper::BrokenLink { line, seq: s });
            flagged.insert(i);
        }
        if seen.contains(&s) {
            // Report the repeat unless the earlier occurrence was already shown to be forged.
            let earlier_ok = lines_of
                .get(&s)
                .is_some_and(|ls| ls.iter().any(|&j| j < i && !flagged.contains(&j)));
            if earlier_ok && linked {
                ordered.push(Tamper::Duplicate { line, seq: s });
            }
            continue;
        }
        seen.insert(s);
        if resync {
            resync = false;
            if s >= expected {
                expected = s + 1;
                continue;
            }
        }
        if s == expected {
            expected = s + 1;
        } else if s > expected {
            let missing_later =
                (expected..s).any(|m| lines_of.get(&m).is_some_and(|ls| ls.iter().any(|&j| j > i)));
            if missing_later {
                ordered.push(Tamper::OutOfOrder {
                    line,
                    seq: s,
                    expected_seq: expected,
                });
            } else {
                ordered.push(Tamper::Gap {
                    line,
                    expected_seq: expected,
                    found_seq: s,
                });
            }
            expected = s + 1;
        } else {
            ordered.push(Tamper::OutOfOrder {
                line,
                seq: s,
                expected_seq: expected,
            });
        }
    }
    problems.extend(ordered);
    problems.sort_by_key(problem_line);

    // The head as found: the last readable entry in the file.
    let head = parsed
        .iter()
        .rev()
        .flatten()
        .next()
        .map(|e| AuditHead {
            seq: e.seq,
            hash: e.compute_hash(),
        })
        .unwrap_or_else(AuditHead::genesis);
    let entries = lines.len() as u64;

    // Heads: the head file, then the caller's.
    let check_head = |h: &AuditHead, source: HeadSource, problems: &mut Vec<Tamper>| {
        if h.seq == 0 {
            if h.hash != genesis {
                problems.push(Tamper::HeadMismatch {
                    seq: 0,
                    expected: to_hex(&h.hash),
                    found: Some(to_hex(&genesis)),
                    source,
                });
            }
            return;
        }
        let max_seq = by_seq.keys().copied().max().unwrap_or(0).max(entries);
        if h.seq > max_seq {
            problems.push(Tamper::Truncated {
                entries,
                expected_at_least: h.seq,
                source,
            });
            return;
        }
        match by_seq.get(&h.seq) {
            Some(hs) if hs.contains(&h.hash) => {}
            Some(hs) => problems.push(Tamper::HeadMismatch {
                seq: h.seq,
                expected: to_hex(&h.hash),
                found: hs.first().map(|x| to_hex(x)),
                source,
            }),
            None => problems.push(Tamper::HeadMismatch {
                seq: h.seq,
                expected: to_hex(&h.hash),
                found: None,
                source,
            }),
        }
    };
    match read_head_file(&head_path(path)) {
        Ok(Some(h)) => check_head(&h, HeadSource::HeadFile, &mut problems),
        Ok(None) if entries > 0 || tail.is_some() => problems.push(Tamper::HeadFile {
            problem: format!("{} is missing", head_path(path).display()),
        }),
        Ok(None) => {}
        Err(problem) => problems.push(Tamper::HeadFile { problem }),
    }
    if let Some(h) = expected_head {
        check_head(h, HeadSource::Expected, &mut problems);
    }

    Ok(VerifyReport {
        entries,
        head,
        problems,
    })
}

/// One line of the log as `audit show` lists it, with what [`verify`] says about it.
#[derive(Debug, Clone)]
pub struct ShownLine {
    /// The line (from 1).
    pub line: u64,
    /// The entry, if the line is one.
    pub entry: Option<AuditEntry>,
    /// Whether the entry can be trusted: [`LineCheck::Ok`] for every entry before the first
    /// problem; an entry after it is [`LineCheck::Unverified`] (its chain passes through a
    /// bad entry).
    pub check: LineCheck,
}

/// What [`verify`] says about one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineCheck {
    /// In a chain that verifies up to here.
    Ok,
    /// The line itself is bad (the problem, as `audit verify` words it).
    Bad(String),
    /// Follows a bad line: it cannot be verified.
    Unverified,
}

/// Every line of the log with its check, and the problems that belong to no line (a cut log, a
/// head file that disagrees), for `audit show`.
pub fn show_lines(path: &Path) -> Result<(Vec<ShownLine>, Vec<Tamper>), AuditError> {
    let report = verify(path, None)?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let (lines, tail) = split_lines(&bytes);
    let mut by_line: BTreeMap<u64, String> = BTreeMap::new();
    let mut other = Vec::new();
    for p in &report.problems {
        match problem_line(p) {
            u64::MAX => other.push(p.clone()),
            line => {
                by_line.entry(line).or_insert_with(|| p.to_string());
            }
        }
    }
    let first_bad = by_line.keys().next().copied().unwrap_or(u64::MAX);
    let mut out = Vec::with_capacity(lines.len() + 1);
    for (i, l) in lines.iter().chain(tail.as_slice()).enumerate() {
        let line = i as u64 + 1;
        let check = match by_line.get(&line) {
            Some(problem) => LineCheck::Bad(problem.clone()),
            None if line > first_bad => LineCheck::Unverified,
            None => LineCheck::Ok,
        };
        out.push(ShownLine {
            line,
            entry: decode_line(l),
            check,
        });
    }
    Ok((out, other))
}

fn problem_line(t: &Tamper) -> u64 {
    match t {
        Tamper::Corrupted { line }
        | Tamper::Incomplete { line }
        | Tamper::BadHash { line, .. }
        | Tamper::Gap { line, .. }
        | Tamper::OutOfOrder { line, .. }
        | Tamper::Duplicate { line, .. }
        | Tamper::BrokenLink { line, .. } => *line,
        _ => u64::MAX,
    }
}
