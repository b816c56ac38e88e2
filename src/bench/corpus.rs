//! The generated corpus of `worker bench-pipeline`: deterministic,
//! vaguely English prose in every format the parser reads, and PDFs and
//! .docx files built from it by [`crate::samples`].

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::samples;

/// `n` documents of about `bytes` each, plain text and Markdown alternating.
pub(crate) fn text_docs(gen: &mut Prose, n: usize, bytes: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                (format!("doc-{i:04}.txt"), gen.text(bytes).into_bytes())
            } else {
                (format!("doc-{i:04}.md"), gen.markdown(bytes).into_bytes())
            }
        })
        .collect()
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "system",
    "document",
    "process",
    "between",
    "information",
    "government",
    "development",
    "important",
    "however",
    "because",
    "through",
    "research",
    "different",
    "following",
    "example",
    "management",
    "analysis",
    "available",
    "particular",
    "education",
    "experience",
    "community",
    "energy",
    "measurement",
    "temperature",
    "agreement",
    "contract",
    "customer",
    "invoice",
    "quarterly",
    "revenue",
    "shipment",
    "warehouse",
    "pipeline",
    "network",
    "database",
    "protocol",
    "patient",
    "treatment",
    "clinical",
    "evidence",
    "vaccine",
    "antibody",
    "immune",
    "river",
    "mountain",
    "harbour",
    "village",
    "century",
    "emperor",
    "treaty",
    "café",
    "naïve",
    "Zürich",
    "façade",
    "résumé",
    "approximately",
    "notwithstanding",
    "responsibilities",
    "characteristics",
    "2024",
    "17",
    "3.5",
    "42%",
    "(see",
    "below)",
    "e.g.",
    "i.e.",
    "US$",
    "well-known",
];

/// Deterministic, vaguely English prose in the formats the parser reads.
pub(crate) struct Prose {
    pub(crate) rng: StdRng,
}

impl Prose {
    pub(crate) fn new(seed: u64) -> Prose {
        Prose {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub(crate) fn word(&mut self) -> &'static str {
        // Short words are common: bias towards the start of the list.
        let a = self.rng.gen_range(0..WORDS.len());
        let b = self.rng.gen_range(0..WORDS.len());
        WORDS[a.min(b)]
    }

    pub(crate) fn words(&mut self, n: usize) -> String {
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(self.word());
        }
        s
    }

    pub(crate) fn sentence(&mut self) -> String {
        let n = self.rng.gen_range(6..24);
        let mut s = self.words(n);
        if let Some(first) = s.get(..1) {
            let upper = first.to_uppercase();
            s.replace_range(..1, &upper);
        }
        s.push(if self.rng.gen_ratio(1, 10) { '?' } else { '.' });
        s
    }

    pub(crate) fn paragraph(&mut self) -> String {
        let n = self.rng.gen_range(2..8);
        (0..n)
            .map(|_| self.sentence())
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub(crate) fn text(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        while out.len() < bytes {
            out.push_str(&self.paragraph());
            out.push_str("\n\n");
        }
        out
    }

    pub(crate) fn markdown(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        let mut section = 0;
        while out.len() < bytes {
            section += 1;
            let level = if section % 5 == 1 { "#" } else { "##" };
            let n = self.rng.gen_range(2..7);
            out.push_str(&format!("{level} {section}. {}\n\n", self.words(n)));
            for _ in 0..self.rng.gen_range(1..5) {
                match self.rng.gen_range(0..10) {
                    0 | 1 => {
                        for _ in 0..self.rng.gen_range(2..6) {
                            out.push_str(&format!("- {}\n", self.sentence()));
                        }
                        out.push('\n');
                    }
                    2 => {
                        out.push_str("```rust\n");
                        for i in 0..self.rng.gen_range(2..8) {
                            out.push_str(&format!(
                                "let value_{i} = compute({i}, \"{}\");\n",
                                self.word()
                            ));
                        }
                        out.push_str("```\n\n");
                    }
                    3 => {
                        out.push_str("| item | amount | note |\n| --- | ---: | --- |\n");
                        for i in 0..self.rng.gen_range(2..6) {
                            let note = self.words(4);
                            out.push_str(&format!("| {} | {} | {note} |\n", self.word(), i * 17));
                        }
                        out.push('\n');
                    }
                    _ => {
                        let p = self.paragraph();
                        out.push_str(
                            &p.replacen(" the ", " **the** ", 1)
                                .replacen(" of ", " *of* ", 1),
                        );
                        out.push_str("\n\n");
                    }
                }
            }
        }
        out
    }

    pub(crate) fn html(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        out.push_str(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Generated report</title>\n\
             <style>body { font-family: sans-serif; } .note { color: #555; }</style>\n\
             <script>window.analytics = { id: 42, track: function (e) { return e; } };</script>\n\
             </head><body>\n<nav><a href=\"/\">Home</a> | <a href=\"/docs\">Docs</a></nav>\n<main>\n",
        );
        let mut section = 0;
        while out.len() < bytes {
            section += 1;
            let n = self.rng.gen_range(2..7);
            out.push_str(&format!("<h2 id=\"s{section}\">{}</h2>\n", self.words(n)));
            for _ in 0..self.rng.gen_range(1..5) {
                if self.rng.gen_ratio(1, 5) {
                    out.push_str("<ul>\n");
                    for _ in 0..self.rng.gen_range(2..6) {
                        out.push_str(&format!("  <li>{}</li>\n", self.sentence()));
                    }
                    out.push_str("</ul>\n");
                } else {
                    let p = self.paragraph();
                    let p = p
                        .replacen(" the ", " <b>the</b> ", 1)
                        .replacen(" of ", " <a href=\"#top\">of</a> ", 1)
                        .replace('&', "&amp;");
                    out.push_str(&format!("<p class=\"note\">{p}</p>\n"));
                }
            }
        }
        out.push_str("</main>\n<footer>&copy; 2024 Example Ltd.</footer>\n</body></html>\n");
        out
    }

    pub(crate) fn csv(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes + 2000);
        out.push_str("id,customer,category,description,amount,date\n");
        let mut id = 0;
        while out.len() < bytes {
            id += 1;
            let description = self.sentence().replace('"', "\"\"");
            let customer = self.words(2);
            let category = self.word();
            out.push_str(&format!(
                "{id},{customer},{category},\"{description}, {}\",{}.{:02},2024-{:02}-{:02}\n",
                self.word(),
                self.rng.gen_range(1..100_000),
                self.rng.gen_range(0..100),
                self.rng.gen_range(1..13),
                self.rng.gen_range(1..29)
            ));
        }
        out
    }

    pub(crate) fn json(&mut self, bytes: usize) -> String {
        let mut items = Vec::new();
        let mut len = 0;
        while len < bytes {
            let n = self.rng.gen_range(2..6);
            let item = serde_json::json!({
                "id": items.len(),
                "title": self.words(n),
                "body": self.paragraph(),
                "tags": [self.word(), self.word()],
                "meta": {"author": self.words(2), "year": self.rng.gen_range(1990..2025), "draft": false},
            });
            let text = serde_json::to_string_pretty(&item).expect("json");
            len += text.len() + 2;
            items.push(item);
        }
        serde_json::to_string_pretty(&items).expect("json")
    }

    /// A .docx whose text is about `bytes`.
    pub(crate) fn docx(&mut self, bytes: usize) -> Vec<u8> {
        let mut paragraphs = Vec::new();
        let mut len = 0;
        while len < bytes {
            let p = self.paragraph();
            len += p.len() + 2;
            paragraphs.push(p);
        }
        let refs: Vec<&str> = paragraphs.iter().map(String::as_str).collect();
        samples::docx(&refs)
    }

    /// One page's worth of text: 46 lines of at most 80 characters, as a
    /// 12 pt page holds.
    pub(crate) fn page(&mut self) -> String {
        let mut lines: Vec<String> = Vec::new();
        let mut line = String::new();
        while lines.len() < 46 {
            let word = self.word();
            if line.len() + word.len() + 1 > 80 {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.join("\n")
    }

    pub(crate) fn pdf_pages(&mut self, pages: usize) -> Vec<u8> {
        let pages: Vec<String> = (0..pages).map(|_| self.page()).collect();
        let refs: Vec<&str> = pages.iter().map(String::as_str).collect();
        samples::pdf(&refs)
    }

    /// A PDF of about `bytes`.
    pub(crate) fn pdf_bytes(&mut self, bytes: usize) -> Vec<u8> {
        // Measure one page's cost in the file, then make that many.
        let probe = self.pdf_pages(20).len();
        let pages = (bytes * 20 / probe).max(1);
        self.pdf_pages(pages)
    }
}
