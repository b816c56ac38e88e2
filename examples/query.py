#!/usr/bin/env python3
"""Ask a question of the documents docworker indexed: embed it with Ollama, query Chroma.

    python examples/query.py "Who built the Bell Rock Lighthouse?"

Settings (flags or environment): --ollama-url OLLAMA_URL (http://127.0.0.1:11434),
--model EMBED_MODEL (nomic-embed-text; must be the worker's embed.model), --chroma-url
CHROMA_URL (http://127.0.0.1:8000), --collection CHROMA_COLLECTION (document_chunks),
-n (3 answers), --json (print Chroma's hits as JSON). Prints each answer's source
(file_name, and page for PDFs), distance and the sentence of the chunk nearest to
the question. Standard library only.
"""

import argparse
import json
import math
import os
import re
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request

COLLECTIONS = "/api/v2/tenants/default_tenant/databases/default_database/collections"


def call(url: str, body: dict | None = None):
    """GET (body None) or POST JSON; returns the decoded answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        sys.exit(f"{req.get_method()} {url}: {e.code} {e.read().decode(errors='replace')}")
    except urllib.error.URLError as e:
        sys.exit(f"{req.get_method()} {url}: {e.reason}")


def embed(ollama_url: str, model: str, texts: list[str]) -> list[list[float]]:
    """Vectors from Ollama's /api/embed, with the model the worker indexed with."""
    return call(f"{ollama_url}/api/embed", {"model": model, "input": texts})["embeddings"]


def collection_id(chroma_url: str, name: str) -> str:
    """Record operations take the collection's id; GET .../collections/{name} finds it."""
    return call(f"{chroma_url}{COLLECTIONS}/{urllib.parse.quote(name)}")["id"]


def search(chroma_url: str, collection: str, vector: list[float], n: int) -> list[dict]:
    """The n nearest chunks: [{text, metadata, distance}], best first."""
    cid = collection_id(chroma_url, collection)
    got = call(f"{chroma_url}{COLLECTIONS}/{cid}/query", {
        "query_embeddings": [vector],
        "n_results": n,
        "include": ["documents", "metadatas", "distances"],
    })
    return [{"text": t, "metadata": m, "distance": d}
            for t, m, d in zip(got["documents"][0], got["metadatas"][0], got["distances"][0])]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


def sentences(text: str) -> list[str]:
    """The text's sentences, leaving out fragments of fewer than 8 words (headings)."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if len(p.split()) >= 8] or parts


def best_sentences(ollama_url: str, model: str, question: list[float], hits: list[dict]) -> list[str]:
    """For each hit, the sentence of its chunk nearest to the question (one embed call):
    a chunk is up to chunk.size tokens, too long to print whole."""
    groups = [sentences(h["text"]) for h in hits]
    vectors = embed(ollama_url, model, [s for group in groups for s in group])
    best, i = [], 0
    for group in groups:
        scores = [cosine(question, v) for v in vectors[i:i + len(group)]]
        best.append(group[scores.index(max(scores))])
        i += len(group)
    return best


def main() -> None:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question")
    p.add_argument("--ollama-url", default=env("OLLAMA_URL", "http://127.0.0.1:11434"))
    p.add_argument("--model", default=env("EMBED_MODEL", "nomic-embed-text"))
    p.add_argument("--chroma-url", default=env("CHROMA_URL", "http://127.0.0.1:8000"))
    p.add_argument("--collection", default=env("CHROMA_COLLECTION", "document_chunks"))
    p.add_argument("-n", type=int, default=3, help="how many answers")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    args = p.parse_args()

    ollama_url = args.ollama_url.rstrip("/")
    vector = embed(ollama_url, args.model, [args.question])[0]
    hits = search(args.chroma_url.rstrip("/"), args.collection, vector, args.n)
    if args.json:
        print(json.dumps(hits, indent=2))
        return
    if not hits:
        sys.exit("no answers: the collection is empty")
    print(f"Q: {args.question}")
    sentences = best_sentences(ollama_url, args.model, vector, hits)
    for i, (hit, sentence) in enumerate(zip(hits, sentences), 1):
        meta = hit["metadata"]
        where = meta["file_name"] + (f", page {meta['page']}" if "page" in meta else "")
        print(f"{i}. {where}  (distance {hit['distance']:.3f})")
        snippet = textwrap.shorten(sentence, width=320, placeholder=" ...")
        print(textwrap.indent(textwrap.fill(f"... {snippet} ...", width=88), "   "))


if __name__ == "__main__":
    main()
