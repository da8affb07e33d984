"""The chunked, custom-VJP token log-probs (persllm_jax/train/loss.py) against the plain full-logits loss: values and
gradients to 1e-5 in fp32; and SFT's trained-position gather against the loss over every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax.model import decoder
from persllm_jax.model.config import ModelConfig
from persllm_jax.train import loss, sft


def _full_logps(h, w, targets):  # the pre-issue-18 loss: [B, N, V] fp32 logits, autodiff
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - jax.nn.logsumexp(logits, -1)


@pytest.mark.parametrize("n", [37, 300])  # one partial chunk; several chunks and a partial one
def test_token_logps_match_full_logits(n, monkeypatch):
    monkeypatch.setattr(loss, "CHUNK", 64)  # 3 rows -> 21 tokens per chunk
    kh, kw, kt, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    h, w = jax.random.normal(kh, (3, n, 24)), 0.3 * jax.random.normal(kw, (24, 97))
    targets, g = jax.random.randint(kt, (3, n), 0, 97), jax.random.normal(kg, (3, n))
    np.testing.assert_allclose(loss.token_logps(h, w, targets), _full_logps(h, w, targets), atol=1e-5, rtol=0)
    f = lambda fn: jax.grad(lambda h, w: jnp.sum(fn(h, w, targets) * g), argnums=(0, 1))(h, w)  # noqa: E731
    # w frozen (LoRA): the forward pass saves d logp / dh instead of recomputing the logits
    f_h = lambda fn: jax.grad(lambda h: jnp.sum(fn(h, w, targets) * g))(h)  # noqa: E731
    for a, b in zip(f(loss.token_logps) + (f_h(loss.token_logps),), f(_full_logps) + (f_h(_full_logps),)):
        assert float(jnp.abs(b).max()) > 1e-2
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_sft_loss_trained_positions_only_equals_old_loss():
    """token_nll_sum with the trained-position gather and chunked CE = the old full-logits loss, value and
    LoRA-free gradients w.r.t. all weights (tied embeddings: the projection's gradient flows too)."""
    cfg = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    params = decoder.init_params(cfg, jax.random.PRNGKey(1), std=0.2)
    rng = np.random.default_rng(0)
    B, Tn = 2, 150
    seg = np.zeros((B, Tn), np.int32)
    seg[0, :70], seg[0, 70:140], seg[1, :150] = 1, 2, 1
    pos = np.where(seg[0] == 2, np.arange(Tn) - 70, np.arange(Tn))[None].repeat(B, 0) * (seg > 0)
    weights = ((rng.random((B, Tn)) < 0.5) & (seg > 0)).astype(np.float32)
    batch = {"tokens": jnp.asarray(rng.integers(1, 61, (B, Tn)) * (seg > 0)), "segment_ids": jnp.asarray(seg),
             "positions": jnp.asarray(pos), "targets": jnp.asarray(rng.integers(0, 61, (B, Tn))),
             "weights": jnp.asarray(weights)}
    budget = loss.trained_budget([weights], Tn, multiple=8)
    assert budget < Tn

    def old(p):
        h = decoder.hidden_states(p, cfg, batch["tokens"], batch["positions"], batch["segment_ids"], attention="reference")
        lp = _full_logps(h, decoder.vocab_projection(p), batch["targets"])
        return -jnp.sum(lp * batch["weights"]) / weights.sum()

    new = lambda p: sft.token_nll_sum(p, cfg, batch, trained_budget=budget)[0] / weights.sum()  # noqa: E731  (as the step)
    np.testing.assert_allclose(new(params), old(params), rtol=1e-6)
    assert float(sft.token_nll_sum(params, cfg, batch, trained_budget=budget)[1]) == weights.sum()
    for a, b in zip(jax.tree.leaves(jax.grad(new)(params)), jax.tree.leaves(jax.grad(old)(params))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_trained_budget_is_the_fullest_row():
    w = np.zeros((3, 512), np.float32)
    w[1, :200] = 1
    assert loss.trained_budget([w], 512) == 256
    assert loss.trained_budget([w, np.ones((1, 512))], 512) == 512
