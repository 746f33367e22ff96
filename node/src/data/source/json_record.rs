//! One JSON line's fields that a pass reads, taken out as it is parsed: the fields no job asks
//! for are skipped, not built ([`serde::de::IgnoredAny`]), and no value tree is made.

use std::collections::HashMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The fields a pass reads, as a tree of keys; a node that is a column has its index.
#[derive(Debug, Default)]
pub(super) struct Wanted {
    children: HashMap<String, Wanted>,
    column: Option<usize>,
}

impl Wanted {
    /// The tree of `columns` (each an index and its path of keys).
    pub(super) fn new<'a>(columns: impl IntoIterator<Item = (usize, &'a [String])>) -> Wanted {
        let mut root = Wanted::default();
        for (index, keys) in columns {
            let mut node = &mut root;
            for key in keys {
                node = node.children.entry(key.clone()).or_default();
            }
            node.column = Some(index);
        }
        root
    }
}

/// The current record's fields: each column's text, whether it was there (not null or
/// missing), and whether it held a list or an object instead of one value.
#[derive(Debug, Default)]
pub(super) struct Fields {
    texts: Vec<Vec<u8>>,
    present: Vec<bool>,
    many: Vec<bool>,
}

impl Fields {
    /// Room for `width` columns, none present.
    pub(super) fn new(width: usize) -> Fields {
        Fields {
            texts: vec![Vec::new(); width],
            present: vec![false; width],
            many: vec![false; width],
        }
    }

    /// Column `i`'s text; `None` if null, missing or not one value.
    pub(super) fn get(&self, i: usize) -> Option<&[u8]> {
        self.present
            .get(i)
            .copied()
            .unwrap_or(false)
            .then(|| self.texts[i].as_slice())
    }

    /// Whether column `i` held a list or an object.
    pub(super) fn many(&self, i: usize) -> bool {
        self.many.get(i).copied().unwrap_or(false)
    }

    fn clear(&mut self) {
        self.present.fill(false);
        self.many.fill(false);
    }

    /// Column `i` holds `text` (the last of duplicate keys wins, as in a JSON object).
    fn set(&mut self, i: usize, text: impl FnOnce(&mut Vec<u8>)) {
        let Some(slot) = self.texts.get_mut(i) else {
            return;
        };
        slot.clear();
        text(slot);
        self.present[i] = true;
        self.many[i] = false;
    }

    fn set_null(&mut self, i: usize) {
        if let Some(present) = self.present.get_mut(i) {
            *present = false;
            self.many[i] = false;
        }
    }

    fn set_many(&mut self, i: usize) {
        if let Some(many) = self.many.get_mut(i) {
            *many = true;
            self.present[i] = false;
        }
    }
}

/// Reads `line` into `fields`; `false` if it is not one JSON object (then `fields` is
/// unspecified).
pub(super) fn read_record(line: &[u8], wanted: &Wanted, fields: &mut Fields) -> bool {
    fields.clear();
    let mut parser = serde_json::Deserializer::from_slice(line);
    let object = ObjectSeed { wanted, fields };
    object.deserialize(&mut parser).is_ok() && parser.end().is_ok()
}

/// An object whose wanted fields go into `fields`; anything but an object is an error.
struct ObjectSeed<'a> {
    wanted: &'a Wanted,
    fields: &'a mut Fields,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(node) = map.next_key_seed(KeySeed(&self.wanted.children))? {
            match node {
                Some(node) => map.next_value_seed(ValueSeed {
                    node,
                    fields: self.fields,
                })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A key, looked up among the wanted ones without being copied.
struct KeySeed<'a>(&'a HashMap<String, Wanted>);

impl<'de, 'a> DeserializeSeed<'de> for KeySeed<'a> {
    type Value = Option<&'a Wanted>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'a> Visitor<'de> for KeySeed<'a> {
    type Value = Option<&'a Wanted>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.get(key))
    }
}

/// The value at a wanted key: a column's text, or an object holding wanted keys deeper down.
struct ValueSeed<'a> {
    node: &'a Wanted,
    fields: &'a mut Fields,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueSeed<'_> {
    fn text(self, write: impl FnOnce(&mut Vec<u8>)) {
        if let Some(i) = self.node.column {
            self.fields.set(i, write);
        }
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.text(|t| t.extend_from_slice(v.as_bytes()));
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.text(|t| t.extend_from_slice(v.to_string().as_bytes()));
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.text(|t| t.extend_from_slice(v.to_string().as_bytes()));
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        // As `serde_json` writes a number: `10.0`, `1e21`.
        let text = serde_json::Number::from_f64(v).map_or_else(String::new, |n| n.to_string());
        self.text(|t| t.extend_from_slice(text.as_bytes()));
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.text(|t| t.extend_from_slice(if v { b"true" } else { b"false" }));
        Ok(())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        if let Some(i) = self.node.column {
            self.fields.set_null(i);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        if let Some(i) = self.node.column {
            self.fields.set_many(i);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        if let Some(i) = self.node.column {
            self.fields.set_many(i);
        }
        ObjectSeed {
            wanted: self.node,
            fields: self.fields,
        }
        .visit_map(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields `read_record` takes out agree with a whole `serde_json::Value` parse, for
    /// every kind of value and a duplicate key.
    #[test]
    fn takes_out_what_a_whole_parse_holds() {
        let paths: Vec<Vec<String>> = [
            "s", "i", "u", "f", "b", "n", "l", "o", "o.x", "o.y.z", "dup", "absent",
        ]
        .iter()
        .map(|p| p.split('.').map(str::to_owned).collect())
        .collect();
        let wanted = Wanted::new(paths.iter().enumerate().map(|(i, k)| (i, k.as_slice())));
        let mut fields = Fields::new(paths.len());
        let line = br#"{"s": "a\"b\u00e9", "i": -12, "u": 18446744073709551615, "f": 10.0,
            "b": true, "n": null, "l": [1, {"x": 2}], "skip": {"deep": [1, 2, 3]},
            "o": {"x": 1.5e3, "y": {"z": "deep"}}, "dup": [1], "dup": "last"}"#;
        assert!(read_record(line, &wanted, &mut fields));
        let text = |i: usize| {
            fields
                .get(i)
                .map(|t| String::from_utf8(t.to_vec()).unwrap())
        };
        assert_eq!(text(0).as_deref(), Some("a\"bé"));
        assert_eq!(text(1).as_deref(), Some("-12"));
        assert_eq!(text(2).as_deref(), Some("18446744073709551615"));
        assert_eq!(text(3).as_deref(), Some("10.0"));
        assert_eq!(text(4).as_deref(), Some("true"));
        assert_eq!((text(5), fields.many(5)), (None, false));
        assert_eq!((text(6), fields.many(6)), (None, true));
        assert_eq!(
            (text(7), fields.many(7)),
            (None, true),
            "an object where a value is read"
        );
        assert_eq!(text(8).as_deref(), Some("1500.0"));
        assert_eq!(text(9).as_deref(), Some("deep"));
        assert_eq!(
            (text(10).as_deref(), fields.many(10)),
            (Some("last"), false)
        );
        assert_eq!(text(11), None);
        // The same texts as a whole parse gives.
        let whole: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(whole["f"].to_string(), "10.0");
        assert_eq!(whole["o"]["x"].to_string(), "1500.0");
        // No object, or more after it: not a record.
        for bad in [
            &b"[1]"[..],
            b"\"a\"",
            b"{\"s\": 1",
            b"{} {}",
            b"{\"s\": 1,}",
            b"",
        ] {
            assert!(!read_record(bad, &wanted, &mut fields), "{bad:?}");
        }
    }
}
