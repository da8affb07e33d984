"""PEFT adapter export: `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained`
loads onto the original base model.

An SFT -> DPO chain (DPO trains a fresh adapter on the merged SFT model) becomes ONE adapter on the original
base: the updates are stacked, `A = [A1 | A2]` (rank r1 + r2) and `B = [s1·B1 ; s2·B2]`, so
`A @ B = s1·A1@B1 + s2·A2@B2` exactly; the scalings are folded into B and the config says
`lora_alpha = r = r1 + r2` (scale 1). A projection targeted by only one stage gets zeros in the other's
slots. A single-stage run keeps its own rank and alpha. This needs no second base and loads with stock PEFT;
the price is that the two stages can no longer be switched on separately (export the SFT run by itself for that).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.model import lora as lora_mod
from persllm_jax.export.driver import (
    DTYPES,
    MODEL_TOL,
    WRITE_TOL,
    Chain,
    ExportError,
    check,
    compare,
    logits_of,
    our_model_logits,
    probe_batch,
)
from persllm_jax.model.decoder import LINEAR_NAMES, linear_shapes

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_of(chain: Chain) -> tuple[dict, int, float, float]:
    """(LoRA tree on the original base, rank, alpha, dropout) for the whole chain."""
    return stacked_adapter(chain.stages, chain.base.cfg)


def stacked_adapter(stages: list, mcfg) -> tuple[dict, int, float, float]:
    """(LoRA tree, rank, alpha, dropout) equal to applying LoRA `stages` one after another on one base."""
    for st in stages:
        if st.kind != "lora":
            raise ExportError(f"{st.run_dir}: a full fine-tuning run has no adapter; export it with --format merged")
    if len(stages) == 1:
        st = stages[0]
        lo = st.lora_info
        return st.weights, int(lo["rank"]), float(lo["alpha"]), float(lo.get("dropout") or 0.0)
    shapes = linear_shapes(mcfg)
    L = mcfg.num_layers
    names = [n for n in LINEAR_NAMES if any(n in st.weights for st in stages)]
    ranks = [int(next(iter(st.weights.values()))["a"].shape[-1]) for st in stages]
    out = {}
    for n in names:
        n_in, n_out = shapes[n]
        a_parts, b_parts = [], []
        for st, r in zip(stages, ranks):
            p = st.weights.get(n)
            if p is None:
                a_parts.append(jnp.zeros((L, n_in, r), jnp.float32))
                b_parts.append(jnp.zeros((L, r, n_out), jnp.float32))
            else:
                a_parts.append(jnp.asarray(p["a"], jnp.float32))
                b_parts.append(jnp.asarray(p["b"], jnp.float32) * st.scale)
        out[n] = {"a": jnp.concatenate(a_parts, axis=-1), "b": jnp.concatenate(b_parts, axis=-2)}
    r = sum(ranks)
    return out, r, float(r), 0.0


def adapter_config(chain: Chain, rank: int, alpha: float, dropout: float, targets: list[str]) -> dict:
    from persllm_jax.export.model_card import base_model_id

    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_id(chain),
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def read_adapter(out_dir: Path, num_layers: int) -> tuple[dict, float]:
    """Our reading of an exported adapter directory: (LoRA tree, scale) -- what PEFT would apply."""
    from safetensors import safe_open

    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ExportError(f"{out_dir}: not a plain LoRA adapter")
    state = {}
    with safe_open(str(out_dir / ADAPTER_FILE), framework="flax") as f:
        for k in f.keys():
            state[k] = np.asarray(jnp.asarray(f.get_tensor(k), jnp.float32))
    tree = lora_mod.from_peft_state(state, num_layers)
    if sorted(tree) != sorted(cfg["target_modules"]):
        raise ExportError(f"{out_dir}: adapter tensors cover {sorted(tree)} but target_modules says "
                          f"{sorted(cfg['target_modules'])}")
    return tree, float(cfg["lora_alpha"]) / float(cfg["r"])


def export_peft(chain: Chain, tmp: Path, dtype: str, times: dict, tamper, log):
    from safetensors.numpy import save_file

    cfg = chain.base.cfg
    t = time.perf_counter()
    tree, rank, alpha, dropout = adapter_of(chain)
    np_dtype = np.dtype(jnp.dtype(DTYPES[dtype]))
    state = {k: np.asarray(jnp.asarray(v).astype(DTYPES[dtype])).astype(np_dtype, copy=False)
             for k, v in lora_mod.to_peft_state(tree).items()}
    save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    targets = [n for n in LINEAR_NAMES if n in tree]
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(chain, rank, alpha, dropout, targets),
                                                        indent=2) + "\n")
    from persllm_jax.export.driver import save_tokenizer

    tok = save_tokenizer(chain.base_spec, tmp)
    times["write"] = time.perf_counter() - t
    if tamper is not None:
        tamper(tmp)

    t = time.perf_counter()
    try:
        back, scale = read_adapter(tmp, cfg.num_layers)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"verification failed: the adapter does not load: {str(e).splitlines()[0]}") from None
    batch = probe_batch(tok, cfg)
    base = chain.base.params
    got = logits_of(base, cfg, batch, back, scale)
    intended = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(DTYPES[dtype]).astype(jnp.float32), tree)
    checks = {"reload_vs_written": compare(logits_of(base, cfg, batch, intended, alpha / rank), got,
                                           batch["segment_ids"]),
              "export_vs_ours": compare(our_model_logits(chain, batch), got, batch["segment_ids"])}
    check("reloaded adapter vs the adapter written", checks["reload_vs_written"], WRITE_TOL, dtype)
    check("adapter on the base vs our model", checks["export_vs_ours"], MODEL_TOL[dtype], dtype)
    times["verify"] = time.perf_counter() - t
    log(f"verified: adapter (r={rank}, alpha={alpha:g}, {len(chain.stages)} stage(s)) on the base: max |logit diff| "
        f"{checks['export_vs_ours']['max_abs_diff']:.3g} vs our model (mean KL {checks['export_vs_ours']['mean_kl']:.3g})")
    return [ADAPTER_FILE, "adapter_config.json"], checks


__all__ = ["ADAPTER_FILE", "adapter_config", "adapter_of", "export_peft", "read_adapter"]
