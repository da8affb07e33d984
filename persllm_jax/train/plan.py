"""The training plan: will a recipe fit the chips it is meant for? Checked before launch, on a CPU
(`persllm plan`, cli/plan.py).

The train step is compiled ahead of time, exactly as `persllm train sft` compiles it (same mesh, shardings,
donation, remat, dtypes), from abstract shapes only (`jax.eval_shape` of the initialisers: no weights are
loaded or allocated), on emulated CPU devices. XLA's memory analysis of the compiled SPMD program gives the
per-device bytes; we split them into weights, optimizer state, saved activations and temporaries and compare
against the device's capacity.

Caveat: the program is compiled for the CPU backend. Its buffer assignment and fusion differ from TPU/GPU
(and the CPU backend may keep some bf16 arithmetic in fp32), so temporaries are an estimate, usually on
the high side; weights, optimizer state and batch are exact, since they follow from shapes and shardings.

A config names its model as an HF directory, a `config.json` path, a .gguf file, `smollm2`, or a named
shape `shape:NAME` (model/shapes.py) that needs no files at all.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

from persllm_jax.errors import PersllmError
from persllm_jax.model.shapes import SHAPES, hf_config_of, model_config

GiB = 1024 ** 3

DEVICE_KINDS = {  # per-device memory the program may use
    "tpu-v5e": 16 * GiB,
    "tpu-v4": 32 * GiB,
    "h100-80g": 80 * GiB,
    "a100-80g": 80 * GiB,
    "cpu": None,  # host RAM, shared by the emulated devices
}

class PlanError(PersllmError, ValueError):
    pass


def host_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capacity(kind: str, n_devices: int) -> int:
    if kind not in DEVICE_KINDS:
        raise PlanError(f"--device-kind {kind!r}: known kinds are {', '.join(DEVICE_KINDS)}")
    cap = DEVICE_KINDS[kind]
    return cap if cap is not None else host_ram() // n_devices


# --- the plan (runs where the emulated devices are) -----------------------------------------------------


def _bytes_per_device(tree, shardings) -> int:
    import jax

    leaves, sh = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)
    return int(sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, sh)))


def saved_activations(cfg, mcfg, trainable, frozen, micro_rows: int) -> int | None:
    """Bytes of the residuals one micro-batch keeps for its backward pass (global, all rows), from JAX's own
    account of what autodiff saves (`saved_residuals`); arguments (weights, batch) are not counted."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.io import jnp_dtype
    from persllm_jax.model import lora as lora_mod
    from persllm_jax.train.sft import token_nll_sum

    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:  # a private helper: without it the split is not shown
        return None
    dtype, scale = jnp_dtype(cfg.dtype), lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)
    kw = {"dtype": dtype, "remat": cfg.remat, "attention": cfg.attention}
    spec = jax.ShapeDtypeStruct((micro_rows, cfg.max_length), jnp.int32)
    batch = {k: spec for k in ("tokens", "targets", "positions", "segment_ids")}
    batch["weights"] = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
    if cfg.lora.enabled:
        f = lambda t, fr, b: token_nll_sum(fr, mcfg, b, lora=t, lora_scale=scale, **kw)[0]  # noqa: E731
    else:
        f = lambda t, fr, b: token_nll_sum(t, mcfg, b, **kw)[0]  # noqa: E731
    try:
        res = saved_residuals(f, trainable, frozen, batch)
    except Exception:  # noqa: BLE001  (private API; the plan stands without the split)
        return None
    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a, why in res
                   if not str(why).startswith("from the argument")))


def abstract_step(cfg, n_devices: int, devices=None, mcfg=None) -> dict:
    """Everything `persllm train sft` builds before its first step, as shapes: model config, mesh, abstract
    state and frozen base with their shardings, the jitted step (sft.compile_step) and an abstract batch.
    `devices` may be a TPU topology's compile-only devices (tpu_plan.py); `mcfg` overrides cfg.model's config."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.io import jnp_dtype
    from persllm_jax.model.decoder import init_params
    from persllm_jax.train import sft
    from persllm_jax.train import sharding as shd

    mcfg = mcfg or model_config(cfg.model)
    devices = list(devices if devices is not None else jax.devices())[:n_devices]
    if len(devices) < n_devices:
        raise PlanError(f"plan: {n_devices} devices asked for but this process has {len(devices)}")
    mesh = shd.make_train_mesh(cfg.mesh, devices, cfg.batch_size)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    param_dtype = jnp_dtype(getattr(cfg, "param_dtype", "float32"))
    params = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0), param_dtype))
    optimizer, schedule = sft.make_optimizer(cfg, max(cfg.steps, 1000))
    state, frozen = jax.eval_shape(lambda p: sft.initial_state(cfg, mcfg, p, optimizer), params)
    step_fn, st_sh, fr_sh, b_sh = sft.compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh)
    shape = (cfg.grad_accum, cfg.batch_size, cfg.max_length)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    batch["weights"] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return {"mcfg": mcfg, "mesh": mesh, "dp": dp, "param_dtype": param_dtype, "state": state, "frozen": frozen,
            "step_fn": step_fn, "state_shardings": st_sh, "frozen_shardings": fr_sh, "batch": batch,
            "batch_sharding": b_sh}


def static_bytes(a: dict) -> dict:
    """Per-device bytes that follow from shapes and shardings alone (exact on any backend)."""
    st_sh = a["state_shardings"]
    return {"weights": _bytes_per_device(a["frozen"], a["frozen_shardings"])
            + _bytes_per_device(a["state"]["trainable"], st_sh["trainable"]),
            "optimizer": _bytes_per_device(a["state"]["opt_state"], st_sh["opt_state"]),
            "batch": _bytes_per_device(a["batch"], {k: a["batch_sharding"] for k in a["batch"]})}


def compute_plan(cfg, n_devices: int, devices=None) -> dict:
    """Compile the SFT train step for `cfg` on `n_devices` (CPU) devices and account per-device memory."""
    import jax.numpy as jnp

    from persllm_jax.model import lora as lora_mod

    a = abstract_step(cfg, n_devices, devices)
    mcfg, mesh, dp, state, frozen, batch = a["mcfg"], a["mesh"], a["dp"], a["state"], a["frozen"], a["batch"]
    step_fn, param_dtype = a["step_fn"], a["param_dtype"]
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is None:
        raise PlanError("plan: this JAX backend gives no memory analysis")

    fixed = static_bytes(a)
    args, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                              int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    peak = args + out - alias + temp
    saved = saved_activations(cfg, mcfg, state["trainable"], frozen, cfg.batch_size)
    act = None if saved is None else min(temp, saved // dp)
    n_params = mcfg.num_params()
    n_trainable = lora_mod.lora_param_count(state["trainable"]) if cfg.lora.enabled else n_params
    return {
        "model": cfg.model, "n_params": n_params, "n_trainable": n_trainable, "devices": n_devices,
        "mesh": dict(mesh.shape), "lora": cfg.lora.enabled, "dtype": cfg.dtype,
        "param_dtype": str(jnp.dtype(param_dtype)), "remat": cfg.remat, "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "max_length": cfg.max_length, "micro_rows_per_device": cfg.batch_size // dp,
        "bytes": {**fixed,
                  "activations": act, "temporaries": temp - (act or 0), "xla_temp": temp,
                  "arguments": args, "outputs": out, "aliased": alias, "peak": peak},
        "compile_s": compile_s,
    }


# --- the report ----------------------------------------------------------------------------------


def gib(n) -> str:
    return "n/a" if n is None else f"{n / GiB:8.2f} GiB"


def _cap(cap: int) -> str:
    return f"{cap / GiB:.0f}" if cap % GiB == 0 else f"{cap / GiB:.1f}"


def suggestions(cfg, plan: dict, n_devices: int) -> list[tuple[list[str], str]]:
    """(--set changes, why) that lower per-device memory, most effective first."""
    b, out = plan["bytes"], []
    if not cfg.remat:
        out.append((["remat=true"], "recompute each layer in the backward pass: of the "
                    f"{gib(b['activations']).strip()} saved activations about one hidden state per layer stays"))
    if plan["micro_rows_per_device"] > 1:
        out.append(([f"batch_size={cfg.batch_size // 2}", f"grad_accum={cfg.grad_accum * 2}"],
                    "smaller micro-batch, same global batch: activations and temporaries about halve"))
    if plan["mesh"]["data"] > 1:
        out.append((["mesh.data=1", "mesh.fsdp=-1"], "more fsdp: shard weights and optimizer state over all "
                    "devices instead of replicating them in each data-parallel group"))
    else:
        out.append(([], f"more fsdp: --devices {2 * n_devices} (mesh.fsdp=-1) halves the "
                    f"{gib(b['weights'] + b['optimizer']).strip()} of weights and optimizer state per device"))
    if not cfg.lora.enabled:
        out.append((["lora.enabled=true"], "train an adapter: no gradients or optimizer state for the base weights"))
    if cfg.max_length > 1024:
        out.append(([f"max_length={cfg.max_length // 2}"], "shorter packed rows"))
    return out


def format_suggestions(items) -> str:
    return "\n".join("  " + (" ".join(f"--set {s}" for s in sets) + "  " if sets else "") + f"({why})"
                     for sets, why in items)


def report(plan: dict, kind: str, cap: int, headroom: float) -> tuple[str, bool]:
    b = plan["bytes"]
    usable = int(cap * headroom)
    fits = b["peak"] <= usable
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    trained = (f"LoRA ({plan['n_trainable'] / 1e6:.1f}M trainable)" if plan["lora"] else "full fine-tuning")
    lines = [
        f"model       {plan['model']}: {plan['n_params'] / 1e9:.2f}B params, {trained}",
        f"devices     {plan['devices']} x {kind} ({_cap(cap)} GiB each), mesh {mesh}",
        f"step        batch {plan['batch_size']} x {plan['max_length']} tokens ({plan['micro_rows_per_device']} rows "
        f"per device per micro-step), grad_accum {plan['grad_accum']}, compute {plan['dtype']}, weights "
        f"{plan['param_dtype']}, remat {'on' if plan['remat'] else 'off'}",
        "per device (XLA memory analysis of the compiled step; compiled for CPU, see caveat):",
        f"  weights          {gib(b['weights'])}",
        f"  optimizer state  {gib(b['optimizer'])}",
        f"  batch            {gib(b['batch'])}",
        f"  activations      {gib(b['activations'])}   (saved for the backward pass)",
        f"  temporaries      {gib(b['temporaries'])}",
        f"  peak             {gib(b['peak'])}   of {_cap(cap)} GiB ({100 * b['peak'] / cap:.0f}%; "
        f"limit {100 * headroom:.0f}% = {usable / GiB:.1f} GiB)",
        f"compiled in {plan['compile_s']:.1f} s. Caveat: CPU buffer assignment and fusion; temporaries on "
        f"TPU/GPU differ (bf16 may be kept in fp32 on CPU).",
        f"{'FITS' if fits else 'DOES NOT FIT'}: {b['peak'] / GiB:.2f} GiB per device "
        f"{'<=' if fits else '>'} {usable / GiB:.1f} GiB",
    ]
    return "\n".join(lines), fits


WORKER_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_worker(cfg_dict: dict, n_devices: int) -> dict:
    """compute_plan in a fresh CPU process with `n_devices` emulated devices (XLA_FLAGS must be set before JAX
    starts). LLVM optimisation is off there: it changes code speed, not buffers, and halves compile time."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PERSLLM_XLA_CACHE="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices} {WORKER_XLA_FLAGS}")
    return run_module("persllm_jax.train.plan", [json.dumps(cfg_dict), str(n_devices)], env, PlanError)


PROGRESS = "progress: "  # a worker's stderr lines with this prefix reach the user's terminal as they come


def progress(msg: str) -> None:
    """A worker's progress line (long TPU compiles), shown by run_module while the worker runs."""
    sys.stderr.write(f"{PROGRESS}{msg}\n")
    sys.stderr.flush()


def run_module(module: str, args: list[str], env: dict, error=PlanError) -> dict:
    """`python -m module args` in `env`; its last stdout line as JSON, or `error` with its last stderr line.
    The worker's progress lines are passed to our stderr as they come; the rest of its stderr is kept for errors."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stdout = pool.submit(proc.stdout.read)  # drained beside stderr, so neither pipe fills and blocks the worker
        lines = []
        for line in proc.stderr:
            if line.startswith(PROGRESS):
                sys.stderr.write(f"plan: {line[len(PROGRESS):]}")
                sys.stderr.flush()
            elif line.strip():
                lines.append(line.rstrip())
        out = stdout.result()
    if proc.wait() != 0:
        raise error(lines[-1] if lines else f"{module} worker failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def _worker_main(argv):
    from persllm_jax.train.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, None, base=json.loads(argv[0]))
    try:
        plan = compute_plan(cfg, int(argv[1]))
    except PersllmError as e:
        sys.stderr.write(f"{str(e).splitlines()[0]}\n")
        sys.exit(2)
    print(json.dumps(plan))


def load_train_config(config_file, sets=(), model=None, base: dict | None = None):
    """A train config (SFT or DPO YAML; DPO when it has DPO keys), over `base` (e.g. a recipe's sft section).
    The step planned is SFT's; DPO's differs by one reference forward without gradients."""
    from persllm_jax.settings import read_file
    from persllm_jax.train.config import DPOConfig, TrainConfig, load_config

    if base is not None:
        return load_config(TrainConfig, None, sets, base={**base, **({"model": model} if model else {})})
    doc = read_file(config_file)
    base = {"model": model} if model else None
    dpo_keys = {f.name for f in dataclasses.fields(DPOConfig)} - {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = load_config(DPOConfig if dpo_keys & set(doc) else TrainConfig, config_file, sets, base=base)
    if model:  # --model beats the file
        cfg.model = model
    return cfg


def default_devices(cfg) -> int:
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    return 1 if -1 in sizes else math.prod(sizes)


def plan_config_dict(cfg) -> dict:
    """What the worker needs: the TrainConfig fields of `cfg` (DPO-only keys dropped)."""
    from persllm_jax.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


__all__ = ["compute_plan", "abstract_step", "static_bytes", "load_train_config", "report",
           "suggestions", "format_suggestions", "capacity", "model_config", "hf_config_of", "run_worker", "SHAPES",
           "DEVICE_KINDS", "PlanError"]

if __name__ == "__main__":
    _worker_main(sys.argv[1:])
