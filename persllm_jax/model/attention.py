"""Which training attention runs: the config key `attention: auto|flash|splash|cudnn|reference`.

    reference  decoder._attend: blocked queries, autodiff keeps every block's [block, S] fp32 probabilities
               (activation memory grows with T² per layer)
    flash      flash_attention.py (plain JAX, any backend): online softmax, recomputing backward, O(T) memory;
               on the CPU it branches around block pairs that the documents and padding leave empty
    cudnn      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention on NVIDIA GPUs,
               bf16/fp16, head_dim <= 128 and a multiple of 8; the document mask goes in as one [B, 1, T, T]
               bool shared by all heads and layers
    splash     Pallas splash attention on TPU (segment ids, causal, local window by slot); its mask is static, so
               DPO's shared-prompt branches use flash instead
    auto       cudnn on GPU where its constraints hold, splash on TPU where they hold, flash otherwise

The backend is the context mesh's platform (so a deviceless TPU compile, e.g. `persllm plan` on a TPU topology,
gets splash), else jax.default_backend(); `resolve(..., backend=)` names it outright.
Decoding with the KV cache (decoder.forward_cached) always uses the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from persllm_jax.model.flash_attention import Segments, block_mask, flash_attention

IMPLS = ("auto", "flash", "splash", "cudnn", "reference")


def _cudnn_ok(cfg, dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and cfg.head_dim <= 128 \
        and cfg.head_dim % 8 == 0


def _splash_ok(T: int, branches: bool) -> bool:
    return not branches and T % 128 == 0


def current_backend() -> str:
    """The platform being compiled for: the context mesh's devices (abstract ones too), else the default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(name: str, cfg, dtype, T: int, branches: bool = False, backend: str | None = None) -> str:
    """The implementation `name` means for this model, dtype, row length and backend (see module docstring)."""
    if name not in IMPLS:
        raise ValueError(f"config: attention must be one of {', '.join(IMPLS)}, got {name!r}")
    backend = backend or current_backend()
    if name == "auto":
        if backend == "gpu" and _cudnn_ok(cfg, dtype):
            return "cudnn"
        if backend == "tpu" and _splash_ok(T, branches):
            return "splash"
        return "flash"
    if name == "cudnn":
        if backend != "gpu":
            raise ValueError(f"config: attention=cudnn needs a GPU backend (this one is {backend}); use auto or flash")
        if not _cudnn_ok(cfg, dtype):
            raise ValueError(f"config: attention=cudnn needs dtype bfloat16 and head_dim <= 128, a multiple of 8 "
                             f"(got {jnp.dtype(dtype).name}, head_dim {cfg.head_dim}); use auto or flash")
    if name == "splash":
        if backend != "tpu":
            raise ValueError(f"config: attention=splash needs a TPU backend (this one is {backend}); use auto or flash")
        if branches:
            return "flash"  # DPO's branch mask is data, splash's mask is static
        if not _splash_ok(T, branches):
            raise ValueError(f"config: attention=splash needs max_length a multiple of 128, got {T}")
    return name


class Kernel(NamedTuple):
    """Stands in for the bool mask in `decoder._attend`: attends with `impl` over the mask `segs` describes.
    `batch_axes`: the mesh axes the batch is split over (decoder.batch_axes; splash runs in a shard_map)."""

    impl: str
    segs: Segments

    def __call__(self, q, k, v, cfg, batch_axes):
        window = cfg.sliding_window or None
        if self.impl == "flash":
            # on the CPU a branch around empty block pairs is free; on GPU a conditional waits on the host
            return flash_attention(q, k, v, self.segs, cfg.num_kv_heads, window, skip=current_backend() == "cpu")
        if self.impl == "cudnn":
            return cudnn_attention(q, k, v, self.segs, window)
        if self.impl == "splash":
            return splash_attention(q, k, v, self.segs, window, batch_axes)
        raise ValueError(f"unknown attention implementation {self.impl!r}")


def cudnn_attention(q, k, v, segs: Segments, window):
    """cuDNN flash attention; causal blocks skipped by cuDNN, documents / padding / window by the mask."""
    B, T, H, hd = q.shape
    mask = block_mask(segs, 0, T, 0, T, window)[:, 0]  # [B, 1, T, T]
    out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), mask=mask, is_causal=True, implementation="cudnn")
    return out.reshape(B, T, H * hd)


def splash_attention(q, k, v, segs: Segments, window, batch_axes):
    """Pallas splash attention (TPU), vmapped over the batch; under a mesh, in a shard_map over the batch
    axes (and the heads over `tensor` when they divide), since a Pallas kernel is not auto-partitioned."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    from jax.sharding import PartitionSpec as P

    B, T, H, hd = q.shape
    KV = k.shape[2]

    def local(q, k, v, seg):
        h = q.shape[1]
        mask = sm.CausalMask((T, T)) if not window else sm.LocalMask((T, T), (window - 1, 0), 0)
        block = 512 if T % 512 == 0 else 128
        sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([mask] * h), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes)
        ids = sk.SegmentIds(q=seg, kv=seg)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    qh = (q * (hd ** -0.5)).transpose(0, 2, 1, 3)  # [B, H, T, hd]; splash does not scale
    kh, vh = k.transpose(0, 2, 1, 3), v.astype(q.dtype).transpose(0, 2, 1, 3)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in batch_axes):
        out = local(qh, kh, vh, segs.seg)
    else:
        n_batch = math.prod(mesh.shape[a] for a in batch_axes)
        tp = mesh.shape.get("tensor", 1)
        batch = batch_axes if B % n_batch == 0 else None
        heads = "tensor" if tp > 1 and H % tp == 0 and KV % tp == 0 else None
        spec = P(batch, heads, None, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                            check_vma=False)(qh, kh, vh, segs.seg)
    return out.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


__all__ = ["IMPLS", "Kernel", "Segments", "current_backend", "resolve", "cudnn_attention", "splash_attention"]
