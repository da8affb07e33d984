"""Where training metrics go (`report_to`, as in TRL): RUN_DIR/metrics.jsonl always (the run's own record, read by
`persllm plot`, reports and resume), plus TensorBoard (tensorboardX) and Weights & Biases when named.

A backend is a tiny object: `open(run_dir, cfg, start)`, `log(step, metrics)`, `close()`. The optional packages
are imported only when their backend is enabled, and `check` finds a missing one before training starts (one
line with the pip command). The resolved config is logged once per run (TensorBoard: a text summary of its
YAML; W&B: `config=`). Resume: metrics.jsonl is trimmed by the loop; TensorBoard purges the events after the
checkpoint resumed from (`purge_step`); W&B continues the same run id (kept in RUN_DIR/wandb_run_id).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path

from persllm_jax import settings
from persllm_jax.errors import PersllmError
from persllm_jax.io import atomic_write_text

EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}  # backend: (module, extra)
SKIP = ("step", "data_position")  # bookkeeping in metrics.jsonl, not curves


class ReportError(PersllmError):
    """A `report_to` backend that cannot run (its optional package is not installed)."""


def check(report_to) -> None:
    """Fail before any work when an enabled backend's package is missing (no import: find_spec only)."""
    for name in report_to:
        if name in EXTRAS:
            module, extra = EXTRAS[name]
            if importlib.util.find_spec(module) is None:
                raise ReportError(f"report_to: {name} needs {module}: pip install 'persllm-jax[{extra}]' "
                                  f"(or pip install {module})")


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in SKIP and isinstance(v, (int, float)) and math.isfinite(float(v))}


class Jsonl:
    """RUN_DIR/metrics.jsonl, one JSON row per logged step (appended; the loop trims it on resume)."""

    def open(self, run_dir: Path, cfg, start: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class TensorBoard:
    """Event files under RUN_DIR/tensorboard (scalars tagged as in metrics.jsonl; the config as text)."""

    def open(self, run_dir: Path, cfg, start: int) -> None:
        from tensorboardX import SummaryWriter

        # resumed after step `start`: TensorBoard drops the earlier events of steps > start (logged again now).
        # The file name's suffix keeps a resume within the same second (tensorboardX names files by the second
        # and opens them "wb") from overwriting the earlier file, and sorts it after that file, as TensorBoard reads.
        self.writer = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"), purge_step=start + 1 if start else None,
                                    filename_suffix=f".from{start:09d}.{os.getpid()}")
        if not start:
            self.writer.add_text("config", "```yaml\n" + settings.dump(cfg) + "```", 0)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in _scalars(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run (WANDB_MODE=offline honoured: a local run folder under WANDB_DIR, else RUN_DIR/wandb)."""

    def open(self, run_dir: Path, cfg, start: int) -> None:
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "persllm"), name=run_dir.name, id=run_id,
                              resume="allow", dir=os.environ.get("WANDB_DIR") or str(run_dir),
                              config=settings.to_dict(cfg))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"jsonl": Jsonl, "tensorboard": TensorBoard, "wandb": WandB}


class Reporters:
    """All the run's backends as one: metrics.jsonl first, then those `cfg.report_to` names."""

    def __init__(self, run_dir: Path, cfg, start: int = 0):
        check(cfg.report_to)
        names = ["jsonl"] + [n for n in dict.fromkeys(cfg.report_to) if n in EXTRAS]
        self.backends = []
        try:
            for name in names:
                backend = BACKENDS[name]()
                backend.open(run_dir, cfg, start)
                self.backends.append(backend)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: dict) -> None:
        for b in self.backends:
            b.log(step, metrics)

    def close(self) -> None:
        for b in reversed(self.backends):
            b.close()
        self.backends = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["ReportError", "check", "Reporters", "BACKENDS", "EXTRAS"]
