"""Training rows from wherever a TRL user keeps them, in every shape TRL reads, as a few canonical shapes.

Sources (`read_source`), each row with a `where` for errors:
  - `.jsonl` (where = file:line, 1-based), `.json` (a list of objects, or JSON Lines; where = file[index]),
  - `.parquet` (pyarrow), a `datasets` `save_to_disk` folder (a DatasetDict folder: its `split`),
  - a Hub dataset id `org/name[:split]`, from the local cache only: a `hf download --repo-type dataset` snapshot
    in HF_HUB_CACHE (read with `datasets.load_dataset(folder)`), else the dataset cache `datasets.load_dataset`
    filled when it last ran online (read with the Hub switched off). Nothing is fetched.
JSONL and JSON need nothing beyond the standard library; the others import `datasets`/`pyarrow` lazily (the
`datasets` extra).

Shapes, as TRL names them (trl/data_utils.py, the SFT and DPO trainers' `_prepare_dataset`):
  SFT   conversational: {"messages": [...]}, ShareGPT {"conversations": [{"from", "value"}]},
        {"prompt": [...], "completion": [...]}  -> ("chat", messages, first trained message index)
        standard: {"text": str} -> ("text", text); {"prompt": str, "completion": str} -> ("pc", prompt, completion)
  DPO   {"prompt", "chosen", "rejected"} as message lists (a string answer is one assistant message) or all
        strings; implicit prompt {"chosen", "rejected"} only: the prompt is their common prefix (TRL's
        `extract_prompt`: of messages, or of characters for strings, a space before the split going with the
        answers). Unpaired (KTO) rows {"prompt", "completion", "label"} are refused: they are not pairs.
A key whose value is None counts as absent (parquet and `datasets` fill missing columns with None).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from persllm_jax.errors import InputError
from persllm_jax.io import iter_jsonl, read_text

ROLES = ("system", "user", "assistant", "tool")
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
            "tool": "tool"}  # ShareGPT "from" values
SFT_SHAPES = ('{"messages": [{"role", "content"}, ...]}, {"conversations": [{"from", "value"}, ...]}, '
              '{"text": str}, {"prompt", "completion"} (strings or message lists)')
DPO_SHAPES = ('{"prompt", "chosen", "rejected"} (strings or message lists), '
              '{"chosen", "rejected"} (implicit prompt: conversations or strings sharing a prefix)')
SOURCES = ".jsonl, .json, .parquet, a datasets save_to_disk folder, or a cached Hub dataset id org/name[:split]"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
INSTALL = "pip install 'persllm-jax[datasets]'"


class FormatError(InputError):
    """A row of training data in no shape we read; the message names the file, the row and the accepted shapes."""


# --- sources ------------------------------------------------------------------------------------------


def is_hub_id(spec: str | Path) -> bool:
    """`org/name` or `org/name:split` that is not an existing path."""
    s = str(spec)
    return bool(_HUB_ID.match(s)) and not Path(s).exists()


def is_saved_dataset(p: Path) -> bool:
    """A `Dataset.save_to_disk` folder (or a DatasetDict's: dataset_dict.json)."""
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _need(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"{what} needs the {module} package: {INSTALL}") from None


def _rows_of(ds, label: str) -> list[tuple[str, dict]]:
    return [(f"{label}[{i}]", dict(row)) for i, row in enumerate(ds)]


def _pick_split(ds, split: str, label: str):
    datasets = _need("datasets", label)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{label}: no split {split!r} (it has {', '.join(ds)})")
        return ds[split]
    return ds


def _read_json(p: Path) -> list[tuple[str, dict]]:
    text = read_text(p, "JSON file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file, as `datasets` reads it
            return list(iter_jsonl(p))
        raise InputError(f"{p}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise InputError(f"{p}: expected a JSON list of row objects, got {type(value).__name__}")
    for i, row in enumerate(value):
        if not isinstance(row, dict):
            raise InputError(f"{p}[{i}]: expected a JSON object, got {type(row).__name__}")
    return [(f"{p}[{i}]", row) for i, row in enumerate(value)]


def _read_parquet(p: Path) -> list[tuple[str, dict]]:
    _need("pyarrow", f"{p}: a parquet file")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"{p}: not a readable parquet file ({e})") from None
    return [(f"{p}[{i}]", row) for i, row in enumerate(table.to_pylist())]


def _read_saved(p: Path, split: str) -> list[tuple[str, dict]]:
    datasets = _need("datasets", f"{p}: a datasets folder")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - the library raises several types
        raise InputError(f"{p}: not a datasets save_to_disk folder ({e})") from None
    return _rows_of(_pick_split(ds, split, str(p)), str(p))


@contextlib.contextmanager
def _hub_off(datasets):
    """`datasets` reads HF_HUB_OFFLINE once, at import: switch it off for this call, whatever the environment."""
    old = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = old


def hf_caches() -> tuple[str, str]:
    """(hub cache, datasets cache) from the environment now, as huggingface_hub and datasets compute them at
    import (HF_HUB_CACHE, HF_DATASETS_CACHE, else under HF_HOME), so a later HF_HOME is honoured too."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        "~/.cache")), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(hub), os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or
                                                       os.path.join(home, "datasets"))


def _read_hub(spec: str, split: str) -> list[tuple[str, dict]]:
    repo, _, explicit = spec.partition(":")
    split = explicit or split
    label = f"{repo}:{split}"
    datasets = _need("datasets", f"{repo}: a Hub dataset")
    from huggingface_hub import snapshot_download

    hub_cache, ds_cache = hf_caches()
    try:
        folder = snapshot_download(repo, repo_type="dataset", cache_dir=hub_cache, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the hub cache (LocalEntryNotFoundError and kin)
        folder = None
    try:
        with _hub_off(datasets):
            ds = datasets.load_dataset(folder or repo, split=split, cache_dir=ds_cache)
    except ValueError as e:
        if "split" in str(e).lower():
            raise InputError(f"{label}: no split {split!r} in the cached dataset ({e})") from None
        raise InputError(f"{label}: cannot read the cached dataset ({e})") from None
    except Exception:  # noqa: BLE001 - ConnectionError / FileNotFoundError: not in any local cache
        raise InputError(f"{repo}: dataset not in the local Hugging Face cache (hub cache {hub_cache}, "
                         f"datasets cache {ds_cache}); "
                         f"download it with: hf download --repo-type dataset {repo}") from None
    return _rows_of(ds, label)


def iter_source(spec: str | Path, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(where, row) of a data source (see the module docstring); JSONL is read lazily, so a reader that stops
    early (a row limit, the first bad row) reads no further."""
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        if not is_saved_dataset(p):
            raise InputError(f"{p}: a folder that is not a datasets save_to_disk folder (accepted: {SOURCES})")
        yield from _read_saved(p, split)
    elif p.is_file():
        suffix = p.suffix.lower()
        yield from (_read_parquet(p) if suffix == ".parquet" else _read_json(p) if suffix == ".json"
                    else iter_jsonl(p))
    elif is_hub_id(s):
        yield from _read_hub(s, split)
    else:
        raise InputError(f"{p}: no such file or folder (accepted: {SOURCES})")


def read_source(spec: str | Path, split: str = "train") -> list[tuple[str, dict]]:
    """[(where, row)] of a data source; [] for an empty one."""
    return list(iter_source(spec, split))


# --- shapes -------------------------------------------------------------------------------------------


def present(row: dict) -> set[str]:
    return {k for k, v in row.items() if v is not None}


def messages(value, where: str, key: str = "messages", need_assistant: bool = True) -> list[dict]:
    """A checked message list ({"role", "content"} strings, known roles; ShareGPT from/value accepted)."""
    if not isinstance(value, list) or not value:
        raise FormatError(f"{where}: missing or empty {key!r} message list")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and "role" not in m and "from" in m:
            m = {"role": SPEAKERS.get(str(m["from"]), m["from"]), "content": m.get("value")}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FormatError(f"{where}: {key}[{i}] must be {{\"role\": str, \"content\": str}}")
        if m["role"] not in ROLES:
            raise FormatError(f"{where}: {key}[{i}] has unknown role {m['role']!r} "
                              f"(expected one of {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        inside = "" if key == "messages" else f" in {key!r}"
        raise FormatError(f"{where}: conversation has no assistant turn{inside} (nothing to train on)")
    return out


def _unknown(row: dict, where: str, shapes: str, kind: str) -> FormatError:
    keys = ", ".join(sorted(present(row))) or "none"
    return FormatError(f"{where}: not a {kind} row (keys: {keys}); accepted shapes: {shapes}")


def sft_row(row: dict, where: str) -> tuple:
    """("chat", messages, train_from) | ("text", text) | ("pc", prompt, completion): see the module docstring."""
    keys = present(row)
    if "messages" in keys:
        return ("chat", messages(row["messages"], where), 0)
    if "conversations" in keys:
        return ("chat", messages(row["conversations"], where, "conversations"), 0)
    if {"prompt", "completion"} <= keys:
        if "label" in keys:
            raise FormatError(f"{where}: an unpaired preference (KTO) row (prompt, completion, label) is not SFT "
                              f"data; accepted shapes: {SFT_SHAPES}")
        p, c = row["prompt"], row["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return ("pc", p, c)
        if isinstance(p, list) and isinstance(c, list):
            prompt = messages(p, where, "prompt", need_assistant=False)
            return ("chat", prompt + messages(c, where, "completion"), len(prompt))
        raise FormatError(f"{where}: prompt and completion must both be strings or both message lists")
    if "text" in keys:
        if not isinstance(row["text"], str) or not row["text"]:
            raise FormatError(f"{where}: \"text\" must be a non-empty string")
        return ("text", row["text"])
    raise _unknown(row, where, SFT_SHAPES, "SFT")


def _conversational(v) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict)


def _implicit(chosen, rejected, where: str) -> tuple:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and n and chosen[n - 1] == " ":
        n -= 1  # TRL's extract_prompt: the space before the answers goes with them
    if n == 0:
        raise FormatError(f"{where}: chosen and rejected share no prompt (implicit-prompt rows must begin alike)")
    return chosen[:n], chosen[n:], rejected[n:]


def pref_row(row: dict, where: str) -> tuple:
    """("chat", prompt msgs, chosen msgs, rejected msgs) | ("text", prompt, chosen, rejected) strings."""
    keys = present(row)
    if not {"chosen", "rejected"} <= keys:
        if {"prompt", "completion", "label"} <= keys:
            raise FormatError(f"{where}: an unpaired preference (KTO) row (prompt, completion, label) cannot train "
                              f"DPO; pair them; accepted shapes: {DPO_SHAPES}")
        raise _unknown(row, where, DPO_SHAPES, "preference")
    c, r = row["chosen"], row["rejected"]
    p = row.get("prompt")
    if p is None or (isinstance(p, str) and _conversational(c)):  # TRL's maybe_extract_prompt
        if isinstance(c, str) and isinstance(r, str):
            return ("text", *_implicit(c, r, where))
        c = messages(c, where, "chosen")
        r = messages(r, where, "rejected")
        p, c, r = _implicit(c, r, where)
    if isinstance(p, str) and isinstance(c, str) and isinstance(r, str):
        if not p:
            raise FormatError(f"{where}: empty prompt")
        return ("text", p, c, r)
    if isinstance(p, str):
        raise FormatError(f"{where}: a string prompt needs string chosen/rejected answers; accepted shapes: "
                          f"{DPO_SHAPES}")
    as_msgs = lambda v, k: messages([{"role": "assistant", "content": v}] if isinstance(v, str) else v,  # noqa
                                    where, k)
    return ("chat", messages(p, where, "prompt", need_assistant=False), as_msgs(c, "chosen"), as_msgs(r, "rejected"))


__all__ = ["ROLES", "SFT_SHAPES", "DPO_SHAPES", "SOURCES", "FormatError", "is_hub_id", "is_saved_dataset",
           "iter_source", "read_source", "present", "messages", "sft_row", "pref_row"]
