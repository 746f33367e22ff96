//! Local JSON lines (a file, a directory or a glob), read strictly, one line a record.
//!
//! DataFusion's JSON reader fails the whole read on one line that is not JSON, or on a value
//! of another type than its column's first lines (a number where text was), so one bad line
//! would fail every job over the dataset. Here a line is a record: one that is not a JSON
//! object, or longer than [`MAX_LINE_BYTES`], is rejected and placed by its line; any scalar
//! reads as its text (a number as its digits, a boolean as `true`/`false`); a field that holds
//! a list or an object where the job reads one value rejects its row.
//!
//! A nested object's fields are columns named by their path (`customer.email`), as for
//! Parquet ([`super::nested`]). The columns are the paths seen in the first [`INFER_LINES`]
//! records, at most [`MAX_COLUMNS`] (a record's keys in sorted order); a path first seen later
//! is not a column, and a path that was only ever null where an object was seen too is the
//! object's, not a column.
//! Blank lines are skipped and are not records. A record's fields that no job reads are
//! skipped as it is parsed ([`super::json_record`]).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::json_record::{Fields, Wanted, read_record};
use super::{Malformed, SourceError};
use crate::data::schema::DataFormat;

/// Records read to find the columns.
pub const INFER_LINES: usize = 100_000;

/// Longest line read; a longer one is rejected without being held.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Deepest object whose fields become columns; one deeper is a single value.
const MAX_DEPTH: usize = 8;

/// Most columns a dataset's first records make; a path first seen after them is not a column.
pub const MAX_COLUMNS: usize = 10_000;

/// A column: its path of keys, and whether the first records held one value or many there.
#[derive(Debug)]
struct Column {
    keys: Vec<String>,
    seen_value: bool,
    seen_many: Option<&'static str>,
}

/// The files of a local JSON lines dataset, read in path order.
#[derive(Debug)]
pub struct JsonFiles {
    pending: Vec<PathBuf>,
    path: PathBuf,
    reader: BufReader<File>,
    headers: Vec<String>,
    columns: Vec<Column>,
    /// The current record's line in its file (1-based).
    line: u64,
    /// The next line's number.
    next_line: u64,
    buf: Vec<u8>,
    /// The fields the pass reads, as a tree of keys.
    wanted: Wanted,
    /// The current record's fields (when it is not `bad`).
    fields: Fields,
    /// Why the current line is no record.
    bad: Option<Malformed>,
}

impl JsonFiles {
    /// Lists the files at `location` and finds the columns from their first records.
    pub fn open(location: &Path) -> Result<JsonFiles, SourceError> {
        let mut pending = super::csv::list_files(location, DataFormat::Jsonl)?;
        pending.reverse();
        let first = pending.pop().ok_or_else(|| SourceError::NoFiles {
            location: location.display().to_string(),
            format: DataFormat::Jsonl,
        })?;
        let columns = infer_columns(&first, &pending)?;
        let headers = columns.iter().map(|c| c.keys.join(".")).collect();
        // Every column until the pass says which it reads.
        let all: Vec<usize> = (0..columns.len()).collect();
        let wanted = wanted(&columns, &all);
        let fields = Fields::new(columns.len());
        Ok(JsonFiles {
            pending,
            reader: open(&first)?,
            path: first,
            headers,
            columns,
            line: 0,
            next_line: 1,
            buf: Vec::new(),
            wanted,
            fields,
            bad: None,
        })
    }

    /// The column names: each field's path.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads only the columns at `read` from now on. A column that held only lists or objects
    /// in the first records is refused, saying what to do, as the engine's reader refuses it.
    pub fn start(&mut self, read: &[usize]) -> Result<(), SourceError> {
        for &i in read {
            let Some(column) = self.columns.get(i) else {
                continue;
            };
            if let (false, Some(kind)) = (column.seen_value, column.seen_many) {
                return Err(SourceError::ManyValues {
                    location: self.path.display().to_string(),
                    column: self.headers[i].clone(),
                    kind,
                });
            }
        }
        self.wanted = wanted(&self.columns, read);
        Ok(())
    }

    /// Reads the next record, moving on to the next file at the end of one.
    pub fn advance(&mut self) -> Result<bool, SourceError> {
        loop {
            let line = self.next_line;
            match read_line(&mut self.reader, &mut self.buf).map_err(|e| self.io(e))? {
                Line::End => {
                    let Some(next) = self.pending.pop() else {
                        return Ok(false);
                    };
                    self.reader = open(&next)?;
                    self.path = next;
                    self.next_line = 1;
                }
                Line::TooLong => {
                    self.next_line += 1;
                    self.line = line;
                    self.bad = Some(Malformed::LineTooLong);
                    return Ok(true);
                }
                Line::Read => {
                    self.next_line += 1;
                    let text = trim(&self.buf, line == 1);
                    if text.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    self.line = line;
                    let object = read_record(text, &self.wanted, &mut self.fields);
                    self.bad = (!object).then_some(Malformed::NotJsonObject);
                    return Ok(true);
                }
            }
        }
    }

    /// The current record's field `i`.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        if self.bad.is_some() {
            return None;
        }
        self.fields.get(i)
    }

    /// The line the current record is on (1-based).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Whether the record must not be read: a line that is no JSON object or too long; a
    /// column the pass reads (`read`) holding a list or an object, or a line break (what a
    /// value pasted from elsewhere brings; the CSV readers reject it too).
    pub fn malformed(&self, read: &[usize]) -> Option<(Option<usize>, Malformed)> {
        if let Some(why) = self.bad {
            return Some((None, why));
        }
        if let Some(&i) = read.iter().find(|&&i| self.fields.many(i)) {
            return Some((Some(i), Malformed::NotOneValue));
        }
        read.iter()
            .find(|&&i| self.fields.get(i).is_some_and(super::has_line_break))
            .map(|&i| (Some(i), Malformed::LineBreak))
    }

    fn io(&self, source: std::io::Error) -> SourceError {
        SourceError::Open {
            path: self.path.clone(),
            source,
        }
    }
}

fn open(path: &Path) -> Result<BufReader<File>, SourceError> {
    File::open(path)
        .map(|f| BufReader::with_capacity(256 * 1024, f))
        .map_err(|source| SourceError::Open {
            path: path.to_owned(),
            source,
        })
}

/// What [`read_line`] found.
enum Line {
    Read,
    TooLong,
    End,
}

/// Reads the next line (without its `\n`) into `buf`; a line longer than [`MAX_LINE_BYTES`]
/// is skipped to its end without being held.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::End,
                (true, true) => Line::TooLong,
                (true, false) => Line::Read,
            });
        }
        any = true;
        let (piece, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => (&chunk[..at], Some(at + 1)),
            None => (chunk, None),
        };
        if !too_long && buf.len() + piece.len() <= MAX_LINE_BYTES {
            buf.extend_from_slice(piece);
        } else {
            too_long = true;
            buf.clear();
        }
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Read });
        }
    }
}

/// A line without its `\r`, and without a byte-order mark on a file's first line.
fn trim(line: &[u8], first: bool) -> &[u8] {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if first {
        line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
    } else {
        line
    }
}

/// The tree of the columns at `read`.
fn wanted(columns: &[Column], read: &[usize]) -> Wanted {
    Wanted::new(
        read.iter()
            .filter_map(|&i| columns.get(i).map(|c| (i, c.keys.as_slice()))),
    )
}

/// The columns of the first [`INFER_LINES`] records of `first` and then `rest`: every path to a
/// value, in the order first seen, without a path only ever null that leads to an object.
fn infer_columns(first: &Path, rest: &[PathBuf]) -> Result<Vec<Column>, SourceError> {
    let mut columns = paths_seen(first, rest)?;
    let objects: std::collections::HashSet<Vec<String>> = columns
        .iter()
        .flat_map(|c| (1..c.keys.len()).map(|n| c.keys[..n].to_vec()))
        .collect();
    columns.retain(|c| c.seen_value || c.seen_many.is_some() || !objects.contains(&c.keys));
    Ok(columns)
}

/// Every path to a value (or a null, or a list) in the first [`INFER_LINES`] records.
fn paths_seen(first: &Path, rest: &[PathBuf]) -> Result<Vec<Column>, SourceError> {
    let mut columns: Vec<Column> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut records = 0;
    // `rest` is reversed (the next file last).
    for path in std::iter::once(first).chain(rest.iter().rev().map(PathBuf::as_path)) {
        let mut reader = open(path)?;
        let mut buf = Vec::new();
        let mut number = 0u64;
        loop {
            let io = |source| SourceError::Open {
                path: path.to_owned(),
                source,
            };
            match read_line(&mut reader, &mut buf).map_err(io)? {
                Line::End => break,
                Line::TooLong => {}
                Line::Read => {
                    number += 1;
                    let Ok(Value::Object(object)) =
                        serde_json::from_slice::<Value>(trim(&buf, number == 1))
                    else {
                        continue;
                    };
                    let mut keys = Vec::new();
                    collect(&object, &mut keys, &mut columns, &mut index);
                    records += 1;
                    if records >= INFER_LINES {
                        return Ok(columns);
                    }
                }
            }
        }
    }
    Ok(columns)
}

/// Adds the paths of `object` (under `keys`) to `columns`.
fn collect(
    object: &Map<String, Value>,
    keys: &mut Vec<String>,
    columns: &mut Vec<Column>,
    index: &mut std::collections::HashMap<Vec<String>, usize>,
) {
    for (key, value) in object {
        keys.push(key.clone());
        match value {
            Value::Object(inner) if keys.len() < MAX_DEPTH => {
                collect(inner, keys, columns, index);
            }
            _ => {
                let at = match index.get(keys.as_slice()) {
                    Some(&at) => at,
                    // A file with ever new keys cannot make the column list grow without end.
                    None if columns.len() >= MAX_COLUMNS => {
                        keys.pop();
                        continue;
                    }
                    None => {
                        index.insert(keys.clone(), columns.len());
                        columns.push(Column {
                            keys: keys.clone(),
                            seen_value: false,
                            seen_many: None,
                        });
                        columns.len() - 1
                    }
                };
                let column = &mut columns[at];
                match value {
                    Value::Array(_) => column.seen_many = Some("list"),
                    Value::Object(_) => column.seen_many = Some("object"),
                    Value::Null => {}
                    _ => column.seen_value = true,
                }
            }
        }
        keys.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each record's line, and its fields at `read` or why it is malformed.
    type Rows = Vec<(u64, Result<Vec<Option<String>>, Malformed>)>;

    fn read_all(text: &str, read: &[&str]) -> (Vec<String>, Rows) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, text).unwrap();
        let mut files = JsonFiles::open(&path).unwrap();
        let headers = files.headers().to_vec();
        let at: Vec<usize> = read
            .iter()
            .map(|r| headers.iter().position(|h| h == r).unwrap())
            .collect();
        files.start(&at).unwrap();
        let mut out = Vec::new();
        while files.advance().unwrap() {
            let row = match files.malformed(&at) {
                Some((_, why)) => Err(why),
                None => Ok(at
                    .iter()
                    .map(|&i| {
                        files
                            .field(i)
                            .map(|f| String::from_utf8(f.to_vec()).unwrap())
                    })
                    .collect()),
            };
            out.push((files.line(), row));
        }
        (headers, out)
    }

    #[test]
    fn each_line_is_a_record_and_a_bad_one_costs_only_itself() {
        let text = "\u{feff}{\"id\": 1, \"customer\": {\"email\": \"a@x.com\", \"address\": {\"city\": \"Rome\"}}}\r\n\
                    {\"id\": 2, \"customer\": {\"email\": 4155550100}}\n\
                    \n\
                    {\"id\": 3, \"customer\": {\"email\": \"b@x.com\"\n\
                    [1, 2]\n\
                    {\"id\": 5, \"customer\": null, \"late\": true}\n\
                    {\"id\": 6, \"customer\": {\"email\": [\"c@x.com\"]}}\n\
                    {\"id\": 7.5, \"customer\": {\"email\": \"x\\ny@x.com\"}}\n";
        let (headers, rows) = read_all(text, &["id", "customer.email"]);
        // A record's keys come sorted; `customer`, null in line 6, is an object elsewhere.
        assert_eq!(
            headers,
            ["customer.address.city", "customer.email", "id", "late"]
        );
        let some = |id: &str, email: Option<&str>| Ok(vec![Some(id.into()), email.map(Into::into)]);
        assert_eq!(
            rows,
            [
                (1, some("1", Some("a@x.com"))),
                // A number reads as its digits, whatever the column held before.
                (2, some("2", Some("4155550100"))),
                // Line 3 is blank: no record.
                (4, Err(Malformed::NotJsonObject)),
                (5, Err(Malformed::NotJsonObject)),
                (6, some("5", None)),
                (7, Err(Malformed::NotOneValue)),
                (8, Err(Malformed::LineBreak)),
            ]
        );
    }

    #[test]
    fn a_line_too_long_is_rejected_without_being_held() {
        let long = format!("{{\"email\": \"{}\"}}", "a".repeat(MAX_LINE_BYTES));
        let text = format!("{{\"email\": \"a@x.com\"}}\n{long}\n{{\"email\": \"b@x.com\"}}");
        let (_, rows) = read_all(&text, &["email"]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], (2, Err(Malformed::LineTooLong)));
        assert_eq!(rows[2], (3, Ok(vec![Some("b@x.com".into())])));
    }

    #[test]
    fn a_file_of_ever_new_keys_makes_at_most_the_column_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        let mut text = String::new();
        for i in 0..(MAX_COLUMNS + 50) {
            text += &format!("{{\"k{i}\": 1, \"email\": \"a@x.com\"}}\n");
        }
        std::fs::write(&path, text).unwrap();
        let files = JsonFiles::open(&path).unwrap();
        assert_eq!(files.headers().len(), MAX_COLUMNS);
        assert!(files.headers().iter().any(|h| h == "email"));
    }

    #[test]
    fn a_column_of_lists_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"emails\": [\"a@x.com\"]}\n").unwrap();
        let mut files = JsonFiles::open(&path).unwrap();
        let err = files.start(&[0]).unwrap_err().to_string();
        assert!(err.contains("'emails' holds a list"), "{err}");
        assert!(err.contains("unnest(emails)"), "{err}");
    }
}
