"""Continuation log-likelihoods from the generation engine equal transformers' on the same tokens (batched, with
left-padded prompts and right-padded continuations of different lengths), and, with a LoRA adapter, a full
forward pass with that adapter (itself checked against PEFT in test_lora)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from persllm_jax.model.decoder import forward
from persllm_jax.model.weights import load_model
from persllm_jax.serve.engine import Generator
from persllm_jax.serve.scoring import continuation_logprobs
from tiny import save_tiny


def _hf_logprob(hf, prompt, cont):
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
    return sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont))


def _random_tokens(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 131, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_continuation_logprobs_match_transformers(arch, tmp_path):
    hf = save_tiny(arch, tmp_path)
    loaded = load_model(str(tmp_path))
    gen = Generator(loaded.cfg, loaded.params)
    prompts, conts = _random_tokens(0, (5, 17, 9)), _random_tokens(1, (3, 1, 11))
    total, count = continuation_logprobs(gen, prompts, conts, batch_size=2)
    ref = [_hf_logprob(hf, p, c) for p, c in zip(prompts, conts)]
    np.testing.assert_allclose(total, ref, rtol=1e-4, atol=1e-4)
    assert count.tolist() == [3, 1, 11]
    # a batch of one gives the same numbers as the batch (no leakage between rows)
    one, _ = continuation_logprobs(gen, prompts[2:], conts[2:])
    np.testing.assert_allclose(one, total[2:], rtol=1e-5, atol=1e-5)
    # a prompt shared by several continuations is prefilled once (a group of 4 split over batches of 3, beside
    # other prompts): the same numbers as transformers on each whole sequence
    shared_p = [prompts[0]] * 4 + [prompts[1], prompts[2], prompts[1]]
    shared_c = _random_tokens(4, (2, 7, 1, 12, 4, 3, 9))
    got, _ = continuation_logprobs(gen, shared_p, shared_c, batch_size=3)
    np.testing.assert_allclose(got, [_hf_logprob(hf, p, c) for p, c in zip(shared_p, shared_c)], rtol=1e-4, atol=1e-4)


def test_continuation_logprobs_with_an_adapter_match_a_full_forward(tmp_path):
    save_tiny("qwen2", tmp_path)
    loaded = load_model(str(tmp_path))
    cfg = loaded.cfg
    shapes = {"q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim), "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    keys = iter(jax.random.split(jax.random.key(0), 4))
    lora = {n: {"a": 0.5 * jax.random.normal(next(keys), (cfg.num_layers, i, 4)),
                "b": 0.5 * jax.random.normal(next(keys), (cfg.num_layers, 4, o))} for n, (i, o) in shapes.items()}
    base = Generator(cfg, loaded.params)
    tuned = base.with_adapter(lora, 2.0)
    prompts, conts = _random_tokens(2, (6, 13)), _random_tokens(3, (7, 2))
    total, _ = continuation_logprobs(tuned, prompts, conts, batch_size=2)
    want = []
    for p, c in zip(prompts, conts):
        seq = jnp.asarray([p + c])
        logits = forward(loaded.params, cfg, seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq), lora=lora,
                         lora_scale=2.0)
        lp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), -1), np.float64)
        want.append(sum(lp[len(p) - 1 + t, tok] for t, tok in enumerate(c)))
    np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-4)
    untuned, _ = continuation_logprobs(base, prompts, conts, batch_size=2)
    assert np.abs(untuned - total).max() > 1e-2  # the adapter is in play
