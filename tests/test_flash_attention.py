"""The flash attention (persllm_jax/model/flash_attention.py) against the reference `decoder._attend`: forward and
gradients to 1e-5 in fp32, on packed rows whose documents cross query and key block edges, with padding,
GQA, a sliding window and DPO's shared-prompt branches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from persllm_jax.model import attention, decoder
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.flash_attention import Segments, flash_attention
from persllm_jax.train.config import ATTENTION_IMPLS, ConfigError, load_config

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=1,
                  num_heads=6, num_kv_heads=2, head_dim=8)
T = 300  # > 2 query blocks of 128, ends mid-block


def _packed(doc_lengths, T):
    """segment ids and positions of rows packed with documents of the given lengths (the rest padding)."""
    seg, pos = np.zeros((len(doc_lengths), T), np.int32), np.zeros((len(doc_lengths), T), np.int32)
    for r, lengths in enumerate(doc_lengths):
        o = 0
        for s, n in enumerate(lengths):
            seg[r, o:o + n], pos[r, o:o + n] = s + 1, np.arange(n)
            o += n
    return jnp.asarray(seg), jnp.asarray(pos)


SEG, POS = _packed([[100, 150, 30], [T], [5, 200, 7]], T)  # padding at the ends of rows 0 and 2


def _qkv(seed=0, batch=None):
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    B = batch or SEG.shape[0]
    q = jax.random.normal(kq, (B, T, CFG.num_heads, CFG.head_dim))
    k = jax.random.normal(kk, (B, T, CFG.num_kv_heads, CFG.head_dim))
    v = jax.random.normal(kv, (B, T, CFG.num_kv_heads, CFG.head_dim))
    g = jax.random.normal(kg, (B, T, CFG.num_heads * CFG.head_dim))
    return q, k, v, g


def _check(cfg, segs, ref_mask, **blocks):
    """Outputs at real (non-padding) queries, gradients everywhere, for a cotangent that is 0 on padding rows
    (as in the model, where nothing reads them; their outputs depend on the block size in both)."""
    q, k, v, g = _qkv(batch=segs.seg.shape[0])
    real = (segs.seg > 0)[..., None]
    g = g * real
    ref = lambda q, k, v: decoder._attend(q, k, v, ref_mask, cfg, jnp.float32, decoder.ATTN_BLOCK)  # noqa: E731
    new = lambda q, k, v: flash_attention(q, k, v, segs, cfg.num_kv_heads, cfg.sliding_window, **blocks)  # noqa: E731
    out_ref, out_new = jax.jit(ref)(q, k, v), jax.jit(new)(q, k, v)
    np.testing.assert_allclose(out_new * real, out_ref * real, atol=1e-5, rtol=0)
    weighted = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * g)  # noqa: E731
    g_ref = jax.jit(jax.grad(weighted(ref), argnums=(0, 1, 2)))(q, k, v)
    g_new = jax.jit(jax.grad(weighted(new), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_new, g_ref):
        assert float(jnp.abs(b).max()) > 1e-2  # the gradients are not trivially zero
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("blocks", [{}, {"block_q": 64, "block_k": 96}])  # default: one key step; small: several
@pytest.mark.parametrize("skip", [False, True])
def test_flash_matches_reference_packed(window, blocks, skip):
    cfg = dataclasses.replace(CFG, sliding_window=window)
    mask = decoder.attention_mask(SEG, jnp.arange(T), POS, SEG, POS, window)
    _check(cfg, Segments(SEG, POS), mask, skip=skip, **blocks)


def test_flash_skips_empty_block_pairs_exactly():
    """Rows packed with several documents each and padding (one row all padding), small blocks: many block
    pairs are empty in every row and are branched around; the result is the reference's, and the all-padding
    row stays finite and passes no gradient even under a cotangent that is not 0 there."""
    seg, pos = _packed([[40, 100, 60], [70, 150, 20], [30, 30, 30, 100], []], T)
    mask = decoder.attention_mask(seg, jnp.arange(T), pos, seg, pos, None)
    empty = [not bool(mask[:, :, s:s + 32, ks:ks + 32].any()) for s in range(0, T, 32) for ks in range(0, s + 1, 32)]
    assert sum(empty) >= 10  # the case exercises the skipping
    q, k, v, g = _qkv(batch=seg.shape[0])
    _check(CFG, Segments(seg, pos), mask, block_q=32, block_k=32, skip=True)
    out = flash_attention(q, k, v, Segments(seg, pos), CFG.num_kv_heads, None, block_q=32, block_k=32, skip=True)
    assert bool(jnp.all(jnp.isfinite(out)))
    grads = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v, Segments(seg, pos), CFG.num_kv_heads, None,
                                                               block_q=32, block_k=32, skip=True) * g),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(x))) and bool(jnp.all(x[3] == 0)) for x in grads)


def test_flash_matches_reference_dpo_branches():
    """Pairs [prompt | chosen | rejected]: rejected continues the prompt's positions, not the chosen's."""
    seg, _ = _packed([[120, 170], [T], [40, 90]], T)
    br, pos = np.zeros((3, T), np.int32), np.zeros((3, T), np.int32)
    for r, docs in enumerate([[(50, 30, 40), (60, 70, 40)], [(100, 120, 80)], [(10, 20, 10), (30, 40, 20)]]):
        o = 0
        for P, C, R in docs:
            br[r, o:o + P + C + R] = np.repeat([0, 1, 2], [P, C, R])
            pos[r, o:o + P + C + R] = np.concatenate([np.arange(P), P + np.arange(C), P + np.arange(R)])
            o += P + C + R
    br, pos = jnp.asarray(br), jnp.asarray(pos)
    cfg = dataclasses.replace(CFG, sliding_window=45)
    mask = decoder.attention_mask(seg, jnp.arange(T), pos, seg, pos, 45, br, br)
    _check(cfg, Segments(seg, pos, br), mask, block_q=64, block_k=96)


def test_hidden_states_flash_equals_reference():
    """The whole model (params and LoRA path as in training): auto (flash on CPU, skipping empty block pairs) =
    reference at the real positions (padding positions, which nothing reads, depend on the block visits)."""
    cfg = dataclasses.replace(CFG, num_layers=2, sliding_window=50)
    params = decoder.init_params(cfg, jax.random.PRNGKey(1), std=0.2)
    tokens = jax.random.randint(jax.random.PRNGKey(2), SEG.shape, 1, cfg.vocab_size) * (SEG > 0)
    run = lambda impl: decoder.hidden_states(params, cfg, tokens, POS, SEG, attention=impl)  # noqa: E731
    assert attention.resolve("auto", cfg, jnp.float32, T, backend="cpu") == "flash"
    real = (SEG > 0)[..., None]
    np.testing.assert_allclose(run("auto") * real, run("reference") * real, atol=1e-5, rtol=0)


def test_resolve_choices():
    assert attention.resolve("auto", CFG, jnp.bfloat16, 1024, backend="gpu") == "cudnn"
    assert attention.resolve("auto", CFG, jnp.float32, 1024, backend="gpu") == "flash"  # cuDNN: bf16/fp16 only
    assert attention.resolve("auto", CFG, jnp.float32, 1024, backend="tpu") == "splash"
    assert attention.resolve("auto", CFG, jnp.float32, 1000, backend="tpu") == "flash"  # not a multiple of 128
    assert attention.resolve("auto", CFG, jnp.float32, 1024, branches=True, backend="tpu") == "flash"
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.resolve("fast", CFG, jnp.float32, 1024)
    with pytest.raises(ValueError, match="cudnn needs a GPU"):
        attention.resolve("cudnn", CFG, jnp.bfloat16, 1024, backend="cpu")


def test_resolve_follows_the_context_mesh_platform():
    """A deviceless TPU compile traces under a mesh of TPU devices on a CPU host: auto must mean splash there."""
    tpu = AbstractMesh((1,), ("data",), abstract_device=AbstractDevice("TPU v5 lite", None, "tpu"))
    with jax.sharding.use_abstract_mesh(tpu):
        assert attention.current_backend() == "tpu"
        assert attention.resolve("auto", CFG, jnp.float32, 1024) == "splash"
    assert attention.resolve("auto", CFG, jnp.float32, 1024, backend="tpu") == "splash"  # or named outright


def test_config_rejects_unknown_attention():
    assert ATTENTION_IMPLS == attention.IMPLS  # the config's list (no JAX import there) is the resolver's
    assert load_config(overrides=["attention=reference"]).attention == "reference"
    with pytest.raises(ConfigError, match=r"attention: 'fast' \(one of auto, flash, splash, cudnn, reference\)"):
        load_config(overrides=["attention=fast"])
