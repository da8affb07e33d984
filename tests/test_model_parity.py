"""Our fp32 logits and greedy tokens against transformers on tiny random models of every architecture."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import ARCHS, save_tiny

from persllm_jax.model import decoder
from persllm_jax.model.weights import load_model


def _batch(vocab, lengths, total, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(len(lengths), total))
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return tokens * mask, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path):
    hf = save_tiny(arch, tmp_path)
    loaded = load_model(str(tmp_path))
    tokens, mask = _batch(loaded.cfg.vocab_size, [17, 11, 5], 17)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(decoder.forward(loaded.params, loaded.cfg, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: sliding window across blocks
def test_long_rows_blocked_attention_match_transformers(arch, tmp_path):
    """Rows longer than two query blocks (model.ATTN_BLOCK), one ending mid-block, one short: the blocked
    training attention agrees with transformers (fp32 noise over 300 positions: relative 2e-5)."""
    hf = save_tiny(arch, tmp_path)
    loaded = load_model(str(tmp_path))
    n = 2 * decoder.ATTN_BLOCK + 44
    tokens, mask = _batch(loaded.cfg.vocab_size, [n, n - 89, 5], n)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(decoder.forward(loaded.params, loaded.cfg, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 2e-5 * np.abs(ref[valid]).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_forward_matches_full(arch, tmp_path):
    save_tiny(arch, tmp_path)
    loaded = load_model(str(tmp_path))
    cfg, params = loaded.cfg, loaded.params
    unstacked = {**params, "layers": decoder.unstack_layers(params["layers"], cfg.num_layers)}
    tokens, mask = _batch(cfg.vocab_size, [12, 12], 12, seed=1)
    pos = np.broadcast_to(np.arange(12), (2, 12))
    full = np.asarray(decoder.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(mask)))
    cache = decoder.init_cache(cfg, 2, 16)
    logits, cache = decoder.forward_cached(unstacked, cfg, jnp.asarray(tokens[:, :8]), jnp.asarray(pos[:, :8]),
                                     jnp.asarray(mask[:, :8]), cache, last_only=False)
    steps = [np.asarray(logits)]
    for t in range(8, 12):
        logit, cache = decoder.forward_cached(unstacked, cfg, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]),
                                        jnp.asarray(mask[:, t:t + 1]), cache)
        steps.append(np.asarray(logit)[:, None])
    assert np.abs(np.concatenate(steps, 1) - full).max() <= 1e-4
