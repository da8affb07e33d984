"""Token log-probabilities without the [N, V] logits: the vocabulary projection and log-softmax run in chunks of
tokens, and a custom VJP keeps no logits for the backward pass, so at most [chunk, V] fp32 logits exist at once
(autodiff of `logsumexp(h @ W)` keeps all N·V of them, 0.8 GB for 4 x 1024 tokens of SmolLM2): with a frozen
projection (LoRA) the forward pass keeps d logp / dh ([N, D]), with a trained one the backward recomputes them.

SFT also projects only the positions it trains on: `gather_trained` compacts each row's weighted targets into a
static budget of `budget` slots (the most any row of the run holds, `trained_budget`), as DPO's completion slots.
Used by train/sft.py (token_nll_sum) and train/dpo.py (sequence_logps).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 1024  # tokens per vocabulary chunk (all rows together): [1024, V] fp32 logits, 192 MiB for V = 49k


def _chunks(x, chunk):
    """[B, N, ...] -> [N / chunk, B, chunk, ...] (zero-padded): chunks along the tokens, rows stay batch-sharded."""
    pad = -x.shape[1] % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x, n):
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :n]


def _chunk_logits(hc, w):
    return jnp.dot(hc, w.astype(hc.dtype), preferred_element_type=jnp.float32)  # as decoder.logits_from_hidden


def _logsumexp(logits):
    """logsumexp over the vocabulary, its sum of exponentials as a dot with ones: on the CPU XLA's fused
    exp-and-reduce runs at a third of the speed of the exp followed by a matrix-vector product (SmolLM2's
    [768, 49k] logits: 486 vs 323 ms with the projection)."""
    m = jnp.max(logits, axis=-1)
    total = jnp.dot(jnp.exp(logits - m[..., None]), jnp.ones(logits.shape[-1], logits.dtype))
    return m + jnp.log(total)


def _logps_fwd_impl(h, w, targets, chunk, with_dh: bool = False):
    """(logp, lse) per token; with `with_dh`, (logp, u) with u = d logp / dh = (onehot(target) - softmax) @ wᵀ
    [B, N, D]: when w takes no gradient (LoRA), the backward pass is then u times the cotangent, no logits
    recomputed."""
    wt = w.astype(h.dtype)

    def one(_, xs):
        hc, tc = xs
        logits = _chunk_logits(hc, w)
        lse = _logsumexp(logits)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        if not with_dh:
            return None, (picked - lse, lse)
        p = jnp.exp(logits - lse[..., None]).astype(hc.dtype)
        u = jnp.take(wt, tc, axis=1).transpose(1, 2, 0) - jnp.einsum("bcv,dv->bcd", p, wt,
                                                                      preferred_element_type=jnp.float32)
        return None, (picked - lse, u.astype(h.dtype))

    _, (lp, extra) = jax.lax.scan(one, None, (_chunks(h, chunk), _chunks(targets, chunk)))
    n = h.shape[1]
    return _unchunk(lp, n), _unchunk(extra, n)


def _chunk_size(h) -> int:
    return max(8, min(h.shape[1], CHUNK // h.shape[0]))


def token_logps(h, w, targets):
    """fp32 log p(targets | h) [B, N] for h [B, N, D], w [D, V] (decoder.vocab_projection), targets [B, N]."""
    return _token_logps(h, w, targets, _chunk_size(h))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logps(h, w, targets, chunk):
    return _logps_fwd_impl(h, w, targets, chunk)[0]


def _fwd(h, w, targets, chunk):
    """With symbolic zeros each argument says whether it is differentiated: a frozen w (LoRA) saves u for the
    backward pass (one vocabulary matmul fewer: SmolLM2's LoRA step on a 1024-token row -4%, paired median);
    a trained w (full fine-tuning) recomputes the logits chunk by chunk."""
    if not w.perturbed:
        lp, u = _logps_fwd_impl(h.value, w.value, targets.value, chunk, with_dh=True)
        return lp, (u, None)
    lp, lse = _logps_fwd_impl(h.value, w.value, targets.value, chunk)
    return lp, (None, (h.value, w.value, targets.value, lse))


def _bwd(chunk, res, g):
    """d logp / dh = g·u when u was kept; else d logp / d logits = onehot(target) - softmax(logits), the logits
    recomputed chunk by chunk."""
    u, saved = res
    if saved is None:
        return u * g.astype(u.dtype)[..., None], None, None
    h, w, targets, lse = saved
    V = w.shape[1]

    def one(dw, xs):
        hc, tc, lc, gc = xs
        p = jnp.exp(_chunk_logits(hc, w) - lc[..., None])
        dlogits = ((jax.nn.one_hot(tc, V, dtype=jnp.float32) - p) * gc[..., None]).astype(hc.dtype)
        dh = jnp.einsum("bcv,dv->bcd", dlogits, w.astype(hc.dtype), preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcd,bcv->dv", hc, dlogits, preferred_element_type=jnp.float32)
        return dw, dh.astype(h.dtype)

    xs = (_chunks(h, chunk), _chunks(targets, chunk), _chunks(lse, chunk), _chunks(g.astype(jnp.float32), chunk))
    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), xs)
    return _unchunk(dh, h.shape[1]), dw.astype(w.dtype), None


_token_logps.defvjp(_fwd, _bwd, symbolic_zeros=True)


def gather_trained(h, targets, weights, budget: int):
    """Each row's trained slots (weight != 0) first, cut to `budget`: (h [B, K, D], targets [B, K], weights [B, K])."""
    order = jnp.argsort(weights == 0, axis=1, stable=True)[:, :budget]  # trained slots in slot order, then the rest
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return take(h), take(targets), take(weights)


def trained_budget(weight_rows, max_length: int, multiple: int = 128) -> int:
    """Static slots per row for `gather_trained`: the most trained targets any row holds, rounded up."""
    most = max(int((np.asarray(w) != 0).sum(axis=1).max()) for w in weight_rows)
    return min(max_length, max(multiple, math.ceil(most / multiple) * multiple))


__all__ = ["token_logps", "gather_trained", "trained_budget", "CHUNK"]
