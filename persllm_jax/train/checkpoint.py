"""Orbax checkpoints under RUN_DIR/checkpoints/<step>/ (atomic: orbax writes to a temp dir and renames).

Items per step:
    lora or params   the trained weights only (LoRA adapter, or all weights for full fine-tuning), so
                     export and DPO restore them without touching the optimizer state
    opt_state        optax state
    train_state      {"step", "rng"}
    meta             JSON: step, data position (rows consumed), trainable kind
The frozen base is not saved: RUN_DIR/run.json names the model it came from. Reading run directories
(steps, run.json, chains of runs) is persllm_jax/runs.py.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from persllm_jax.errors import PersllmError


class CheckpointError(PersllmError):
    """A run without the checkpoint asked for."""


def first_line(e: BaseException) -> str:
    """One line saying why a restore failed (orbax and tensorstore errors run over many lines)."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line.split(". See full TensorStore details")[0][:300]  # tensorstore appends a spec repr


def manager(run_dir: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=opts)


def save(mgr: ocp.CheckpointManager, step: int, trainable, opt_state, train_state, meta: dict, kind: str = "lora"):
    args = ocp.args.Composite(**{
        kind: ocp.args.StandardSave(trainable),
        "opt_state": ocp.args.StandardSave(opt_state),
        "train_state": ocp.args.StandardSave(train_state),
        "meta": ocp.args.JsonSave(meta),
    })
    mgr.save(step, args=args, force=True)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(mgr: ocp.CheckpointManager, step: int, trainable, opt_state, train_state, kind: str = "lora"):
    """Restore into the shapes, dtypes and shardings of the given (freshly initialised) trees."""
    args = ocp.args.Composite(**{
        kind: ocp.args.StandardRestore(_abstract(trainable)),
        "opt_state": ocp.args.StandardRestore(_abstract(opt_state)),
        "train_state": ocp.args.StandardRestore(_abstract(train_state)),
        "meta": ocp.args.JsonRestore(),
    })
    out = mgr.restore(step, args=args)
    return out[kind], out["opt_state"], out["train_state"], dict(out["meta"])


def restore_latest_good(mgr: ocp.CheckpointManager, run_dir: Path, trainable, opt_state, train_state,
                        kind: str = "lora", log=print):
    """(step, (trainable, opt_state, train_state, meta)) of the newest checkpoint that restores, or None when the
    run has none. A checkpoint that fails to restore (a truncated file, a kill mid-write by something other than
    orbax) is reported in one line and moved aside to RUN_DIR/damaged_checkpoints/<step>, never deleted."""
    import shutil

    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            return step, restore(mgr, step, trainable, opt_state, train_state, kind)
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types for damaged files)
            aside = Path(run_dir) / "damaged_checkpoints" / str(step)
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(run_dir).absolute() / "checkpoints" / str(step)), str(aside))
            mgr.reload()
            log(f"warning: checkpoint {step} cannot be restored ({first_line(e)}); moved to {aside}, "
                f"resuming from the one before it")
    return None


def load_trained(run_dir: str | Path, step: int | None = None, kind: str | None = None):
    """(weights, meta) of a run's checkpoint, on the default device: for export, DPO and evaluation."""
    with manager(run_dir, create=False) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{run_dir}: no checkpoint")
        meta = dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        kind = kind or meta.get("kind", "lora")
        # A checkpoint written by several hosts names devices this process lacks: restore onto the default device.
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        out = mgr.restore(step, args=ocp.args.Composite(**{kind: ocp.args.StandardRestore(fallback_sharding=one)}))
    return out[kind], meta


__all__ = ["CheckpointError", "first_line", "manager", "save", "restore", "restore_latest_good", "load_trained"]
