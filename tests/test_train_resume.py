"""Resume: SIGKILL the training process right after its first checkpoint, rerun into the same RUN_DIR, and the
final LoRA params equal an uninterrupted run's (bitwise on CPU). Dropout on, shuffled data crossing epochs and a
(2,2,2) mesh, so RNG, data position, optimizer state and sharded restore all matter."""

import pytest
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from chat_fixtures import tiny_model_dir, write_corpus

from persllm_jax.train import checkpoint

pytestmark = pytest.mark.slow  # minutes of CPU: `bash tools/test.sh -m "not slow"` skips it

RUN = "import sys; from persllm_jax.cli import main; sys.argv = ['persllm'] + sys.argv[1:]; main()"
KILLER = """
import os, signal, sys
from persllm_jax import cli
from persllm_jax.train import checkpoint
orig = checkpoint.save
def save_then_die(mgr, step, *a, **k):
    orig(mgr, step, *a, **k)
    mgr.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save_then_die
sys.argv = ["persllm"] + sys.argv[1:]
cli.main()
"""


def _train(args, killer=False):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", KILLER] + args if killer else [sys.executable, "-c", RUN] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus", n=10, seed=2)
    sets = ["steps=6", "save_every=2", "batch_size=4", "max_length=64", "learning_rate=5e-3", "warmup_steps=2",
            "lora.dropout=0.1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "log_every=1", "peak_tflops=0.15",
            "seed=3"]
    args = lambda out: ["train", "sft", "--model", str(model), "--data", str(corpus), "--out", str(out),
                        "--no-progress"] + [x for s in sets for x in ("--set", s)]

    full = _train(args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    killed = _train(args(tmp_path / "killed"), killer=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint.manager(tmp_path / "killed", create=False).all_steps() == [2]
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    resumed = _train(args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 2" in resumed.stderr

    a, meta_a = checkpoint.load_trained(tmp_path / "full")
    b, meta_b = checkpoint.load_trained(tmp_path / "killed")
    assert meta_a == meta_b and meta_a["step"] == 6
    assert meta_a["data_position"] == 24  # 6 steps x 4 rows: the corpus packs into fewer rows, so epochs wrap
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == 14
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert max(float(np.abs(np.asarray(x)).max()) for x in leaves_a[1::2]) > 0  # b moved off zero
    # the metrics of the resumed run continue the killed one without duplicates
    m_full = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    m_res = [json.loads(ln) for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m_res] == list(range(1, 7))
    assert [m["loss"] for m in m_res] == [m["loss"] for m in m_full]
