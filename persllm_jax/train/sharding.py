"""Device mesh (`data`, `fsdp`, `tensor`) and a rules table from parameter names to PartitionSpecs.

The rules are regexes over "/"-joined pytree paths (EasyLM style), first match wins. Kernels are stored
`[L, in, out]`: column-parallel projections (q, k, v, gate, up) shard `out` over `tensor` and `in` over
`fsdp`; row-parallel ones (o, down) the other way round. LoRA factors follow their base kernel. A dimension
that does not divide by its mesh axis is replicated instead (tiny models, odd vocabularies). Batches shard
their batch dimension over (`data`, `fsdp`).
"""

from __future__ import annotations

import functools
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from persllm_jax.errors import PersllmError
from persllm_jax.model.decoder import BATCH_AXES, constrain_batch  # noqa: F401 (part of this API)

AXES = ("data", "fsdp", "tensor")

COL = r"(q|k|v|gate|up)_proj"
ROW = r"(o|down)_proj"
RULES: list[tuple[str, P]] = [
    (r"embed_tokens", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel", P("fsdp", "tensor")),  # [D, V]
    (rf"{COL}/kernel", P(None, "fsdp", "tensor")),  # [L, in, out]
    (rf"{ROW}/kernel", P(None, "tensor", "fsdp")),
    (rf"{COL}/bias", P(None, "tensor")),  # [L, out]
    (rf"{ROW}/bias", P(None, None)),
    (rf"{COL}/a", P(None, "fsdp", None)),  # LoRA [L, in, r]
    (rf"{COL}/b", P(None, None, "tensor")),  # LoRA [L, r, out]
    (rf"{ROW}/a", P(None, "tensor", None)),
    (rf"{ROW}/b", P(None, None, "fsdp")),
    (r".*", P()),  # norms, scalars, counters: replicated
]


class MeshError(PersllmError, ValueError):
    pass


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Axis sizes with a single -1 filled from the device count."""
    shape = [int(sizes.get(a, 1)) for a in AXES]
    if shape.count(-1) > 1:
        raise MeshError("mesh: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise MeshError(f"mesh: {n_devices} devices do not divide by the fixed axes ({known})")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise MeshError(f"mesh: data*fsdp*tensor = {math.prod(shape)} but {n_devices} devices are available")
    return tuple(shape)


def make_mesh(sizes: dict[str, int] | object, devices=None) -> Mesh:
    if not isinstance(sizes, dict):
        sizes = {a: getattr(sizes, a) for a in AXES}
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001  (CPU / unusual topologies)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, AXES)



def make_train_mesh(mesh_cfg, devices, batch_size: int) -> Mesh:
    """The trainers' mesh; the global batch must split evenly over its data-parallel axes (data x fsdp)."""
    mesh = make_mesh(mesh_cfg, devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % dp:
        raise MeshError(f"batch_size ({batch_size}) must divide by mesh data*fsdp ({dp})")
    return mesh

def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules=RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, name):
            break
    else:
        spec = P()
    if len(spec) > len(shape):  # e.g. a scalar under a rule for matrices
        return P()
    fixed = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = math.prod(mesh.shape[a] for a in names) if names else 1
        fixed.append(axis if names and size > 1 and dim % size == 0 else None)
    return P(*fixed)


def tree_shardings(tree, mesh: Mesh, rules=RULES):
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(x)), mesh, rules)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """For batches [accum, B, T]: B over (data, fsdp)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def in_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the context mesh, so `constrain_batch` calls inside it take effect."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def shard_tree(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), tree, shardings)


def process_rows(sharding: NamedSharding, n_rows: int, axis: int = 1, ndim: int = 3) -> slice:
    """This process's rows of a global batch (`n_rows` along `axis`) under `sharding`.

    Read from the sharding itself, not from the process index: which rows a process's devices hold depends on
    the mesh's device order (TPU topologies interleave hosts), and where the batch is replicated across
    processes (e.g. a tensor-only mesh) every process needs all rows.
    """
    shape = tuple(n_rows if d == axis else 1 for d in range(ndim))
    spans = sorted({(s[axis].start or 0, n_rows if s[axis].stop is None else s[axis].stop)
                    for s in sharding.addressable_devices_indices_map(shape).values()})
    lo, hi, end = spans[0][0], spans[-1][1], spans[0][0]
    for a, b in spans:
        if a > end:
            raise MeshError(f"mesh: this process's devices hold non-contiguous batch rows {spans}; reorder the mesh")
        end = max(end, b)
    return slice(lo, hi)


def put_batch(batch: dict, sharding: NamedSharding, global_rows: int | None = None, axis: int = 1) -> dict:
    """Host arrays holding this process's rows (`process_rows`) -> global arrays of `global_rows` rows.

    Single process: a plain device_put. Several: `jax.make_array_from_process_local_data`, each process
    transferring only its own rows; `global_rows` defaults to local rows x processes along the batch axes.
    """
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        shape = None
        if global_rows is not None:
            shape = tuple(global_rows if d == axis else n for d, n in enumerate(np.shape(v)))
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v), shape)
    return out


def process_row_slice(rows_per_step: int) -> slice:
    """This process's contiguous block of each global batch, assuming process i holds block i (true for meshes
    built by `make_mesh` over CPU and GPU hosts with the batch sharded over all processes). Prefer
    `process_rows`, which reads the block from the sharding."""
    n, i = jax.process_count(), jax.process_index()
    if rows_per_step % n:
        raise MeshError(f"batch_size ({rows_per_step}) must divide by the number of processes ({n})")
    per = rows_per_step // n
    return slice(i * per, (i + 1) * per)


__all__ = ["AXES", "RULES", "make_mesh", "mesh_shape", "spec_for", "tree_shardings", "replicated",
           "batch_sharding", "constrain_batch", "in_mesh", "shard_tree", "put_batch", "process_rows",
           "process_row_slice", "path_str", "MeshError"]
