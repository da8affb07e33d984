"""Run directories for export tests, written the way the trainer writes them (run.json + orbax checkpoints),
without training: a LoRA adapter (or full weights) given as a pytree."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.model import lora
from persllm_jax.model.decoder import linear_shapes
from persllm_jax.model.weights import load_model
from persllm_jax.train import checkpoint


def random_adapter(mcfg, rank: int, targets=("all-linear",), seed: int = 0, b_std: float = 0.05) -> dict:
    """A LoRA tree as after some training: A ~ U(+-1/sqrt(in)) as initialised, B non-zero (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    shapes = linear_shapes(mcfg)
    out = {}
    for n in lora.resolve_targets(list(targets)):
        n_in, n_out = shapes[n]
        bound = 1.0 / np.sqrt(n_in)
        out[n] = {"a": jnp.asarray(rng.uniform(-bound, bound, (mcfg.num_layers, n_in, rank)), jnp.float32),
                  "b": jnp.asarray(b_std * rng.standard_normal((mcfg.num_layers, rank, n_out)), jnp.float32)}
    return out


def write_run(run_dir, model, trainable: dict, *, kind: str = "lora", rank: int | None = None, alpha: float = 16.0,
              step: int = 5, parent: str | None = None, parent_step: int | None = None, data: str | None = None,
              extra: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(str(model))
    lora_info = None
    if kind == "lora":
        rank = rank or int(next(iter(trainable.values()))["a"].shape[-1])
        lora_info = {"rank": rank, "alpha": alpha, "dropout": 0.0, "targets": sorted(trainable),
                     "scale": lora.lora_scale(rank, alpha)}
    info = {"model": str(model), "model_source": loaded.source, "model_config": loaded.hf_config, "kind": kind,
            "lora": lora_info, "data": data, "total_steps": step}
    if parent:
        info.update(parent_run=str(parent), parent_step=parent_step, stage="dpo")
    info.update(extra or {})
    (run_dir / "run.json").write_text(json.dumps(info, indent=1, default=str))
    mgr = checkpoint.manager(run_dir)
    opt = {"mu": jnp.zeros((2,), jnp.float32)}
    checkpoint.save(mgr, step, trainable, opt, {"step": jnp.asarray(step, jnp.int32), "rng": jax.random.PRNGKey(0)},
                    {"step": step, "data_position": 0, "kind": kind}, kind)
    mgr.wait_until_finished()
    return run_dir


def hf_logits(model, batch) -> np.ndarray:
    """transformers/PEFT logits (fp32) for an export.probe_batch-style right-padded batch."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(batch["tokens"], np.int64)),
                    attention_mask=torch.tensor(np.asarray(batch["segment_ids"] > 0, np.int64))).logits
    return out.float().numpy()


def max_diff(a, b, mask) -> float:
    m = np.asarray(mask) > 0
    return float(np.max(np.abs(np.asarray(a)[m] - np.asarray(b)[m])))
