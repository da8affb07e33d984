"""SFT training: a pure, jitted train step over (state, frozen base, batch) and the loop around it.

state = {"step", "trainable", "opt_state", "rng"}; `trainable` is the LoRA adapter (or all weights when
`lora.enabled` is false) and is the only thing with gradients and optimizer state. A batch is
`[grad_accum, batch_size, max_length]`; the step scans the micro-batches, sums token losses and gradients,
and normalises once by the number of trained tokens, so accumulation equals one big batch.

MFU counts model FLOPs per non-padding token (stated in `flops_per_token`) against the peak of train/loop.py.
The loop itself (resume, metrics, checkpoints) is train/loop.py, shared with DPO.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from persllm_jax.io import jnp_dtype
from persllm_jax.model import lora as lora_mod
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import hidden_states, linear_shapes, vocab_projection
from persllm_jax.train import data as data_mod
from persllm_jax.train import distributed
from persllm_jax.train import loss as loss_mod
from persllm_jax.train import sharding as shd
from persllm_jax.train.config import TrainConfig
from persllm_jax.train import report_to
from persllm_jax.train.config import ConfigError
from persllm_jax.train.loop import eval_batches, held_out_file, run_folder, train_loop

# --- loss and step ---------------------------------------------------------------------------------


def token_nll_sum(params, mcfg: ModelConfig, batch: dict, *, lora=None, lora_scale=1.0, dtype=jnp.float32,
                  remat=False, attention="auto", trained_budget=0):
    """(sum of fp32 token NLL over weighted targets, sum of weights) for one [B, T] batch. With
    `trained_budget` (>= the trained targets of any row) only those positions reach the vocabulary; the
    log-softmax runs in chunks either way (train/loss.py), so [B, T, V] logits never exist."""
    h = hidden_states(params, mcfg, batch["tokens"], batch["positions"], batch["segment_ids"], lora=lora,
                      lora_scale=lora_scale, dtype=dtype, remat=remat, attention=attention)
    targets, w = batch["targets"], batch["weights"].astype(jnp.float32)
    if trained_budget and trained_budget < targets.shape[1]:
        h, targets, w = loss_mod.gather_trained(h, targets, w, trained_budget)
    logp = loss_mod.token_logps(h, vocab_projection(params), targets)
    return -jnp.sum(logp * w), jnp.sum(w)


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


def make_train_step(cfg: TrainConfig, mcfg: ModelConfig, optimizer, schedule, trained_budget: int = 0):
    """`trained_budget`: trained targets per row that reach the vocabulary (0 = all positions); see token_nll_sum."""
    dtype, use_lora = jnp_dtype(cfg.dtype), cfg.lora.enabled
    scale = lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)
    kw = {"dtype": dtype, "remat": cfg.remat, "attention": cfg.attention, "trained_budget": trained_budget}

    def loss_fn(trainable, frozen, mb, key):
        if use_lora:
            adapter = lora_mod.with_dropout(trainable, key, cfg.lora.dropout)
            return token_nll_sum(frozen, mcfg, mb, lora=adapter, lora_scale=scale, **kw)
        return token_nll_sum(trainable, mcfg, mb, **kw)

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


def make_evaluate(cfg: TrainConfig, mcfg: ModelConfig, examples, mesh, st_sh, fr_sh):
    """evaluate(state, frozen) -> {"eval_loss": mean token NLL over the held-out conversations}: one jitted
    forward (the training shardings, no donation, no dropout) over their rows, placed on the mesh once."""
    rows = data_mod.pack_rows(examples, cfg.max_length, cfg.packing)
    b_sh, device_batches = eval_batches(rows, cfg.batch_size, mesh)
    kw = {"dtype": jnp_dtype(cfg.dtype), "attention": cfg.attention}
    scale = lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)

    def nll(trainable, frozen, batch):
        if cfg.lora.enabled:
            return token_nll_sum(frozen, mcfg, batch, lora=trainable, lora_scale=scale, **kw)
        return token_nll_sum(trainable, mcfg, batch, **kw)

    fn = jax.jit(shd.in_mesh(nll, mesh), in_shardings=(st_sh["trainable"], fr_sh, {k: b_sh for k in SFT_BATCH_KEYS}),
                 out_shardings=shd.replicated(mesh))

    def evaluate(state, frozen):
        sums = [fn(state["trainable"], frozen, b) for b in device_batches]
        loss, weight = (sum(float(x[i]) for x in jax.device_get(sums)) for i in (0, 1))
        return {"eval_loss": loss / max(weight, 1.0)}

    return evaluate


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


def _trainable_and_frozen(cfg: TrainConfig, mcfg: ModelConfig, params, key):
    """LoRA: a fresh adapter (B = 0) to train over the frozen base; full: an fp32 copy of every weight, nothing
    frozen."""
    if cfg.lora.enabled:
        return lora_mod.init_lora(mcfg, key, cfg.lora.rank, cfg.lora.targets), params
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), {}


def initial_state(cfg: TrainConfig, mcfg: ModelConfig, params, optimizer):
    """(state, frozen) before placement: a pure function, so `jax.eval_shape` of it is the plan's abstract state."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
    trainable, frozen = _trainable_and_frozen(cfg, mcfg, params, init_key)
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
            "rng": rng}, frozen


def init_state(cfg: TrainConfig, mcfg: ModelConfig, params, optimizer, mesh):
    """`initial_state` placed on the mesh; the weights are sharded before the optimizer moments are made, so the
    moments are created sharded."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
    trainable, frozen = _trainable_and_frozen(cfg, mcfg, params, init_key)
    trainable = shd.shard_tree(trainable, shd.tree_shardings(trainable, mesh))
    frozen = shd.shard_tree(frozen, shd.tree_shardings(frozen, mesh))
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
             "rng": rng}
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


def lora_info_of(cfg: TrainConfig) -> dict | None:
    """run.json's `lora` entry (export and eval read rank, alpha and scale from it)."""
    if not cfg.lora.enabled:
        return None
    return {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
            "targets": list(lora_mod.resolve_targets(cfg.lora.targets)),
            "scale": lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)}


def run(cfg: TrainConfig, run_dir: str | Path, *, loaded=None, tokenizer=None, devices=None, progress: bool = True,
        log=print) -> dict:
    """Train per `cfg` into `run_dir` (resuming from its latest good checkpoint). Returns a summary dict."""
    run_dir = Path(run_dir)
    report_to.check(cfg.report_to)  # a missing optional package fails here, before any work
    with run_folder(run_dir, cfg, [cfg.data, cfg.model]):
        return _train(cfg, run_dir, loaded=loaded, tokenizer=tokenizer, devices=devices, progress=progress, log=log)


def _train(cfg: TrainConfig, run_dir: Path, *, loaded=None, tokenizer=None, devices=None, progress: bool = True,
           log=print) -> dict:
    """The body of `run`, inside its checked run folder."""
    from persllm_jax.model.weights import load_model, load_tokenizer

    run_dir = Path(run_dir)
    distributed.initialize(cfg, log)  # multi-host: config keys, JAX_* environment or cluster autodetection
    loaded = loaded or load_model(cfg.model)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    mcfg = loaded.cfg
    path = data_mod.corpus_file(cfg.data)
    examples, stats = data_mod.load_examples(tokenizer, path, cfg.max_length)
    log(f"data: {stats.conversations} conversations from {path}, {stats.truncated} truncated to max_length="
        f"{cfg.max_length}, {stats.dropped} dropped (no trained token left), {stats.trained_tokens} trained tokens")
    held_out = None
    if cfg.eval_every:
        eval_path = held_out_file(cfg, "sft")
        if eval_path is None:
            raise ConfigError(f"eval_every={cfg.eval_every}: no held-out data (set eval_data, or train on a corpus "
                              f"dir with sft/test.jsonl)")
        held_out, eval_stats = data_mod.load_examples(tokenizer, eval_path, cfg.max_length)
        log(f"eval: {eval_stats.conversations} conversations from {eval_path}, every {cfg.eval_every} steps")

    mesh = shd.make_train_mesh(cfg.mesh, devices, cfg.batch_size)
    rows_per_step = cfg.batch_size * cfg.grad_accum
    epoch0 = data_mod.epoch_rows(examples, cfg.max_length, cfg.seed, 0, cfg.shuffle, cfg.packing)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(epoch0["tokens"]) / rows_per_step))

    optimizer, schedule = make_optimizer(cfg, total)
    state, frozen = init_state(cfg, mcfg, loaded.params, optimizer, mesh)
    kind = "lora" if cfg.lora.enabled else "params"
    n_epochs = math.ceil(total * rows_per_step / len(epoch0["tokens"])) + 1  # every epoch the run reads rows of
    budget = loss_mod.trained_budget([data_mod.epoch_rows(examples, cfg.max_length, cfg.seed, e, cfg.shuffle,
                                                          cfg.packing)["weights"] for e in range(n_epochs)],
                                     cfg.max_length)
    step = make_train_step(cfg, mcfg, optimizer, schedule, trained_budget=budget)
    step_fn, st_sh, fr_sh, b_sh = compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh, step=step)
    evaluate = make_evaluate(cfg, mcfg, held_out, mesh, st_sh, fr_sh) if held_out else None
    info = {"model": cfg.model, "model_source": loaded.source, "model_config": loaded.hf_config, "kind": kind,
            "lora": lora_info_of(cfg), "data": str(path), "data_stats": vars(stats), "total_steps": total,
            "mesh": dict(mesh.shape)}
    n_lora = lora_mod.lora_param_count(state["trainable"]) if cfg.lora.enabled else None
    fpt = flops_per_token(mcfg, cfg.max_length, n_lora)
    stream = lambda pos, row_slice=slice(None): data_mod.batches(  # noqa: E731
        examples, cfg.max_length, rows_per_step, cfg.seed, pos, cfg.shuffle, cfg.packing, row_slice)
    out = train_loop(cfg, run_dir, state=state, frozen=frozen, step_fn=step_fn, b_sh=b_sh, stream=stream,
                     total=total, kind=kind, info=info, fpt=fpt, desc="sft", progress=progress, log=log,
                     evaluate=evaluate)
    out.update(mesh=mesh, stats=stats)
    return out


__all__ = ["token_nll_sum", "make_optimizer", "make_train_step", "make_evaluate", "compile_step", "initial_state", "init_state", "run",
           "flops_per_token", "state_shardings"]
