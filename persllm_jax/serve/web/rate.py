"""Blind pairwise human evaluation: the prompt set, the judgement database and the assignment of items.

A rater asks for an item; the server picks a prompt and two of the compared models at random, shows them as
A and B in random order, and remembers that assignment (so the browser never learns which model is which).
A judgement names its assignment and carries a client-made id: a retried POST finds its row and is not stored
twice. Every write is one SQLite transaction in WAL mode with synchronous=FULL, so an acknowledged judgement
survives a killed server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import sqlite3
import time
import uuid
from pathlib import Path

from persllm_jax.errors import PersllmError
from persllm_jax.io import iter_jsonl

CRITERIA = ("fidelity", "knowledge", "style")  # persona fidelity, knowledge, style
CHOICES = ("A", "B", "tie")
MAX_COMMENT = 2000
_ID = re.compile(r"[A-Za-z0-9_.:@\-]{1,64}")


class RateError(PersllmError, ValueError):
    """A user-facing problem with the rating setup (prompt file, database, model list)."""


@dataclasses.dataclass(frozen=True)
class RateConfig:
    """What `/rate` compares: prompts, models, the database, and how answers are generated."""

    prompts: str  # corpus dir (its sft/test.jsonl) or a JSONL of prompts
    db: str  # SQLite file
    models: tuple[str, ...] = ()  # compared model names (empty: all served)
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    overlap: float = 0.25  # chance that an item another rater judged is offered (inter-rater agreement)


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple  # ({role, content}, ...) ending with the user's message
    persona: str | None = None
    stage: str | None = None


def load_prompts(source: str | Path) -> list[Prompt]:
    """Prompts from a corpus dir (sft/test.jsonl, reference answers dropped) or a JSONL file whose rows are
    {"id", "messages"} or {"id", "prompt"} (a user message; optional "system"). A line that is not a JSON object
    is an InputError naming file:line:column; a row that is not a prompt is a RateError naming file:line."""
    path = Path(source)
    if path.is_dir():
        path = path / "sft" / "test.jsonl"
    if not path.is_file():
        raise RateError(f"--rate-prompts {source}: neither a JSONL file nor a corpus dir with sft/test.jsonl")
    out, seen = [], set()
    for where, row in iter_jsonl(path):
        msgs = row.get("messages")
        if isinstance(msgs, list):
            if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]  # a corpus row: drop the reference answer
        elif isinstance(row.get("prompt"), str):
            msgs = ([{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []) + \
                   [{"role": "user", "content": row["prompt"]}]
        else:
            raise RateError(f"{where}: a prompt row needs 'messages' or 'prompt'")
        if (not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and
                                m.get("role") in ("system", "user", "assistant") for m in msgs)
                or msgs[-1]["role"] != "user"):
            raise RateError(f"{where}: messages must be {{role, content}} objects ending with a user message")
        pid = str(row.get("id") or f"row{where.rsplit(':', 1)[1]}")  # default id: the line number
        if pid in seen:
            raise RateError(f"{where}: duplicate prompt id {pid!r}")
        seen.add(pid)
        out.append(Prompt(pid, tuple({"role": m["role"], "content": m["content"]} for m in msgs),
                          row.get("persona"), row.get("stage")))
    if not out:
        raise RateError(f"{path}: no prompts")
    return out


def answer_seed(prompt_id: str, model: str) -> int:
    """The sampling seed of a (prompt, model) answer: fixed, so a regenerated answer is the same answer."""
    return int.from_bytes(hashlib.sha256(f"{prompt_id}\0{model}".encode()).digest()[:4], "little")


SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
  prompt_id TEXT NOT NULL, model TEXT NOT NULL, text TEXT NOT NULL, created REAL NOT NULL,
  PRIMARY KEY (prompt_id, model));
CREATE TABLE IF NOT EXISTS assignments (
  assignment_id TEXT PRIMARY KEY, rater_id TEXT NOT NULL, prompt_id TEXT NOT NULL,
  model_a TEXT NOT NULL, model_b TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS judgements (
  judgement_id TEXT PRIMARY KEY,          -- made by the client: a retried submission is not stored twice
  assignment_id TEXT NOT NULL UNIQUE,     -- one judgement per shown item
  rater_id TEXT NOT NULL, prompt_id TEXT NOT NULL,
  model_a TEXT NOT NULL,                  -- the model shown as A
  model_b TEXT NOT NULL,                  -- the model shown as B
  order_shown TEXT NOT NULL,              -- "model_a,model_b": the left-to-right order the rater saw
  fidelity TEXT NOT NULL CHECK (fidelity IN ('A','B','tie')),
  knowledge TEXT NOT NULL CHECK (knowledge IN ('A','B','tie')),
  style TEXT NOT NULL CHECK (style IN ('A','B','tie')),
  comment TEXT NOT NULL DEFAULT '',
  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (prompt_id TEXT PRIMARY KEY, messages TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS judgements_item ON judgements (prompt_id, model_a, model_b);
"""


def connect(path: str | Path, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection in WAL mode with full fsync on commit (a committed judgement survives a kill)."""
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return con


class RateStore:
    """The judgement database. Each call opens its own connection, so handlers may run in any thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = connect(self.path)
            with con:
                con.executescript(SCHEMA)
            mode = con.execute("PRAGMA journal_mode").fetchone()[0]
            con.close()
        except sqlite3.Error as e:
            raise RateError(f"--rate-db {path}: cannot open the SQLite database ({e})") from None
        if mode.lower() != "wal":
            raise RateError(f"--rate-db {path}: the file system does not support WAL mode (got {mode})")

    def _con(self) -> sqlite3.Connection:
        return connect(self.path)

    def save_prompts(self, prompts: list[Prompt]) -> None:
        con = self._con()
        try:
            with con:
                con.executemany("INSERT OR IGNORE INTO prompts VALUES (?, ?)",
                                [(p.id, json.dumps(list(p.messages), ensure_ascii=False)) for p in prompts])
        finally:
            con.close()

    def answer(self, prompt_id: str, model: str) -> str | None:
        con = self._con()
        try:
            row = con.execute("SELECT text FROM answers WHERE prompt_id=? AND model=?", (prompt_id, model)).fetchone()
            return row[0] if row else None
        finally:
            con.close()

    def put_answer(self, prompt_id: str, model: str, text: str) -> str:
        """Stores an answer unless one is there; returns the stored one (the first answer wins)."""
        con = self._con()
        try:
            with con:
                con.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)", (prompt_id, model, text, time.time()))
            return con.execute("SELECT text FROM answers WHERE prompt_id=? AND model=?", (prompt_id, model)).fetchone()[0]
        finally:
            con.close()

    def judged_items(self, rater_id: str) -> tuple[set, dict, int]:
        """(items this rater judged, {item: count} judged by others, this rater's judgements); an item is
        (prompt, frozenset(pair)). The count can pass the items: once all are judged, items come round again."""
        con = self._con()
        try:
            mine, others, n_mine = set(), {}, 0
            for r, p, a, b in con.execute("SELECT rater_id, prompt_id, model_a, model_b FROM judgements"):
                item = (p, frozenset((a, b)))
                if r == rater_id:
                    mine.add(item)
                    n_mine += 1
                else:
                    others[item] = others.get(item, 0) + 1
            return mine, others, n_mine
        finally:
            con.close()

    def new_assignment(self, rater_id: str, prompt_id: str, model_a: str, model_b: str) -> str:
        aid = uuid.uuid4().hex
        con = self._con()
        try:
            with con:
                con.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?, ?)",
                            (aid, rater_id, prompt_id, model_a, model_b, time.time()))
        finally:
            con.close()
        return aid

    def record(self, judgement_id: str, assignment_id: str, rater_id: str, choices: dict, comment: str) -> tuple[int, dict]:
        """Stores one judgement; (HTTP status, body). A repeat of a stored judgement is acknowledged again."""
        con = self._con()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                a = con.execute("SELECT rater_id, prompt_id, model_a, model_b FROM assignments WHERE assignment_id=?",
                                (assignment_id,)).fetchone()
                if a is None:
                    con.execute("ROLLBACK")
                    return 404, {"error": "unknown item (assignment); ask for a new one"}
                if a[0] != rater_id:
                    con.execute("ROLLBACK")
                    return 403, {"error": "this item was given to another rater"}
                old = con.execute("SELECT judgement_id, assignment_id FROM judgements WHERE judgement_id=? OR "
                                  "assignment_id=?", (judgement_id, assignment_id)).fetchall()
                if old:
                    con.execute("ROLLBACK")
                    if any(j == judgement_id and s == assignment_id for j, s in old):
                        return 200, {"judgement_id": judgement_id, "stored": True, "duplicate": True}
                    return 409, {"error": "this item was already judged, or the judgement id was used for another item"}
                con.execute("INSERT INTO judgements VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                            (judgement_id, assignment_id, rater_id, a[1], a[2], a[3], f"{a[2]},{a[3]}",
                             choices["fidelity"], choices["knowledge"], choices["style"], comment, time.time()))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            return 200, {"judgement_id": judgement_id, "stored": True, "duplicate": False}
        finally:
            con.close()

    def count(self, rater_id: str | None = None) -> int:
        con = self._con()
        try:
            if rater_id is None:
                return con.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
            return con.execute("SELECT COUNT(*) FROM judgements WHERE rater_id=?", (rater_id,)).fetchone()[0]
        finally:
            con.close()


def check_id(value, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise RateError(f"'{what}' must be 1-64 characters of letters, digits and _ . : @ -")
    return value


def parse_judgement(body) -> tuple[str, str, str, dict, str]:
    """(judgement_id, assignment_id, rater_id, choices, comment) of a POST body, checked."""
    if not isinstance(body, dict):
        raise RateError("the request body must be a JSON object")
    jid = check_id(body.get("judgement_id"), "judgement_id")
    aid = check_id(body.get("assignment_id"), "assignment_id")
    rater = check_id(body.get("rater_id"), "rater_id")
    choices = body.get("choices")
    if not isinstance(choices, dict):
        raise RateError("'choices' must be an object with " + ", ".join(CRITERIA))
    for c in CRITERIA:
        if choices.get(c) not in CHOICES:
            raise RateError(f"choices.{c} must be one of A, B, tie")
    comment = body.get("comment") or ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise RateError(f"'comment' must be a string of at most {MAX_COMMENT} characters")
    return jid, aid, rater, {c: choices[c] for c in CRITERIA}, comment


def pick_item(prompts: list[Prompt], models: list[str], mine: set, others: dict, overlap: float,
              rng: random.Random) -> tuple[Prompt, str, str]:
    """A prompt and two models (in the order shown: A, B). With chance `overlap` an item another rater judged
    (and this one did not) is offered again, so agreement can be measured; otherwise a random item this rater
    has not judged (any item once all are judged)."""
    by_id = {p.id: p for p in prompts}
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    if others and rng.random() < overlap:
        shared = [it for it in others if it not in mine and it[0] in by_id and it[1] <= set(models)]
        if shared:
            pid, pair = rng.choice(sorted(shared, key=lambda it: (it[0], sorted(it[1]))))
            a, b = sorted(pair)
            return (by_id[pid], *((a, b) if rng.random() < 0.5 else (b, a)))
    for _ in range(64):
        p, (a, b) = rng.choice(prompts), rng.choice(pairs)
        if (p.id, frozenset((a, b))) not in mine:
            break
    return (p, *((a, b) if rng.random() < 0.5 else (b, a)))
