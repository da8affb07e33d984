"""`persllm plan --serve`: will the persona server fit a chip, and with how many concurrent requests?

The server's two device programs (serve/slots.py, as `persllm serve` runs them: one model replica per chip) are
compiled from abstract shapes, by the TPU compiler for a `--target tpu-...` (deviceless, in the same worker
environment as the train plan) or by the CPU compiler for `--target cpu`:

    prefill   every slot reading a `prefill_chunk`-token piece of its prompt at the end of its cache (worst case)
    decode    one call of `chunk` decode steps over every slot, attending the whole cache

Per chip it reports weights, the adapter bank, the KV cache (exact: 2 x layers x kv_heads x cache_tokens x
head_dim x itemsize per slot), the compiler's temporaries and the peak of the two programs; the largest batch
(slots) that fits, from compiles at the asked batch and twice it (peak bytes are linear in the batch) and checked
by a third compile at that batch; and a roofline per decode step (the while loop's body is one step: XLA counts
a loop body once):

    decode step_s = max(HLO FLOPs / peak FLOP/s, HLO bytes / HBM bandwidth);   tokens/s <= batch / step_s

Worker: `python -m persllm_jax.serve.plan SPEC TARGET`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

from persllm_jax.errors import PersllmError
from persllm_jax.train.plan import GiB, capacity, gib, run_module
from persllm_jax.train.tpu_plan import (
    TARGETS,
    compiled_cost,
    compiled_memory,
    libtpu_version,
    require_target,
    topology_devices,
    worker_env,
)


@dataclass
class ServeShape:
    """What `persllm serve` would be started with (its option names in comments)."""
    model: str  # --model
    batch: int = 32  # --max-batch: KV-cache slots
    cache_tokens: int = 4096  # --slot-tokens: positions per slot (prompt + completion)
    chunk: int = 16  # --chunk: decode steps per device call
    prefill_chunk: int = 256  # --prefill-chunk
    dtype: str = "bfloat16"  # --dtype: weights, KV cache and compute
    adapters: int = 8  # --max-adapters (the bank holds them + the base)
    lora_rank: int = 16  # the largest adapter rank
    lora_targets: str = "all"


class ServePlanError(PersllmError, ValueError):
    pass


def _programs(mcfg, shape: ServeShape, device, batch: int):
    """(prefill, decode) lowered for `batch` slots, from abstract shapes placed on `device`."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.io import jnp_dtype
    from persllm_jax.model.decoder import init_params, unstack_layers
    from persllm_jax.model.lora import linear_shapes, resolve_targets
    from persllm_jax.serve.engine import _batch_bucket, _prompt_bucket
    from persllm_jax.serve.slots import _decode, _prefill

    one = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp_dtype(shape.dtype)

    def spec(s, dt):
        return jax.ShapeDtypeStruct(s, dt, sharding=one)

    def per_layer():  # as the Generator holds them: one tree per layer
        p = init_params(mcfg, jax.random.PRNGKey(0), dtype)
        return {**p, "layers": unstack_layers(p["layers"], mcfg.num_layers)}

    params = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype), jax.eval_shape(per_layer))
    L, N, S = mcfg.num_layers, batch, min(shape.cache_tokens, mcfg.max_position_embeddings)
    lin, R, A = linear_shapes(mcfg), shape.lora_rank, shape.adapters + 1  # row 0: the base, all zeros
    bank = None if not shape.adapters else [
        {n: {"a": spec((A, lin[n][0], R), jnp.float32), "b": spec((A, R, lin[n][1]), jnp.float32)}
         for n in resolve_targets(shape.lora_targets)} for _ in range(L)]
    kv = (N, mcfg.num_kv_heads, S, mcfg.head_dim)
    cache = {"k": [spec(kv, dtype) for _ in range(L)], "v": [spec(kv, dtype) for _ in range(L)]}
    logits = spec((N, mcfg.vocab_size), jnp.float32)
    i32 = lambda n: spec((n,), jnp.int32)  # noqa: E731
    Bp, T = _batch_bucket(N), min(_prompt_bucket(shape.prefill_chunk), shape.prefill_chunk)
    prefill = _prefill.lower(params, bank, cache, logits, i32(Bp), spec((Bp, T), jnp.int32), i32(Bp), i32(Bp),
                             i32(Bp), cfg=mcfg, dtype=dtype, span=S)
    rows = (i32(N), i32(N), i32(N), i32(N))
    sampling = (i32(1), spec((N,), jnp.uint32), spec((N,), jnp.float32), i32(N), spec((N,), jnp.float32))
    decode = _decode.lower(params, bank, cache, logits, rows, sampling, cfg=mcfg, dtype=dtype, n_steps=shape.chunk,
                           span=S, greedy=False, logprobs=False)
    itemsize = jnp.dtype(dtype).itemsize
    fixed = {"weights": sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)),
             "adapters": sum(x.size * 4 for x in jax.tree_util.tree_leaves(bank)),
             "kv_cache": 2 * L * N * mcfg.num_kv_heads * S * mcfg.head_dim * itemsize,
             "logits": N * mcfg.vocab_size * 4}
    return prefill, decode, fixed, {"prefill_rows": Bp, "prefill_tokens": T, "cache_tokens": S}


def compile_batch(mcfg, shape: ServeShape, device, batch: int) -> dict:
    """Both programs compiled for `batch` slots: their memory (and the decode step's cost), or the compiler's
    refusal (out of memory) as `fits_compiler: False`."""
    from persllm_jax.train.tpu_plan import parse_oom

    t0 = time.perf_counter()
    prefill, decode, fixed, dims = _programs(mcfg, shape, device, batch)
    out = {"batch": batch, "bytes": fixed, **dims}
    try:
        p, d = prefill.compile(), decode.compile()
    except Exception as e:  # noqa: BLE001  (the compiler's refusal is the result)
        oom = parse_oom(str(e))
        if oom is None:
            raise
        return {**out, "fits_compiler": False, "oom": oom, "compile_s": time.perf_counter() - t0}
    mem = {"prefill": compiled_memory(p), "decode": compiled_memory(d)}
    return {**out, "fits_compiler": True, "programs": mem, "peak": max(m["peak"] for m in mem.values()),
            "decode_cost": compiled_cost(d), "compile_s": time.perf_counter() - t0}


def _line(x0, y0, x1, y1):
    slope = (y1 - y0) / (x1 - x0)
    return y0 - slope * x0, slope


def largest_batch(at: dict, twice: dict, usable: float) -> int:
    """Slots that fit in `usable` bytes, from the compiles at a batch and at twice it. Each program's peak is
    linear in its rows: decode runs every slot, prefill the batch's power-of-two bucket (all slots reading at once,
    the worst case), so the answer is the smaller of decode's limit and the largest bucket prefill can take."""
    a, b = _line(at["batch"], at["programs"]["decode"]["peak"], twice["batch"], twice["programs"]["decode"]["peak"])
    n_decode = int((usable - a) // b) if b > 0 else 1 << 20
    a, b = _line(at["prefill_rows"], at["programs"]["prefill"]["peak"], twice["prefill_rows"],
                 twice["programs"]["prefill"]["peak"])
    bucket = 1
    while a + b * (2 * bucket) <= usable and bucket < 1 << 20:
        bucket *= 2
    fits_one = a + b <= usable
    return max(0, min(n_decode, bucket if fits_one else 0))


def plan_serve(shape: ServeShape, device, usable: float) -> dict:
    from persllm_jax.model.shapes import model_config

    mcfg = model_config(shape.model)
    at = compile_batch(mcfg, shape, device, shape.batch)
    out = {"model": shape.model, "n_params": mcfg.num_params(), "shape": dataclasses.asdict(shape), "asked": at,
           "kv_bytes_per_slot": at["bytes"]["kv_cache"] // shape.batch}
    if not at["fits_compiler"]:
        return out
    twice = compile_batch(mcfg, shape, device, 2 * shape.batch)
    if twice["fits_compiler"]:
        out.update(confirmed_largest(mcfg, shape, device, usable, at, twice))
    return out


def confirmed_largest(mcfg, shape, device, usable, at, twice, tries: int = 4) -> dict:
    """The linear estimate of the largest batch, compiled and stepped down until the compile confirms it: a
    program over its limit scales the batch by usable/peak (decode) or halves the prefill bucket (prefill)."""
    from persllm_jax.serve.engine import _batch_bucket

    known = {shape.batch: at, 2 * shape.batch: twice}
    n = largest_batch(at, twice, usable)
    for _ in range(tries):
        if n <= 0:
            return {"largest_batch": 0, "largest_check": None}
        check = known.get(n) or compile_batch(mcfg, shape, device, n)
        known[n] = check
        if check["fits_compiler"] and check["peak"] <= usable:
            return {"largest_batch": n, "largest_check": check}
        progs = check.get("programs", {})
        if progs and progs["prefill"]["peak"] > usable:
            n = min(n, _batch_bucket(n) // 2)
        else:
            peak = progs["decode"]["peak"] if progs else 2 * usable
            n = min(n - 1, int(n * usable / peak))
    return {"largest_batch": None, "largest_check": None}  # not confirmed: report none rather than a guess


def _worker_main(argv) -> None:
    import jax

    shape, target, usable = ServeShape(**json.loads(argv[0])), argv[1], float(argv[2])
    if target == "cpu":
        device, info = jax.devices("cpu")[0], {"compiler": "cpu"}
    else:
        device, info = topology_devices(TARGETS[target])[0], {"compiler": "tpu", "libtpu": libtpu_version()}
    try:
        result = plan_serve(shape, device, usable)
    except PersllmError as e:
        sys.stderr.write(f"{str(e).splitlines()[0]}\n")
        sys.exit(2)
    print(json.dumps({"target": target, "device_kind": device.device_kind, "jax": jax.__version__, **info,
                      "usable": usable, **result}))


def run_serve_plan(shape: ServeShape, target: str, headroom: float) -> dict:
    """The serve plan in a fresh worker process: TPU compiler for a TPU target, CPU compiler for `cpu`."""
    if target == "cpu":
        cap = capacity("cpu", 1)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PERSLLM_XLA_CACHE="0", XLA_FLAGS="")
    else:
        t = require_target(target, "plan --serve")
        cap, env = t.hbm, worker_env(t)
    result = run_module("persllm_jax.serve.plan", [json.dumps(dataclasses.asdict(shape)), target,
                                                   str(headroom * cap)], env, ServePlanError)
    return {**result, "capacity": cap, "headroom": headroom}


def decode_roofline(r: dict, target: str) -> dict | None:
    """Per decode step of the asked batch: time bound and tokens/s bound (TPU targets: their peak and bandwidth)."""
    if target not in TARGETS or not r["asked"]["fits_compiler"]:
        return None
    t, c = TARGETS[target], r["asked"]["decode_cost"]  # the loop body (one decode step) is counted once
    compute, memory = c["flops"] / t.peak_flops, c["bytes"] / t.hbm_bw
    step_s = max(compute, memory)
    return {"compute_s": compute, "memory_s": memory, "step_s": step_s, "bound": "compute" if compute >= memory
            else "memory", "tokens_per_s": r["asked"]["batch"] / step_s if step_s else 0.0}


def report(r: dict) -> tuple[str, bool]:
    """The plan as text, and whether the asked batch fits."""
    s, a, usable = r["shape"], r["asked"], r["usable"]
    lines = [f"target      {r['target']} ({r['device_kind']}), {r['capacity'] / GiB:.0f} GiB per chip, limit "
             f"{100 * r['headroom']:.0f}% = {usable / GiB:.1f} GiB; compiler {r['compiler']}"
             + (f" (libtpu {r['libtpu']})" if r.get("libtpu") else "") + f", jax {r['jax']}",
             f"model       {r['model']}: {r['n_params'] / 1e9:.2f}B params, one replica per chip, {s['dtype']}",
             f"server      --max-batch {a['batch']} --slot-tokens {a['cache_tokens']} --chunk {s['chunk']} "
             f"--prefill-chunk {s['prefill_chunk']} --max-adapters {s['adapters']} (rank {s['lora_rank']})",
             f"  KV cache per slot: {r['kv_bytes_per_slot'] / 2 ** 20:.1f} MiB ({a['cache_tokens']} tokens)"]
    b = a["bytes"]
    lines += [f"    weights      {gib(b['weights'])}", f"    adapters     {gib(b['adapters'])}",
              f"    KV cache     {gib(b['kv_cache'])}   ({a['batch']} slots)", f"    logits       {gib(b['logits'])}"]
    if not a["fits_compiler"]:
        lines.append(f"  the compiler refuses it: {a['oom']['message']}")
        lines.append(f"  DOES NOT FIT at batch {a['batch']}: try a smaller --max-batch or --slot-tokens")
        return "\n".join(lines), False
    for name, m in a["programs"].items():
        lines.append(f"    {name:<8} temporaries {gib(m['temporaries']).strip()}, peak {gib(m['peak']).strip()}")
    fits = a["peak"] <= usable
    lines.append(f"  peak         {gib(a['peak'])}   {'FITS' if fits else 'DOES NOT FIT'} "
                 f"({'<=' if fits else '>'} {usable / GiB:.1f} GiB)")
    if r.get("largest_batch") is not None:
        chk = r.get("largest_check")
        seen = f", compiled: peak {chk['peak'] / GiB:.2f} GiB" if chk and chk.get("fits_compiler") else ""
        lines.append(f"  largest batch that fits: {r['largest_batch']} slots of {a['cache_tokens']} tokens "
                     f"(linear in the batch from compiles at {a['batch']} and {2 * a['batch']}{seen})")
    roof = decode_roofline(r, r["target"])
    if roof:
        lines.append(f"  decode roofline per step: max({a['decode_cost']['flops'] / 1e9:.1f} GFLOP / peak, "
                     f"{a['decode_cost']['bytes'] / 1e9:.2f} GB / bandwidth) = {1e3 * roof['step_s']:.2f} ms "
                     f"({roof['bound']}-bound): at most {roof['tokens_per_s']:,.0f} tokens/s per chip at batch "
                     f"{a['batch']}" + (f", {TARGETS[r['target']].chips} replicas on {r['target']}: "
                                        f"{TARGETS[r['target']].chips * roof['tokens_per_s']:,.0f} tokens/s"
                                        if r["target"] in TARGETS else ""))
    return "\n".join(lines), fits


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
