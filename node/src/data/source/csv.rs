//! Local CSV, read strictly: one file, a directory of `.csv` files, or a glob, in path order,
//! as one table. Every file must have the same header row.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{Malformed, SourceError};
use crate::data::schema::{DataFormat, Delimiter};

/// Read buffer of the CSV reader.
const READ_BUFFER: usize = 256 * 1024;

/// The files of a local CSV dataset, read one after the other.
#[derive(Debug)]
pub struct CsvFiles {
    delimiter: Delimiter,
    /// The files still to open, in reverse order (the next one is last).
    pending: Vec<PathBuf>,
    /// The file being read.
    path: PathBuf,
    /// The first file (whose header the others must repeat).
    first: PathBuf,
    reader: ::csv::Reader<File>,
    headers: Vec<String>,
    record: ::csv::ByteRecord,
    /// Data rows read so far, over all files.
    rows: u64,
    /// Set by [`CsvFiles::malformed`] on a malformed record that spans lines: the next read
    /// starts again at its second line ([`CsvFiles::resume_after_first_line`]).
    resume: std::cell::RefCell<Option<::csv::Position>>,
}

impl CsvFiles {
    /// Lists the files at `location` and reads the first one's header; fields are separated by
    /// `delimiter`.
    pub fn open(location: &Path, delimiter: Delimiter) -> Result<CsvFiles, SourceError> {
        let mut pending = list_files(location, DataFormat::Csv)?;
        pending.reverse();
        let first = pending.pop().ok_or_else(|| SourceError::NoFiles {
            location: location.display().to_string(),
            format: DataFormat::Csv,
        })?;
        let (reader, headers) = open_csv(&first, delimiter)?;
        Ok(CsvFiles {
            delimiter,
            pending,
            path: first.clone(),
            first,
            reader,
            headers,
            record: ::csv::ByteRecord::new(),
            rows: 0,
            resume: std::cell::RefCell::new(None),
        })
    }

    /// The header row (trimmed).
    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next record, moving on to the next file at the end of one.
    pub fn advance(&mut self) -> Result<bool, SourceError> {
        if let Some(start) = self.resume.get_mut().take() {
            self.resume_after_first_line(start)?;
        }
        loop {
            match self.reader.read_byte_record(&mut self.record) {
                Ok(true) => {
                    self.rows += 1;
                    return Ok(true);
                }
                Ok(false) => {}
                Err(source) => {
                    return Err(SourceError::Row {
                        path: self.path.clone(),
                        row: self.rows + 1,
                        source,
                    });
                }
            }
            let Some(next) = self.pending.pop() else {
                return Ok(false);
            };
            let (reader, headers) = open_csv(&next, self.delimiter)?;
            if headers != self.headers {
                return Err(SourceError::HeaderMismatch {
                    path: next,
                    first: self.first.clone(),
                });
            }
            self.reader = reader;
            self.path = next;
        }
    }

    /// The current record's field `i`.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        self.record.get(i)
    }

    /// The line the current record starts on (1-based; the header is line 1).
    pub fn line(&self) -> u64 {
        self.record.position().map_or(0, |p| p.line())
    }

    /// Whether the record is well formed: as many fields as the header, and no line break in a
    /// field the pass reads (`read`). Checked before any field is used, so a malformed row is
    /// never read by position. A line break in a column the pass does not read is legal CSV (a
    /// note, an address) and only counted in `multi_line`.
    ///
    /// A malformed record that spans lines is what a quote left open makes: it swallowed the
    /// lines after its first. Only that first line is rejected; the next read starts again at
    /// the second, so the records the quote swallowed are read as the records they are.
    pub fn malformed(
        &self,
        read: &[usize],
        multi_line: &mut u64,
    ) -> Option<(Option<usize>, Malformed)> {
        let problem = self.problem(read, multi_line);
        if problem.is_some()
            && let Some(start) = self.record.position()
            // The reader stands where the record ended: at the next record's line.
            && self.reader.position().line() > start.line() + 1
        {
            *self.resume.borrow_mut() = Some(start.clone());
        }
        problem
    }

    fn problem(&self, read: &[usize], multi_line: &mut u64) -> Option<(Option<usize>, Malformed)> {
        let width = self.headers.len();
        if self.record.len() != width {
            return Some((
                None,
                Malformed::FieldCount {
                    expected: width,
                    found: self.record.len(),
                },
            ));
        }
        if let Some(&i) = read
            .iter()
            .find(|&&i| self.record.get(i).is_some_and(super::has_line_break))
        {
            return Some((Some(i), Malformed::LineBreak));
        }
        if let Some(&i) = read
            .iter()
            .find(|&&i| self.record.get(i).is_some_and(|f| f.contains(&b'"')))
        {
            return Some((Some(i), Malformed::StrayQuote));
        }
        if self.record.iter().any(super::has_line_break) {
            *multi_line += 1;
        }
        None
    }

    /// Moves the reader to the line after the one `start` is on, with a fresh parser (no quote
    /// open): the first line of a malformed record stays rejected, and the lines it swallowed
    /// are read again as records.
    fn resume_after_first_line(&mut self, start: ::csv::Position) -> Result<(), SourceError> {
        use std::io::{BufRead, BufReader, Seek, SeekFrom};
        let io = |path: &Path, source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        let file = self.reader.get_mut();
        file.seek(SeekFrom::Start(start.byte()))
            .map_err(|e| io(&self.path, e))?;
        // The first line's length, read in bounded pieces (a line may be long).
        let mut line = BufReader::with_capacity(64 * 1024, &mut *file);
        let mut skipped = 0u64;
        loop {
            let buf = line.fill_buf().map_err(|e| io(&self.path, e))?;
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    skipped += at as u64 + 1;
                    break;
                }
                None => {
                    let n = buf.len();
                    skipped += n as u64;
                    line.consume(n);
                }
            }
        }
        let mut next = ::csv::Position::new();
        next.set_byte(start.byte() + skipped)
            .set_line(start.line() + 1)
            .set_record(start.record() + 1);
        self.reader.seek(next).map_err(|e| SourceError::Row {
            path: self.path.clone(),
            row: self.rows + 1,
            source: e,
        })
    }
}

/// The files a local location names: the file itself, the files of `format` in a directory (by
/// their extension), or the files a glob matches; sorted by path.
pub(super) fn list_files(location: &Path, format: DataFormat) -> Result<Vec<PathBuf>, SourceError> {
    let text = location.to_string_lossy();
    if text.contains(['*', '?', '[']) {
        let paths = glob::glob(&text).map_err(|e| SourceError::Glob {
            location: text.to_string(),
            problem: e.to_string(),
        })?;
        let mut files = Vec::new();
        for p in paths {
            let p = p.map_err(|e| SourceError::Glob {
                location: text.to_string(),
                problem: e.to_string(),
            })?;
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    if location.is_dir() {
        let entries = std::fs::read_dir(location).map_err(|source| SourceError::Open {
            path: location.to_owned(),
            source,
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| SourceError::Open {
                    path: location.to_owned(),
                    source,
                })?
                .path();
            let of_format = DataFormat::from_extension(&path.to_string_lossy()) == Some(format);
            if of_format && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    Ok(vec![location.to_owned()])
}

/// Opens one CSV file for a pass (headers required). Malformed rows are rejected one by one by
/// the caller ([`CsvFiles::malformed`]) rather than failing the whole file, hence `flexible`.
fn open_csv(
    path: &Path,
    delimiter: Delimiter,
) -> Result<(::csv::Reader<File>, Vec<String>), SourceError> {
    let file = File::open(path).map_err(|source| SourceError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delimiter.byte())
        .flexible(true)
        .buffer_capacity(READ_BUFFER)
        .from_reader(file);
    let headers = reader
        .headers()
        .map_err(|source| match source.kind() {
            ::csv::ErrorKind::Utf8 { .. } => SourceError::HeaderNotUtf8 {
                path: path.to_owned(),
                utf16: starts_with_utf16_mark(path),
            },
            _ => SourceError::Header {
                path: path.to_owned(),
                source,
            },
        })?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    Ok((reader, headers))
}

/// Whether the file at `path` starts with a UTF-16 byte-order mark (either byte order).
fn starts_with_utf16_mark(path: &Path) -> bool {
    use std::io::Read;
    let mut mark = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut mark))
        .is_ok_and(|()| mark == [0xFF, 0xFE] || mark == [0xFE, 0xFF])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(files: &mut CsvFiles) -> Vec<(String, u64, String)> {
        let mut out = Vec::new();
        while files.advance().unwrap() {
            let name = files
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let field = String::from_utf8(files.field(0).unwrap().to_vec()).unwrap();
            out.push((name, files.line(), field));
        }
        out
    }

    #[test]
    fn a_directory_and_a_glob_read_their_files_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.csv"), "id\n3\n").unwrap();
        std::fs::write(dir.path().join("a.csv"), "id\n1\n2\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not csv").unwrap();
        let expected = vec![
            ("a.csv".to_owned(), 2, "1".to_owned()),
            ("a.csv".to_owned(), 3, "2".to_owned()),
            ("b.csv".to_owned(), 2, "3".to_owned()),
        ];
        assert_eq!(
            read_all(&mut CsvFiles::open(dir.path(), Delimiter::default()).unwrap()),
            expected
        );
        let glob = dir.path().join("*.csv");
        assert_eq!(
            read_all(&mut CsvFiles::open(&glob, Delimiter::default()).unwrap()),
            expected
        );
    }

    #[test]
    fn files_with_another_header_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), "id\n1\n").unwrap();
        std::fs::write(dir.path().join("b.csv"), "email\nx@example.com\n").unwrap();
        let mut files = CsvFiles::open(dir.path(), Delimiter::default()).unwrap();
        assert!(files.advance().unwrap());
        let err = files.advance().unwrap_err();
        assert!(matches!(err, SourceError::HeaderMismatch { .. }), "{err}");
        assert!(!err.to_string().contains("x@example.com"));
    }

    /// Each record of `text` (one file, column 0 read): its line and its field, or why it is
    /// malformed.
    fn records(text: &str) -> Vec<(u64, String)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        std::fs::write(&path, text).unwrap();
        let mut files = CsvFiles::open(&path, Delimiter::default()).unwrap();
        let mut out = Vec::new();
        let mut multi_line = 0;
        while files.advance().unwrap() {
            let what = match files.malformed(&[0], &mut multi_line) {
                Some((_, m)) => format!("{m:?}"),
                None => String::from_utf8(files.field(0).unwrap().to_vec()).unwrap(),
            };
            out.push((files.line(), what));
        }
        out
    }

    /// A quote left open costs its own line only: the lines it swallowed are read again as the
    /// records they are, whether the quote never closes or closes on a later line.
    #[test]
    fn a_quote_left_open_costs_its_own_line_only() {
        let never_closes = "email,n\na@x.y,1\n\"b@x.y,2\nc@x.y,3\nd@x.y,4\n";
        let field_count = "FieldCount { expected: 2, found: 1 }".to_owned();
        assert_eq!(
            records(never_closes),
            [
                (2, "a@x.y".to_owned()),
                (3, field_count),
                (4, "c@x.y".to_owned()),
                (5, "d@x.y".to_owned()),
            ]
        );
        let closes_later = "email,n\na@x.y,1\n\"b@x.y,2\nc@x.y,3\nd@x.y\",4\ne@x.y,5\n";
        assert_eq!(
            records(closes_later),
            [
                (2, "a@x.y".to_owned()),
                (3, "LineBreak".to_owned()),
                (4, "c@x.y".to_owned()),
                (5, "StrayQuote".to_owned()),
                (6, "e@x.y".to_owned()),
            ]
        );
        // A quoted field that spans lines in a column the pass does not read is legal CSV.
        let note = "email,note\na@x.y,\"two\nlines\"\nb@x.y,x\n";
        assert_eq!(
            records(note),
            [(2, "a@x.y".to_owned()), (4, "b@x.y".to_owned())]
        );
    }

    #[test]
    fn an_empty_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = CsvFiles::open(dir.path(), Delimiter::default()).unwrap_err();
        assert!(err.to_string().contains("no csv file found"), "{err}");
    }
}
