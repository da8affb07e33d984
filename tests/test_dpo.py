"""DPO: log 2 at step 0, parity with TRL's DPOTrainer (log-probs and every loss type), precomputed reference ==
online reference, learning on a tiny model, sharded == 1 device, export of an SFT -> DPO chain, clear errors."""

import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chat_fixtures import WORDS, tiny_model_dir, write_corpus
from click.testing import CliRunner

from persllm_jax.cli import main
from persllm_jax.model import decoder
from persllm_jax.model import lora
from persllm_jax.model.weights import load_model, load_tokenizer
from persllm_jax.train import dpo, dpo_data
from persllm_jax.train import sft
from persllm_jax.train import sharding as shd
from persllm_jax.train.config import ConfigError, DPOConfig, load_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_pairs(root, n: int = 12, seed: int = 0, lengths=(3, 10)):
    """CORPUS_DIR/dpo/train.jsonl: chosen = the question's words reversed (learnable rule), rejected = random."""
    rng = random.Random(seed)
    words = WORDS[:-3]
    (root / "dpo").mkdir(parents=True, exist_ok=True)
    with (root / "dpo" / "train.jsonl").open("w") as f:
        for i in range(n):
            q = [rng.choice(words) for _ in range(rng.randint(*lengths))]
            system = "you are harry ." if i % 2 else "you are hermione , now it is year " + rng.choice(words) + " ."
            row = {"id": f"p{i}", "persona": "harry", "stage": "y1", "source": "cross_persona",
                   "prompt": [{"role": "system", "content": system}, {"role": "user", "content": " ".join(q) + " ?"}],
                   "chosen": [{"role": "assistant", "content": " ".join(reversed(q)) + " ."}],
                   "rejected": [{"role": "assistant",
                                 "content": " ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + " ."}]}
            f.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model = tiny_model_dir(root / "model")
    corpus = write_pairs(root / "corpus", n=12, seed=1)
    return model, corpus, load_model(str(model)), load_tokenizer(str(model))


def _cfg(model, corpus, *sets):
    base = ["max_length=64", "batch_size=2", "learning_rate=1e-3", "warmup_steps=0", "log_every=1", "lora.rank=8",
            "lora.alpha=16", "mesh.data=-1", "shuffle=false", "peak_tflops=0.15"]
    return load_config(DPOConfig, overrides=base + list(sets), base={"model": str(model), "data": str(corpus)})


def _rows(tok, corpus, max_length=64, packing=True):
    pairs, _ = dpo_data.load_pairs(tok, dpo_data.dpo_file(corpus), max_length)
    K, S = dpo_data.budgets(pairs, max_length, packing)
    return pairs, {k: jnp.asarray(v) for k, v in dpo_data.pack_pairs(pairs, max_length, K, S, packing).items()}


def _by_pair(rows, *arrays):
    """Per-row [B, S] arrays -> {corpus index: values}."""
    ids = np.asarray(rows["pair_id"])
    return {int(i): tuple(float(np.asarray(a)[r, s]) for a in arrays) for (r, s), i in np.ndenumerate(ids) if i >= 0}


def test_shared_prompt_rows_equal_separate_sequences(tiny):
    """The packed [prompt|chosen|rejected] layout scores each completion exactly as a plain causal forward would."""
    model, corpus, loaded, tok = tiny
    pairs, rows = _rows(tok, corpus)
    assert (np.asarray(rows["segment_ids"]).max(axis=1) > 1).any()  # several pairs per row
    ad = {n: {"a": p["a"], "b": 0.05 * jax.random.normal(jax.random.PRNGKey(i), p["b"].shape)}
          for i, (n, p) in enumerate(lora.init_lora(loaded.cfg, jax.random.PRNGKey(9), 4, TARGETS).items())}
    pc, pr, nc, nr = dpo.sequence_logps(loaded.params, loaded.cfg, rows, lora=ad, lora_scale=2.0)
    got = _by_pair(rows, pc, pr, nc, nr)
    for p in pairs:
        for ids, k, nk in ((p.chosen, 0, 2), (p.rejected, 1, 3)):
            seq = np.concatenate([p.prompt, ids])[None]
            logits = decoder.logits_from_hidden(loaded.params, decoder.hidden_states(
                loaded.params, loaded.cfg, seq, np.arange(seq.shape[1])[None], np.ones_like(seq), lora=ad,
                lora_scale=2.0))
            lp = jax.nn.log_softmax(logits[0, len(p.prompt) - 1:-1], axis=-1)
            want = float(jnp.sum(jnp.take_along_axis(lp, jnp.asarray(ids)[:, None], axis=-1)))
            np.testing.assert_allclose(got[p.index][k], want, rtol=1e-5, atol=1e-5)
            assert got[p.index][nk] == len(ids)


def test_zero_delta_loss_is_log2(tiny):
    model, corpus, loaded, tok = tiny
    cfg = _cfg(model, corpus, "loss_type=sigmoid")
    x = jnp.asarray([-40.5, -3.25, -17.0], jnp.float32)
    per = dpo.pair_losses(cfg, x, x + 1.5, x, x + 1.5, jnp.ones(3), jnp.ones(3))
    assert np.all(np.asarray(per) == np.float32(math.log(2)))  # bitwise, for any log-probs
    # the first training step: zero-delta adapter, online reference from the same frozen weights
    pairs, rows = _rows(tok, corpus)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    opt, sched = sft.make_optimizer(cfg, 10)
    state, frozen = sft.init_state(cfg, loaded.cfg, loaded.params, opt, mesh)
    step = jax.jit(dpo.make_dpo_step(cfg, loaded.cfg, opt, sched, online_ref=True))
    batch = {k: v[None] for k, v in rows.items()}
    _, m = step(state, frozen, batch)
    assert abs(float(m["loss"]) - math.log(2)) < 3e-7, float(m["loss"])  # log 2 up to fp32 rounding of the mean
    assert abs(float(m["reward_margin"])) < 1e-5 and float(m["pairs"]) == len(pairs)


# --- parity with TRL --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_side(tiny, tmp_path_factory):
    """A TRL DPOTrainer on the tiny model with a fresh PEFT adapter (reference = adapter off), B set non-zero."""
    import torch
    import transformers

    model, corpus, loaded, tok = tiny
    tmp = tmp_path_factory.mktemp("trl")
    rows = [json.loads(ln) for ln in (corpus / "dpo" / "train.jsonl").read_text().splitlines()][:5]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model))

    def trainer(loss_type, weights=None, swap=False, beta=0.3):
        import peft
        from datasets import Dataset
        from trl import DPOConfig as TRLConfig
        from trl import DPOTrainer

        data = [{"prompt": r["prompt"], "chosen": r["rejected" if swap else "chosen"],
                 "rejected": r["chosen" if swap else "rejected"]} for r in rows]
        args = TRLConfig(output_dir=str(tmp / "out"), beta=beta, loss_type=loss_type, loss_weights=weights,
                         max_length=None, report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=len(rows),
                         dataloader_num_workers=0, disable_tqdm=True)  # TRL defaults to bf16 autocast
        pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        tr = DPOTrainer(model=torch_model, args=args, train_dataset=Dataset.from_list(data), processing_class=hf_tok,
                        peft_config=pcfg)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        tr.model.eval()
        return tr

    def loss(tr, idx=None):
        idx = range(len(rows)) if idx is None else idx
        batch = tr.data_collator([tr.train_dataset[i] for i in idx])
        with torch.no_grad():
            return float(tr.compute_loss(tr.model, batch)), batch

    return trainer, loss, len(rows)


def _ours(tiny, adapter, n, cfg):
    model, corpus, loaded, tok = tiny
    pairs, rows = _rows(tok, corpus, max_length=256)
    keep = np.asarray(rows["pair_id"]) < n  # the same first n pairs as TRL, packed together
    rows = dict(rows, pair_valid=jnp.asarray(np.asarray(rows["pair_valid"]) * keep),
                comp_w=jnp.asarray(np.asarray(rows["comp_w"]) * np.take_along_axis(
                    keep, np.asarray(rows["comp_seq"]) // 2, axis=1)))
    pol = dpo.sequence_logps(loaded.params, loaded.cfg, rows, lora=adapter, lora_scale=2.0)
    ref = dpo.sequence_logps(loaded.params, loaded.cfg, rows)
    _, _, loss_fn = dpo.make_loss(cfg, loaded.cfg)
    n_pairs, n_chosen = dpo.totals(rows)
    loss, _ = loss_fn(adapter, loaded.params, rows, ref[:2], jax.random.PRNGKey(0), n_pairs, n_chosen)
    return float(loss), _by_pair(rows, pol[0], pol[1]), _by_pair(rows, ref[0], ref[1])


@pytest.mark.parametrize("loss_type,sets,trl_types,trl_weights", [
    ("sigmoid", [], ["sigmoid"], None),
    ("ipo", [], ["ipo"], None),
    ("hinge", [], ["hinge"], None),
    ("sigmoid+nll", ["nll_weight=0.7"], ["sigmoid", "sft"], [1.0, 0.7]),
    ("cdpo", ["label_smoothing=0.2"], None, None),
])
def test_parity_with_trl(tiny, trl_side, loss_type, sets, trl_types, trl_weights):
    model, corpus, loaded, tok = tiny
    make, trl_loss, n = trl_side
    kind = {"cdpo": "sigmoid", "sigmoid+nll": "sigmoid"}.get(loss_type, loss_type)
    cfg = _cfg(model, corpus, "beta=0.3", f"loss_type={kind}", *sets)
    tr = make(trl_types or ["sigmoid"], trl_weights)
    state = {k: v.detach().numpy() for k, v in tr.model.state_dict().items() if "lora_" in k}
    adapter = lora.from_peft_state(state, loaded.cfg.num_layers)
    ours, pol, ref = _ours(tiny, adapter, n, cfg)
    if loss_type == "cdpo":
        # TRL 1.16's "sigmoid" has no label smoothing; cDPO = (1-e)·sigmoid(pairs) + e·sigmoid(swapped pairs)
        want = 0.8 * trl_loss(tr)[0] + 0.2 * trl_loss(make(["sigmoid"], None, swap=True))[0]
    else:
        want, batch = trl_loss(tr)
        ref_c, ref_r = tr.compute_ref_log_probs(tr.model, batch)
        np.testing.assert_allclose([ref[i] for i in range(n)], np.stack([ref_c, ref_r], 1), rtol=1e-5, atol=1e-5)
    if loss_type == "sigmoid":  # per-sequence policy log-probs: TRL logs the batch means, so one pair at a time
        for i in range(n):
            tr._metrics["eval"].clear()
            trl_loss(tr, [i])
            m = tr._metrics["eval"]
            np.testing.assert_allclose(pol[i], (m["logps/chosen"][-1], m["logps/rejected"][-1]), rtol=1e-5, atol=1e-5)
    assert abs(ours - want) <= 1e-5 * max(1.0, abs(want)), (loss_type, ours, want)
    assert abs(want - math.log(2)) > 1e-3  # the adapter is really non-zero


# --- precomputed reference ---------------------------------------------------------------------------


def test_precomputed_reference_equals_online(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    cfg = _cfg(model, corpus, "precompute_ref=true", "batch_size=2")
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    sft = {n: {"a": p["a"], "b": 0.05 * jax.random.normal(jax.random.PRNGKey(i + 3), p["b"].shape)}
           for i, (n, p) in enumerate(lora.init_lora(loaded.cfg, jax.random.PRNGKey(4), 4, TARGETS).items())}
    ref_params = lora.merge_lora(loaded.params, sft, 2.0)  # a reference that differs from the base
    pairs, _ = dpo_data.load_pairs(tok, dpo_data.dpo_file(corpus), 64)
    K, S = dpo_data.budgets(pairs, 64, True)
    logs = []
    c, r = dpo.precompute_ref(cfg, loaded.cfg, ref_params, pairs, tmp_path, mesh, K, S, len(pairs), logs.append)
    assert "computed" in logs[-1] and len(list((tmp_path / "ref_logps").glob("*.npz"))) == 1
    c2, _ = dpo.precompute_ref(cfg, loaded.cfg, ref_params, pairs, tmp_path, mesh, K, S, len(pairs), logs.append)
    assert "cached" in logs[-1] and np.array_equal(c, c2)
    # a changed reference or corpus invalidates the cache
    dpo.precompute_ref(cfg, loaded.cfg, loaded.params, pairs, tmp_path, mesh, K, S, len(pairs), logs.append)
    assert "computed" in logs[-1]
    assert len(list((tmp_path / "ref_logps").glob("*.npz"))) == 1  # the stale entry was removed
    key = dpo.ref_cache_key(ref_params, pairs, cfg, loaded.cfg)
    assert dpo.ref_cache_key(ref_params, pairs[:-1], cfg, loaded.cfg) != key  # a changed corpus: another key

    # a shuffled training batch (other packing than the precompute pass) with a trained-looking adapter
    rows = {k: jnp.asarray(v) for k, v in dpo_data.epoch_rows(pairs, 64, K, S, seed=5, epoch=1).items()}
    ids = np.asarray(rows["pair_id"])
    pre = (jnp.asarray(np.where(ids >= 0, c[np.maximum(ids, 0)], 0)),
           jnp.asarray(np.where(ids >= 0, r[np.maximum(ids, 0)], 0)))
    ad = {n: {"a": p["a"], "b": 0.03 * jax.random.normal(jax.random.PRNGKey(i + 11), p["b"].shape)}
          for i, (n, p) in enumerate(lora.init_lora(loaded.cfg, jax.random.PRNGKey(5), 8, TARGETS).items())}
    for loss_type in ("sigmoid",):
        cfg_l = _cfg(model, corpus, f"loss_type={loss_type}", "nll_weight=0.5")
        _, ref_fn, loss_fn = dpo.make_loss(cfg_l, loaded.cfg)
        n_pairs, n_chosen = dpo.totals(rows)
        g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        online = ref_fn(ref_params, rows)
        np.testing.assert_allclose(np.asarray(online[0]), np.asarray(pre[0]), rtol=1e-6, atol=1e-6)
        (l_on, _), g_on = g(ad, ref_params, rows, online, jax.random.PRNGKey(0), n_pairs, n_chosen)
        (l_pre, _), g_pre = g(ad, ref_params, rows, pre, jax.random.PRNGKey(0), n_pairs, n_chosen)
        assert abs(float(l_on) - float(l_pre)) <= 1e-6, (float(l_on), float(l_pre))
        for x, y in zip(jax.tree_util.tree_leaves(g_on), jax.tree_util.tree_leaves(g_pre)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


# --- training ----------------------------------------------------------------------------------------


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_learns_preferences_on_tiny_model(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    small = write_pairs(tmp_path / "c", n=8, seed=5, lengths=(2, 6))
    out = dpo.run(_cfg(model, small, "steps=40", "mesh.data=1", "batch_size=2", "learning_rate=1e-2", "beta=0.5",
                     "lora.rank=16", "lora.alpha=32", "log_every=5", "precompute_ref=true"), tmp_path / "r",
                loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False, log=lambda s: None)
    m = _metrics(tmp_path / "r")
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(m[0])
    # reward accuracy and margin over all training pairs, before and after
    pairs, rows = _rows(tok, small)
    ad = jax.device_get(out["state"]["trainable"])
    ref = dpo.sequence_logps(loaded.params, loaded.cfg, rows)
    pol = dpo.sequence_logps(loaded.params, loaded.cfg, rows, lora=ad, lora_scale=2.0)
    valid = np.asarray(rows["pair_valid"]) > 0
    margin = 0.5 * ((np.asarray(pol[0]) - np.asarray(ref[0])) - (np.asarray(pol[1]) - np.asarray(ref[1])))[valid]
    assert (margin > 0).mean() > 0.9, margin
    assert margin.mean() > 1.0 and m[-1]["reward_margin"] > m[0]["reward_margin"] + 1.0, (m[0], m[-1])
    assert m[-1]["loss"] < 0.5 * m[0]["loss"]


def test_sharded_runs_match_single_device(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    assert jax.device_count() == 8
    sets = ["steps=3", "lora.dropout=0.1", "batch_size=8", "shuffle=true", "nll_weight=0.3"]
    ref = dpo.run(_cfg(model, corpus, *sets, "mesh.data=1"), tmp_path / "one", loaded=loaded, tokenizer=tok,
                devices=jax.devices()[:1], progress=False, log=lambda s: None)
    ref_m = _metrics(tmp_path / "one")
    assert len(ref_m) == 3 and all(0 < m["pairs"] for m in ref_m)
    ref_lora = jax.device_get(ref["state"]["trainable"])
    for mesh in [(8, 1, 1), (2, 2, 2)]:
        d = tmp_path / "x".join(map(str, mesh))
        out = dpo.run(_cfg(model, corpus, *sets, f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}",
                         f"mesh.tensor={mesh[2]}"), d, loaded=loaded, tokenizer=tok, progress=False,
                    log=lambda s: None)
        got_m = _metrics(d)
        for key in ("loss", "reward_margin", "reward_chosen", "grad_norm"):
            np.testing.assert_allclose([m[key] for m in got_m], [m[key] for m in ref_m], rtol=1e-5, atol=1e-5)
        # at step 1 (zero-delta adapter) the rewards are +-1e-7 rounding noise, so their signs are arbitrary
        assert [m["reward_accuracy"] for m in got_m[1:]] == [m["reward_accuracy"] for m in ref_m[1:]]
        for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(out["state"]["trainable"])),
                        jax.tree_util.tree_leaves(ref_lora)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        q = out["frozen"]["layers"]["q_proj"]["kernel"]
        assert len(q.sharding.device_set) == 8
        if mesh == (2, 2, 2):
            assert q.addressable_shards[0].data.shape[1:] == (q.shape[1] // 2, q.shape[2] // 2)
    info = json.loads((tmp_path / "one" / "run.json").read_text())
    assert info["kind"] == "lora" and info["dpo"]["beta"] == 0.1 and "parent_run" not in info


def test_sft_then_dpo_run_exports_merged(tiny, tmp_path):
    """`persllm train sft` then `persllm train dpo --from`: the DPO run.json chains to the SFT run, and the merged
    export's logits equal base + SFT delta + DPO delta."""
    import transformers
    from export_runs import hf_logits

    from persllm_jax.export import verify
    from persllm_jax.train import checkpoint

    model, corpus, loaded, tok = tiny
    sft_corpus = write_corpus(tmp_path / "sft_corpus", n=6, seed=3)
    common = ["--no-progress", "--set", "max_length=64", "--set", "batch_size=8", "--set", "mesh.data=-1",
              "--set", "peak_tflops=0.15", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "warmup_steps=0",
              "--set", "learning_rate=1e-2"]
    res = CliRunner().invoke(main, ["train", "sft", "--model", str(model), "--data", str(sft_corpus), "--out",
                                    str(tmp_path / "sft"), "--set", "steps=2"] + common)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", "dpo", "--from", str(tmp_path / "sft"), "--data", str(corpus), "--out",
                                    str(tmp_path / "dpo")] + common + ["--set", "steps=2", "--set", "lora.rank=2",
                                                                      "--set", "lora.targets=q_proj,down_proj"])
    assert res.exit_code == 0, res.output
    assert "reward accuracy" in res.output
    info = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert info["parent_run"] == str((tmp_path / "sft").resolve()) and info["parent_step"] == 2
    assert info["model_source"] == str(model) and info["stage"] == "dpo"
    assert set(info) >= {"model", "model_config", "kind", "lora", "data", "data_stats", "total_steps", "mesh"}

    sft_ad, _ = checkpoint.load_trained(tmp_path / "sft")
    dpo_ad, _ = checkpoint.load_trained(tmp_path / "dpo")
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(dpo_ad)) > 0
    res = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "dpo"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    batch = verify.probe_batch(tok, loaded.cfg, n_random=2)
    assert info["lora"]["rank"] == 2 and info["lora"]["scale"] == 4.0 and sorted(dpo_ad) == ["down_proj", "q_proj"]
    base_sft_dpo = lora.merge_lora(lora.merge_lora(loaded.params, sft_ad, 2.0), dpo_ad, 4.0)  # alpha 8 / r 4, 8 / r 2
    want = verify.logits_of(base_sft_dpo, loaded.cfg, batch)
    got = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")), batch)
    mask = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    only_sft = verify.logits_of(lora.merge_lora(loaded.params, sft_ad, 2.0), loaded.cfg, batch)
    assert np.abs(only_sft[mask] - want[mask]).max() > 1e-4  # the DPO delta is really in the export


def _cli(args):
    return CliRunner().invoke(main, args)


def test_bad_input_gives_clear_errors(tiny, tmp_path):
    model = str(tiny[0])
    corpus = tmp_path / "c"
    (corpus / "dpo").mkdir(parents=True)
    f = corpus / "dpo" / "train.jsonl"
    base = ["train", "dpo", "--model", model, "--data", str(corpus), "--no-progress"]
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]}

    def err(rows, *extra):
        f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        res = _cli(base + ["--out", str(tmp_path / f"r{random.random()}")] + list(extra))
        assert res.exit_code != 0
        lines = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
        assert len(lines) == 1, res.output
        return lines[0]

    assert f"{f}:2:13: invalid JSON" in err([good, '{"prompt": ['])
    assert f"{f}:2: missing or empty 'rejected'" in err([good, {**good, "rejected": []}])
    assert f"{f}:1: chosen[0] has unknown role 'bot'" in err([{**good, "chosen": [{"role": "bot", "content": "x"}]}])
    assert "no such file" in _cli(base[:4] + ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z")]).output
    line = err([good], "--set", "loss_type=kto")
    assert "loss_type" in line and "sigmoid, ipo, hinge" in line
    assert "unknown config key 'bta'" in err([good], "--set", "bta=0.1")
    assert "no such run directory" in err([good], "--from", str(tmp_path / "no_sft"))
    with pytest.raises(ConfigError):
        load_config(DPOConfig, overrides=["label_smoothing=0.5"])


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("dpo_*.yaml"))
    assert files
    for f in files:
        cfg = load_config(DPOConfig, path=f)
        assert cfg.beta > 0 and cfg.max_length >= 512
