//! The document pipeline end to end: files in every supported format go
//! through a running daemon into a real Chroma, embedded by a real model,
//! and come back as the right answers to questions.

use std::collections::BTreeMap;

use serde_json::json;

use crate::fixtures;
use crate::services;
use crate::stack::{Stack, JOB_DEADLINE};

/// Ten documents on unrelated subjects, each with a question only it answers.
struct Doc {
    name: &'static str,
    question: &'static str,
    paragraphs: &'static [&'static str],
}

const DOCS: &[Doc] = &[
    Doc {
        name: "cats.txt",
        question: "How many hours a day do cats sleep?",
        paragraphs: &[
            "Domestic cats sleep between twelve and sixteen hours a day. Much of that is light dozing, from which a cat wakes at the smallest sound.",
            "Kittens and old cats sleep even longer. Cats are crepuscular: they are most active at dawn and dusk, when their prey is about.",
        ],
    },
    Doc {
        name: "volcanoes.md",
        question: "What is the molten rock inside a volcano called?",
        paragraphs: &[
            "# Volcanoes\n\nMolten rock below the surface of the Earth is called magma; once it erupts from a volcano it is called lava.",
            "## Kinds of volcano\n\nShield volcanoes have gentle slopes built by runny basalt lava, while stratovolcanoes are steep cones of ash and lava layers.",
        ],
    },
    Doc {
        name: "jazz.html",
        question: "Which city is considered the birthplace of jazz music?",
        paragraphs: &[
            "Jazz music was born in New Orleans in the late nineteenth and early twentieth centuries, out of blues and ragtime.",
            "Louis Armstrong, a trumpeter from New Orleans, made improvised solos central to jazz performance.",
        ],
    },
    Doc {
        name: "photosynthesis.pdf",
        question: "How do plants turn sunlight into chemical energy?",
        paragraphs: &[
            "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose and release oxygen.",
            "The light-dependent reactions take place in the thylakoid membranes of the chloroplast, where chlorophyll absorbs light.",
        ],
    },
    Doc {
        name: "chess.docx",
        question: "How does the knight move in chess?",
        paragraphs: &[
            "In chess the knight moves in an L shape: two squares in one direction and then one square at a right angle.",
            "The knight is the only chess piece that can jump over other pieces.",
        ],
    },
    Doc {
        name: "planets.csv",
        question: "Which planet is the largest in the solar system?",
        paragraphs: &[
            "planet,fact\nJupiter,Jupiter is the largest planet in the solar system; a gas giant more than eleven times as wide as Earth\nMars,Mars is the red planet with the tallest volcano Olympus Mons\nSaturn,Saturn has the most spectacular ring system of all planets",
        ],
    },
    Doc {
        name: "coffee.json",
        question: "Where did coffee drinking originate?",
        paragraphs: &[
            r#"{"topic": "coffee", "history": "Coffee drinking originated in Ethiopia and Yemen; by the fifteenth century Sufi monasteries in Yemen brewed coffee to stay awake for prayers.", "beans": "Coffee beans are the roasted seeds of the Coffea plant."}"#,
        ],
    },
    Doc {
        name: "rome.txt",
        question: "Who was the first emperor of Rome?",
        paragraphs: &[
            "Augustus became the first Roman emperor in 27 BC after the end of the Roman Republic, ruling until his death in AD 14.",
            "His reign began the Pax Romana, two centuries of relative peace across the Roman Empire.",
        ],
    },
    Doc {
        name: "tennis.md",
        question: "What surface is Wimbledon played on?",
        paragraphs: &[
            "# Wimbledon\n\nWimbledon is the oldest tennis tournament in the world and the only grand slam still played on grass courts.",
            "Players must wear almost entirely white clothing, a tradition of the All England Club.",
        ],
    },
    Doc {
        name: "vaccines.html",
        question: "How do vaccines train the immune system?",
        paragraphs: &[
            "Vaccines train the immune system by exposing it to a harmless piece or weakened form of a pathogen, so that antibodies and memory cells are ready for the real infection.",
            "Herd immunity protects those who cannot be vaccinated when enough of the population is immune.",
        ],
    },
];

fn render(doc: &Doc) -> Vec<u8> {
    let ext = doc.name.rsplit('.').next().unwrap();
    match ext {
        "pdf" => fixtures::pdf(doc.paragraphs),
        "docx" => fixtures::docx(doc.paragraphs),
        "html" => {
            let body: String = doc
                .paragraphs
                .iter()
                .map(|p| format!("<p>{p}</p>\n"))
                .collect();
            format!(
                "<!doctype html><html><head><title>{}</title><style>p {{ color: red }}</style><script>var tracking = 'do not index me';</script></head>\
                 <body><nav>Home | About | Contact</nav><main>{body}</main><footer>Copyright</footer></body></html>",
                doc.name
            )
            .into_bytes()
        }
        _ => doc.paragraphs.join("\n\n").into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_every_format_is_indexed_and_answers_questions() {
    let stack = Stack::new().await;
    let paths: Vec<_> = DOCS
        .iter()
        .map(|d| stack.write(d.name, render(d)))
        .collect();
    let files: Vec<(&str, &std::path::Path)> = DOCS
        .iter()
        .zip(&paths)
        .map(|(d, p)| (d.name, p.as_path()))
        .collect();
    let (batch, ids) = stack.enqueue_batch(&files).await;
    let worker = stack.worker();

    let mut doc_of = BTreeMap::new();
    for (doc, id) in DOCS.iter().zip(&ids) {
        let row = stack.wait_finished(*id, JOB_DEADLINE).await;
        assert_eq!(
            row.status,
            "completed",
            "{}: {row:?}\n{}",
            doc.name,
            worker.logs()
        );
        assert_eq!(row.stage.as_deref(), Some("done"));
        assert!(row.total_chunks > 0, "{}: {row:?}", doc.name);
        assert_eq!(row.completed_chunks, row.total_chunks, "{}", doc.name);
        let stored = stack.assert_whole(*id).await;
        assert_eq!(
            stored, row.total_chunks as usize,
            "{}: chunks in Chroma vs the row",
            doc.name
        );
        let chunks = stack.chunks_of(*id).await;
        let m = &chunks[0].1;
        assert_eq!(m["document_id"], json!(id.to_string()));
        assert_eq!(m["doc_id"], json!(id.to_string()));
        assert_eq!(m["ref_doc_id"], json!(id.to_string()));
        assert_eq!(m["file_name"], json!(doc.name));
        assert_eq!(m["file_type"], json!(doc.name.rsplit('.').next().unwrap()));
        assert_eq!(m["embedding_model"], json!(services::EMBED_MODEL));
        assert!(
            m["file_hash"].as_str().is_some_and(|h| h.len() == 64),
            "{m}"
        );
        if doc.name.ends_with(".pdf") {
            assert_eq!(m["page"], json!(1), "{m}");
            assert_eq!(m["page_start"], json!(1), "{m}");
            assert!(m["page_end"].as_u64().is_some_and(|e| e >= 1), "{m}");
        }
        doc_of.insert(id.to_string(), doc.name);
    }
    let batch_status: String = stack
        .db
        .client
        .query_one(
            "SELECT status::text FROM job_batches WHERE id = $1",
            &[&batch],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(batch_status, "completed");

    // What a RAG query does: embed the question, ask Chroma for the nearest
    // chunk. Each question's best chunk must come from its own document.
    let questions: Vec<&str> = DOCS.iter().map(|d| d.question).collect();
    let vectors = services::embed(&stack.embed_url, &questions).await;
    let mut wrong = Vec::new();
    for (doc, v) in DOCS.iter().zip(&vectors) {
        let answer = services::query(&stack.chroma_url, &stack.collection, v, 3).await;
        let top = answer["metadatas"][0][0]["document_id"]
            .as_str()
            .unwrap_or("");
        let got = doc_of.get(top).copied().unwrap_or("?");
        if got != doc.name {
            wrong.push(format!("{:?} -> {got} (wanted {})", doc.question, doc.name));
        }
        let text = answer["documents"][0][0].as_str().unwrap_or("");
        assert!(
            !text.contains("do not index me"),
            "script text was indexed: {text}"
        );
    }
    assert!(wrong.is_empty(), "wrong first answers: {wrong:#?}");
}
