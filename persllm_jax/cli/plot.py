"""`persllm plot RUN_DIR`: a training run's curves (loss with the held-out eval_loss, learning rate, DPO reward
accuracy) as PNG files, from RUN_DIR/metrics.jsonl; no TensorBoard needed."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Folder for the PNG files (default: RUN_DIR/plots).")
def plot_cmd(run_dir, out):
    """Draw RUN_DIR/metrics.jsonl as loss.png (train and eval_loss), lr.png and, for DPO, reward_accuracy.png."""
    from persllm_jax.eval.plots import run_curves

    for path in run_curves(run_dir, Path(out) if out else Path(run_dir) / "plots"):
        click.echo(str(path))
