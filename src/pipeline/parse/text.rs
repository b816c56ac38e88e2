//! Plain text and Markdown: character-encoding detection and decoding.
//!
//! [`decode`] is shared by every text-based format (HTML, CSV and JSON are
//! decoded here too before their own parsing) and is also where we decide
//! that a file is binary rather than text. [`parse`] finishes plain text and
//! Markdown, which are indexed as-is apart from newline normalisation;
//! Markdown stays Markdown because the chunker splits along its structure.
//!
//! The common case, UTF-8, is a single validation pass over borrowed bytes.
//! Legacy encodings are guessed by `chardetng` from a bounded sample, since
//! the guess does not improve with more input but its cost keeps growing.

use std::borrow::Cow;

use chardetng::{EncodingDetector, Iso2022JpDetection, Utf8Detection};
use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8};

use super::{check_text_size, Limits, ParseError};

/// How much input `chardetng` and the binary heuristics look at.
const SAMPLE: usize = 64 * 1024;

/// Text decoded from a file, with the encoding it was decoded from.
pub(super) struct Decoded<'a> {
    pub text: Cow<'a, str>,
    pub encoding: &'static Encoding,
}

/// Decodes `bytes` as text, or explains that the file is binary.
///
/// Order of evidence: a byte-order mark wins; then NUL bytes mean binary
/// (unless they follow the pattern of BOM-less UTF-16); then valid UTF-8;
/// then the legacy encoding `chardetng` guesses, which must decode without
/// errors. Whatever was decoded must not be full of control characters.
pub(super) fn decode(bytes: &[u8]) -> Result<Decoded<'_>, ParseError> {
    let decoded = if let Some((encoding, bom_len)) = Encoding::for_bom(bytes) {
        let body = bytes.get(bom_len..).unwrap_or_default();
        // With a BOM the file told us its encoding; a few bad sequences are
        // more likely damage than binary data, so replace rather than refuse.
        let (text, _had_errors) = encoding.decode_without_bom_handling(body);
        Decoded { text, encoding }
    } else if bytes.contains(&0) {
        let Some(encoding) = bomless_utf16(bytes) else {
            return Err(binary_error());
        };
        let (text, had_errors) = encoding.decode_without_bom_handling(bytes);
        if had_errors {
            return Err(binary_error());
        }
        Decoded { text, encoding }
    } else {
        match std::str::from_utf8(bytes) {
            Ok(text) => Decoded {
                text: Cow::Borrowed(text),
                encoding: UTF_8,
            },
            Err(e) => {
                let encoding = guess_legacy(bytes, e.valid_up_to());
                let text = encoding
                    .decode_without_bom_handling_and_without_replacement(bytes)
                    .ok_or_else(binary_error)?;
                Decoded { text, encoding }
            }
        }
    };
    if looks_binary(&decoded.text) {
        return Err(binary_error());
    }
    Ok(decoded)
}

/// Finishes plain text or Markdown: CRLF and lone CR become LF.
pub(super) fn parse(text: Cow<'_, str>, limits: &Limits) -> Result<String, ParseError> {
    check_text_size(text.len(), limits)?;
    if text.trim().is_empty() {
        return Err(ParseError::new(
            "The file contains only whitespace; there is no text to index.",
        ));
    }
    Ok(normalize_newlines(text).into_owned())
}

/// Rewrites CRLF and lone CR line endings to LF, borrowing when there is
/// nothing to rewrite (the usual case for files from Unix-like systems).
pub(super) fn normalize_newlines(text: Cow<'_, str>) -> Cow<'_, str> {
    if !text.contains('\r') {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_ref();
    while let Some(cr) = rest.find('\r') {
        out.push_str(&rest[..cr]);
        out.push('\n');
        rest = &rest[cr + 1..];
        if let Some(after_lf) = rest.strip_prefix('\n') {
            rest = after_lf;
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

pub(super) fn binary_error() -> ParseError {
    ParseError::new(
        "This is a binary file, not a text document, so there is no text to index. \
         Upload a PDF, Word (.docx), HTML, Markdown, CSV, JSON or plain-text file.",
    )
}

/// Text editors and Windows tools that omit the BOM still produce ASCII
/// characters as a zero byte next to a printable one; binary data with NULs
/// almost never keeps that up for a whole sample.
fn bomless_utf16(bytes: &[u8]) -> Option<&'static Encoding> {
    let sample = &bytes[..bytes.len().min(SAMPLE) & !1];
    let units = sample.len() / 2;
    if units < 2 {
        return None;
    }
    let (mut zero_even, mut zero_odd) = (0usize, 0usize);
    for pair in sample.chunks_exact(2) {
        zero_even += usize::from(pair[0] == 0);
        zero_odd += usize::from(pair[1] == 0);
    }
    let mostly = |n: usize| n * 10 >= units * 3;
    let hardly = |n: usize| n * 50 <= units;
    if mostly(zero_odd) && hardly(zero_even) {
        Some(UTF_16LE)
    } else if mostly(zero_even) && hardly(zero_odd) {
        Some(UTF_16BE)
    } else {
        None
    }
}

/// Guesses the legacy encoding of text that is not valid UTF-8.
///
/// `chardetng` sees the start of the file and, when the first non-UTF-8
/// byte comes later, a window from there: a file can be plain ASCII for its
/// first megabyte and only then show the bytes that identify its encoding.
fn guess_legacy(bytes: &[u8], first_invalid: usize) -> &'static Encoding {
    let mut detector = EncodingDetector::new(Iso2022JpDetection::Deny);
    let head = &bytes[..bytes.len().min(SAMPLE)];
    if first_invalid < head.len() {
        detector.feed(head, true);
    } else {
        detector.feed(head, false);
        // Start the window at a line break so it begins on a character
        // boundary in any ASCII-compatible encoding.
        let from = first_invalid.saturating_sub(1024);
        let from = bytes[from..first_invalid]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(from, |p| from + p + 1);
        let window = &bytes[from..bytes.len().min(from + SAMPLE)];
        detector.feed(window, true);
    }
    detector.guess(None, Utf8Detection::Deny)
}

/// Whether decoded text has the control characters of binary data.
///
/// Tabs, newlines, form feeds and ESC (ANSI colours in logs) are normal in
/// text; other C0/C1 controls are not. Single-byte encodings decode any byte
/// sequence without error, so this is what rejects binary data that happens
/// to contain no NUL bytes.
fn looks_binary(text: &str) -> bool {
    if text.contains('\0') {
        return true;
    }
    let mut chars = 0usize;
    let mut controls = 0usize;
    for c in text.chars().take(SAMPLE) {
        chars += 1;
        let control = matches!(c, '\u{0}'..='\u{8}' | '\u{e}'..='\u{1a}' | '\u{1c}'..='\u{1f}')
            || matches!(c, '\u{7f}'..='\u{9f}');
        controls += usize::from(control);
    }
    // One stray control character in a short file is damage, not binary.
    controls > 2 && controls * 50 > chars
}

#[cfg(test)]
mod tests {
    use super::super::{parse as parse_file, Format, Limits};
    use super::*;

    fn parse_ok(bytes: &[u8], name: &str) -> super::super::Parsed {
        parse_file(bytes, name, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn utf8_with_bom_and_crlf() {
        let parsed = parse_ok(b"\xEF\xBB\xBFline one\r\nline two\rthree\n", "a.txt");
        assert_eq!(parsed.format, Format::Text);
        assert_eq!(parsed.text, "line one\nline two\nthree\n");
        assert_eq!(parsed.encoding, Some("UTF-8"));
    }

    #[test]
    fn utf16_with_bom_both_byte_orders() {
        let text = "Grüße aus Köln\r\nzweite Zeile";
        let mut le = vec![0xFF, 0xFE];
        let mut be = vec![0xFE, 0xFF];
        for unit in text.encode_utf16() {
            le.extend_from_slice(&unit.to_le_bytes());
            be.extend_from_slice(&unit.to_be_bytes());
        }
        let parsed = parse_ok(&le, "notes.txt");
        assert_eq!(parsed.text, "Grüße aus Köln\nzweite Zeile");
        assert_eq!(parsed.encoding, Some("UTF-16LE"));
        let parsed = parse_ok(&be, "notes.txt");
        assert_eq!(parsed.text, "Grüße aus Köln\nzweite Zeile");
        assert_eq!(parsed.encoding, Some("UTF-16BE"));
    }

    #[test]
    fn utf16_without_bom_is_recognised() {
        let text = "Plain ASCII saved by a Windows tool without a byte-order mark.";
        let le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let parsed = parse_ok(&le, "log.txt");
        assert_eq!(parsed.text, text);
        assert_eq!(parsed.encoding, Some("UTF-16LE"));
    }

    #[test]
    fn windows_1252() {
        let (bytes, _, _) = encoding_rs::WINDOWS_1252
            .encode("Café crème – “quoted” naïveté, 5 € and résumé façade déjà vu.\r\n");
        assert!(std::str::from_utf8(&bytes).is_err());
        let parsed = parse_ok(&bytes, "menu.txt");
        assert_eq!(
            parsed.text,
            "Café crème – “quoted” naïveté, 5 € and résumé façade déjà vu.\n"
        );
        assert_eq!(parsed.encoding, Some("windows-1252"));
    }

    #[test]
    fn koi8_r() {
        let russian = "Съешь же ещё этих мягких французских булок, да выпей чаю. \
                       Широкая электрификация южных губерний даст мощный толчок \
                       подъёму сельского хозяйства.";
        let (bytes, _, _) = encoding_rs::KOI8_R.encode(russian);
        let parsed = parse_ok(&bytes, "ru.txt");
        assert_eq!(parsed.text, russian);
        // chardetng answers with KOI8-U, the superset, which decodes
        // Russian identically.
        assert!(parsed.encoding.is_some_and(|e| e.starts_with("KOI8-")));
    }

    #[test]
    fn legacy_bytes_far_from_the_start_are_still_seen() {
        let mut bytes = "plain ascii line\n".repeat(10_000).into_bytes();
        let (tail, _, _) = encoding_rs::WINDOWS_1252.encode("Ça coûte 5 €, déjà payé.");
        bytes.extend_from_slice(&tail);
        let parsed = parse_ok(&bytes, "late.txt");
        assert_eq!(parsed.encoding, Some("windows-1252"));
        assert!(parsed.text.ends_with("Ça coûte 5 €, déjà payé."));
    }

    #[test]
    fn markdown_is_kept_as_markdown() {
        let md = "# Title\r\n\r\nSome *text* with a [link](https://example.com).\r\n";
        let parsed = parse_ok(md.as_bytes(), "README.md");
        assert_eq!(parsed.format, Format::Markdown);
        assert_eq!(
            parsed.text,
            "# Title\n\nSome *text* with a [link](https://example.com).\n"
        );
        assert_eq!(parsed.encoding, Some("UTF-8"));
    }

    #[test]
    fn empty_and_whitespace_files_are_errors() {
        let err = parse_file(b"", "empty.txt", &Limits::default()).unwrap_err();
        assert!(err.message.contains("empty"), "{err}");
        let err = parse_file(b" \r\n\t\n ", "blank.md", &Limits::default()).unwrap_err();
        assert!(err.message.contains("only whitespace"), "{err}");
    }

    #[test]
    fn binary_data_is_refused() {
        // NUL bytes, as in almost every binary format.
        let err = parse_file(b"abc\0\x01\x02def", "data.txt", &Limits::default()).unwrap_err();
        assert!(err.message.contains("binary file"), "{err}");
        // No NULs, not UTF-8, and full of control characters in any
        // single-byte encoding.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .map(|b| if b == 0 { 1 } else { b })
            .collect();
        let err = parse_file(&noise, "noise.txt", &Limits::default()).unwrap_err();
        assert!(err.message.contains("binary file"), "{err}");
    }

    #[test]
    fn a_stray_control_character_is_not_binary() {
        let parsed = parse_ok(b"page one\x0cpage two \x1b[1mbold\x1b[0m \x07", "t.txt");
        assert!(parsed.text.starts_with("page one"));
    }

    #[test]
    fn newline_normalisation_borrows_when_it_can() {
        assert!(matches!(
            normalize_newlines(Cow::Borrowed("a\nb")),
            Cow::Borrowed("a\nb")
        ));
        assert_eq!(
            normalize_newlines(Cow::Borrowed("a\r\n\r\nb\r")),
            "a\n\nb\n"
        );
    }
}
