//! HTML: the main text of a page, as paragraphs.
//!
//! Saved web pages are mostly chrome: scripts, navigation, cookie banners,
//! footers. Indexing those would make every page of a site look alike to the
//! retriever, so they are dropped, and when the page marks its content with
//! `<main>` or `<article>` only that is kept. What remains is laid out the
//! way a browser would show it as plain text: blocks as paragraphs separated
//! by blank lines, headings and list items on lines of their own, table
//! cells separated by " | ", whitespace inside a block collapsed. The
//! `<title>` comes first, as it names the document.
//!
//! Parsing is html5ever's (via `scraper`), which decodes entities and
//! repairs broken markup like a browser does. The tree is walked
//! iteratively: a hostile page can nest elements deeper than the stack.

use scraper::{ElementRef, Html, Node};

use super::{check_text_size, Limits, ParseError};

pub(super) fn parse(source: &str, limits: &Limits) -> Result<String, ParseError> {
    let document = Html::parse_document(source);
    let root = document.root_element();

    let mut writer = Writer::default();
    let content_roots = content_roots(root);
    for content in &content_roots {
        writer.gap(Gap::Paragraph);
        writer.walk(*content);
    }
    if writer.out.is_empty() {
        // A <main> can be an empty shell filled in by scripts; the rest of
        // the body is better than nothing.
        if let Some(body) = child_element(root, "body") {
            if !content_roots.iter().any(|c| c.id() == body.id()) {
                writer.walk(body);
            }
        }
    }
    let body = writer.out;

    let title = child_element(root, "head")
        .and_then(|head| child_element(head, "title"))
        .map(|title| collapse_whitespace(&title.text().collect::<String>()))
        .filter(|title| !title.is_empty());
    let text = match title {
        None => body,
        Some(title) if body.is_empty() => title,
        // Pages often start with their title as the first heading.
        Some(title)
            if body
                .strip_prefix(&title)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('\n')) =>
        {
            body
        }
        Some(title) => format!("{title}\n\n{body}"),
    };
    if text.is_empty() {
        return Err(ParseError::new(
            "This HTML page has no visible text once scripts, styles, navigation, \
             headers and footers are removed; there is nothing to index.",
        ));
    }
    check_text_size(text.len(), limits)?;
    Ok(text)
}

/// Where the page's content is: its `<main>`, else its outermost
/// `<article>`s, else the `<body>`.
fn content_roots(root: ElementRef<'_>) -> Vec<ElementRef<'_>> {
    let visible = |e: &ElementRef<'_>| {
        !is_hidden(e)
            && !e
                .ancestors()
                .filter_map(ElementRef::wrap)
                .any(|a| is_dropped(a.value().name()) || is_hidden(&a))
    };
    let elements = || root.descendants().filter_map(ElementRef::wrap);
    if let Some(main) = elements().find(|e| e.value().name() == "main" && visible(e)) {
        return vec![main];
    }
    let articles: Vec<_> = elements()
        .filter(|e| e.value().name() == "article" && visible(e))
        .filter(|e| {
            !e.ancestors()
                .filter_map(ElementRef::wrap)
                .any(|a| a.value().name() == "article")
        })
        .collect();
    if !articles.is_empty() {
        return articles;
    }
    vec![child_element(root, "body").unwrap_or(root)]
}

fn child_element<'a>(parent: ElementRef<'a>, name: &str) -> Option<ElementRef<'a>> {
    parent
        .children()
        .filter_map(ElementRef::wrap)
        .find(|e| e.value().name() == name)
}

/// Elements whose content is never page text: code, styling, page chrome,
/// forms and embedded media.
fn is_dropped(name: &str) -> bool {
    matches!(
        name,
        "script"
            | "style"
            | "noscript"
            | "template"
            | "nav"
            | "header"
            | "footer"
            | "aside"
            | "form"
            | "svg"
            | "iframe"
            | "head"
            | "title"
            | "math"
            | "canvas"
            | "object"
            | "embed"
            | "audio"
            | "video"
            | "select"
            | "button"
            | "dialog"
    )
}

/// Content the page itself hides from readers.
fn is_hidden(element: &ElementRef<'_>) -> bool {
    let el = element.value();
    el.attr("hidden").is_some()
        || el.attr("aria-hidden") == Some("true")
        || el.attr("style").is_some_and(|style| {
            let style: String = style.chars().filter(|c| !c.is_whitespace()).collect();
            style.to_ascii_lowercase().contains("display:none")
        })
}

/// The break pending between what was written and the next word; only the
/// strongest one requested since the last word is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
enum Gap {
    #[default]
    None,
    Space,
    Cell,
    Line,
    Paragraph,
}

#[derive(Default)]
struct Writer {
    out: String,
    gap: Gap,
    /// Inside `<pre>`, whitespace is content.
    pre: usize,
    /// Inside a table cell, blocks are joined with spaces so that a row
    /// stays on one line.
    in_cell: usize,
    /// Cells seen in each open table row, innermost last.
    cells: Vec<usize>,
}

impl Writer {
    fn gap(&mut self, gap: Gap) {
        let gap = if self.in_cell > 0 && gap > Gap::Cell {
            Gap::Space
        } else {
            gap
        };
        self.gap = self.gap.max(gap);
    }

    fn word(&mut self, word: &str) {
        if !self.out.is_empty() {
            // Preformatted text may already end in newlines of its own.
            let newlines = self
                .out
                .bytes()
                .rev()
                .take(2)
                .take_while(|&b| b == b'\n')
                .count();
            self.out.push_str(match self.gap {
                Gap::None => "",
                Gap::Space => " ",
                Gap::Cell => " | ",
                Gap::Line => ["\n", "", ""][newlines],
                Gap::Paragraph => ["\n\n", "\n", ""][newlines],
            });
        }
        self.gap = Gap::None;
        self.out.push_str(word);
    }

    fn text(&mut self, text: &str) {
        if self.pre > 0 {
            // Whitespace between the <pre> tag and its first text is layout
            // of the source, not content.
            if self.gap < Gap::Line || !text.trim().is_empty() {
                self.word(text);
            }
            return;
        }
        let is_space = |c: char| c.is_ascii_whitespace() || c == '\u{a0}';
        if text.starts_with(is_space) {
            self.gap(Gap::Space);
        }
        for (i, word) in text.split(is_space).filter(|w| !w.is_empty()).enumerate() {
            if i > 0 {
                self.gap(Gap::Space);
            }
            self.word(word);
        }
        if text.ends_with(is_space) {
            self.gap(Gap::Space);
        }
    }

    /// Writes the text under `top`, depth-first without recursion.
    fn walk(&mut self, top: ElementRef<'_>) {
        let mut node = *top;
        'walk: loop {
            let descend = match node.value() {
                Node::Text(text) => {
                    self.text(text);
                    false
                }
                Node::Element(_) => ElementRef::wrap(node).is_some_and(|e| self.open(e)),
                _ => false,
            };
            if descend {
                if let Some(child) = node.first_child() {
                    node = child;
                    continue;
                }
            }
            // Close this node and every ancestor whose children are done.
            loop {
                if let Some(element) = ElementRef::wrap(node) {
                    self.close(element);
                }
                if node.id() == top.id() {
                    break 'walk;
                }
                if let Some(next) = node.next_sibling() {
                    node = next;
                    break;
                }
                match node.parent() {
                    Some(parent) => node = parent,
                    None => break 'walk,
                }
            }
        }
    }

    /// Handles an element's start tag; returns whether to walk its content.
    fn open(&mut self, element: ElementRef<'_>) -> bool {
        let name = element.value().name();
        if is_dropped(name) || is_hidden(&element) {
            return false;
        }
        match name {
            "br" => self.gap(Gap::Line),
            "tr" => {
                self.gap(Gap::Line);
                self.cells.push(0);
            }
            "td" | "th" => {
                if let Some(count) = self.cells.last_mut() {
                    *count += 1;
                    if *count > 1 {
                        self.gap(Gap::Cell);
                    }
                }
                self.in_cell += 1;
            }
            "pre" => {
                self.gap(Gap::Paragraph);
                self.pre += 1;
            }
            _ => self.gap(block_gap(name)),
        }
        true
    }

    fn close(&mut self, element: ElementRef<'_>) {
        let name = element.value().name();
        if is_dropped(name) || is_hidden(&element) {
            return;
        }
        match name {
            "tr" => {
                self.cells.pop();
                self.gap(Gap::Line);
            }
            "td" | "th" => self.in_cell = self.in_cell.saturating_sub(1),
            "pre" => {
                self.pre = self.pre.saturating_sub(1);
                self.gap(Gap::Paragraph);
            }
            _ => self.gap(block_gap(name)),
        }
    }
}

/// The break an element puts around its content.
fn block_gap(name: &str) -> Gap {
    match name {
        "li" | "dt" | "dd" | "option" => Gap::Line,
        "p" | "div" | "section" | "article" | "main" | "body" | "blockquote" | "figure"
        | "figcaption" | "address" | "details" | "summary" | "dl" | "ul" | "ol" | "menu"
        | "table" | "caption" | "thead" | "tbody" | "tfoot" | "h1" | "h2" | "h3" | "h4" | "h5"
        | "h6" | "hr" | "fieldset" | "legend" | "center" | "hgroup" => Gap::Paragraph,
        _ => Gap::None,
    }
}

fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::{parse as parse_file, Format, Limits};

    fn text_of(html: &str) -> String {
        let parsed = parse_file(html.as_bytes(), "page.html", &Limits::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.format, Format::Html);
        parsed.text
    }

    #[test]
    fn page_chrome_is_dropped_and_blocks_become_paragraphs() {
        let html = r#"<!DOCTYPE html>
<html><head><title>  The  Title </title><style>p { color: red }</style>
<script>var x = "<p>not text</p>";</script></head>
<body>
  <header><h1>Site name</h1></header>
  <nav><ul><li>Home</li><li>About</li></ul></nav>
  <h1>A   heading</h1>
  <p>First   paragraph with <b>bold</b>
     and <a href="/x">a link</a>.</p>
  <p>Entities: caf&eacute; &amp; &lt;tags&gt; &#8212; done&nbsp;now.</p>
  <ul><li>one</li><li>two <i>items</i></li></ul>
  <p>Line<br>break</p>
  <aside>Related posts</aside>
  <form><label>Email</label><input name=e><button>Subscribe</button></form>
  <noscript>Enable JS</noscript>
  <div hidden>secret</div><span style="display: none">also secret</span>
  <footer>Copyright</footer>
</body></html>"#;
        assert_eq!(
            text_of(html),
            "The Title\n\nA heading\n\nFirst paragraph with bold and a link.\n\n\
             Entities: café & <tags> \u{2014} done now.\n\none\ntwo items\n\nLine\nbreak"
        );
    }

    #[test]
    fn main_or_article_is_preferred() {
        let html = "<html><body><div>Sidebar teaser</div>\
            <main><h2>Story</h2><p>Body text.</p></main><div>More junk</div></body></html>";
        assert_eq!(text_of(html), "Story\n\nBody text.");
        let html = "<html><body><p>Teaser</p><article><p>One</p></article>\
            <article><p>Two</p><article><p>Nested</p></article></article></body></html>";
        assert_eq!(text_of(html), "One\n\nTwo\n\nNested");
        // An empty <main> (filled by scripts at runtime) falls back to the body.
        let html = "<html><body><main></main><p>Static text</p></body></html>";
        assert_eq!(text_of(html), "Static text");
    }

    #[test]
    fn title_is_not_repeated() {
        let html =
            "<html><head><title>Guide</title></head><body><h1>Guide</h1><p>x</p></body></html>";
        assert_eq!(text_of(html), "Guide\n\nx");
        let html = "<html><head><title>Guide</title></head><body><h1>Guidelines</h1></body></html>";
        assert_eq!(text_of(html), "Guide\n\nGuidelines");
    }

    #[test]
    fn tables_and_preformatted_text() {
        let html = "<html><body><table><tr><th>Name</th><th>Role</th></tr>\
            <tr><td><p>Ada</p><p>Lovelace</p></td><td>Analyst</td></tr></table>\
            <pre>fn main() {\n    println!();\n}\n</pre><p>after</p></body></html>";
        assert_eq!(
            text_of(html),
            "Name | Role\nAda Lovelace | Analyst\n\nfn main() {\n    println!();\n}\n\nafter"
        );
    }

    #[test]
    fn fragments_by_extension_and_legacy_encodings() {
        let (bytes, _, _) =
            encoding_rs::WINDOWS_1252.encode("<p>Gr\u{fc}\u{df}e aus K\u{f6}ln</p>");
        let parsed = parse_file(&bytes, "frag.htm", &Limits::default()).unwrap();
        assert_eq!(parsed.text, "Gr\u{fc}\u{df}e aus K\u{f6}ln");
    }

    #[test]
    fn pages_without_visible_text_are_errors() {
        let html = "<!doctype html><html><body><nav>Menu</nav><script>x()</script></body></html>";
        let err = parse_file(html.as_bytes(), "x.html", &Limits::default()).unwrap_err();
        assert!(err.message.contains("no visible text"), "{err}");
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        // Deep enough to overflow a recursive walk on a test thread's stack;
        // much deeper only tests html5ever, whose tree building is quadratic
        // in the nesting depth.
        let html = format!("{}deep{}", "<div>".repeat(5_000), "</div>".repeat(5_000));
        assert_eq!(text_of(&html), "deep");
    }
}
