"""PEFT adapter export: `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained`
loads onto the original base model.

An SFT -> DPO chain (DPO trains a fresh adapter on the merged SFT model) becomes ONE adapter on the original
base: the updates are stacked, `A = [A1 | A2]` (rank r1 + r2) and `B = [s1·B1 ; s2·B2]`, so
`A @ B = s1·A1@B1 + s2·A2@B2` exactly; the scalings are folded into B and the config says
`lora_alpha = r = r1 + r2` (scale 1). A projection targeted by only one stage gets zeros in the other's
slots. A single-stage run keeps its own rank and alpha. This needs no second base and loads with stock PEFT;
the price is that the two stages can no longer be switched on separately (export the SFT run by itself for that).

`base_model_name_or_path` is the base's Hub id when it has one (the embedded SmolLM2, or the `ORG/NAME[@REV]`
given to train; `revision` then says the revision), else its local path. `r` in adapter_config.json is the
rank a LoRA server must allow: vLLM needs `--enable-lora --max-lora-rank N` with N >= r, N one of the values
vLLM accepts (8, 16, 32, 64, ...), so a stacked SFT -> DPO adapter needs r1 + r2 rounded up; `persllm export`
prints the flags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.export import ExportError, hf_state
from persllm_jax.export import verify
from persllm_jax.io import jnp_dtype
from persllm_jax.model import lora as lora_mod
from persllm_jax.model.decoder import LINEAR_NAMES
from persllm_jax.runs import Chain, RunError, stacked_adapter

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_of(chain: Chain) -> tuple[dict, int, float, float]:
    """(LoRA tree on the original base, rank, alpha, dropout) for the whole chain."""
    try:
        return stacked_adapter(chain.stages, chain.base.cfg)
    except RunError as e:
        raise ExportError(str(e)) from None


def adapter_config(chain: Chain, rank: int, alpha: float, dropout: float, targets: list[str]) -> dict:
    from persllm_jax.export.model_card import base_model_id, hub_base

    revision = (hub_base(chain) or (None, None))[1]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_id(chain),
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": revision,
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


def export_peft(chain: Chain, tmp: Path, dtype: str, times: dict, log,
                phase=lambda name: None):
    from safetensors.numpy import save_file

    cfg = chain.base.cfg
    phase("write")
    t = time.perf_counter()
    tree, rank, alpha, dropout = adapter_of(chain)
    np_dtype = np.dtype(jnp.dtype(jnp_dtype(dtype)))
    state = {k: np.asarray(jnp.asarray(v).astype(jnp_dtype(dtype))).astype(np_dtype, copy=False)
             for k, v in lora_mod.to_peft_state(tree).items()}
    save_file(state, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    targets = [n for n in LINEAR_NAMES if n in tree]
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(chain, rank, alpha, dropout, targets),
                                                        indent=2) + "\n")
    tok = hf_state.save_tokenizer(chain.base_spec, tmp)
    times["write"] = time.perf_counter() - t

    phase("verify")
    t = time.perf_counter()
    try:
        back, scale = read_adapter(tmp, cfg.num_layers)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"verification failed: the adapter does not load: {str(e).splitlines()[0]}") from None
    batch = verify.probe_batch(tok, cfg)
    base = chain.base.params
    got = verify.logits_of(base, cfg, batch, back, scale)
    intended = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp_dtype(dtype)).astype(jnp.float32), tree)
    checks = {"reload_vs_written": verify.compare(verify.logits_of(base, cfg, batch, intended, alpha / rank), got,
                                           batch["segment_ids"]),
              "export_vs_ours": verify.compare(verify.our_model_logits(chain, batch), got, batch["segment_ids"])}
    verify.check("reloaded adapter vs the adapter written", checks["reload_vs_written"], verify.WRITE_TOL, dtype)
    verify.check("adapter on the base vs our model", checks["export_vs_ours"], verify.MODEL_TOL[dtype], dtype)
    times["verify"] = time.perf_counter() - t
    log(f"verified: adapter (r={rank}, alpha={alpha:g}, {len(chain.stages)} stage(s)) on the base: max |logit diff| "
        f"{checks['export_vs_ours']['max_abs_diff']:.3g} vs our model (mean KL {checks['export_vs_ours']['mean_kl']:.3g})")
    return [ADAPTER_FILE, "adapter_config.json"], checks


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank values (older: up to 64)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that serves an adapter of rank r."""
    return next((n for n in VLLM_LORA_RANKS if n >= r), r)


__all__ = ["ADAPTER_FILE", "adapter_config", "adapter_of", "export_peft", "read_adapter", "vllm_max_lora_rank"]
