"""The optional material classifier: paragraphs in a stage's unsorted/ folder are sorted into objective
and subjective by the annotator (template classify.j2), a resumable step like the others."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from data_gen.annotate import Step, run_steps, stable_seed
from data_gen.backends import Request
from data_gen.errors import DataGenError
from data_gen.materials import KINDS, UNSORTED

_WORD = re.compile(r"\b(objective|subjective)\b", re.IGNORECASE)


def parse_kind(text: str) -> str | None:
    m = _WORD.search(text or "")
    return m.group(1).lower() if m else None


def classify_unsorted(ctx, chunks: list) -> tuple[list, dict]:
    """Chunks with every unsorted one given its kind (ids `<persona>/<stage>/<obj|sub>/uNNNN`); unclear
    answers are left out and counted. Errors if a stage ends up without objective or subjective text."""
    unsorted = [c for c in chunks if c.kind == UNSORTED]
    if not unsorted:
        return chunks, {}

    def make(it):
        c = it["chunk"]
        p = ctx.personas[c.persona]
        system = ctx.templates(p).render("classify.j2", name=p.name, description=p.description,
                                         label=p.stage(c.stage).label)
        return Request(it["key"], ({"role": "system", "content": system}, {"role": "user", "content": c.text}),
                       max_tokens=8, temperature=0.0, top_p=1.0, seed=stable_seed(ctx.cfg["seed"], "classify", c.id))

    def answer(it, text):
        kind = parse_kind(text)
        return {"kind": kind, "reason": None if kind else "unclear", "raw": text}

    step = Step(ctx, "classify", make, answer, total=len(unsorted))
    run_steps(ctx, {"classify": step}, [step.request({"key": c.id, "chunk": c}) for c in unsorted])
    out = [c for c in chunks if c.kind != UNSORTED]
    stats: Counter = Counter()
    for c in unsorted:
        row = step.done.get(c.id) or {}
        kind = row.get("kind")
        stats[kind or row.get("reason") or "missing"] += 1
        if kind:
            n = c.id.rsplit("/", 1)[1]
            out.append(dataclasses.replace(c, id=f"{c.persona}/{c.stage}/{kind[:3]}/u{n}", kind=kind))
    for p in ctx.personas.values():
        for s in p.stages:
            for kind in KINDS:
                if not any(c.persona == p.key and c.stage == s.id and c.kind == kind for c in out):
                    raise DataGenError(f"{p.path / s.id}: no {kind} paragraphs after sorting unsorted/ "
                                       f"({dict(stats)}); add a {kind}/ folder")
    return out, dict(stats)
