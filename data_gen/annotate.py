"""The steps that call the annotator: plan (seed paragraph + input type per item), inputs, responses
(RAG + CoT), and the cross-temporal answers used for DPO. Each step appends one JSONL row per item as
answers arrive, and on a rerun asks only for the items it does not have yet."""

from __future__ import annotations

import dataclasses
import hashlib
import random

from data_gen.backends import Request, Result
from data_gen.prompts import parse_input, parse_response
from persllm_jax.io import Appender, read_jsonl

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


class Step:
    """One resumable annotator step: rows already in work/<name>.jsonl are kept (failed ones are asked
    again); new rows are appended as answers arrive. Request keys are "<step>|<item key>"."""

    def __init__(self, ctx, name: str, make_request, on_answer, total: int):
        self.name, self.make_request, self.on_answer = name, make_request, on_answer
        self.path = ctx.work / f"{name}.jsonl"
        self.done = {r["key"]: r for r in read_jsonl(self.path, torn_tail=True, missing_ok=True) if r.get("reason") != FAILED}
        self.items: dict[str, dict] = {}
        self.bar = ctx.progress(name, total=total)
        self.out = Appender(self.path)

    def request(self, it: dict) -> Request | None:
        """The request for an item, or None when its row exists already."""
        self.items[it["key"]] = it
        if it["key"] in self.done:
            self.bar.update(1)
            return None
        r = self.make_request(it)
        return dataclasses.replace(r, key=f"{self.name}|{it['key']}")

    def answer(self, key: str, res: Result) -> dict:
        it = self.items[key]
        if res.text is None:
            row = {"key": key, "reason": FAILED, "error": res.error}
        else:
            row = {"key": key, **self.on_answer(it, res.text)}
        self.out.write(row)
        self.done[key] = row
        self.bar.update(1)
        return row

    def close(self):
        self.out.close()
        self.bar.close()


def run_steps(ctx, steps: dict, first: list, then=None) -> None:
    """Run requests through the backend, routing each answer to its step; `then(step, item, row)` may
    return follow-up requests for a later step (so steps overlap instead of waiting for each other)."""

    def on_result(req: Request, res: Result):
        name, key = req.key.split("|", 1)
        row = steps[name].answer(key, res)
        return then(name, steps[name].items[key], row) if then else None

    try:
        ctx.backend.run([r for r in first if r is not None], on_result)
    finally:
        for st in steps.values():
            st.close()


def _input_request(ctx, it):
    p, s = ctx.personas[it["persona"]], ctx.personas[it["persona"]].stage(it["stage"])
    t = ctx.templates(p)
    seed = ctx.chunk_by_id[it["seed_id"]].text
    system = t.render(f"input_{it['type']}.j2", name=p.name, description=p.description, label=s.label,
                      stage_description=s.description, seed=seed, kind=it["seed_kind"])
    user = t.render("input_user.j2", name=p.name, label=s.label, seed=seed, kind=it["seed_kind"])
    return Request(it["key"], ({"role": "system", "content": system}, {"role": "user", "content": user}),
                   seed=stable_seed(ctx.cfg["seed"], "input", it["key"]), **_sampling(ctx, "inputs"))


def inputs_and_responses(ctx, items: list[dict]) -> tuple[dict, dict]:
    """Generate each item's input, then (as soon as it is in) its in-persona CoT response."""
    mx = int(ctx.cfg["inputs"]["max_words"])

    def input_answer(it, text):
        inp, reason = parse_input(text, it["type"], mx)
        return {"input": inp, "reason": reason, "raw": text}

    inputs = Step(ctx, "inputs", lambda it: _input_request(ctx, it), input_answer, total=len(items))
    responses = _response_stepper(ctx, "responses", "response", total=len(items))

    def response_item(it, row):
        return dict(it, input=row["input"], answer_stage=it["stage"])

    def then(name, it, row):
        if name != "inputs":
            return None
        if row.get("input"):
            return [responses.request(response_item(it, row))]
        responses.bar.update(1)  # no input (rejected or failed): no response to wait for
        return None

    first = []
    for it in (dict(it, key=it["id"]) for it in items):
        r = inputs.request(it)
        if r is not None:
            first.append(r)
        elif inputs.done[it["key"]].get("input"):
            first.append(responses.request(response_item(it, inputs.done[it["key"]])))
        else:
            responses.bar.update(1)
    run_steps(ctx, {"inputs": inputs, "responses": responses}, first, then)
    return inputs.done, responses.done


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


def _response_stepper(ctx, name: str, tag: str, total: int) -> Step:
    rc = ctx.cfg["responses"]

    def make(it):
        seed_chunk = ctx.chunk_by_id[it["seed_id"]] if it.get("seed_id") else None
        msgs = response_messages(ctx, it["persona"], it["answer_stage"], it["type"], it["input"], seed_chunk)
        return Request(it["key"], msgs, seed=stable_seed(ctx.cfg["seed"], tag, it["key"]),
                       **_sampling(ctx, "responses"))

    def answer(it, text):
        parsed, reason = parse_response(text, rc)
        a, r = parsed if parsed else (None, None)
        return {"analysis": a, "response": r, "reason": reason, "raw": None if parsed else text}

    return Step(ctx, name, make, answer, total)


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
    step = _response_stepper(ctx, "cross_temporal", "cross_temporal", total=len(items))
    run_steps(ctx, {"cross_temporal": step}, [step.request(it) for it in items])
    return {it["key"]: step.done[it["key"]] for it in items if it["key"] in step.done}
