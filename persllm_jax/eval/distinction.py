"""Distinction as the paper's table defines it (SUPP Table 2): sentence BLEU (sacrebleu, 0-100) between generated
answers of the same persona and stage (intra), between the two stages of a persona (stage), and against every
other persona (inter). Lower inter, and a larger intra - stage gap, mean more distinct personas.

Pairs are ordered (hypothesis, reference) pairs of *different* answers (different item or different sample);
when a group has more than `max_pairs` pairs a seeded random subset is scored."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict


def bleu(hyp: str, ref: str) -> float:
    import sacrebleu

    if not hyp.strip() or not ref.strip():
        return 0.0
    return float(sacrebleu.sentence_bleu(hyp, [ref]).score)


def _mean_pairs(pairs: list[tuple[str, str]], max_pairs: int, rng: random.Random) -> tuple[float | None, int]:
    if not pairs:
        return None, 0
    if len(pairs) > max_pairs:
        pairs = rng.sample(pairs, max_pairs)
    return sum(bleu(h, r) for h, r in pairs) / len(pairs), len(pairs)


def distinction(answers: list[dict], max_pairs: int = 400, seed: int = 0) -> dict:
    """answers: [{"persona", "stage", "item", "sample", "text"}]. Returns
    {"per_persona": {p: {"intra", "stage", "inter", "pairs": {...}}}, "average": {...}}; a value is None when the
    corpus has no pair of that kind (one stage only, one persona only, one answer only)."""
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for a in answers:
        groups[(a["persona"], a["stage"])].append(a)
    personas = sorted({p for p, _ in groups})
    per: dict[str, dict] = {}
    for p in personas:
        stages = sorted(s for q, s in groups if q == p)
        intra_vals, stage_vals, n = [], [], {"intra": 0, "stage": 0, "inter": 0}
        for s in stages:
            g = groups[(p, s)]
            pairs = [(a["text"], b["text"]) for a, b in itertools.permutations(g, 2)
                     if (a["item"], a["sample"]) != (b["item"], b["sample"])]
            v, k = _mean_pairs(pairs, max_pairs, rng)
            if v is not None:
                intra_vals.append(v)
                n["intra"] += k
        for s, t in itertools.permutations(stages, 2):
            pairs = [(a["text"], b["text"]) for a in groups[(p, s)] for b in groups[(p, t)]]
            v, k = _mean_pairs(pairs, max_pairs, rng)
            if v is not None:
                stage_vals.append(v)
                n["stage"] += k
        mine = [a for (q, _), g in groups.items() if q == p for a in g]
        inter_vals = []
        for o in personas:
            if o == p:
                continue
            theirs = [a for (q, _), g in groups.items() if q == o for a in g]
            v, k = _mean_pairs([(a["text"], b["text"]) for a in mine for b in theirs], max_pairs, rng)
            if v is not None:
                inter_vals.append(v)
                n["inter"] += k
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        per[p] = {"intra": mean(intra_vals), "stage": mean(stage_vals), "inter": mean(inter_vals), "pairs": n}
    avg = {}
    for k in ("intra", "stage", "inter"):
        vals = [v[k] for v in per.values() if v[k] is not None]
        avg[k] = sum(vals) / len(vals) if vals else None
    avg["intra_minus_stage"] = (avg["intra"] - avg["stage"]) if avg["intra"] is not None and avg["stage"] is not None else None
    return {"per_persona": per, "average": avg}
