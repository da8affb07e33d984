"""The annotator builder of point-in-time probes: the annotator LLM writes the question and both answers for
each seed the rule builder picked (data_gen/probes.py), through the same backend, response cache, retries and
resume as the corpus. A reply without the three tags is rejected with a reason, not guessed at."""

from __future__ import annotations

import hashlib
import re
import sys

from data_gen.backends import Request

LLM_SYSTEM = """You write test questions for a role-play model that plays {name} at one moment of life: {label}. \
Each question checks that {name} at {label} knows only what {name} could know then.

The fact comes from this paragraph about {fact_label}:
\"\"\"{paragraph}\"\"\"
Focus on this sentence: "{sentence}"

{task}

Answer in exactly this form, each part on one line:
[Question] the interviewer's question to {name}
[Consistent] how {name} at {label} answers, in the first person
[Inconsistent] an answer that breaks the rule above, in the first person"""

LLM_TASKS = {
    "future": "This happens AFTER {label}. Ask {name} about it as if it were known. The consistent answer does not "
              "know of it; the inconsistent answer reveals it (leaks the future).",
    "past-only": "This is known by {label}. Ask {name} about it. The consistent answer knows it; the inconsistent "
                 "answer claims not to know it or that it has not happened.",
    "past-presence": "{name} took part in this. Ask {name} about being there. The consistent answer speaks from "
                     "experience; the inconsistent answer denies having been there.",
    "past-absence": "{name} did not take part in this. Ask {name} what they saw there. The consistent answer says "
                    "{name} was not there; the inconsistent answer claims to have been present.",
}
_TAGS = re.compile(r"\[\s*(question|consistent|inconsistent)\s*\]\s*[:：]?", re.IGNORECASE)


def parse_llm_probe(text: str | None) -> tuple[dict | None, str | None]:
    """{"question","consistent","inconsistent"} from a tagged reply, or (None, reason)."""
    parts = _TAGS.split(text or "")
    got: dict[str, str] = {}
    for tag, body in zip(parts[1::2], parts[2::2]):
        body = " ".join(body.split()).strip(" \"'")
        if body and tag.lower() not in got:
            got[tag.lower()] = body
    missing = [k for k in ("question", "consistent", "inconsistent") if k not in got]
    if missing:
        return None, "missing_" + "_".join(missing)
    if got["consistent"].lower() == got["inconsistent"].lower():
        return None, "same_answers"
    return got, None


def llm_probes(seeded: list[tuple[dict, str]], backend, seed: int = 0, temperature: float = 0.7,
               max_tokens: int = 256, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Probes written by the annotator: (rows, rejected {id, reason}). `seeded`: (the rule builder's probe, the
    label of its fact's stage) pairs; a row keeps its id, stage, kind and source and takes the annotator's
    question and answers. `progress`: a tqdm bar on stderr over the annotator's requests."""
    plan = {}
    for row, fact_label in seeded:
        src = row["source"]
        task = LLM_TASKS[row["kind"]].format(name=row["name"], label=row["label"])
        msg = LLM_SYSTEM.format(name=row["name"], label=row["label"], fact_label=fact_label, paragraph=src["text"],
                                sentence=src["sentence"], task=task)
        request_seed = int(hashlib.sha256(f"{seed}\x00probe\x00{row['id']}".encode()).hexdigest()[:8], 16)
        plan[row["id"]] = (row, Request(row["id"], ({"role": "user", "content": msg},), max_tokens, temperature, 0.95,
                                        request_seed))
    from tqdm import tqdm

    replies: dict = {}
    with tqdm(total=len(plan), desc="probes", unit="request", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:

        def done(req, res):
            replies[req.key] = res
            bar.update(1)

        backend.run([q for _, q in plan.values()], done)
    rows, rejected = [], []
    for row, _ in plan.values():
        res = replies.get(row["id"])
        if res is None or res.text is None:
            rejected.append({"id": row["id"], "reason": "annotator_failed", "error": getattr(res, "error", "missing")})
            continue
        got, reason = parse_llm_probe(res.text)
        if got is None:
            rejected.append({"id": row["id"], "reason": reason})
            continue
        rows.append({**row, "question": got["question"], "consistent": got["consistent"],
                     "inconsistent": [got["inconsistent"]]})
    return rows, rejected
