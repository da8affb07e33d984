"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) as pure functions over a params pytree.

Params layout: matrices are stored `[in, out]` (so `x @ kernel`) and the decoder layers are stacked on a
leading axis of size `num_layers`, so one `jax.lax.scan` runs them all:

    embed_tokens                [V, D]
    layers/input_layernorm      [L, D]
    layers/{q,k,v,o}_proj       {kernel: [L, in, out], bias?: [L, out]}
    layers/{q,k}_norm           [L, head_dim]            (Qwen3)
    layers/post_attention_layernorm [L, D]
    layers/{gate,up,down}_proj  {kernel: [L, in, out], bias?: [L, out]}
    norm                        [D]
    lm_head                     {kernel: [D, V]}          (absent when embeddings are tied)

LoRA lives in a separate pytree that mirrors `layers`: `{name: {"a": [L, in, r], "b": [L, r, out]}}`.
Attention is masked by segment ids (0 = padding), so packed documents and padded prompts never see
each other; positions are passed in explicitly for the same reason.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from persllm_jax.model.attention import Kernel, Segments
from persllm_jax.model.attention import resolve as resolve_attention
from persllm_jax.model.config import ModelConfig, rope_inv_freq

Params = dict[str, Any]

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over (train/sharding.py)
ATTN_BLOCK = 128  # query block of the full-sequence (training) attention; see _attend

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection in a decoder layer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }


def has_bias(cfg: ModelConfig, name: str) -> bool:
    if name in ("q_proj", "k_proj", "v_proj"):
        return cfg.qkv_bias
    if name == "o_proj":
        return cfg.o_bias
    return cfg.mlp_bias


def constrain_batch(x, axis: int = 0):
    """Pin an activation's batch dimension to (`data`, `fsdp`) inside a sharded step; a no-op without a
    context mesh (generation, single-device use). Without it XLA's sharding propagation may follow the
    fsdp-sharded weights and replicate the batch on every device (an 8B step on 8 chips: 23 GiB instead of
    11 GiB per device, see `persllm plan`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES):
        return x
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n == 1 or x.shape[axis] % n:
        return x
    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random weights (normal(0, std), norms at 1): for tests, benchmarks and memory planning."""
    L, d = cfg.num_layers, cfg.hidden_size
    keys = iter(jax.random.split(key, 16))
    normal = lambda shape: (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)
    layers: Params = {"input_layernorm": jnp.ones((L, d), dtype), "post_attention_layernorm": jnp.ones((L, d), dtype)}
    for name, (n_in, n_out) in linear_shapes(cfg).items():
        layers[name] = {"kernel": normal((L, n_in, n_out))}
        if has_bias(cfg, name):
            layers[name]["bias"] = normal((L, n_out))
    if cfg.qk_norm:
        layers["q_norm"] = jnp.ones((L, cfg.head_dim), dtype)
        layers["k_norm"] = jnp.ones((L, cfg.head_dim), dtype)
    params = {"embed_tokens": normal((cfg.vocab_size, d)), "layers": layers, "norm": jnp.ones((d,), dtype)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": normal((d, cfg.vocab_size))}
    return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """x / rms(x) * weight, in fp32. The scaling by 1/rms is an einsum, not a broadcast multiply, so that its
    transpose (the backward's sum over features of g·x) is a dot: XLA:CPU runs that reduce of a product of two
    tensors about 6x slower as a fused reduce (2.3 ms vs 0.36 ms, [1024, 576] forward + backward)."""
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)
    return weight.astype(dtype) * jnp.einsum("...d,...->...d", x32, inv_rms).astype(dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def _linear(x, p, lora_p, lora_scale, dtype):
    """x @ kernel (+ bias) (+ the LoRA delta). Dots run on 2-D [rows, features] operands: XLA:CPU lowers the
    3-D form of the adapter's skinny dots (and their transposes in the backward pass) far worse, measured
    1.4x slower for a LoRA layer's forward + backward."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    y = jnp.dot(x, p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    if lora_p is not None and "rows" in lora_p:
        # stacked adapters [N, in, r] / [N, r, out] and each batch row's index into them: every row gathers its
        # own factors, so rows of different adapters run in one batched matmul (Punica / S-LoRA's BGMV)
        xb = x.reshape(lead[0], -1, x.shape[-1])
        a, b = (lora_p[k].astype(dtype)[lora_p["rows"]] for k in ("a", "b"))
        delta = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", xb, a), b)
        y = y + (delta.reshape(y.shape) * lora_scale).astype(dtype)
    elif lora_p is not None:
        xa = x
        if "dropout_key" in lora_p:  # LoRA dropout on the adapter's input only (as PEFT); see lora.with_dropout
            rate = lora_p["dropout_rate"]
            keep = jax.random.bernoulli(lora_p["dropout_key"], 1.0 - rate, x.shape)
            xa = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
        y = y + (jnp.dot(jnp.dot(xa, lora_p["a"].astype(dtype)), lora_p["b"].astype(dtype)) * lora_scale).astype(dtype)
    return y.reshape(*lead, y.shape[-1])


def attention_mask(q_seg, q_idx, q_pos, k_seg, k_pos, sliding_window, q_branch=None, k_branch=None):
    """[B, 1, 1, T, S] bool: same document, key not padding, key not in the future (by slot index). With
    branches (DPO's shared-prompt rows), a query sees keys of branch 0 (the prompt) and of its own branch only."""
    S = k_seg.shape[1]
    k_idx = jnp.arange(S)
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    mask = mask & (k_idx[None, None, :] <= q_idx[None, :, None])
    if q_branch is not None:
        mask = mask & ((k_branch[:, None, :] == 0) | (k_branch[:, None, :] == q_branch[:, :, None]))
    if sliding_window:
        mask = mask & (q_pos[:, :, None] - k_pos[:, None, :] < sliding_window)
    return mask[:, None, None, :, :]


def _attend(q, k, v, mask, cfg: ModelConfig, dtype, block: int = 0, heads_major: bool = False):
    """Grouped-query attention. q is [B, T, H, hd]; k, v are [B, S, KV, hd], or [B, KV, S, hd] with
    `heads_major` (the KV cache's layout: each head's keys contiguous, so decoding reads them without a
    transpose; measured 4x faster decode attention on CPU).

    Everything runs heads-major ([B, KV, G, T, hd] queries): the score and value dots are then plain batched
    matmuls, with one transpose in and one out. With `block` (training, keys = queries), queries run in blocks
    of `block` rows and each block only meets the keys up to its own end: later keys are masked by the causal
    slot order anyway, so this is exact and skips about half of the score FLOPs (measured 1.8x faster on CPU,
    and this layout another 1.25x over einsums on the [B, T, H, hd] layout).

    `mask` may instead be an `attention.Kernel` (flash, cuDNN or splash, which never keep the [T, S] scores)."""
    if isinstance(mask, Kernel):
        return mask(q, k, v, cfg, BATCH_AXES)
    B, T = q.shape[:2]
    kv_heads, groups, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    qh = q.reshape(B, T, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    if not heads_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    v = v.astype(dtype)
    S = k.shape[2]
    spans = [(s, min(s + block, T)) for s in range(0, T, block)] if block and T == S and T > block else [(0, T)]
    outs = []
    for s, e in spans:
        keys = S if len(spans) == 1 else e  # a block's queries meet keys [0, e) only
        scores = jnp.einsum("bkgtd,bksd->bkgts", qh[:, :, :, s:e], k[:, :, :keys],
                            preferred_element_type=jnp.float32) * (hd ** -0.5)
        scores = jnp.where(mask[..., s:e, :keys], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, :keys]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads * hd)


def _layer(cfg: ModelConfig, dtype, lora_scale, h, layer, lora, cos, sin, kv_fn, attn_block: int = 0):
    """One decoder layer. `kv_fn(k, v) -> (k_all, v_all, mask, heads_major)` supplies the keys to attend over
    (training: this layer's own; decoding: the cache with them written in) and their layout (see _attend)."""
    B, T, _ = h.shape
    get = lambda name: None if lora is None else lora.get(name)
    x = rms_norm(h, layer["input_layernorm"], cfg.rms_norm_eps, dtype)
    q = _linear(x, layer["q_proj"], get("q_proj"), lora_scale, dtype).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = _linear(x, layer["k_proj"], get("k_proj"), lora_scale, dtype).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = _linear(x, layer["v_proj"], get("v_proj"), lora_scale, dtype).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps, dtype)
        k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps, dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all, v_all, mask, heads_major = kv_fn(k, v)
    attn = _attend(q, k_all, v_all, mask, cfg, dtype, attn_block, heads_major)
    h = h + _linear(attn, layer["o_proj"], get("o_proj"), lora_scale, dtype).astype(h.dtype)
    x = rms_norm(h, layer["post_attention_layernorm"], cfg.rms_norm_eps, dtype)
    gate = _linear(x, layer["gate_proj"], get("gate_proj"), lora_scale, dtype)
    up = _linear(x, layer["up_proj"], get("up_proj"), lora_scale, dtype)
    h = h + _linear(jax.nn.silu(gate) * up, layer["down_proj"], get("down_proj"), lora_scale, dtype).astype(h.dtype)
    return h


def hidden_states(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    *,
    lora: Params | None = None,
    lora_scale: float = 1.0,
    dtype=jnp.float32,
    remat: bool = False,
    branch: jax.Array | None = None,
    attention: str = "auto",
) -> jax.Array:
    """Final-normed hidden states [B, T, D] for a full sequence (training / scoring; no cache). `branch` [B, T]
    marks DPO's shared-prompt rows (0 = prompt, 1 = chosen, 2 = rejected; see attention_mask). `attention`:
    auto | flash | splash | cudnn | reference (model/attention.py)."""
    T = tokens.shape[1]
    h = constrain_batch(params["embed_tokens"][tokens].astype(jnp.float32))  # batch-sharded in a sharded step
    cos, sin = rope_cos_sin(cfg, positions)
    impl = resolve_attention(attention, cfg, dtype, T, branches=branch is not None)
    if impl == "reference":
        mask = attention_mask(segment_ids, jnp.arange(T), positions, segment_ids, positions, cfg.sliding_window,
                              branch, branch)
    else:
        mask = Kernel(impl, Segments(segment_ids, positions, branch))  # the same mask, built block by block
    kv_fn = lambda k, v: (k, v, mask, False)

    def body(h, xs):
        layer, lora_layer = xs
        return constrain_batch(_layer(cfg, dtype, lora_scale, h, layer, lora_layer, cos, sin, kv_fn,
                                      ATTN_BLOCK)), None

    if remat:
        body = jax.checkpoint(body)
    h, _ = jax.lax.scan(body, h, (params["layers"], lora))
    return rms_norm(h, params["norm"], cfg.rms_norm_eps, dtype)


def vocab_projection(params: Params) -> jax.Array:
    """[D, V]: the lm_head kernel, or the tied embeddings transposed."""
    return params["lm_head"]["kernel"] if "lm_head" in params else params["embed_tokens"].T


def logits_from_hidden(params: Params, h: jax.Array) -> jax.Array:
    """fp32 logits: the vocabulary projection (tied or not) accumulated in fp32."""
    return jnp.dot(h, vocab_projection(params).astype(h.dtype), preferred_element_type=jnp.float32)


def forward(params, cfg, tokens, positions, segment_ids, **kw) -> jax.Array:
    """Logits [B, T, V] in fp32."""
    return logits_from_hidden(params, hidden_states(params, cfg, tokens, positions, segment_ids, **kw))


# --- KV cache (generation) -------------------------------------------------------------------------


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> Params:
    """Preallocated cache, one k/v buffer [B, KV, S, hd] per layer; slots whose `seg` is 0 are empty."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {
        "k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        "seg": jnp.zeros((batch, length), jnp.int32), "pos": jnp.zeros((batch, length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def unstack_layers(tree: Params | None, num_layers: int) -> list | None:
    """Stacked `[L, ...]` layer leaves -> a list of per-layer trees (for the unrolled decode path)."""
    if tree is None:
        return None
    return [jax.tree.map(lambda x: x[i], tree) for i in range(num_layers)]


def forward_cached(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    cache: Params,
    *,
    lora: list | None = None,
    lora_scale: float = 1.0,
    dtype=jnp.float32,
    last_only: bool = True,
) -> tuple[jax.Array, Params]:
    """Run `tokens` [B, T] into slots [index, index+T) of the cache; returns (logits, new cache).

    `params["layers"]` and `lora` are per-layer lists here (see `unstack_layers`): the layers are unrolled,
    because on CPU a scan's dynamic slice of the stacked weights costs a copy of every weight per token.
    With `last_only`, logits are computed for the last position only ([B, V]), which is all decoding needs.
    """
    T = tokens.shape[1]
    index = cache["index"]
    seg = jax.lax.dynamic_update_slice(cache["seg"], segment_ids.astype(jnp.int32), (0, index))
    pos = jax.lax.dynamic_update_slice(cache["pos"], positions.astype(jnp.int32), (0, index))
    mask = attention_mask(segment_ids, index + jnp.arange(T), positions, seg, pos, cfg.sliding_window)
    cos, sin = rope_cos_sin(cfg, positions)
    h = params["embed_tokens"][tokens].astype(jnp.float32)
    new_k, new_v = [], []
    for i, layer in enumerate(params["layers"]):

        def kv_fn(k, v, i=i):
            k, v = (x.transpose(0, 2, 1, 3).astype(cache["k"][i].dtype) for x in (k, v))  # [B, KV, T, hd]
            new_k.append(jax.lax.dynamic_update_slice(cache["k"][i], k, (0, 0, index, 0)))
            new_v.append(jax.lax.dynamic_update_slice(cache["v"][i], v, (0, 0, index, 0)))
            return new_k[-1], new_v[-1], mask, True

        h = _layer(cfg, dtype, lora_scale, h, layer, None if lora is None else lora[i], cos, sin, kv_fn)
    if last_only:
        h = h[:, -1]
    logits = logits_from_hidden(params, rms_norm(h, params["norm"], cfg.rms_norm_eps, dtype))
    return logits, {"k": new_k, "v": new_v, "seg": seg, "pos": pos, "index": index + T}


def forward_slots(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    start: jax.Array,
    cache: Params,
    *,
    span: int,
    rows: jax.Array | None = None,
    last: jax.Array | None = None,
    lora: list | None = None,
    dtype=jnp.float32,
) -> tuple[jax.Array, Params]:
    """Run `tokens` [B, T] into rows of a slot cache (continuous batching); returns (logits [B, V], cache).

    The cache is `{"k": [...], "v": [...]}`, per layer [N, KV, S, hd]; slot j of a row holds the key of its
    position j, so a row needs no segment or position arrays: row `rows[b]` (default: row b of all N) takes its
    tokens at positions `start[b] + t`, and a query sees the keys at positions <= its own. Writes at positions
    >= S are dropped, which is how idle rows and padding skip a step; attention reads the first `span` slots only
    (a static bucket covering every written position). Logits are those of token `last[b]` (default T - 1).
    Slots past a row's length may hold another request's old keys: they are never attended, since a row writes
    every position before a query at or after it reads it.
    """
    B, T = tokens.shape
    row_idx = jnp.arange(B) if rows is None else rows
    positions = start[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None, :]
    k_pos = jnp.arange(span, dtype=jnp.int32)
    mask = k_pos[None, None, :] <= positions[:, :, None]
    if cfg.sliding_window:
        mask = mask & (positions[:, :, None] - k_pos[None, None, :] < cfg.sliding_window)
    mask = mask[:, None, None]
    cos, sin = rope_cos_sin(cfg, positions)
    h = params["embed_tokens"][tokens].astype(jnp.float32)
    new_k, new_v = [], []
    for i, layer in enumerate(params["layers"]):

        def kv_fn(k, v, i=i):
            out = []
            for new, old in ((k, cache["k"][i]), (v, cache["v"][i])):  # new: [B, T, KV, hd]
                full = old.at[row_idx[:, None], :, positions].set(new.astype(old.dtype), mode="drop")
                out.append(full)
            new_k.append(out[0])
            new_v.append(out[1])
            if rows is None:
                return out[0][:, :, :span], out[1][:, :, :span], mask, True
            return (*(x.at[rows, :, :span].get(mode="clip") for x in out), mask, True)

        h = _layer(cfg, dtype, 1.0, h, layer, None if lora is None else lora[i], cos, sin, kv_fn)
    h = h[:, -1] if last is None else h[jnp.arange(B), last]
    logits = logits_from_hidden(params, rms_norm(h, params["norm"], cfg.rms_norm_eps, dtype))
    return logits, {"k": new_k, "v": new_v}


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
