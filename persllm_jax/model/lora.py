"""LoRA as a separate pytree beside the frozen base (Levanter / PEFT semantics, flat functions).

The adapter mirrors `params["layers"]`: `{name: {"a": [L, in, r], "b": [L, r, out]}}` for every targeted
projection; the model adds `(x @ a) @ b * scale` with `scale = alpha / r`. `b` starts at zero, so step 0
equals the base model exactly. PEFT's key names and `[out, in]` layout are converted by `to_peft_state` /
`from_peft_state` (used by export and by the tests that compare with PEFT).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.errors import PersllmError
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import LINEAR_NAMES, linear_shapes

ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraError(PersllmError, ValueError):
    """LoRA targets or settings that do not fit the model."""


def resolve_targets(patterns) -> tuple[str, ...]:
    """Projection names selected by `patterns` (regexes matched in full; `all-linear` = every projection).

    Each pattern must select something, so a typo is an error rather than a silently untrained adapter.
    """
    if isinstance(patterns, str):
        patterns = [p for p in re.split(r"[,\s]+", patterns) if p]
    chosen: set[str] = set()
    for pat in patterns:
        if pat in ("all-linear", "all_linear", "all"):
            chosen.update(LINEAR_NAMES)
            continue
        try:
            hits = {n for n in LINEAR_NAMES if re.fullmatch(pat, n)}
        except re.error as e:
            raise LoraError(f"lora.targets: bad pattern {pat!r}: {e}") from None
        if not hits:
            raise LoraError(f"lora.targets: pattern {pat!r} matches no projection; names are {', '.join(LINEAR_NAMES)}")
        chosen |= hits
    if not chosen:
        raise LoraError("lora.targets is empty")
    return tuple(n for n in LINEAR_NAMES if n in chosen)


def lora_scale(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def init_lora(cfg: ModelConfig, key: jax.Array, rank: int, targets, dtype=jnp.float32) -> dict:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0."""
    shapes = linear_shapes(cfg)
    out = {}
    for i, name in enumerate(resolve_targets(targets)):
        n_in, n_out = shapes[name]
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (cfg.num_layers, n_in, rank), jnp.float32, -bound, bound)
        out[name] = {"a": a.astype(dtype), "b": jnp.zeros((cfg.num_layers, rank, n_out), dtype)}
    return out


def with_dropout(lora: dict, key: jax.Array, rate: float) -> dict:
    """The adapter tree with per-layer dropout keys added (consumed by model._linear); identity at rate 0."""
    if not rate:
        return lora
    out = {}
    for i, (name, p) in enumerate(sorted(lora.items())):
        L = p["a"].shape[0]
        keys = jax.random.split(jax.random.fold_in(key, i), L)
        out[name] = {**p, "dropout_key": keys, "dropout_rate": jnp.full((L,), rate, jnp.float32)}
    return out


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """Base params with `a @ b * scale` folded into the targeted kernels (fp32 accumulate)."""
    layers = dict(params["layers"])
    for name, p in lora.items():
        k = layers[name]["kernel"]
        delta = jnp.einsum("lir,lro->lio", p["a"].astype(jnp.float32), p["b"].astype(jnp.float32)) * scale
        layers[name] = {**layers[name], "kernel": (k.astype(jnp.float32) + delta).astype(k.dtype)}
    return {**params, "layers": layers}


def stack_lora(parts: list[tuple[dict, float]], cfg: ModelConfig) -> tuple[dict, int]:
    """One LoRA tree (scale 1) equal to applying the adapters `parts` = [(tree, scale)] one after another:
    A = [A1 | A2 | ...] and B = [s1·B1 ; s2·B2 ; ...], zeros where an adapter lacks a projection. Returns
    (tree, total rank)."""
    shapes = linear_shapes(cfg)
    L = cfg.num_layers
    names = [n for n in LINEAR_NAMES if any(n in tree for tree, _ in parts)]
    ranks = [int(next(iter(tree.values()))["a"].shape[-1]) for tree, _ in parts]
    out = {}
    for n in names:
        n_in, n_out = shapes[n]
        a_parts, b_parts = [], []
        for (tree, scale), r in zip(parts, ranks):
            p = tree.get(n)
            if p is None:
                a_parts.append(jnp.zeros((L, n_in, r), jnp.float32))
                b_parts.append(jnp.zeros((L, r, n_out), jnp.float32))
            else:
                a_parts.append(jnp.asarray(p["a"], jnp.float32))
                b_parts.append(jnp.asarray(p["b"], jnp.float32) * scale)
        out[n] = {"a": jnp.concatenate(a_parts, axis=-1), "b": jnp.concatenate(b_parts, axis=-2)}
    return out, sum(ranks)


def lora_param_count(lora: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(lora)))


def _hf_module(name: str) -> str:
    return ("self_attn." if name in ATTN_NAMES else "mlp.") + name


def to_peft_state(lora: dict, prefix: str = "base_model.model.model.layers") -> dict[str, np.ndarray]:
    """PEFT `adapter_model.safetensors` keys: `...layers.{i}.self_attn.q_proj.lora_A.weight` [r, in]."""
    state = {}
    for name, p in lora.items():
        a, b = np.asarray(p["a"], np.float32), np.asarray(p["b"], np.float32)
        for i in range(a.shape[0]):
            base = f"{prefix}.{i}.{_hf_module(name)}"
            state[f"{base}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            state[f"{base}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return state


def from_peft_state(state: dict, num_layers: int) -> dict:
    """Inverse of `to_peft_state`; accepts PEFT's key names with or without `.default` and any prefix."""
    found: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    pat = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
    for key, value in state.items():
        m = pat.search(key)
        if m:
            i, name, ab = int(m.group(1)), m.group(2), m.group(3).lower()
            found.setdefault(name, {}).setdefault(ab, {})[i] = np.asarray(value, np.float32).T
    out = {}
    for name, d in found.items():
        if set(d) != {"a", "b"} or any(len(d[k]) != num_layers for k in "ab"):
            raise LoraError(f"adapter for {name} is incomplete (need lora_A and lora_B for {num_layers} layers)")
        out[name] = {k: jnp.asarray(np.stack([d[k][i] for i in range(num_layers)])) for k in "ab"}
    return out


__all__ = ["resolve_targets", "lora_scale", "init_lora", "with_dropout", "merge_lora", "lora_param_count",
           "to_peft_state", "from_peft_state", "LoraError"]
