"""Point-in-time evaluation: does the persona at stage T know what it knew then, and nothing after?

Probes (data_gen/probes.py; TimeChara files read as they are, data_gen/timechara.py) are asked under the
system message of the stage they are asked at, and scored two ways:
- judge-free: the model's log-likelihood (mean per token) of the consistent answer against each inconsistent
  one; a probe is right when the consistent answer beats all of them. Accuracy per kind (with a bootstrap
  interval), and a leakage matrix per system: for the knowledge questions (future and past-only), the share of
  probes where the model claims to know the fact, by stage asked x stage of the fact (ideal: 1 on and below
  the diagonal, 0 above it);
- judged: the model's free answer, judged 0/1 for spatiotemporal consistency against the probe's facts by an
  LLM judge, following TimeChara's protocol (reasoning, then the score on the last line; an answer must pass
  the spatial fact, when there is one, and the temporal fact); unparsable judgements are counted, not scored.
- contrasts (judge-free, prior-free): the same question with the same answers in two conditions, so the answers'
  own likelihood cancels (a fact copied from the question is likely whatever the stage, and with fixed answer
  templates the per-kind accuracy can be decided by the templates alone). `future`: a fact asked before its stage
  (a future probe) and at or after it (the past-only probe of the same question): right when the model affirms
  the fact more where it is known, i.e. margin(past-only) + margin(future) > 0. `presence`: an event the persona
  took part in against one it did not, same persona and stage asked: right when it claims presence more for the
  first, margin(past-presence) + margin(past-absence) > 0. Accuracy over the pairs (a tie counts 1/2), with a
  bootstrap interval; 0.5 is a model that ignores the stage.
Premise calibration (anti-induction): `error` probes (false premise: reject) and their matched `control`
probes (true premise: accept); over-refusal = share of controls rejected, calibration = mean of the refute
rate and 1 - over-refusal (a persona that refuses everything scores 0.5, not 1).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from persllm_jax.eval import EvalError

DEFAULTS = {"enabled": True, "probes": None, "max_per_cell": None, "batch_size": 8, "normalize": "mean",
            "max_new_tokens": 96, "judge_max_tokens": 512, "bootstrap": 1000}
KNOWLEDGE = ("future", "past-only")  # the kinds that ask whether the persona knows a fact

JUDGE_PROMPT = """You rate a role-play answer given by an AI playing {name} at {label}.

[Interview]
Interviewer: {question}
{name}: {answer}

[Fact]
{fact}

[Criterion]
Spatiotemporal consistency (0 or 1): does the answer stay within what {name} knows at {label}, as the [Fact] \
describes? If the answer shows knowledge that contradicts the [Fact] or lies outside {name}'s knowledge at that \
time (or claims a presence the [Fact] rules out), the score is 0; otherwise it is 1.

Reason step by step first. Then write the score alone on the last line."""


def probe_files(given, configured, corpus) -> list[str]:
    """The probe files to read: those given (--probes), else the config's timeline.probes (a path or a list),
    else the corpus's probes.jsonl and controls.jsonl where they exist and hold rows (a test split without
    `error` items has an empty controls.jsonl)."""
    if given:
        return list(given)
    if configured:
        return [configured] if isinstance(configured, str) else list(configured)
    return [str(p) for p in (Path(corpus) / "probes.jsonl", Path(corpus) / "controls.jsonl")
            if p.is_file() and p.read_text(encoding="utf-8").strip()]


def load(paths, max_per_cell: int | None = None) -> tuple[list[dict], list[dict]]:
    """(probes, sources): every probe file (ours or TimeChara's), optionally at most max_per_cell per persona,
    kind, asked stage and fact stage (_capped), in file order."""
    from data_gen.timechara import load_any

    probes, sources, seen = [], [], set()
    for path in paths:
        rows, fmt = load_any(path)  # a bad file raises DataGenError naming file:line
        kept = []
        for r in rows if max_per_cell is None else _capped(rows, int(max_per_cell)):
            if r["id"] in seen:
                raise EvalError(f"{path}: probe id {r['id']!r} also in an earlier probe file")
            seen.add(r["id"])
            kept.append(r)
        origins = defaultdict(int)
        for r in kept:
            origins[r.get("origin") or "hand"] += 1
        sources.append({"path": str(path), "format": fmt, "n": len(kept), "n_in_file": len(rows),
                        "origins": dict(origins)})
        probes += kept
    return probes, sources


def _capped(rows: list[dict], cap: int) -> list[dict]:
    """At most `cap` probes per (persona, kind, asked stage, fact stage), chosen so the stage contrasts have pairs:
    questions asked in several cells first (a fact asked before and after its stage), then by a hash of the
    question (a fixed, order-free choice); kept in file order."""
    cell = lambda r: (r["persona"], r["kind"], r["stage"], r.get("fact_stage"))  # noqa: E731
    cells_of = defaultdict(set)
    for r in rows:
        cells_of[(r["persona"], r["question"])].add(cell(r))
    rank = sorted(range(len(rows)), key=lambda i: (-len(cells_of[(rows[i]["persona"], rows[i]["question"])]),
                                                   hashlib.sha1(rows[i]["question"].encode()).hexdigest()))
    per, keep = defaultdict(int), set()
    for i in rank:
        per[cell(rows[i])] += 1
        if per[cell(rows[i])] <= cap:
            keep.add(i)
    return [r for i, r in enumerate(rows) if i in keep]


def system_messages(rows: list[dict]) -> dict[tuple[str, str], str]:
    """{(persona, stage): the corpus's system message} from the test rows, so probes ask as training did."""
    out = {}
    for r in rows:
        sys_msg = next((m["content"] for m in r["messages"] if m["role"] == "system"), None)
        if sys_msg is not None:
            out.setdefault((r["persona"], r["stage"]), sys_msg)
    return out


def conversation(probe: dict, corpus_system: dict, system_fn=None) -> list[dict]:
    msg = probe.get("system") or corpus_system.get((probe["persona"], probe["stage"])) or \
        f"You are {probe['name']}. Now it's {probe['label']}."
    if system_fn is not None:
        msg = system_fn(msg, probe)
    return [{"role": "system", "content": msg}, {"role": "user", "content": probe["question"]}]


# -- judge-free -----------------------------------------------------------------------------------

def score_free(answer_scorer, probes: list[dict], convs: list[list[dict]]) -> list[dict]:
    """answer_scorer(conversations, answers) -> log-likelihoods. One record per probe: correct, margin
    (consistent minus the best inconsistent answer) and whether the model claims to know the fact."""
    flat_c, flat_a, spans = [], [], []
    for p, c in zip(probes, convs):
        answers = [p["consistent"]] + list(p["inconsistent"])
        spans.append((len(flat_a), len(answers)))
        flat_c += [c] * len(answers)
        flat_a += answers
    scores = np.asarray(answer_scorer(flat_c, flat_a), np.float64)
    if scores.shape != (len(flat_a),):
        raise EvalError(f"answer scorer returned shape {scores.shape}, expected {(len(flat_a),)}")
    recs = []
    for p, (s, n) in zip(probes, spans):
        good, bad = scores[s], scores[s + 1:s + n].max()
        ok = bool(good > bad)
        recs.append({"id": p["id"], "persona": p["persona"], "stage": p["stage"], "fact_stage": p.get("fact_stage"),
                     "kind": p["kind"], "question": p["question"], "correct": ok, "margin": float(good - bad),
                     "claims_knowledge": (ok if p["kind"] == "past-only" else not ok) if p["kind"] in KNOWLEDGE else None})
    return recs


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float] | None:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_boot), v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def _acc(recs, key="correct", n_boot=1000, seed=0) -> dict:
    vals = [float(r[key]) for r in recs if r.get(key) is not None]
    return {"accuracy": float(np.mean(vals)) if vals else None, "n": len(vals),
            "ci95": bootstrap_ci(vals, n_boot, seed) if vals and n_boot else None}


def leakage(recs: list[dict], stage_order: dict[str, list[str]] | None = None) -> dict:
    """{"stages": [...], "cells": {asked: {fact: {"claims": rate, "n": n}}}} over the knowledge probes, stages
    matched by id across personas (each persona's own matrix under "per_persona")."""
    def matrix(rs, order):
        cells: dict = defaultdict(lambda: defaultdict(list))
        for r in rs:
            if r["claims_knowledge"] is not None and r["fact_stage"] is not None:
                cells[r["stage"]][r["fact_stage"]].append(float(r["claims_knowledge"]))
        stages = list(dict.fromkeys([s for s in order if s in cells or any(s in v for v in cells.values())] +
                                    sorted(set(cells) | {f for v in cells.values() for f in v})))
        return {"stages": stages, "cells": {a: {f: {"claims": float(np.mean(v)), "n": len(v)} for f, v in row.items()}
                                            for a, row in cells.items()}}

    order = list(dict.fromkeys(s for st in (stage_order or {}).values() for s in st))
    per = defaultdict(list)
    for r in recs:
        per[r["persona"]].append(r)
    return {**matrix(recs, order),
            "per_persona": {p: matrix(rs, (stage_order or {}).get(p, [])) for p, rs in sorted(per.items())}}


def contrasts(recs: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """The prior-free pair accuracies (module docstring): "future" over (future, past-only) probes of the same
    persona and question, "presence" over (past-presence, past-absence) probes of the same persona and asked stage."""
    by = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get("margin") is not None:
            by[r["kind"]][(r["persona"], r["question"] if r["kind"] in KNOWLEDGE else r["stage"])].append(r["margin"])
    out = {}
    for name, (k1, k2) in (("future", ("past-only", "future")), ("presence", ("past-presence", "past-absence"))):
        vals = [float(np.sign(a + b) + 1) / 2 for key, ms in by[k1].items() for a in ms for b in by[k2].get(key, [])]
        out[name] = {"accuracy": float(np.mean(vals)) if vals else None, "n": len(vals),
                     "ci95": bootstrap_ci(vals, n_boot, seed) if vals and n_boot else None}
    return out


def summarise(recs: list[dict], stage_order=None, n_boot: int = 1000, seed: int = 0, key: str = "correct") -> dict:
    by_kind = defaultdict(list)
    for r in recs:
        by_kind[r["kind"]].append(r)
    time_recs = [r for r in recs if r["kind"] not in ("error", "control")]
    out = {"per_kind": {k: _acc(v, key, n_boot, seed) for k, v in sorted(by_kind.items())},
           "overall": _acc(time_recs, key, n_boot, seed),
           "per_persona": {}}
    per = defaultdict(list)
    for r in time_recs:
        per[r["persona"]].append(r)
    for p, rs in sorted(per.items()):
        kinds = defaultdict(list)
        for r in rs:
            kinds[r["kind"]].append(r)
        out["per_persona"][p] = {k: _acc(v, key, 0) for k, v in sorted(kinds.items())}
    if key == "correct":
        out["leakage"] = leakage(recs, stage_order)
        out["contrasts"] = contrasts(recs, n_boot, seed)
    out["premise"] = premise(by_kind.get("error", []), by_kind.get("control", []), key)
    return out


def premise(errors: list[dict], controls: list[dict], key: str = "correct") -> dict:
    """Refute rate on false premises, over-refusal on the matched true premises, and their balance."""
    e = [float(r[key]) for r in errors if r.get(key) is not None]
    c = [1.0 - float(r[key]) for r in controls if r.get(key) is not None]
    refute = float(np.mean(e)) if e else None
    over = float(np.mean(c)) if c else None
    return {"refute_rate": refute, "n_error": len(e), "over_refusal_rate": over, "n_control": len(c),
            "calibration": (refute + 1 - over) / 2 if refute is not None and over is not None else None}


def free_scorer(gen, batch_size: int = 8, normalize: str = "mean"):
    from persllm_jax.serve.scoring import answer_logprobs

    return lambda convs, answers: answer_logprobs(gen, convs, answers, batch_size, normalize)


# -- judged ---------------------------------------------------------------------------------------

def parse_judgement(text: str | None) -> int | None:
    """TimeChara's reading: the last 0/1 on the last non-empty line (else a lone YES/NO there); None if neither."""
    if not text or not text.strip():
        return None
    last = [ln for ln in text.strip().split("\n") if ln.strip()][-1]
    digits = re.findall(r"(?<![\d.])([01])(?![\d.])", last)
    if digits:
        return int(digits[-1])
    m = re.findall(r"\b(yes|no)\b", last, re.IGNORECASE)
    return None if not m else int(m[-1].lower() == "yes")


def free_answers(gen, convs: list[list[dict]], max_new_tokens: int, batch_size: int = 8, seed: int = 0) -> list[str]:
    """Greedy answers (the `[Response]` part of a CoT answer)."""
    from persllm_jax.eval.corpus import response_part
    from persllm_jax.serve.engine import SamplingParams

    out = [None] * len(convs)
    order = sorted(range(len(convs)), key=lambda i: sum(len(m["content"]) for m in convs[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        comps = gen.chat([convs[i] for i in idx], SamplingParams(max_new_tokens=int(max_new_tokens), seed=seed))
        for i, c in zip(idx, comps):
            out[i] = response_part(c.text)
    return out


def judge_answers(judge, system_name: str, probes: list[dict], answers: list[str]) -> list[dict]:
    """One record per probe: consistent (1/0/None), the raw verdicts, and `unparsable` when a verdict could not
    be read (a failed request is None too, counted as failed)."""
    prompts = {}
    for p, a in zip(probes, answers):
        for tag, fact in (("spatial", p.get("spatial")), ("temporal", p.get("fact"))):
            if fact:
                prompts[f"{system_name}::{p['id']}::{tag}"] = JUDGE_PROMPT.format(
                    name=p["name"], label=p["label"], question=p["question"], answer=a, fact=fact)
    replies = judge.ask(prompts)
    recs = []
    for p, a in zip(probes, answers):
        verdicts, unparsable, failed = {}, False, False
        for tag in ("spatial", "temporal"):
            k = f"{system_name}::{p['id']}::{tag}"
            if k not in prompts:
                continue
            text = replies.get(k)
            v = parse_judgement(text)
            verdicts[tag] = v
            failed |= text is None
            unparsable |= text is not None and v is None
        vals = list(verdicts.values())
        consistent = 0 if 0 in vals else (None if not vals or None in vals else 1)
        recs.append({"id": p["id"], "persona": p["persona"], "stage": p["stage"], "fact_stage": p.get("fact_stage"),
                     "kind": p["kind"], "answer": a, "verdicts": verdicts, "consistent": consistent,
                     "unparsable": unparsable and consistent is None, "failed": failed and consistent is None})
    return recs


# -- wiring into `persllm eval` ------------------------------------------------------------------

def stage_order(manifest: dict, probes: list[dict]) -> dict[str, list[str]]:
    out = {p: [s["id"] for s in info.get("stages") or []] for p, info in ((manifest or {}).get("personas") or {}).items()}
    for r in probes:
        out.setdefault(r["persona"], [])
        for s in (r["stage"], r.get("fact_stage")):
            if s is not None and s not in out[r["persona"]]:
                out[r["persona"]].append(s)
    return out


def evaluate_system(system, probes: list[dict], corpus_system: dict, desc: dict, cfg: dict, order: dict,
                    with_answers: bool = False, scorer=None) -> tuple[dict, list[str] | None]:
    """(results["systems"][name]["timeline"], free answers for the judge or None) for one system."""
    from persllm_jax.eval.runner import persona_system

    sysfn = (lambda msg, p: persona_system(msg, p["persona"], p["stage"], desc)) if system.persona_prompt else None
    convs = [conversation(p, corpus_system, sysfn) for p in probes]
    scorer = scorer or free_scorer(system.gen, int(cfg["batch_size"]), cfg["normalize"])
    recs = score_free(scorer, probes, convs)
    res = {"free": summarise(recs, order, int(cfg["bootstrap"])), "records": recs}
    answers = free_answers(system.gen, convs, int(cfg["max_new_tokens"]), int(cfg["batch_size"])) if with_answers else None
    return res, answers


def judge_systems(judge_spec: str, base_url, cache_dir, judge_cfg: dict, cfg: dict, results: dict,
                  probes: list[dict], answers: dict[str, list[str]], order: dict, progress: bool = False) -> None:
    """Adds results["systems"][name]["timeline"]["judged"] for every system with free answers."""
    from persllm_jax.eval.precision import Judge

    j = Judge(judge_spec, base_url, cache_dir, {**judge_cfg, "max_tokens": int(cfg["judge_max_tokens"])},
              progress=progress)
    try:
        for name, ans in answers.items():
            recs = judge_answers(j, name, probes, ans)
            s = summarise(recs, order, int(cfg["bootstrap"]), key="consistent")
            s["unparsable"] = sum(r["unparsable"] for r in recs)
            s["failed"] = sum(r["failed"] for r in recs)
            s["records"] = recs
            results["systems"][name]["timeline"]["judged"] = s
    finally:
        j.close()
