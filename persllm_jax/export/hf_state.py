"""Our params as a Hugging Face model directory's pieces: transformers tensor names and `[out, in]` layout (the
inverse of `model.weights.params_from_hf_state`), safetensors shards with an index, config.json,
generation_config.json and the tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from persllm_jax.export import ExportError
from persllm_jax.model.weights import LoadedModel, _layer_leaves, hf_layer_key

DEFAULT_MAX_SHARD = "5GB"


def hf_state_from_params(cfg, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """Inverse of `weights.params_from_hf_state`: our stacked [in, out] tree -> transformers names, [out, in]."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    conv = lambda x: np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(dtype))).astype(np_dtype, copy=False)
    state = {"model.embed_tokens.weight": conv(params["embed_tokens"])}
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for name, leaf in _layer_leaves(cfg):
            if leaf is None:
                state[hf_layer_key(name, i)] = conv(layers[name][i])
            elif leaf == "kernel":
                state[hf_layer_key(name, i, "weight")] = conv(np.asarray(layers[name]["kernel"][i]).T)
            else:
                state[hf_layer_key(name, i, "bias")] = conv(layers[name]["bias"][i])
    state["model.norm.weight"] = conv(params["norm"])
    if "lm_head" in params:
        state["lm_head.weight"] = conv(np.asarray(params["lm_head"]["kernel"]).T)
    return state


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise ExportError(f"bad size {s!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def write_safetensors(state: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int,
                      prefix: str = "model") -> list[str]:
    """One file, or shards of at most `max_shard_bytes` (a bigger tensor gets its own) + an index."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in state.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return [f"{prefix}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values())),
                          "total_parameters": int(sum(a.size for a in state.values()))},
             "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + [f"{prefix}.safetensors.index.json"]


def read_safetensors_dir(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="flax") as h:
            for k in h.keys():
                out[k] = np.asarray(h.get_tensor(k))
    return out


def export_config(hf_config: dict, dtype: str) -> dict:
    """config.json of a merged export: the base's, with the weights' dtype under both names, `dtype` (what
    transformers >= 4.56 reads first and 5.x writes) and `torch_dtype` (all that older versions and tools read)."""
    cfg = {k: v for k, v in hf_config.items() if not k.startswith("_")}
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype
    import transformers

    cfg["transformers_version"] = transformers.__version__ if hasattr(transformers, "__version__") else cfg.get(
        "transformers_version")
    return dict(sorted(cfg.items()))


def generation_config(base: LoadedModel) -> dict:
    src = Path(base.source)
    if src.is_dir() and (src / "generation_config.json").is_file():
        return json.loads((src / "generation_config.json").read_text())
    c = base.cfg
    eos = list(c.eos_token_ids)
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
           "pad_token_id": c.pad_token_id}
    return {k: v for k, v in gen.items() if v is not None}


def save_tokenizer(spec: str, out_dir: Path):
    """The base's tokenizer and chat template, saved with a class name transformers 4.x and 5.x both load."""
    from persllm_jax.model.weights import load_tokenizer, save_portable_tokenizer

    try:
        tok = load_tokenizer(spec)
    except Exception as e:
        raise ExportError(f"base model {spec}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    save_portable_tokenizer(tok, out_dir)
    return tok
