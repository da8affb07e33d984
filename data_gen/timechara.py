"""TimeChara (Ahn et al., ACL Findings 2024; github.com/ahnjaewoo/timechara, data on the HF hub as
`ahnpersie/timechara`, non-commercial use) read as our probes, so a model trained here is scored on it unchanged.

The public dataset's fields (its dataset card, and `create_dataset.py` / `evaluate.py` in the repository):

    series               harry_potter | the_lord_of_the_rings | twilight | hunger_games
    data_type            future | past-absence | past-presence | past-only
    question_generation  fact_structured | fact_freeform | fake_freeform (how the question was made)
    event_summary        one-sentence summary of the event (`event` in fake_freeform rows)
    question             the interview question
    question_period      where the event happens, e.g. "Book1-chapter1" (our fact_stage)
    fake_method          how a fake event was made from the summary ('-' if none)
    participants         the event's participants (list of names)
    character            the character asked, e.g. "Hermione Granger" (our persona)
    character_period     the point in time asked at, e.g. "1st-year / on Christmas" (our stage)
    temporal_label       the judge's temporal fact ("Future: ... should not be aware of ..." / "Past: ...")
    spatial_label        the judge's spatial fact for past-absence / past-presence, '-' otherwise
    gold_response        a reference answer written by GPT-4 from the label (our `reference`)

Rows are read from a JSON list, a JSON object holding lists per split, or JSONL. The judge-free answers are our
answer templates (data_gen.probes) chosen by data_type, the judge's facts are TimeChara's own labels, and the
system message is our corpus format ("You are {character}. Now it's {character_period}.").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_gen.errors import DataGenError
from data_gen.probes import DONT_KNOW, KNOW, NOT_THERE, TIME_KINDS, WAS_THERE, read_probes
from persllm_jax.errors import InputError
from persllm_jax.io import iter_jsonl, read_text

FIELDS = ("series", "data_type", "question", "character", "character_period", "temporal_label")


def looks_like_timechara(row) -> bool:
    return isinstance(row, dict) and {"data_type", "character_period", "temporal_label"} <= set(row)


def _is_json_document(text: str) -> bool:
    """A JSON list, or an object spread over lines (not JSONL, whose first line is a whole object)."""
    head = text.lstrip()
    return head.startswith("[") or head.startswith("{") and not head.split("\n", 1)[0].rstrip().endswith("}")


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) for every row of a JSON / JSONL file; `where` is file:line or file[split][i]."""
    text = read_text(path, "TimeChara file")
    if not _is_json_document(text):
        return list(iter_jsonl(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataGenError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if isinstance(doc, list):
        return [(f"{path}[{i}]", r) for i, r in enumerate(doc)]
    if isinstance(doc, dict) and all(isinstance(v, list) for v in doc.values()):
        return [(f"{path}[{split}][{i}]", r) for split, rows in doc.items() for i, r in enumerate(rows)]
    raise DataGenError(f"{path}: expected a list of TimeChara rows (or {{split: [rows]}})")


def to_probe(row: dict, where: str, index: int) -> dict:
    missing = [k for k in FIELDS if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise DataGenError(f"{where}: not a TimeChara row (missing {', '.join(missing)})")
    kind = row["data_type"]
    if kind not in TIME_KINDS:
        raise DataGenError(f"{where}: data_type {kind!r} is not one of {', '.join(TIME_KINDS)}")
    event = row.get("event_summary") or row.get("event") or ""
    know = KNOW.format(sentence=event).strip()
    good, bad = {"future": (DONT_KNOW, [know]), "past-only": (know, [DONT_KNOW]),
                 "past-presence": (WAS_THERE, [NOT_THERE]), "past-absence": (NOT_THERE, [WAS_THERE])}[kind]
    character, period = row["character"].strip(), row["character_period"].strip()
    key = json.dumps([row.get("series"), character, period, row["question"], kind])
    probe = {"id": f"timechara/{index:05d}/{hashlib.sha256(key.encode()).hexdigest()[:8]}",
             "persona": character, "name": character, "stage": period, "label": period,
             "fact_stage": row.get("question_period") or None, "kind": kind, "question": row["question"].strip(),
             "consistent": good, "inconsistent": bad, "fact": row["temporal_label"].strip(),
             "system": f"You are {character}. Now it's {period}.", "origin": "timechara",
             "source": {"file": where, "series": row.get("series"), "event_summary": event or None,
                        "question_generation": row.get("question_generation"),
                        "participants": row.get("participants")}}
    spatial = row.get("spatial_label")
    if isinstance(spatial, str) and spatial.strip() not in ("", "-"):
        probe["spatial"] = spatial.strip()
    if isinstance(row.get("gold_response"), str):
        probe["reference"] = row["gold_response"]
    return probe


def read_timechara(path) -> list[dict]:
    """TimeChara's rows (JSON list, {split: [rows]} or JSONL) as our probes; a bad row raises DataGenError naming
    file:line (or file[split][i])."""
    try:
        rows = _rows(Path(path))
    except InputError as e:  # data_gen's one error type at its boundary
        raise DataGenError(str(e)) from None
    if not rows:
        raise DataGenError(f"{path}: no TimeChara rows")
    return [to_probe(r if isinstance(r, dict) else {}, where, i) for i, (where, r) in enumerate(rows)]


def load_any(path) -> tuple[list[dict], str]:
    """(probes, format) of a probe file: our JSONL schema ("persllm-probes") or TimeChara's ("timechara")."""
    try:
        text = read_text(path, "probe file")
    except InputError as e:
        raise DataGenError(str(e)) from None
    head = next((ln for ln in text.split("\n") if ln.strip()), "")
    try:
        first = json.loads(head)
    except ValueError:
        first = None
    if head.lstrip().startswith("[") or head.strip() == "{" or looks_like_timechara(first):
        return read_timechara(path), "timechara"
    return read_probes(path), "persllm-probes"
