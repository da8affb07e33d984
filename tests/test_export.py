"""Export: merged HF directories and PEFT adapters reload in transformers / PEFT with our logits (1e-4) and our
greedy tokens, for every architecture, after SFT and after SFT -> DPO; round trips are bitwise; bf16 stays within
bf16 tolerance; a corrupted export is refused and nothing appears at OUT; bad input fails with one clear line."""

import json

import jax
import numpy as np
import pytest
import torch
from chat_fixtures import tiny_model_dir, write_corpus
from click.testing import CliRunner
from export_runs import hf_logits, max_diff, random_adapter, write_run

from persllm_jax import runs
from persllm_jax.cli import main
from persllm_jax.export import ExportError, driver, hf_state, verify
from persllm_jax.io import jnp_dtype
from persllm_jax.model.weights import load_model, load_tokenizer
from persllm_jax.serve.engine import Generator, SamplingParams

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "smollm2")
TOL = 1e-4


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _cli(*args, env=None):
    return CliRunner().invoke(main, ["export", *map(str, args)], env=env)


def _greedy_ours(chain, prompts, n=10):
    last = chain.last
    params = runs.merged_params(chain, len(chain.stages) - 1) if last.kind == "lora" else runs.merged_params(chain)
    gen = Generator(chain.base.cfg, params, lora=last.weights if last.kind == "lora" else None,
                    lora_scale=last.scale or 1.0, eos_token_ids=(-1,))
    return [c.token_ids for c in gen.generate_ids(prompts, SamplingParams(max_new_tokens=n))]


def _greedy_fixed(chain, prompt, n, shape):
    """Our greedy tokens without a new compile: the prompt is row 0 of a batch of the probe batch's `shape`
    (causal attention, so the padding after the last real token never changes its logits)."""
    toks = np.zeros(shape, np.int32)
    toks[0, :len(prompt)] = prompt
    batch = {"tokens": toks, "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
             "segment_ids": np.ones(shape, np.int32)}
    out = []
    for i in range(len(prompt), len(prompt) + n):
        nxt = int(verify.our_model_logits(chain, batch)[0, i - 1].argmax())
        toks[0, i] = nxt
        out.append(nxt)
    return out


def _greedy_hf(model, prompts, n=10):
    outs = []
    for p in prompts:
        with torch.no_grad():
            o = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        outs.append(o[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A real short SFT run (trainer API, 3 steps) on a tiny Llama with a chat tokenizer."""
    from persllm_jax.train import sft
    from persllm_jax.train.config import load_config

    root = tmp_path_factory.mktemp("sft")
    model = tiny_model_dir(root / "model")
    corpus = write_corpus(root / "corpus", n=12, seed=3)
    (corpus / "manifest.json").write_text(json.dumps({
        "personas": {"harry": {"name": "Harry Potter", "language": "en",
                               "stages": [{"id": "y1", "label": "first year"}, {"id": "y7", "label": "seventh year"}]}},
        "counts": {"harry": {"y1": {"train": {"ordinary": 5, "thought": 2}, "test": {"ordinary": 1}, "dpo": {"error": 3}},
                             "y7": {"train": {"ordinary": 5}, "test": {}, "dpo": {}}}},
        "totals": {"sft_train": 12, "sft_test": 1, "sft_train_rows": 12, "general_rows": 0, "dpo": 3, "rejected": 0}}))
    cfg = load_config(overrides=["max_length=64", "batch_size=4", "learning_rate=2e-2", "warmup_steps=0", "steps=3",
                                 "lora.rank=4", "lora.alpha=8", "mesh.data=1", "peak_tflops=0.15", "log_every=1"],
                      base={"model": str(model), "data": str(corpus)})
    sft.run(cfg, root / "run", devices=jax.devices()[:1], progress=False, log=lambda s: None)
    (root / "run" / "eval.json").write_text(json.dumps({"distinction": {"bleu_inter": 0.125}, "anti_induction": 0.8}))
    return root, model, root / "run"


def test_sft_merged_and_peft_reload_in_transformers_and_peft(sft, tmp_path):
    from peft import PeftModel

    _, model, run = sft
    res = _cli("--run", run, "--out", tmp_path / "merged", "--format", "merged", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    assert "max |logit diff|" in res.output
    out = tmp_path / "merged"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    chain = runs.load_chain(run)
    assert chain.stages[0].step == 3 and chain.stages[0].kind == "lora"
    tok = load_tokenizer(str(out))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    batch = verify.probe_batch(tok, chain.base.cfg)
    ours = verify.our_model_logits(chain, batch)
    hf = _hf(out)
    assert max_diff(ours, hf_logits(hf, batch), batch["segment_ids"]) <= TOL
    assert np.abs(ours - verify.logits_of(chain.base.params, chain.base.cfg, batch)).max() > 1e-3  # training moved it
    prompts = [tok.apply_chat_template([{"role": "user", "content": "who are you ?"}], add_generation_prompt=True),
               [5, 9, 17, 33]]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    assert _greedy_ours(chain, prompts) == _greedy_hf(hf, prompts)

    card = (out / "README.md").read_text()
    for s in ("Harry Potter", "first year", "seventh year", "LoRA r=4", "learning_rate=0.02", "bleu_inter",
              "anti_induction", "| Harry Potter | y1 | first year | 7 | 1 | 3 |", "library_name: transformers"):
        assert s in card, s

    res = _cli("--run", run, "--out", tmp_path / "peft", "--format", "peft")
    assert res.exit_code == 0, res.output
    acfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert acfg["r"] == 4 and acfg["lora_alpha"] == 8 and acfg["peft_type"] == "LORA"
    pm = PeftModel.from_pretrained(_hf(model), str(tmp_path / "peft")).eval()
    assert max_diff(ours, hf_logits(pm, batch), batch["segment_ids"]) <= TOL


def test_sft_then_dpo_chain_merged_and_stacked_peft(sft, tmp_path):
    from peft import PeftModel

    _, model, run = sft
    base = load_model(str(model))
    dpo_ad = random_adapter(base.cfg, 2, targets=["q_proj", "v_proj", "down_proj"], seed=7, b_std=0.1)
    dpo = write_run(tmp_path / "dpo", model, dpo_ad, alpha=6.0, step=4, parent=run, parent_step=3)
    chain = runs.load_chain(dpo)
    assert [s.kind for s in chain.stages] == ["lora", "lora"] and chain.stages[0].run_dir == run
    tok = load_tokenizer(str(model))
    batch = verify.probe_batch(tok, base.cfg)
    ours = verify.our_model_logits(chain, batch)
    sft_only = verify.our_model_logits(runs.load_chain(run), batch)
    assert np.abs(ours - sft_only).max() > 1e-3  # the DPO adapter matters

    assert _cli("--run", dpo, "--out", tmp_path / "m").exit_code == 0
    assert max_diff(ours, hf_logits(_hf(tmp_path / "m"), batch), batch["segment_ids"]) <= TOL
    assert "DPO" in (tmp_path / "m" / "README.md").read_text()

    res = _cli("--run", dpo, "--out", tmp_path / "p", "--format", "peft")
    assert res.exit_code == 0, res.output
    acfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert acfg["r"] == 4 + 2 and acfg["lora_alpha"] == 6  # stacked, scaling folded into B
    pm = PeftModel.from_pretrained(_hf(model), str(tmp_path / "p")).eval()
    assert max_diff(ours, hf_logits(pm, batch), batch["segment_ids"]) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_merged_and_peft(arch, tmp_path):
    from peft import PeftModel

    model = tiny_model_dir(tmp_path / "model", arch=arch)
    base = load_model(str(model))
    ad = random_adapter(base.cfg, 4, seed=ARCHS.index(arch))
    run = write_run(tmp_path / "run", model, ad, alpha=8.0)
    driver.export(run, tmp_path / "merged", "merged", "float32", log=lambda s: None)
    driver.export(run, tmp_path / "peft", "peft", "float32", log=lambda s: None)
    chain = runs.load_chain(run)
    batch = verify.probe_batch(load_tokenizer(str(model)), base.cfg)
    ours = verify.our_model_logits(chain, batch)
    hf = _hf(tmp_path / "merged")
    assert type(hf).__name__ == json.loads((model / "config.json").read_text())["architectures"][0]
    assert max_diff(ours, hf_logits(hf, batch), batch["segment_ids"]) <= TOL
    pm = PeftModel.from_pretrained(_hf(model), str(tmp_path / "peft")).eval()
    assert max_diff(ours, hf_logits(pm, batch), batch["segment_ids"]) <= TOL
    prompt = [4, 9, 17, 33, 60, 2, 11]
    n = min(8, batch["tokens"].shape[1] - len(prompt))
    assert n >= 6
    assert _greedy_fixed(chain, prompt, n, batch["tokens"].shape) == _greedy_hf(hf, [prompt], n)[0]


def _tensors(path):
    return hf_state.read_safetensors_dir(path)


@pytest.mark.parametrize("src_dtype", ["float32", "bfloat16"])
def test_round_trip_without_training_is_bitwise(src_dtype, tmp_path):
    """HF dir -> our params -> export (also through the command, with a zero adapter) -> the same tensors."""
    model = tiny_model_dir(tmp_path / "model", arch="qwen2")
    if src_dtype == "bfloat16":
        _hf(model).to(torch.bfloat16).save_pretrained(str(model))
    src = _tensors(model)
    loaded = load_model(str(model))
    state = hf_state.hf_state_from_params(loaded.cfg, loaded.params, jnp_dtype(src_dtype))
    assert sorted(state) == sorted(src)
    for k in src:
        assert state[k].dtype == src[k].dtype and np.array_equal(state[k], src[k]), k

    zero = {n: {"a": p["a"], "b": p["b"] * 0} for n, p in random_adapter(loaded.cfg, 2).items()}
    run = write_run(tmp_path / "run", model, zero)
    res = _cli("--run", run, "--out", tmp_path / "out", "--max-shard-size", "20KB")  # dtype defaults to the base's
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and all(s.stat().st_size < 20_000 + 40_000 for s in shards)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(src)
    out = _tensors(tmp_path / "out")
    for k in src:
        assert out[k].dtype == src[k].dtype and np.array_equal(out[k], src[k]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == src_dtype
    _hf(tmp_path / "out")  # transformers reads the sharded directory


def test_bfloat16_export_matches_within_bf16_tolerance(sft, tmp_path):
    from peft import PeftModel

    _, model, run = sft
    chain = runs.load_chain(run)
    batch = verify.probe_batch(load_tokenizer(str(model)), chain.base.cfg)
    ours = verify.our_model_logits(chain, batch)
    r = driver.export(run, tmp_path / "m", "merged", "bfloat16", log=lambda s: None)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype.name == "bfloat16" for v in _tensors(tmp_path / "m").values())
    hf = _hf(tmp_path / "m", dtype=torch.bfloat16)
    got = hf_logits(hf, batch)
    st = verify.compare(ours, got, batch["segment_ids"])
    assert st["max_abs_diff"] <= 0.05 * max(1.0, st["logit_scale"]) and st["mean_kl"] <= 1e-3, st
    assert r.checks["export_vs_ours"]["mean_kl"] <= 1e-3
    driver.export(run, tmp_path / "p", "peft", "bfloat16", log=lambda s: None)
    pm = PeftModel.from_pretrained(_hf(model), str(tmp_path / "p")).eval()
    st = verify.compare(ours, hf_logits(pm, batch), batch["segment_ids"])
    assert st["max_abs_diff"] <= 1e-2 * max(1.0, st["logit_scale"]), st


def _flip_tensor(tmp):
    from safetensors.numpy import load_file, save_file

    f = tmp / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] += 0.5
    save_file(state, str(f), metadata={"format": "pt"})


def _bad_rope(tmp):
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 10.0
    (tmp / "config.json").write_text(json.dumps(cfg))


def _bad_alpha(tmp):
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (tmp / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("fmt,tamper,msg", [("merged", _flip_tensor, "tensors read back differ"),
                                            ("merged", _bad_rope, "differ from ours"),
                                            ("peft", _bad_alpha, "differ from ours")])
def test_corrupted_export_is_refused_and_nothing_written(sft, tmp_path, fmt, tamper, msg, monkeypatch):
    _, _, run = sft
    real = hf_state.save_tokenizer

    def save_then_tamper(spec, out_dir):  # the last file either format writes before verification
        tok = real(spec, out_dir)
        tamper(out_dir)
        return tok

    monkeypatch.setattr(hf_state, "save_tokenizer", save_then_tamper)
    with pytest.raises(ExportError, match=msg):
        driver.export(run, tmp_path / "out", fmt, "float32", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_export_through_the_command_exits_nonzero(sft, tmp_path, monkeypatch):
    _, _, run = sft
    real = hf_state.hf_state_from_params

    def corrupt(cfg, params, dtype):
        state = real(cfg, params, dtype)
        state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"] * 1.01
        return state

    monkeypatch.setattr(hf_state, "hf_state_from_params", corrupt)
    res = _cli("--run", run, "--out", tmp_path / "out")
    assert res.exit_code != 0 and "verification failed" in res.output and "nothing was written" in res.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_full_fine_tuning_run_exports_merged_only(tmp_path):
    model = tiny_model_dir(tmp_path / "model", arch="qwen3")
    base = load_model(str(model))
    params = jax.tree_util.tree_map(lambda x: x * 1.01, base.params)
    run = write_run(tmp_path / "run", model, params, kind="params", step=2)
    assert _cli("--run", run, "--out", tmp_path / "m").exit_code == 0
    batch = verify.probe_batch(None, base.cfg)
    got = hf_logits(_hf(tmp_path / "m"), batch)
    assert max_diff(verify.logits_of(params, base.cfg, batch), got, batch["segment_ids"]) <= TOL
    res = _cli("--run", run, "--out", tmp_path / "p", "--format", "peft")
    assert res.exit_code != 0 and "full fine-tuning run has no adapter" in res.output


def test_bad_input_gives_one_line_errors(sft, tmp_path):
    _, model, run = sft
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"model": str(model), "kind": "lora"}))
    (tmp_path / "exists").mkdir()
    cases = [
        (["--run", tmp_path / "nope", "--out", tmp_path / "o"], "no such run directory"),
        (["--run", tmp_path / "exists", "--out", tmp_path / "o"], "no run.json"),
        (["--run", empty, "--out", tmp_path / "o"], "no checkpoint"),
        (["--run", run, "--out", tmp_path / "o", "--step", "2"], "no checkpoint at step 2; available: 3"),
        (["--run", run, "--out", tmp_path / "exists"], "already exists (pass --overwrite"),
        (["--run", run, "--out", tmp_path / "o", "--dry-run"], "go with --push-to-hub"),
        (["--run", run, "--out", tmp_path / "o", "--push-to-hub", "not a repo"], "expected ORG/NAME"),
        (["--run", run, "--out", tmp_path / "o", "--max-shard-size", "lots"], "bad size"),
        (["--run", run, "--out", tmp_path / "o", "--push-to-hub", "me/x"], "HF_TOKEN"),
    ]
    for args, msg in cases:
        res = _cli(*args, env={"HF_TOKEN": ""})
        assert res.exit_code != 0, args
        assert msg in res.output, (args, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2, res.output
    assert not (tmp_path / "o").exists()
    assert _cli("--run", run, "--out", tmp_path / "exists", "--overwrite").exit_code == 0
    assert (tmp_path / "exists" / "model.safetensors").is_file()


def test_gguf_base_exports_as_a_normal_hf_directory(tmp_path):
    """The embedded SmolLM2 (Q4_1 GGUF) with an adapter -> a plain HF directory transformers loads, with the
    tokenizer and chat template saved by save_pretrained; logits match ours."""
    base = load_model("smollm2")
    ad = random_adapter(base.cfg, 2, targets=["q_proj", "v_proj"], seed=5, b_std=0.02)
    run = write_run(tmp_path / "run", "smollm2", ad, alpha=4.0)
    res = _cli("--run", run, "--out", tmp_path / "out", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert not list(out.glob("*.gguf"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"  # torch_dtype: what transformers < 4.56 reads
    # the GGUF-converted tokenizer is saved under a class transformers 4.x also has (5.x writes TokenizersBackend)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == base.cfg.eos_token_ids[0]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "README.md").read_text()
    tok, ref_tok = load_tokenizer(str(out)), load_tokenizer("smollm2")
    msgs = [{"role": "system", "content": "You are Ada Lovelace."}, {"role": "user", "content": "Hello?"}]
    assert tok.chat_template == ref_tok.chat_template
    assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)
    chain = runs.load_chain(run)
    batch = verify.probe_batch(tok, base.cfg)
    ours = verify.our_model_logits(chain, batch)
    st = verify.compare(ours, hf_logits(_hf(out), batch), batch["segment_ids"])
    assert st["max_abs_diff"] <= TOL * max(1.0, st["logit_scale"]) and st["top1_agree"] == 1.0, st


def test_step_selects_the_checkpoint(sft, tmp_path):
    from persllm_jax.export.peft import read_adapter

    _, model, _ = sft
    cfg = load_model(str(model)).cfg
    early, late = random_adapter(cfg, 2, seed=11), random_adapter(cfg, 2, seed=12)
    write_run(tmp_path / "run", model, early, alpha=4.0, step=2)
    write_run(tmp_path / "run", model, late, alpha=4.0, step=5)
    for step, want in ((None, late), (2, early)):
        out = tmp_path / f"out{step}"
        args = ["--run", tmp_path / "run", "--out", out, "--format", "peft"] + (["--step", step] if step else [])
        assert _cli(*args).exit_code == 0
        got, scale = read_adapter(out, cfg.num_layers)
        assert scale == 2.0
        for n in want:
            np.testing.assert_array_equal(np.asarray(got[n]["b"]), np.asarray(want[n]["b"]))


def test_talk_pool_serves_a_dpo_run_over_its_sft_parent(sft, tmp_path):
    """chat/serve/simulate --run on a DPO run apply base + SFT + DPO (one stacked adapter), as the export does."""
    from persllm_jax.serve.personas import ModelPool

    _, model, run = sft
    base = load_model(str(model))
    dpo_ad = random_adapter(base.cfg, 2, targets=["q_proj", "v_proj", "down_proj"], seed=7, b_std=0.1)
    dpo = write_run(tmp_path / "dpo", model, dpo_ad, alpha=6.0, step=4, parent=run, parent_step=3)
    chain = runs.load_chain(dpo)
    prompts = [[5, 9, 13, 2, 7], [3, 4]]
    merged = Generator(chain.base.cfg, runs.merged_params(chain))
    served, _ = ModelPool().run(dpo)
    sft_only, _ = ModelPool().run(run)
    for g in (merged, served, sft_only):
        g.eos_token_ids = ()
    greedy = lambda g: [c.token_ids for c in g.generate_ids(prompts, SamplingParams(max_new_tokens=12))]  # noqa: E731
    assert greedy(served) == greedy(merged)
    assert greedy(sft_only) != greedy(merged)  # the DPO adapter matters
