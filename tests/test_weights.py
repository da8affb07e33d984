"""Weight import: sharded safetensors, bf16, clear errors; the embedded SmolLM2 GGUF against transformers."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import save_tiny

from persllm_jax.model import decoder
from persllm_jax.model.config import ModelConfigError
from persllm_jax.model.weights import (
    WeightsError,
    embedded_model_path,
    gguf_cache_dir,
    load_model,
    load_tokenizer,
)


def _logits(loaded, tokens, dtype=jnp.float32):
    tokens = jnp.asarray(tokens)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(decoder.forward(loaded.params, loaded.cfg, tokens, pos, jnp.ones_like(tokens), dtype=dtype))


def test_sharded_safetensors_equal_single_file(tmp_path):
    hf = save_tiny("qwen2", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    tokens = np.arange(3, 19)[None]
    np.testing.assert_array_equal(_logits(load_model(str(tmp_path / "single")), tokens),
                                  _logits(load_model(str(tmp_path / "sharded")), tokens))


def test_bf16_params_and_compute_stay_close_to_fp32(tmp_path):
    save_tiny("llama", tmp_path, initializer_range=0.05)
    tokens = np.arange(3, 19)[None]
    ref = _logits(load_model(str(tmp_path)), tokens)
    loaded = load_model(str(tmp_path), dtype=jnp.bfloat16)
    assert loaded.params["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    ours = _logits(loaded, tokens, dtype=jnp.bfloat16)
    assert ours.dtype == np.float32  # logits always in fp32
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_unsupported_model_type_is_named(tmp_path):
    save_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"gpt_neox.*llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path))


def test_missing_tensor_and_pickle_only_checkpoints_are_refused(tmp_path):
    save_tiny("llama", tmp_path)
    from safetensors.numpy import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="pickle"):
        load_model(str(tmp_path))
    with pytest.raises(WeightsError, match="no such file"):
        load_model(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def test_smollm2_gguf_matches_transformers_kl(smollm2_hf):
    loaded = load_model("smollm2")
    assert loaded.cfg.num_layers == 30 and loaded.cfg.tie_word_embeddings
    # The first load converted the GGUF into the cache; the second reads it back unchanged.
    assert (gguf_cache_dir(embedded_model_path()) / "model.safetensors").is_file()
    again = load_model("smollm2")
    assert again.source == loaded.source and again.cfg == loaded.cfg
    np.testing.assert_array_equal(np.asarray(again.params["layers"]["k_proj"]["kernel"]),
                                  np.asarray(loaded.params["layers"]["k_proj"]["kernel"]))
    tok = load_tokenizer("smollm2")
    messages = [{"role": "system", "content": "You are Ada Lovelace. Now it's 1843."},
                {"role": "user", "content": "What do you think the Analytical Engine could do beyond numbers?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(smollm2_hf(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
    ours = _logits(loaded, np.array([ids]))[0].astype(np.float64)
    ours = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = (np.exp(ref) * (ref - ours)).sum(-1)  # KL(transformers || ours) per position
    assert len(ids) > 40 and kl.max() <= 1e-4


def test_generate_cli_answers_hamlet():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "persllm_jax", "generate", "--prompt", "Who wrote Hamlet?",
                          "--max-new-tokens", "48"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Shakespeare" in out.stdout
    assert out.stdout.strip().isascii() and len(out.stdout.split()) >= 4


def test_generate_cli_bad_model_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "persllm_jax", "generate", "--model", str(tmp_path / "missing"),
                          "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no such file or directory" in out.stderr and "Traceback" not in out.stderr


def test_gguf_tokenizer_equals_transformers_own(tmp_path, monkeypatch):
    """Our torch-free GGUF tokenizer conversion gives the tokens and chat template transformers gives."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("PERSLLM_CACHE", str(tmp_path))
    path = embedded_model_path()
    ours = load_tokenizer("smollm2")
    assert (gguf_cache_dir(path) / "tokenizer_config.json").is_file()
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    messages = [{"role": "user", "content": "Ça va? Who wrote Hamlet?\n  1843 — numbers & «symbols» 🙂"},
                {"role": "assistant", "content": "[Analysis] A question. [Response] Shakespeare did."}]
    for kw in ({"add_generation_prompt": False}, {"add_generation_prompt": True}):
        a = ours.apply_chat_template(messages, tokenize=False, **kw)
        assert a == theirs.apply_chat_template(messages, tokenize=False, **kw)
        assert ours(a, add_special_tokens=False)["input_ids"] == theirs(a, add_special_tokens=False)["input_ids"]
    assert (ours.eos_token, ours.bos_token, ours.pad_token) == (theirs.eos_token, theirs.bos_token, theirs.pad_token)
    assert ours("Hello world")["input_ids"] == theirs("Hello world")["input_ids"]
