"""Point-in-time probes (TimeChara's four kinds) from persona folders, and premise controls for anti-induction.

A probe asks the persona, at one stage, about a fact from the objective material of one stage (its own, an
earlier or a later one) and holds the answer a consistent persona gives and the answers that are not:

    future         fact from a later stage: the consistent answer is not knowing it (the leaking one recounts it)
    past-only      fact from its own or an earlier stage: the consistent answer knows it
    past-presence  an event the persona took part in (own or earlier stage): "I was there"
    past-absence   an event it did not take part in (own or earlier stage): "I was not there"
    error          a corpus `error` item (false premise): the consistent answer rejects it
    control        the true-premise question matched to an `error` item: the consistent answer accepts it

probes.jsonl / controls.jsonl, one JSON object a line (a person can write or fix them by hand):

    id            unique string
    persona       persona folder name (or a character name)      name   the persona's display name
    stage         the stage the question is asked at              label  that stage's time label ("1834")
    fact_stage    the stage whose material holds the fact (null when unknown)
    kind          one of KINDS above
    question      the user message
    consistent    the consistent answer (string)
    inconsistent  one or more inconsistent answers (list of strings)
    fact          what the persona at `stage` should (not) know, for an LLM judge (TimeChara's temporal label)
    spatial       optional: whether the persona was present, for the judge (TimeChara's spatial label)
    system        optional: the system message to ask under (default: the corpus's for persona and stage)
    error_id      controls and error probes: the corpus `error` item they belong to
    origin        rules | llm:<annotator model> | timechara | hand
    source        where it came from: {file, line, paragraph, text, sentence} for persona material

The rule builder takes the sentences of each stage's objective/*.txt|md (dated ones first), so every probe
points to a material paragraph; the annotator builder (data_gen/probes_llm.py) asks the annotator to write the
question and answers for the same seeds (same cache, retries and resume as the corpus). Stages are taken in
persona.yaml order as time order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from data_gen.errors import DataGenError
from data_gen.materials import SUFFIXES, Persona, count_words, load_personas, read_paragraphs
from persllm_jax.errors import InputError
from persllm_jax.io import iter_jsonl, write_jsonl

KINDS = ("future", "past-absence", "past-presence", "past-only", "error", "control")
TIME_KINDS = KINDS[:4]

# the answer templates: each pair is used both ways round, so a model's taste for one wording cancels across kinds
DONT_KNOW = "No, I know nothing about that. As far as I know, it has not happened."
KNOW = "Yes, I know about that. {sentence}"
WAS_THERE = "Yes, I was there myself and saw it happen."
NOT_THERE = "No, I was not there myself; I only heard about it from others."
ACCEPT = "Yes, that is true."
REFUSE = "No, that is not true."

Q_KNOW = 'Do you know about this: "{sentence}" What can you tell me about it?'
Q_THERE = 'Were you there yourself when this happened: "{sentence}" What do you remember of it?'
Q_CONTROL = 'I have read this: "{sentence}" Is that true?'

_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_NEG = re.compile(r"\b(not|never|no|nor)\b|n't\b", re.IGNORECASE)
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_PASTLIKE = re.compile(r"\b(was|were|had|did|\w{3,}ed)\b", re.IGNORECASE)
_FEMALE = re.compile(r"\b(she|her|hers|herself)\b", re.IGNORECASE)
_MALE = re.compile(r"\b(he|his|him|himself)\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Sentence:
    persona: str
    stage: str
    file: str  # relative to the personas folder
    line: int  # first line of the paragraph
    paragraph: int  # index of the paragraph in its file
    text: str  # the paragraph
    sentence: str

    @property
    def dated(self) -> bool:
        return bool(_YEAR.search(self.sentence))

    @property
    def eventlike(self) -> bool:
        return bool(_PASTLIKE.search(self.sentence))

    def source(self) -> dict:
        return {"file": self.file, "line": self.line, "paragraph": self.paragraph, "text": self.text,
                "sentence": self.sentence}


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENT.split(paragraph) if s.strip()]


def objective_sentences(p: Persona) -> list[Sentence]:
    """Every sentence of each stage's objective material, with its file, paragraph and line."""
    out = []
    root = p.path.parent
    for s in p.stages:
        d = p.path / s.id / "objective"
        if not d.is_dir():
            continue  # an unsorted/ stage: its facts are known only after the annotator sorts them
        for f in sorted(x for x in d.iterdir() if x.is_file() and x.suffix in SUFFIXES and not x.name.startswith(".")):
            for k, (line, para) in enumerate(read_paragraphs(f)):
                for sent in split_sentences(para):
                    if 5 <= count_words(sent) <= 60:
                        out.append(Sentence(p.key, s.id, str(f.relative_to(root)), line, k, para, sent))
    return out


class Involvement:
    """Whether a sentence is about the persona: its first name (not followed by another surname), its surname
    (not preceded by another first name, plurals like "the Curies" count) or its pronouns."""

    def __init__(self, p: Persona, sentences: list[Sentence]):
        parts = [w for w in re.findall(r"[^\W\d_]+", p.name) if w[0].isupper()]
        self.first, self.last = (parts[0], parts[-1]) if parts else ("", "")
        text = " ".join(s.sentence for s in sentences)
        self.pronouns = _FEMALE if len(_FEMALE.findall(text)) > len(_MALE.findall(text)) else _MALE

    def __call__(self, sentence: str) -> bool:
        if self.pronouns.search(sentence):
            return True
        for m in re.finditer(rf"\b{re.escape(self.first)}\b(?:\s+([A-Z][\w'-]*))?", sentence) if self.first else ():
            if m.group(1) is None or m.group(1).rstrip("'s") == self.last:
                return True
        for m in re.finditer(rf"(?:([A-Z][\w'-]*)\s+)?\b{re.escape(self.last)}(?:s|'s)?\b", sentence) if self.last else ():
            before = m.group(1)
            if before is None or before == self.first or m.start() == 0:
                return True
        return False


def _h(*parts) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()


def _probe(p: Persona, kind: str, asked, fact_stage, sent: Sentence, origin: str = "rules") -> dict:
    label, fact_label = asked.label, fact_stage.label
    s = sent.sentence
    know = KNOW.format(sentence=s)
    if kind in ("future", "past-only"):
        question = Q_KNOW.format(sentence=s)
        good, bad = (DONT_KNOW, [know]) if kind == "future" else (know, [DONT_KNOW])
        fact = (f"This happens later ({fact_label}), so {p.name} in {label} should neither know it nor reveal it: {s}"
                if kind == "future" else f"This happened by {fact_label}, so {p.name} in {label} knows it: {s}")
        spatial = None
    else:
        question = Q_THERE.format(sentence=s)
        good, bad = (WAS_THERE, [NOT_THERE]) if kind == "past-presence" else (NOT_THERE, [WAS_THERE])
        fact = f"This happened by {fact_label}, so {p.name} in {label} may know of it: {s}"
        spatial = (f"{p.name} took part in this and can speak of it from experience: {s}" if kind == "past-presence"
                   else f"{p.name} did not take part in this and should not claim to have been present: {s}")
    row = {"id": f"{p.key}/{kind}/{asked.id}<{fact_stage.id}/{_h(s)[:10]}", "persona": p.key, "name": p.name,
           "stage": asked.id, "label": label, "fact_stage": fact_stage.id, "kind": kind, "question": question,
           "consistent": good, "inconsistent": bad, "fact": fact}
    if spatial:
        row["spatial"] = spatial
    row["origin"] = origin
    row["source"] = sent.source()
    return row


def seeds(p: Persona, max_per_cell: int = 5, seed: int = 0, max_future_per_cell: int | None = 15
          ) -> list[tuple[str, object, object, Sentence]]:
    """(kind, asked stage, fact stage, sentence) for every cell kind x asked x fact stage, at most max_per_cell
    each (future cells: max_future_per_cell, the kind TimeChara finds hardest): dated sentences first, then ones
    that read like events, then a seeded order, so cells spread over the paragraphs. An absence needs a
    paragraph that never mentions the persona (a sentence of a paragraph about the persona may still be hers)."""
    sents = objective_sentences(p)
    involved = Involvement(p, sents)
    para_involved = {(x.file, x.paragraph) for x in sents if involved(x.sentence)}
    order = {s.id: i for i, s in enumerate(p.stages)}
    out = []
    for asked in p.stages:
        for fact in p.stages:
            pool = [x for x in sents if x.stage == fact.id]
            cells = {}
            if order[fact.id] > order[asked.id]:
                cells["future"] = pool
            else:
                cells["past-only"] = pool
                cells["past-presence"] = [x for x in pool if involved(x.sentence) and not _NEG.search(x.sentence)]
                cells["past-absence"] = [x for x in pool if (x.file, x.paragraph) not in para_involved]
            for kind, cands in cells.items():
                cap = max_future_per_cell if kind == "future" and max_future_per_cell is not None else max_per_cell
                cands = sorted(cands, key=lambda x: (not x.dated, not x.eventlike, _h(seed, kind, asked.id, x.sentence)))
                out += [(kind, asked, fact, x) for x in cands[:cap]]
    return out


def rule_probes(personas: list[Persona], max_per_cell: int = 5, seed: int = 0,
                max_future_per_cell: int | None = 15) -> list[dict]:
    rows = [_probe(p, kind, a, f, x) for p in personas
            for kind, a, f, x in seeds(p, max_per_cell, seed, max_future_per_cell)]
    return _unique(rows)


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


# -- premise controls ----------------------------------------------------------------------------

def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[^\W_]{3,}", text)}


def control_pair(error_row: dict, candidates: list[Sentence]) -> list[dict]:
    """The `error` item as a probe (reject the premise) and its matched true-premise control (accept it): the
    control asks about the candidate sentence sharing most words with the error question (dated first)."""
    q = error_row["question"]
    best = max(candidates, key=lambda x: (len(_words(x.sentence) & _words(q)), x.dated, -len(x.sentence)))
    base = {k: error_row[k] for k in ("persona", "name", "stage", "label")}
    eid = error_row["id"]
    err = {"id": f"{eid}/error", **base, "fact_stage": None, "kind": "error", "question": q, "consistent": REFUSE,
           "inconsistent": [ACCEPT], "fact": f"The question holds a false premise or a claim that conflicts with the "
           f"facts about {base['name']}; a consistent answer corrects it.", "error_id": eid, "origin": "corpus",
           "source": error_row.get("source") or {"corpus_id": eid}}
    ctl = {"id": f"{eid}/control", **base, "fact_stage": best.stage, "kind": "control",
           "question": Q_CONTROL.format(sentence=best.sentence), "consistent": ACCEPT, "inconsistent": [REFUSE],
           "fact": f"This is true of {base['name']} by {base['label']}: {best.sentence}", "error_id": eid,
           "origin": "rules", "source": best.source()}
    return [err, ctl]


def controls_for(personas: dict[str, Persona], error_rows: list[dict]) -> list[dict]:
    """error_rows: {id, persona, stage, question, seed (chunk source "file:line" or None)}. Candidates: the seed
    paragraph's sentences when the seed is objective material, else the stage's (and earlier stages') objective
    sentences."""
    cache: dict[str, list[Sentence]] = {}
    out = []
    for r in error_rows:
        p = personas[r["persona"]]
        if p.key not in cache:
            cache[p.key] = objective_sentences(p)
        order = [s.id for s in p.stages]
        allowed = set(order[: order.index(r["stage"]) + 1])
        pool = [x for x in cache[p.key] if x.stage in allowed]
        seeded = [x for x in pool if r.get("seed") and f"{x.file}:{x.line}" == r["seed"]]
        if not pool:
            continue
        row = dict(r, name=p.name, label=p.stage(r["stage"]).label)
        out += control_pair(row, seeded or [x for x in pool if x.stage == r["stage"]] or pool)
    return out


# -- reading and writing -------------------------------------------------------------------------

REQUIRED = {"id": str, "persona": str, "stage": str, "kind": str, "question": str, "consistent": str,
            "inconsistent": list}


def check_probe(row) -> list[str]:
    if not isinstance(row, dict):
        return ["expected a JSON object"]
    errs = []
    for k, t in REQUIRED.items():
        if k not in row:
            errs.append(f"missing key {k!r}")
        elif not isinstance(row[k], t) or (t is str and not row[k].strip()):
            errs.append(f"key {k!r} must be a non-empty {'string' if t is str else 'list'}")
    if isinstance(row.get("kind"), str) and row["kind"] not in KINDS:
        errs.append(f"kind {row['kind']!r} is not one of {', '.join(KINDS)}")
    inc = row.get("inconsistent")
    if isinstance(inc, list) and (not inc or not all(isinstance(a, str) and a.strip() for a in inc)):
        errs.append("key 'inconsistent' must hold one or more non-empty strings")
    for k in ("name", "label", "fact", "spatial", "system", "fact_stage", "error_id", "origin"):
        if row.get(k) is not None and not isinstance(row[k], str):
            errs.append(f"key {k!r} must be a string")
    return errs


def read_probes(path) -> list[dict]:
    """The probes of a JSONL file, checked; the first problem raises DataGenError naming file:line."""
    rows, ids = [], {}
    try:
        for where, row in iter_jsonl(path):
            errs = check_probe(row)
            if errs:
                raise DataGenError(f"{where}: {'; '.join(errs)}")
            if row["id"] in ids:
                raise DataGenError(f"{where}: duplicate id {row['id']!r} (first on line {ids[row['id']]})")
            ids[row["id"]] = where.rpartition(":")[2]
            row.setdefault("name", row["persona"])
            row.setdefault("label", row["stage"])
            rows.append(row)
    except InputError as e:  # not a file, not UTF-8, not JSON: data_gen's one error type at its boundary
        raise DataGenError(str(e)) from None
    if not rows:
        raise DataGenError(f"{path}: no probes")
    return rows


def build_probes(personas, builder: str = "rules", backend=None, max_per_cell: int = 5, seed: int = 0,
                 max_future_per_cell: int | None = 15, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """(rows, rejected) for a personas folder (or loaded personas); builder: rules | annotator (which writes the
    question and answers for the rule builder's seeds, data_gen/probes_llm.py; `progress`: a bar over its
    requests, the one long phase)."""
    if isinstance(personas, (str, Path)):
        personas = load_personas(Path(personas))
    if builder == "rules":
        return rule_probes(personas, max_per_cell, seed, max_future_per_cell), []
    if builder == "annotator":
        if backend is None:
            raise DataGenError("probes: the annotator builder needs --annotator")
        from data_gen.probes_llm import llm_probes

        origin = f"llm:{backend.identity.get('model')}"
        seeded = [(_probe(p, kind, asked, fact, x, origin), fact.label) for p in personas
                  for kind, asked, fact, x in seeds(p, max_per_cell, seed, max_future_per_cell)]
        return llm_probes(seeded, backend, seed, progress=progress)
    raise DataGenError(f"probes.builder: {builder!r} is not rules, annotator or auto")


def summary(rows: list[dict]) -> dict:
    """{persona: {kind: count}}."""
    out: dict = {}
    for r in rows:
        c = out.setdefault(r["persona"], {})
        c[r["kind"]] = c.get(r["kind"], 0) + 1
    return out


def corpus_step(ctx, test_items: list[dict]) -> dict:
    """`data build`'s probes step: OUT/probes.jsonl (the four kinds) and OUT/controls.jsonl (each test `error`
    item with its matched true-premise control). Builder `auto`: the annotator for an openai: annotator, the
    rules for a local one (a small local model writes poor probes); the annotator's prompt is English, so under
    `auto` personas in other languages get the rules."""
    pc = ctx.cfg["probes"]
    builder = pc["builder"]
    if builder == "none":
        return {"builder": "none"}
    personas = list(ctx.personas.values())
    by_builder = {builder: personas}
    if builder == "auto":
        by_builder = {"rules": personas}
        if ctx.backend.identity.get("backend") == "openai":
            by_builder = {"annotator": [p for p in personas if p.language == "en"],
                          "rules": [p for p in personas if p.language != "en"]}
    rows, rejected = [], []
    for name, group in by_builder.items():
        if group:
            got, bad = build_probes(group, name, ctx.backend, int(pc["max_per_cell"]), int(ctx.cfg["seed"]),
                                    pc["max_future_per_cell"])
            rows, rejected = rows + got, rejected + bad
    builder = "+".join(name for name, group in by_builder.items() if group) or "none"
    write_jsonl(ctx.out / "probes.jsonl", rows)
    errors = []
    for it in test_items:
        if it["type"] != "error":
            continue
        chunk = ctx.chunk_by_id.get(it.get("seed_id") or "")
        errors.append({"id": it["id"], "persona": it["persona"], "stage": it["stage"], "question": it["input"],
                       "seed": chunk.source if chunk is not None and chunk.kind == "objective" else None,
                       "source": {"corpus_id": it["id"], "seed": chunk.source if chunk is not None else None}})
    controls = controls_for(ctx.personas, errors) if pc["controls"] else []
    write_jsonl(ctx.out / "controls.jsonl", controls)
    reasons: dict = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {"builder": builder, "n": len(rows), "by_persona_kind": summary(rows), "controls": len(controls),
            "rejected_by_reason": reasons, "rejected": rejected}
