"""Likelihood scoring with the generation engine: the log-probability of given continuations after given prompts
(the judge-free answer scoring of point-in-time probes), and the next-token log-probabilities of a few candidate
tokens (the Big Five's Likert options). Same weights, adapter and padding rules as `engine.Generator`.

The prompt runs into a KV cache (left-padded, as in generation) and the continuation is scored in one more call
over the cache, so logits are computed for the continuation tokens only ([B, C, V], not [B, P + C, V]). A prompt
shared by several continuations (a probe's consistent and inconsistent answers) is prefilled once and its cache
rows are copied to each of them: the long system message is paid once, not once per option."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import forward_cached, init_cache
from persllm_jax.serve.engine import _batch_bucket, _prefill, _prompt_bucket, _round_up


@partial(jax.jit, static_argnames=("cfg", "dtype"))
def _continuation_logprobs(params, lora, lora_scale, tokens, positions, segments, src, cont, cont_segments, *,
                           cfg: ModelConfig, dtype):
    """Per-token log-probabilities [B, C] of `cont` (right-padded; cont_segments 0 on padding) after the prompts
    [U, P]: continuation row b follows prompt row src[b]."""
    U, P = tokens.shape
    C = cont.shape[1]
    cache = init_cache(cfg, U, P + C, dtype)
    last, cache = forward_cached(params, cfg, tokens, positions, segments, cache, lora=lora, lora_scale=lora_scale,
                                 dtype=dtype)
    cache = jax.tree.map(lambda x: x[src] if x.ndim else x, cache)  # every leaf but the write index is [U, ...]
    cont_pos = positions[src, -1:] + 1 + jnp.arange(C, dtype=positions.dtype)[None, :]
    logits, _ = forward_cached(params, cfg, cont, cont_pos, cont_segments, cache, lora=lora, lora_scale=lora_scale,
                               dtype=dtype, last_only=False)
    logits = jnp.concatenate([last[src][:, None], logits[:, :-1]], axis=1)  # position t predicts cont[:, t]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(lp, cont[..., None], axis=-1)[..., 0]
    return jnp.where(cont_segments > 0, tok, 0.0)


def left_padded(prompts: list[list[int]], pad_id: int, length: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, positions, segments) [B, P] of prompts left-padded into one bucketed batch (P = `length`, else the
    prompt bucket), so every row's next token lands in the last slot; filler rows hold one real token, so no row
    is all padding."""
    B, P = _batch_bucket(len(prompts)), length or _prompt_bucket(max(len(p) for p in prompts))
    tokens = np.full((B, P), pad_id, np.int32)
    seg = np.zeros((B, P), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, P - len(p):] = p
        seg[r, P - len(p):] = 1
    seg[len(prompts):, -1] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, pos, seg


def _prompt_groups(prompts: list[list[int]], continuations: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Batches of prompt groups (the indices sharing one prompt), shortest prompts first, with at most
    `batch_size` continuations a batch (a group larger than that is split)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (len(prompts[g[0]]), max(len(continuations[i]) for i in g)))
    batches, cur, n = [], [], 0
    for g in ordered:
        for k in range(0, len(g), batch_size):
            part = g[k:k + batch_size]
            if n + len(part) > batch_size and cur:
                batches.append(cur)
                cur, n = [], 0
            cur.append(part)
            n += len(part)
    return batches + ([cur] if cur else [])


def continuation_logprobs(gen, prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 8
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-probability, token count) of each continuation after its prompt, under `gen` (a Generator).
    Equal prompts are prefilled once; `batch_size` is the continuations scored per call."""
    if len(prompts) != len(continuations):
        raise ValueError("one continuation per prompt")
    if any(len(p) == 0 for p in prompts) or any(len(c) == 0 for c in continuations):
        raise ValueError("empty prompt or continuation")
    total = np.zeros(len(prompts), np.float64)
    count = np.array([len(c) for c in continuations], np.int64)
    # few shapes, few compiles (on a CPU they cost more than the scoring): prompts and continuations padded to
    # powers of two, every call batch_size continuation rows (the finer buckets where those exceed the context)
    ctx = gen.cfg.max_position_embeddings
    for batch in _prompt_groups(prompts, continuations, max(1, batch_size)):
        idx = [i for g in batch for i in g]
        p_len, c_len = max(len(prompts[g[0]]) for g in batch), max(len(continuations[i]) for i in idx)
        P, C = max(16, _batch_bucket(p_len)), max(16, _batch_bucket(c_len))
        if P + C > ctx:
            P, C = _prompt_bucket(p_len), _round_up(c_len, 16)
        tokens, pos, seg = left_padded([prompts[g[0]] for g in batch], gen.pad_id, P)
        src = np.zeros(_batch_bucket(max(1, batch_size)), np.int32)  # filler continuation rows read prompt row 0
        src[:len(idx)] = [u for u, g in enumerate(batch) for _ in g]
        if P + C > ctx:
            raise ValueError(f"prompt + continuation ({P + C} tokens) exceed the model's context of "
                             f"{gen.cfg.max_position_embeddings}")
        cont = np.full((len(src), C), gen.pad_id, np.int32)
        cseg = np.zeros((len(src), C), np.int32)
        for r, i in enumerate(idx):
            cont[r, :len(continuations[i])] = continuations[i]
            cseg[r, :len(continuations[i])] = 1
        lp = _continuation_logprobs(gen.params, gen.lora, gen.lora_scale, jnp.asarray(tokens), jnp.asarray(pos),
                                    jnp.asarray(seg), jnp.asarray(src), jnp.asarray(cont), jnp.asarray(cseg),
                                    cfg=gen.cfg, dtype=gen.dtype)
        total[idx] = np.asarray(lp, np.float64)[: len(idx)].sum(axis=1)
    return total, count


def next_token_logprobs(gen, prompts: list[list[int]], token_ids, batch_size: int = 16, progress=None) -> np.ndarray:
    """[N, K] log-probabilities of the K candidate `token_ids` as the next token after each prompt (one prefill
    per batch, no decoding): the Big Five's Likert options."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    token_ids = np.asarray(token_ids)
    out = np.zeros((len(prompts), len(token_ids)), np.float64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        tokens, pos, seg = left_padded([prompts[i] for i in idx], gen.pad_id)
        logits, _ = _prefill(gen.params, gen.lora, gen.lora_scale, jnp.asarray(tokens), jnp.asarray(pos),
                             jnp.asarray(seg), cfg=gen.cfg, dtype=gen.dtype, capacity=tokens.shape[1])
        lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
        out[idx] = lp[: len(idx)][:, token_ids]
        if progress:
            progress(len(idx))
    return out


def answer_logprobs(gen, conversations: list[list[dict]], answers: list[str], batch_size: int = 8,
                    normalize: str = "mean") -> np.ndarray:
    """Log-likelihood of each assistant answer after its chat (the chat template's generation prompt, then the
    answer's tokens): summed, or per token with normalize="mean" (answers of different lengths compare fairly)."""
    prompts = [gen.encode_chat(c) for c in conversations]
    conts = [gen.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    total, count = continuation_logprobs(gen, prompts, conts, batch_size)
    if normalize == "sum":
        return total
    if normalize == "mean":
        return total / np.maximum(count, 1)
    raise ValueError(f"normalize must be mean or sum, not {normalize!r}")
