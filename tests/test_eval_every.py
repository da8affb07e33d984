"""`eval_every`: SFT's eval_loss is the mean token NLL of the held-out conversations (checked against a direct
computation), a resumed run logs the same eval figures as an uninterrupted one; DPO's held-out loss and reward
accuracy (log 2 and 0 while the policy is the reference), its split deterministic by seed; no held-out data
is a one-line error."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import pytest
from click.testing import CliRunner

from chat_fixtures import corpus_with_test_split, tiny_model_dir
from persllm_jax.cli import main
from persllm_jax.model.weights import load_model, load_tokenizer
from persllm_jax.train import data as data_mod
from persllm_jax.train import dpo, sft
from persllm_jax.train.config import ConfigError, DPOConfig, TrainConfig, load_config
from test_dpo import write_pairs

BASE = ["max_length=64", "batch_size=2", "warmup_steps=0", "log_every=1", "lora.rank=4", "mesh.data=1",
        "shuffle=false", "peak_tflops=0.15"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalevery")
    model = tiny_model_dir(root / "model")
    corpus = corpus_with_test_split(root, 10, 5)
    write_pairs(corpus, n=10, seed=3)
    return model, corpus, load_model(str(model)), load_tokenizer(str(model))


def _run(tiny, trainer, cls, run_dir, *sets):
    model, corpus, loaded, tok = tiny
    cfg = load_config(cls, overrides=BASE + list(sets), base={"model": str(model), "data": str(corpus)})
    return trainer.run(cfg, run_dir, loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
                       log=lambda s: None)


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_eval_loss_is_held_out_mean_token_nll(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    _run(tiny, sft, TrainConfig, tmp_path / "run", "steps=3", "eval_steps=3", "learning_rate=0")  # TRL's name
    rows = _rows(tmp_path / "run")
    assert [("eval_loss" in r) for r in rows] == [False, False, True]
    examples, _ = data_mod.load_examples(tok, corpus / "sft" / "test.jsonl", 64)
    batch = {k: jnp.asarray(v) for k, v in data_mod.pack_rows(examples, 64, packing=False).items()}
    nll, n = sft.token_nll_sum(loaded.params, loaded.cfg, batch)  # lr 0: the adapter stays zero, policy == base
    assert rows[-1]["eval_loss"] == pytest.approx(float(nll / n), rel=1e-5)


def test_sft_eval_resumes_like_uninterrupted(tiny, tmp_path):
    sets = ("eval_every=2", "learning_rate=1e-2", "save_every=2")
    _run(tiny, sft, TrainConfig, tmp_path / "full", "steps=4", *sets)
    _run(tiny, sft, TrainConfig, tmp_path / "cut", "steps=4", *sets)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")  # as if killed after step 3: resumes from step 2
    _run(tiny, sft, TrainConfig, tmp_path / "cut", "steps=4", *sets)
    full = {r["step"]: r["eval_loss"] for r in _rows(tmp_path / "full") if "eval_loss" in r}
    cut = {r["step"]: r["eval_loss"] for r in _rows(tmp_path / "cut") if "eval_loss" in r}
    assert sorted(full) == [2, 4] and full[2] > full[4]
    assert cut == pytest.approx(full, rel=1e-5)
    assert [r["step"] for r in _rows(tmp_path / "cut")] == [1, 2, 3, 4]  # the rows after step 2 logged once
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "full"), "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["loss.png", "lr.png"]
    assert (tmp_path / "png" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["plot", str(empty)])
    assert result.exit_code == 1 and "no training metrics to plot" in result.output


def test_sft_eval_without_held_out_data_is_an_error(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    cfg = load_config(TrainConfig, overrides=BASE + ["steps=1", "eval_every=1"],
                      base={"model": str(model), "data": str(corpus / "sft" / "train.jsonl")})
    with pytest.raises(ConfigError, match="eval_every=1: no held-out data") as e:
        sft.run(cfg, tmp_path / "run", loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
                log=lambda s: None)
    assert "\n" not in str(e.value)


def test_dpo_held_out_loss_and_reward_accuracy(tiny, tmp_path):
    _run(tiny, dpo, DPOConfig, tmp_path / "still", "steps=2", "eval_every=2", "learning_rate=0")
    last = _rows(tmp_path / "still")[-1]
    assert last["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: Δ = 0
    assert last["eval_reward_accuracy"] == 0.0 and last["eval_reward_margin"] == pytest.approx(0, abs=1e-5)
    _run(tiny, dpo, DPOConfig, tmp_path / "learn", "steps=6", "eval_every=3", "learning_rate=5e-2",
         "eval_fraction=0.3", "precompute_ref=true")
    rows = [r for r in _rows(tmp_path / "learn") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [3, 6]
    assert rows[-1]["eval_loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert 0.0 <= rows[-1]["eval_reward_accuracy"] <= 1.0


def test_dpo_split_is_deterministic_by_seed(tiny):
    model, corpus, loaded, tok = tiny
    pairs, _ = dpo.load_pairs(tok, corpus / "dpo" / "train.jsonl", 64)
    train, held = dpo.split_pairs(pairs, 0.3, seed=0)
    again = dpo.split_pairs(pairs, 0.3, seed=0)[1]
    other = dpo.split_pairs(pairs, 0.3, seed=1)[1]
    assert len(held) == 3 and len(train) == 7
    assert [p.index for p in held] == [p.index for p in again] != [p.index for p in other]
    assert not {p.index for p in held} & {p.index for p in train}


def test_dpo_uses_the_corpus_test_split(tiny, tmp_path):
    model, corpus, loaded, tok = tiny
    own = tmp_path / "corpus"
    shutil.copytree(corpus, own)
    shutil.copy(own / "dpo" / "train.jsonl", own / "dpo" / "test.jsonl")
    logs = []
    cfg = load_config(DPOConfig, overrides=BASE + ["steps=1", "eval_every=1"], base={"model": str(model), "data": str(own)})
    dpo.run(cfg, tmp_path / "run", loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
            log=logs.append)
    assert any("eval: 10 held-out pairs" in s and "test.jsonl" in s for s in logs), logs
    assert "eval_reward_accuracy" in _rows(tmp_path / "run")[-1]
