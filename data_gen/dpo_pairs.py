"""Automatic DPO pairs.

- cross-temporal: prompt = the item under its own stage's label; chosen = its own answer; rejected = the
  same input answered under another stage's label and materials.
- cross-persona (the paper's find_sim_response): rank the other personas' items by similarity of their
  inputs to this input, skip the top k, and take the first answer that differs from ours as rejected."""

from __future__ import annotations

from data_gen.prompts import format_cot
from data_gen.retrieval import similarity
from data_gen.split import dedup_method


def _pair(ctx, row: dict, source: str, rejected_text: str, suffix: str) -> dict:
    return {"id": f"{row['id']}#{suffix}", "persona": row["persona"], "stage": row["stage"], "source": source,
            "prompt": ctx.prompt_messages(row), "chosen": [{"role": "assistant", "content": row["target"]}],
            "rejected": [{"role": "assistant", "content": rejected_text}]}


def cross_temporal_pairs(ctx, train: list[dict], answers: dict[str, dict]) -> tuple[list[dict], dict]:
    pairs, missing = [], {}
    for row in train:
        p = ctx.personas[row["persona"]]
        for s in p.stages:
            if s.id == row["stage"]:
                continue
            a = answers.get(f"{row['id']}@{s.id}")
            if a is None:
                continue  # over cross_temporal_max
            if not a.get("response"):
                missing[a.get("reason") or "rejected"] = missing.get(a.get("reason") or "rejected", 0) + 1
                continue
            text = format_cot(a["analysis"], a["response"])
            if text == row["target"]:
                missing["same_answer"] = missing.get("same_answer", 0) + 1
                continue
            pairs.append(_pair(ctx, row, "cross_temporal", text, f"ct-{s.id}"))
    return pairs, missing


def cross_persona_pairs(ctx, train: list[dict], pool: list[dict]) -> tuple[list[dict], dict]:
    """`pool` = every kept item of every persona (train and test answers may serve as negatives)."""
    k = int(ctx.cfg["dpo"]["skip_top_k"])
    pairs, missing = [], {}
    if not train:
        return pairs, missing
    method = dedup_method(ctx.cfg)
    method = "tfidf" if method == "none" else method
    sim = similarity([r["input"] for r in train], [r["input"] for r in pool], method, ctx.cfg["retrieval"]["model"])
    for i, row in enumerate(train):
        cands = [j for j in range(len(pool)) if pool[j]["persona"] != row["persona"]]
        cands.sort(key=lambda j: (-float(sim[i, j]), pool[j]["id"]))
        pick = next((pool[j] for j in cands[k:] if pool[j]["target"] != row["target"]), None)
        if pick is None:
            missing["too_few_candidates"] = missing.get("too_few_candidates", 0) + 1
            continue
        pairs.append(_pair(ctx, row, "cross_persona", pick["target"], "cp"))
    return pairs, missing
