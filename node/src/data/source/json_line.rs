//! A JSON lines dataset one line at a time, wherever the lines come from: a local file
//! ([`super::json`]), or DataFusion handing them over as one text column (from object storage,
//! split by the node; on a partner's Ballista cluster, split by the executors' pass).
//!
//! - [`ColumnFinder`] finds the columns from the first [`INFER_LINES`] records: every path to a
//!   value (`customer.email`), in the order first seen (a record's keys sorted), at most
//!   [`MAX_COLUMNS`]; a path first seen later is not a column, and a path that was only ever
//!   null where an object was seen too is the object's, not a column.
//! - [`JsonLine`] reads one line as a record: one that is not a JSON object, or longer than
//!   [`MAX_LINE_BYTES`], is malformed; any scalar reads as its text (a number as its digits, a
//!   boolean as `true`/`false`); a field that holds a list or an object where the job reads one
//!   value rejects its row. Only the fields a job reads are taken out ([`super::json_record`]).
//!
//! A line's trailing `\r` and a byte-order mark at its start are not part of it. A blank line
//! is no record ([`is_blank`]): the caller skips it.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::Malformed;
use super::json_record::{Fields, Wanted, read_record};

/// Records read to find the columns.
pub const INFER_LINES: usize = 100_000;

/// Longest line read; a longer one is malformed (a local reader does not even hold it).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Deepest object whose fields become columns; one deeper is a single value.
pub const MAX_DEPTH: usize = 8;

/// Most columns a dataset's first records make; a path first seen after them is not a column.
pub const MAX_COLUMNS: usize = 10_000;

/// A column: its path of keys, and whether the first records held one value or many there.
#[derive(Debug, Clone)]
struct Column {
    keys: Vec<String>,
    seen_value: bool,
    seen_many: Option<&'static str>,
}

/// Finds a dataset's columns from its first records.
#[derive(Debug, Default)]
pub struct ColumnFinder {
    columns: Vec<Column>,
    index: HashMap<Vec<String>, usize>,
    records: usize,
}

impl ColumnFinder {
    /// Whether more records would still be looked at.
    pub fn wants_more(&self) -> bool {
        self.records < INFER_LINES
    }

    /// Looks at one line (not blank); a line that is not a JSON object adds nothing.
    pub fn add(&mut self, line: &[u8]) {
        if !self.wants_more() || line.len() > MAX_LINE_BYTES {
            return;
        }
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(trim(line)) else {
            return;
        };
        self.collect(&object, &mut Vec::new());
        self.records += 1;
    }

    /// Adds the paths of `object` (under `keys`).
    fn collect(&mut self, object: &Map<String, Value>, keys: &mut Vec<String>) {
        for (key, value) in object {
            keys.push(key.clone());
            match value {
                Value::Object(inner) if keys.len() < MAX_DEPTH => self.collect(inner, keys),
                _ => {
                    if let Some(column) = self.column(keys) {
                        match value {
                            Value::Array(_) => column.seen_many = Some("list"),
                            Value::Object(_) => column.seen_many = Some("object"),
                            Value::Null => {}
                            _ => column.seen_value = true,
                        }
                    }
                }
            }
            keys.pop();
        }
    }

    /// The column at `keys`, made if there is room.
    fn column(&mut self, keys: &[String]) -> Option<&mut Column> {
        let at = match self.index.get(keys) {
            Some(&at) => at,
            // A file with ever new keys cannot make the column list grow without end.
            None if self.columns.len() >= MAX_COLUMNS => return None,
            None => {
                self.index.insert(keys.to_vec(), self.columns.len());
                self.columns.push(Column {
                    keys: keys.to_vec(),
                    seen_value: false,
                    seen_many: None,
                });
                self.columns.len() - 1
            }
        };
        self.columns.get_mut(at)
    }

    /// The columns found, without a path only ever null that leads to an object.
    pub fn finish(self) -> JsonColumns {
        let objects: HashSet<&[String]> = self
            .columns
            .iter()
            .flat_map(|c| (1..c.keys.len()).map(|n| &c.keys[..n]))
            .collect();
        let columns = self
            .columns
            .iter()
            .filter(|c| c.seen_value || c.seen_many.is_some() || !objects.contains(&*c.keys))
            .cloned()
            .collect();
        JsonColumns { columns }
    }
}

/// A JSON lines dataset's columns.
#[derive(Debug, Clone, Default)]
pub struct JsonColumns {
    columns: Vec<Column>,
}

impl JsonColumns {
    /// The column names: each field's path, keys joined by dots.
    pub fn headers(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.keys.join(".")).collect()
    }

    /// Each of the columns at `read`'s path of keys.
    pub fn paths(&self, read: &[usize]) -> Vec<Vec<String>> {
        read.iter()
            .filter_map(|&i| self.columns.get(i).map(|c| c.keys.clone()))
            .collect()
    }

    /// The first column at `read` that held only lists or objects in the first records, and
    /// which: it cannot be read as one value per row.
    pub fn many_values(&self, read: &[usize]) -> Option<(usize, &'static str)> {
        read.iter().find_map(|&i| {
            let column = self.columns.get(i)?;
            match (column.seen_value, column.seen_many) {
                (false, Some(kind)) => Some((i, kind)),
                _ => None,
            }
        })
    }
}

/// One line read as a record: the fields of the columns asked for.
#[derive(Debug)]
pub struct JsonLine {
    /// Every column's path.
    paths: Vec<Vec<String>>,
    /// The fields read, as a tree of keys.
    wanted: Wanted,
    fields: Fields,
    /// Why the current line is no record.
    bad: Option<Malformed>,
}

impl JsonLine {
    /// Reads the columns at `paths` (every one, until [`JsonLine::want`] says which).
    pub fn new(paths: Vec<Vec<String>>) -> JsonLine {
        let all: Vec<usize> = (0..paths.len()).collect();
        let mut line = JsonLine {
            fields: Fields::new(paths.len()),
            paths,
            wanted: Wanted::default(),
            bad: None,
        };
        line.want(&all);
        line
    }

    /// Takes only the columns at `read` out of each line from now on.
    pub fn want(&mut self, read: &[usize]) {
        self.wanted = Wanted::new(
            read.iter()
                .filter_map(|&i| self.paths.get(i).map(|p| (i, p.as_slice()))),
        );
    }

    /// Reads `line` (not blank).
    pub fn load(&mut self, line: &[u8]) {
        if line.len() > MAX_LINE_BYTES {
            self.too_long();
            return;
        }
        let object = read_record(trim(line), &self.wanted, &mut self.fields);
        self.bad = (!object).then_some(Malformed::NotJsonObject);
    }

    /// The current line was too long to hold.
    pub fn too_long(&mut self) {
        self.bad = Some(Malformed::LineTooLong);
    }

    /// The current record's field `i`; `None` if null, missing or not one value.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        if self.bad.is_some() {
            return None;
        }
        self.fields.get(i)
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
}

/// Whether a line holds no record: nothing but whitespace.
pub fn is_blank(line: &[u8]) -> bool {
    trim(line).iter().all(u8::is_ascii_whitespace)
}

/// A line without its `\r`, and without a byte-order mark at its start.
fn trim(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(lines: &[&str]) -> JsonColumns {
        let mut finder = ColumnFinder::default();
        for line in lines {
            finder.add(line.as_bytes());
        }
        finder.finish()
    }

    #[test]
    fn columns_are_paths_to_values_and_an_object_null_elsewhere_is_no_column() {
        let found = columns(&[
            r#"{"id": 1, "customer": {"email": "a@x.com"}, "tags": ["a"]}"#,
            r#"{"id": 2, "customer": null, "late": true}"#,
            "not json",
        ]);
        assert_eq!(found.headers(), ["customer.email", "id", "tags", "late"]);
        assert_eq!(found.many_values(&[0, 1, 3]), None);
        assert_eq!(found.many_values(&[1, 2]), Some((2, "list")));
        assert_eq!(
            found.paths(&[0, 3]),
            [
                vec!["customer".to_owned(), "email".to_owned()],
                vec!["late".to_owned()]
            ]
        );
    }

    #[test]
    fn a_line_reads_the_fields_asked_for_and_says_why_it_is_not_read() {
        let mut line = JsonLine::new(vec![vec!["e".into()], vec!["n".into()]]);
        line.want(&[0]);
        line.load(b"\xEF\xBB\xBF{\"e\": \"a@x.com\", \"n\": 7}\r");
        assert_eq!(line.get(0), Some(&b"a@x.com"[..]));
        // Not asked for: not taken out.
        assert_eq!(line.get(1), None);
        assert_eq!(line.malformed(&[0]), None);
        line.load(br#"{"e": ["a@x.com"]}"#);
        assert_eq!(
            line.malformed(&[0]),
            Some((Some(0), Malformed::NotOneValue))
        );
        line.load(br#"{"e": "a@x.com""#);
        assert_eq!(line.malformed(&[0]), Some((None, Malformed::NotJsonObject)));
        assert_eq!(line.get(0), None);
        let long = format!("{{\"e\": \"{}\"}}", "a".repeat(MAX_LINE_BYTES));
        line.load(long.as_bytes());
        assert_eq!(line.malformed(&[0]), Some((None, Malformed::LineTooLong)));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b"{}"));
    }
}
