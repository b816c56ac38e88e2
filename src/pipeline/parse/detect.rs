//! Format detection: what a file really is, judged by its content.
//!
//! Uploads arrive with whatever name the user's system gave them, so the
//! extension is only trusted to choose among text formats (Markdown, CSV,
//! HTML, JSON, plain text) once the content has said "text". Magic numbers
//! decide PDF and ZIP-based files; a ZIP is only a Word document if it holds
//! `word/document.xml`. Files we cannot index (images, archives, other
//! Office formats, binaries) are refused here with a message naming what
//! they look like, so the user knows what to convert them to.
//!
//! Text is decoded once here and handed on in [`Detected::Text`], because
//! deciding between text formats needs the decoded text anyway.

use std::io::{Cursor, Read};

use super::text::{self, Decoded};
use super::{csv, docx, Format, ParseError};

/// The outcome of detection, carrying what parsing needs next.
pub(super) enum Detected<'a> {
    Pdf,
    Docx,
    Text {
        format: Format,
        decoded: Decoded<'a>,
        /// The CSV delimiter; meaningful only when `format` is CSV.
        csv_delimiter: u8,
    },
}

impl Detected<'_> {
    pub(super) fn format(&self) -> Format {
        match self {
            Detected::Pdf => Format::Pdf,
            Detected::Docx => Format::Docx,
            Detected::Text { format, .. } => *format,
        }
    }
}

pub(super) fn detect<'a>(bytes: &'a [u8], filename: &str) -> Result<Detected<'a>, ParseError> {
    if bytes.is_empty() {
        return Err(ParseError::new(
            "The file is empty (0 bytes); there is nothing to index.",
        ));
    }
    if is_pdf(bytes) {
        return Ok(Detected::Pdf);
    }
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return classify_zip(bytes, filename);
    }
    if bytes.starts_with(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
        return Err(ole2_error(bytes));
    }
    if let Some(kind) = binary_kind(bytes) {
        return Err(ParseError::new(format!(
            "This file is {kind}, not a text document, so there is no text to index. \
             Upload a PDF, Word (.docx), HTML, Markdown, CSV, JSON or plain-text file."
        )));
    }
    if bytes.starts_with(b"{\\rtf") {
        return Err(ParseError::new(
            "Rich Text Format (.rtf) files are not supported; \
             save the document as .docx or PDF and upload that.",
        ));
    }

    let decoded = text::decode(bytes)?;
    let (format, csv_delimiter) = text_format(&decoded.text, filename);
    Ok(Detected::Text {
        format,
        decoded,
        csv_delimiter,
    })
}

/// A PDF starts with `%PDF-`. Readers accept up to 1 KB of junk before it
/// (some mail gateways and old Mac tools add headers), but only if that junk
/// is binary: a text file that merely mentions "%PDF-" near its top is text.
fn is_pdf(bytes: &[u8]) -> bool {
    let start = skip_bom_and_whitespace(bytes);
    if bytes[start..].starts_with(b"%PDF-") {
        return true;
    }
    let head = &bytes[..bytes.len().min(1024)];
    match find(head, b"%PDF-") {
        Some(at) => {
            let junk = &head[..at];
            junk.contains(&0) || std::str::from_utf8(junk).is_err()
        }
        None => false,
    }
}

fn classify_zip<'a>(bytes: &[u8], filename: &str) -> Result<Detected<'a>, ParseError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        let what = if extension(filename) == "docx" {
            "Word document (.docx)"
        } else {
            "ZIP archive"
        };
        ParseError::new(format!(
            "This {what} is damaged or truncated and could not be opened ({}); \
             re-save or re-export it and upload it again.",
            docx::zip_error_detail(&e)
        ))
    })?;
    let has = |name: &str| archive.index_for_name(name).is_some();
    let (kind, advice) = if has("word/document.xml") {
        return Ok(Detected::Docx);
    } else if has("xl/workbook.xml") {
        (
            "an Excel spreadsheet (.xlsx)",
            "save the sheet as CSV and upload that",
        )
    } else if has("ppt/presentation.xml") {
        (
            "a PowerPoint presentation (.pptx)",
            "save it as PDF and upload that",
        )
    } else {
        match odf_mimetype(&mut archive).as_deref() {
            Some("application/vnd.oasis.opendocument.text") => (
                "an OpenDocument text file (.odt)",
                "save it as .docx or PDF and upload that",
            ),
            Some("application/vnd.oasis.opendocument.spreadsheet") => (
                "an OpenDocument spreadsheet (.ods)",
                "save the sheet as CSV and upload that",
            ),
            Some("application/vnd.oasis.opendocument.presentation") => (
                "an OpenDocument presentation (.odp)",
                "save it as PDF and upload that",
            ),
            Some("application/epub+zip") => ("an EPUB e-book", "convert it to PDF and upload that"),
            _ => (
                "a ZIP archive",
                "unpack it and upload the documents inside one by one",
            ),
        }
    };
    Err(ParseError::new(format!(
        "This file is {kind}, which is not supported; {advice}."
    )))
}

/// OpenDocument and EPUB files name their type in a small `mimetype` entry.
fn odf_mimetype(archive: &mut zip::ZipArchive<Cursor<&[u8]>>) -> Option<String> {
    let entry = archive.by_name("mimetype").ok()?;
    let mut mimetype = String::new();
    // The entry is a few dozen bytes; never trust a ZIP to say so.
    entry.take(256).read_to_string(&mut mimetype).ok()?;
    Some(mimetype.trim().to_string())
}

/// OLE2 compound files are pre-2007 Office documents, but also what Office
/// wraps a password-protected .docx/.xlsx in.
fn ole2_error(bytes: &[u8]) -> ParseError {
    let encrypted_package: Vec<u8> = "EncryptedPackage"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    if find(bytes, &encrypted_package).is_some() {
        ParseError::new(
            "This Office document is password-protected; \
             remove the password (or save an unprotected copy) and upload it again.",
        )
    } else {
        ParseError::new(
            "This is a legacy Office file (.doc, .xls or .ppt from Office 97-2003), \
             which is not supported; save it as .docx or PDF and upload that.",
        )
    }
}

/// Recognises common non-document files by their magic numbers, to name
/// them in the error. Only signatures that cannot start a real text file
/// are listed; anything else binary is caught by the text decoder.
fn binary_kind(bytes: &[u8]) -> Option<&'static str> {
    const SIGNATURES: &[(&[u8], &str)] = &[
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"\xFF\xD8\xFF", "a JPEG image"),
        (b"GIF87a", "a GIF image"),
        (b"GIF89a", "a GIF image"),
        (b"II*\0", "a TIFF image"),
        (b"MM\0*", "a TIFF image"),
        (b"\x7FELF", "an executable program (ELF)"),
        (b"\x1F\x8B", "a gzip-compressed file"),
        (b"BZh", "a bzip2-compressed file"),
        (b"\xFD7zXZ\0", "an xz-compressed file"),
        (b"\x28\xB5\x2F\xFD", "a zstd-compressed file"),
        (b"7z\xBC\xAF\x27\x1C", "a 7-Zip archive"),
        (b"Rar!\x1A\x07", "a RAR archive"),
        (b"\0asm", "a WebAssembly module"),
        (b"SQLite format 3\0", "an SQLite database"),
        (
            b"\xCA\xFE\xBA\xBE",
            "a compiled program (Java class or Mach-O)",
        ),
        (b"\xCF\xFA\xED\xFE", "an executable program (Mach-O)"),
        (b"OggS\0", "an audio or video file (Ogg)"),
        (b"fLaC", "an audio file (FLAC)"),
    ];
    if let Some((_, kind)) = SIGNATURES
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
    {
        return Some(kind);
    }
    if bytes.starts_with(b"MZ") && bytes.contains(&0) {
        return Some("an executable program (Windows)");
    }
    if bytes.starts_with(b"ID3") && bytes.get(3).is_some_and(|&v| v < 10) {
        return Some("an audio file (MP3)");
    }
    match (bytes.get(..4), bytes.get(8..12)) {
        (Some(b"RIFF"), Some(b"WEBP")) => return Some("a WebP image"),
        (Some(b"RIFF"), Some(b"WAVE")) => return Some("an audio file (WAV)"),
        (Some(b"RIFF"), Some(b"AVI ")) => return Some("a video file (AVI)"),
        _ => {}
    }
    if bytes.get(4..8) == Some(b"ftyp") {
        return Some("a video, audio or HEIC image file (MP4 family)");
    }
    if bytes.get(257..262) == Some(b"ustar") {
        return Some("a tar archive");
    }
    None
}

/// Chooses among text formats: content that is unmistakably JSON or HTML
/// wins, then the extension, then a Markdown sniff, then plain text.
fn text_format(text: &str, filename: &str) -> (Format, u8) {
    let body = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if body.starts_with(['{', '[']) && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        return (Format::Json, b',');
    }
    if starts_like_html(body) {
        return (Format::Html, b',');
    }
    match extension(filename).as_str() {
        "md" | "markdown" | "mdown" | "mkd" | "mkdn" => return (Format::Markdown, b','),
        "htm" | "html" | "xhtml" => return (Format::Html, b','),
        // Invalid JSON named .json is still JSON: parsing reports where the
        // syntax error is, which is more useful than indexing it as text.
        "json" => return (Format::Json, b','),
        "csv" | "tsv" => {
            if let Some(delimiter) = csv::sniff_delimiter(text) {
                return (Format::Csv, delimiter);
            }
        }
        _ => {}
    }
    if looks_like_markdown(text) {
        (Format::Markdown, b',')
    } else {
        (Format::Text, b',')
    }
}

/// `<!doctype html` or `<html`, possibly after an XML declaration and
/// comments (XHTML, and pages saved by some tools).
fn starts_like_html(mut body: &str) -> bool {
    loop {
        body = body.trim_start();
        let skip_to = if body.starts_with("<?") {
            "?>"
        } else if body.starts_with("<!--") {
            "-->"
        } else {
            break;
        };
        match body.find(skip_to) {
            Some(end) => body = &body[end + skip_to.len()..],
            None => return false,
        }
    }
    let head = body.get(..14).unwrap_or(body);
    if head.eq_ignore_ascii_case("<!doctype html") {
        return true;
    }
    body.get(..5)
        .is_some_and(|tag| tag.eq_ignore_ascii_case("<html"))
        && body[5..].starts_with(|c: char| c == '>' || c.is_ascii_whitespace())
}

/// A conservative Markdown sniff for text without a Markdown extension:
/// ATX headings plus some other Markdown construct. Misjudging costs little
/// (the chunker splits Markdown along headings), but prose with a stray
/// "# " line should stay plain text.
fn looks_like_markdown(text: &str) -> bool {
    let mut end = text.len().min(64 * 1024);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let sample = &text[..end];
    let (mut headings, mut fences, mut links, mut items) = (0usize, 0usize, 0usize, 0usize);
    for line in sample.lines().take(2000) {
        let hashes = line.bytes().take_while(|&b| b == b'#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            headings += 1;
        } else if line.starts_with("```") || line.starts_with("~~~") {
            fences += 1;
        } else if line.starts_with("- ") || line.starts_with("* ") {
            items += 1;
        }
        if line.contains("](") {
            links += 1;
        }
    }
    headings >= 2 && (fences >= 2 || links >= 1 || items >= 2 || headings >= 3)
}

/// The lower-cased extension of `filename`, without the dot.
fn extension(filename: &str) -> String {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => String::new(),
    }
}

fn skip_bom_and_whitespace(bytes: &[u8]) -> usize {
    let after_bom = if bytes.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    after_bom
        + bytes[after_bom..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::super::detect as detect_format;
    use super::*;
    use std::io::Write;

    fn zip_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in entries {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn err(bytes: &[u8], name: &str) -> String {
        detect_format(bytes, name).unwrap_err().message
    }

    #[test]
    fn content_beats_extension() {
        assert_eq!(
            detect_format(b"%PDF-1.7\n...", "notes.txt"),
            Ok(Format::Pdf)
        );
        assert_eq!(
            detect_format(b"just some text", "report.pdf"),
            Ok(Format::Text)
        );
        assert_eq!(
            detect_format(b"just some text", "report.docx"),
            Ok(Format::Text)
        );
        assert_eq!(detect_format(b"{\"a\": 1}", "data.txt"), Ok(Format::Json));
        assert_eq!(detect_format(b"[1, 2]", "list.md"), Ok(Format::Json));
        assert_eq!(
            detect_format(b"<!DOCTYPE html><p>hi", "page.txt"),
            Ok(Format::Html)
        );
        assert_eq!(
            detect_format(
                b"<?xml version=\"1.0\"?>\n<!-- saved -->\n<html lang=en>",
                "x"
            ),
            Ok(Format::Html)
        );
        assert_eq!(
            detect_format(b"<htmlish> is not a tag we know", "x.txt"),
            Ok(Format::Text)
        );
    }

    #[test]
    fn extension_chooses_among_text_formats() {
        assert_eq!(
            detect_format(b"plain words", "README.md"),
            Ok(Format::Markdown)
        );
        assert_eq!(
            detect_format(b"plain words", "x.MARKDOWN"),
            Ok(Format::Markdown)
        );
        assert_eq!(
            detect_format(b"<p>fragment</p>", "frag.htm"),
            Ok(Format::Html)
        );
        assert_eq!(detect_format(b"a,b\n1,2\n3,4\n", "t.csv"), Ok(Format::Csv));
        assert_eq!(detect_format(b"a\tb\n1\t2\n", "t.tsv"), Ok(Format::Csv));
        assert_eq!(detect_format(b"a,b\n1,2\n3,4\n", "t.txt"), Ok(Format::Text));
        // Not consistent CSV, so it is text whatever it is called.
        assert_eq!(
            detect_format(b"Dear team,\nthanks, all, of you\nbye\n", "t.csv"),
            Ok(Format::Text)
        );
        // Invalid JSON named .json stays JSON so parsing can say where.
        assert_eq!(detect_format(b"{\"a\": }", "bad.json"), Ok(Format::Json));
        assert_eq!(detect_format(b"{\"a\": }", "bad.txt"), Ok(Format::Text));
    }

    #[test]
    fn markdown_sniff_is_conservative() {
        let md = "# Install\n\nRun `make`.\n\n## Usage\n\nSee [docs](https://x.y).\n";
        assert_eq!(
            detect_format(md.as_bytes(), "notes.txt"),
            Ok(Format::Markdown)
        );
        let prose = "# not really a heading\nJust a note.\n";
        assert_eq!(
            detect_format(prose.as_bytes(), "notes.txt"),
            Ok(Format::Text)
        );
    }

    #[test]
    fn zips_are_classified_by_content() {
        let docx = zip_with(&[("word/document.xml", b"<w:document/>")]);
        assert_eq!(detect_format(&docx, "upload.bin"), Ok(Format::Docx));
        let xlsx = zip_with(&[("xl/workbook.xml", b"<workbook/>")]);
        assert!(err(&xlsx, "budget.docx").contains("Excel spreadsheet (.xlsx)"));
        let pptx = zip_with(&[("ppt/presentation.xml", b"<p/>")]);
        assert!(err(&pptx, "deck.pptx").contains("PowerPoint"));
        let odt = zip_with(&[
            ("mimetype", b"application/vnd.oasis.opendocument.text"),
            ("content.xml", b"<office:document-content/>"),
        ]);
        assert!(err(&odt, "letter.odt").contains("OpenDocument text file (.odt)"));
        let plain = zip_with(&[("a.txt", b"hello")]);
        assert!(err(&plain, "stuff.zip").contains("ZIP archive"));
    }

    #[test]
    fn damaged_zip_is_a_readable_error() {
        let docx = zip_with(&[("word/document.xml", b"<w:document/>")]);
        let message = err(&docx[..docx.len() / 2], "cut.docx");
        assert!(
            message.contains("Word document (.docx) is damaged"),
            "{message}"
        );
    }

    #[test]
    fn binary_files_are_named() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "PNG image"),
            (b"\xFF\xD8\xFF\xE0\0\x10JFIF", "JPEG image"),
            (b"GIF89a\x01\0\x01\0", "GIF image"),
            (b"\x7FELF\x02\x01\x01\0", "executable program"),
            (b"\x1F\x8B\x08\0\0\0\0\0", "gzip"),
        ];
        for (bytes, kind) in cases {
            let message = err(bytes, "file.txt");
            assert!(message.contains(kind), "{kind}: {message}");
            assert!(message.contains("not a text document"), "{message}");
        }
        let message = err(b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1\0\0", "old.doc");
        assert!(message.contains("legacy Office file"), "{message}");
        let mut protected = b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1\0\0".to_vec();
        protected.extend("EncryptedPackage".encode_utf16().flat_map(u16::to_le_bytes));
        assert!(err(&protected, "secret.docx").contains("password-protected"));
        assert!(err(b"{\\rtf1\\ansi hello}", "x.rtf").contains("Rich Text Format"));
    }

    #[test]
    fn pdf_magic_after_binary_junk_only() {
        assert_eq!(detect_format(b"\0\0junk%PDF-1.4\n", "x"), Ok(Format::Pdf));
        let text = b"Notes on the format: every file starts with %PDF-1.x\n";
        assert_eq!(detect_format(text, "notes.txt"), Ok(Format::Text));
    }

    #[test]
    fn extensions() {
        assert_eq!(extension("a/b.c/Report.PDF"), "pdf");
        assert_eq!(extension("C:\\x\\notes.Md"), "md");
        assert_eq!(extension(".bashrc"), "");
        assert_eq!(extension("README"), "");
    }
}
