"""Flash-style attention in plain JAX: online softmax over key blocks, and a custom VJP that recomputes the
block scores in the backward pass, so a layer keeps O(T·hd) residuals (q, k, v, the output and two
softmax statistics per query), never the [T, S] scores or probabilities that autodiff of `decoder._attend` saves.

The mask is built block by block from per-token ids (`Segments`), exactly as `decoder.attention_mask`
builds the whole one: same document (segment id, 0 = padding), key not padding, key slot not after the
query slot, key within the sliding window by positions, and (DPO) key in the prompt (branch 0) or in the
query's own branch. Key blocks after a query block's last slot are skipped (causal by slot order), as in
`decoder._attend`; with `skip` (the CPU), so are block pairs where no query may see any key (other documents
of a packed row, padding). Fully masked rows (padding queries) average the values of the keys they visit, as
the reference's softmax over all-`finfo.min` scores does, or are 0 where they visit none; nothing reads them,
so they get no gradient.

Training only (queries = keys, S = T); decoding keeps `decoder._attend`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_Q = 128  # query rows per block: the reference's ATTN_BLOCK, so the causal skipping visits the same keys
BLOCK_K = 512  # keys per online-softmax step: big enough for efficient dots, [B, H, 128, 512] fp32 transient
# With `skip` (the CPU), small square blocks: a packed row's documents then leave most block pairs empty and
# branched around. SmolLM2's layer, 1024 slots of 3 documents, forward + backward: 54 ms at 128 x 512, 27 at
# 64 x 64; one 1000-token document: 71-87 ms either way.
SKIP_BLOCK = 64
# Block pairs are unrolled into the program, each its own branch: rows past SKIP_MAX_BLOCKS such blocks (136 causal
# pairs) keep BLOCK_Q x BLOCK_K (84 pairs at 3000 tokens; 64 x 64 there made 1128 and an 8B plan compile for >12 min).
SKIP_MAX_BLOCKS = 16

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


def _forward(q, k, v, segs, window, block_q, block_k, skip):
    """q [B, KV, G, T, hd], k, v [B, KV, S, hd] -> (out [B, KV, G, T, hd] in q's dtype, (m, 1/l) [B, KV, G, T]
    fp32: the row max and the inverse softmax normaliser; kept apart, since finfo.min + log(l) == finfo.min
    on fully masked rows). Rows that visit no key (skipped blocks only) get out 0 and 1/l = 0."""
    B, KV, G, T, hd = q.shape
    dtype, scale = q.dtype, hd ** -0.5
    outs, ms, inv_ls = [], [], []
    for s, e, chunks in _spans(T, block_q, block_k):
        qb = q[:, :, :, s:e]
        stats = (jnp.full((B, KV, G, e - s), _NEG, jnp.float32), jnp.zeros((B, KV, G, e - s), jnp.float32),
                 jnp.zeros((B, KV, G, e - s, hd), jnp.float32))
        for ks, ke in chunks:
            mask = block_mask(segs, s, e, ks, ke, window)

            def visit(stats, kb=k[:, :, ks:ke], vb=v[:, :, ks:ke], mask=mask):
                m, l, acc = stats
                sc = jnp.where(mask, _scores(qb, kb, scale), _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                p = jnp.exp(sc - m_new[..., None])
                pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(dtype), vb, preferred_element_type=jnp.float32)
                alpha = jnp.exp(m - m_new)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            stats = _maybe(skip, mask, visit, lambda st: st, stats)
        m, l, acc = stats
        inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
        outs.append((acc * inv_l[..., None]).astype(dtype))
        ms.append(m)
        inv_ls.append(inv_l)
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, 3)  # noqa: E731
    return cat(outs), (cat(ms), cat(inv_ls))


def _maybe(skip, mask, visit, skipped, operand):
    """visit(operand), or (with `skip`) only when some query of the block pair may see some key: a real
    branch on the CPU, where a packed row's other documents and its padding leave many block pairs empty."""
    if not skip:
        return visit(operand)
    return jax.lax.cond(jnp.any(mask), visit, skipped, operand)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention_heads(q, k, v, segs: Segments, window: int | None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                          skip: bool = False):
    """Attention on the heads-major layout: q [B, KV, G, T, hd], k, v [B, KV, T, hd] -> [B, KV, G, T, hd].
    `skip`: branch around block pairs the mask leaves empty (see _maybe)."""
    return _forward(q, k, v, segs, window, block_q, block_k, skip)[0]


def _fwd(q, k, v, segs, window, block_q, block_k, skip):
    out, stats = _forward(q, k, v, segs, window, block_q, block_k, skip)
    return out, (q, k, v, segs, out, stats)


def _bwd(window, block_q, block_k, skip, res, d_out):
    """The flash backward: per block pair, p = exp(s - m) / l recomputed (0 where masked, so fully masked
    rows pass no gradient); dS = p·(dP - rowsum(dO·O))."""
    q, k, v, segs, out, (m, inv_l) = res
    hd, dtype = q.shape[4], q.dtype
    scale = hd ** -0.5
    # [B, KV, G, T]; an einsum, so XLA:CPU runs it as a dot (see decoder.rms_norm)
    delta = jnp.einsum("...d,...d->...", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for s, e, chunks in _spans(q.shape[3], block_q, block_k):
        qb, dob = q[:, :, :, s:e], d_out[:, :, :, s:e].astype(dtype)
        m_b, inv_l_b, delta_b = m[:, :, :, s:e, None], inv_l[:, :, :, s:e, None], delta[:, :, :, s:e, None]
        dq = jnp.zeros(qb.shape, jnp.float32)
        for ks, ke in chunks:
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            mask = block_mask(segs, s, e, ks, ke, window)

            def visit(dq, kb=kb, vb=vb, mask=mask):
                p = jnp.where(mask, jnp.exp(_scores(qb, kb, scale) - m_b) * inv_l_b, 0.0)
                dv_c = jnp.einsum("bkgts,bkgtd->bksd", p.astype(dtype), dob, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgtd,bksd->bkgts", dob, vb, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_b) * scale).astype(dtype)
                dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, kb, preferred_element_type=jnp.float32)
                return dq, jnp.einsum("bkgts,bkgtd->bksd", ds, qb, preferred_element_type=jnp.float32), dv_c

            zeros = lambda dq, n=ke - ks: (dq, jnp.zeros(dk.shape[:2] + (n, hd), jnp.float32),  # noqa: E731
                                           jnp.zeros(dv.shape[:2] + (n, hd), jnp.float32))
            dq, dk_c, dv_c = _maybe(skip, mask, visit, zeros, dq)
            dk, dv = dk.at[:, :, ks:ke].add(dk_c), dv.at[:, :, ks:ke].add(dv_c)
        dqs.append(dq)
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


flash_attention_heads.defvjp(_fwd, _bwd)


def flash_attention(q, k, v, segs: Segments, num_kv_heads: int, window: int | None = None, *,
                    block_q: int | None = None, block_k: int | None = None, skip: bool = False) -> jax.Array:
    """q [B, T, H, hd], k, v [B, T, KV, hd] (grouped-query) -> [B, T, H·hd], as `decoder._attend`. `skip`:
    branch around empty block pairs (attention.Kernel turns it on for the CPU). Blocks default to
    SKIP_BLOCK square with `skip` on rows of up to SKIP_MAX_BLOCKS of them, else BLOCK_Q x BLOCK_K."""
    B, T, H, hd = q.shape
    small = skip and T <= SKIP_MAX_BLOCKS * SKIP_BLOCK
    block_q = block_q or (SKIP_BLOCK if small else BLOCK_Q)
    block_k = block_k or (SKIP_BLOCK if small else BLOCK_K)
    if k.shape[1] != T:
        raise ValueError(f"flash_attention is for full sequences (keys = queries); got {T} queries, {k.shape[1]} keys")
    qh = q.reshape(B, T, num_kv_heads, H // num_kv_heads, hd).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3).astype(q.dtype)
    out = flash_attention_heads(qh, kh, vh, segs, window or None, block_q, block_k, skip)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)


__all__ = ["Segments", "flash_attention", "flash_attention_heads", "block_mask", "BLOCK_Q", "BLOCK_K", "SKIP_BLOCK", "SKIP_MAX_BLOCKS"]
