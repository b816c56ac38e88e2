//! PDF: the text layer, page by page.
//!
//! `pdf-extract` walks the document once and reports every glyph with its
//! position; each page's glyphs are put in reading order
//! ([`super::reading_order`]: columns one after the other, broken words
//! joined) and the page's text appended, so that every page's start offset
//! can be recorded in [`Page`]s: chunks then cite their page. Pages are
//! joined with a blank line; pages without text are skipped
//! (they keep no [`Page`] entry). A PDF with no text at all is almost always
//! a scan, and the error says so: it needs OCR, not a retry.
//!
//! `pdf-extract` and `lopdf` still have code paths that panic on malformed
//! input. The caller catches panics, but a panic would surface as an opaque
//! internal error, so each call is guarded here and a panic becomes the same
//! "damaged PDF" message as a reported error. Nothing is reused after a
//! panic except the immutable, already-loaded document.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

use pdf_extract::{Document, MediaBox, OutputDev, OutputError, Transform};

use super::reading_order::PageLayout;
use super::{Limits, Page, ParseError, TextOut};

pub(super) fn parse(bytes: &[u8], limits: &Limits) -> Result<(String, Vec<Page>), ParseError> {
    let document = match guarded(|| Document::load_mem(bytes)) {
        Ok(Ok(document)) => document,
        Ok(Err(e)) if is_password_error(&e) => return Err(password_protected()),
        Ok(Err(e)) => return Err(damaged(&e.to_string())),
        Err(panic) => return Err(damaged(&panic)),
    };
    // lopdf opens PDFs that are encrypted with an empty user password (the
    // usual "owner password only" restrictions) by itself; any other
    // encrypted PDF loads as a shell without readable pages.
    let encrypted = document.trailer.get(b"Encrypt").is_ok();
    let page_count = match guarded(|| document.get_pages()) {
        Ok(pages) => pages.len(),
        Err(panic) => return Err(damaged(&panic)),
    };
    if page_count == 0 {
        return Err(if encrypted {
            password_protected()
        } else {
            damaged("it has no pages")
        });
    }

    let mut collector = PageCollector::new(limits);
    let result = guarded(|| pdf_extract::output_doc(&document, &mut collector));
    if let Some(refused) = collector.refused.take() {
        return Err(refused);
    }
    let number = collector.failing_page();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) if encrypted => return Err(password_protected()),
        Ok(Err(e)) => return Err(damaged_page(number, &e.to_string())),
        Err(panic) => return Err(damaged_page(number, &panic)),
    }
    if collector.out.is_empty() {
        return Err(ParseError::new(
            "This PDF has no extractable text (scanned PDF? needs OCR). \
             Run it through OCR software (for example ocrmypdf) and upload the result.",
        ));
    }
    Ok((collector.out.into_string(), collector.pages))
}

/// Takes the text of every page from one pass over the document
/// (`output_doc`). Asking `pdf-extract` for one page at a time
/// (`output_doc_page`) walks the whole page tree for every page, which is
/// quadratic: a 2,580-page PDF spent half its 3.2 s there.
struct PageCollector {
    page: Option<PageLayout>,
    /// The page last begun (1-based); 0 before the first.
    number: u32,
    out: TextOut,
    pages: Vec<Page>,
    /// Why the pass was stopped early (the text outgrew the limit).
    refused: Option<ParseError>,
}

impl PageCollector {
    fn new(limits: &Limits) -> Self {
        PageCollector {
            page: None,
            number: 0,
            out: TextOut::new(limits),
            pages: Vec::new(),
            refused: None,
        }
    }

    /// Adds a page's text; pages without text are skipped (no [`Page`]).
    fn add(&mut self, text: &str) -> Result<(), ParseError> {
        let text = clean(text);
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        if !self.out.is_empty() {
            self.out.push("\n\n")?;
        }
        self.pages.push(Page {
            start: self.out.len(),
            number: self.number,
        });
        self.out.push(text)
    }

    /// The page a failed pass stopped in: pages come in order, and a page
    /// can fail before it begins (pdf-extract reads its MediaBox first).
    fn failing_page(&self) -> u32 {
        if self.page.is_some() {
            self.number
        } else {
            self.number + 1
        }
    }

    fn page(&mut self) -> Result<&mut PageLayout, OutputError> {
        self.page
            .as_mut()
            .ok_or(OutputError::FormatError(std::fmt::Error))
    }
}

impl OutputDev for PageCollector {
    fn begin_page(
        &mut self,
        page_num: u32,
        media_box: &MediaBox,
        _art_box: Option<(f64, f64, f64, f64)>,
    ) -> Result<(), OutputError> {
        self.number = page_num;
        self.page = Some(PageLayout::new(media_box));
        Ok(())
    }

    fn end_page(&mut self) -> Result<(), OutputError> {
        let page = self
            .page
            .take()
            .ok_or(OutputError::FormatError(std::fmt::Error))?;
        let text = page.finish();
        self.add(&text).map_err(|e| {
            self.refused = Some(e);
            OutputError::FormatError(std::fmt::Error)
        })
    }

    fn output_character(
        &mut self,
        trm: &Transform,
        width: f64,
        _spacing: f64,
        font_size: f64,
        char: &str,
    ) -> Result<(), OutputError> {
        let page = self.page()?;
        page.character(trm, width, font_size, char);
        // A page can hold far more text than its compressed stream's size
        // suggests: refuse it while it grows, not once it is all collected.
        if page.text_bytes() > self.out.cap.saturating_sub(self.out.len()) {
            self.refused = Some(super::text_too_large(&self.out.limits));
            return Err(OutputError::FormatError(std::fmt::Error));
        }
        Ok(())
    }

    fn begin_word(&mut self) -> Result<(), OutputError> {
        self.page()?.begin_word();
        Ok(())
    }

    fn end_word(&mut self) -> Result<(), OutputError> {
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), OutputError> {
        Ok(())
    }
}

/// Runs `f`, turning a panic into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("");
    // Panic messages are for developers ("index out of bounds..."); keep
    // a short trace of it for support without burying the user message.
    let message: String = message.chars().take(80).collect();
    if message.is_empty() {
        "unexpected PDF structure".to_string()
    } else {
        format!("unexpected PDF structure: {message}")
    }
}

fn is_password_error(e: &pdf_extract::Error) -> bool {
    matches!(
        e,
        pdf_extract::Error::Decryption(_) | pdf_extract::Error::InvalidPassword
    )
}

/// Text layers can contain control characters (unmapped glyphs come out as
/// NUL, some generators use CR line ends); they would only confuse the
/// chunker and tokenizers.
fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(|c: char| c.is_control() && c != '\n' && c != '\t') {
        return text.into();
    }
    text.chars()
        .filter_map(|c| match c {
            '\r' => Some('\n'),
            '\n' | '\t' => Some(c),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect::<String>()
        .into()
}

fn damaged(detail: &str) -> ParseError {
    ParseError::new(format!(
        "This PDF is damaged or truncated and could not be read: {detail}. \
         Re-export or re-download it and upload it again."
    ))
}

fn damaged_page(number: u32, detail: &str) -> ParseError {
    ParseError::new(format!(
        "This PDF is damaged or uses features the PDF reader does not support: \
         page {number} could not be read ({detail}). \
         Re-export it (for example \"Print to PDF\") and upload it again."
    ))
}

fn password_protected() -> ParseError {
    ParseError::new(
        "This PDF is password-protected (encrypted), so its text cannot be read; \
         remove the password (or save an unprotected copy) and upload it again.",
    )
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{pdf, pdf_two_columns, pdf_with, pdf_without_text};
    use super::super::{parse as parse_file, Format, Limits, ParseError, Parsed};
    use super::*;

    fn parse_pdf(bytes: &[u8]) -> Result<Parsed, ParseError> {
        parse_file(bytes, "doc.pdf", &Limits::default())
    }

    #[test]
    fn pages_are_extracted_with_their_offsets() {
        let bytes = pdf(&[
            "First page, line one.\nLine two (with parens).",
            "Second page: Café",
            "Third page.",
        ]);
        let parsed = parse_pdf(&bytes).unwrap();
        assert_eq!(parsed.format, Format::Pdf);
        assert_eq!(parsed.encoding, None);
        assert_eq!(
            parsed.text,
            "First page, line one.\nLine two (with parens).\n\nSecond page: Café\n\nThird page."
        );
        let starts: Vec<(usize, u32)> = parsed.pages.iter().map(|p| (p.start, p.number)).collect();
        let second = parsed.text.find("Second").unwrap();
        let third = parsed.text.find("Third").unwrap();
        assert_eq!(starts, vec![(0, 1), (second, 2), (third, 3)]);
        assert_eq!(parsed.page_at(0), Some(1));
        assert_eq!(parsed.page_at(second - 1), Some(1));
        assert_eq!(parsed.page_at(second + 3), Some(2));
        assert_eq!(parsed.page_at(parsed.text.len() - 1), Some(3));
    }

    #[test]
    fn long_lines_survive_extraction() {
        let line = "Vaccines train the immune system by exposing it to a harmless piece or \
                    weakened form of a pathogen, so that antibodies (and memory cells) are \
                    ready: 100% [sic] \\ \"quoted\" {braces} <angles> ~tilde~ #1 @home.";
        let parsed = parse_pdf(&pdf(&[line])).unwrap();
        assert_eq!(parsed.text, line);
    }

    #[test]
    fn two_columns_drawn_line_by_line_come_out_column_by_column() {
        let left = [
            "Vaccines train the immune system by",
            "exposing it to a harmless piece of a",
            "pathogen, so that antibodies are ready.",
        ];
        let right = [
            "Side effects are usually mild and go",
            "away within a few days; serious ones",
            "are rare and are monitored continuously.",
        ];
        let parsed = parse_pdf(&pdf_two_columns("Vaccine basics", &left, &right)).unwrap();
        assert_eq!(
            parsed.text,
            format!(
                "Vaccine basics\n\n{}\n\n{}",
                left.join("\n"),
                right.join("\n")
            )
        );
    }

    #[test]
    fn words_broken_at_line_ends_are_joined() {
        let parsed = parse_pdf(&pdf(&["The immune sys-\ntem learns. COVID-\n19 too."])).unwrap();
        assert_eq!(parsed.text, "The immune system learns. COVID-\n19 too.");
    }

    #[test]
    fn blank_pages_are_skipped_but_numbering_is_kept() {
        let bytes = pdf_with(&[Some("one"), None, Some("three")]);
        let parsed = parse_pdf(&bytes).unwrap();
        assert_eq!(parsed.text, "one\n\nthree");
        let numbers: Vec<u32> = parsed.pages.iter().map(|p| p.number).collect();
        assert_eq!(numbers, vec![1, 3]);
        assert_eq!(parsed.page_at(5), Some(3));
    }

    #[test]
    fn pdf_without_text_needs_ocr() {
        for bytes in [pdf_without_text(1), pdf_without_text(3)] {
            let err = parse_pdf(&bytes).unwrap_err();
            assert!(
                err.message
                    .contains("no extractable text (scanned PDF? needs OCR)"),
                "{err}"
            );
        }
    }

    #[test]
    fn truncated_pdf_is_a_readable_error() {
        let bytes = pdf(&["Some text that will be cut off.", "More"]);
        let err = parse_pdf(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(
            err.message
                .starts_with("This PDF is damaged or truncated and could not be read: "),
            "{err}"
        );
    }

    #[test]
    fn garbage_after_the_magic_is_a_readable_error() {
        let mut bytes = b"%PDF-1.7\n".to_vec();
        bytes.extend((0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        let err = parse_pdf(&bytes).unwrap_err();
        assert!(err.message.contains("damaged or truncated"), "{err}");
        let err = parse_pdf(b"%PDF-").unwrap_err();
        assert!(err.message.contains("damaged or truncated"), "{err}");
    }

    #[test]
    fn pdf_named_txt_is_still_a_pdf() {
        let parsed = parse_file(&pdf(&["hello"]), "notes.txt", &Limits::default()).unwrap();
        assert_eq!(parsed.format, Format::Pdf);
        assert_eq!(parsed.text, "hello");
    }

    #[test]
    fn reader_panics_become_errors() {
        // A page without a MediaBox makes pdf-extract panic. Blanking the
        // entry keeps every xref offset valid.
        let bytes = pdf(&["one", "two"]);
        let entry = b"/MediaBox [0 0 612 792]";
        let at = bytes
            .windows(entry.len())
            .rposition(|w| w == entry)
            .unwrap();
        let mut bytes = bytes;
        bytes[at..at + entry.len()].fill(b' ');
        let err = parse_pdf(&bytes).unwrap_err();
        assert!(
            err.message
                .contains("page 2 could not be read (unexpected PDF structure: MediaBox)"),
            "{err}"
        );
    }

    #[test]
    fn text_limit_applies() {
        let bytes = pdf(&["0123456789", "0123456789"]);
        let limits = Limits {
            max_text_bytes: 15,
            ..Limits::default()
        };
        let err = parse_file(&bytes, "a.pdf", &limits).unwrap_err();
        assert!(
            err.message.contains("larger than the 15 bytes limit"),
            "{err}"
        );
    }

    fn encrypted(user_password: &str) -> Vec<u8> {
        use pdf_extract::{EncryptionState, EncryptionVersion, Object, Permissions};
        let mut document = Document::load_mem(&pdf(&["Top secret text"])).unwrap();
        document.trailer.set(
            "ID",
            Object::Array(vec![
                Object::string_literal(b"0123456789abcdef".to_vec()),
                Object::string_literal(b"0123456789abcdef".to_vec()),
            ]),
        );
        let version = EncryptionVersion::V2 {
            document: &document,
            owner_password: "owner",
            user_password,
            key_length: 128,
            permissions: Permissions::all(),
        };
        let state = EncryptionState::try_from(version).unwrap();
        document.encrypt(&state).unwrap();
        let mut bytes = Vec::new();
        document.save_to(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn encrypted_pdfs() {
        let err = parse_pdf(&encrypted("user")).unwrap_err();
        assert!(err.message.contains("password-protected"), "{err}");
        // An empty user password only restricts permissions: readable.
        let parsed = parse_pdf(&encrypted("")).unwrap();
        assert_eq!(parsed.text, "Top secret text");
    }
}
