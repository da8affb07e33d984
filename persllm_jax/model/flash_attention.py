"""Flash-style attention in plain JAX: online softmax over key blocks, and a custom VJP that recomputes the
block scores in the backward pass, so a layer keeps O(T·hd) residuals (q, k, v, the output and two
softmax statistics per query), never the [T, S] scores or probabilities that autodiff of `decoder._attend` saves.

The mask is built block by block from per-token ids (`Segments`), exactly as `decoder.attention_mask`
builds the whole one: same document (segment id, 0 = padding), key not padding, key slot not after the
query slot, key within the sliding window by positions, and (DPO) key in the prompt (branch 0) or in the
query's own branch. Key blocks after a query block's last slot are skipped (causal by slot order), as in
`decoder._attend`. Fully masked rows (padding queries) average the values of the keys they visit, as the
reference's softmax over all-`finfo.min` scores does; nothing reads them, so they get no gradient.

Training only (queries = keys, S = T); decoding keeps `decoder._attend`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_Q = 128  # query rows per block: the reference's ATTN_BLOCK, so the causal skipping visits the same keys
BLOCK_K = 512  # keys per online-softmax step: big enough for efficient CPU dots, [B, H, 128, 512] fp32 transient

_NEG = float(np.finfo(np.float32).min)


class Segments(NamedTuple):
    """Per-token ids the attention mask is made of, each [B, T] int: `seg` (document, 0 = padding), `pos`
    (position, for the sliding window), `branch` (DPO: 0 = prompt, 1/2 = chosen/rejected) or None."""

    seg: jax.Array
    pos: jax.Array
    branch: jax.Array | None = None


def _spans(T: int, block_q: int, block_k: int):
    """[(q_start, q_end, [(k_start, k_end), ...])]: each query block meets the keys before its end only."""
    out = []
    for s in range(0, T, block_q):
        e = min(s + block_q, T)
        out.append((s, e, [(ks, min(ks + block_k, e)) for ks in range(0, e, block_k)]))
    return out


def block_mask(segs: Segments, s: int, e: int, ks: int, ke: int, window: int | None) -> jax.Array:
    """[B, 1, 1, e-s, ke-ks] bool: `decoder.attention_mask` restricted to queries [s, e), keys [ks, ke)."""
    q_seg, k_seg = segs.seg[:, s:e], segs.seg[:, ks:ke]
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    if ke - 1 > s:  # some key slot lies after some query slot in this block pair
        causal = np.arange(ks, ke)[None, :] <= np.arange(s, e)[:, None]
        mask = mask & causal[None]
    if segs.branch is not None:
        q_br, k_br = segs.branch[:, s:e], segs.branch[:, ks:ke]
        mask = mask & ((k_br[:, None, :] == 0) | (k_br[:, None, :] == q_br[:, :, None]))
    if window:
        mask = mask & (segs.pos[:, s:e, None] - segs.pos[:, None, ks:ke] < window)
    return mask[:, None, None]


def _scores(qb, kb, scale):
    return jnp.einsum("bkgtd,bksd->bkgts", qb, kb, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, segs, window, block_q, block_k):
    """q [B, KV, G, T, hd], k, v [B, KV, S, hd] -> (out [B, KV, G, T, hd] in q's dtype, (m, 1/l) [B, KV, G, T]
    fp32: the row max and the inverse softmax normaliser; kept apart, since finfo.min + log(l) == finfo.min
    on fully masked rows)."""
    T, hd, dtype = q.shape[3], q.shape[4], q.dtype
    scale = hd ** -0.5
    outs, ms, inv_ls = [], [], []
    for s, e, chunks in _spans(T, block_q, block_k):
        qb = q[:, :, :, s:e]
        m = l = acc = None
        for ks, ke in chunks:
            sc = jnp.where(block_mask(segs, s, e, ks, ke, window), _scores(qb, k[:, :, ks:ke], scale), _NEG)
            m_new = sc.max(-1) if m is None else jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(dtype), v[:, :, ks:ke], preferred_element_type=jnp.float32)
            if m is None:
                l, acc = p.sum(-1), pv
            else:
                alpha = jnp.exp(m - m_new)
                l, acc = alpha * l + p.sum(-1), alpha[..., None] * acc + pv
            m = m_new
        outs.append((acc / l[..., None]).astype(dtype))
        ms.append(m)
        inv_ls.append(1.0 / l)
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, 3)  # noqa: E731
    return cat(outs), (cat(ms), cat(inv_ls))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash_attention_heads(q, k, v, segs: Segments, window: int | None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Attention on the heads-major layout: q [B, KV, G, T, hd], k, v [B, KV, T, hd] -> [B, KV, G, T, hd]."""
    return _forward(q, k, v, segs, window, block_q, block_k)[0]


def _fwd(q, k, v, segs, window, block_q, block_k):
    out, stats = _forward(q, k, v, segs, window, block_q, block_k)
    return out, (q, k, v, segs, out, stats)


def _bwd(window, block_q, block_k, res, d_out):
    """The flash backward: per block pair, p = exp(s - m) / l recomputed; dS = p·(dP - rowsum(dO·O))."""
    q, k, v, segs, out, (m, inv_l) = res
    T, hd, dtype = q.shape[3], q.shape[4], q.dtype
    scale = hd ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KV, G, T]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for s, e, chunks in _spans(T, block_q, block_k):
        qb, dob = q[:, :, :, s:e], d_out[:, :, :, s:e].astype(dtype)
        m_b, inv_l_b, delta_b = m[:, :, :, s:e, None], inv_l[:, :, :, s:e, None], delta[:, :, :, s:e, None]
        dq = None
        for ks, ke in chunks:
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            mask = block_mask(segs, s, e, ks, ke, window)
            p = jnp.exp(jnp.where(mask, _scores(qb, kb, scale), _NEG) - m_b) * inv_l_b
            dv = dv.at[:, :, ks:ke].add(jnp.einsum("bkgts,bkgtd->bksd", p.astype(dtype), dob,
                                                   preferred_element_type=jnp.float32))
            dp = jnp.einsum("bkgtd,bksd->bkgts", dob, vb, preferred_element_type=jnp.float32)
            ds = (jnp.where(mask, p * (dp - delta_b), 0.0) * scale).astype(dtype)
            dq_c = jnp.einsum("bkgts,bksd->bkgtd", ds, kb, preferred_element_type=jnp.float32)
            dq = dq_c if dq is None else dq + dq_c
            dk = dk.at[:, :, ks:ke].add(jnp.einsum("bkgts,bkgtd->bksd", ds, qb, preferred_element_type=jnp.float32))
        dqs.append(dq)
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


flash_attention_heads.defvjp(_fwd, _bwd)


def flash_attention(q, k, v, segs: Segments, num_kv_heads: int, window: int | None = None, *,
                    block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
    """q [B, T, H, hd], k, v [B, T, KV, hd] (grouped-query) -> [B, T, H·hd], as `decoder._attend`."""
    B, T, H, hd = q.shape
    if k.shape[1] != T:
        raise ValueError(f"flash_attention is for full sequences (keys = queries); got {T} queries, {k.shape[1]} keys")
    qh = q.reshape(B, T, num_kv_heads, H // num_kv_heads, hd).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3).astype(q.dtype)
    out = flash_attention_heads(qh, kh, vh, segs, window or None, block_q, block_k)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


__all__ = ["Segments", "flash_attention", "flash_attention_heads", "block_mask", "BLOCK_Q", "BLOCK_K"]
