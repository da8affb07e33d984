"""KV-cache generation: batched prompts of different lengths, greedy or sampled, stop on EOS or strings.

Shapes are bucketed (batch to a power of two, prompt length to steps of 1/8 of the power of two below it,
cache length to a multiple of 64), so a run compiles one prefill and one decode program per bucket, never
per token. Decoding runs `chunk`
tokens per device call inside a `lax.while_loop`; between chunks the host checks stop strings and
streams text. Every row has its own sampling settings and seed, so a row's output does not depend on
what else is in the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.model.decoder import forward_cached, init_cache, unstack_layers
from persllm_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    logprobs: list | None = None  # per token (id, logprob, top ids, top logprobs), when asked for


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_bucket(n: int) -> int:
    """Prompt length rounded up to a step of 1/8 of the power of two below it (at least 16): padding stays
    under 12.5% beyond 128 tokens (a batched
    prefill is compute-bound, so padding is paid in full) while a server compiles ~8 buckets per octave."""
    return _round_up(n, max(16, 1 << max(0, n.bit_length() - 4)))


def _batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _filter_logits(logits, top_k, top_p):
    """Mask logits outside the per-row top-k / nucleus (top-p) set."""
    sorted_desc = -jnp.sort(-logits, axis=-1)
    V = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < top_p[:, None]
    nucleus_min = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, nucleus_min)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _next_token(logits, keys, step, temperature, top_k, top_p, greedy: bool):
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = _filter_logits(scaled, top_k, top_p)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    sampled = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, best)


@partial(jax.jit, static_argnames=("cfg", "dtype", "capacity"))
def _prefill(params, lora, lora_scale, tokens, positions, segments, *, cfg: ModelConfig, dtype, capacity: int):
    cache = init_cache(cfg, tokens.shape[0], capacity, dtype)
    return forward_cached(params, cfg, tokens, positions, segments, cache, lora=lora, lora_scale=lora_scale, dtype=dtype)


@partial(jax.jit, static_argnames=("cfg", "dtype", "n_steps", "greedy"), donate_argnames=("cache",))
def _decode(params, lora, lora_scale, cache, state, sampling, limit, *, cfg: ModelConfig, dtype, n_steps: int, greedy: bool):
    """Up to min(n_steps, limit) tokens per row, fewer if every row finished. state: logits, next_pos, done, step."""
    eos, pad, keys, temperature, top_k, top_p = sampling
    B = state["done"].shape[0]

    def cond(carry):
        t, _, st, _ = carry
        return (t < jnp.minimum(n_steps, limit)) & ~jnp.all(st["done"])

    def body(carry):
        t, out, st, cache = carry
        token = _next_token(st["logits"], keys, st["step"], temperature, top_k, top_p, greedy)
        token = jnp.where(st["done"], pad, token)
        out = out.at[:, t].set(token)
        done = st["done"] | jnp.any(token[:, None] == eos[None, :], axis=-1)
        logits, cache = forward_cached(
            params, cfg, token[:, None], st["next_pos"][:, None], jnp.ones((B, 1), jnp.int32), cache,
            lora=lora, lora_scale=lora_scale, dtype=dtype,
        )
        st = {"logits": logits, "next_pos": st["next_pos"] + 1, "done": done, "step": st["step"] + 1}
        return t + 1, out, st, cache

    out = jnp.full((B, n_steps), pad, jnp.int32)
    t, out, state, cache = jax.lax.while_loop(cond, body, (jnp.int32(0), out, state, cache))
    return out, t, state, cache


class Generator:
    """A model (plus optional LoRA adapter) ready to generate. Holds no per-request state."""

    def __init__(self, cfg: ModelConfig, params, tokenizer=None, *, dtype=jnp.float32, lora=None,
                 lora_scale: float = 1.0, eos_token_ids=(), chunk: int = 32):
        self.cfg, self.tokenizer = cfg, tokenizer
        layers = params["layers"]  # stacked (as loaded or trained) or already per-layer (shared by with_adapter)
        if not isinstance(layers, list):
            params = {**params, "layers": unstack_layers(layers, cfg.num_layers)}
        self.params = params
        self.lora = lora if lora is None or isinstance(lora, list) else unstack_layers(lora, cfg.num_layers)
        self.dtype, self.lora_scale, self.chunk = dtype, float(lora_scale), chunk
        eos = set(cfg.eos_token_ids) | set(eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        pad = cfg.pad_token_id
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0))

    def with_adapter(self, lora, lora_scale: float) -> Generator:
        """The same base weights (shared, not copied) with another LoRA adapter (stacked or per-layer)."""
        return Generator(self.cfg, self.params, self.tokenizer, dtype=self.dtype, lora=lora, lora_scale=lora_scale,
                         eos_token_ids=self.eos_token_ids, chunk=self.chunk)

    @classmethod
    def load(cls, spec: str | None, dtype=jnp.float32, **kw) -> Generator:
        from persllm_jax.model.weights import load_model, load_tokenizer

        loaded = load_model(spec)
        return cls(loaded.cfg, loaded.params, load_tokenizer(spec), dtype=dtype, **kw)

    # -- tokenization ---------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_raw(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- generation -----------------------------------------------------------------------------

    def stream(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams],
               chunk: int | None = None) -> Iterator[list[Completion]]:
        """Yield the completions so far after every decoded chunk; the last yield is final."""
        if not prompts:
            return
        per_row = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(per_row) != len(prompts):
            raise ValueError("one SamplingParams per prompt (or a single one for all)")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        chunk = chunk or self.chunk
        max_new = max(s.max_new_tokens for s in per_row)
        n, B = len(prompts), _batch_bucket(len(prompts))
        P = _prompt_bucket(max(len(p) for p in prompts))
        capacity = P + _round_up(max(max_new, 1), max(chunk, 64))
        if max(len(p) for p in prompts) + max_new > self.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({max_new}) exceeds the "
                f"model's context of {self.cfg.max_position_embeddings} tokens"
            )

        tokens = np.full((B, P), self.pad_id, np.int32)
        segments = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):  # left padding: every row's next token lands in the same slot
            tokens[i, P - len(p):] = p
            segments[i, P - len(p):] = 1
        positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
        lengths = np.array([len(p) for p in prompts] + [1] * (B - n), np.int32)

        def col(field, dtype, fill):
            return jnp.asarray(np.array([getattr(s, field) for s in per_row] + [fill] * (B - n), dtype))

        seeds = np.array([s.seed for s in per_row] + [0] * (B - n), np.uint32)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        eos = jnp.asarray(np.array(self.eos_token_ids or (-1,), np.int32))
        greedy = all(s.temperature <= 0 for s in per_row)
        sampler = (eos, jnp.int32(self.pad_id), keys, col("temperature", np.float32, 0.0),
                   col("top_k", np.int32, 0), col("top_p", np.float32, 1.0))

        logits, cache = _prefill(self.params, self.lora, self.lora_scale, jnp.asarray(tokens), jnp.asarray(positions),
                                 jnp.asarray(segments), cfg=self.cfg, dtype=self.dtype, capacity=capacity)
        done = np.arange(B) >= n
        state = {"logits": logits, "next_pos": jnp.asarray(lengths), "done": jnp.asarray(done), "step": jnp.int32(0)}
        generated: list[list[int]] = [[] for _ in range(n)]
        finish = [None] * n
        texts = [""] * n
        produced = 0
        while produced < max_new and not all(finish):
            out, t, state, cache = _decode(self.params, self.lora, self.lora_scale, cache, state, sampler,
                                           jnp.int32(max_new - produced), cfg=self.cfg, dtype=self.dtype,
                                           n_steps=chunk, greedy=greedy)
            out, t = np.asarray(out), int(t)
            if t == 0:  # every row finished on the device
                break
            produced += t
            for i in range(n):
                if finish[i]:
                    continue
                limit = per_row[i].max_new_tokens
                for tok in out[i, :t].tolist():
                    if len(generated[i]) >= limit:
                        break
                    if tok in self.eos_token_ids:
                        finish[i] = "stop"
                        break
                    generated[i].append(tok)
                if self.tokenizer is not None:
                    texts[i] = self._decode_text(generated[i])
                    cut = _stop_cut(texts[i], per_row[i].stop)
                    if cut is not None:
                        texts[i], finish[i] = texts[i][:cut], "stop"
                if not finish[i] and len(generated[i]) >= limit:
                    finish[i] = "length"
            if any(finish):  # let the device loop skip rows the host has finished (stop strings, limits)
                state["done"] = jnp.asarray(np.array([bool(f) for f in finish] + [True] * (B - n)))
            yield [Completion(texts[i] if finish[i] else _streamable(texts[i], per_row[i].stop), generated[i],
                              finish[i] or "length", len(prompts[i])) for i in range(n)]

    def generate_ids(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[Completion]:
        final: list[Completion] = []
        for final in self.stream(prompts, sampling):
            pass
        return final

    def chat(self, conversations: list[list[dict]], sampling: SamplingParams | list[SamplingParams]) -> list[Completion]:
        return self.generate_ids([self.encode_chat(c) for c in conversations], sampling)

    def complete(self, texts: list[str], sampling: SamplingParams | list[SamplingParams]) -> list[Completion]:
        return self.generate_ids([self.encode_raw(t) for t in texts], sampling)


def _streamable(text: str, stops: tuple[str, ...]) -> str:
    """What of an unfinished text is safe to show: no half-decoded character, no possible start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


def _stop_cut(text: str, stops: tuple[str, ...]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(cuts) if cuts else None
