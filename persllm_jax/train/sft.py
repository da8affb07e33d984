"""SFT training: a pure, jitted train step over (state, frozen base, batch) and the loop around it.

state = {"step", "trainable", "opt_state", "rng"}; `trainable` is the LoRA adapter (or all weights when
`lora.enabled` is false) and is the only thing with gradients and optimizer state. A batch is
`[grad_accum, batch_size, max_length]`; the step scans the micro-batches, sums token losses and gradients,
and normalises once by the number of trained tokens, so accumulation equals one big batch.

MFU counts model FLOPs per non-padding token (stated in `flops_per_token`) against a peak measured with a
large matmul on this machine (or `peak_tflops`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from persllm_jax.train import checkpoint
from persllm_jax.train import data as data_mod
from persllm_jax.train import distributed
from persllm_jax.model import lora as lora_mod
from persllm_jax.train import sharding as shd
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import hidden_states, linear_shapes, logits_from_hidden
from persllm_jax.train.config import TrainConfig, save_config, to_dict

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --- loss and step ---------------------------------------------------------------------------------


def token_nll_sum(params, mcfg: ModelConfig, batch: dict, *, lora=None, lora_scale=1.0, dtype=jnp.float32,
                  remat=False):
    """(sum of fp32 token NLL over weighted targets, sum of weights) for one [B, T] batch."""
    h = hidden_states(params, mcfg, batch["tokens"], batch["positions"], batch["segment_ids"], lora=lora,
                      lora_scale=lora_scale, dtype=dtype, remat=remat)
    logits = logits_from_hidden(params, h)  # fp32
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum((logz - picked) * w), jnp.sum(w)


def make_optimizer(cfg: TrainConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1), cfg.learning_rate * cfg.min_lr_ratio)
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: bool(np.ndim(x) >= 2 and "norm" not in shd.path_str(p)), tree)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def make_train_step(cfg: TrainConfig, mcfg: ModelConfig, optimizer, schedule):
    dtype, use_lora = DTYPES[cfg.dtype], cfg.lora.enabled
    scale = lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)

    def loss_fn(trainable, frozen, mb, key):
        if use_lora:
            adapter = lora_mod.with_dropout(trainable, key, cfg.lora.dropout)
            return token_nll_sum(frozen, mcfg, mb, lora=adapter, lora_scale=scale, dtype=dtype, remat=cfg.remat)
        return token_nll_sum(trainable, mcfg, mb, dtype=dtype, remat=cfg.remat)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        rng, key = jax.random.split(state["rng"])
        n_micro = batch["tokens"].shape[0]

        def micro(carry, xs):
            gsum, lsum, wsum = carry
            mb, i = xs
            (loss, w), g = grad_fn(state["trainable"], frozen, mb, jax.random.fold_in(key, i))
            gsum = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), gsum, g)
            return (gsum, lsum + loss, wsum + w), None

        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
        (gsum, lsum, wsum), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                             (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(wsum, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, gsum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {"loss": lsum / denom, "trained_tokens": wsum, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"])}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": rng}, metrics

    return step


def state_shardings(state, frozen, mesh):
    rep = shd.replicated(mesh)
    t_sh = shd.tree_shardings(state["trainable"], mesh)
    return {"step": rep, "rng": rep, "trainable": t_sh,
            "opt_state": opt_state_shardings(state["opt_state"], state["trainable"], t_sh, mesh)}, \
        shd.tree_shardings(frozen, mesh)


def opt_state_shardings(opt_state, trainable, t_sh, mesh):
    """Optimizer moments shard like their parameters; counters are replicated."""
    struct = jax.tree_util.tree_structure(trainable)
    rep = shd.replicated(mesh)

    def walk(node):
        if jax.tree_util.tree_structure(node) == struct:
            return t_sh
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(c) for c in node])
        if isinstance(node, (tuple, list)):
            return type(node)(walk(c) for c in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return jax.tree_util.tree_map(lambda _: rep, node)

    return walk(opt_state)


SFT_BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


def compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh, step=None, batch_keys=SFT_BATCH_KEYS):
    """The jitted step on the mesh (SFT's unless `step` is given, e.g. DPO's, with its `batch_keys`)."""
    st_sh, fr_sh = state_shardings(state, frozen, mesh)
    b_sh = shd.batch_sharding(mesh)
    batch_sh = {k: b_sh for k in batch_keys}
    step = step or make_train_step(cfg, mcfg, optimizer, schedule)
    jitted = jax.jit(shd.in_mesh(step, mesh), in_shardings=(st_sh, fr_sh, batch_sh),
                     out_shardings=(st_sh, shd.replicated(mesh)),
                     donate_argnums=(0,))
    return jitted, st_sh, fr_sh, b_sh


def init_state(cfg: TrainConfig, mcfg: ModelConfig, params, optimizer, mesh):
    """(state, frozen) placed on the mesh. LoRA: trainable = fresh adapter (B = 0), frozen = base."""
    key = jax.random.PRNGKey(cfg.seed)
    init_key, rng = jax.random.split(key)
    if cfg.lora.enabled:
        trainable, frozen = lora_mod.init_lora(mcfg, init_key, cfg.lora.rank, cfg.lora.targets), params
    else:
        trainable, frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), {}
    trainable = shd.shard_tree(trainable, shd.tree_shardings(trainable, mesh))
    frozen = shd.shard_tree(frozen, shd.tree_shardings(frozen, mesh))
    opt_state = optimizer.init(trainable)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": opt_state, "rng": rng}
    st_sh, _ = state_shardings(state, frozen, mesh)
    return shd.shard_tree(state, st_sh), frozen


# --- FLOPs and MFU ---------------------------------------------------------------------------------


def flops_per_token(mcfg: ModelConfig, seq_len: int, lora_params: int | None) -> float:
    """Model FLOPs of one training step per (non-padding) token.

    N = matmul weights of the decoder layers + the vocabulary projection; attention A = 4·L·H·hd·T
    (QKᵀ and PV, forward, T = row length). Full fine-tuning: 6N + 3A (PaLM). LoRA: the frozen matmuls
    need forward and input gradients but no weight gradients, so 4N + 6N_lora + 3A.
    """
    n = mcfg.num_layers * sum(i * o for i, o in linear_shapes(mcfg).values()) + mcfg.hidden_size * mcfg.vocab_size
    attn = 4 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * seq_len
    if lora_params is None:
        return 6.0 * n + 3.0 * attn
    return 4.0 * n + 6.0 * lora_params + 3.0 * attn


def measure_peak_flops(dim: int = 2048, reps: int = 5) -> float:
    """Achieved FLOP/s of a large fp32 matmul on device 0 (the machine's practical peak)."""
    x = jax.device_put(jnp.ones((dim, dim), jnp.float32) * 0.5, jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return 2.0 * dim ** 3 * reps / (time.perf_counter() - t)


def peak_flops(cfg: TrainConfig) -> float:
    n = jax.device_count()
    if jax.devices()[0].platform == "cpu":
        n = 1  # emulated CPU devices share the same cores
    return (cfg.peak_tflops * 1e12 if cfg.peak_tflops > 0 else measure_peak_flops()) * n


# --- the loop --------------------------------------------------------------------------------------


def _trim_metrics(path: Path, upto: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto]
    path.write_text("".join(ln + "\n" for ln in keep))


def lora_info_of(cfg: TrainConfig) -> dict | None:
    """run.json's `lora` entry (export and eval read rank, alpha and scale from it)."""
    if not cfg.lora.enabled:
        return None
    return {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
            "targets": list(lora_mod.resolve_targets(cfg.lora.targets)),
            "scale": lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)}


def run(cfg: TrainConfig, run_dir: str | Path, *, loaded=None, tokenizer=None, devices=None, progress: bool = True,
        log=print) -> dict:
    """Train per `cfg` into `run_dir` (resuming from its latest checkpoint). Returns a summary dict."""
    from persllm_jax.model.weights import load_model, load_tokenizer

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.initialize(cfg, log)  # multi-host: config keys, JAX_* environment or cluster autodetection
    loaded = loaded or load_model(cfg.model)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    mcfg = loaded.cfg
    path = data_mod.corpus_file(cfg.data)
    examples, stats = data_mod.load_examples(tokenizer, path, cfg.max_length)
    log(f"data: {stats.conversations} conversations from {path}, {stats.truncated} truncated to max_length="
        f"{cfg.max_length}, {stats.dropped} dropped (no trained token left), {stats.trained_tokens} trained tokens")

    mesh = shd.make_train_mesh(cfg.mesh, devices, cfg.batch_size)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    epoch0 = data_mod.epoch_rows(examples, cfg.max_length, cfg.seed, 0, cfg.shuffle, cfg.packing)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(epoch0["tokens"]) / rows_per_step))

    optimizer, schedule = make_optimizer(cfg, total)
    state, frozen = init_state(cfg, mcfg, loaded.params, optimizer, mesh)
    kind = "lora" if cfg.lora.enabled else "params"
    step_fn, st_sh, _, b_sh = compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh)
    info = {"model": cfg.model, "model_source": loaded.source, "model_config": loaded.hf_config, "kind": kind,
            "lora": lora_info_of(cfg), "data": str(path), "data_stats": vars(stats), "total_steps": total,
            "mesh": dict(mesh.shape)}
    n_lora = lora_mod.lora_param_count(state["trainable"]) if cfg.lora.enabled else None
    fpt = flops_per_token(mcfg, cfg.max_length, n_lora)
    stream = lambda pos, row_slice=slice(None): data_mod.batches(  # noqa: E731
        examples, cfg.max_length, rows_per_step, cfg.seed, pos, cfg.shuffle, cfg.packing, row_slice)
    out = train_loop(cfg, run_dir, state=state, frozen=frozen, step_fn=step_fn, b_sh=b_sh, stream=stream,
                     total=total, kind=kind, info=info, fpt=fpt, desc="sft", progress=progress, log=log)
    out.update(mesh=mesh, stats=stats)
    return out


def train_loop(cfg: TrainConfig, run_dir: Path, *, state, frozen, step_fn, b_sh, stream, total: int, kind: str,
               info: dict, fpt: float, desc: str, progress: bool = True, log=print, int_metrics=("trained_tokens",)):
    """The loop shared by SFT and DPO: resume, config.yaml + run.json, metrics.jsonl, progress bar, checkpoints.

    `step_fn(state, frozen, batch) -> (state, metrics)`; `stream(data_pos)` yields (host rows [accum*B, ...],
    next data_pos). Every metric the step returns goes to metrics.jsonl (floats; `int_metrics` as ints).
    """
    mgr = checkpoint.manager(run_dir, cfg.keep_checkpoints)
    start, data_pos = 0, 0
    latest = mgr.latest_step()
    if latest is not None:
        trainable, opt_state, tstate, meta = checkpoint.restore(
            mgr, latest, state["trainable"], state["opt_state"], {"step": state["step"], "rng": state["rng"]}, kind)
        state = {"step": tstate["step"], "trainable": trainable, "opt_state": opt_state, "rng": tstate["rng"]}
        start, data_pos = int(meta["step"]), int(meta["data_position"])
        log(f"resumed from {run_dir / 'checkpoints' / str(latest)} (step {start}, data position {data_pos})")
    metrics_path = run_dir / "metrics.jsonl"
    if distributed.is_main():  # multi-host: run files and metrics from process 0 (checkpoints from all)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({
            **info, "checkpoints": "checkpoints/<step>/{" + kind + ",opt_state,train_state,meta}",
        }, indent=1, default=str))
        _trim_metrics(metrics_path, start)
    peak = peak_flops(cfg)
    local = shd.process_rows(b_sh, cfg.batch_size)  # this process's rows of each micro-batch
    stream = stream(data_pos)

    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    t_last, c_last, tok_since, last = time.perf_counter(), time.process_time(), 0, {}
    for step in range(start, total):
        host, data_pos = next(stream)
        tok_since += int((host["segment_ids"] > 0).sum())  # every process holds the whole global batch
        host = {k: v.reshape(cfg.grad_accum, cfg.batch_size, *v.shape[1:])[:, local] for k, v in host.items()}
        state, m = step_fn(state, frozen, shd.put_batch(host, b_sh, cfg.batch_size))
        if step == start:  # the first step includes compilation: keep it out of tokens/s
            jax.block_until_ready(m)
            t_last, c_last, tok_since = time.perf_counter(), time.process_time(), 0
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            m = jax.device_get(m)
            now, cpu = time.perf_counter(), time.process_time()
            tps = tok_since / max(now - t_last, 1e-9) if tok_since else float("nan")
            # per CPU-second of this process: the figure that stays comparable on a shared, busy machine
            tpc = tok_since / max(cpu - c_last, 1e-9) if tok_since else float("nan")
            last = {"step": done, "loss": float(m["loss"]), "lr": float(m["lr"]), "tokens_per_s": tps,
                    "tokens_per_cpu_s": tpc, "mfu": tps * fpt / peak}
            last.update({k: int(v) if k in int_metrics else float(v) for k, v in m.items() if k not in last})
            last["data_position"] = data_pos
            if jax.process_index() == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:.0f}", mfu=f"{100 * last['mfu']:.1f}%")
            t_last, c_last, tok_since = time.perf_counter(), time.process_time(), 0
        if bar is not None:
            bar.update(1)
        if (cfg.save_every and done % cfg.save_every == 0) or done == total:
            checkpoint.save(mgr, done, state["trainable"], state["opt_state"],
                            {"step": state["step"], "rng": state["rng"]},
                            {"step": done, "data_position": data_pos, "kind": kind}, kind)
    mgr.wait_until_finished()
    if bar is not None:
        bar.close()
    return {"steps": total, "last": last, "state": state, "frozen": frozen, "flops_per_token": fpt,
            "peak_flops": peak}


__all__ = ["token_nll_sum", "make_optimizer", "make_train_step", "compile_step", "init_state", "run", "train_loop",
           "flops_per_token", "measure_peak_flops", "state_shardings"]
