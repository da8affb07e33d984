"""DPO resume: SIGKILL right after the first checkpoint, rerun into the same RUN_DIR, and the final adapter equals an
uninterrupted run's (bitwise on CPU). A (2,2,2) mesh, dropout, shuffled pairs crossing epochs, an SFT parent and a
precomputed (cached) reference, so RNG, data position, optimizer state, sharded restore and the cache all matter."""

import pytest
import json
import signal

import jax
import numpy as np

from chat_fixtures import tiny_model_dir, write_corpus
from persllm_jax.train import checkpoint
from test_dpo import write_pairs
from test_train_resume import _train

pytestmark = pytest.mark.slow  # minutes of CPU: `bash tools/test.sh -m "not slow"` skips it


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    sft_corpus = write_corpus(tmp_path / "sft_corpus", n=6, seed=2)
    corpus = write_pairs(tmp_path / "corpus", n=10, seed=2)
    common = ["max_length=64", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "peak_tflops=0.15", "lora.rank=4",
              "lora.alpha=8", "warmup_steps=1", "log_every=1"]
    flags = lambda sets: [x for s in common + sets for x in ("--set", s)]  # noqa: E731
    sft = _train(["train", "sft", "--model", str(model), "--data", str(sft_corpus), "--out", str(tmp_path / "sft"),
                  "--no-progress"] + flags(["steps=2", "batch_size=4", "learning_rate=1e-2"]))
    assert sft.returncode == 0, sft.stderr[-3000:]
    sets = ["steps=5", "save_every=2", "batch_size=4", "learning_rate=5e-3", "lora.dropout=0.1", "seed=3",
            "precompute_ref=true", "nll_weight=0.2"]
    args = lambda out: ["train", "dpo", "--from", str(tmp_path / "sft"), "--data", str(corpus), "--out", str(out),
                        "--no-progress"] + flags(sets)  # noqa: E731

    full = _train(args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "reference log-probs: computed" in full.stderr

    killed = _train(args(tmp_path / "killed"), killer=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint.manager(tmp_path / "killed", create=False).all_steps() == [2]

    resumed = _train(args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 2" in resumed.stderr
    assert "reference log-probs: cached" in resumed.stderr  # the cache under the run dir is reused

    a, meta_a = checkpoint.load_trained(tmp_path / "full")
    b, meta_b = checkpoint.load_trained(tmp_path / "killed")
    assert meta_a == meta_b and meta_a["step"] == 5
    rows = json.loads((tmp_path / "full" / "run.json").read_text())
    assert meta_a["data_position"] == 20 and rows["parent_step"] == 2  # 5 steps x 4 rows > one epoch of rows
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(a)[1::2]) > 0
    m_full = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    m_res = [json.loads(ln) for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m_res] == list(range(1, 6))
    for key in ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"):
        assert [m[key] for m in m_res] == [m[key] for m in m_full], key
