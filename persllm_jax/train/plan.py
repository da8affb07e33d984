"""`persllm plan`: will a training recipe fit the chips it is meant for? Checked before launch, on a CPU.

The train step is compiled ahead of time, exactly as `persllm train sft` compiles it (same mesh, shardings,
donation, remat, dtypes), from abstract shapes only (`jax.eval_shape` of the initialisers: no weights are
loaded or allocated), on emulated CPU devices. XLA's memory analysis of the compiled SPMD program gives the
per-device bytes; we split them into weights, optimizer state, saved activations and temporaries and compare
against the device's capacity.

Caveat: the program is compiled for the CPU backend. Its buffer assignment and fusion differ from TPU/GPU
(and the CPU backend may keep some bf16 arithmetic in fp32), so temporaries are an estimate, usually on
the high side; weights, optimizer state and batch are exact, since they follow from shapes and shardings.

A config names its model as an HF directory, a `config.json` path, a .gguf file, `smollm2`, or a named
shape `shape:NAME` (see SHAPES) that needs no files at all.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 1024 ** 3

DEVICE_KINDS = {  # per-device memory the program may use
    "tpu-v5e": 16 * GiB,
    "tpu-v4": 32 * GiB,
    "h100-80g": 80 * GiB,
    "a100-80g": 80 * GiB,
    "cpu": None,  # host RAM, shared by the emulated devices
}

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

SHAPES: dict[str, dict] = {  # HF config.json fields of public architectures (weights not needed to plan)
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False, max_position_embeddings=131072,
                     rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                       tie_word_embeddings=False, max_position_embeddings=32768),
}


class PlanError(ValueError):
    pass


def hf_config_of(model: str) -> tuple[dict, str]:
    """(HF config dict, where it came from) for a model spec, without reading any weights."""
    if model.startswith("shape:"):
        name = model[len("shape:"):]
        if name not in SHAPES:
            raise PlanError(f"model {model!r}: unknown shape; known: {', '.join('shape:' + s for s in SHAPES)}")
        return dict(SHAPES[name]), model
    from persllm_jax.model.weights import WeightsError, resolve_model_path

    if model.endswith(".json"):
        path = model
    else:
        try:
            path = resolve_model_path(model)
        except WeightsError as e:
            raise PlanError(str(e).splitlines()[0]) from None
    p = Path(path)
    if p.suffix == ".gguf":
        import gguf

        from persllm_jax.model.weights import gguf_hf_config

        return gguf_hf_config(gguf.GGUFReader(str(p)), str(p)), str(p)
    cfg_file = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(cfg_file.read_text()), str(cfg_file)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"model {model!r}: cannot read {cfg_file}: {e}") from None


def model_config(model: str):
    from persllm_jax.model.config import from_hf_dict

    hf, source = hf_config_of(model)
    return from_hf_dict(hf, source)


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


def _saved_activations(cfg, mcfg, trainable, frozen, micro_rows: int) -> int | None:
    """Bytes of the residuals one micro-batch keeps for its backward pass (global, all rows), from JAX's own
    account of what autodiff saves (`saved_residuals`); arguments (weights, batch) are not counted."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.model import lora as lora_mod
    from persllm_jax.train.sft import DTYPES, token_nll_sum

    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:  # a private helper: without it the split is not shown
        return None
    dtype, scale = DTYPES[cfg.dtype], lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)
    spec = jax.ShapeDtypeStruct((micro_rows, cfg.max_length), jnp.int32)
    batch = {k: spec for k in ("tokens", "targets", "positions", "segment_ids")}
    batch["weights"] = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
    if cfg.lora.enabled:
        f = lambda t, fr, b: token_nll_sum(fr, mcfg, b, lora=t, lora_scale=scale, dtype=dtype, remat=cfg.remat)[0]  # noqa: E731
    else:
        f = lambda t, fr, b: token_nll_sum(t, mcfg, b, dtype=dtype, remat=cfg.remat)[0]  # noqa: E731
    try:
        res = saved_residuals(f, trainable, frozen, batch)
    except Exception:  # noqa: BLE001  (private API; the plan stands without the split)
        return None
    return int(sum(math.prod(a.shape) * a.dtype.itemsize for a, why in res
                   if not str(why).startswith("from the argument")))


def abstract_step(cfg, n_devices: int, devices=None) -> dict:
    """Everything `persllm train sft` builds before its first step, as shapes: model config, mesh, abstract
    state and frozen base with their shardings, the jitted step (train.compile_step) and an abstract batch."""
    import jax
    import jax.numpy as jnp

    from persllm_jax.model import lora as lora_mod
    from persllm_jax.train import sharding as shd
    from persllm_jax.train import sft as T
    from persllm_jax.model.decoder import init_params

    mcfg = model_config(cfg.model)
    devices = list(devices if devices is not None else jax.devices())[:n_devices]
    if len(devices) < n_devices:
        raise PlanError(f"plan: {n_devices} devices asked for but this process has {len(devices)}")
    mesh = shd.make_mesh(cfg.mesh, devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % dp:
        raise shd.MeshError(f"batch_size ({cfg.batch_size}) must divide by mesh data*fsdp ({dp})")
    param_dtype = T.DTYPES[getattr(cfg, "param_dtype", "float32")]
    params = jax.eval_shape(lambda: init_params(mcfg, jax.random.PRNGKey(0), param_dtype))
    optimizer, schedule = T.make_optimizer(cfg, max(cfg.steps, 1000))

    def init(params):  # train.init_state without placement
        if cfg.lora.enabled:
            trainable = lora_mod.init_lora(mcfg, jax.random.PRNGKey(0), cfg.lora.rank, cfg.lora.targets)
            frozen = params
        else:
            trainable, frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), {}
        return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
                "rng": jax.random.PRNGKey(0)}, frozen

    state, frozen = jax.eval_shape(init, params)
    step_fn, st_sh, fr_sh, b_sh = T.compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh)
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
    saved = _saved_activations(cfg, mcfg, state["trainable"], frozen, cfg.batch_size)
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


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / GiB:8.2f} GiB"


def _cap(cap: int) -> str:
    return f"{cap / GiB:.0f}" if cap % GiB == 0 else f"{cap / GiB:.1f}"


def suggestions(cfg, plan: dict, n_devices: int) -> list[tuple[list[str], str]]:
    """(--set changes, why) that lower per-device memory, most effective first."""
    b, out = plan["bytes"], []
    if not cfg.remat:
        out.append((["remat=true"], "recompute each layer in the backward pass: of the "
                    f"{_gib(b['activations']).strip()} saved activations about one hidden state per layer stays"))
    if plan["micro_rows_per_device"] > 1:
        out.append(([f"batch_size={cfg.batch_size // 2}", f"grad_accum={cfg.grad_accum * 2}"],
                    "smaller micro-batch, same global batch: activations and temporaries about halve"))
    if plan["mesh"]["data"] > 1:
        out.append((["mesh.data=1", "mesh.fsdp=-1"], "more fsdp: shard weights and optimizer state over all "
                    "devices instead of replicating them in each data-parallel group"))
    else:
        out.append(([], f"more fsdp: --devices {2 * n_devices} (mesh.fsdp=-1) halves the "
                    f"{_gib(b['weights'] + b['optimizer']).strip()} of weights and optimizer state per device"))
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
        f"  weights          {_gib(b['weights'])}",
        f"  optimizer state  {_gib(b['optimizer'])}",
        f"  batch            {_gib(b['batch'])}",
        f"  activations      {_gib(b['activations'])}   (saved for the backward pass)",
        f"  temporaries      {_gib(b['temporaries'])}",
        f"  peak             {_gib(b['peak'])}   of {_cap(cap)} GiB ({100 * b['peak'] / cap:.0f}%; "
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
    proc = subprocess.run([sys.executable, "-m", "persllm_jax.train.plan", json.dumps(cfg_dict), str(n_devices)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise PlanError(lines[-1] if lines else f"plan worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_main(argv):
    from persllm_jax.train.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, None, base=json.loads(argv[0]))
    try:
        plan = compute_plan(cfg, int(argv[1]))
    except (PlanError, ValueError) as e:
        sys.stderr.write(f"{str(e).splitlines()[0]}\n")
        sys.exit(2)
    print(json.dumps(plan))


def load_train_config(config_file, sets=(), model=None):
    """A train config: an SFT or DPO YAML, or a `persllm reproduce` recipe (its `sft` section). The step planned
    is SFT's; DPO's differs by one reference forward without gradients."""
    import dataclasses

    import yaml

    from persllm_jax.train.config import ConfigError, TrainConfig, load_config

    try:
        doc = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{config_file}: cannot read config: {str(e).splitlines()[0]}") from None
    if isinstance(doc, dict) and ("sft" in doc or "include" in doc):  # a reproduce recipe
        from persllm_jax.pipeline import stages as reproduce

        try:
            sft = reproduce.train_config(reproduce.load(config_file), "sft")
        except reproduce.ReproduceError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        base = {k: v for k, v in dataclasses.asdict(sft).items() if k in names}
        if model:
            base["model"] = model
        return load_config(TrainConfig, None, sets, base=base)
    base = {"model": model} if model else None
    try:
        cfg = load_config(TrainConfig, config_file, sets, base=base)
    except ConfigError as e:
        try:
            from persllm_jax.train.config import DPOConfig
        except ImportError:
            raise e from None
        if "unknown config key" not in str(e):
            raise
        cfg = load_config(DPOConfig, config_file, sets, base=base)
    if model:  # --model beats the file
        cfg.model = model
    return cfg


def _default_devices(cfg) -> int:
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    return 1 if -1 in sizes else math.prod(sizes)


def plan_config_dict(cfg) -> dict:
    """What the worker needs: the TrainConfig fields of `cfg` (DPO-only keys dropped)."""
    import dataclasses

    from persllm_jax.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def _click_command():
    import click

    help_text = ("Compile the train step of CONFIG_FILE for N emulated devices and check it fits the chip's memory.\n\n"
                 "CONFIG_FILE is a train config (SFT or DPO) or a `persllm reproduce` recipe (its sft stage). No "
                 "weights are read: the model may be a named shape, e.g. `model: shape:llama-8b` (shapes: "
                 + ", ".join(SHAPES) + "). Exits 1 when the step does not fit, with fixes to try. See docs/scale.md.")

    @click.command("plan", help=help_text)
    @click.argument("config_file", type=click.Path(dir_okay=False))
    @click.option("--devices", "n_devices", type=int, default=None,
                  help="Devices to plan for (default: the config's mesh size, or 1 when an axis is -1).")
    @click.option("--device-kind", "kind", type=click.Choice(list(DEVICE_KINDS)), default="cpu", show_default=True,
                  help="Chip whose memory the plan is checked against.")
    @click.option("--model", default=None, help="Override the config's model (HF dir, config.json, .gguf, shape:NAME).")
    @click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
    @click.option("--headroom", type=float, default=0.9, show_default=True,
                  help="Fraction of the device memory the step may use (the rest: runtime, fragmentation).")
    @click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
    def plan(config_file, n_devices, kind, model, sets, headroom, as_json):
        from persllm_jax.train.sharding import MeshError
        from persllm_jax.train.config import ConfigError

        try:
            cfg = load_train_config(config_file, sets, model)
            n = n_devices or _default_devices(cfg)
            cap = capacity(kind, n)
            result = run_worker(plan_config_dict(cfg), n)
        except (PlanError, ConfigError, MeshError, FileNotFoundError) as e:
            raise click.ClickException(str(e).splitlines()[0]) from None
        text, fits = report(result, kind, cap, headroom)
        if as_json:
            fixes = [] if fits else [{"set": a, "why": w} for a, w in suggestions(cfg, result, n)]
            click.echo(json.dumps({**result, "device_kind": kind, "capacity": cap, "fits": fits, "suggestions": fixes},
                                  indent=1))
        else:
            click.echo(text)
        if not fits:
            fixes = format_suggestions(suggestions(cfg, result, n))
            raise click.ClickException(f"{config_file}: the step needs {result['bytes']['peak'] / GiB:.2f} GiB per "
                                       f"device, more than {headroom * cap / GiB:.1f} GiB on {n} x {kind}. "
                                       f"Try:\n{fixes}")

    return plan


plan_command = _click_command()

__all__ = ["compute_plan", "abstract_step", "static_bytes", "load_train_config", "plan_command", "report",
           "suggestions", "format_suggestions", "capacity", "model_config", "hf_config_of", "run_worker", "SHAPES",
           "DEVICE_KINDS", "PlanError"]

if __name__ == "__main__":
    _worker_main(sys.argv[1:])
