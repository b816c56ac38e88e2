//! Reading order for one PDF page: the glyphs a content stream draws, put
//! back in the order a person reads them.
//!
//! A content stream may draw text in any order. Most generators draw a
//! two-column page column by column, but some draw it line by line across
//! both columns, and then text taken in stream order interleaves the
//! columns ("left line 1, right line 1, left line 2, ..."), which ruins
//! every chunk of the page. So the page's text is rebuilt from positions:
//!
//! 1. Glyphs become *segments*: runs of text on one baseline, in stream
//!    order, split where the pen jumps to another line or leaps a gap wider
//!    than [`SPLIT`] ems (a column gutter, never a word space).
//! 2. The page is cut recursively, X-Y cut style, at the widest empty band:
//!    a vertical band (a gutter) splits the region into columns read left to
//!    right; a horizontal one into bands read top to bottom. A vertical cut
//!    needs prose on both sides ([`PROSE_CHARS`]): table columns are read
//!    row by row, not column by column.
//! 3. The lines are joined: a blank line where a column or a paragraph
//!    ends (a baseline step of more than 1.5 ems, as `pdf-extract`'s own
//!    plain-text output does), a word broken with a hyphen at a line end is
//!    joined again, and blank lines never run to more than one.
//!
//! A compound word that happens to break at its own hyphen ("well-" /
//! "known") is joined too ("wellknown"): without a dictionary the two cannot
//! be told apart, and split words are far more common at line ends.
//!
//! Memory: one page's glyphs at a time; the page's text is handed on and
//! the glyphs dropped.

use pdf_extract::{MediaBox, Transform};

/// The gap, in ems, that ends a segment on the same baseline. Word spaces
/// stay under it even in loose justified lines; column gutters (LaTeX's
/// default is 1 em at 10 pt) do not.
const SPLIT: f64 = 0.8;

/// A side of a vertical cut must read like prose: its segments this many
/// characters long on average. Table cells are shorter; a column's lines
/// are 30 and more.
const PROSE_CHARS: usize = 15;

/// Pages with more segments than this keep stream order (the cut is
/// quadratic in the worst case; no real page comes near it).
const MAX_SEGMENTS: usize = 20_000;

/// Cuts nest no deeper than this; below, a region is read line by line.
/// A real page needs a few levels (page, columns, paragraphs, lines); a
/// hostile one could otherwise recurse once per line and overflow the
/// stack of the thread parsing it.
const MAX_DEPTH: usize = 64;

/// A run of text on one baseline.
#[derive(Debug, Clone)]
struct Segment {
    x0: f64,
    x1: f64,
    /// Baseline, in page units from the top.
    y: f64,
    /// The largest glyph size in the run.
    size: f64,
    text: String,
}

impl Segment {
    fn top(&self) -> f64 {
        self.y - 0.7 * self.size
    }

    fn bottom(&self) -> f64 {
        self.y + 0.1 * self.size
    }
}

/// Collects one page's glyphs as `pdf-extract` reports them.
pub(super) struct PageLayout {
    /// The page's height: y is flipped to run top-down, as in
    /// `pdf-extract`'s own output.
    height: f64,
    segments: Vec<Segment>,
    /// Set at the start of each text-showing operation: only there can the
    /// pen have jumped.
    first_char: bool,
    last_end: f64,
    last_y: f64,
    /// Text bytes collected so far, for the caller's text limit.
    bytes: usize,
}

impl PageLayout {
    pub(super) fn new(media_box: &MediaBox) -> Self {
        PageLayout {
            height: media_box.ury - media_box.lly,
            segments: Vec::new(),
            first_char: true,
            last_end: 0.0,
            last_y: 0.0,
            bytes: 0,
        }
    }

    /// Text bytes collected on this page so far.
    pub(super) fn text_bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn begin_word(&mut self) {
        self.first_char = true;
    }

    pub(super) fn character(&mut self, trm: &Transform, width: f64, font_size: f64, ch: &str) {
        // The glyph's origin, and its size as the side of a square of the
        // area its scaled em box covers (as `pdf-extract` measures it).
        let (x, y) = (trm.m31, self.height - trm.m32);
        let scaled_x = font_size * (trm.m11 + trm.m21);
        let scaled_y = font_size * (trm.m12 + trm.m22);
        let size = (scaled_x * scaled_y).abs().sqrt();
        if !(x.is_finite() && y.is_finite() && size.is_finite()) || ch.is_empty() {
            return;
        }
        let size = size.max(0.1);
        let jumped = match self.segments.last() {
            None => true,
            Some(segment) => {
                self.first_char
                    && ((y - self.last_y).abs() > 0.5 * size.max(segment.size)
                        || x < self.last_end - 0.5 * size
                        || x > self.last_end + SPLIT * size)
            }
        };
        if jumped {
            self.segments.push(Segment {
                x0: x,
                x1: x,
                y,
                size,
                text: String::new(),
            });
        }
        let gap = self.first_char && x > self.last_end + 0.1 * size;
        if let Some(segment) = self.segments.last_mut() {
            if !jumped && gap && !segment.text.ends_with(' ') && ch != " " {
                segment.text.push(' ');
            }
            segment.text.push_str(ch);
            self.bytes += ch.len() + 1;
            segment.size = segment.size.max(size);
            let end = x + width * size;
            segment.x0 = segment.x0.min(x);
            segment.x1 = segment.x1.max(end);
        }
        self.first_char = false;
        self.last_y = y;
        self.last_end = x + width * size;
    }

    /// The page's text in reading order.
    pub(super) fn finish(self) -> String {
        let mut segments = self.segments;
        segments.retain_mut(|s| {
            let trimmed = s.text.trim();
            if trimmed.len() != s.text.len() {
                s.text = trimmed.to_string();
            }
            !s.text.is_empty()
        });
        let lines = if segments.len() > MAX_SEGMENTS {
            stream_order(&segments)
        } else {
            let mut cutter = Cutter {
                segments: &segments,
                lines: Vec::new(),
                column: 0,
            };
            cutter.cut((0..segments.len()).collect(), 0);
            cutter.lines
        };
        join(&segments, &lines)
    }
}

/// Segments of one line, left to right, and the column they were read in.
struct Line {
    ids: Vec<usize>,
    column: usize,
}

struct Cutter<'a> {
    segments: &'a [Segment],
    lines: Vec<Line>,
    /// Counts vertical cuts: lines on either side of one never join.
    column: usize,
}

impl Cutter<'_> {
    fn cut(&mut self, ids: Vec<usize>, depth: usize) {
        if ids.len() <= 1 || depth >= MAX_DEPTH {
            self.band(ids);
            return;
        }
        let s = self.segments;
        let em = median(ids.iter().map(|&i| s[i].size));
        let vertical = widest(&gaps(ids.iter().map(|&i| (s[i].x0, s[i].x1))));
        let horizontal = gaps(ids.iter().map(|&i| (s[i].top(), s[i].bottom())));
        let widest_horizontal = widest(&horizontal).map_or(0.0, |(_, width)| width);

        if let Some((at, width)) = vertical {
            if width >= SPLIT * em && width > widest_horizontal {
                let (left, right): (Vec<usize>, Vec<usize>) =
                    ids.iter().partition(|&&i| s[i].x1 <= at);
                if self.prose(&left) && self.prose(&right) {
                    self.cut(left, depth + 1);
                    self.column += 1;
                    self.cut(right, depth + 1);
                    self.column += 1;
                    return;
                }
            }
        }
        if widest_horizontal > 0.0 {
            // Every gap about as wide as the widest: the paragraphs of a
            // column at once, or its lines; narrower ones wait for the
            // recursion, so a gutter is found before lines are cut across it.
            let mut cuts: Vec<f64> = horizontal
                .iter()
                .filter(|(_, width)| *width >= 0.8 * widest_horizontal)
                .map(|(at, _)| *at)
                .collect();
            cuts.sort_by(f64::total_cmp);
            let mut bands: Vec<Vec<usize>> = vec![Vec::new(); cuts.len() + 1];
            for i in ids {
                let band = cuts.partition_point(|&at| at < s[i].top());
                bands[band].push(i);
            }
            for band in bands {
                self.cut(band, depth + 1);
            }
            return;
        }
        self.band(ids);
    }

    /// Segments with no empty band between them either way: lines that
    /// overlap (a superscript, tight leading), grouped by baseline.
    fn band(&mut self, mut ids: Vec<usize>) {
        if ids.is_empty() {
            return;
        }
        let s = self.segments;
        ids.sort_by(|&a, &b| s[a].y.total_cmp(&s[b].y));
        let mut line: Vec<usize> = Vec::new();
        for i in ids {
            if let Some(&first) = line.first() {
                if (s[i].y - s[first].y).abs() > 0.5 * s[first].size.max(s[i].size) {
                    self.line(std::mem::take(&mut line));
                }
            }
            line.push(i);
        }
        self.line(line);
    }

    fn line(&mut self, mut ids: Vec<usize>) {
        let s = self.segments;
        ids.sort_by(|&a, &b| s[a].x0.total_cmp(&s[b].x0));
        self.lines.push(Line {
            ids,
            column: self.column,
        });
    }

    fn prose(&self, ids: &[usize]) -> bool {
        let chars: usize = ids
            .iter()
            .map(|&i| self.segments[i].text.chars().count())
            .sum();
        ids.len() >= 2 && chars >= PROSE_CHARS * ids.len()
    }
}

/// The empty intervals between the given ones, as (middle, width).
fn gaps(intervals: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut intervals: Vec<(f64, f64)> = intervals.collect();
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = Vec::new();
    let mut reach = f64::NEG_INFINITY;
    for (start, end) in intervals {
        if reach.is_finite() && start > reach {
            out.push(((reach + start) / 2.0, start - reach));
        }
        reach = reach.max(end);
    }
    out
}

fn widest(gaps: &[(f64, f64)]) -> Option<(f64, f64)> {
    gaps.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(1.0)
}

/// Lines as the stream drew them: a new line wherever the baseline moves.
fn stream_order(segments: &[Segment]) -> Vec<Line> {
    let mut lines: Vec<Line> = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        match lines.last_mut() {
            Some(line) if (segments[line.ids[0]].y - segment.y).abs() <= 0.5 * segment.size => {
                line.ids.push(i)
            }
            _ => lines.push(Line {
                ids: vec![i],
                column: 0,
            }),
        }
    }
    lines
}

fn join(segments: &[Segment], lines: &[Line]) -> String {
    let mut text = String::new();
    let mut previous: Option<&Line> = None;
    for line in lines {
        let first = &segments[line.ids[0]];
        let mut content = String::new();
        for &i in &line.ids {
            if !content.is_empty() {
                content.push(' ');
            }
            content.push_str(&segments[i].text);
        }
        if let Some(prev) = previous {
            let last = &segments[prev.ids[0]];
            let step = first.y - last.y;
            let paragraph =
                prev.column != line.column || step < 0.0 || step > 1.5 * first.size.max(last.size);
            if paragraph {
                text.push_str("\n\n");
            } else if !join_hyphenated(&mut text, &content) {
                text.push('\n');
            }
        }
        text.push_str(&content);
        previous = Some(line);
    }
    text
}

/// Joins a word broken at the end of `text` by a hyphen when `next` goes on
/// in lower case: drops the hyphen and says so (the caller then adds no line
/// break).
fn join_hyphenated(text: &mut String, next: &str) -> bool {
    let mut tail = text.chars().rev();
    let (Some(hyphen), Some(before)) = (tail.next(), tail.next()) else {
        return false;
    };
    let continues = next.chars().next().is_some_and(char::is_lowercase);
    if !matches!(hyphen, '-' | '\u{00AD}' | '\u{2010}') || !before.is_alphabetic() || !continues {
        return false;
    }
    text.pop();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(x0: f64, x1: f64, y: f64, text: &str) -> Segment {
        Segment {
            x0,
            x1,
            y,
            size: 10.0,
            text: text.to_string(),
        }
    }

    fn order(segments: Vec<Segment>) -> String {
        let mut cutter = Cutter {
            segments: &segments,
            lines: Vec::new(),
            column: 0,
        };
        cutter.cut((0..segments.len()).collect(), 0);
        join(&segments, &cutter.lines)
    }

    #[test]
    fn columns_are_read_one_after_the_other() {
        let left = [
            "The left column starts here and",
            "goes on for several lines of text",
            "until it ends with its last line.",
        ];
        let right = [
            "The right column begins only after",
            "the left one is read completely",
            "and it ends the page.",
        ];
        let mut segments = vec![segment(50.0, 500.0, 40.0, "A title across the page")];
        // Drawn interleaved, line by line across both columns.
        for (row, (l, r)) in left.iter().zip(right).enumerate() {
            let y = 70.0 + 12.0 * row as f64;
            segments.push(segment(50.0, 250.0, y, l));
            segments.push(segment(270.0, 500.0, y, r));
        }
        assert_eq!(
            order(segments),
            format!(
                "A title across the page\n\n{}\n\n{}",
                left.join("\n"),
                right.join("\n")
            )
        );
    }

    #[test]
    fn tables_are_read_row_by_row() {
        let mut segments = Vec::new();
        for (row, cells) in [["Dose", "Age", "Route"], ["0.5 ml", "18-64", "IM"]]
            .iter()
            .enumerate()
        {
            for (col, cell) in cells.iter().enumerate() {
                let x = 50.0 + 120.0 * col as f64;
                segments.push(segment(x, x + 40.0, 50.0 + 12.0 * row as f64, cell));
            }
        }
        assert_eq!(order(segments), "Dose Age Route\n0.5 ml 18-64 IM");
    }

    #[test]
    fn hyphenated_line_ends_are_joined() {
        let segments = vec![
            segment(50.0, 300.0, 50.0, "Vaccines train the im-"),
            segment(50.0, 300.0, 62.0, "mune system. Covid-"),
            segment(50.0, 300.0, 74.0, "19 is a disease; see ISO-"),
            segment(50.0, 300.0, 86.0, "Standards."),
        ];
        assert_eq!(
            order(segments),
            "Vaccines train the immune system. Covid-\n19 is a disease; see ISO-\nStandards."
        );
    }

    #[test]
    fn paragraph_gaps_become_one_blank_line() {
        let segments = vec![
            segment(50.0, 300.0, 50.0, "First paragraph."),
            segment(50.0, 300.0, 120.0, "Second, far below."),
            segment(50.0, 300.0, 132.0, "Its second line."),
        ];
        assert_eq!(
            order(segments),
            "First paragraph.\n\nSecond, far below.\nIts second line."
        );
    }

    #[test]
    fn a_page_cut_once_per_line_stays_within_the_depth() {
        // Each gap 1.3 times the one above: the widest-gap-first cut peels
        // one line per level, 2,000 levels deep without a limit, more than
        // a small thread stack holds.
        let (mut y, mut gap) = (0.0, 1.0);
        let segments: Vec<Segment> = (0..2_000)
            .map(|_| {
                y += 10.0 + gap;
                gap *= 1.3;
                segment(50.0, 300.0, y, "a line of text")
            })
            .collect();
        let text = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || order(segments))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(text.lines().filter(|l| !l.is_empty()).count(), 2_000);
    }

    #[test]
    fn overlapping_lines_keep_their_baselines() {
        // Leading tighter than the glyph boxes: no empty band between lines.
        let segments = vec![
            segment(50.0, 300.0, 50.0, "line one"),
            segment(50.0, 300.0, 56.0, "line two"),
            segment(50.0, 300.0, 62.0, "line three"),
        ];
        assert_eq!(order(segments), "line one\nline two\nline three");
    }
}
