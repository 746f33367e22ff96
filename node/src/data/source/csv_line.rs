//! A CSV record on one line, split strictly. This is how CSV is read where DataFusion hands it
//! over line by line: on a partner's Ballista cluster (the executors' pass splits the lines) and
//! from object storage (the node splits them).
//!
//! DataFusion's own CSV reader fails the whole read on a row with the wrong number of fields.
//! So such CSV is registered as one text column per line ([`LINE_DELIMITER`], [`LINE_QUOTE`]:
//! control bytes that text files do not hold, so every line is one field), and each line is
//! split here, with the same rules as the local strict reader ([`super::csv`]):
//! - fields are separated by the dataset's delimiter; a field that starts with `"` is quoted,
//!   `""` inside it is one `"`, and text after its closing quote is kept (as the `csv` crate
//!   does);
//! - a line with another number of fields than the header is rejected ("field count");
//! - a line whose quote is still open at its end is rejected ("quote left open"): the record
//!   went on over a line break, which a line-by-line read cannot follow;
//! - a `"` in a field the job reads is rejected ("quote in a field"), as locally.
//!
//! The difference from the local reader: a quoted line break (a note over two lines) is legal
//! CSV there, and read. Here its first line is rejected, and its later lines are rows of their
//! own, rejected only when they break one of the rules above.

use super::Malformed;

/// The delimiter DataFusion is given for line-by-line CSV: the ASCII record separator. (A plan
/// sent to a Ballista cluster carries it as UTF-8 text, so it must be ASCII.) A line that holds
/// it fails the read, naming its line.
pub const LINE_DELIMITER: u8 = 0x1E;
/// The quote DataFusion is given for line-by-line CSV: the ASCII group separator.
pub const LINE_QUOTE: u8 = 0x1D;

/// Why a read line by line fails when a "line" holds a line break: the engine's reader took a
/// field that starts with [`LINE_QUOTE`] as quoted, and the lines up to the next such byte
/// came as one. Their rows cannot be counted one by one, so the read fails rather than count
/// them as one rejected row.
pub const SPANNED_LINES: &str = "a line holds the byte 0x1D (the ASCII group separator), so the \
    engine read the lines after it as one and their rows cannot be counted: no text file holds \
    that byte; remove it (for example with `tr -d '\\035'`) and run the job again";

/// Whether a line handed over by the engine holds a line break (see [`SPANNED_LINES`]).
pub fn spans_lines(line: &[u8]) -> bool {
    line.iter().any(|&b| b == b'\n' || b == b'\r')
}

const QUOTE: u8 = b'"';

/// Why a line is not read, before the columns a job reads are looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineProblem {
    /// Another number of fields than the header's.
    FieldCount {
        /// The header's.
        expected: usize,
        /// The line's.
        found: usize,
    },
    /// A quote still open at the end of the line.
    OpenQuote,
}

impl From<LineProblem> for Malformed {
    fn from(p: LineProblem) -> Malformed {
        match p {
            LineProblem::FieldCount { expected, found } => {
                Malformed::FieldCount { expected, found }
            }
            LineProblem::OpenQuote => Malformed::OpenQuote,
        }
    }
}

/// One line's fields, reused from line to line.
#[derive(Debug, Default, Clone)]
pub struct LineRecord {
    /// The fields' bytes, unquoted, one after another.
    text: Vec<u8>,
    /// Where each field ends in `text`.
    ends: Vec<usize>,
    /// Whether the last field's quote was still open at the end of the line.
    open_quote: bool,
}

impl LineRecord {
    /// Splits `line` (without its line ending) at `delimiter`.
    pub fn split(&mut self, line: &[u8], delimiter: u8) {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum State {
            FieldStart,
            Unquoted,
            Quoted,
            /// A `"` inside a quoted field: `""`, or the closing quote.
            QuoteInQuoted,
        }
        self.text.clear();
        self.ends.clear();
        let mut state = State::FieldStart;
        for &b in line {
            state = match (state, b) {
                (State::Quoted, QUOTE) => State::QuoteInQuoted,
                (State::Quoted, _) => {
                    self.text.push(b);
                    State::Quoted
                }
                (State::QuoteInQuoted, QUOTE) => {
                    self.text.push(QUOTE);
                    State::Quoted
                }
                (State::FieldStart, QUOTE) => State::Quoted,
                (_, b) if b == delimiter => {
                    self.ends.push(self.text.len());
                    State::FieldStart
                }
                (_, b) => {
                    self.text.push(b);
                    State::Unquoted
                }
            };
        }
        self.ends.push(self.text.len());
        self.open_quote = state == State::Quoted;
    }

    /// How many fields the line has.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the line has no field (never, once split: an empty line is one empty field).
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Field `i`, unquoted.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = match i {
            0 => 0,
            _ => *self.ends.get(i - 1)?,
        };
        self.text.get(start..end)
    }

    /// Why the line is not a record of `width` fields, if it is not.
    pub fn problem(&self, width: usize) -> Option<LineProblem> {
        if self.len() != width {
            return Some(LineProblem::FieldCount {
                expected: width,
                found: self.len(),
            });
        }
        self.open_quote.then_some(LineProblem::OpenQuote)
    }

    /// The line's problem, or the first of the `read` fields that holds a `"`: the same order
    /// of checks as the local reader's.
    pub fn malformed(&self, width: usize, read: &[usize]) -> Option<(Option<usize>, Malformed)> {
        if let Some(problem) = self.problem(width) {
            return Some((None, problem.into()));
        }
        read.iter()
            .find(|&&i| self.get(i).is_some_and(|f| f.contains(&QUOTE)))
            .map(|&i| (Some(i), Malformed::StrayQuote))
    }
}

/// The column names a header line holds: split like a record, each trimmed, a leading byte
/// order mark dropped.
pub fn header_names(line: &str, delimiter: u8) -> Vec<String> {
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    let mut record = LineRecord::default();
    record.split(line.as_bytes(), delimiter);
    (0..record.len())
        .map(|i| {
            String::from_utf8_lossy(record.get(i).unwrap_or_default())
                .trim()
                .to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &str) -> (Vec<String>, bool) {
        let mut r = LineRecord::default();
        r.split(line.as_bytes(), b',');
        let fields = (0..r.len())
            .map(|i| String::from_utf8(r.get(i).unwrap().to_vec()).unwrap())
            .collect();
        (fields, r.open_quote)
    }

    #[test]
    fn a_line_splits_as_the_csv_crate_reads_it() {
        for line in [
            "a@x.com,0151 234,yes",
            "\"a,b\",\"say \"\"hi\"\"\",",
            ",,",
            "\"ab\"c,d\"e,\"\"",
            "",
            "  spaced  , x ",
            "\"\"\"\",\"",
        ] {
            let mut reader = ::csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(line.as_bytes());
            let mut expected = ::csv::StringRecord::new();
            let read = reader.read_record(&mut expected).unwrap();
            let (ours, _) = fields(line);
            if read {
                let expected: Vec<String> = expected.iter().map(str::to_owned).collect();
                assert_eq!(ours, expected, "{line:?}");
            } else {
                // The csv crate skips an empty line; here it is one empty field, which the
                // field count rejects (DataFusion never hands over an empty line).
                assert_eq!(ours, vec![String::new()], "{line:?}");
            }
        }
    }

    #[test]
    fn a_quote_left_open_is_told_apart_from_one_closed() {
        assert!(fields("a,\"b").1);
        assert!(fields("a,\"b,c").1);
        assert!(fields("\"a\"\"").1);
        assert!(!fields("a,\"b\"").1);
        assert!(!fields("a,\"b\"\"\"").1);
        // A quote inside an unquoted field is text, not an opening quote.
        assert!(!fields("a,5\" screen").1);
    }

    #[test]
    fn the_checks_run_in_the_local_readers_order() {
        let mut r = LineRecord::default();
        r.split(b"a,b", b',');
        assert_eq!(
            r.malformed(3, &[0]),
            Some((
                None,
                Malformed::FieldCount {
                    expected: 3,
                    found: 2
                }
            ))
        );
        r.split(b"a,b,\"c", b',');
        assert_eq!(r.malformed(3, &[0]), Some((None, Malformed::OpenQuote)));
        r.split(b"a,5\" x,c", b',');
        assert_eq!(
            r.malformed(3, &[0, 2]),
            None,
            "the quote is in a field not read"
        );
        assert_eq!(r.malformed(3, &[1]), Some((Some(1), Malformed::StrayQuote)));
        r.split(b"a;b;c", b';');
        assert_eq!(r.malformed(3, &[0, 1, 2]), None);
        assert_eq!(r.get(2), Some(&b"c"[..]));
        assert_eq!(r.get(3), None);
    }

    #[test]
    fn a_header_line_gives_trimmed_names_without_a_byte_order_mark() {
        assert_eq!(
            header_names("\u{feff}email ,\"E-Mail, work\",phone", b','),
            ["email", "E-Mail, work", "phone"]
        );
        assert_eq!(header_names("a\tb", b'\t'), ["a", "b"]);
    }
}
