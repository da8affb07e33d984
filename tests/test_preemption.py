"""Preemption: a real SIGTERM to a running `persllm train sft|dpo` process (sent by this test once the run has logged
a few steps) -> the step in flight finishes, a checkpoint of exactly that step is written, the process exits with
PREEMPTED_EXIT (75) and one clear line; rerunning resumes, and the final LoRA params equal an uninterrupted run's
(bitwise on CPU). A (2,2,2) mesh and dropout, so RNG, data position and sharded restore all matter."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from chat_fixtures import tiny_model_dir, write_corpus
from test_dpo import write_pairs
from test_train_resume import RUN, _train

from persllm_jax.train import checkpoint
from persllm_jax.train.preemption import PREEMPTED_EXIT

pytestmark = pytest.mark.slow  # three runs of 40 steps each on a (2,2,2) mesh, per test

STEPS = 40
COMMON = ["max_length=64", "batch_size=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "peak_tflops=0.15",
          "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "warmup_steps=2", "log_every=1", "learning_rate=5e-3",
          "seed=3"]


def _flags(sets):
    return [x for s in COMMON + sets for x in ("--set", s)]


def _sigterm_after(args, run_dir, after_step: int = 3):
    """Start the run, SIGTERM it once metrics.jsonl shows `after_step`, wait for it to exit."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", RUN] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_step:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _check_preempted_then_resumed(args, tmp_path):
    full = _train(args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    rc, _, err = _sigterm_after(args(tmp_path / "cut"), tmp_path / "cut")
    assert rc == PREEMPTED_EXIT, err[-3000:]
    assert "SIGTERM received: finishing this step, then writing a checkpoint" in err
    steps = checkpoint.manager(tmp_path / "cut", create=False).all_steps()
    assert len(steps) == 1 and 3 <= steps[0] < STEPS, steps  # the step reached, not the end
    assert f"preempted (SIGTERM) at step {steps[0]} of {STEPS}" in err and "rerun the same command" in err
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps[0]

    resumed = _train(args(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {steps[0]}" in resumed.stderr and "resumed from" in resumed.stderr
    a, meta_a = checkpoint.load_trained(tmp_path / "full")
    b, meta_b = checkpoint.load_trained(tmp_path / "cut")
    assert meta_a == meta_b and meta_a["step"] == STEPS
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(a)[1::2]) > 0


def test_sft_sigterm_checkpoints_and_resumes(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus", n=10, seed=2)
    args = lambda out: ["train", "sft", "--model", str(model), "--data", str(corpus), "--out", str(out),  # noqa: E731
                        "--no-progress"] + _flags([f"steps={STEPS}"])
    _check_preempted_then_resumed(args, tmp_path)


def test_dpo_sigterm_checkpoints_and_resumes(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    corpus = write_pairs(tmp_path / "corpus", n=10, seed=2)
    args = lambda out: ["train", "dpo", "--model", str(model), "--data", str(corpus), "--out", str(out),  # noqa: E731
                        "--no-progress"] + _flags([f"steps={STEPS}", "nll_weight=0.2"])
    _check_preempted_then_resumed(args, tmp_path)
