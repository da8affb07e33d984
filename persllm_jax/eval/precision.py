"""Knowledge and attitude precision with an LLM judge (paper §3.3, LLaMA-3.1-70B there): the judge classifies each
test item as a knowledge question, an attitude question or neither, then scores the generated answer 0-5 against
the reference (0 = obviously conflicting, 5 = the same). Averages are weighted by item counts (each item counts
once), per class and per persona, stage and input type. Unparsable judge replies are counted, never fatal.

The judge reuses data_gen's backends (`openai:MODEL` for any OpenAI-compatible endpoint, `local:PATH`), with their
retries, concurrency and on-disk response cache."""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from persllm_jax.eval import EvalError
from persllm_jax.io import cache_root

CLASSIFY_PROMPT = """Given a question asked to {name} and {name}'s answer, decide what the question tests.

[Question]
{question}

[Answer]
{reference}

Reply with exactly one of: 'Knowledge question' (facts, events, experiences, skills), 'Attitude question' \
(opinions, feelings, values, stance), or 'Neither'."""

SCORE_PROMPT = """You are a social expert. Evaluate whether the two responses express the same {what}.

[Question]
{question}

[Response 1]
{answer}

[Response 2]
{reference}

Give a score between 0 and 5: 0 means obviously conflicting information, 5 means exactly the same {what}. \
Reply in the form "Score: N"."""

CLASSES = ("knowledge", "attitude", "neither")


def parse_class(text: str | None) -> str | None:
    if not text:
        return None
    t = text.lower()
    hits = [(t.find(c), c) for c in CLASSES if c in t]
    return min(hits)[1] if hits else None


def parse_score(text: str | None) -> int | None:
    """The 0-5 score of a judge reply ("Score: 4", "4/5", "4"); None when there is no such number."""
    if not text:
        return None
    m = re.search(r"score\s*[:=]?\s*\**\s*([0-5](?:\.\d+)?)\b", text, re.IGNORECASE) or \
        re.search(r"(?<![\d.])([0-5](?:\.\d+)?)\s*(?:/|out of)\s*5\b", text) or re.fullmatch(r"\s*\**([0-5](?:\.\d+)?)\**\.?\s*", text)
    if m is None:
        return None
    v = float(m.group(1))
    return v if 0 <= v <= 5 else None


class Judge:
    """An LLM judge over a data_gen backend. `ask` returns {key: reply or None} and counts failed requests."""

    def __init__(self, spec: str, base_url: str | None = None, cache_dir: str | Path | None = None, cfg: dict | None = None,
                 progress: bool = False):
        from data_gen.backends import make_backend
        from data_gen.config import DEFAULTS
        from data_gen.errors import DataGenError

        conf = {**DEFAULTS["annotator"], **(cfg or {})}
        self.max_tokens = int(conf.pop("max_tokens", 64))
        try:
            self.backend = make_backend(spec, base_url, conf, Path(cache_dir or cache_root() / "judge"))
        except DataGenError as e:
            raise EvalError(f"--judge {spec}: {e}") from None
        self.identity = self.backend.identity
        self.failed = 0
        self.progress = progress  # a tqdm bar on stderr per `ask`

    def ask(self, prompts: dict[str, str]) -> dict[str, str | None]:
        from data_gen.backends import Request

        out: dict[str, str | None] = {}
        reqs = [Request(k, ({"role": "user", "content": p},), self.max_tokens, 0.0, 1.0, 0) for k, p in prompts.items()]

        from tqdm import tqdm

        bar = tqdm(total=len(reqs), desc="eval judge", unit="request", file=sys.stderr, disable=not self.progress,
                   dynamic_ncols=True)

        def done(req, res):
            out[req.key] = res.text
            if res.text is None:
                self.failed += 1
            bar.update(1)

        with bar:
            self.backend.run(reqs, done)
        return out

    def close(self):
        self.backend.close()


def classify_items(judge: Judge, items: list[dict]) -> dict[str, str | None]:
    """{item id: knowledge | attitude | neither | None (unparsable or failed)} for test items {id, name, question, reference}."""
    replies = judge.ask({it["id"]: CLASSIFY_PROMPT.format(**it) for it in items})
    return {k: parse_class(v) for k, v in replies.items()}


def score_answers(judge: Judge, answers: list[dict], classes: dict[str, str | None]) -> list[dict]:
    """Scores answers {key, id, name, question, reference, answer, persona, stage, type}; returns records with
    `class`, `score` (None when unparsable), `reply_ok`."""
    what = {"knowledge": "knowledge", "attitude": "attitude and opinion"}
    todo = {a["key"]: SCORE_PROMPT.format(what=what[classes[a["id"]]], **a) for a in answers
            if classes.get(a["id"]) in what}
    replies = judge.ask(todo)
    recs = []
    for a in answers:
        c = classes.get(a["id"])
        s = parse_score(replies.get(a["key"])) if a["key"] in todo else None
        recs.append({**{k: a[k] for k in ("key", "id", "persona", "stage", "type")}, "class": c, "score": s,
                     "judged": a["key"] in todo, "unparsable": a["key"] in todo and replies.get(a["key"]) is not None and s is None})
    return recs


def _mean(recs: list[dict]) -> dict:
    scores = [r["score"] for r in recs if r["score"] is not None]
    return {"mean": sum(scores) / len(scores) if scores else None, "n": len(scores)}


def aggregate(records: list[dict]) -> dict:
    """Per class (knowledge, attitude) and overall (both, weighted by count), each also by persona, stage, type."""
    out: dict = {"unparsable_class": sum(r["class"] is None for r in records),
                 "unparsable_score": sum(bool(r.get("unparsable")) for r in records),
                 "neither": sum(r["class"] == "neither" for r in records)}
    pools = {"knowledge": [r for r in records if r["class"] == "knowledge"],
             "attitude": [r for r in records if r["class"] == "attitude"]}
    pools["overall"] = pools["knowledge"] + pools["attitude"]
    for name, recs in pools.items():
        entry = _mean(recs)
        for dim, keyf in (("by_persona", lambda r: r["persona"]), ("by_stage", lambda r: f"{r['persona']}/{r['stage']}"),
                          ("by_type", lambda r: r["type"])):
            groups = defaultdict(list)
            for r in recs:
                groups[keyf(r)].append(r)
            entry[dim] = {k: _mean(v) for k, v in sorted(groups.items())}
        out[name] = entry
    return out
