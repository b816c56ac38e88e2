//! Sample documents built in code: PDFs with a real text layer, .docx
//! files, and a .docx zip bomb. The parser's unit tests, the integration
//! tests and `worker bench-pipeline` all use these, so no binary fixtures
//! live in the repository.

use std::io::{Cursor, Write};

/// A PDF with one page per entry, each line of an entry a line of text on
/// the page (standard Helvetica font, so nothing is embedded). Characters
/// outside Latin-1 come out as '?'.
pub fn pdf(pages: &[&str]) -> Vec<u8> {
    pdf_with(&pages.iter().copied().map(Some).collect::<Vec<_>>())
}

/// A PDF whose pages have content but no text: each paints a grey
/// rectangle, as a scanned page paints an image.
pub fn pdf_without_text(pages: usize) -> Vec<u8> {
    pdf_with(&vec![None; pages])
}

/// A PDF mixing pages of text (`Some`) and pages without text (`None`).
pub fn pdf_with(pages: &[Option<&str>]) -> Vec<u8> {
    let contents = pages
        .iter()
        .map(|page| match page {
            Some(text) => {
                let mut content = b"BT\n/F1 12 Tf\n14 TL\n72 720 Td\n".to_vec();
                for line in text.lines() {
                    content.push(b'(');
                    content.extend(pdf_string(line));
                    content.extend_from_slice(b") Tj T*\n");
                }
                content.extend_from_slice(b"ET");
                content
            }
            None => b"0.9 g\n72 72 468 648 re\nf".to_vec(),
        })
        .collect();
    pdf_from_contents(contents)
}

/// A one-page PDF: a title across the page, then two columns of 10 pt
/// text drawn the way some generators draw them, line by line across both
/// columns (left line 1, right line 1, left line 2, ...).
pub fn pdf_two_columns(title: &str, left: &[&str], right: &[&str]) -> Vec<u8> {
    let mut content = b"BT\n/F1 16 Tf\n1 0 0 1 72 740 Tm\n(".to_vec();
    content.extend(pdf_string(title));
    content.extend_from_slice(b") Tj\n/F1 10 Tf\n");
    for row in 0..left.len().max(right.len()) {
        let y = 700 - 12 * row;
        for (x, column) in [(72, left), (316, right)] {
            if let Some(line) = column.get(row) {
                content.extend(format!("1 0 0 1 {x} {y} Tm\n(").into_bytes());
                content.extend(pdf_string(line));
                content.extend_from_slice(b") Tj\n");
            }
        }
    }
    content.extend_from_slice(b"ET");
    pdf_from_contents(vec![content])
}

/// A PDF with one page per content stream.
fn pdf_from_contents(pages: Vec<Vec<u8>>) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = Vec::new();
    let kids: Vec<String> = (0..pages.len())
        .map(|i| format!("{} 0 R", 4 + 2 * i))
        .collect();
    objects.push(b"<< /Type /Catalog /Pages 2 0 R >>".to_vec());
    objects.push(
        format!(
            "<< /Type /Pages /Kids [{}] /Count {} >>",
            kids.join(" "),
            pages.len()
        )
        .into_bytes(),
    );
    objects.push(
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_vec(),
    );
    for (i, content) in pages.into_iter().enumerate() {
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
                 /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                5 + 2 * i
            )
            .into_bytes(),
        );
        let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
        stream.extend(content);
        stream.extend_from_slice(b"\nendstream");
        objects.push(stream);
    }

    // The xref table needs each object's byte offset.
    let mut pdf = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend(format!("{} 0 obj\n", i + 1).into_bytes());
        pdf.extend_from_slice(body);
        pdf.extend_from_slice(b"\nendobj\n");
    }
    let xref = pdf.len();
    pdf.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).into_bytes());
    for offset in offsets {
        pdf.extend(format!("{offset:010} 00000 n \n").into_bytes());
    }
    pdf.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .into_bytes(),
    );
    pdf
}

/// A minimal .docx: one paragraph per entry; tabs and newlines in an entry
/// become Word tabs and line breaks.
pub fn docx(paragraphs: &[&str]) -> Vec<u8> {
    let mut body = String::new();
    for paragraph in paragraphs {
        body.push_str("<w:p><w:r>");
        for (i, line) in paragraph.split('\n').enumerate() {
            if i > 0 {
                body.push_str("<w:br/>");
            }
            for (j, piece) in line.split('\t').enumerate() {
                if j > 0 {
                    body.push_str("<w:tab/>");
                }
                body.push_str(r#"<w:t xml:space="preserve">"#);
                body.push_str(
                    &piece
                        .replace('&', "&amp;")
                        .replace('<', "&lt;")
                        .replace('>', "&gt;"),
                );
                body.push_str("</w:t>");
            }
        }
        body.push_str("</w:r></w:p>");
    }
    docx_with_body(&body)
}

/// A minimal .docx around the given `w:body` content (prefixes `w` and
/// `mc`, markup compatibility, are declared).
pub fn docx_with_body(body: &str) -> Vec<u8> {
    docx_with_parts(body, &[])
}

/// [`docx_with_body`] plus other parts of the package, each given as its
/// name and the content of its root element (`w:hdr`, `w:ftr`,
/// `w:footnotes`, `w:endnotes`), with the same prefixes declared.
pub fn docx_with_parts(body: &str, parts: &[(&str, &str)]) -> Vec<u8> {
    let document = format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="{W}" xmlns:mc="{MC}"><w:body>{body}<w:sectPr/></w:body></w:document>"#
    );
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, data) in [
        ("[Content_Types].xml", CONTENT_TYPES),
        ("_rels/.rels", PACKAGE_RELS),
        ("word/document.xml", document.as_str()),
    ] {
        zip.start_file(name, options).expect("zip entry");
        zip.write_all(data.as_bytes()).expect("zip write");
    }
    for (name, root) in parts {
        let element = match name.rsplit('/').next().unwrap_or_default() {
            n if n.starts_with("header") => "hdr",
            n if n.starts_with("footer") => "ftr",
            n if n.starts_with("footnotes") => "footnotes",
            n if n.starts_with("endnotes") => "endnotes",
            _ => "document",
        };
        let xml = format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:{element} xmlns:w="{W}" xmlns:mc="{MC}">{root}</w:{element}>"#
        );
        zip.start_file(*name, options).expect("zip entry");
        zip.write_all(xml.as_bytes()).expect("zip write");
    }
    zip.finish().expect("zip finish").into_inner()
}

/// A valid .docx whose `word/document.xml` inflates to exactly
/// `unpacked_bytes` (one paragraph of "a"s; at least 200 bytes, under
/// 4 GiB), in about `unpacked_bytes / 160` bytes. The headers declare the
/// true size. Built directly, without compressing anything, so 200 MB takes
/// milliseconds.
pub fn docx_bomb(unpacked_bytes: u64) -> Vec<u8> {
    docx_bomb_declaring(unpacked_bytes, None)
}

/// [`docx_bomb`], with the headers declaring `declared_size` for
/// `word/document.xml` instead of the true size when given: the lie a
/// reader must not trust.
pub fn docx_bomb_declaring(unpacked_bytes: u64, declared_size: Option<u32>) -> Vec<u8> {
    let prefix = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{W}"><w:body><w:p><w:r><w:t>"#
    );
    let suffix = "</w:t></w:r></w:p></w:body></w:document>";
    let overhead = (prefix.len() + suffix.len()) as u64;
    assert!(
        unpacked_bytes >= overhead && unpacked_bytes < u64::from(u32::MAX),
        "docx_bomb size out of range"
    );
    let run = unpacked_bytes - overhead;
    let crc = crc32_combine(
        crc32_combine(crc32(prefix.as_bytes()), crc32_run(b'a', run), run),
        crc32(suffix.as_bytes()),
        suffix.len() as u64,
    );
    zip_archive(&[
        Entry {
            name: "[Content_Types].xml",
            method: 0,
            crc: crc32(CONTENT_TYPES.as_bytes()),
            data: CONTENT_TYPES.as_bytes().to_vec(),
            size: CONTENT_TYPES.len() as u32,
        },
        Entry {
            name: "word/document.xml",
            method: 8,
            crc,
            data: deflate_run(prefix.as_bytes(), b'a', run, suffix.as_bytes()),
            size: declared_size.unwrap_or(unpacked_bytes as u32),
        },
    ])
}

const W: &str = "http://schemas.openxmlformats.org/wordprocessingml/2006/main";
const MC: &str = "http://schemas.openxmlformats.org/markup-compatibility/2006";

const CONTENT_TYPES: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>"#,
    r#"<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">"#,
    r#"<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>"#,
    r#"<Default Extension="xml" ContentType="application/xml"/>"#,
    r#"<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>"#,
    r#"</Types>"#
);

const PACKAGE_RELS: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>"#,
    r#"<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">"#,
    r#"<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>"#,
    r#"</Relationships>"#
);

/// A PDF literal string body in WinAnsi encoding (Latin-1 here).
fn pdf_string(line: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for c in line.chars() {
        match c {
            '(' | ')' | '\\' => {
                out.push(b'\\');
                out.push(c as u8);
            }
            ' '..='~' => out.push(c as u8),
            c if (c as u32) < 256 => out.extend(format!("\\{:03o}", c as u32).into_bytes()),
            _ => out.push(b'?'),
        }
    }
    out
}

// The zip bomb is written by hand: a fixed-Huffman deflate stream of one
// literal and then back-references of 258 bytes at distance 1 (13 bits per
// 258 bytes), with the CRC-32 of the long run computed algebraically.

const CRC_POLY: u32 = 0xEDB8_8320;

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC_POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// a(x) * b(x) modulo the CRC polynomial (bit-reflected), as in zlib.
fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC_POLY
        } else {
            b >> 1
        };
    }
}

/// x^(8 * len) modulo the CRC polynomial.
fn x_pow_8n(len: u64) -> u32 {
    let mut power = 1u32 << 30; // x^1
    for _ in 0..3 {
        power = mult_mod_p(power, power); // x^2, x^4, x^8
    }
    let (mut result, mut n) = (1u32 << 31, len); // x^0
    while n != 0 {
        if n & 1 != 0 {
            result = mult_mod_p(power, result);
        }
        power = mult_mod_p(power, power);
        n >>= 1;
    }
    result
}

/// The CRC-32 of A followed by B, from the CRCs of A and B.
fn crc32_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    mult_mod_p(x_pow_8n(len_b), crc_a) ^ crc_b
}

/// The CRC-32 of `byte` repeated `count` times, by doubling.
fn crc32_run(byte: u8, count: u64) -> u32 {
    let (mut block_crc, mut block_len) = (crc32(&[byte]), 1u64);
    let (mut crc, mut n) = (0u32, count);
    while n != 0 {
        if n & 1 != 0 {
            crc = crc32_combine(crc, block_crc, block_len);
        }
        block_crc = crc32_combine(block_crc, block_crc, block_len);
        block_len *= 2;
        n >>= 1;
    }
    crc
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    bits: u64,
    count: u32,
}

impl BitWriter {
    fn put(&mut self, value: u32, count: u32) {
        self.bits |= u64::from(value) << self.count;
        self.count += count;
        while self.count >= 8 {
            self.out.push(self.bits as u8);
            self.bits >>= 8;
            self.count -= 8;
        }
    }

    /// Huffman codes go most significant bit first.
    fn put_code(&mut self, code: u32, len: u32) {
        self.put(code.reverse_bits() >> (32 - len), len);
    }

    fn literal(&mut self, byte: u8) {
        match byte {
            0..=143 => self.put_code(0x30 + u32::from(byte), 8),
            _ => self.put_code(0x190 + u32::from(byte) - 144, 9),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.count > 0 {
            self.out.push(self.bits as u8);
        }
        self.out
    }
}

/// Raw deflate of `prefix`, `byte` x `count`, `suffix`.
fn deflate_run(prefix: &[u8], byte: u8, count: u64, suffix: &[u8]) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.put(1, 1); // final block
    w.put(1, 2); // fixed Huffman codes
    prefix.iter().for_each(|&b| w.literal(b));
    let mut left = count;
    if left > 0 {
        w.literal(byte);
        left -= 1;
    }
    while left >= 258 {
        w.put_code(0xC5, 8); // length 258 (symbol 285)
        w.put_code(0, 5); // distance 1
        left -= 258;
    }
    (0..left).for_each(|_| w.literal(byte));
    suffix.iter().for_each(|&b| w.literal(b));
    w.put_code(0, 7); // end of block (symbol 256)
    w.finish()
}

struct Entry<'a> {
    name: &'a str,
    method: u16,
    crc: u32,
    data: Vec<u8>,
    size: u32,
}

fn zip_archive(entries: &[Entry<'_>]) -> Vec<u8> {
    fn u16le(out: &mut Vec<u8>, v: u16) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn u32le(out: &mut Vec<u8>, v: u32) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = u32::try_from(out.len()).expect("zip offset");
        let compressed = u32::try_from(e.data.len()).expect("zip entry size");
        let name_len = u16::try_from(e.name.len()).expect("zip name");
        u32le(&mut out, 0x0403_4b50);
        for v in [20, 0, e.method, 0, 0x21] {
            u16le(&mut out, v); // version, flags, method, time, date
        }
        for v in [e.crc, compressed, e.size] {
            u32le(&mut out, v);
        }
        u16le(&mut out, name_len);
        u16le(&mut out, 0);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&e.data);

        u32le(&mut central, 0x0201_4b50);
        for v in [20, 20, 0, e.method, 0, 0x21] {
            u16le(&mut central, v); // made by, needed, flags, method, time, date
        }
        for v in [e.crc, compressed, e.size] {
            u32le(&mut central, v);
        }
        for v in [name_len, 0, 0, 0, 0] {
            u16le(&mut central, v); // name, extra, comment, disk, internal attrs
        }
        u32le(&mut central, 0); // external attributes
        u32le(&mut central, offset);
        central.extend_from_slice(e.name.as_bytes());
    }
    let central_offset = u32::try_from(out.len()).expect("zip offset");
    let central_len = u32::try_from(central.len()).expect("zip directory size");
    out.extend(central);
    let count = u16::try_from(entries.len()).expect("zip entries");
    u32le(&mut out, 0x0605_4b50);
    for v in [0, 0, count, count] {
        u16le(&mut out, v);
    }
    u32le(&mut out, central_len);
    u32le(&mut out, central_offset);
    u16le(&mut out, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_of_a_run_matches_the_direct_computation() {
        for n in [0u64, 1, 5, 258, 1000, 70_000] {
            assert_eq!(
                crc32_run(b'a', n),
                crc32(&vec![b'a'; n as usize]),
                "run of {n}"
            );
        }
        let ab = crc32_combine(crc32(b"hello "), crc32(b"world"), 5);
        assert_eq!(ab, crc32(b"hello world"));
    }

    #[test]
    fn bomb_has_the_requested_size() {
        let bytes = docx_bomb(10 * 1024 * 1024);
        let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).expect("zip");
        let mut entry = archive.by_name("word/document.xml").expect("entry");
        // Reading to the end also checks the CRC.
        let n = std::io::copy(&mut entry, &mut std::io::sink()).expect("inflate");
        assert_eq!(n, 10 * 1024 * 1024);
    }
}
