"""The steps that call the annotator: plan (seed paragraph + input type per item), inputs, responses
(RAG + CoT), and the cross-temporal answers used for DPO. Each step appends one JSONL row per item as
answers arrive, and on a rerun asks only for the items it does not have yet."""

from __future__ import annotations

import hashlib
import random

from .backends import Request, Result
from .jsonl import Appender, read_jsonl
from .prompts import parse_input, parse_response

TYPES = ("ordinary", "thought", "error")
FAILED = "annotator_failed"


def stable_seed(*parts) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def allocate(n: int, mix: dict, rng: random.Random) -> list[str]:
    """n input types in the configured ratio (largest remainder), in a seeded random order."""
    total = sum(mix.values())
    want = {t: n * mix.get(t, 0) / total for t in TYPES}
    counts = {t: int(want[t]) for t in TYPES}
    for t in sorted(TYPES, key=lambda t: (-(want[t] - counts[t]), TYPES.index(t)))[: n - sum(counts.values())]:
        counts[t] += 1
    out = [t for t in TYPES for _ in range(counts[t])]
    rng.shuffle(out)
    return out


def plan(ctx) -> list[dict]:
    """One row per item: id, persona, stage, type, seed chunk. Deterministic given config and materials."""
    rows = []
    for p in ctx.personas.values():
        for s in p.stages:
            seeds = ctx.chunks_of(p.key, s.id, "objective") + ctx.chunks_of(p.key, s.id, "subjective")
            rng = random.Random(stable_seed(ctx.cfg["seed"], "plan", p.key, s.id))
            n = ctx.cfg["inputs"]["per_stage"] or len(seeds)
            order = list(range(len(seeds)))
            if n < len(seeds):
                rng.shuffle(order)
            types = allocate(int(n), ctx.cfg["inputs"]["mix"], rng)
            for k in range(int(n)):
                c = seeds[order[k % len(seeds)]]
                rows.append({"id": f"{p.key}/{s.id}/{k:04d}", "persona": p.key, "stage": s.id, "type": types[k],
                             "seed_id": c.id, "seed_kind": c.kind})
    return rows


def _sampling(ctx, section: str) -> dict:
    c = ctx.cfg[section]
    return {"max_tokens": int(c["max_tokens"]), "temperature": float(c["temperature"]), "top_p": float(c["top_p"])}


def run_step(ctx, name: str, items: list[dict], make_request, on_answer) -> dict[str, dict]:
    """Resumable annotator step over `items` (dicts with a unique "key"). Rows already in
    work/<name>.jsonl are kept (failed ones are asked again); new rows are appended as answers arrive."""
    path = ctx.work / f"{name}.jsonl"
    done = {r["key"]: r for r in read_jsonl(path) if r.get("reason") != FAILED}
    todo = [it for it in items if it["key"] not in done]
    by_key = {it["key"]: it for it in todo}
    requests = [make_request(it) for it in todo]
    bar = ctx.progress(name, total=len(items), initial=len(items) - len(todo))
    with Appender(path) as out:
        def on_result(req: Request, res: Result):
            it = by_key[req.key]
            if res.text is None:
                row = {"key": req.key, "reason": FAILED, "error": res.error}
            else:
                row = {"key": req.key, **on_answer(it, res.text)}
            out.write(row)
            done[req.key] = row
            bar.update(1)

        ctx.backend.run(requests, on_result)
    bar.close()
    return {it["key"]: done[it["key"]] for it in items if it["key"] in done}


def inputs_step(ctx, items: list[dict]) -> dict[str, dict]:
    mx = int(ctx.cfg["inputs"]["max_words"])

    def make(it):
        p, s = ctx.personas[it["persona"]], ctx.personas[it["persona"]].stage(it["stage"])
        t = ctx.templates(p)
        seed = ctx.chunk_by_id[it["seed_id"]].text
        system = t.render(f"input_{it['type']}.j2", name=p.name, description=p.description, label=s.label,
                          stage_description=s.description, seed=seed, kind=it["seed_kind"])
        user = t.render("input_user.j2", name=p.name, label=s.label, seed=seed, kind=it["seed_kind"])
        return Request(it["key"], ({"role": "system", "content": system}, {"role": "user", "content": user}),
                       seed=stable_seed(ctx.cfg["seed"], "input", it["key"]), **_sampling(ctx, "inputs"))

    def answer(it, text):
        inp, reason = parse_input(text, it["type"], mx)
        return {"input": inp, "reason": reason, "raw": text}

    return run_step(ctx, "inputs", [dict(it, key=it["id"]) for it in items], make, answer)


def response_messages(ctx, persona_key: str, stage_id: str, type_: str, input_text: str,
                      seed_chunk=None) -> tuple[dict, dict]:
    p = ctx.personas[persona_key]
    s = p.stage(stage_id)
    t = ctx.templates(p)
    r = ctx.cfg["retrieval"]
    seed_text = seed_chunk.text if seed_chunk is not None else None
    knowledge = ctx.index(persona_key, stage_id, "objective").context(
        input_text, int(r["knowledge_words"]), seed_text if seed_chunk is not None and seed_chunk.kind == "objective" else None)
    style = ctx.index(persona_key, stage_id, "subjective").context(
        input_text, int(r["style_words"]), seed_text if seed_chunk is not None and seed_chunk.kind == "subjective" else None)
    n_ex = max(0, int(ctx.cfg["responses"]["fewshot"]))
    system = t.render("response_system.j2", name=p.name, description=p.description, label=s.label,
                      stage_description=s.description, knowledge=knowledge, style=style, type=type_,
                      examples=t.examples[:n_ex], examples_persona=t.examples_persona)
    user = t.render("response_user.j2", name=p.name, label=s.label, input=input_text, type=type_)
    return {"role": "system", "content": system}, {"role": "user", "content": user}


def _response_step(ctx, name: str, items: list[dict], tag: str) -> dict[str, dict]:
    rc = ctx.cfg["responses"]

    def make(it):
        seed_chunk = ctx.chunk_by_id[it["seed_id"]] if it.get("seed_id") else None
        msgs = response_messages(ctx, it["persona"], it["answer_stage"], it["type"], it["input"], seed_chunk)
        return Request(it["key"], msgs, seed=stable_seed(ctx.cfg["seed"], tag, it["key"]), **_sampling(ctx, "responses"))

    def answer(it, text):
        parsed, reason = parse_response(text, rc)
        a, r = parsed if parsed else (None, None)
        return {"analysis": a, "response": r, "reason": reason, "raw": None if parsed else text}

    return run_step(ctx, name, items, make, answer)


def responses_step(ctx, items: list[dict], inputs: dict[str, dict]) -> dict[str, dict]:
    todo = [dict(it, key=it["id"], input=inputs[it["id"]]["input"], answer_stage=it["stage"])
            for it in items if it["id"] in inputs and inputs[it["id"]].get("input")]
    return _response_step(ctx, "responses", todo, "response")


def cross_temporal_step(ctx, train_rows: list[dict]) -> dict[str, dict]:
    """The same input answered under each other stage's label and materials (no seed paragraph)."""
    cap = ctx.cfg["dpo"]["cross_temporal_max"]
    items, per = [], {}
    for row in train_rows:
        p = ctx.personas[row["persona"]]
        k = (row["persona"], row["stage"])
        if cap is not None and per.get(k, 0) >= int(cap):
            continue
        others = [s.id for s in p.stages if s.id != row["stage"]]
        if others:
            per[k] = per.get(k, 0) + 1
        for other in others:
            items.append({"key": f"{row['id']}@{other}", "id": row["id"], "persona": row["persona"],
                          "stage": row["stage"], "answer_stage": other, "type": row["type"],
                          "input": row["input"]})
    return _response_step(ctx, "cross_temporal", items, "cross_temporal")
