"""DPO data: preference rows -> pairs of token ids -> shared-prompt packed rows (see train/dpo.py for the layout).

Rows in any preference shape TRL reads, from any source (persllm_jax.formats): explicit prompt, implicit prompt
(chosen/rejected only), conversational or standard (strings). Tokenisation follows TRL's DPOTrainer:
completion = the tokens of render(prompt + chosen) after the common prefix with render(prompt,
add_generation_prompt=True) (the prompt the shorter common prefix of the two); standard rows use no chat template
(the tokenizer's own special tokens, EOS appended to each answer unless already there). Whole pairs are packed
best-fit into rows of `max_length` tokens with at most K completion tokens and S pairs per row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from persllm_jax import formats
from persllm_jax.train.data import DataError, corpus_file

ROW_KEYS = ("tokens", "positions", "segment_ids", "branch")
COMP_KEYS = ("comp_src", "comp_tgt", "comp_w", "comp_seq")
PAIR_KEYS = ("pair_id", "pair_valid", "ref_chosen", "ref_rejected")
BATCH_KEYS = ROW_KEYS + COMP_KEYS + PAIR_KEYS
FLOAT_KEYS = ("comp_w", "pair_valid", "ref_chosen", "ref_rejected")



@dataclass
class Pair:
    prompt: np.ndarray  # int32 ids
    chosen: np.ndarray
    rejected: np.ndarray
    index: int  # row number in the corpus (keys the reference cache)
    where: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def completion(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0  # completions shortened to fit prompt+chosen+rejected into max_length
    dropped: int = 0  # prompt too long, or an empty completion
    tokens: int = 0  # prompt + chosen + rejected (the prompt once)
    completion_tokens: int = 0


def dpo_file(path: str | Path, split: str = "train") -> Path:
    """CORPUS_DIR/dpo/<split>.jsonl, or `path` itself (a data file, datasets folder or Hub id: see corpus_file)."""
    return corpus_file(path, split, "dpo")


def _ids(tokenizer, msgs, gen: bool) -> list[int]:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_eos(tokenizer, text: str) -> str:
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer, row: dict, index: int, where: str = "") -> Pair:
    """TRL's split: prompt = common prefix of the prompt (with generation prompt) and each full rendering."""
    kind, prompt, chosen, rejected = formats.pref_row(row, where)
    if kind == "chat":
        p = _ids(tokenizer, prompt, True)
        pc, pr = _ids(tokenizer, prompt + chosen, False), _ids(tokenizer, prompt + rejected, False)
    else:
        tok = lambda text: list(tokenizer(text)["input_ids"])  # noqa: E731
        p = tok(prompt)
        pc, pr = tok(prompt + _with_eos(tokenizer, chosen)), tok(prompt + _with_eos(tokenizer, rejected))
    n = min(_common(p, pc), _common(p, pr))
    as_np = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return Pair(as_np(p[:n]), as_np(pc[n:]), as_np(pr[n:]), index, where)


def fit_pair(pair: Pair, max_length: int) -> Pair | None:
    """Shorten the longer completion first so the document fits `max_length`; None if nothing would be left."""
    budget = max_length - len(pair.prompt)
    c, r = len(pair.chosen), len(pair.rejected)
    if len(pair.prompt) == 0 or c == 0 or r == 0 or budget < 2:
        return None
    if c + r <= budget:
        return pair
    half = budget // 2
    if c <= half:
        r = budget - c
    elif r <= budget - half:
        c = budget - r
    else:
        c, r = half, budget - half
    return Pair(pair.prompt, pair.chosen[:c], pair.rejected[:r], pair.index, pair.where)


def load_pairs(tokenizer, path: str | Path, max_length: int) -> tuple[list[Pair], PairStats]:
    stats, out = PairStats(), []
    for i, (where, row) in enumerate(formats.read_source(path)):
        pair = tokenize_pair(tokenizer, row, i, where)
        stats.pairs += 1
        fitted = fit_pair(pair, max_length)
        if fitted is None:
            stats.dropped += 1
            continue
        stats.truncated += fitted is not pair
        stats.tokens += fitted.length
        stats.completion_tokens += fitted.completion
        out.append(fitted)
    if not out:
        raise DataError(f"{path}: no pair fits max_length={max_length} with a non-empty chosen and rejected answer")
    return out, stats


def _assign(pairs: list[Pair], row_tokens: int, K: int, S: int, packing: bool) -> list[list[Pair]]:
    """Best-fit decreasing into rows of row_tokens tokens, at most K completion tokens and S pairs per row."""
    if not packing:
        return [[p] for p in pairs]
    rows: list[list[Pair]] = []
    comp: list[int] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in sorted(range(len(pairs)), key=lambda i: -pairs[i].length):
        pr = pairs[i]
        j = bisect.bisect_left(free, (pr.length, -1))
        while j < len(free) and (comp[free[j][1]] + pr.completion > K or len(rows[free[j][1]]) >= S):
            j += 1
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = row_tokens, len(rows)
            rows.append([])
            comp.append(0)
        rows[r].append(pr)
        comp[r] += pr.completion
        if room - pr.length > 0:
            bisect.insort(free, (room - pr.length, r))
    return rows


def budgets(pairs: list[Pair], max_length: int, packing: bool) -> tuple[int, int]:
    """(K, S): completion tokens and pairs per row, from epoch 0's packing (static shapes for the whole run)."""
    rows = _assign(pairs, max_length, max_length, max_length, packing)
    k = max(sum(p.completion for p in r) for r in rows)
    return min(max_length, -(-k // 8) * 8), max(len(r) for r in rows)


def pack_pairs(pairs: list[Pair], max_length: int, K: int, S: int, packing: bool = True) -> dict[str, np.ndarray]:
    rows = _assign(pairs, max_length, K, S, packing)
    N = len(rows)
    out = {k: np.zeros((N, max_length), np.int32) for k in ROW_KEYS}
    out.update({k: np.zeros((N, K), np.int32) for k in COMP_KEYS})
    out.update({k: np.zeros((N, S), np.int32) for k in PAIR_KEYS})
    for k in FLOAT_KEYS:
        out[k] = out[k].astype(np.float32)
    out["pair_id"][:] = -1
    for r, docs in enumerate(rows):
        o = k = 0
        for s, pr in enumerate(docs):
            P, C, R = len(pr.prompt), len(pr.chosen), len(pr.rejected)
            sl = slice(o, o + P + C + R)
            out["tokens"][r, sl] = np.concatenate([pr.prompt, pr.chosen, pr.rejected])
            out["positions"][r, sl] = np.concatenate([np.arange(P), P + np.arange(C), P + np.arange(R)])
            out["segment_ids"][r, sl] = s + 1
            out["branch"][r, sl] = np.repeat([0, 1, 2], [P, C, R])
            src = np.concatenate([o + P - 1 + np.arange(C), [o + P - 1], o + P + C + np.arange(R - 1)])
            out["comp_src"][r, k:k + C + R] = src
            out["comp_tgt"][r, k:k + C + R] = np.concatenate([pr.chosen, pr.rejected])
            out["comp_w"][r, k:k + C + R] = 1.0
            out["comp_seq"][r, k:k + C + R] = np.repeat([2 * s, 2 * s + 1], [C, R])
            out["pair_id"][r, s] = pr.index
            out["pair_valid"][r, s] = 1.0
            o, k = o + P + C + R, k + C + R
    return out


def epoch_rows(pairs, max_length, K, S, seed, epoch, shuffle=True, packing=True) -> dict[str, np.ndarray]:
    """One epoch's rows, a pure function of (seed, epoch) as for SFT."""
    if not shuffle:
        return pack_pairs(pairs, max_length, K, S, packing)
    rng = np.random.default_rng([seed, epoch])
    rows = pack_pairs([pairs[i] for i in rng.permutation(len(pairs))], max_length, K, S, packing)
    order = rng.permutation(len(rows["tokens"]))
    return {k: v[order] for k, v in rows.items()}


def batches(rows_of_epoch, rows_per_step: int, start_row: int = 0):
    """Endless (batch, next_row) stream over epochs; the data position is the number of rows consumed."""
    epoch, offset = 0, start_row
    rows = rows_of_epoch(0)
    while offset >= len(rows["tokens"]):
        offset -= len(rows["tokens"])
        epoch += 1
        rows = rows_of_epoch(epoch)
    while True:
        parts, need = [], rows_per_step
        while need:
            n = len(rows["tokens"])
            take = min(need, n - offset)
            parts.append({k: v[offset:offset + take] for k, v in rows.items()})
            need, offset = need - take, offset + take
            if offset >= n:
                epoch, offset = epoch + 1, 0
                rows = rows_of_epoch(epoch)
        start_row += rows_per_step
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, start_row


__all__ = ["ROW_KEYS", "COMP_KEYS", "PAIR_KEYS", "BATCH_KEYS", "FLOAT_KEYS", "Pair", "PairStats", "dpo_file",
           "tokenize_pair", "fit_pair", "load_pairs", "budgets", "pack_pairs", "epoch_rows", "batches"]
