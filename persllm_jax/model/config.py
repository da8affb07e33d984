"""Model configuration: the HF `config.json` (or GGUF metadata) reduced to what our decoder needs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from persllm_jax.errors import InputError, PersllmError
from persllm_jax.io import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ModelConfigError(PersllmError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs of the HF rope parameters beyond theta
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None

    @property
    def rope_params(self) -> dict:
        return dict(self.rope_scaling)

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        n = L * per_layer + d
        if include_embedding:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n


def _as_tuple(x) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (int(x),)


def from_hf_dict(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a transformers config dict (v4 or v5 spelling of the rope keys)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ModelConfigError(f"{source}: missing key {key!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")

    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ModelConfigError(f"{source}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    rope = {"rope_type": rope_type, **{k: v for k, v in rope.items() if k not in ("type", "rope_type")}}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelConfigError(f"{source}: partial_rotary_factor is not supported")

    n_heads = cfg["num_attention_heads"]
    sliding = None
    if model_type == "mistral":
        sliding = cfg.get("sliding_window")
    elif cfg.get("use_sliding_window"):
        raise ModelConfigError(f"{source}: use_sliding_window=true is not supported for {model_type}")

    attention_bias = bool(cfg.get("attention_bias") or False)
    return ModelConfig(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=n_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
    )


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        cfg = read_json(path, "config.json")
    except InputError as e:
        raise ModelConfigError(str(e)) from None
    return from_hf_dict(cfg, str(path))


def rope_inv_freq(cfg: ModelConfig):
    """Inverse rotary frequencies, with the `linear` and `llama3` scalings as transformers computes them."""
    import numpy as np

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    p = cfg.rope_params
    kind = p.get("rope_type", "default")
    if kind == "linear":
        inv = inv / p["factor"]
    elif kind == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
