"""SFT data: rows in any shape TRL reads -> tokens with trained-token masks -> packed rows with segment ids -> batches.

- `read_rows` reads any source of persllm_jax.formats (JSONL, JSON, parquet, a datasets folder, a cached Hub
  dataset id); every error names the file and the row (JSONL: line and column).
- Conversational rows (`messages`, ShareGPT `conversations`, message-list `prompt`/`completion`): `tokenize_chat`
  renders with the tokenizer's chat template and marks as trained exactly the tokens of each assistant message's
  content plus its end-of-turn token (found by rendering prefixes of the conversation); for prompt/completion
  only the completion's assistant turns (TRL's completion-only loss; TRL would also train the template's text
  after the end-of-turn token, e.g. the newline after <|im_end|>).
- Standard (string) rows, as TRL's SFTTrainer: no chat template, the tokenizer's own special tokens, EOS
  appended unless already there; `{"text"}` trains every token (language modeling), `{"prompt", "completion"}`
  (strings) only the completion's tokens (after the common prefix of tokenize(prompt) and
  tokenize(prompt + completion)).
- `pack_rows` puts whole documents into rows of `max_length` (best-fit decreasing): segment ids 1, 2, ... per document (0 =
  padding), positions restarting at 0 per document; targets never cross a document boundary.
- The stream of rows is a pure function of (seed, epoch), so the data position is a single integer (rows
  consumed) and a resumed run reads exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from persllm_jax import formats
from persllm_jax.formats import ROLES, FormatError

EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

DataError = FormatError  # training data that cannot be used as it is; the message names the file and row


@dataclass
class Example:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: this token is a training target
    where: str = ""


@dataclass
class DataStats:
    conversations: int = 0
    truncated: int = 0  # conversations cut at max_length
    dropped: int = 0  # conversations with no trained token left after truncation
    tokens: int = 0
    trained_tokens: int = 0
    extra: dict = field(default_factory=dict)


def corpus_file(path: str | Path, split: str = "train", section: str = "sft") -> Path:
    """CORPUS_DIR/<section>/<split>.jsonl for a corpus folder, else `path` itself: a data file, a datasets
    folder (a DatasetDict folder: its `split`), or a cached Hub dataset id (`org/name[:split]`, kept as a Path
    that read_rows parses back)."""
    p = Path(path)
    if p.is_dir() and not formats.is_saved_dataset(p):
        p = p / section / f"{split}.jsonl"
    elif p.is_dir() and (p / "dataset_dict.json").is_file() and (p / split).is_dir():
        p = p / split
    elif not p.exists() and formats.is_hub_id(path):
        return Path(str(path) if ":" in str(path) else f"{path}:{split}")
    if not p.exists():
        raise DataError(f"{p}: no such file (expected CORPUS_DIR/{section}/{split}.jsonl, a data file "
                        f"({formats.SOURCES}))")
    return p


def read_rows(path: str | Path, split: str = "train") -> list[tuple[str, dict]]:
    """[("file:line" or "file[row]", row)] of a data source (persllm_jax.formats); an empty one is an error."""
    rows = formats.read_source(path, split)
    if not rows:
        raise DataError(f"{path}: empty corpus (no rows)")
    return rows


def check_messages(row: dict, where: str) -> list[dict]:
    """The checked `messages` of a conversational row (roles known, an assistant turn present)."""
    return formats.messages(row.get("messages"), where)


def _render(tokenizer, msgs, gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)


def eot_strings(tokenizer) -> set[str]:
    vocab = tokenizer.get_vocab()
    out = {t for t in EOT_CANDIDATES if t in vocab}
    if tokenizer.eos_token:
        out.add(tokenizer.eos_token)
    return out


def assistant_spans(tokenizer, msgs: list[dict], where: str = "",
                    train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """(full text, char spans to train): each assistant content (of messages[train_from:]) plus the end-of-turn
    marker that follows it."""
    full = _render(tokenizer, msgs, False)
    eots = eot_strings(tokenizer)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < train_from:
            continue
        prefix = _render(tokenizer, msgs[:i], True) if i else ""
        upto = _render(tokenizer, msgs[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix; "
                            "cannot locate assistant turns")
        turn = upto[len(prefix):]
        content = m["content"] if m["content"] in turn else m["content"].strip()  # some templates trim
        start = turn.find(content) if content else 0
        if start < 0:
            raise DataError(f"{where}: the chat template altered assistant message {i}; cannot locate it")
        end = start + len(content)
        rest = turn[end:]
        hits = [(rest.find(e), e) for e in eots if rest.find(e) >= 0]
        if hits:
            pos, e = min(hits)
            end += pos + len(e)
        else:
            end = len(turn)
        spans.append((len(prefix) + start, len(prefix) + end))
    return full, spans


def tokenize_chat(tokenizer, msgs: list[dict], where: str = "", train_from: int = 0) -> Example:
    text, spans = assistant_spans(tokenizer, msgs, where, train_from)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.zeros(len(ids), bool)
    for j, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s < b for a, b in spans):  # a token straddling into the span from the template is not trained
            mask[j] = True
    return Example(ids, mask, where)


def _with_eos(tokenizer, text: str) -> str:
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def tokenize_row(tokenizer, row: dict, where: str = "") -> Example:
    """One SFT row of any accepted shape (see the module docstring for what is trained)."""
    shape = formats.sft_row(row, where)
    if shape[0] == "chat":
        _, msgs, train_from = shape
        return tokenize_chat(tokenizer, msgs, where, train_from)
    if shape[0] == "text":
        ids = np.asarray(tokenizer(_with_eos(tokenizer, shape[1]))["input_ids"], np.int32)
        return Example(ids, np.ones(len(ids), bool), where)
    _, prompt, completion = shape
    p = list(tokenizer(prompt)["input_ids"])
    full = list(tokenizer(_with_eos(tokenizer, prompt + completion))["input_ids"])
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    mask = np.zeros(len(full), bool)
    mask[n:] = True
    return Example(np.asarray(full, np.int32), mask, where)


def load_examples(tokenizer, path: str | Path, max_length: int) -> tuple[list[Example], DataStats]:
    rows = read_rows(path)
    stats = DataStats()
    out = []
    for where, row in rows:
        ex = tokenize_row(tokenizer, row, where)
        stats.conversations += 1
        if len(ex.ids) > max_length:
            stats.truncated += 1
            ex = Example(ex.ids[:max_length], ex.mask[:max_length], where)
        if not ex.mask[1:].any():
            stats.dropped += 1
            continue
        stats.tokens += len(ex.ids)
        stats.trained_tokens += int(ex.mask[1:].sum())
        out.append(ex)
    if not out:
        raise DataError(f"{path}: no conversation has a trainable assistant token within max_length={max_length}")
    return out, stats


def pack_rows(examples: list[Example], max_length: int, packing: bool = True) -> dict[str, np.ndarray]:
    """Rows [N, max_length]: tokens, targets, weights (fp32), positions, segment_ids (0 = padding).

    Packing is best-fit decreasing: longest documents first, each into the open row with the least room that
    still fits it (whole documents only). Without packing, one document per row in the given order.
    """
    rows: list[list[Example]] = []
    if packing:
        free: list[tuple[int, int]] = []  # sorted (room left, row index)
        for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].ids)):
            ex, n = examples[i], len(examples[i].ids)
            j = bisect.bisect_left(free, (n, -1))
            if j < len(free):
                room, r = free.pop(j)
            else:
                room, r = max_length, len(rows)
                rows.append([])
            rows[r].append(ex)
            if room - n > 0:
                bisect.insort(free, (room - n, r))
    else:
        rows = [[ex] for ex in examples]
    N, T = len(rows), max_length
    out = {k: np.zeros((N, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out["weights"] = np.zeros((N, T), np.float32)
    for r, docs in enumerate(rows):
        o = 0
        for s, ex in enumerate(docs, 1):
            n = len(ex.ids)
            out["tokens"][r, o:o + n] = ex.ids
            out["positions"][r, o:o + n] = np.arange(n)
            out["segment_ids"][r, o:o + n] = s
            out["targets"][r, o:o + n - 1] = ex.ids[1:]
            out["weights"][r, o:o + n - 1] = ex.mask[1:]
            o += n
    return out


def epoch_rows(examples: list[Example], max_length: int, seed: int, epoch: int, shuffle: bool = True,
               packing: bool = True) -> dict[str, np.ndarray]:
    """One epoch's rows: documents shuffled, packed, then the rows shuffled (all from (seed, epoch))."""
    if not shuffle:
        return pack_rows(examples, max_length, packing)
    rng = np.random.default_rng([seed, epoch])
    rows = pack_rows([examples[i] for i in rng.permutation(len(examples))], max_length, packing)
    order = rng.permutation(len(rows["tokens"]))
    return {k: v[order] for k, v in rows.items()}


def batches(examples, max_length: int, rows_per_step: int, seed: int, start_row: int = 0, shuffle: bool = True,
            packing: bool = True, row_slice: slice = slice(None)):
    """Endless stream of (batch, next_row): `rows_per_step` rows per item, crossing epochs seamlessly.

    `start_row` is the data position (rows consumed so far); `row_slice` selects this process's rows of each
    global batch (multi-host).
    """
    epoch, offset, cache = 0, start_row, None
    while True:
        if cache is None or cache[0] != epoch:
            cache = (epoch, epoch_rows(examples, max_length, seed, epoch, shuffle, packing))
        rows = cache[1]
        n = len(rows["tokens"])
        if offset >= n:
            offset -= n
            epoch += 1
            continue
        parts = []
        need = rows_per_step
        while need:
            take = min(need, n - offset)
            parts.append({k: v[offset:offset + take] for k, v in rows.items()})
            need -= take
            offset += take
            if offset >= n:
                epoch, offset = epoch + 1, 0
                rows = epoch_rows(examples, max_length, seed, epoch, shuffle, packing)
                cache = (epoch, rows)
                n = len(rows["tokens"])
        batch = {k: np.concatenate([p[k] for p in parts])[row_slice] for k in parts[0]}
        start_row += rows_per_step
        yield batch, start_row


__all__ = ["ROLES", "DataError", "Example", "DataStats", "corpus_file", "read_rows", "check_messages", "tokenize_chat",
           "tokenize_row",
           "assistant_spans", "load_examples", "pack_rows", "epoch_rows", "batches"]
