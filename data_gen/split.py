"""Near-duplicate removal (per persona, across its stages, as the paper did) and the per persona and
stage train/test split."""

from __future__ import annotations

import random

from data_gen.annotate import stable_seed
from data_gen.retrieval import similarity


def dedup_method(cfg: dict) -> str:
    m = cfg["dedup"]["method"]
    return ("dense" if cfg["retrieval"]["method"] == "dense" else "tfidf") if m == "auto" else m


def dedup(rows: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """Greedy in id order: drop an item whose input is >= threshold similar to an input already kept.
    Returns (kept, dropped) with dropped rows carrying `duplicate_of`."""
    method = dedup_method(cfg)
    if method == "none":
        return rows, []
    thr = float(cfg["dedup"]["threshold"])
    kept, dropped = [], []
    by_persona: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        by_persona.setdefault(r["persona"], []).append(r)
    for group in by_persona.values():
        texts = [r["input"] for r in group]
        sim = similarity(texts, texts, method, cfg["retrieval"]["model"])
        keep_idx: list[int] = []
        for i, r in enumerate(group):
            best = max(keep_idx, key=lambda j: sim[i, j], default=None)
            if best is not None and sim[i, best] >= thr - 1e-6:
                dropped.append(dict(r, duplicate_of=group[best]["id"]))
            else:
                keep_idx.append(i)
                kept.append(r)
    return kept, dropped


def split(rows: list[dict], cfg: dict) -> tuple[list[dict], list[dict]]:
    """Seeded random split per (persona, stage): round(n * test_fraction) items to test."""
    frac = float(cfg["split"]["test_fraction"])
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        groups.setdefault((r["persona"], r["stage"]), []).append(r)
    train, test = [], []
    for (p, s), group in groups.items():
        rng = random.Random(stable_seed(cfg["seed"], "split", p, s))
        order = list(range(len(group)))
        rng.shuffle(order)
        n_test = int(round(len(group) * frac))
        test_idx = set(order[:n_test])
        for i, r in enumerate(group):
            (test if i in test_idx else train).append(r)
    return train, test
