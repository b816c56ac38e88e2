//! Chunking: extracted text into pieces an embedding model can take whole.
//!
//! Uses `text-splitter`, which splits at the largest semantic boundary that
//! fits (sections, paragraphs, sentences, words), Markdown-aware for
//! Markdown. Sizes are in tokens: counted with the model's own
//! `tokenizer.json` when one is configured, otherwise estimated by
//! [`estimate_tokens`], which is calibrated not to undercount.
//!
//! The chunks of a document are final before any is embedded: no chunk
//! lies wholly inside another, and none is shorter than [`FLOOR`] tokens
//! unless it is the document's only one (a short piece merges into its
//! neighbour). If the model still refuses one as too long, the pipeline
//! chunks the whole document again at a smaller size; a piece is never
//! split on its own.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};
use tokenizers::Tokenizer;

use super::parse::{Format, Parsed};

/// Chunks shorter than this many tokens merge into a neighbour.
pub const FLOOR: usize = 32;

/// One piece of a document, as it will be embedded and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub text: String,
    /// Byte range in the extracted text (`Parsed::text`).
    pub start: usize,
    pub end: usize,
    /// 1-based page of `start`, for PDFs.
    pub page: Option<u32>,
    /// 1-based page of the chunk's last byte, for PDFs: later than `page`
    /// when the chunk spans pages.
    pub page_end: Option<u32>,
}

/// How chunk sizes are measured.
#[derive(Clone)]
pub enum Sizer {
    Estimate,
    Tokenizer(Arc<Tokenizer>),
}

impl Sizer {
    pub fn load(tokenizer: &Path) -> Result<Sizer> {
        if tokenizer.as_os_str().is_empty() {
            return Ok(Sizer::Estimate);
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

    /// Tokens in `text`, as chunking counts them.
    pub fn count(&self, text: &str) -> usize {
        self.size(text)
    }

    /// Names the sizing, for the settings fingerprint stored with chunks.
    pub fn describe(&self) -> String {
        match self {
            Sizer::Estimate => "estimate/2".into(),
            Sizer::Tokenizer(t) => format!("tokenizer/{}", t.get_vocab_size(true)),
        }
    }
}

impl ChunkSizer for Sizer {
    fn size(&self, chunk: &str) -> usize {
        match self {
            Sizer::Estimate => estimate_tokens(chunk),
            Sizer::Tokenizer(t) => t
                .encode_fast(chunk, false)
                .map(|e| e.len())
                // A tokenizer that cannot encode some text still must not
                // stop the job: fall back to the estimate.
                .unwrap_or_else(|_| estimate_tokens(chunk)),
        }
    }
}

/// Tokens in `text` as a WordPiece or BPE model would count them, erring
/// high. Letters count one token per started four after the first, digits
/// one per two plus one per number, every other visible character one
/// (punctuation, symbols, each CJK character), plus 5%.
///
/// Calibrated against all-MiniLM's tokenizer on prose, Rust, Python, SQL,
/// CSV of numbers, Markdown tables, JSON and German: the worst
/// 2,000-character window held at most 1% more tokens than this counts
/// before the margin; prose comes out about a quarter high. The old rule of four
/// characters per token undercounted numbers and tables by up to 2.5x.
pub fn estimate_tokens(text: &str) -> usize {
    // A byte loop. A UTF-8 lead byte from 0xC3 to 0xE1 starts a letter of
    // a Latin, Greek, Cyrillic, Hebrew or Arabic script; a higher one a
    // symbol or CJK character (one token each); continuation bytes are
    // skipped.
    let (mut tokens, mut letters, mut digits) = (0usize, 0usize, 0usize);
    let word = |n: usize| if n == 0 { 0 } else { (n - 1) / 4 + 1 };
    let number = |n: usize| if n == 0 { 0 } else { n / 2 + 1 };
    for &b in text.as_bytes() {
        if b.is_ascii_alphabetic() || (0xC3..0xE2).contains(&b) {
            tokens += number(digits);
            digits = 0;
            letters += 1;
        } else if b.is_ascii_digit() {
            tokens += word(letters);
            letters = 0;
            digits += 1;
        } else if (0x80..0xC0).contains(&b) {
            // Inside a multi-byte character already counted.
        } else {
            tokens += word(letters) + number(digits);
            (letters, digits) = (0, 0);
            if !b.is_ascii_whitespace() {
                tokens += 1;
            }
        }
    }
    tokens += word(letters) + number(digits);
    tokens + tokens.div_ceil(20)
}

#[derive(Clone)]
pub struct Chunker {
    pub sizer: Sizer,
    /// In tokens.
    pub size: usize,
    pub overlap: usize,
}

impl Chunker {
    /// Splits `parsed.text` into the document's final chunks, each at most
    /// `limit` tokens (the configured size, lowered to the model's context
    /// length or by a re-chunk): in order, none inside another, none under
    /// [`FLOOR`] tokens unless it is the only one.
    pub fn chunk(&self, parsed: &Parsed, limit: usize) -> Vec<Chunk> {
        let markdown = parsed.format == Format::Markdown;
        let chunks = self.split(&parsed.text, 0, limit, markdown);
        let chunks = drop_nested(chunks);
        // Again after merging: a merge split into halves can leave a
        // chunk inside its neighbour too (seen once in R's manuals, counted
        // with the model's tokenizer).
        drop_nested(self.merge_fragments(&parsed.text, chunks, limit))
            .into_iter()
            .map(|mut c| {
                c.page = parsed.page_at(c.start);
                c.page_end = parsed.page_at(c.end.saturating_sub(1).max(c.start));
                c
            })
            .collect()
    }

    /// Merges every chunk under [`FLOOR`] tokens (a quarter of the capacity
    /// if that is less) into its neighbour (the one before; the one after
    /// for the first). A merge that would pass
    /// the capacity is split again into two balanced halves instead.
    fn merge_fragments(&self, text: &str, chunks: Vec<Chunk>, limit: usize) -> Vec<Chunk> {
        let capacity = self.size.min(limit).max(1);
        // With a very small configured size, a quarter of it.
        let floor = FLOOR.min(capacity / 4);
        let mut out: Vec<Chunk> = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let Some(last) = out.last() else {
                out.push(chunk);
                continue;
            };
            if self.sizer.size(&chunk.text) >= floor && self.sizer.size(&last.text) >= floor {
                out.push(chunk);
                continue;
            }
            let last = out.pop().expect("a last chunk");
            let end = chunk.end.max(last.end);
            let span = Chunk {
                text: text[last.start..end].to_string(),
                start: last.start,
                end,
                page: None,
                page_end: None,
            };
            let size = self.sizer.size(&span.text);
            if size <= capacity {
                out.push(span);
                continue;
            }
            let halves = self.split(&span.text, span.start, size.div_ceil(2) + 1, false);
            if halves.len() >= 2 && halves.iter().all(|h| self.sizer.size(&h.text) >= floor) {
                out.extend(halves);
            } else {
                // No balanced split (one long run of text): keep the two.
                out.push(last);
                out.push(chunk);
            }
        }
        out
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
                page_end: None,
            }));
        }
        chunks
    }
}

/// Drops every chunk that lies wholly inside another (text-splitter's
/// overlap can yield one at a segment's end). `chunks` are in order.
fn drop_nested(chunks: Vec<Chunk>) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        if out
            .last()
            .is_some_and(|l| l.start <= chunk.start && chunk.end <= l.end)
        {
            continue;
        }
        while out
            .last()
            .is_some_and(|l| chunk.start <= l.start && l.end <= chunk.end)
        {
            out.pop();
        }
        out.push(chunk);
    }
    out
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
            sizer: Sizer::Estimate,
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
            assert!(estimate_tokens(&c.text) <= 50, "{}", c.text.len());
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
            assert!(estimate_tokens(&c.text) <= 100);
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
    fn the_estimate_counts_numbers_and_symbols_high() {
        // Words: one token per started four letters after the first.
        assert_eq!(estimate_tokens("the cat"), 2 + 1);
        // Digits: one per two plus one; each symbol one; 5% on top.
        let table = "| 3.14159 | 2,718.28 | -42 |";
        assert!(estimate_tokens(table) >= 20, "{}", estimate_tokens(table));
        assert!(estimate_tokens(table) > table.len().div_ceil(4) * 2);
    }

    #[test]
    fn a_chunk_that_spans_pages_says_so() {
        use crate::pipeline::parse::Page;
        let page = "Words on a page of a manual, one sentence after another. ".repeat(4);
        // A paragraph that runs on over the page breaks, as in most books.
        let text = format!("{page} {page} {page}");
        let second = page.len() + 1;
        let third = 2 * (page.len() + 1);
        let pdf = Parsed {
            format: Format::Pdf,
            text: text.clone(),
            pages: vec![
                Page {
                    start: 0,
                    number: 1,
                },
                Page {
                    start: second,
                    number: 2,
                },
                Page {
                    start: third,
                    number: 3,
                },
            ],
            encoding: None,
        };
        let chunks = chunker(150, 0).chunk(&pdf, 10_000);
        assert!(chunks.len() >= 2, "{chunks:#?}");
        assert_eq!(chunks[0].page, Some(1));
        assert!(
            chunks.iter().any(|c| c.page_end > c.page),
            "no chunk spans two pages: {chunks:#?}"
        );
        for c in &chunks {
            assert_eq!(c.page, pdf.page_at(c.start));
            assert_eq!(c.page_end, pdf.page_at(c.end - 1));
        }
        assert_eq!(chunks.last().unwrap().page_end, Some(3));
    }

    #[test]
    fn no_chunk_lies_inside_another() {
        let c = |start: usize, end: usize| Chunk {
            text: "x".repeat(end - start),
            start,
            end,
            page: None,
            page_end: None,
        };
        let kept = drop_nested(vec![c(0, 10), c(5, 10), c(8, 20), c(8, 30), c(25, 40)]);
        assert_eq!(
            kept.iter().map(|k| (k.start, k.end)).collect::<Vec<_>>(),
            vec![(0, 10), (8, 30), (25, 40)]
        );
    }

    #[test]
    fn short_pieces_merge_into_a_neighbour() {
        let text = format!(
            "Tiny.\n\n{}\n\n{}\n\nThe end.",
            "A long paragraph of plain words that goes on. ".repeat(12),
            "Another paragraph of plain words follows here. ".repeat(12)
        );
        let chunks = chunker(200, 0).chunk(&parsed(Format::Text, &text), 10_000);
        assert!(chunks.len() >= 2, "{chunks:#?}");
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
            assert!(estimate_tokens(&c.text) >= FLOOR, "{:?}", c.text);
            assert!(estimate_tokens(&c.text) <= 200, "{:?}", c.text);
        }
        assert!(chunks[0].text.starts_with("Tiny."));
        assert!(chunks.last().unwrap().text.ends_with("The end."));
        // The only chunk of a short document stays, however short.
        let only = chunker(200, 0).chunk(&parsed(Format::Text, "Hi."), 10_000);
        assert_eq!(only.len(), 1);
    }
}

#[cfg(test)]
mod nesting {
    use super::*;
    use crate::pipeline::parse::{Format, Parsed};
    use rand::{Rng, SeedableRng};

    /// Text of paragraphs and code-like lines of every length, like the
    /// manual where a merged fragment's re-split left a chunk inside its
    /// neighbour.
    fn mixed_text(rng: &mut rand::rngs::StdRng) -> String {
        let words = [
            "seconds", "time", "Rprof", "spent", "in", "function", "and", "callees", "x", "<-",
            "(b*c)", "0.02",
        ];
        let mut text = String::new();
        for _ in 0..rng.gen_range(20..80) {
            let lines = rng.gen_range(1..6);
            for _ in 0..lines {
                let n = rng.gen_range(1..40);
                let line: Vec<&str> = (0..n)
                    .map(|_| words[rng.gen_range(0..words.len())])
                    .collect();
                text.push_str(&line.join(" "));
                text.push('\n');
            }
            text.push('\n');
        }
        text
    }

    #[test]
    fn no_chunk_of_a_real_mix_lies_inside_another() {
        for seed in 0..300 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let text = mixed_text(&mut rng);
            let size = rng.gen_range(40..200);
            let chunker = Chunker {
                sizer: Sizer::Estimate,
                size,
                overlap: size / 10,
            };
            let parsed = Parsed {
                format: Format::Text,
                text: text.clone(),
                pages: Vec::new(),
                encoding: None,
            };
            let chunks = chunker.chunk(&parsed, usize::MAX);
            for pair in chunks.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                assert!(
                    !(a.start <= b.start && b.end <= a.end || b.start <= a.start && a.end <= b.end),
                    "seed {seed}, size {size}: {}..{} and {}..{} nest",
                    a.start,
                    a.end,
                    b.start,
                    b.end
                );
            }
        }
    }
}
