"""General instruction data mixed into the SFT train file, with a repeat factor for persona rows (the
paper repeated the persona data 5 times and mixed it with general data for one epoch).

General data: any source the trainer reads (persllm_jax.formats: .jsonl, .json, .parquet, a `datasets`
save_to_disk folder, a cached Hub dataset id `org/name[:split]`). Accepted row shapes: TRL's conversational
{"messages": [...]}, ShareGPT {"conversations": [{"from", "value"}]}, {"prompt", "completion"} (message lists,
or strings: one user turn and one assistant turn), and also UltraChat {"data": [user, assistant, ...]}, Alpaca
{"instruction", "input"?, "output"}, {"prompt", "response"}. A language-modeling {"text"} row has no turns to
mix into a chat corpus and is refused."""

from __future__ import annotations

import random
from pathlib import Path

from data_gen.annotate import stable_seed
from data_gen.errors import DataGenError
from persllm_jax import formats
from persllm_jax.errors import InputError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


GENERAL_SHAPES = formats.SFT_SHAPES.replace('{"text": str}, ', "") + (
    ', {"data": [user, assistant, ...]}, {"instruction", "input"?, "output"}, {"prompt", "response"}')


def to_messages(row: dict, where: str) -> list[dict]:
    keys = formats.present(row)
    try:
        if keys & {"messages", "conversations"} or {"prompt", "completion"} <= keys:
            shape = formats.sft_row(row, where)
            msgs = shape[1] if shape[0] == "chat" else [{"role": "user", "content": shape[1]},
                                                         {"role": "assistant", "content": shape[2]}]
        elif isinstance(row.get("data"), list):
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(t)}
                    for i, t in enumerate(row["data"])]
        elif "instruction" in keys and "output" in keys:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
        elif "prompt" in keys and "response" in keys:
            msgs = [{"role": "user", "content": str(row["prompt"])},
                    {"role": "assistant", "content": str(row["response"])}]
        else:
            what = "a language-modeling text row has no turns to mix" if "text" in keys else "unknown row shape"
            raise DataGenError(f"{where}: {what} (keys: {', '.join(sorted(keys)) or 'none'}); accepted shapes: "
                               f"{GENERAL_SHAPES}")
    except InputError as e:
        raise DataGenError(str(e)) from None
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise DataGenError(f"{where}: no assistant message")
    return msgs


def load_general(spec: str, limit: int | None) -> list[list[dict]]:
    """Message lists of the general-instruction source `spec` (its train split), at most `limit` of them."""
    out = []
    try:
        for where, row in formats.iter_source(spec, "train"):
            out.append(to_messages(row, where))
            if limit and len(out) >= int(limit):
                break
    except DataGenError:
        raise
    except InputError as e:
        raise DataGenError(f"mix.general: {e}") from None
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
