"""General instruction data mixed into the SFT train file, with a repeat factor for persona rows (the
paper repeated the persona data 5 times and mixed it with general data for one epoch).

General data: a .jsonl file or a `datasets` folder (`Dataset.save_to_disk`). Accepted row shapes:
{"messages": [...]}, UltraChat {"data": [user, assistant, ...]}, ShareGPT {"conversations":
[{"from", "value"}]}, Alpaca {"instruction", "input"?, "output"}, {"prompt", "response"}."""

from __future__ import annotations

import random
from pathlib import Path

from data_gen.annotate import stable_seed
from data_gen.errors import DataGenError
from persllm_jax.io import iter_jsonl

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(row: dict, where: str) -> list[dict]:
    if isinstance(row.get("messages"), list):
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
    elif isinstance(row.get("data"), list):
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(t)} for i, t in enumerate(row["data"])]
    elif isinstance(row.get("conversations"), list):
        msgs = []
        for m in row["conversations"]:
            role = _ROLES.get(str(m.get("from") or m.get("role")))
            if role is None:
                raise DataGenError(f"{where}: unknown speaker {m.get('from')!r}")
            msgs.append({"role": role, "content": str(m.get("value") or m.get("content") or "")})
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    elif "prompt" in row and "response" in row:
        msgs = [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["response"])}]
    else:
        raise DataGenError(f"{where}: expected messages, data, conversations, instruction/output or prompt/response")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise DataGenError(f"{where}: no assistant message")
    return msgs


def load_general(spec: str, limit: int | None) -> list[list[dict]]:
    p = Path(spec)
    out = []
    if p.is_file():
        for where, row in iter_jsonl(p):
            out.append(to_messages(row, where))
            if limit and len(out) >= int(limit):
                break
    elif p.is_dir():
        try:
            import datasets
        except ImportError:
            raise DataGenError("mix.general: a datasets folder needs the datasets package") from None
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - the library raises several types
            raise DataGenError(f"{p}: not a datasets folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, row in enumerate(ds):
            out.append(to_messages(row, f"{p}[{i}]"))
            if limit and len(out) >= int(limit):
                break
    else:
        raise DataGenError(f"mix.general: {p}: no such file or folder")
    return out


def mix(persona_rows: list[dict], general: list[list[dict]], cfg: dict) -> tuple[list[dict], int]:
    """The SFT train rows: persona rows repeated `mix.repeat` times (copies get '#rN' id suffixes) plus
    general rows (message lists from load_general), in a seeded shuffle. Without general data and
    repeat 1: the persona rows as they are."""
    repeat = int(cfg["mix"]["repeat"])
    if repeat == 1 and not general:
        return persona_rows, 0
    rows = [r if k == 0 else dict(r, id=f"{r['id']}#r{k}") for r in persona_rows for k in range(repeat)]
    rows += [{"id": f"general/{i:06d}", "persona": None, "stage": None, "type": "general", "messages": m}
             for i, m in enumerate(general)]
    random.Random(stable_seed(cfg["seed"], "mix")).shuffle(rows)
    return rows, len(general)
