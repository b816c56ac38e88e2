//! Chunking: extracted text into pieces an embedding model can take whole.
//!
//! Uses `text-splitter`, which splits at the largest semantic boundary that
//! fits (sections, paragraphs, sentences, words), Markdown-aware for
//! Markdown. Sizes are in tokens: counted with the model's own
//! `tokenizer.json` when one is configured, otherwise estimated as
//! [`CHARS_PER_TOKEN`] characters per token.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};
use tokenizers::Tokenizer;

use super::parse::{Format, Parsed};

/// The estimate used without a tokenizer: about right for English text with
/// BERT-style and nomic tokenizers, and on the safe side for most prose.
pub const CHARS_PER_TOKEN: usize = 4;

/// One piece of a document, as it will be embedded and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    /// Byte range in the extracted text (`Parsed::text`).
    pub start: usize,
    pub end: usize,
    /// 1-based page of `start`, for PDFs.
    pub page: Option<u32>,
}

/// How chunk sizes are measured.
#[derive(Clone)]
pub enum Sizer {
    Characters,
    Tokenizer(Arc<Tokenizer>),
}

impl Sizer {
    pub fn load(tokenizer: &Path) -> Result<Sizer> {
        if tokenizer.as_os_str().is_empty() {
            return Ok(Sizer::Characters);
        }
        let mut t = Tokenizer::from_file(tokenizer)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading chunk.tokenizer {}", tokenizer.display()))?;
        // A model's tokenizer.json often truncates and pads to the model's
        // input length (sentence-transformers' all-MiniLM: 128). Counting
        // with that on, every text is that many tokens long, so nothing
        // would ever be split: count every token of the text itself.
        t.with_truncation(None)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading chunk.tokenizer {}", tokenizer.display()))?;
        t.with_padding(None);
        Ok(Sizer::Tokenizer(Arc::new(t)))
    }

    /// Names the sizing, for the settings fingerprint stored with chunks.
    pub fn describe(&self) -> String {
        match self {
            Sizer::Characters => format!("chars/{CHARS_PER_TOKEN}"),
            Sizer::Tokenizer(t) => format!("tokenizer/{}", t.get_vocab_size(true)),
        }
    }
}

impl ChunkSizer for Sizer {
    fn size(&self, chunk: &str) -> usize {
        match self {
            Sizer::Characters => chunk.chars().count().div_ceil(CHARS_PER_TOKEN),
            Sizer::Tokenizer(t) => t
                .encode_fast(chunk, false)
                .map(|e| e.len())
                // A tokenizer that cannot encode some text still must not
                // stop the job: fall back to the estimate.
                .unwrap_or_else(|_| chunk.chars().count().div_ceil(CHARS_PER_TOKEN)),
        }
    }
}

#[derive(Clone)]
pub struct Chunker {
    pub sizer: Sizer,
    /// In tokens.
    pub size: usize,
    pub overlap: usize,
}

impl Chunker {
    /// Splits `parsed.text` into chunks of at most `limit` tokens (the
    /// configured size, lowered to the model's context length).
    pub fn chunk(&self, parsed: &Parsed, limit: usize) -> Vec<Chunk> {
        let markdown = parsed.format == Format::Markdown;
        self.split(&parsed.text, 0, limit, markdown)
            .into_iter()
            .map(|mut c| {
                c.page = parsed.page_at(c.start);
                c
            })
            .collect()
    }

    /// Splits one chunk that the model refused as too long into smaller
    /// ones, keeping byte ranges and page.
    pub fn split_again(&self, chunk: &Chunk, limit: usize) -> Vec<Chunk> {
        let smaller = (self.sizer.size(&chunk.text) / 2).clamp(1, limit.max(1));
        let mut parts = self.split(&chunk.text, chunk.start, smaller, false);
        if parts.len() < 2 {
            // Nothing to split at (one huge "word"): cut it in half at a
            // character boundary rather than loop.
            let mut mid = chunk.text.len() / 2;
            while !chunk.text.is_char_boundary(mid) {
                mid += 1;
            }
            parts = [(0, mid), (mid, chunk.text.len())]
                .into_iter()
                .filter(|(a, b)| b > a)
                .map(|(a, b)| Chunk {
                    text: chunk.text[a..b].to_string(),
                    start: chunk.start + a,
                    end: chunk.start + b,
                    page: None,
                })
                .collect();
        }
        for p in &mut parts {
            p.page = chunk.page;
        }
        parts
    }

    fn split(&self, text: &str, base: usize, limit: usize, markdown: bool) -> Vec<Chunk> {
        let capacity = self.size.min(limit).max(1);
        // Overlap scales down with the capacity and must stay below it.
        let overlap = (self.overlap * capacity / self.size.max(1)).min(capacity.saturating_sub(1));
        let config = ChunkConfig::new(capacity)
            .with_sizer(&self.sizer)
            .with_overlap(overlap)
            .expect("overlap is below capacity");
        let mut chunks = Vec::new();
        let markdown_splitter;
        let text_splitter;
        let split: &dyn Fn(&str) -> Vec<(usize, &str)> = if markdown {
            markdown_splitter = MarkdownSplitter::new(config);
            &|segment| markdown_splitter.chunk_indices(segment).collect()
        } else {
            text_splitter = TextSplitter::new(config);
            &|segment| text_splitter.chunk_indices(segment).collect()
        };
        for (at, segment) in segments(text, SEGMENT_BYTES, markdown) {
            chunks.extend(split(segment).into_iter().map(|(offset, piece)| Chunk {
                text: piece.to_string(),
                start: base + at + offset,
                end: base + at + offset + piece.len(),
                page: None,
            }));
        }
        chunks
    }
}

/// Texts longer than this are chunked in segments of about this many bytes.
/// text-splitter looks through every semantic boundary of the rest of the
/// text for each chunk it makes, so its time grows with the square of the
/// text's length (a 4 MB Markdown file: about 1 s, a 40 MB one: over a minute).
/// Segments keep it linear (measured on generated 4 MB files: Markdown 5 to
/// 120 MB/s, plain text 145 to 820 MB/s). A chunk never spans two segments
/// and the overlap is not carried across: about one chunk boundary in a
/// hundred is placed at a paragraph break where text-splitter would have
/// merged across it, so a text gets about 1% more chunks.
const SEGMENT_BYTES: usize = 64 * 1024;

/// Cuts `text` into pieces of at least `target` bytes (the last one may be
/// shorter, the others are at most twice as long), each with its byte
/// offset. Cuts are made at the start of a line after a blank line
/// (Markdown: preferably one that starts a heading, and never inside a
/// fenced code block), else after a line break, else after whitespace,
/// else at a character boundary.
fn segments(text: &str, target: usize, markdown: bool) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_fence: Option<(u8, usize)> = None;
    let mut line_start = 0;
    while text.len() - start > target.saturating_mul(2) {
        let from = char_boundary(text, start + target);
        let to = char_boundary(text, start + 2 * target);
        // Lines after `from` that follow a blank line, and any line.
        let (mut blank, mut newline) = (None, None);
        let mut cut = None;
        let mut previous_blank = false;
        while line_start < to {
            let end = text[line_start..]
                .find('\n')
                .map_or(text.len(), |i| line_start + i + 1);
            let line = &text[line_start..end];
            let is_blank = line.trim().is_empty();
            if line_start >= from && in_fence.is_none() {
                if previous_blank && !is_blank {
                    if !markdown || line.starts_with('#') {
                        cut = Some(line_start);
                        break;
                    }
                    blank.get_or_insert(line_start);
                }
                newline.get_or_insert(line_start);
            }
            if markdown {
                in_fence = fence(line, in_fence);
            }
            previous_blank = is_blank;
            line_start = end;
        }
        let cut = cut.or(blank).or(newline).or_else(|| {
            if markdown && in_fence.is_some() {
                // A code block longer than a segment: cut it at a line.
                text[from..to].find('\n').map(|i| from + i + 1)
            } else {
                None
            }
        });
        let cut = cut.unwrap_or_else(|| {
            text[from..to]
                .find(char::is_whitespace)
                .map_or(from, |i| char_boundary(text, from + i + 1))
        });
        out.push((start, &text[start..cut]));
        start = cut;
        if line_start != start {
            // The scan went past the cut: go on from the cut, which is
            // outside any code block (or a code block is cut: rare).
            line_start = start;
            in_fence = None;
        }
    }
    out.push((start, &text[start..]));
    out
}

/// The first character boundary at or after `i`.
fn char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// The fenced-code-block state after `line`: `Some((fence char, fence
/// length))` inside a block opened by ``` or ~~~ (CommonMark: at most three
/// spaces of indentation; the closing fence is at least as long).
fn fence(line: &str, open: Option<(u8, usize)>) -> Option<(u8, usize)> {
    let trimmed = line.trim_start_matches(' ');
    if line.len() - trimmed.len() > 3 {
        return open;
    }
    let bytes = trimmed.as_bytes();
    let Some(&c) = bytes.first().filter(|c| **c == b'`' || **c == b'~') else {
        return open;
    };
    let n = bytes.iter().take_while(|b| **b == c).count();
    if n < 3 {
        return open;
    }
    match open {
        None => Some((c, n)),
        Some((oc, on)) if oc == c && n >= on && trimmed[n..].trim().is_empty() => None,
        Some(_) => open,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(format: Format, text: &str) -> Parsed {
        Parsed {
            format,
            text: text.to_string(),
            pages: Vec::new(),
            encoding: None,
        }
    }

    fn chunker(size: usize, overlap: usize) -> Chunker {
        Chunker {
            sizer: Sizer::Characters,
            size,
            overlap,
        }
    }

    #[test]
    fn chunks_keep_their_byte_ranges_and_respect_the_size() {
        let text = "The cat sat on the mat. It was warm there. ".repeat(200);
        let chunks = chunker(50, 5).chunk(&parsed(Format::Text, &text), 10_000);
        assert!(chunks.len() > 5);
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
            assert!(
                c.text.chars().count() <= 50 * CHARS_PER_TOKEN,
                "{}",
                c.text.len()
            );
        }
    }

    #[test]
    fn the_context_length_lowers_the_size() {
        let text = "word ".repeat(2000);
        let big = chunker(500, 50).chunk(&parsed(Format::Text, &text), 10_000);
        let small = chunker(500, 50).chunk(&parsed(Format::Text, &text), 100);
        assert!(
            small.len() > big.len() * 3,
            "{} vs {}",
            small.len(),
            big.len()
        );
    }

    #[test]
    fn a_tokenizer_that_truncates_and_pads_still_counts_every_token() {
        let json = r#"{
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0},
            "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
            "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2}, "unk_token": "[UNK]"}
        }"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let sizer = Sizer::load(&path).unwrap();
        assert_eq!(sizer.size("a"), 1);
        assert_eq!(sizer.size(&"a ".repeat(10)), 10);
        let chunks = Chunker {
            sizer,
            size: 5,
            overlap: 0,
        }
        .chunk(&parsed(Format::Text, &"a ".repeat(20)), 10_000);
        assert_eq!(chunks.len(), 4);
    }

    #[test]
    fn long_texts_are_chunked_in_segments_that_keep_ranges_and_sizes() {
        let paragraph = "The cat sat on the mat. It was warm there, and quiet.\n\n";
        let text = paragraph.repeat(3 * SEGMENT_BYTES / paragraph.len());
        let chunks = chunker(100, 10).chunk(&parsed(Format::Text, &text), 10_000);
        let mut covered = 0;
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
            assert!(c.text.chars().count() <= 100 * CHARS_PER_TOKEN);
            let gap = text.get(covered..c.start).unwrap_or_default();
            assert!(gap.trim().is_empty(), "text missed before {}", c.start);
            covered = covered.max(c.end);
        }
        assert_eq!(covered, text.trim_end().len());
        // Cuts cost at most a chunk or so per segment.
        let whole = TextSplitter::new(ChunkConfig::new(100).with_overlap(10).unwrap())
            .chunks(&text)
            .count();
        assert!(chunks.len() <= whole + 4, "{} vs {whole}", chunks.len());
    }

    #[test]
    fn segments_are_contiguous_and_cut_markdown_outside_code_blocks() {
        let mut text = String::new();
        let mut n = 0;
        while text.len() < 5 * SEGMENT_BYTES {
            n += 1;
            text.push_str(&format!("## Section {n}\n\nSome words here.\n\n"));
            if n % 7 == 0 {
                text.push_str("```\n");
                for i in 0..400 {
                    text.push_str(&format!("let x{i} = {i};\n\n# not a heading\n\n"));
                }
                text.push_str("```\n\n");
            }
        }
        let parts = segments(&text, SEGMENT_BYTES, true);
        assert!(parts.len() >= 3);
        let mut at = 0;
        for (i, (offset, part)) in parts.iter().enumerate() {
            assert_eq!(*offset, at);
            at += part.len();
            if i > 0 {
                assert!(part.starts_with("## Section"), "{:?}", &part[..40]);
            }
        }
        assert_eq!(at, text.len());

        let short = "# Title\n\nshort text";
        assert_eq!(segments(short, SEGMENT_BYTES, true), vec![(0, short)]);
        let unbroken = "é".repeat(3 * SEGMENT_BYTES);
        let parts = segments(&unbroken, SEGMENT_BYTES, false);
        assert_eq!(
            parts.iter().map(|(_, p)| p.len()).sum::<usize>(),
            unbroken.len()
        );
    }

    #[test]
    fn split_again_halves_and_keeps_ranges() {
        let text = "alpha beta gamma delta. ".repeat(40);
        let c = Chunk {
            text: text.clone(),
            start: 100,
            end: 100 + text.len(),
            page: Some(3),
        };
        let parts = chunker(500, 50).split_again(&c, 1000);
        assert!(parts.len() >= 2);
        for p in &parts {
            assert_eq!(&text[p.start - 100..p.end - 100], p.text);
            assert_eq!(p.page, Some(3));
        }
        let word = Chunk {
            text: "x".repeat(1000),
            start: 0,
            end: 1000,
            page: None,
        };
        let parts = chunker(500, 50).split_again(&word, 1000);
        assert!(parts.len() >= 2);
    }
}
