//! Lines that the executors' functions ([`super::cluster_pass`], [`super::cluster_aggregate`])
//! take whole and read themselves: a CSV or JSON lines dataset on a cluster is handed over by
//! DataFusion as one text column per line, so that one bad line is a rejected row rather than
//! a failed read. The layout travels in the function's sealed spec: how a CSV line splits
//! ([`super::source::csv_line`]), or which fields a JSON line's record gives
//! ([`super::source::json_line`]).

use datafusion::arrow::array::{Array, StringArray};

use super::cluster_pass::Reader;
use super::source::Malformed;
use super::source::csv_line::LineRecord;
use super::source::json_line::{JsonLine, MAX_COLUMNS, MAX_DEPTH};

/// How the executors take the function's columns out of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineLayout {
    /// A CSV line, split by the dataset's delimiter.
    Csv(CsvLayout),
    /// A JSON line, read as one record.
    Json(JsonLayout),
}

/// How a CSV line ([`super::source::csv_line`]) splits into the function's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvLayout {
    /// The dataset's delimiter.
    pub delimiter: u8,
    /// The header's number of fields.
    pub width: usize,
    /// For each of the function's columns, its field in the line.
    pub columns: Vec<usize>,
}

/// Which fields of a JSON line ([`super::source::json_line`]) are the function's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonLayout {
    /// For each of the function's columns, its path of keys (`customer`, `email`).
    pub paths: Vec<Vec<String>>,
}

/// Longest key of a JSON path a spec may hold.
const MAX_KEY_BYTES: usize = 4096;

impl LineLayout {
    /// How many of the function's columns a line gives.
    pub fn columns(&self) -> usize {
        match self {
            LineLayout::Csv(csv) => csv.columns.len(),
            LineLayout::Json(json) => json.paths.len(),
        }
    }
}

/// The layout, if the function takes lines: a byte for none, CSV or JSON, then the layout.
pub(crate) fn encode_lines(out: &mut Vec<u8>, lines: Option<&LineLayout>) -> Result<(), String> {
    match lines {
        None => out.push(0),
        Some(LineLayout::Csv(layout)) => {
            out.push(1);
            out.push(layout.delimiter);
            let width = u32::try_from(layout.width).map_err(|_| "too many columns")?;
            out.extend_from_slice(&width.to_le_bytes());
            let n = u16::try_from(layout.columns.len()).map_err(|_| "too many columns")?;
            out.extend_from_slice(&n.to_le_bytes());
            for &c in &layout.columns {
                let c = u32::try_from(c).map_err(|_| "too many columns")?;
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        Some(LineLayout::Json(layout)) => {
            out.push(2);
            let n = u16::try_from(layout.paths.len()).map_err(|_| "too many columns")?;
            out.extend_from_slice(&n.to_le_bytes());
            for path in &layout.paths {
                let depth = u8::try_from(path.len()).map_err(|_| "a path too deep")?;
                out.push(depth);
                for key in path {
                    let len = u32::try_from(key.len()).map_err(|_| "a key too long")?;
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(key.as_bytes());
                }
            }
        }
    }
    Ok(())
}

/// What [`encode_lines`] wrote; a CSV field past the header's width, a JSON path that is
/// empty, too deep, or with a key too long, is refused.
pub(crate) fn decode_lines(r: &mut Reader<'_>) -> Option<Option<LineLayout>> {
    match r.byte()? {
        0 => Some(None),
        1 => {
            let delimiter = r.byte()?;
            let width = u32::from_le_bytes(r.array()?) as usize;
            let n = u16::from_le_bytes(r.array()?);
            let columns = (0..n)
                .map(|_| Some(u32::from_le_bytes(r.array()?) as usize))
                .collect::<Option<Vec<usize>>>()?;
            if columns.iter().any(|&c| c >= width) {
                return None;
            }
            Some(Some(LineLayout::Csv(CsvLayout {
                delimiter,
                width,
                columns,
            })))
        }
        2 => {
            let n = usize::from(u16::from_le_bytes(r.array()?));
            if n > MAX_COLUMNS {
                return None;
            }
            let paths = (0..n)
                .map(|_| {
                    let depth = usize::from(r.byte()?);
                    if depth == 0 || depth > MAX_DEPTH {
                        return None;
                    }
                    (0..depth)
                        .map(|_| {
                            let len = u32::from_le_bytes(r.array()?) as usize;
                            if len > MAX_KEY_BYTES {
                                return None;
                            }
                            String::from_utf8(r.take(len)?.to_vec()).ok()
                        })
                        .collect::<Option<Vec<String>>>()
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Some(LineLayout::Json(JsonLayout { paths })))
        }
        _ => None,
    }
}

/// The current line of a batch, read as its layout says.
pub(crate) enum LineReader<'a> {
    Csv {
        layout: &'a CsvLayout,
        record: LineRecord,
    },
    Json {
        /// The record's columns: the function's paths, each once.
        record: JsonLine,
        /// Every one of the record's columns (all are read).
        all: Vec<usize>,
        /// For each of the function's columns, its column in the record. A path may be two
        /// of the function's columns (a key part that is also an identifier the deletion
        /// list names).
        slots: Vec<usize>,
    },
}

impl<'a> LineReader<'a> {
    pub(crate) fn new(layout: &'a LineLayout) -> LineReader<'a> {
        match layout {
            LineLayout::Csv(layout) => LineReader::Csv {
                layout,
                record: LineRecord::default(),
            },
            LineLayout::Json(layout) => {
                let mut unique: Vec<Vec<String>> = Vec::new();
                let slots = layout
                    .paths
                    .iter()
                    .map(|path| match unique.iter().position(|p| p == path) {
                        Some(at) => at,
                        None => {
                            unique.push(path.clone());
                            unique.len() - 1
                        }
                    })
                    .collect();
                LineReader::Json {
                    all: (0..unique.len()).collect(),
                    record: JsonLine::new(unique),
                    slots,
                }
            }
        }
    }

    /// Reads `line`, and says why it must not be read, if it must not: the place among the
    /// function's columns of the column that says so, and why.
    pub(crate) fn load(&mut self, line: &[u8]) -> Option<(Option<usize>, Malformed)> {
        match self {
            LineReader::Csv { layout, record } => {
                record.split(line, layout.delimiter);
                let (field, why) = record.malformed(layout.width, &layout.columns)?;
                let place = field.and_then(|f| layout.columns.iter().position(|&c| c == f));
                Some((place, why))
            }
            LineReader::Json { record, all, slots } => {
                record.load(line);
                let (column, why) = record.malformed(all)?;
                let place = column.and_then(|c| slots.iter().position(|&s| s == c));
                Some((place, why))
            }
        }
    }

    /// The function's column `c` in the line last loaded.
    pub(crate) fn field(&self, c: usize) -> Option<&[u8]> {
        match self {
            LineReader::Csv { layout, record } => record.get(*layout.columns.get(c)?),
            LineReader::Json { record, slots, .. } => record.get(*slots.get(c)?),
        }
    }
}

/// The line at `row` of a column of lines (empty if null).
pub(crate) fn line_at(lines: &StringArray, row: usize) -> &[u8] {
    if row < lines.len() && !lines.is_null(row) {
        lines.value(row).as_bytes()
    } else {
        b""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(layout: &LineLayout) -> Option<Option<LineLayout>> {
        let mut out = Vec::new();
        encode_lines(&mut out, Some(layout)).unwrap();
        let mut r = Reader(&out);
        let decoded = decode_lines(&mut r);
        assert!(decoded.is_none() || r.0.is_empty(), "a layout read whole");
        decoded
    }

    #[test]
    fn a_json_layout_round_trips_and_a_bad_one_is_refused() {
        let json = LineLayout::Json(JsonLayout {
            paths: vec![
                vec!["customer".into(), "email".into()],
                vec!["consent".into()],
            ],
        });
        assert_eq!(round_trip(&json), Some(Some(json.clone())));
        for bad in [
            vec![vec![]],
            vec![vec!["k".to_owned(); MAX_DEPTH + 1]],
            vec![vec!["k".repeat(MAX_KEY_BYTES + 1)]],
        ] {
            let layout = LineLayout::Json(JsonLayout { paths: bad });
            assert_eq!(round_trip(&layout), None);
        }
        // A key that is not UTF-8.
        let mut out = vec![2, 1, 0, 1, 1, 0, 0, 0, 0xFF];
        assert_eq!(decode_lines(&mut Reader(&out)), None);
        out[8] = b'k';
        assert!(decode_lines(&mut Reader(&out)).is_some());
    }

    #[test]
    fn a_json_line_gives_the_function_its_columns_in_order() {
        // The email is a key part and, for the deletion list, an identifier too.
        let email = vec!["c".to_owned(), "e".to_owned()];
        let layout = LineLayout::Json(JsonLayout {
            paths: vec![email.clone(), vec!["ok".into()], email],
        });
        let mut reader = LineReader::new(&layout);
        assert_eq!(reader.load(br#"{"ok": true, "c": {"e": "a@x.com"}}"#), None);
        assert_eq!(reader.field(0), Some(&b"a@x.com"[..]));
        assert_eq!(reader.field(1), Some(&b"true"[..]));
        assert_eq!(reader.field(2), Some(&b"a@x.com"[..]));
        assert_eq!(reader.field(3), None);
        assert_eq!(
            reader.load(br#"{"ok": true, "c": {"e": {"x": 1}}}"#),
            Some((Some(0), Malformed::NotOneValue))
        );
        assert_eq!(
            reader.load(b"{\"ok\""),
            Some((None, Malformed::NotJsonObject))
        );
    }
}
