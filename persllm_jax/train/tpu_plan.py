"""`persllm plan CONFIG --target tpu-...`: the SFT and DPO train steps compiled by the real TPU compiler, no TPU needed
(the worker: `python -m persllm_jax.train.tpu_plan`; roofline and report in tpu_report.py).

libtpu compiles for a TPU topology with no chip attached (deviceless ahead-of-time compilation, as MaxText's
train_compile.py does): `jax.experimental.topologies.get_topology_desc` gives compile-only devices, and
`jit(step).lower(...).compile()` over a mesh of them runs the TPU compiler's SPMD partitioning, fusion and buffer
assignment. The steps are built exactly as `persllm train sft|dpo` builds them (plan.abstract_step,
sft.initial_state, dpo.make_dpo_step, sft.compile_step: same mesh, shardings, donation, remat, dtypes), from
abstract shapes only. Per chip the worker reports the TPU compiler's memory analysis (split as plan.compute_plan
splits it), its cost analysis (for tpu_report.roofline) and the dtypes the compiled matmuls multiply.

XLA's cost analysis counts a loop body once, and the layers are one `scan`: the costs come from one micro-step of
the same step with 1 and 2 layers and every scan unrolled, extrapolated linearly to L layers (the layers are
identical) and multiplied by grad_accum. These costs-only compiles take longer than the real one (an 8B SFT step
at 3000 tokens on 2 cores: 285 s to compile, 1195 s for its costs with both micro-steps unrolled).
The roofline is a bound (no overlap losses, no collectives' latency): real steps are slower.

The compile runs in a subprocess (libtpu's environment variables stay there). Without libtpu:
`pip install "persllm-jax[tpu-aot]"`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass

from persllm_jax.errors import PersllmError
from persllm_jax.train.plan import GiB, progress, run_module

INSTALL_HINT = 'pip install "persllm-jax[tpu-aot]"  (libtpu==0.0.42.1, the TPU compiler matching jax 0.10.2)'


@dataclass(frozen=True)
class Target:
    topology: str  # get_topology_desc name
    chips: int  # JAX devices (one per chip; v4 and v5p chips are megacore: 2 TensorCores, one device)
    hbm: int  # bytes per chip
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bw: float  # bytes/s per chip
    accelerator: str  # TPU_ACCELERATOR_TYPE
    chip_config: str = "default"  # "megacore" for v4 / v5p
    source: str = ""


_V4 = "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1200 GB/s, 275 bf16 TFLOP/s per chip"
_V5E = "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 819 GB/s, 197 bf16 TFLOP/s per chip"
_V5P = "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 2765 GB/s, 459 bf16 TFLOP/s per chip"
_V6E = "cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 1640 GB/s, 918 bf16 TFLOP/s per chip"
TARGETS: dict[str, Target] = {
    "tpu-v4-8": Target("v4:2x2x1", 4, 32 * GiB, 275e12, 1200e9, "v4-8", "megacore", _V4),
    "tpu-v4-16": Target("v4:2x2x2", 8, 32 * GiB, 275e12, 1200e9, "v4-16", "megacore", _V4),
    "tpu-v5e-8": Target("v5e:2x4", 8, 16 * GiB, 197e12, 819e9, "v5litepod-8", source=_V5E),
    "tpu-v5e-16": Target("v5e:4x4", 16, 16 * GiB, 197e12, 819e9, "v5litepod-16", source=_V5E),
    "tpu-v5p-8": Target("v5p:2x2x1", 4, 95 * GiB, 459e12, 2765e9, "v5p-8", "megacore", _V5P),
    "tpu-v6e-8": Target("v6e:2x4", 8, 32 * GiB, 918e12, 1640e9, "v6e-8", source=_V6E),
}


class TPUPlanError(PersllmError, ValueError):
    """No TPU compiler, an unknown target, or a worker that failed for a reason worded for the user."""


def libtpu_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("libtpu")
    except md.PackageNotFoundError:
        return None


def worker_env(target: Target) -> dict:
    """libtpu's settings for a compile-only process: no metadata server, one local worker, no TPU runtime
    (JAX_PLATFORMS=cpu: the topology's devices are compile-only), no lock against other libtpu processes."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PERSLLM_XLA_CACHE="0", TPU_SKIP_MDS_QUERY="1",
                TPU_ACCELERATOR_TYPE=target.accelerator, TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0",
                ALLOW_MULTIPLE_LIBTPU_LOAD="1", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS=os.environ.get("PERSLLM_TPU_XLA_FLAGS", ""))


def topology_devices(target: Target):
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                        chip_config_name=target.chip_config).devices


# --- building and compiling the steps (in the worker) ----------------------------------------------


@contextlib.contextmanager
def unrolled_scans():
    """Every `jax.lax.scan` traced inside is fully unrolled (for cost analysis only: no loops left to undercount)."""
    import jax

    orig = jax.lax.scan
    jax.lax.scan = lambda *a, **k: orig(*a, **{**k, "unroll": True})
    try:
        yield
    finally:
        jax.lax.scan = orig


DPO_PAIRS_PER_ROW = 8  # S of the planned DPO batch; the completion budget K is max_length (the worst case)


def abstract_dpo_step(cfg, devices, mcfg) -> dict:
    """dpo.run's step as shapes: LoRA trains a fresh adapter on the merged base (the reference is the base with the
    adapter off); full fine-tuning keeps a frozen reference copy unless `precompute_ref`."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.io import jnp_dtype
    from persllm_jax.model import lora as lora_mod
    from persllm_jax.model.decoder import init_params
    from persllm_jax.train import dpo, dpo_data, sft
    from persllm_jax.train import sharding as shd

    mesh = shd.make_train_mesh(cfg.mesh, devices, cfg.batch_size)
    param_dtype = jnp_dtype(getattr(cfg, "param_dtype", "float32"))
    params = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0), param_dtype))
    optimizer, schedule = sft.make_optimizer(cfg, max(cfg.steps, 1000))
    online = not cfg.precompute_ref

    def init(params):
        state, frozen = sft.initial_state(cfg, mcfg, params, optimizer)
        if not cfg.lora.enabled:  # as dpo.run: the reference is a frozen copy, or nothing once precomputed
            frozen = params if online else {}
        return state, frozen

    state, frozen = jax.eval_shape(init, params)
    step = dpo.make_dpo_step(cfg, mcfg, optimizer, schedule, online)
    step_fn, st_sh, fr_sh, b_sh = sft.compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh, step=step,
                                                   batch_keys=dpo_data.BATCH_KEYS)
    rows, completions, pairs = cfg.max_length, cfg.max_length, DPO_PAIRS_PER_ROW
    width = {**{k: rows for k in dpo_data.ROW_KEYS}, **{k: completions for k in dpo_data.COMP_KEYS},
             **{k: pairs for k in dpo_data.PAIR_KEYS}}
    batch = {k: jax.ShapeDtypeStruct((cfg.grad_accum, cfg.batch_size, n),
                                     jnp.float32 if k in dpo_data.FLOAT_KEYS else jnp.int32)
             for k, n in width.items()}
    n_lora = lora_mod.lora_param_count(state["trainable"]) if cfg.lora.enabled else None
    return {"mcfg": mcfg, "mesh": mesh, "dp": mesh.shape["data"] * mesh.shape["fsdp"], "param_dtype": param_dtype,
            "state": state, "frozen": frozen, "step_fn": step_fn, "state_shardings": st_sh,
            "frozen_shardings": fr_sh, "batch": batch, "batch_sharding": b_sh,
            "flops_per_token": dpo.dpo_flops_per_token(mcfg, cfg.max_length, n_lora, online)}


def abstract_stage(stage: str, cfg, devices, mcfg) -> dict:
    """The abstract step of "sft" (plan.abstract_step) or "dpo", with its model FLOPs per token."""
    from persllm_jax.model import lora as lora_mod
    from persllm_jax.train import sft
    from persllm_jax.train.plan import abstract_step

    if stage == "dpo":
        return abstract_dpo_step(cfg, devices, mcfg)
    a = abstract_step(cfg, len(devices), devices, mcfg=mcfg)
    n_lora = lora_mod.lora_param_count(a["state"]["trainable"]) if cfg.lora.enabled else None
    a["flops_per_token"] = sft.flops_per_token(mcfg, cfg.max_length, n_lora)
    return a


def compiled_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program (per device)."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0)),
            "transcendentals": float(c.get("transcendentals", 0.0)),
            "optimal_s": float(c.get("optimal_seconds", 0.0))}


def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program (per device), with its peak: arguments + outputs - aliased
    (donated) + temporaries."""
    m = compiled.memory_analysis()
    args, out, alias, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                              int(m.temp_size_in_bytes))
    return {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp, "peak": args + out - alias + temp}


def require_target(name: str, command: str = "plan") -> Target:
    """The TPU target named, with the TPU compiler installed; else a one-line error saying what to do."""
    if name not in TARGETS:
        raise TPUPlanError(f"--target {name!r}: known targets are cpu, {', '.join(TARGETS)}")
    if libtpu_version() is None:
        raise TPUPlanError(f"{command} --target {name}: the TPU compiler (libtpu) is not installed. {INSTALL_HINT}")
    return TARGETS[name]


def _unrolled_layers_cost(stage: str, cfg, devices, mcfg) -> dict:
    costs, layers = [], mcfg.num_layers
    for n in ((layers,) if layers <= 2 else (1, 2)):
        a = abstract_stage(stage, cfg, devices, dataclasses.replace(mcfg, num_layers=n))
        with unrolled_scans():
            lowered = a["step_fn"].lower(a["state"], a["frozen"], a["batch"])
        costs.append(compiled_cost(lowered.compile()))
    if len(costs) == 1:
        return costs[0]
    one, two = costs
    return {k: one[k] + (layers - 1) * (two[k] - one[k]) for k in one}


def layer_extrapolated_cost(stage: str, cfg, devices, mcfg, dp: int) -> dict | None:
    """Per-chip cost of the step with L layers from compiles with 1 and 2 layers, all scans unrolled (L <= 2: the
    step itself, unrolled), of one micro-step scaled by grad_accum: the micro-steps are identical, and unrolling
    them all multiplies the compile's time and host memory for nothing (the scaling overcounts the once-per-step
    optimizer update, small next to the micro-steps). Unrolled, every iteration's buffers may be live at once, and
    the TPU compiler refuses a program over the chip's HBM even for costs alone (libtpu's HBM size flag only lowers
    the limit): then the costs come from one row per chip, scaled by the rows per chip as well (marked
    `scaled_from_one_row`), or are None when even that is refused. `scale` is the factor applied."""
    rows = cfg.batch_size // dp
    tries = [(cfg.grad_accum, dataclasses.replace(cfg, grad_accum=1))]
    if rows > 1:
        tries.append((cfg.grad_accum * rows, dataclasses.replace(cfg, batch_size=dp, grad_accum=1)))
    for scale, c in tries:
        try:
            one = _unrolled_layers_cost(stage, c, devices, mcfg)
        except Exception as e:  # noqa: BLE001
            if parse_oom(str(e)) is None:
                raise
            progress(f"{stage}: the unrolled costs-only compile exceeds HBM at {c.batch_size // dp} rows per chip")
            continue
        cost = {**{k: v * scale for k, v in one.items()}, "scale": scale}
        return {**cost, "scaled_from_one_row": scale} if c.batch_size < cfg.batch_size else cost
    return None


_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_SIZE = r"([\d.]+)([KMGT])"
_OOM_FORMS = (re.compile(rf"required[^(]*\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
              re.compile(rf"Used {_SIZE} of {_SIZE} hbm"))


def parse_oom(msg: str) -> dict | None:
    """{message, needed, available} from the TPU compiler's out-of-memory refusal, or None for other errors."""
    if "RESOURCE_EXHAUSTED" not in msg:
        return None
    out = {"message": msg.strip().splitlines()[0][:400]}
    for form in _OOM_FORMS:
        m = form.search(msg)
        if m:
            out.update(needed=float(m.group(1)) * _UNIT[m.group(2)], available=float(m.group(3)) * _UNIT[m.group(4)])
            break
    return out


def compile_stage(stage: str, cfg, devices, costs: bool = True) -> dict:
    """Compile one stage's real step for the topology; memory, cost (unless not `costs`: the costs-only compiles
    take longer than the step's own), roofline inputs and matmul dtypes."""
    import jax.numpy as jnp

    from persllm_jax.model.shapes import model_config
    from persllm_jax.train.hlo_stats import matmul_dtypes
    from persllm_jax.train.plan import saved_activations, static_bytes

    mcfg = model_config(cfg.model)
    a = abstract_stage(stage, cfg, devices, mcfg)
    fixed = static_bytes(a)
    base = {"stage": stage, "model": cfg.model, "n_params": mcfg.num_params(), "lora": cfg.lora.enabled,
            "mesh": dict(a["mesh"].shape), "dtype": cfg.dtype, "remat": cfg.remat, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "max_length": cfg.max_length,
            "micro_rows_per_device": cfg.batch_size // a["dp"], "flops_per_token": a["flops_per_token"],
            "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.max_length}
    progress(f"{stage}: compiling the step with the TPU compiler ({len(devices)} x {devices[0].device_kind}; "
             f"minutes for a 3-8B model)")
    t0 = time.perf_counter()
    try:
        compiled = a["step_fn"].lower(a["state"], a["frozen"], a["batch"]).compile()
    except Exception as e:  # noqa: BLE001  (the compiler's refusal is the result)
        oom = parse_oom(str(e))
        if oom is None:
            raise
        return {**base, "fits_compiler": False, "oom": oom, "bytes": fixed, "compile_s": time.perf_counter() - t0}
    compile_s = time.perf_counter() - t0
    mem = compiled_memory(compiled)
    progress(f"{stage}: compiled in {compile_s:.0f} s, peak {mem['peak'] / GiB:.2f} GiB per chip" +
             ("; cost analysis (one micro-step with 1 and 2 layers, scans unrolled)" if costs else ""))
    temp = mem["temporaries"]
    act = None
    if stage == "sft":
        saved = saved_activations(cfg, mcfg, a["state"]["trainable"], a["frozen"], cfg.batch_size)
        act = None if saved is None else min(temp, saved // a["dp"])
    text = compiled.as_text()
    t1, cost = time.perf_counter(), None
    if costs:
        cost = layer_extrapolated_cost(stage, cfg, devices, mcfg, a["dp"])
        progress(f"{stage}: cost analysis in {time.perf_counter() - t1:.0f} s")
    return {**base, "fits_compiler": True, "compile_s": compile_s, "cost_s": time.perf_counter() - t1,
            "cost_skipped": not costs,
            "bytes": {**fixed, **mem, "activations": act, "temporaries": temp - (act or 0), "xla_temp": temp},
            "cost": cost, "cost_rolled": compiled_cost(compiled),
            "matmuls": matmul_dtypes(text), "param_dtype": str(jnp.dtype(a["param_dtype"]))}


def _worker_main(argv) -> None:
    import jax

    from persllm_jax.train.config import DPOConfig, TrainConfig, load_config

    stages, target, costs = json.loads(argv[0]), TARGETS[argv[1]], argv[2:3] != ["no-costs"]
    devices = topology_devices(target)
    out = {"target": argv[1], "compiler": "tpu", "libtpu": libtpu_version(), "jax": jax.__version__,
           "device_kind": devices[0].device_kind, "stages": {}}
    for stage, d in stages.items():
        cfg = load_config(DPOConfig if stage == "dpo" else TrainConfig, None, base=d)
        try:
            out["stages"][stage] = compile_stage(stage, cfg, devices, costs)
        except PersllmError as e:  # config / mesh errors
            sys.stderr.write(f"{stage}: {str(e).splitlines()[0]}\n")
            sys.exit(2)
    print(json.dumps(out))


def run_tpu_worker(stages: dict[str, dict], target_name: str, costs: bool = True) -> dict:
    """The worker in a fresh process with libtpu's environment; stages = {"sft"|"dpo": config dict}; without
    `costs`, memory only (no roofline)."""
    target = require_target(target_name)
    return run_module("persllm_jax.train.tpu_plan", [json.dumps(stages), target_name, "costs" if costs else "no-costs"],
                      worker_env(target), TPUPlanError)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
