//! DOCX: the text of a Word document: its body, its headers and footers,
//! and its footnotes and endnotes.
//!
//! A .docx is a ZIP archive, which makes it the one format where a small
//! upload can expand without bound. Before anything is parsed the archive's
//! entry count is checked, and every part read is inflated through a
//! `take(limit + 1)` reader so that the bytes actually produced are what is
//! counted against `max_unpacked_bytes` (one budget for all the parts): the
//! sizes a ZIP declares are whatever its author wrote.
//!
//! The XML is streamed with `quick-xml`, keeping only what a reader sees:
//! `w:t` text, tabs, line breaks, paragraphs as blocks separated by blank
//! lines, table rows as lines of " | "-separated cells. Deleted text, field
//! codes and drawings' fallback copies (`mc:Fallback`) would duplicate or
//! resurrect text and are skipped; comments (talk about it) are not read.
//!
//! Where the other parts go: headers first and footers last, each distinct
//! text once (a header part is printed on every page, not repeated here).
//! A footnote (`[1]`) or endnote (`[i]`), numbered as Word does in citation
//! order, follows the paragraph (or table cell) that cites it, which keeps
//! the same marker: near its citation a note lands in the same chunk as the
//! sentence it explains; gathered after the body, notes would be orphans.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::NsReader;
use zip::result::ZipError;
use zip::ZipArchive;

use super::{human_size, Limits, ParseError, TextOut, MIB};

const DOCUMENT_XML: &str = "word/document.xml";
const FOOTNOTES_XML: &str = "word/footnotes.xml";
const ENDNOTES_XML: &str = "word/endnotes.xml";

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
    let archive = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
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
    let mut parts = Parts {
        archive,
        budget: limits.max_unpacked_bytes,
        limit: limits.max_unpacked_bytes,
    };
    let body = parts
        .read(DOCUMENT_XML)?
        .ok_or_else(|| damaged("it has no word/document.xml"))?;

    // The notes are read first: the body places each where it is cited.
    let mut notes = Notes::default();
    for (part, kind) in [
        (FOOTNOTES_XML, NoteKind::Foot),
        (ENDNOTES_XML, NoteKind::End),
    ] {
        if let Some(xml) = parts.read(part)? {
            let mut x = Extractor::new(limits, None);
            x.run(part, &xml)?;
            notes.texts.extend(
                x.notes
                    .into_iter()
                    .map(|(id, text)| ((kind, id), text.replace("\n\n", " "))),
            );
        }
    }

    let mut x = Extractor::new(limits, Some(&mut notes));
    x.run(DOCUMENT_XML, &body)?;
    let body = x.out.into_string();

    let mut out = TextOut::new(limits);
    let mut seen: Vec<String> = Vec::new();
    let mut add = |out: &mut TextOut, block: String| -> Result<(), ParseError> {
        if block.is_empty() || seen.contains(&block) {
            return Ok(());
        }
        if !out.is_empty() {
            out.push("\n\n")?;
        }
        out.push(&block)?;
        seen.push(block);
        Ok(())
    };
    let headers = parts.furniture("header", limits)?;
    let footers = parts.furniture("footer", limits)?;
    for header in headers {
        add(&mut out, header)?;
    }
    if !body.is_empty() {
        out.push(if out.is_empty() { "" } else { "\n\n" })?;
        out.push(&body)?;
    }
    for footer in footers {
        add(&mut out, footer)?;
    }
    let text = out.into_string();
    if text.trim().is_empty() {
        return Err(ParseError::new(
            "This Word document contains no text; there is nothing to index.",
        ));
    }
    Ok(text)
}

/// The package's parts, read against one unpacking budget.
struct Parts<'a> {
    archive: ZipArchive<Cursor<&'a [u8]>>,
    /// Bytes still allowed to be inflated, over all parts.
    budget: u64,
    /// `max_unpacked_bytes`, for the message.
    limit: u64,
}

impl Parts<'_> {
    /// One part's XML as text; `None` if the package has no such part.
    fn read(&mut self, name: &str) -> Result<Option<String>, ParseError> {
        let data = match read_capped(&mut self.archive, name, self.budget, self.limit)? {
            Some(data) => data,
            None => return Ok(None),
        };
        self.budget -= data.len() as u64;
        let xml = String::from_utf8(data)
            .map_err(|_| damaged(&format!("its text ({name}) is not valid UTF-8")))?;
        Ok(Some(match xml.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => xml,
        }))
    }

    /// The text of each header (or footer) part, in the order of their
    /// names' numbers (`header1.xml`, `header2.xml`, … `header10.xml`).
    fn furniture(&mut self, kind: &str, limits: &Limits) -> Result<Vec<String>, ParseError> {
        let prefix = format!("word/{kind}");
        let mut names: Vec<(u32, String)> = self
            .archive
            .file_names()
            .filter_map(|name| {
                let number = name.strip_prefix(&prefix)?.strip_suffix(".xml")?;
                Some((number.parse().ok()?, name.to_string()))
            })
            .collect();
        names.sort();
        let mut texts = Vec::new();
        for (_, name) in names {
            if let Some(xml) = self.read(&name)? {
                let mut x = Extractor::new(limits, None);
                x.run(&name, &xml)?;
                texts.push(x.out.into_string());
            }
        }
        Ok(texts)
    }
}

/// Inflates one entry, refusing as soon as it produces more than `budget`
/// bytes, whatever size the archive declares for it. `None` if the
/// package has no entry of that name.
fn read_capped(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    name: &str,
    budget: u64,
    limit: u64,
) -> Result<Option<Vec<u8>>, ParseError> {
    let entry = match archive.by_name(name) {
        Ok(entry) => entry,
        Err(ZipError::FileNotFound) => return Ok(None),
        Err(
            ZipError::UnsupportedArchive(ZipError::PASSWORD_REQUIRED) | ZipError::InvalidPassword,
        ) => {
            return Err(ParseError::new(
                "This Word document is password-protected; \
                 remove the password and upload it again.",
            ))
        }
        Err(e) => {
            return Err(damaged(&format!(
                "{name} cannot be read ({})",
                zip_error_detail(&e)
            )))
        }
    };
    if entry.size() > budget {
        return Err(bomb(limit));
    }
    // The declared size only sizes the first allocation, and never beyond
    // what we would accept anyway.
    let capacity = entry.size().min(budget).min(64 * MIB);
    let mut data = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    entry
        .take(budget.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| match e.kind() {
            // The parser process's memory limit, not a damaged file.
            std::io::ErrorKind::OutOfMemory => ParseError::new(
                "Unpacking this .docx needs more memory than the parser may use \
                 (files.parse_memory_mb); split the document, or raise the setting.",
            ),
            _ => damaged(&format!("{name} cannot be unpacked ({e})")),
        })?;
    if u64::try_from(data.len()).map_or(true, |len| len > budget) {
        return Err(bomb(limit));
    }
    Ok(Some(data))
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum NoteKind {
    Foot,
    End,
}

/// The document's footnotes and endnotes by id, and the numbers given to
/// them as the body cites them.
#[derive(Default)]
struct Notes {
    texts: HashMap<(NoteKind, String), String>,
    numbers: HashMap<(NoteKind, String), usize>,
    cited: [usize; 2],
}

impl Notes {
    /// The marker for a citation, and the note to place after the citing
    /// paragraph the first time it is cited.
    fn cite(&mut self, kind: NoteKind, id: String) -> (String, Option<String>) {
        let key = (kind, id);
        let (number, first) = match self.numbers.get(&key) {
            Some(&n) => (n, false),
            None => {
                let counter = &mut self.cited[kind as usize];
                *counter += 1;
                self.numbers.insert(key.clone(), *counter);
                (*counter, true)
            }
        };
        let marker = match kind {
            NoteKind::Foot => format!("[{number}]"),
            NoteKind::End => format!("[{}]", roman(number)),
        };
        let note = first
            .then(|| self.texts.get(&key))
            .flatten()
            .map(|text| format!("{marker} {text}"));
        (marker, note)
    }
}

/// Lower-case Roman numerals, as Word numbers endnotes.
fn roman(mut n: usize) -> String {
    const VALUES: [usize; 13] = [1000, 900, 500, 400, 100, 90, 50, 40, 10, 9, 5, 4, 1];
    const DIGITS: [&str; 13] = [
        "m", "cm", "d", "cd", "c", "xc", "l", "xl", "x", "ix", "v", "iv", "i",
    ];
    let mut out = String::new();
    for (value, digits) in VALUES.into_iter().zip(DIGITS) {
        while n >= value {
            out.push_str(digits);
            n -= value;
        }
    }
    out
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
    /// A footnote or endnote, in the notes parts.
    Note,
    /// A citation of a footnote or endnote, in the body.
    Reference(NoteKind),
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
            b"footnote" | b"endnote" => Tag::Note,
            b"footnoteReference" => Tag::Reference(NoteKind::Foot),
            b"endnoteReference" => Tag::Reference(NoteKind::End),
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

/// The `w:id` of a note or a note reference.
fn note_id(e: &BytesStart<'_>) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == b"id")
        .map(|a| String::from_utf8_lossy(&a.value).into_owned())
}

#[derive(Default)]
struct Table {
    rows: Vec<String>,
    row: Vec<String>,
    cell: String,
}

struct Extractor<'n> {
    out: TextOut,
    limits: Limits,
    /// Open paragraphs, innermost last: text boxes put paragraphs inside
    /// paragraphs.
    paragraphs: Vec<String>,
    /// Open tables, innermost last.
    tables: Vec<Table>,
    runs: usize,
    in_text: bool,
    /// Depth inside a skipped element.
    skip: usize,
    /// The body: the notes its citations place.
    cited: Option<&'n mut Notes>,
    /// Notes cited in the paragraph being read, placed after it.
    pending: Vec<String>,
    /// The notes parts: the note being read (its id and the text outside
    /// it), and every note read.
    note: Option<(String, TextOut)>,
    notes: Vec<(String, String)>,
}

impl<'n> Extractor<'n> {
    fn new(limits: &Limits, cited: Option<&'n mut Notes>) -> Self {
        Extractor {
            out: TextOut::new(limits),
            limits: *limits,
            paragraphs: Vec::new(),
            tables: Vec::new(),
            runs: 0,
            in_text: false,
            skip: 0,
            cited,
            pending: Vec::new(),
            note: None,
            notes: Vec::new(),
        }
    }

    fn run(&mut self, part: &str, xml: &str) -> Result<(), ParseError> {
        let mut reader = NsReader::from_str(xml);
        loop {
            let (ns, event) = match reader.read_resolved_event() {
                Ok(resolved) => resolved,
                Err(e) => {
                    return Err(damaged(&format!(
                        "its text ({part}) is not valid XML ({e} at byte {})",
                        reader.error_position()
                    )))
                }
            };
            match event {
                Event::Start(e) => {
                    let tag = classify(&ns, e.local_name().as_ref());
                    if self.skip > 0 || tag == Tag::Skipped {
                        self.skip += 1;
                    } else {
                        self.start(tag, &e);
                    }
                }
                Event::Empty(e) => {
                    let tag = classify(&ns, e.local_name().as_ref());
                    if self.skip == 0 {
                        self.start(tag, &e);
                        self.end(tag)?;
                    }
                }
                Event::End(e) => {
                    let tag = classify(&ns, e.local_name().as_ref());
                    if self.skip > 0 {
                        self.skip -= 1;
                    } else {
                        self.end(tag)?;
                    }
                }
                Event::Text(t) if self.in_text && self.skip == 0 => {
                    let text = t.xml10_content().map_err(|e| damaged(&e.to_string()))?;
                    self.text(&text);
                }
                Event::CData(t) if self.in_text && self.skip == 0 => {
                    let text = t.decode().map_err(|e| damaged(&e.to_string()))?;
                    self.text(&text);
                }
                Event::GeneralRef(r) if self.in_text && self.skip == 0 => {
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
                        self.text(c.encode_utf8(&mut [0; 4]));
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(())
    }

    fn start(&mut self, tag: Tag, e: &BytesStart<'_>) {
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
            Tag::Note if self.note.is_none() => {
                let outside = std::mem::replace(&mut self.out, TextOut::new(&self.limits));
                self.note = Some((note_id(e).unwrap_or_default(), outside));
            }
            Tag::Reference(kind) => {
                if let (Some(notes), Some(id)) = (self.cited.as_deref_mut(), note_id(e)) {
                    let (marker, note) = notes.cite(kind, id);
                    self.text(&marker);
                    self.pending.extend(note);
                }
            }
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
            Tag::Note => {
                if let Some((id, outside)) = self.note.take() {
                    let text = std::mem::replace(&mut self.out, outside).into_string();
                    // Separator "notes" (the line above the footnotes) have
                    // no text.
                    if !text.is_empty() {
                        self.notes.push((id, text));
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
        let notes = std::mem::take(&mut self.pending);
        match self.tables.last_mut() {
            Some(table) => {
                append_to_cell(&mut table.cell, paragraph);
                for note in &notes {
                    append_to_cell(&mut table.cell, note);
                }
                Ok(())
            }
            None => {
                self.block(paragraph)?;
                self.block(&notes.join("\n"))
            }
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

    use super::super::fixtures::{
        docx, docx_bomb, docx_bomb_declaring, docx_with_body, docx_with_parts,
    };
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
    fn headers_footers_and_notes() {
        let p = |text: &str| format!("<w:p><w:r><w:t>{text}</w:t></w:r></w:p>");
        let body = format!(
            r#"<w:p><w:r><w:t>Vaccines train the immune system.</w:t></w:r><w:r><w:footnoteReference w:id="2"/></w:r><w:r><w:t xml:space="preserve"> Boosters help.</w:t></w:r><w:r><w:endnoteReference w:id="1"/></w:r></w:p>{}<w:tbl><w:tr><w:tc><w:p><w:r><w:t>Dose</w:t></w:r><w:r><w:footnoteReference w:id="3"/></w:r></w:p></w:tc><w:tc>{}</w:tc></w:tr></w:tbl><w:p><w:r><w:t>Again</w:t></w:r><w:r><w:footnoteReference w:id="2"/></w:r></w:p>"#,
            p("Second paragraph."),
            p("0.5 ml"),
        );
        let footnotes = format!(
            r#"<w:footnote w:type="separator" w:id="0"><w:p><w:r><w:separator/></w:r></w:p></w:footnote><w:footnote w:id="2"><w:p><w:r><w:footnoteRef/></w:r><w:r><w:t xml:space="preserve"> See the WHO fact sheet.</w:t></w:r></w:p>{}</w:footnote><w:footnote w:id="3">{}</w:footnote>"#,
            p("Updated 2024."),
            p("Per adult."),
        );
        let endnotes = format!(r#"<w:endnote w:id="1">{}</w:endnote>"#, p("Endnote text."));
        let bytes = docx_with_parts(
            &body,
            &[
                ("word/header1.xml", p("ACME Clinical Guide").as_str()),
                ("word/header2.xml", p("ACME Clinical Guide").as_str()),
                ("word/header10.xml", p("Draft").as_str()),
                ("word/footer1.xml", p("Page 1").as_str()),
                ("word/footnotes.xml", footnotes.as_str()),
                ("word/endnotes.xml", endnotes.as_str()),
            ],
        );
        assert_eq!(
            parse_docx(&bytes).unwrap(),
            "ACME Clinical Guide\n\nDraft\n\n\
             Vaccines train the immune system.[1] Boosters help.[i]\n\n\
             [1] See the WHO fact sheet. Updated 2024.\n[i] Endnote text.\n\n\
             Second paragraph.\n\n\
             Dose[2] [2] Per adult. | 0.5 ml\n\n\
             Again[1]\n\n\
             Page 1"
        );
    }

    #[test]
    fn the_unpacking_budget_covers_every_part() {
        let limits = Limits {
            max_unpacked_bytes: 2_000,
            max_text_bytes: 50_000_000,
        };
        let footer = format!("<w:p><w:r><w:t>{}</w:t></w:r></w:p>", "f".repeat(1_500));
        let bytes = docx_with_parts(
            "<w:p><w:r><w:t>body</w:t></w:r></w:p>",
            &[("word/footer1.xml", footer.as_str())],
        );
        let err = parse_file(&bytes, "a.docx", &limits).unwrap_err();
        assert!(err.message.contains("unpacks to more than 2 KB"), "{err}");
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
