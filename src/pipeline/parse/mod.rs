//! Parsing: turns an uploaded file's bytes into the plain text that gets
//! chunked and embedded.
//!
//! This module owns format detection (from content first, the file name only
//! as a hint) and one extractor per format. It is deliberately
//! self-contained (no `crate::` paths) so it can be built and tested on its
//! own. Everything here is synchronous and CPU-bound: the caller runs
//! [`parse`] on a blocking thread under `catch_unwind` and a time limit, and
//! has already enforced the upload size limit.
//!
//! Errors are [`ParseError`]s whose messages are shown to end users, so they
//! say what is wrong with the file and what to do about it.

mod csv;
mod detect;
mod docx;
/// Test documents built in code, shared with the integration tests.
#[cfg(test)]
use crate::samples as fixtures;
mod html;
mod json;
mod pdf;
mod reading_order;
mod text;

use std::fmt;

use detect::Detected;

/// A document format the parser can extract text from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Docx,
    Csv,
    Json,
}

impl Format {
    /// The short name stored with jobs and shown in the UI.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "txt",
            Format::Markdown => "md",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::Docx => "docx",
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }
}

impl Format {
    /// The format whose [`Format::as_str`] is `name`.
    pub fn from_name(name: &str) -> Option<Format> {
        [
            Format::Text,
            Format::Markdown,
            Format::Html,
            Format::Pdf,
            Format::Docx,
            Format::Csv,
            Format::Json,
        ]
        .into_iter()
        .find(|f| f.as_str() == name)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource caps applied while parsing, on top of the caller's file-size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Zip-based formats (docx): the most bytes we are willing to
    /// decompress. Counted on the actual output, not the declared sizes.
    pub max_unpacked_bytes: u64,
    /// The most extracted text we accept. Exceeding it is an error: a
    /// silently truncated document would look indexed but not be.
    pub max_text_bytes: u64,
}

impl Default for Limits {
    /// The same defaults as the shipped configuration (200 MB unpacked,
    /// 50 MB of text).
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 200 * MB,
            max_text_bytes: 50 * MB,
        }
    }
}

/// Where a page begins in [`Parsed::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Byte offset in `Parsed::text` where the page's text starts.
    pub start: usize,
    /// 1-based page number in the original document.
    pub number: u32,
}

/// The text extracted from one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub format: Format,
    /// The extracted text: never empty or whitespace-only, newlines are
    /// `\n`, paragraphs are separated by blank lines.
    pub text: String,
    /// PDFs only: where each page with text starts, sorted by `start`.
    /// Pages without text have no entry.
    pub pages: Vec<Page>,
    /// Plain text, Markdown and CSV: the character encoding the file was
    /// decoded from (an `encoding_rs` name such as `"UTF-8"` or
    /// `"windows-1252"`).
    pub encoding: Option<&'static str>,
}

impl Parsed {
    /// The 1-based page that the text at byte offset `byte` comes from.
    ///
    /// `None` when the document has no pages (every format but PDF) or
    /// `byte` is past the end of the text.
    pub fn page_at(&self, byte: usize) -> Option<u32> {
        if byte > self.text.len() {
            return None;
        }
        let after = self.pages.partition_point(|p| p.start <= byte);
        // Text before the first page start cannot happen (the first page
        // starts at 0), but answer with the first page rather than nothing.
        let page = self.pages.get(after.saturating_sub(1))?;
        Some(page.number)
    }
}

/// Why a file could not be parsed. The message is written for end users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        ParseError {
            message: message.into(),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

/// Detects the format of a file from its content, using `filename` (its
/// extension) only to choose among text formats.
///
/// Fails for files that are not documents we can read (binary data, images,
/// spreadsheets, archives, empty files), with a message saying so.
pub fn detect(bytes: &[u8], filename: &str) -> Result<Format, ParseError> {
    detect::detect(bytes, filename).map(|d| d.format())
}

/// Detects the format of a file and extracts its text.
///
/// Never returns empty text: a document without any text is an error.
/// Refuses what the bytes alone show cannot be indexed (an empty or
/// whitespace-only file, a format docworker does not read), cheaply and
/// before any service is asked, so that such a file fails at once whatever
/// the embedder's or Chroma's state. The message is the one [`parse`] gives.
pub fn precheck(bytes: &[u8], filename: &str, limits: &Limits) -> Result<(), ParseError> {
    if let Detected::Text { decoded, .. } = detect::detect(bytes, filename)? {
        if decoded.text.trim().is_empty() {
            parse(bytes, filename, limits)?;
        }
    }
    Ok(())
}

pub fn parse(bytes: &[u8], filename: &str, limits: &Limits) -> Result<Parsed, ParseError> {
    let detected = detect::detect(bytes, filename)?;
    let format = detected.format();
    let (text, pages, encoding) = match detected {
        Detected::Pdf => {
            let (text, pages) = pdf::parse(bytes, limits)?;
            (text, pages, None)
        }
        Detected::Docx => (docx::parse(bytes, limits)?, Vec::new(), None),
        Detected::Text {
            format,
            decoded,
            csv_delimiter,
        } => {
            let encoding = Some(decoded.encoding.name());
            match format {
                Format::Html => (html::parse(&decoded.text, limits)?, Vec::new(), None),
                Format::Json => (json::parse(&decoded.text, limits)?, Vec::new(), None),
                Format::Csv => {
                    let text = csv::parse(&decoded.text, csv_delimiter, limits)?;
                    (text, Vec::new(), encoding)
                }
                Format::Text | Format::Markdown | Format::Pdf | Format::Docx => {
                    (text::parse(decoded.text, limits)?, Vec::new(), encoding)
                }
            }
        }
    };
    // Every extractor reports its own, more specific, "no text" error; this
    // is the backstop that keeps the documented guarantee.
    if text.trim().is_empty() {
        return Err(ParseError::new(
            "No text found in this file; there is nothing to index.",
        ));
    }
    check_text_size(text.len(), limits)?;
    Ok(Parsed {
        format,
        text,
        pages,
        encoding,
    })
}

const MIB: u64 = 1024 * 1024;
/// The unit of the `files.*_mb` settings (and of the sizes the caller
/// reports): a decimal megabyte, so that a limit configured as 5 MB reads
/// "5 MB" in messages.
const MB: u64 = 1_000_000;

/// A byte count the way the UI shows sizes: "50 MB", "1.5 MB", "12 KB"
/// (decimal units, like the settings).
fn human_size(bytes: u64) -> String {
    if bytes >= MB {
        let whole = bytes / MB;
        let tenths = (bytes % MB) * 10 / MB;
        if tenths == 0 {
            format!("{whole} MB")
        } else {
            format!("{whole}.{tenths} MB")
        }
    } else if bytes >= 1000 {
        format!("{} KB", bytes / 1000)
    } else {
        format!("{bytes} bytes")
    }
}

fn text_too_large(limits: &Limits) -> ParseError {
    ParseError::new(format!(
        "The text in this file is larger than the {} limit for extracted text; \
         split the document into smaller files and upload them separately.",
        human_size(limits.max_text_bytes)
    ))
}

fn check_text_size(len: usize, limits: &Limits) -> Result<(), ParseError> {
    if u64::try_from(len).map_or(true, |len| len > limits.max_text_bytes) {
        return Err(text_too_large(limits));
    }
    Ok(())
}

/// Extracted text under construction, for the formats whose output can be
/// much larger than their input (CSV and JSON repeat header names and key
/// paths on every line): it refuses to grow past `max_text_bytes`, so a
/// small hostile file cannot make us build gigabytes before the final check.
struct TextOut {
    text: String,
    cap: usize,
    limits: Limits,
}

impl TextOut {
    fn new(limits: &Limits) -> Self {
        TextOut {
            text: String::new(),
            cap: usize::try_from(limits.max_text_bytes).unwrap_or(usize::MAX),
            limits: *limits,
        }
    }

    fn push(&mut self, s: &str) -> Result<(), ParseError> {
        if self.text.len().saturating_add(s.len()) > self.cap {
            return Err(text_too_large(&self.limits));
        }
        self.text.push_str(s);
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    fn len(&self) -> usize {
        self.text.len()
    }

    fn into_string(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names() {
        let all = [
            (Format::Text, "txt"),
            (Format::Markdown, "md"),
            (Format::Html, "html"),
            (Format::Pdf, "pdf"),
            (Format::Docx, "docx"),
            (Format::Csv, "csv"),
            (Format::Json, "json"),
        ];
        for (format, name) in all {
            assert_eq!(format.as_str(), name);
            assert_eq!(Format::from_name(name), Some(format));
            assert_eq!(format.to_string(), name);
        }
    }

    #[test]
    fn page_at_finds_the_page_containing_a_byte() {
        let parsed = Parsed {
            format: Format::Pdf,
            text: "one\n\nthree".to_string(),
            pages: vec![
                Page {
                    start: 0,
                    number: 1,
                },
                Page {
                    start: 5,
                    number: 3,
                },
            ],
            encoding: None,
        };
        assert_eq!(parsed.page_at(0), Some(1));
        assert_eq!(parsed.page_at(4), Some(1));
        assert_eq!(parsed.page_at(5), Some(3));
        assert_eq!(parsed.page_at(10), Some(3));
        assert_eq!(parsed.page_at(11), None);
        let plain = Parsed {
            pages: Vec::new(),
            format: Format::Text,
            ..parsed
        };
        assert_eq!(plain.page_at(0), None);
    }

    #[test]
    fn sizes_read_like_the_ui() {
        assert_eq!(human_size(50 * MB), "50 MB");
        assert_eq!(human_size(3 * MB / 2), "1.5 MB");
        assert_eq!(human_size(5_000_000), "5 MB");
        assert_eq!(human_size(2000), "2 KB");
        assert_eq!(human_size(12), "12 bytes");
    }

    #[test]
    fn text_over_the_limit_is_refused_not_cut() {
        let limits = Limits {
            max_unpacked_bytes: MIB,
            max_text_bytes: 10,
        };
        let err = parse(b"0123456789 and more", "a.txt", &limits).unwrap_err();
        assert!(
            err.message.contains("larger than the 10 bytes limit"),
            "{err}"
        );
        let ok = parse(b"0123456789", "a.txt", &limits).unwrap();
        assert_eq!(ok.text, "0123456789");

        let mut out = TextOut::new(&limits);
        out.push("01234").unwrap();
        out.push("56789").unwrap();
        assert!(out.push("x").is_err());
        assert_eq!(out.len(), 10);
    }
}
