"""A fixed pool of KV-cache slots over one base model: the device side of continuous batching.

The cache holds `n_slots` rows of `slot_tokens` positions each (`decoder.forward_slots`), allocated once. A
request takes a free row, is prefilled into it in chunks (`prefill`, any subset of rows), then decodes with every
other busy row (`decode`, all rows at once, idle rows masked), each row with its own adapter (`AdapterBank`),
sampling settings, seed and position. Programs are bucketed: prefill by (rows: a power of two, chunk length:
`engine._prompt_bucket`, attended span: a multiple of SPAN_STEP), decode by (span, greedy, logprobs), so a
server compiles a handful of programs, never one per request mix.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import forward_slots
from persllm_jax.serve.adapters import AdapterBank, with_rows
from persllm_jax.serve.engine import _batch_bucket, _filter_logits, _prompt_bucket, _round_up

SPAN_STEP = 128  # attended cache length is bucketed to this multiple
TOP_LOGPROBS = 20  # the most `top_logprobs` a request may ask for (OpenAI's limit)


def _sample(logits, seeds, steps, temperature, top_k, top_p, greedy: bool):
    """Each row's next token: greedy, or drawn with key fold_in(key(seed), step) (as `engine._next_token`, but
    with a step per row, since rows start at different times)."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = _filter_logits(scaled, top_k, top_p)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, best)


@partial(jax.jit, static_argnames=("cfg", "dtype", "span"), donate_argnames=("cache", "logits"))
def _prefill(params, bank, cache, logits, rows, tokens, start, last, adapter, *, cfg: ModelConfig, dtype, span: int):
    new, cache = forward_slots(params, cfg, tokens, start, cache, span=span, rows=rows, last=last,
                               lora=with_rows(bank, adapter), dtype=dtype)
    return logits.at[rows].set(new, mode="drop"), cache


@partial(jax.jit, static_argnames=("cfg", "dtype", "n_steps", "span", "greedy", "logprobs"),
         donate_argnames=("cache", "logits"))
def _decode(params, bank, cache, logits, rows, sampling, *, cfg: ModelConfig, dtype, n_steps: int, span: int,
            greedy: bool, logprobs: bool):
    """Up to n_steps tokens for every row with `remaining` > 0 (fewer once all are done). rows: (pos, steps,
    remaining, adapter) [N]; out tokens are -1 where a row had finished."""
    pos, steps, remaining, adapter = rows
    eos, seeds, temperature, top_k, top_p = sampling
    N, S = pos.shape[0], cache["k"][0].shape[2]
    lora = with_rows(bank, adapter)
    K = TOP_LOGPROBS if logprobs else 1

    def cond(c):
        return (c[0] < n_steps) & ~jnp.all(c[2])

    def body(c):
        t, out, done, logits, cache = c
        token = _sample(logits, seeds, steps + t, temperature, top_k, top_p, greedy)
        rec = {"token": jnp.where(done, -1, token)}
        if logprobs:
            logp = jax.nn.log_softmax(logits, axis=-1)
            rec["logprob"] = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
            rec["top_logprob"], rec["top_id"] = jax.lax.top_k(logp, K)
        out = {k: out[k].at[:, t].set(v) for k, v in rec.items()}
        finished = done | jnp.any(token[:, None] == eos[None, :], axis=-1) | (t + 1 >= remaining)
        write = jnp.where(done, S, pos + t)  # finished and idle rows write nowhere
        new, cache = forward_slots(params, cfg, token[:, None], write, cache, span=span, lora=lora, dtype=dtype)
        return t + 1, out, finished, jnp.where(done[:, None], logits, new), cache  # idle rows keep theirs

    out = {"token": jnp.full((N, n_steps), -1, jnp.int32)}
    if logprobs:
        out.update(logprob=jnp.zeros((N, n_steps), jnp.float32), top_logprob=jnp.zeros((N, n_steps, K), jnp.float32),
                   top_id=jnp.zeros((N, n_steps, K), jnp.int32))
    t, out, _, logits, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), out, remaining <= 0, logits, cache))
    return out, t, logits, cache


@dataclasses.dataclass
class DecodeOut:
    n: int  # steps run
    token: np.ndarray  # [N, n_steps], -1 where finished
    logprob: np.ndarray | None = None
    top_logprob: np.ndarray | None = None
    top_id: np.ndarray | None = None


class SlotEngine:
    """The KV slots of one base model and its adapter bank, with the two device steps. Not thread-safe: one
    scheduler thread owns it."""

    def __init__(self, gen, bank: AdapterBank, n_slots: int, slot_tokens: int | None = None):
        self.gen, self.bank, self.cfg, self.dtype = gen, bank, gen.cfg, gen.dtype
        self.n_slots = int(n_slots)
        self.slot_tokens = int(min(slot_tokens or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings))
        shape = (self.n_slots, self.cfg.num_kv_heads, self.slot_tokens, self.cfg.head_dim)
        L = self.cfg.num_layers
        self.cache = {"k": [jnp.zeros(shape, self.dtype) for _ in range(L)],
                      "v": [jnp.zeros(shape, self.dtype) for _ in range(L)]}
        self.logits = jnp.zeros((self.n_slots, self.cfg.vocab_size), jnp.float32)
        self.eos = jnp.asarray(np.array(gen.eos_token_ids or (-1,), np.int32))

    def kv_bytes_per_slot(self) -> int:
        c = self.cfg
        return 2 * c.num_layers * c.num_kv_heads * self.slot_tokens * c.head_dim * jnp.dtype(self.dtype).itemsize

    def _span(self, end: int) -> int:
        return min(self.slot_tokens, _round_up(max(end, 1), SPAN_STEP))

    def prefill(self, parts: list[tuple[int, list[int], int, int]], chunk: int) -> None:
        """parts: (slot, tokens, start position, adapter row) of rows to prefill, at most `chunk` tokens each.
        Leaves each row's next-token logits in place (meaningful once its whole prompt is in)."""
        Bp = _batch_bucket(len(parts))
        T = min(_prompt_bucket(max(len(p[1]) for p in parts)), chunk)
        tokens = np.full((Bp, T), self.gen.pad_id, np.int32)
        rows = np.full(Bp, self.n_slots, np.int32)  # padding rows: out of range, their writes are dropped
        start = np.full(Bp, self.slot_tokens, np.int32)
        last = np.zeros(Bp, np.int32)
        adapter = np.zeros(Bp, np.int32)
        for i, (slot, toks, at, a) in enumerate(parts):
            tokens[i, :len(toks)] = toks
            rows[i], start[i], last[i], adapter[i] = slot, at, len(toks) - 1, a
        span = self._span(max(p[2] + T for p in parts))
        self.logits, self.cache = _prefill(self.gen.params, self.bank.layers, self.cache, self.logits,
                                           jnp.asarray(rows), jnp.asarray(tokens), jnp.asarray(start),
                                           jnp.asarray(last), jnp.asarray(adapter), cfg=self.cfg, dtype=self.dtype,
                                           span=span)

    def decode(self, pos, steps, remaining, adapter, seeds, temperature, top_k, top_p, n_steps: int,
               logprobs: bool) -> DecodeOut:
        """One decode call over all slots (numpy arrays [N]; `remaining` 0 = the row sits out)."""
        busy = remaining > 0
        end = int(np.max(np.where(busy, pos + np.minimum(remaining, n_steps), 0)))
        greedy = not bool(np.any(busy & (temperature > 0)))
        rows = tuple(jnp.asarray(x) for x in (np.where(busy, pos, self.slot_tokens).astype(np.int32),
                                              steps.astype(np.int32), remaining.astype(np.int32),
                                              adapter.astype(np.int32)))
        sampling = (self.eos, jnp.asarray(seeds.astype(np.uint32)), jnp.asarray(temperature.astype(np.float32)),
                    jnp.asarray(top_k.astype(np.int32)), jnp.asarray(top_p.astype(np.float32)))
        out, t, self.logits, self.cache = _decode(self.gen.params, self.bank.layers, self.cache, self.logits, rows,
                                                  sampling, cfg=self.cfg, dtype=self.dtype, n_steps=n_steps,
                                                  span=self._span(end), greedy=greedy, logprobs=logprobs)
        host = {k: np.asarray(v) for k, v in out.items()}
        return DecodeOut(int(t), host.pop("token"), **host)


__all__ = ["SPAN_STEP", "TOP_LOGPROBS", "DecodeOut", "SlotEngine"]
