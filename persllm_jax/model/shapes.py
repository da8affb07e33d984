"""Named model shapes: the HF `config.json` fields of public architectures, so `persllm plan` (and tests) can
build and compile a model without its weights (`model: shape:llama-8b`); and `hf_config_of`, the config of any
model spec without reading weights."""

from __future__ import annotations

from pathlib import Path

from persllm_jax.errors import InputError, PersllmError
from persllm_jax.io import read_json

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

SHAPES: dict[str, dict] = {  # HF config.json fields of public architectures (weights not needed to plan)
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False, max_position_embeddings=131072,
                     rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                       tie_word_embeddings=False, max_position_embeddings=32768),
}



class ShapeError(PersllmError, ValueError):
    """A model spec whose config cannot be found or read."""


def hf_config_of(model: str) -> tuple[dict, str]:
    """(HF config dict, where it came from) for a model spec, without reading any weights."""
    if model.startswith("shape:"):
        name = model[len("shape:"):]
        if name not in SHAPES:
            raise ShapeError(f"model {model!r}: unknown shape; known: {', '.join('shape:' + s for s in SHAPES)}")
        return dict(SHAPES[name]), model
    from persllm_jax.model.weights import WeightsError, gguf_hf_config, open_gguf, resolve_model_path

    if model.endswith(".json"):
        path = model
    else:
        try:
            path = resolve_model_path(model)
        except WeightsError as e:
            raise ShapeError(str(e).splitlines()[0]) from None
    p = Path(path)
    if p.suffix == ".gguf":
        return gguf_hf_config(open_gguf(str(p)), str(p)), str(p)
    cfg_file = p / "config.json" if p.is_dir() else p
    try:
        return read_json(cfg_file, "config.json"), str(cfg_file)
    except InputError as e:
        raise ShapeError(f"model {model!r}: {e}") from None


def model_config(model: str):
    from persllm_jax.model.config import from_hf_dict  # noqa: PLC0415 (config imports nothing heavy)

    hf, source = hf_config_of(model)
    return from_hf_dict(hf, source)
