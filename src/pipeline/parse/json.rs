//! JSON: flattening to `path.to.key: value` lines.
//!
//! Embeddings of raw JSON spend most of their tokens on punctuation, and a
//! chunk cut out of a nested document loses the keys above it. Flattening
//! puts each value on its own line with its full path (`users[2].email:
//! ...`), so every chunk is self-describing. An array of objects, the usual
//! shape of exported records, becomes one block per element, separated by
//! blank lines; a top-level array drops the `[i]` prefix, which says nothing.
//!
//! The flattening happens inside a `serde` visitor while `serde_json` parses,
//! which keeps keys in file order (a `serde_json::Value` would sort them)
//! and never materialises the document tree. `serde_json`'s nesting limit
//! (128 levels) keeps hostile input from exhausting the stack.

use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{Limits, ParseError, TextOut};

pub(super) fn parse(text: &str, limits: &Limits) -> Result<String, ParseError> {
    let mut flattener = Flattener {
        out: TextOut::new(limits),
        path: String::new(),
        depth: 0,
        blank_line_next: false,
        element: None,
        object_element_seen: false,
        scratch: String::new(),
        failure: None,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let result = Node(&mut flattener)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    if let Some(failure) = flattener.failure {
        return Err(failure);
    }
    result.map_err(|e| syntax_error(&e))?;
    if flattener.out.is_empty() {
        return Err(ParseError::new(
            "This JSON file has no values to index \
             (only empty objects, empty arrays, nulls or empty strings).",
        ));
    }
    Ok(flattener.out.into_string())
}

fn syntax_error(e: &serde_json::Error) -> ParseError {
    let (line, column) = (e.line(), e.column());
    let full = e.to_string();
    let what = full
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&full);
    if what.contains("recursion limit") {
        return ParseError::new(format!(
            "This JSON file is nested more than 128 levels deep (at line {line}, column \
             {column}), which is not supported; flatten its structure and upload it again."
        ));
    }
    ParseError::new(format!(
        "This file is not valid JSON: {what} at line {line}, column {column}. \
         Fix the syntax error (or export the file again) and upload it again."
    ))
}

struct Flattener {
    out: TextOut,
    /// The path of the value being visited, e.g. `users[2].email`.
    path: String,
    depth: usize,
    /// Separators are written lazily, before the next line, so that empty
    /// objects and arrays leave no stray blank lines behind.
    blank_line_next: bool,
    /// Set by the array visitor just before each element, so an object can
    /// tell it starts a new element (and thus a new block).
    element: Option<usize>,
    object_element_seen: bool,
    /// Reused buffer for formatting numbers.
    scratch: String,
    /// Why the flattener stopped, if not for a syntax error. The visitor can
    /// only return `serde_json` errors, so the real error waits here.
    failure: Option<ParseError>,
}

impl Flattener {
    fn line(&mut self, value: &str) -> Result<(), ParseError> {
        if !self.out.is_empty() {
            self.out
                .push(if self.blank_line_next { "\n\n" } else { "\n" })?;
        }
        self.blank_line_next = false;
        if !self.path.is_empty() {
            self.out.push(&self.path)?;
            self.out.push(": ")?;
        }
        self.out.push(value)
    }

    fn scalar<E: de::Error>(&mut self, value: &str) -> Result<(), E> {
        self.element = None;
        if value.is_empty() {
            return Ok(());
        }
        self.line(value).map_err(|failure| {
            self.failure = Some(failure);
            E::custom("extracted text limit reached")
        })
    }

    fn number<E: de::Error>(&mut self, value: impl fmt::Debug) -> Result<(), E> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        // Debug, not Display: for floats it keeps "1.0" a float and writes
        // 1e300 as such instead of 301 digits; for integers they agree.
        let _ = write!(scratch, "{value:?}");
        let result = self.scalar(&scratch);
        self.scratch = scratch;
        result
    }
}

/// Visits any JSON value at the flattener's current path.
struct Node<'f>(&'f mut Flattener);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.scalar(if v { "true" } else { "false" })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.number(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.number(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.number(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.scalar(v)
    }

    /// `null` says nothing worth embedding.
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.element = None;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let f = self.0;
        if let Some(index) = f.element.take() {
            f.object_element_seen = true;
            if index > 0 {
                f.blank_line_next = true;
            }
        }
        f.depth += 1;
        let base = f.path.len();
        while map.next_key_seed(Key(f))?.is_some() {
            map.next_value_seed(Node(f))?;
            f.path.truncate(base);
        }
        f.depth -= 1;
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let f = self.0;
        f.element = None;
        let root = f.depth == 0;
        f.depth += 1;
        let base = f.path.len();
        let outer_object_element_seen = std::mem::replace(&mut f.object_element_seen, false);
        let mut index = 0usize;
        loop {
            if !root {
                let _ = write!(f.path, "[{index}]");
            }
            f.element = Some(index);
            let more = seq.next_element_seed(Node(f))?.is_some();
            f.path.truncate(base);
            if !more {
                break;
            }
            index += 1;
        }
        f.element = None;
        // Whatever follows a run of record blocks starts a block of its own.
        if f.object_element_seen {
            f.blank_line_next = true;
        }
        f.object_element_seen = outer_object_element_seen;
        f.depth -= 1;
        Ok(())
    }
}

/// Appends an object key to the flattener's path.
struct Key<'f>(&'f mut Flattener);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<(), E> {
        let path = &mut self.0.path;
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse as parse_file, Format, Limits};

    fn flatten(json: &str) -> String {
        let parsed = parse_file(json.as_bytes(), "data.json", &Limits::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.format, Format::Json);
        parsed.text
    }

    #[test]
    fn nested_objects_and_arrays_become_paths() {
        let json = r#"{"name": "Ada", "born": 1815, "ratio": 0.5, "big": 1e300, "alive": false,
            "address": {"city": "London", "zip": null, "note": ""},
            "tags": ["math", "poetry"], "empty": {}, "none": []}"#;
        assert_eq!(
            flatten(json),
            "name: Ada\nborn: 1815\nratio: 0.5\nbig: 1e300\nalive: false\n\
             address.city: London\ntags[0]: math\ntags[1]: poetry"
        );
    }

    #[test]
    fn keys_keep_file_order_and_strings_are_unescaped() {
        assert_eq!(
            flatten(r#"{"z": "\"quoted\" \u00e9\ttab", "a": "line\nbreak"}"#),
            "z: \"quoted\" é\ttab\na: line\nbreak"
        );
    }

    #[test]
    fn array_of_objects_is_one_block_per_element() {
        let json = r#"[{"id": 1, "title": "First"}, {"id": 2, "title": "Second"}]"#;
        assert_eq!(flatten(json), "id: 1\ntitle: First\n\nid: 2\ntitle: Second");
        let nested = r#"{"users": [{"name": "a"}, {"name": "b", "roles": ["x"]}], "count": 2}"#;
        assert_eq!(
            flatten(nested),
            "users[0].name: a\n\nusers[1].name: b\nusers[1].roles[0]: x\n\ncount: 2"
        );
    }

    #[test]
    fn top_level_scalars_and_arrays() {
        assert_eq!(flatten(r#"["a", "b", 3]"#), "a\nb\n3");
        assert_eq!(flatten(r#"[[1, 2], [3]]"#), "[0]: 1\n[1]: 2\n[0]: 3");
    }

    #[test]
    fn invalid_json_reports_line_and_column() {
        let err = parse_file(
            b"{\n  \"a\": 1,\n  \"b\": ]\n}",
            "bad.json",
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "This file is not valid JSON: expected value at line 3, column 8. \
             Fix the syntax error (or export the file again) and upload it again."
        );
        let err = parse_file(b"{\"a\": 1} trailing", "bad.json", &Limits::default()).unwrap_err();
        assert!(
            err.message.contains("trailing characters at line 1"),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let err = parse_file(deep.as_bytes(), "deep.json", &Limits::default()).unwrap_err();
        assert!(err.message.contains("nested more than 128 levels"), "{err}");
    }

    #[test]
    fn no_values_is_an_error() {
        let err = parse_file(
            b"{\"a\": {}, \"b\": [null, \"\"]}",
            "e.json",
            &Limits::default(),
        )
        .unwrap_err();
        assert!(err.message.contains("no values to index"), "{err}");
    }

    #[test]
    fn long_paths_cannot_blow_up_the_text() {
        let json = format!(
            "{{\"{}\": [{}0]}}",
            "k".repeat(100_000),
            "0,".repeat(100_000)
        );
        let limits = Limits {
            max_text_bytes: 1_000_000,
            ..Limits::default()
        };
        let err = parse_file(json.as_bytes(), "wide.json", &limits).unwrap_err();
        assert!(err.message.contains("larger than the 1 MB limit"), "{err}");
    }
}
