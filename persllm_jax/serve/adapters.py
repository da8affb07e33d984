"""Many LoRA adapters over one base, stacked for mixed-adapter batches, and PEFT adapter folders read as served
adapters.

`AdapterBank` stacks every adapter of one base into `{name: {"a": [N, L, in, r], "b": [N, L, r, out]}}`: row 0 is
the base itself (all zeros), ranks are padded with zeros to the largest (exact: the padded columns of A meet
zero rows of B), each adapter's scale is folded into its B, and rows up to the configured maximum stay zero so a
later adapter needs no new program. A batch row carries an index into it (see `decoder._linear`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.errors import InputError, PersllmError
from persllm_jax.model.decoder import LINEAR_NAMES, linear_shapes


class AdapterError(PersllmError, ValueError):
    """An adapter that cannot be served (bad folder, wrong shapes, too many)."""


def is_peft_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "adapter_config.json").is_file()


def load_peft_adapter(path: str | Path, cfg) -> tuple[dict, float]:
    """(LoRA tree with stacked `[L, in, r]` / `[L, r, out]` factors, scale) of a folder written by PEFT
    (`adapter_config.json` + `adapter_model.safetensors`). Options this server cannot reproduce are errors."""
    from safetensors.numpy import load_file

    from persllm_jax.model.lora import LoraError, from_peft_state

    p = Path(path)
    conf_path = p / "adapter_config.json"
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{conf_path}: cannot read the PEFT adapter config ({e})") from None
    if not isinstance(conf, dict):
        raise InputError(f"{conf_path}: expected a JSON object")
    if str(conf.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{conf_path}: peft_type {conf.get('peft_type')!r}; only LORA adapters can be served")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if conf.get(key) == bad:
            raise AdapterError(f"{conf_path}: {key}={bad} is not supported")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise AdapterError(f"{conf_path}: per-module rank_pattern / alpha_pattern are not supported")
    weights = p / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"{weights}: missing (PEFT's adapter weights; .bin adapters are not read)")
    try:
        lora = from_peft_state(load_file(str(weights)), cfg.num_layers)
    except LoraError as e:
        raise AdapterError(f"{weights}: {e}") from None
    if not lora:
        raise AdapterError(f"{weights}: no lora_A / lora_B weights of a decoder projection found")
    shapes = linear_shapes(cfg)
    for name, f in lora.items():
        n_in, n_out = shapes[name]
        if f["a"].shape[1] != n_in or f["b"].shape[2] != n_out:
            raise AdapterError(f"{weights}: {name} has shape in={f['a'].shape[1]}, out={f['b'].shape[2]}; the base "
                               f"model's is in={n_in}, out={n_out} (an adapter of another model?)")
    r = int(conf.get("r") or next(iter(lora.values()))["a"].shape[-1])
    alpha = float(conf.get("lora_alpha") or r)
    scale = alpha / (r ** 0.5) if conf.get("use_rslora") else alpha / r
    return lora, scale


class AdapterBank:
    """Stacked adapters of one base; `index(key)` is an adapter's row (0 = the base)."""

    def __init__(self, cfg, adapters: list[tuple[object, list | dict, float]], max_adapters: int = 8):
        """`adapters`: [(key, LoRA tree stacked [L, ...] or per-layer list, scale)]."""
        if len(adapters) > max_adapters:
            raise AdapterError(f"{len(adapters)} adapters over one base; at most {max_adapters} "
                               f"(raise --max-adapters)")
        self.cfg, self.capacity = cfg, max_adapters + 1
        self.rows = {key: i + 1 for i, (key, _, _) in enumerate(adapters)}
        trees = [(_stacked(tree, cfg.num_layers), float(scale)) for _, tree, scale in adapters]
        names = [n for n in LINEAR_NAMES if any(n in t for t, _ in trees)]
        self.rank = max((int(f["a"].shape[-1]) for t, _ in trees for f in t.values()), default=0)
        shapes, L, N, R = linear_shapes(cfg), cfg.num_layers, self.capacity, self.rank
        stacked = {}
        for n in names:
            n_in, n_out = shapes[n]
            a, b = np.zeros((N, L, n_in, R), np.float32), np.zeros((N, L, R, n_out), np.float32)
            for j, (t, scale) in enumerate(trees, start=1):
                if n in t:
                    r = t[n]["a"].shape[-1]
                    a[j, :, :, :r] = np.asarray(t[n]["a"], np.float32)
                    b[j, :, :r, :] = np.asarray(t[n]["b"], np.float32) * scale
            stacked[n] = {"a": a, "b": b}
        self.stacked = stacked  # [N, L, in, r]: the layout of the issue; per-layer views below feed the decoder
        self.layers = None if not names else [
            {n: {k: jnp.asarray(f[k][:, i]) for k in ("a", "b")} for n, f in stacked.items()} for i in range(L)]

    def index(self, key) -> int:
        return 0 if key is None else self.rows[key]

    def nbytes(self) -> int:
        return int(sum(f[k].nbytes for f in self.stacked.values() for k in ("a", "b")))


def with_rows(layers: list | None, adapter_rows: jax.Array) -> list | None:
    """The bank's per-layer trees with each batch row's adapter index attached (what `decoder._linear` gathers)."""
    if layers is None:
        return None
    return [{n: {**f, "rows": adapter_rows} for n, f in layer.items()} for layer in layers]


def _stacked(tree, num_layers: int) -> dict:
    if isinstance(tree, list):  # per-layer (a Generator's) -> stacked [L, ...]
        return {n: {k: np.stack([np.asarray(layer[n][k]) for layer in tree]) for k in ("a", "b")} for n in tree[0]}
    return {n: {k: np.asarray(f[k]) for k in ("a", "b")} for n, f in tree.items()}


__all__ = ["AdapterError", "AdapterBank", "is_peft_dir", "load_peft_adapter", "with_rows"]
