//! DOCX: the body text of a Word document, from `word/document.xml`.
//!
//! A .docx is a ZIP archive, which makes it the one format where a small
//! upload can expand without bound. Before anything is parsed the archive's
//! entry count is checked, and `word/document.xml` is inflated through a
//! `take(limit + 1)` reader so that the bytes actually produced are what is
//! counted against `max_unpacked_bytes`: the sizes a ZIP declares are
//! whatever its author wrote.
//!
//! The XML is streamed with `quick-xml`, keeping only what a reader sees:
//! `w:t` text, tabs, line breaks, paragraphs as blocks separated by blank
//! lines, and table rows as lines of " | "-separated cells. Deleted text,
//! field codes and the fallback copies of drawing content
//! (`mc:Fallback`) are skipped, since they would duplicate or resurrect
//! text. Headers, footers, footnotes and comments live in other parts and
//! are not read.

use std::io::{Cursor, Read};

use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::NsReader;
use zip::result::ZipError;
use zip::ZipArchive;

use super::{human_size, Limits, ParseError, TextOut, MIB};

const DOCUMENT_XML: &str = "word/document.xml";

/// A Word document has a few dozen parts, a few hundred with many images;
/// tens of thousands of entries is an attack on the central directory
/// parsing or on whoever unpacks it next.
const MAX_ENTRIES: usize = 10_000;

/// WordprocessingML, transitional and strict.
const W_NAMESPACES: [&[u8]; 2] = [
    b"http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    b"http://purl.oclc.org/ooxml/wordprocessingml/main",
];
const MC_NAMESPACE: &[u8] = b"http://schemas.openxmlformats.org/markup-compatibility/2006";

pub(super) fn parse(bytes: &[u8], limits: &Limits) -> Result<String, ParseError> {
    let mut archive = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        damaged(&format!(
            "the ZIP container cannot be opened ({})",
            zip_error_detail(&e)
        ))
    })?;
    if archive.len() > MAX_ENTRIES {
        return Err(ParseError::new(format!(
            "This .docx contains {} files, far more than any Word document \
             (zip bomb?); refused.",
            archive.len()
        )));
    }
    let xml = read_capped(&mut archive, DOCUMENT_XML, limits.max_unpacked_bytes)?;
    let xml = std::str::from_utf8(&xml)
        .map_err(|_| damaged("its text (word/document.xml) is not valid UTF-8"))?;
    let text = extract(xml.trim_start_matches('\u{feff}'), limits)?;
    if text.trim().is_empty() {
        return Err(ParseError::new(
            "This Word document contains no text; there is nothing to index.",
        ));
    }
    Ok(text)
}

/// Inflates one entry, refusing as soon as it produces more than `limit`
/// bytes, whatever size the archive declares for it.
fn read_capped(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, ParseError> {
    let entry = archive.by_name(name).map_err(|e| match e {
        ZipError::FileNotFound => damaged("it has no word/document.xml"),
        ZipError::UnsupportedArchive(ZipError::PASSWORD_REQUIRED) | ZipError::InvalidPassword => {
            ParseError::new(
                "This Word document is password-protected; \
                 remove the password and upload it again.",
            )
        }
        e => damaged(&format!("{name} cannot be read ({})", zip_error_detail(&e))),
    })?;
    if entry.size() > limit {
        return Err(bomb(limit));
    }
    // The declared size only sizes the first allocation, and never beyond
    // what we would accept anyway.
    let capacity = entry.size().min(limit).min(64 * MIB);
    let mut data = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    entry
        .take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| damaged(&format!("{name} cannot be unpacked ({e})")))?;
    if u64::try_from(data.len()).map_or(true, |len| len > limit) {
        return Err(bomb(limit));
    }
    Ok(data)
}

/// `zip`'s errors, worded for the end of "could not be opened (...)".
pub(super) fn zip_error_detail(e: &ZipError) -> String {
    match e {
        ZipError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file ends too early".to_string()
        }
        ZipError::Io(io) => io.to_string(),
        e => e.to_string(),
    }
}

fn bomb(limit: u64) -> ParseError {
    ParseError::new(format!(
        "This .docx unpacks to more than {} (zip bomb?); refused. \
         If it is a genuine document, split it into smaller files.",
        human_size(limit)
    ))
}

fn damaged(detail: &str) -> ParseError {
    ParseError::new(format!(
        "This Word document is damaged and could not be read: {detail}. \
         Open and re-save it in Word (or export it as PDF) and upload it again."
    ))
}

/// The WordprocessingML elements that matter for text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Paragraph,
    Run,
    Text,
    Tab,
    Break,
    NoBreakHyphen,
    Table,
    Row,
    Cell,
    /// Content that repeats or resurrects other text.
    Skipped,
    Other,
}

fn classify(ns: &ResolveResult<'_>, local: &[u8]) -> Tag {
    match ns {
        ResolveResult::Bound(Namespace(ns)) if W_NAMESPACES.contains(ns) => match local {
            b"p" => Tag::Paragraph,
            b"r" => Tag::Run,
            b"t" => Tag::Text,
            b"tab" | b"ptab" => Tag::Tab,
            b"br" | b"cr" => Tag::Break,
            b"noBreakHyphen" => Tag::NoBreakHyphen,
            b"tbl" => Tag::Table,
            b"tr" => Tag::Row,
            b"tc" => Tag::Cell,
            // Tracked moves keep the moved text twice.
            b"moveFrom" => Tag::Skipped,
            _ => Tag::Other,
        },
        ResolveResult::Bound(Namespace(ns)) if *ns == MC_NAMESPACE && local == b"Fallback" => {
            Tag::Skipped
        }
        _ => Tag::Other,
    }
}

#[derive(Default)]
struct Table {
    rows: Vec<String>,
    row: Vec<String>,
    cell: String,
}

struct Extractor {
    out: TextOut,
    /// Open paragraphs, innermost last: text boxes put paragraphs inside
    /// paragraphs.
    paragraphs: Vec<String>,
    /// Open tables, innermost last.
    tables: Vec<Table>,
    runs: usize,
    in_text: bool,
    /// Depth inside a skipped element.
    skip: usize,
}

fn extract(xml: &str, limits: &Limits) -> Result<String, ParseError> {
    let mut reader = NsReader::from_str(xml);
    let mut x = Extractor {
        out: TextOut::new(limits),
        paragraphs: Vec::new(),
        tables: Vec::new(),
        runs: 0,
        in_text: false,
        skip: 0,
    };
    loop {
        let (ns, event) = match reader.read_resolved_event() {
            Ok(resolved) => resolved,
            Err(e) => {
                return Err(damaged(&format!(
                    "its text (word/document.xml) is not valid XML ({e} at byte {})",
                    reader.error_position()
                )))
            }
        };
        match event {
            Event::Start(e) => {
                let tag = classify(&ns, e.local_name().as_ref());
                if x.skip > 0 || tag == Tag::Skipped {
                    x.skip += 1;
                } else {
                    x.start(tag);
                }
            }
            Event::Empty(e) => {
                let tag = classify(&ns, e.local_name().as_ref());
                if x.skip == 0 {
                    x.start(tag);
                    x.end(tag)?;
                }
            }
            Event::End(e) => {
                let tag = classify(&ns, e.local_name().as_ref());
                if x.skip > 0 {
                    x.skip -= 1;
                } else {
                    x.end(tag)?;
                }
            }
            Event::Text(t) if x.in_text && x.skip == 0 => {
                let text = t.xml10_content().map_err(|e| damaged(&e.to_string()))?;
                x.text(&text);
            }
            Event::CData(t) if x.in_text && x.skip == 0 => {
                let text = t.decode().map_err(|e| damaged(&e.to_string()))?;
                x.text(&text);
            }
            Event::GeneralRef(r) if x.in_text && x.skip == 0 => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c),
                    Ok(None) => match AsRef::<[u8]>::as_ref(&*r) {
                        b"amp" => Some('&'),
                        b"lt" => Some('<'),
                        b"gt" => Some('>'),
                        b"quot" => Some('"'),
                        b"apos" => Some('\''),
                        _ => None,
                    },
                    Err(e) => return Err(damaged(&e.to_string())),
                };
                if let Some(c) = resolved {
                    x.text(c.encode_utf8(&mut [0; 4]));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(x.out.into_string())
}

impl Extractor {
    fn start(&mut self, tag: Tag) {
        match tag {
            Tag::Paragraph => self.paragraphs.push(String::new()),
            Tag::Run => self.runs += 1,
            Tag::Text => self.in_text = true,
            Tag::Table => self.tables.push(Table::default()),
            // Tab stops in paragraph properties are also `w:tab`; only the
            // ones inside a run are characters.
            Tag::Tab if self.runs > 0 => self.text("\t"),
            Tag::Break if self.runs > 0 => self.text("\n"),
            Tag::NoBreakHyphen if self.runs > 0 => self.text("-"),
            _ => {}
        }
    }

    fn end(&mut self, tag: Tag) -> Result<(), ParseError> {
        match tag {
            Tag::Paragraph => {
                if let Some(paragraph) = self.paragraphs.pop() {
                    self.finish_paragraph(paragraph.trim())?;
                }
            }
            Tag::Run => self.runs = self.runs.saturating_sub(1),
            Tag::Text => self.in_text = false,
            Tag::Cell => {
                if let Some(table) = self.tables.last_mut() {
                    let cell = std::mem::take(&mut table.cell);
                    table.row.push(cell);
                }
            }
            Tag::Row => {
                if let Some(table) = self.tables.last_mut() {
                    if table.row.iter().any(|cell| !cell.is_empty()) {
                        table.rows.push(table.row.join(" | "));
                    }
                    table.row.clear();
                }
            }
            Tag::Table => {
                if let Some(table) = self.tables.pop() {
                    if let Some(outer) = self.tables.last_mut() {
                        // A table inside a cell stays inside that cell's line.
                        append_to_cell(&mut outer.cell, &table.rows.join("; "));
                    } else {
                        self.block(&table.rows.join("\n"))?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn text(&mut self, text: &str) {
        if let Some(paragraph) = self.paragraphs.last_mut() {
            paragraph.push_str(text);
        }
    }

    fn finish_paragraph(&mut self, paragraph: &str) -> Result<(), ParseError> {
        match self.tables.last_mut() {
            Some(table) => {
                append_to_cell(&mut table.cell, paragraph);
                Ok(())
            }
            None => self.block(paragraph),
        }
    }

    fn block(&mut self, block: &str) -> Result<(), ParseError> {
        if block.is_empty() {
            return Ok(());
        }
        if !self.out.is_empty() {
            self.out.push("\n\n")?;
        }
        self.out.push(block)
    }
}

fn append_to_cell(cell: &mut String, text: &str) {
    if text.is_empty() {
        return;
    }
    if !cell.is_empty() {
        cell.push(' ');
    }
    cell.push_str(text);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::fixtures::{docx, docx_bomb, docx_bomb_declaring, docx_with_body};
    use super::super::{parse as parse_file, Format, Limits};
    use super::*;

    fn parse_docx(bytes: &[u8]) -> Result<String, super::ParseError> {
        let parsed = parse_file(bytes, "doc.docx", &Limits::default())?;
        assert_eq!(parsed.format, Format::Docx);
        assert_eq!(parsed.pages, vec![]);
        Ok(parsed.text)
    }

    #[test]
    fn paragraphs_tabs_and_breaks() {
        let bytes = docx(&[
            "First paragraph.",
            "",
            "Tab\tseparated\nnext line",
            "Fish & <chips>",
        ]);
        assert_eq!(
            parse_docx(&bytes).unwrap(),
            "First paragraph.\n\nTab\tseparated\nnext line\n\nFish & <chips>"
        );
    }

    #[test]
    fn runs_tables_and_skipped_content() {
        let body = r#"
            <w:p><w:pPr><w:tabs><w:tab w:val="left" w:pos="720"/></w:tabs></w:pPr>
              <w:r><w:t>Split </w:t></w:r><w:r><w:rPr><w:b/></w:rPr><w:t>across</w:t></w:r>
              <w:r><w:t xml:space="preserve"> runs&#33; &#x263A;</w:t></w:r>
              <w:del><w:r><w:delText>deleted</w:delText></w:r></w:del>
              <w:r><w:fldChar w:fldCharType="begin"/></w:r>
              <w:r><w:instrText> PAGE </w:instrText></w:r>
              <w:r><w:fldChar w:fldCharType="end"/></w:r>
            </w:p>
            <w:tbl>
              <w:tr><w:tc><w:p><w:r><w:t>Name</w:t></w:r></w:p></w:tc>
                    <w:tc><w:p><w:r><w:t>Role</w:t></w:r></w:p></w:tc></w:tr>
              <w:tr><w:tc><w:p><w:r><w:t>Ada</w:t></w:r></w:p><w:p><w:r><w:t>Lovelace</w:t></w:r></w:p></w:tc>
                    <w:tc><w:p/></w:tc></w:tr>
              <w:tr><w:tc><w:p/></w:tc><w:tc><w:p/></w:tc></w:tr>
            </w:tbl>
            <w:p><w:r><mc:AlternateContent>
              <mc:Choice Requires="wps"><w:drawing><w:txbxContent>
                <w:p><w:r><w:t>Text box</w:t></w:r></w:p>
              </w:txbxContent></w:drawing></mc:Choice>
              <mc:Fallback><w:pict><w:txbxContent>
                <w:p><w:r><w:t>Text box</w:t></w:r></w:p>
              </w:txbxContent></w:pict></mc:Fallback>
            </mc:AlternateContent></w:r><w:r><w:t>Last</w:t></w:r><w:r><w:noBreakHyphen/><w:t>one</w:t></w:r></w:p>
        "#;
        assert_eq!(
            parse_docx(&docx_with_body(body)).unwrap(),
            "Split across runs! \u{263A}\n\nName | Role\nAda Lovelace | \n\nText box\n\nLast-one"
        );
    }

    #[test]
    fn empty_document_is_an_error() {
        let err = parse_docx(&docx(&["", "  "])).unwrap_err();
        assert!(err.message.contains("contains no text"), "{err}");
    }

    #[test]
    fn corrupt_documents_are_readable_errors() {
        let err = parse_docx(&docx_with_body("<w:p><w:r><w:t>unclosed</w:r></w:p>")).unwrap_err();
        assert!(
            err.message.starts_with("This Word document is damaged and could not be read: its text (word/document.xml) is not valid XML"),
            "{err}"
        );
        // Cut inside the compressed document: the archive still opens from
        // the detector's point of view only if the central directory is
        // intact, so flip bytes in the deflate data instead.
        let mut bytes = docx(&["some text that is long enough to be compressed"; 20]);
        let at = bytes
            .windows(17)
            .position(|w| w == b"word/document.xml")
            .unwrap()
            + 17;
        for b in &mut bytes[at..at + 40] {
            *b ^= 0x5A;
        }
        let err = parse_docx(&bytes).unwrap_err();
        assert!(err.message.contains("damaged"), "{err}");
    }

    #[test]
    fn bomb_fixture_is_a_valid_docx() {
        let text = parse_docx(&docx_bomb(100_000)).unwrap();
        assert!(
            text.len() > 99_000 && text.bytes().all(|b| b == b'a'),
            "{}",
            text.len()
        );
    }

    #[test]
    fn zip_bomb_is_refused_quickly() {
        let limits = Limits {
            max_unpacked_bytes: 50_000_000,
            max_text_bytes: 50_000_000,
        };
        let started = Instant::now();
        let honest = docx_bomb(200 * MIB);
        assert!(honest.len() < 2 * MIB as usize, "{}", honest.len());
        let lying = docx_bomb_declaring(200 * MIB, Some(1_000));
        let built = started.elapsed();
        for bytes in [honest, lying] {
            let started = Instant::now();
            let err = parse_file(&bytes, "bomb.docx", &limits).unwrap_err();
            assert_eq!(
                err.message,
                "This .docx unpacks to more than 50 MB (zip bomb?); refused. \
                 If it is a genuine document, split it into smaller files."
            );
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{:?}",
                started.elapsed()
            );
        }
        assert!(built < Duration::from_secs(5), "{built:?}");
    }

    #[test]
    fn too_many_entries_is_refused() {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("word/document.xml", options).unwrap();
        for i in 0..=MAX_ENTRIES {
            zip.start_file(format!("media/{i}"), options).unwrap();
        }
        let bytes = zip.finish().unwrap().into_inner();
        let err = parse_docx(&bytes).unwrap_err();
        assert!(err.message.contains("10002 files"), "{err}");
    }
}
