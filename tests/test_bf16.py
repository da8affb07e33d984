"""bf16 training (`dtype: bfloat16`: bf16 matmuls and activations, fp32 master weights, optimizer state, loss and
log-softmax) tracks fp32: 20 LoRA SFT steps on a tiny model, the loss at every step within 1% (relative; measured 8e-4) of the fp32
run's, the adapter stays fp32, and the bf16 run is not secretly fp32 (its losses differ)."""

import json

import jax
import numpy as np
import pytest

from chat_fixtures import tiny_model_dir, write_corpus

from persllm_jax.model.weights import load_model, load_tokenizer
from persllm_jax.train import sft
from persllm_jax.train.config import load_config

TOLERANCE = 0.01  # relative, per step: bf16 keeps 8 mantissa bits (~0.4% per rounding), the loss sums in fp32


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    model, corpus = tiny_model_dir(root / "model"), write_corpus(root / "corpus", n=24, seed=1)
    loaded, tok = load_model(str(model)), load_tokenizer(str(model))
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(overrides=["steps=20", "max_length=64", "batch_size=4", "learning_rate=1e-2",
                                     "warmup_steps=2", "log_every=1", "lora.rank=8", "lora.alpha=16", "mesh.data=1",
                                     "peak_tflops=0.15", f"dtype={dtype}"],
                          base={"model": str(model), "data": str(corpus)})
        res = sft.run(cfg, root / dtype, loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
                    log=lambda s: None)
        losses = [json.loads(ln)["loss"] for ln in (root / dtype / "metrics.jsonl").read_text().splitlines()]
        out[dtype] = (losses, res["state"]["trainable"])
    return out


def test_bf16_losses_track_fp32(runs):
    f32, b16 = np.array(runs["float32"][0]), np.array(runs["bfloat16"][0])
    assert len(f32) == len(b16) == 20
    assert f32[-1] < 0.8 * f32[0]  # it learns
    rel = np.abs(b16 - f32) / f32
    print(f"bf16 vs fp32 over 20 steps: max relative loss difference {rel.max():.2e}, final {f32[-1]:.4f} vs {b16[-1]:.4f}")
    assert rel.max() <= TOLERANCE, rel
    assert rel.max() > 0  # bf16 compute really ran (fp32 would be identical)
    for leaf in jax.tree_util.tree_leaves(runs["bfloat16"][1]):
        assert leaf.dtype == np.float32  # fp32 master weights
