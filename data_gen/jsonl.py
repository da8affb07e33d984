"""JSONL files that survive SIGKILL: whole-file writes are atomic (temp file + rename), appends are
line-at-a-time with fsync, and a reader drops (and a resumer truncates) a torn last line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=False)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [dumps(r) + "\n" for r in rows]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    """All complete rows; a torn (unterminated or unparsable) last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            if i == len(lines) - 1:  # torn tail from a kill mid-write
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    return rows


class Appender:
    """Appends rows to a JSONL file, first cutting off a torn tail left by a killed writer."""

    def __init__(self, path: Path):
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
