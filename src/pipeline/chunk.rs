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
        let make = |(offset, piece): (usize, &str)| Chunk {
            text: piece.to_string(),
            start: base + offset,
            end: base + offset + piece.len(),
            page: None,
        };
        if markdown {
            MarkdownSplitter::new(config)
                .chunk_indices(text)
                .map(make)
                .collect()
        } else {
            TextSplitter::new(config)
                .chunk_indices(text)
                .map(make)
                .collect()
        }
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
