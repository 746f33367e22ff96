//! Local JSON lines (a file, a directory or a glob), read strictly, one line a record
//! ([`super::json_line`]).
//!
//! DataFusion's JSON reader fails the whole read on one line that is not JSON, or on a value
//! of another type than its column's first lines (a number where text was), so one bad line
//! would fail every job over the dataset. Here a bad line costs only itself, and is placed by
//! its line. A line longer than [`MAX_LINE_BYTES`] is rejected without being held. Blank lines
//! are skipped and are not records.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::json_line::{ColumnFinder, JsonColumns, JsonLine, MAX_LINE_BYTES, is_blank};
use super::{Malformed, SourceError};
use crate::data::schema::DataFormat;

/// The files of a local JSON lines dataset, read in path order.
#[derive(Debug)]
pub struct JsonFiles {
    pending: Vec<PathBuf>,
    path: PathBuf,
    reader: BufReader<File>,
    headers: Vec<String>,
    columns: JsonColumns,
    /// The current record's line in its file (1-based).
    line: u64,
    /// The next line's number.
    next_line: u64,
    buf: Vec<u8>,
    /// The current record.
    record: JsonLine,
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
        let columns = find_columns(&first, &pending)?;
        let headers = columns.headers();
        let all: Vec<usize> = (0..headers.len()).collect();
        Ok(JsonFiles {
            pending,
            reader: open(&first)?,
            path: first,
            record: JsonLine::new(columns.paths(&all)),
            headers,
            columns,
            line: 0,
            next_line: 1,
            buf: Vec::new(),
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
        if let Some((i, kind)) = self.columns.many_values(read) {
            return Err(SourceError::ManyValues {
                location: self.path.display().to_string(),
                column: self.headers[i].clone(),
                kind,
            });
        }
        self.record.want(read);
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
                    self.record.too_long();
                    return Ok(true);
                }
                Line::Read => {
                    self.next_line += 1;
                    if is_blank(&self.buf) {
                        continue;
                    }
                    self.line = line;
                    self.record.load(&self.buf);
                    return Ok(true);
                }
            }
        }
    }

    /// The current record's field `i`.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        self.record.get(i)
    }

    /// The line the current record is on (1-based).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Whether the record must not be read ([`JsonLine::malformed`]).
    pub fn malformed(&self, read: &[usize]) -> Option<(Option<usize>, Malformed)> {
        self.record.malformed(read)
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

/// The columns of the first records of `first` and then `rest` (reversed: the next file last).
fn find_columns(first: &Path, rest: &[PathBuf]) -> Result<JsonColumns, SourceError> {
    let mut finder = ColumnFinder::default();
    for path in std::iter::once(first).chain(rest.iter().rev().map(PathBuf::as_path)) {
        let mut reader = open(path)?;
        let mut buf = Vec::new();
        let io = |source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        while finder.wants_more() {
            match read_line(&mut reader, &mut buf).map_err(io)? {
                Line::End => break,
                Line::TooLong => {}
                Line::Read if is_blank(&buf) => {}
                Line::Read => finder.add(&buf),
            }
        }
    }
    Ok(finder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::json_line::MAX_COLUMNS;

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
