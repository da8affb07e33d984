"""`persllm plan --serve`: the server's prefill and decode programs compiled for one chip (the TPU compiler for
tpu-v5e-8, the CPU one for cpu): exact KV-cache bytes, a peak that holds weights + adapters + cache, a largest batch
that a compile at that batch confirms, and a refusal (exit 1) for a batch that cannot fit."""

import importlib.util
import json

import pytest
from click.testing import CliRunner

from persllm_jax.cli import main
from persllm_jax.serve.plan import ServeShape, largest_batch, run_serve_plan
from persllm_jax.train.plan import capacity

HF = dict(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
          max_position_embeddings=4096, rope_theta=10000.0)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the TPU compiler) is not installed: pip install 'persllm-jax[tpu-aot]'")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "config.json"
    path.write_text(json.dumps(HF))
    return str(path)


def _check(r, shape):
    a = r["asked"]
    kv = 2 * HF["num_hidden_layers"] * HF["num_key_value_heads"] * shape.cache_tokens * HF["head_dim"] * 2  # bf16
    assert r["kv_bytes_per_slot"] == kv and a["bytes"]["kv_cache"] == kv * shape.batch
    assert a["bytes"]["adapters"] == (shape.adapters + 1) * shape.lora_rank * 4 * HF["num_hidden_layers"] * sum(
        i + o for i, o in ((256, 256), (256, 128), (256, 128), (256, 256), (256, 512), (256, 512), (512, 256)))
    floor = a["bytes"]["weights"] + a["bytes"]["adapters"] + a["bytes"]["kv_cache"]
    assert a["fits_compiler"] and a["peak"] >= floor
    n, check = r["largest_batch"], r["largest_check"]
    assert n > shape.batch and check["batch"] == n and check["peak"] <= r["usable"]


@pytest.mark.slow
@needs_libtpu
def test_serve_plan_on_a_tpu_chip(model):
    shape = ServeShape(model=model, batch=8, cache_tokens=1024, adapters=2, lora_rank=8)
    r = run_serve_plan(shape, "tpu-v5e-8", 0.9)
    assert r["compiler"] == "tpu" and r["device_kind"] == "TPU v5 lite" and r["capacity"] == 16 * 2 ** 30
    _check(r, shape)
    assert r["asked"]["decode_cost"]["flops"] > 0 and r["asked"]["decode_cost"]["bytes"] > 0


def test_serve_plan_on_cpu_and_the_refusal(model):
    shape = ServeShape(model=model, batch=2, cache_tokens=256, adapters=1, lora_rank=4)
    r = run_serve_plan(shape, "cpu", 100e6 / capacity("cpu", 1))  # 100 MB of host RAM: a largest batch of tens
    assert r["compiler"] == "cpu" and r["usable"] == pytest.approx(100e6)
    _check(r, shape)
    res = CliRunner().invoke(main, ["plan", "--serve", "--model", model, "--target", "cpu", "--batch", "2",
                                    "--cache-tokens", "256", "--adapters", "1", "--lora-rank", "4"])
    assert res.exit_code == 0, res.output
    assert "KV cache per slot: 0.2 MiB (256 tokens)" in res.output and "largest batch that fits" in res.output
    # a headroom that leaves less than the weights: the asked batch is refused with the reason
    res = CliRunner().invoke(main, ["plan", "--serve", "--model", model, "--target", "cpu", "--headroom", "1e-6"])
    assert res.exit_code == 1 and "does not fit one chip of cpu at --batch 32" in res.output
    res = CliRunner().invoke(main, ["plan", "--serve", "--target", "cpu"])
    assert res.exit_code == 2 and "--serve needs --model" in res.output


def test_largest_batch_takes_the_prefill_bucket_into_account():
    # decode alone would allow 100 slots; prefill runs a power-of-two bucket of rows and allows 64 of them
    at = {"batch": 8, "prefill_rows": 8, "programs": {"decode": {"peak": 100 + 8 * 10}, "prefill": {"peak": 100 + 8 * 12}}}
    twice = {"batch": 16, "prefill_rows": 16,
             "programs": {"decode": {"peak": 100 + 16 * 10}, "prefill": {"peak": 100 + 16 * 12}}}
    assert largest_batch(at, twice, 100 + 100 * 10) == 64
    assert largest_batch(at, twice, 100 + 64 * 12) == 64  # prefill exactly at its limit of 64 rows
    assert largest_batch(at, twice, 100 + 40 * 10) == 32  # decode allows 40, prefill only a bucket of 32
    assert largest_batch(at, twice, 100 + 11) == 0  # not even one prefill row
