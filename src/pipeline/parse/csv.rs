//! CSV: delimiter sniffing and rendering rows as self-describing lines.
//!
//! A chunk of a CSV file is only meaningful if it says what its values
//! are, and chunks rarely include the header row. So every data row becomes
//! one line that carries its header: `name: Ada; born: 1815`. Empty values
//! are left out, since "column: " lines would only add noise to embeddings.
//!
//! Files come from spreadsheets in many locales, so the delimiter is sniffed
//! among `,` `;` tab and `|`, and ragged rows are accepted (extra values are
//! labelled by column number).

use ::csv::{ReaderBuilder, StringRecord};

use super::{Limits, ParseError, TextOut};

const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// How many records of the file's start the sniffer looks at.
const SNIFF_RECORDS: usize = 200;
const SNIFF_BYTES: usize = 64 * 1024;

/// The delimiter that splits `text` into a consistent table, if any.
///
/// "Consistent" means at least two columns, with at least 80% of the sampled
/// rows having as many fields as the header: real exports are sometimes
/// ragged, prose split at commas almost never lines up.
pub(super) fn sniff_delimiter(text: &str) -> Option<u8> {
    let truncated = text.len() > SNIFF_BYTES;
    let sample = if truncated {
        // Whole lines only; a record cut in the middle would look ragged.
        let cut = text.as_bytes()[..SNIFF_BYTES]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap_or(SNIFF_BYTES);
        &text.as_bytes()[..cut]
    } else {
        text.as_bytes()
    };

    let mut best: Option<(usize, usize, u8)> = None; // (consistent %, columns, delimiter)
    for delimiter in DELIMITERS {
        let mut reader = ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(sample);
        let mut record = StringRecord::new();
        let mut columns = 0;
        let (mut rows, mut matching) = (0usize, 0usize);
        while rows < SNIFF_RECORDS {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
            if rows == 0 {
                columns = record.len();
            }
            rows += 1;
            matching += usize::from(record.len() == columns);
        }
        if columns < 2 || rows == 0 {
            continue;
        }
        let consistent = matching * 100 / rows;
        if consistent < 80 {
            continue;
        }
        let score = (consistent, columns, delimiter);
        if best.is_none_or(|(c, n, _)| (consistent, columns) > (c, n)) {
            best = Some(score);
        }
    }
    best.map(|(_, _, delimiter)| delimiter)
}

/// Renders CSV `text` as one `header: value; ...` line per data row.
pub(super) fn parse(text: &str, delimiter: u8, limits: &Limits) -> Result<String, ParseError> {
    let mut reader = ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut record = StringRecord::new();
    let mut headers: Vec<String> = Vec::new();
    let mut out = TextOut::new(limits);
    let mut data_rows = 0usize;
    let mut first = true;
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                return Err(ParseError::new(format!(
                    "This CSV file could not be read near line {line} ({e}); \
                     check that it is a valid CSV export."
                )));
            }
        }
        if first {
            first = false;
            headers = record
                .iter()
                .enumerate()
                .map(|(i, h)| column_name(i, h.trim()))
                .collect();
            continue;
        }
        data_rows += 1;
        let mut wrote_field = false;
        for (i, value) in record.iter().enumerate() {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            let extra;
            let name = match headers.get(i) {
                Some(name) => name.as_str(),
                None => {
                    extra = column_name(i, "");
                    extra.as_str()
                }
            };
            out.push(match (wrote_field, out.is_empty()) {
                (true, _) => "; ",
                (false, true) => "",
                (false, false) => "\n",
            })?;
            wrote_field = true;
            out.push(name)?;
            out.push(": ")?;
            if value.contains(['\n', '\r']) {
                // A value spanning lines would break "one row, one line".
                out.push(&value.replace("\r\n", " ").replace(['\n', '\r'], " "))?;
            } else {
                out.push(value)?;
            }
        }
    }
    if data_rows == 0 {
        return Err(ParseError::new(
            "This CSV file has a header row but no data rows; there is nothing to index.",
        ));
    }
    if out.is_empty() {
        return Err(ParseError::new(
            "Every data row in this CSV file is empty; there is nothing to index.",
        ));
    }
    Ok(out.into_string())
}

fn column_name(index: usize, header: &str) -> String {
    if header.is_empty() {
        format!("column {}", index + 1)
    } else if header.contains(['\n', '\r']) {
        header.replace(['\n', '\r'], " ")
    } else {
        header.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse as parse_file, Format, Limits};
    use super::*;

    fn render(csv: &str) -> String {
        let parsed = parse_file(csv.as_bytes(), "table.csv", &Limits::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.format, Format::Csv);
        assert_eq!(parsed.encoding, Some("UTF-8"));
        parsed.text
    }

    #[test]
    fn rows_carry_their_header() {
        let csv = "name,born,field\nAda Lovelace,1815,mathematics\nAlan Turing,1912,\n";
        assert_eq!(
            render(csv),
            "name: Ada Lovelace; born: 1815; field: mathematics\nname: Alan Turing; born: 1912"
        );
    }

    #[test]
    fn quoted_fields_and_crlf() {
        let csv = "id,quote\r\n1,\"Hello, \"\"world\"\"\"\r\n2,\"two\r\nlines\"\r\n";
        assert_eq!(
            render(csv),
            "id: 1; quote: Hello, \"world\"\nid: 2; quote: two lines"
        );
    }

    #[test]
    fn ragged_rows_and_missing_headers() {
        // Two ragged rows in ten is still a table.
        let mut csv = "a,,c\n1,2,3\n4,5\n6,7,8,9\n".to_string();
        csv.push_str(&"x,y,z\n".repeat(7));
        let text = render(&csv);
        assert!(
            text.starts_with(
                "a: 1; column 2: 2; c: 3\na: 4; column 2: 5\na: 6; column 2: 7; c: 8; column 4: 9\n\
                 a: x; column 2: y; c: z\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn semicolon_tab_and_pipe_delimiters() {
        assert_eq!(
            render("Name;Preis\nKaffee;2,50\nTee;1,80\n"),
            "Name: Kaffee; Preis: 2,50\nName: Tee; Preis: 1,80"
        );
        assert_eq!(render("a\tb\n1\t2, 3\n"), "a: 1; b: 2, 3");
        assert_eq!(render("a|b|c\n1|2|3\n"), "a: 1; b: 2; c: 3");
    }

    #[test]
    fn legacy_encoded_csv() {
        let (bytes, _, _) = encoding_rs::WINDOWS_1252.encode("Stadt;Straße\nKöln;Hohe Straße\n");
        let parsed = parse_file(&bytes, "orte.csv", &Limits::default()).unwrap();
        assert_eq!(parsed.text, "Stadt: Köln; Straße: Hohe Straße");
        assert_eq!(parsed.encoding, Some("windows-1252"));
    }

    #[test]
    fn header_only_and_empty_rows_are_errors() {
        let err = parse_file(b"a,b,c\n", "t.csv", &Limits::default()).unwrap_err();
        assert!(err.message.contains("no data rows"), "{err}");
        let err = parse_file(b"a,b\n,\n , \n", "t.csv", &Limits::default()).unwrap_err();
        assert!(err.message.contains("empty"), "{err}");
    }

    #[test]
    fn repeated_headers_cannot_blow_up_the_text() {
        // A long header repeated on every row grows the text much faster
        // than the file; the cap stops it early.
        let mut csv = format!("{},b\n", "h".repeat(10_000));
        csv.push_str(&"1,2\n".repeat(10_000));
        let limits = Limits {
            max_text_bytes: 1_000_000,
            ..Limits::default()
        };
        let err = parse_file(csv.as_bytes(), "t.csv", &limits).unwrap_err();
        assert!(err.message.contains("larger than the 1 MB limit"), "{err}");
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff_delimiter("a,b\n1,2\n"), Some(b','));
        assert_eq!(sniff_delimiter("a;b\n1,5;2,5\n3,5;4\n"), Some(b';'));
        assert_eq!(sniff_delimiter("just one column\nof words\n"), None);
        assert_eq!(
            sniff_delimiter("Hi, there\nhow, are, you, today\nfine\n"),
            None
        );
    }
}
