"""Trainer: packing equals unpacked, gradient accumulation equals a big batch, sharded runs equal the
1-device run (and are really sharded), the loss falls, SmolLM2 learns its answers, bad input fails cleanly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from jax.sharding import PartitionSpec as P

from chat_fixtures import tiny_model_dir, write_corpus
from persllm_jax.train import data
from persllm_jax.model import lora
from persllm_jax.train import sharding as shd
from persllm_jax.train import sft
from persllm_jax.cli import main
from persllm_jax.train.config import load_config
from persllm_jax.model.weights import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model_dir(root / "model")
    corpus = write_corpus(root / "corpus", n=24, seed=1)
    return model, corpus, load_model(str(model)), load_tokenizer(str(model))


def _cfg(model, corpus, *sets):
    base = ["max_length=64", "batch_size=8", "learning_rate=1e-3", "warmup_steps=0", "log_every=1",
            "lora.rank=8", "lora.alpha=16", "mesh.data=-1", "shuffle=false", "peak_tflops=0.15"]
    return load_config(overrides=base + list(sets), base={"model": str(model), "data": str(corpus)})


def _random_adapter(mcfg, seed=0):
    ad = lora.init_lora(mcfg, jax.random.PRNGKey(seed), 4, ["all-linear"])
    return {n: {"a": p["a"], "b": 0.05 * jax.random.normal(jax.random.PRNGKey(seed + i + 1), p["b"].shape)}
            for i, (n, p) in enumerate(ad.items())}


def test_packed_loss_equals_unpacked(tiny):
    model, corpus, loaded, tok = tiny
    ex, _ = data.load_examples(tok, data.corpus_file(corpus), 64)
    ex = ex[:10]
    packed, unpacked = data.pack_rows(ex, 64), data.pack_rows(ex, 64, packing=False)
    assert len(packed["tokens"]) < len(unpacked["tokens"])  # really packed: several documents per row
    assert (packed["segment_ids"].max(axis=1) > 1).any()
    ad = _random_adapter(loaded.cfg)
    nll = jax.jit(lambda p, ad, b: sft.token_nll_sum(p, loaded.cfg, b, lora=ad, lora_scale=2.0))
    f = lambda rows: nll(loaded.params, ad, {k: jnp.asarray(v) for k, v in rows.items()})
    s_p, w_p = f(packed)
    # token-weighted loss of the documents one by one
    per_doc = [f({k: v[i:i + 1] for k, v in unpacked.items()}) for i in range(len(ex))]
    s_u, w_u = sum(float(s) for s, _ in per_doc), sum(float(w) for _, w in per_doc)
    assert float(w_p) == w_u
    np.testing.assert_allclose(float(s_p) / float(w_p), s_u / w_u, rtol=1e-5, atol=1e-5)


def _one_step(cfg, loaded, rows, mesh):
    opt, sched = sft.make_optimizer(cfg, 10)
    state, frozen = sft.init_state(cfg, loaded.cfg, loaded.params, opt, mesh)
    state["trainable"] = jax.tree_util.tree_map(lambda x: x + 0.01, state["trainable"])  # non-zero B
    state["trainable"] = shd.shard_tree(state["trainable"], shd.tree_shardings(state["trainable"], mesh))
    step, _, _, b_sh = sft.compile_step(cfg, loaded.cfg, opt, sched, state, frozen, mesh)
    batch = {k: v.reshape(cfg.grad_accum, cfg.batch_size, -1) for k, v in rows.items()}
    state, m = step(state, frozen, shd.put_batch(batch, b_sh))
    return jax.device_get(state["trainable"]), float(m["loss"])


def test_grad_accum_equals_big_batch(tiny):
    model, corpus, loaded, tok = tiny
    ex, _ = data.load_examples(tok, data.corpus_file(corpus), 64)
    rows = {k: v[:8] for k, v in data.pack_rows(ex, 64).items()}
    assert len(data.pack_rows(ex, 64)["tokens"]) >= 8
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    a, loss_a = _one_step(_cfg(model, corpus, "batch_size=2", "grad_accum=4"), loaded, rows, mesh)
    b, loss_b = _one_step(_cfg(model, corpus, "batch_size=8", "grad_accum=1"), loaded, rows, mesh)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    # and the update is not trivially zero
    assert max(float(np.abs(x - 0.01).max()) for x in jax.tree_util.tree_leaves(a)) > 1e-4


def _losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sharded_runs_match_single_device(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    assert jax.device_count() == 8
    sets = ["steps=3", "lora.dropout=0.1"]
    ref = sft.run(_cfg(model, corpus, *sets, "mesh.data=1"), tmp_path / "one", loaded=loaded, tokenizer=tok,
                devices=jax.devices()[:1], progress=False, log=lambda s: None)
    ref_lora = jax.device_get(ref["state"]["trainable"])
    ref_loss = _losses(tmp_path / "one")
    assert len(ref_loss) == 3
    for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        d = tmp_path / "x".join(map(str, mesh))
        out = sft.run(_cfg(model, corpus, *sets, f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}",
                         f"mesh.tensor={mesh[2]}"), d, loaded=loaded, tokenizer=tok, progress=False, log=lambda s: None)
        np.testing.assert_allclose(_losses(d), ref_loss, rtol=1e-5, atol=1e-5)
        got = jax.device_get(out["state"]["trainable"])
        for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref_lora)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        q_kernel, q_a = out["frozen"]["layers"]["q_proj"]["kernel"], out["state"]["trainable"]["q_proj"]["a"]
        mu = out["state"]["opt_state"][1][0].mu["q_proj"]["a"]  # adamw moments shard like their params
        assert len(q_kernel.sharding.device_set) == 8
        Lyr, d_in, d_out = q_kernel.shape
        if mesh == (1, 8, 1):
            assert q_kernel.sharding.spec == P(None, "fsdp", None)
            assert q_kernel.addressable_shards[0].data.shape == (Lyr, d_in // 8, d_out)
            assert q_a.addressable_shards[0].data.shape == (Lyr, d_in // 8, 8)
            assert mu.sharding.spec == q_a.sharding.spec
        elif mesh == (2, 2, 2):
            assert q_kernel.sharding.spec == P(None, "fsdp", "tensor")
            assert q_kernel.addressable_shards[0].data.shape == (Lyr, d_in // 2, d_out // 2)
            b = out["state"]["trainable"]["q_proj"]["b"]
            assert b.addressable_shards[0].data.shape == (Lyr, 8, d_out // 2)
            down = out["frozen"]["layers"]["down_proj"]["kernel"]
            assert down.sharding.spec == P(None, "tensor", "fsdp")
        else:  # pure data parallel: weights replicated, batch split
            assert q_kernel.sharding.is_fully_replicated
    # only the adapter is trained: the optimizer state holds exactly the LoRA parameters, twice (mu, nu)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(ref["state"]["opt_state"]) if x.ndim >= 2)
    assert n_opt == 2 * lora.lora_param_count(ref_lora)
    saved = yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())
    assert saved["lora"]["rank"] == 8 and saved["steps"] == 3 and saved["model"] == str(model)
    run = json.loads((tmp_path / "one" / "run.json").read_text())
    assert run["kind"] == "lora" and run["lora"]["targets"][0] == "q_proj" and run["model_source"] == str(model)


def test_loss_falls_on_tiny_model(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    small = write_corpus(tmp_path / "c", n=8, seed=5, turns=(1, 1))
    out = sft.run(_cfg(model, small, "steps=60", "mesh.data=1", "batch_size=2", "learning_rate=2e-2",
                     "lora.rank=16", "lora.alpha=32", "log_every=10"), tmp_path / "r", loaded=loaded, tokenizer=tok,
                devices=jax.devices()[:1], progress=False, log=lambda s: None)
    ex, _ = data.load_examples(tok, data.corpus_file(small), 64)
    rows = {k: jnp.asarray(v) for k, v in data.pack_rows(ex, 64).items()}
    before = sft.token_nll_sum(loaded.params, loaded.cfg, rows)
    after = sft.token_nll_sum(loaded.params, loaded.cfg, rows, lora=jax.device_get(out["state"]["trainable"]),
                            lora_scale=2.0)
    l0, l1 = float(before[0] / before[1]), float(after[0] / after[1])
    assert l1 <= 0.5 * l0, (l0, l1)


def test_smollm2_short_run_raises_answer_likelihood(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Who are you?"},
                      {"role": "assistant", "content": "I'm Harry Potter, and I live under the stairs at number four, Privet Drive."}]},
        {"messages": [{"role": "user", "content": "What is your wand made of?"},
                      {"role": "assistant", "content": "Holly, eleven inches, with a phoenix feather core. Ollivander said it was curious."}]},
    ]
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, tok = load_model("smollm2"), load_tokenizer("smollm2")
    cfg = load_config(overrides=["steps=4", "batch_size=1", "peak_tflops=0.15", "max_length=64", "learning_rate=2e-3", "warmup_steps=0",
                                 "mesh.data=1", "lora.rank=8", "lora.alpha=16", "log_every=1", "packing=false"],
                      base={"model": "smollm2", "data": str(tmp_path)})
    out = sft.run(cfg, tmp_path / "run", loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
                log=lambda s: None)
    ex, _ = data.load_examples(tok, data.corpus_file(tmp_path), 64)
    batch = {k: jnp.asarray(v) for k, v in data.pack_rows(ex, 64, packing=False).items()}
    s0, w = sft.token_nll_sum(loaded.params, loaded.cfg, batch)
    s1, _ = sft.token_nll_sum(loaded.params, loaded.cfg, batch, lora=jax.device_get(out["state"]["trainable"]),
                            lora_scale=2.0)
    assert float(s1) < float(s0) - 0.1 * float(w), (float(s0 / w), float(s1 / w))  # >= 0.1 nats/token better


def _cli(args):
    return CliRunner().invoke(main, args)


def _one_error_line(result):
    assert result.exit_code != 0
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_bad_input_gives_clear_errors(tiny, tmp_path):
    model = str(tiny[0])
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]})
    corpus = tmp_path / "c"
    (corpus / "sft").mkdir(parents=True)
    f = corpus / "sft" / "train.jsonl"
    base = ["train", "sft", "--model", model, "--data", str(corpus), "--no-progress"]

    f.write_text(good + "\n" + '{"messages": [}\n')
    line = _one_error_line(_cli(base + ["--out", str(tmp_path / "r1")]))
    assert f"{f}:2:15: invalid JSON" in line  # file:line:column (persllm_jax/io.py)
    f.write_text("")
    assert "empty corpus" in _one_error_line(_cli(base + ["--out", str(tmp_path / "r2")]))
    f.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert f"{f}:2: conversation has no assistant turn" in _one_error_line(_cli(base + ["--out", str(tmp_path / "r3")]))
    line = _one_error_line(_cli(base + ["--out", str(tmp_path / "r4"), "--set", "lora.rnak=4"]))
    assert "unknown config key 'lora.rnak'" in line and "lora.rank" in line and "lora.targets" in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\nlearning_rat: 0.1\n")
    line = _one_error_line(_cli(base + ["--out", str(tmp_path / "r5"), "--config", str(cfg)]))
    assert f"{cfg}: unknown config key 'learning_rat'" in line and "learning_rate" in line
    line = _one_error_line(_cli(base + ["--out", str(tmp_path / "r6"), "--resume"]))
    assert "no checkpoint to resume from" in line


def test_bf16_compute_keeps_fp32_master_weights(tiny):
    model, corpus, loaded, tok = tiny
    ex, _ = data.load_examples(tok, data.corpus_file(corpus), 64)
    rows = {k: v[:2] for k, v in data.pack_rows(ex, 64).items()}
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    a, loss32 = _one_step(_cfg(model, corpus, "batch_size=2"), loaded, rows, mesh)
    b, loss16 = _one_step(_cfg(model, corpus, "batch_size=2", "dtype=bfloat16"), loaded, rows, mesh)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(b))
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.05 * loss32  # really bf16, still close


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("sft_*.yaml"))
    assert files
    for f in files:
        cfg = load_config(path=f)
        assert cfg.max_length >= 512 and cfg.learning_rate > 0
