"""Files that survive a kill, and readers whose errors name file, line and column.

Owns: atomic writes (temp file beside the target, fsync, rename), JSONL read/write/append (a torn last line,
left by a writer killed mid-write, is dropped by readers that ask for it and cut off before appending), YAML
reading, the one table of dtype names, and the persllm cache folder. Imports only the standard library, numpy
(lazily, for dtypes) and yaml, so every layer may use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from persllm_jax.errors import InputError

DTYPE_NAMES = ("float32", "bfloat16")  # compute / export dtypes a config may name


def jnp_dtype(name: str):
    """The jax.numpy dtype for a name of DTYPE_NAMES (the one table of them)."""
    import jax.numpy as jnp

    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in table:
        raise InputError(f"dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def cache_root() -> Path:
    """PERSLLM_CACHE, else $XDG_CACHE_HOME/persllm_jax (converted GGUF files, compiled XLA programs)."""
    base = os.environ.get("PERSLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "persllm_jax")
    return Path(base)


# --- atomic writes ------------------------------------------------------------------------------------


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str))


def atomic_replace(path: str | Path, write) -> None:
    """`write(tmp_path)` then rename onto `path`: for writers that want a file name (np.savez, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; errors name the file (missing, a folder, unreadable, not UTF-8)."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected a {what}") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path, what: str = "file"):
    """A JSON file's value; errors name the file, line and column."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None


def read_yaml(path: str | Path, what: str = "file"):
    """A YAML file's value; errors name the file and line."""
    import yaml

    try:
        return yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None


# --- JSONL --------------------------------------------------------------------------------------------


def dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write every row, atomically; returns the number of rows."""
    lines = [dumps(r) + "\n" for r in rows]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def iter_jsonl(path: str | Path, *, torn_tail: bool = False, missing_ok: bool = False) -> Iterator[tuple[str, dict]]:
    """("file:line", row) for every non-blank line. A line that is not UTF-8, not JSON or not an object is an
    `InputError` naming file:line:column; with `torn_tail`, an unterminated bad last line (a writer killed
    mid-line) is dropped instead."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected a .jsonl file") from None
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{p}:{n}"
        last = n == len(lines)  # no newline after it
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn_tail and last:
                return
            raise InputError(f"{where}:{e.start + 1}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            if torn_tail and last:
                return
            col = len(text[:e.pos].encode("utf-8")) + 1 if e.lineno == 1 else e.colno
            raise InputError(f"{where}:{col}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}:1: expected a JSON object, got {type(row).__name__}")
        yield where, row


def read_jsonl(path: str | Path, *, torn_tail: bool = False, missing_ok: bool = False) -> list[dict]:
    """Every row of a JSONL file (see `iter_jsonl` for the error rules)."""
    return [row for _, row in iter_jsonl(path, torn_tail=torn_tail, missing_ok=missing_ok)]


class Appender:
    """Appends rows to a JSONL file one fsynced line at a time, first cutting off a torn tail left by a killed
    writer, so the file is always a valid prefix of what was written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(end)
        self.f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(dumps(row) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
