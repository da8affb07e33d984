"""Checks for the corpus row formats (design.md), used by the tests and available to readers.

    sft/*.jsonl   {"id", "persona", "stage", "type", "messages": [{"role", "content"}, ...]}
    dpo/*.jsonl   {"id", "persona", "stage", "source", "prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
"""

from __future__ import annotations

SFT_KEYS = ("id", "persona", "stage", "type", "messages")
DPO_KEYS = ("id", "persona", "stage", "source", "prompt", "chosen", "rejected")
SFT_TYPES = ("ordinary", "thought", "error", "general")
DPO_SOURCES = ("cross_temporal", "cross_persona")
ROLES = ("system", "user", "assistant")


def _messages(msgs, where: str) -> list[str]:
    errs = []
    if not isinstance(msgs, list) or not msgs:
        return [f"{where}: must be a non-empty list of messages"]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            errs.append(f"{where}[{i}]: must be {{role, content}}")
        elif m["role"] not in ROLES or not isinstance(m["content"], str) or not m["content"].strip():
            errs.append(f"{where}[{i}]: bad role or empty content")
    return errs


def check_sft_row(row: dict) -> list[str]:
    if not isinstance(row, dict) or tuple(row) != SFT_KEYS:
        return [f"keys must be {SFT_KEYS}, got {tuple(row) if isinstance(row, dict) else type(row)}"]
    errs = _messages(row["messages"], "messages")
    if row["type"] not in SFT_TYPES:
        errs.append(f"type {row['type']!r} not in {SFT_TYPES}")
    if not errs:
        if row["messages"][-1]["role"] != "assistant":
            errs.append("last message must be the assistant's")
        if row["type"] != "general":
            if not (isinstance(row["persona"], str) and isinstance(row["stage"], str)):
                errs.append("persona and stage must be strings")
            if "[Response]" not in row["messages"][-1]["content"]:
                errs.append("assistant message lacks [Response]")
    return errs


def check_dpo_row(row: dict) -> list[str]:
    if not isinstance(row, dict) or tuple(row) != DPO_KEYS:
        return [f"keys must be {DPO_KEYS}"]
    errs = _messages(row["prompt"], "prompt") + _messages(row["chosen"], "chosen") + _messages(row["rejected"], "rejected")
    if row["source"] not in DPO_SOURCES:
        errs.append(f"source {row['source']!r} not in {DPO_SOURCES}")
    if not errs:
        if row["prompt"][-1]["role"] != "user":
            errs.append("prompt must end with a user message")
        if [m["role"] for m in row["chosen"]] != ["assistant"] or [m["role"] for m in row["rejected"]] != ["assistant"]:
            errs.append("chosen and rejected must be one assistant message each")
        elif row["chosen"][0]["content"] == row["rejected"][0]["content"]:
            errs.append("chosen equals rejected")
    return errs
