"""THE reader of run directories: what train writes and export, DPO, chat/serve, eval, the model card and
reproduce read.

    RUN_DIR/run.json        model, model_source, model_config, kind (lora | params), lora {rank, alpha, scale,
                            targets}, data, total_steps; a DPO run also parent_run / parent_step (its SFT run)
    RUN_DIR/config.yaml     the resolved training config
    RUN_DIR/metrics.jsonl   one row per logged step
    RUN_DIR/checkpoints/<step>/   orbax (see train/checkpoint.py)

A run resolves to a *chain*: the base model, then one stage per run from the root (SFT) to this run, each a
LoRA adapter applied on the previous stage's merged weights, or full weights (full fine-tuning).
May import: errors, io, model/, train/checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from persllm_jax.errors import InputError, PersllmError
from persllm_jax.io import atomic_write_json, read_json, read_jsonl

PARENT_KEYS = ("parent_run", "from", "sft_run", "from_run")
PARENT_STEP_KEYS = ("parent_step", "from_step", "sft_step")


class RunError(PersllmError, ValueError):
    """A run directory that is missing, incomplete or inconsistent."""


# --- run.json, metrics, checkpoint steps --------------------------------------------------------------


def read_run(run_dir: str | Path) -> dict:
    """RUN_DIR/run.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    path = run_dir / "run.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no run.json)")
    try:
        return read_json(path)
    except InputError as e:
        raise RunError(str(e)) from None


def write_run(run_dir: str | Path, info: dict) -> None:
    atomic_write_json(Path(run_dir) / "run.json", info)


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps with a checkpoint folder, ascending (orbax names each finished step's folder by its number)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(run_dir: str | Path) -> int | None:
    steps = checkpoint_steps(run_dir)
    return steps[-1] if steps else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every row of RUN_DIR/metrics.jsonl ([] if none; a torn last line from a kill is dropped)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl", torn_tail=True, missing_ok=True)


def last_metrics(run_dir: str | Path) -> dict:
    rows = read_metrics(run_dir)
    return rows[-1] if rows else {}


def parent_of(info: dict, run_dir: Path) -> tuple[Path | None, int | None]:
    """(parent run dir, its step or None for latest) named by run.json, or (None, None) for a root run."""
    raw = next((info[k] for k in PARENT_KEYS if info.get(k)), None)
    step = next((info[k] for k in PARENT_STEP_KEYS if info.get(k) is not None), None)
    if raw is None:
        return None, None
    p = Path(raw)
    if not p.is_absolute() and not p.is_dir() and (run_dir / p).is_dir():
        p = run_dir / p
    return p, (int(step) if step is not None else None)


def base_spec_of(info: dict, run_dir: Path) -> str:
    """The base model as recorded: a Hub id given to train while it is in the HF cache (so exports and DPO runs
    name the id, not the cache's snapshot path), else the resolved source if it still exists, else the spec."""
    from persllm_jax.model.weights import WeightsError, parse_hub_id, resolve_model_path

    if parse_hub_id(info.get("model")):
        try:
            resolve_model_path(info["model"])
            return info["model"]
        except WeightsError:
            pass
    for key in ("model_source", "model"):
        spec = info.get(key)
        if not spec:
            continue
        if spec == "smollm2" or Path(spec).exists():
            return spec
        if (run_dir / spec).exists():
            return str(run_dir / spec)
    raise RunError(f"{run_dir}/run.json: base model {info.get('model_source') or info.get('model')!r} not found")


def input_paths(run_dir: str | Path) -> list[Path]:
    """What a run reads: its folder, every parent run's, and the base model's path (for output-safety checks;
    cheap: run.json files only)."""
    out, seen, cur = [], set(), Path(run_dir)
    while cur is not None and os.path.realpath(cur) not in seen:
        seen.add(os.path.realpath(cur))
        out.append(cur)
        try:
            info = read_run(cur)
        except RunError:
            break
        spec = info.get("model_source") or info.get("model")
        if spec and spec != "smollm2" and Path(spec).exists():
            out.append(Path(spec))
        cur, _ = parent_of(info, cur)
    return out


# --- stages and chains ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    run_dir: Path
    info: dict  # run.json
    step: int
    kind: str  # "lora" or "params"
    weights: dict  # LoRA tree or full params
    scale: float | None  # alpha / r for LoRA

    @property
    def lora_info(self) -> dict:
        return self.info.get("lora") or {}


@dataclasses.dataclass
class Chain:
    base: object  # model.weights.LoadedModel
    base_spec: str  # how the base was named at training (HF dir, .gguf or `smollm2`)
    stages: list[Stage]  # root (SFT) first

    @property
    def last(self) -> Stage:
        return self.stages[-1]


def _load_stage(run_dir: Path, info: dict, step: int | None) -> Stage:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persllm_jax.model.lora import lora_scale
    from persllm_jax.train import checkpoint

    steps = checkpoint_steps(run_dir)
    if not steps:
        raise RunError(f"{run_dir}: no checkpoint (run it first, or check the path)")
    if step is not None and step not in steps:
        raise RunError(f"{run_dir}: no checkpoint at step {step}; available: {', '.join(map(str, steps))}")
    step = steps[-1] if step is None else step
    try:
        weights, meta = checkpoint.load_trained(run_dir, step)
    except Exception as e:  # orbax raises a zoo of types for damaged checkpoints
        earlier = [s for s in steps if s < step]
        hint = f"; pass --step {earlier[-1]} to use the one before it" if earlier else ""
        raise RunError(f"{run_dir}: checkpoint {step} is damaged ({checkpoint.first_line(e)}){hint}") from None
    weights = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), weights)
    kind = meta.get("kind") or info.get("kind") or "lora"
    scale = None
    if kind == "lora":
        lo = info.get("lora") or {}
        if "rank" not in lo or "alpha" not in lo:
            raise RunError(f"{run_dir}/run.json: LoRA run without lora.rank / lora.alpha")
        scale = float(lo.get("scale") or lora_scale(lo["rank"], lo["alpha"]))
    return Stage(run_dir, info, step, kind, weights, scale)


def load_stages(run_dir: str | Path, step: int | None = None) -> tuple[Path, dict, list[Stage]]:
    """(root run dir, its run.json, every stage from the root to `run_dir`), without the base weights."""
    run_dir = Path(run_dir)
    runs: list[tuple[Path, dict, int | None]] = []
    seen = set()
    cur, cur_step = run_dir, step
    while cur is not None:
        key = os.path.realpath(cur)
        if key in seen:
            raise RunError(f"{run_dir}: run.json parents form a cycle at {cur}")
        seen.add(key)
        info = read_run(cur)
        runs.append((cur, info, cur_step))
        cur, cur_step = parent_of(info, cur)
    runs.reverse()
    root_dir, root_info, _ = runs[0]
    return root_dir, root_info, [_load_stage(d, info, s) for d, info, s in runs]


def load_chain(run_dir: str | Path, step: int | None = None) -> Chain:
    """Base model and every stage from the root run to `run_dir` (weights on the host device, fp32 base)."""
    from persllm_jax.model.weights import load_model

    root_dir, root_info, stages = load_stages(run_dir, step)
    spec = base_spec_of(root_info, root_dir)
    try:
        base = load_model(spec)
    except Exception as e:
        raise RunError(f"base model {spec}: {str(e).splitlines()[0]}") from None
    recorded = root_info.get("model_config")
    if recorded:
        for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if k in recorded and recorded.get(k) != base.hf_config.get(k):
                raise RunError(f"base model {spec}: {k} is {base.hf_config.get(k)!r} but the run was trained on "
                               f"{recorded.get(k)!r}; the base changed since training")
    return Chain(base, spec, stages)


def merged_params(chain: Chain, upto: int | None = None) -> dict:
    """fp32 params with stages [0, upto) applied (all of them by default)."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.model.lora import merge_lora

    params = chain.base.params
    for st in chain.stages[:upto]:
        if st.kind == "lora":
            params = merge_lora(params, st.weights, st.scale)
        else:
            params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), st.weights)
    return params


def stacked_adapter(stages: list[Stage], mcfg) -> tuple[dict, int, float, float]:
    """(LoRA tree, rank, alpha, dropout) equal to applying the LoRA `stages` one after another on one base.

    Updates are stacked, `A = [A1 | A2]` (rank r1 + r2) and `B = [s1·B1 ; s2·B2]`, so `A @ B = s1·A1@B1 +
    s2·A2@B2` exactly; the scalings are folded into B and alpha = r (scale 1). A projection targeted by only one
    stage gets zeros in the other's slots. A single stage keeps its own rank and alpha."""
    for st in stages:
        if st.kind != "lora":
            raise RunError(f"{st.run_dir}: a full fine-tuning run has no adapter; export it with --format merged")
    if len(stages) == 1:
        st = stages[0]
        lo = st.lora_info
        return st.weights, int(lo["rank"]), float(lo["alpha"]), float(lo.get("dropout") or 0.0)
    from persllm_jax.model.lora import stack_lora

    weights, rank = stack_lora([(st.weights, st.scale) for st in stages], mcfg)
    return weights, rank, float(rank), 0.0


__all__ = ["RunError", "read_run", "write_run", "checkpoint_steps", "latest_step", "read_metrics", "last_metrics",
           "parent_of", "base_spec_of", "input_paths", "Stage", "Chain", "load_stages", "load_chain", "merged_params",
           "stacked_adapter"]
