"""Reading the corpus test split and splitting `[Analysis] ... [Response] ...` answers."""

from __future__ import annotations

from pathlib import Path

from persllm_jax.eval import EvalError
from persllm_jax.io import iter_jsonl, read_json

TYPES = ("ordinary", "thought", "error", "general")


def response_part(text: str) -> str:
    """The `[Response]` part of a CoT answer (the whole text when it has no tag)."""
    from persllm_jax.serve.personas import split_thoughts

    return split_thoughts(text or "")[1].strip()


def load_test(corpus_dir: str | Path, limit_per_stage: int | None = None, include_general: bool = False) -> list[dict]:
    """Rows of CORPUS_DIR/sft/test.jsonl, checked: persona, stage, type, messages ending with the assistant reference.
    A line that is not a JSON object is an InputError naming file:line:column."""
    path = Path(corpus_dir) / "sft" / "test.jsonl"
    if not Path(corpus_dir).is_dir():
        raise EvalError(f"--data {corpus_dir}: no such corpus directory")
    if not path.is_file():
        raise EvalError(f"--data {corpus_dir}: no sft/test.jsonl (build the corpus with a test split)")
    rows, counts = [], {}
    for where, row in iter_jsonl(path):
        msgs = row.get("messages")
        if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                                   for m in msgs) or msgs[-1]["role"] != "assistant"):
            raise EvalError(f"{where}: expected a row with messages ending in the assistant's reference answer")
        for k in ("persona", "stage"):
            if not isinstance(row.get(k), str) or not row[k]:
                raise EvalError(f"{where}: missing {k!r}")
        row.setdefault("type", "ordinary")
        row.setdefault("id", f"row{where.rsplit(':', 1)[1]}")  # default id: the line number
        if row["type"] == "general" and not include_general:
            continue
        key = (row["persona"], row["stage"])
        counts[key] = counts.get(key, 0) + 1
        if limit_per_stage is not None and counts[key] > limit_per_stage:
            continue
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no persona test rows")
    return rows


def prompt_of(row: dict) -> list[dict]:
    return [dict(m) for m in row["messages"][:-1]]


def reference_of(row: dict) -> str:
    return response_part(row["messages"][-1]["content"])


def question_of(row: dict) -> str:
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def persona_stages(rows: list[dict], manifest: dict | None = None) -> dict[str, dict]:
    """{persona: {"name", "stages": {stage_id: label}}} from the manifest when present, else from the rows."""
    out: dict[str, dict] = {}
    info = (manifest or {}).get("personas") or {}
    for r in rows:
        p = out.setdefault(r["persona"], {"name": (info.get(r["persona"]) or {}).get("name") or r["persona"], "stages": {}})
        label = None
        for st in (info.get(r["persona"]) or {}).get("stages") or []:
            if st.get("id") == r["stage"]:
                label = st.get("label")
        if label is None:
            sys_msg = next((m["content"] for m in r["messages"] if m["role"] == "system"), "")
            label = sys_msg.split("Now it's", 1)[1].strip().rstrip(".") if "Now it's" in sys_msg else r["stage"]
        p["stages"].setdefault(r["stage"], label)
    return out


def read_manifest(corpus_dir: str | Path) -> dict:
    """CORPUS_DIR/manifest.json ({} when the corpus has none)."""
    p = Path(corpus_dir) / "manifest.json"
    return read_json(p, "corpus manifest") if p.is_file() else {}
