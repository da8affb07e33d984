"""DPO from scratch: pairs -> shared-prompt packed rows -> fp32 completion log-probs -> sigmoid / IPO / hinge (+NLL).

Reference without a second copy of the weights: with LoRA the SFT adapter is merged into the base (`frozen`), a
fresh zero-delta adapter is trained, and the reference is `frozen` with the adapter off. Full fine-tuning keeps
a frozen reference copy (one more model in memory) unless `precompute_ref` is on, which drops it.

Rows. A pair is one document `[prompt | chosen | rejected]`: chosen and rejected tokens both attend to the prompt
(branch 0) and to their own branch, never to each other, and both continue the prompt's positions. So the prompt
is computed once, not twice as in padded [chosen; rejected] batches, and chosen and rejected are scored in the same
forward pass. Whole documents are packed best-fit into rows of `max_length` tokens (segment ids per pair).

The data side (tokenising pairs, packing rows) is train/dpo_data.py.

Log-probs. Only completion tokens reach the vocabulary projection: each row lists its K completion tokens
(`comp_src` = the slot whose hidden state predicts it, `comp_tgt`, `comp_w`, `comp_seq` = 2*pair + branch), so the
fp32 logits are [B, K, V], not [B, T, V]. Tokenisation follows TRL: completion = the tokens of
render(prompt + chosen) after the common prefix with render(prompt, add_generation_prompt=True).

Losses (Δ = (logπ(c) − logπ_ref(c)) − (logπ(r) − logπ_ref(r)), β applied once; parity with TRL 1.16 in tests):
    sigmoid  −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)       (ε = label_smoothing, cDPO; ε = 0 is TRL's "sigmoid")
    ipo      (Δc/|c| − Δr/|r| − 1/(2β))²          (TRL's length-normalised IPO)
    hinge    relu(1 − βΔ)
    + nll_weight · (NLL of chosen tokens / chosen tokens)   (RPO; TRL loss_type ["sigmoid", "sft"])
The pair losses are averaged over the pairs of the whole step and the NLL over its chosen tokens (both totals are
known from the batch before the forward pass), so gradient accumulation equals one big batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from persllm_jax.io import atomic_replace, jnp_dtype
from persllm_jax.model import lora as lora_mod
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import hidden_states, linear_shapes, vocab_projection
from persllm_jax.runs import load_chain, merged_params
from persllm_jax.train import distributed, sft
from persllm_jax.train import loss as loss_mod
from persllm_jax.train import sharding as shd
from persllm_jax.train.config import DPOConfig
from persllm_jax.train.data import DataError
from persllm_jax.train.dpo_data import (
    BATCH_KEYS,
    Pair,
    batches,
    budgets,
    dpo_file,
    epoch_rows,
    load_pairs,
    pack_pairs,
)
from persllm_jax.train import report_to
from persllm_jax.train.loop import eval_batches, held_out_file, run_folder, train_loop

# --- model side ------------------------------------------------------------------------------------


def sequence_logps(params, mcfg: ModelConfig, batch: dict, **kw):
    """fp32 (chosen, rejected, chosen_tokens, rejected_tokens), each [B, S]: summed completion log-probs."""
    h = hidden_states(params, mcfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                      branch=batch["branch"], **kw)
    hs = jnp.take_along_axis(h, batch["comp_src"][..., None], axis=1)  # [B, K, D]: completion positions only
    logp = loss_mod.token_logps(hs, vocab_projection(params), batch["comp_tgt"])  # fp32, chunked over K
    w = batch["comp_w"].astype(jnp.float32)
    n_seq = 2 * batch["pair_id"].shape[1]
    seg_sum = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=n_seq))
    lp, cnt = seg_sum(logp * w, batch["comp_seq"]), seg_sum(w, batch["comp_seq"])
    return lp[:, 0::2], lp[:, 1::2], cnt[:, 0::2], cnt[:, 1::2]


def pair_losses(cfg: DPOConfig, pc, pr, rc, rr, nc, nr):
    """Per-pair loss (module docstring); β enters exactly once."""
    dc, dr = pc - rc, pr - rr
    delta = dc - dr
    if cfg.loss_type == "sigmoid":
        eps = cfg.label_smoothing
        return -(1 - eps) * jax.nn.log_sigmoid(cfg.beta * delta) - eps * jax.nn.log_sigmoid(-cfg.beta * delta)
    if cfg.loss_type == "ipo":
        return ((dc / jnp.maximum(nc, 1.0) - dr / jnp.maximum(nr, 1.0)) - 1.0 / (2.0 * cfg.beta)) ** 2
    if cfg.loss_type == "hinge":
        return jax.nn.relu(1.0 - cfg.beta * delta)
    raise ValueError(f"unknown loss_type {cfg.loss_type!r}")


def totals(batch: dict):
    """(pairs, chosen completion tokens) of a whole step's batch: the normalisers, known before the forward."""
    chosen = batch["comp_w"] * (batch["comp_seq"] % 2 == 0)
    return jnp.maximum(jnp.sum(batch["pair_valid"]), 1.0), jnp.maximum(jnp.sum(chosen), 1.0)


def make_loss(cfg: DPOConfig, mcfg: ModelConfig):
    """(policy_logps, ref_logps, loss_fn). loss_fn(trainable, frozen, mb, ref, key, n_pairs, n_chosen)
    -> (loss, sums) where `ref` = (ref_chosen, ref_rejected) [B, S] and `sums` are metric numerators."""
    dtype = jnp_dtype(cfg.dtype)
    scale = lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)
    kw = {"dtype": dtype, "remat": cfg.remat, "attention": cfg.attention}

    def policy_logps(trainable, frozen, mb, key):
        if cfg.lora.enabled:
            adapter = lora_mod.with_dropout(trainable, key, cfg.lora.dropout)
            return sequence_logps(frozen, mcfg, mb, lora=adapter, lora_scale=scale, **kw)
        return sequence_logps(trainable, mcfg, mb, **kw)

    def ref_logps(frozen, mb):
        pc, pr, _, _ = sequence_logps(frozen, mcfg, mb, dtype=dtype, attention=cfg.attention)
        return jax.lax.stop_gradient(pc), jax.lax.stop_gradient(pr)

    def loss_fn(trainable, frozen, mb, ref, key, n_pairs, n_chosen):
        pc, pr, nc, nr = policy_logps(trainable, frozen, mb, key)
        rc, rr = ref
        valid = mb["pair_valid"]
        per = pair_losses(cfg, pc, pr, rc, rr, nc, nr) * valid
        nll = -jnp.sum(pc * valid)
        loss = jnp.sum(per) / n_pairs + cfg.nll_weight * nll / n_chosen
        c_rew, r_rew = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
        sums = {"dpo_loss": jnp.sum(per), "nll": nll, "reward_accuracy": jnp.sum((c_rew > r_rew) * valid),
                "reward_margin": jnp.sum((c_rew - r_rew) * valid), "reward_chosen": jnp.sum(c_rew * valid),
                "reward_rejected": jnp.sum(r_rew * valid), "logps_chosen": jnp.sum(pc * valid),
                "logps_rejected": jnp.sum(pr * valid), "trained_tokens": jnp.sum(mb["comp_w"])}
        return loss, sums

    return policy_logps, ref_logps, loss_fn


def make_dpo_step(cfg: DPOConfig, mcfg: ModelConfig, optimizer, schedule, online_ref: bool):
    """step(state, frozen, batch[accum, B, ...]) -> (state, metrics); the reference comes from `frozen` (adapter
    off) when `online_ref`, else from the batch's precomputed `ref_chosen` / `ref_rejected`."""
    _, ref_logps, loss_fn = make_loss(cfg, mcfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        rng, key = jax.random.split(state["rng"])
        n_pairs, n_chosen = totals(batch)

        def micro(carry, xs):
            gsum, lsum, sums = carry
            mb, i = xs
            ref = ref_logps(frozen, mb) if online_ref else (mb["ref_chosen"], mb["ref_rejected"])
            (loss, s), g = grad_fn(state["trainable"], frozen, mb, ref, jax.random.fold_in(key, i), n_pairs, n_chosen)
            gsum = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), gsum, g)
            return (gsum, lsum + loss, jax.tree_util.tree_map(jnp.add, sums, s)), None

        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
        names = ("dpo_loss", "nll", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected",
                 "logps_chosen", "logps_rejected", "trained_tokens")
        init = (zeros, jnp.float32(0), {k: jnp.float32(0) for k in names})
        n_micro = batch["tokens"].shape[0]
        (grads, loss, sums), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {k: v / n_pairs for k, v in sums.items()}
        metrics.update(loss=loss, nll=sums["nll"] / n_chosen, trained_tokens=sums["trained_tokens"], pairs=n_pairs,
                       grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": rng}, metrics

    return step


def dpo_flops_per_token(mcfg: ModelConfig, seq_len: int, lora_params: int | None, online_ref: bool) -> float:
    """train.flops_per_token plus, with an online reference, one more forward (2N + A) per token."""
    fpt = sft.flops_per_token(mcfg, seq_len, lora_params)
    if online_ref:
        n = mcfg.num_layers * sum(i * o for i, o in linear_shapes(mcfg).values()) + mcfg.hidden_size * mcfg.vocab_size
        fpt += 2.0 * n + 4 * mcfg.num_layers * mcfg.num_heads * mcfg.head_dim * seq_len
    return fpt


# --- precomputed reference -------------------------------------------------------------------------


def _gather(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def ref_cache_key(ref_params, pairs: list[Pair], cfg: DPOConfig, mcfg: ModelConfig) -> str:
    """Hash of the reference weights (every leaf, with its path) and of the tokenised pairs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": 1, "dtype": cfg.dtype, "max_length": cfg.max_length, "model": str(mcfg)}).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(ref_params)[0]:
        h.update(shd.path_str(path).encode())
        h.update(np.ascontiguousarray(_gather(leaf)).tobytes())
    for p in pairs:
        for a in (p.prompt, p.chosen, p.rejected):
            h.update(np.int64(len(a)).tobytes())
            h.update(a.tobytes())
        h.update(np.int64(p.index).tobytes())
    return h.hexdigest()


def precompute_ref(cfg: DPOConfig, mcfg: ModelConfig, ref_params, pairs: list[Pair], run_dir: Path, mesh, K: int,
                   S: int, n_rows: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) reference log-probs indexed by pair index, from RUN_DIR/ref_logps/<key>.npz or computed
    in one pass (and cached atomically). A stale cache (other key) is removed."""
    key = ref_cache_key(ref_params, pairs, cfg, mcfg)
    cache_dir = run_dir / "ref_logps"
    path = cache_dir / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            log(f"reference log-probs: cached {path}")
            return z["chosen"], z["rejected"]
    _, ref_logps, _ = make_loss(cfg, mcfg)
    b_sh = shd.batch_sharding(mesh, leading=0)
    fn = jax.jit(shd.in_mesh(ref_logps, mesh), in_shardings=(shd.tree_shardings(ref_params, mesh), {k: b_sh for k in BATCH_KEYS}))
    rows = pack_pairs(pairs, cfg.max_length, K, S, cfg.packing)
    bs = cfg.batch_size
    n = len(rows["tokens"])
    pad = -n % bs
    rows = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], -1 if k == "pair_id" else 0, v.dtype)])
            for k, v in rows.items()}
    local = shd.process_rows(b_sh, bs, axis=0, ndim=2)
    chosen = np.zeros(n_rows, np.float32)
    rejected = np.zeros(n_rows, np.float32)
    for i in range(0, n + pad, bs):
        host = {k: v[i:i + bs][local] for k, v in rows.items()}
        c, r = fn(ref_params, shd.put_batch(host, b_sh, bs, axis=0))
        ids = rows["pair_id"][i:i + bs]
        ok = ids >= 0
        chosen[ids[ok]], rejected[ids[ok]] = _gather(c)[ok], _gather(r)[ok]
    if jax.process_index() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for old in cache_dir.glob("*.npz"):
            old.unlink()
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, chosen=chosen, rejected=rejected)

        atomic_replace(path, write)
    log(f"reference log-probs: computed for {len(pairs)} pairs, cached in {path}")
    return chosen, rejected


# --- held-out evaluation (eval_every) --------------------------------------------------------------


def split_pairs(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): `fraction` of the pairs (at least one) set aside, chosen by `seed` alone."""
    n = len(pairs)
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise DataError(f"eval_fraction={fraction}: {n} pair(s) cannot be split into training and held-out pairs")
    held = set(np.random.default_rng([seed, 2718]).permutation(n)[:k].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def make_evaluate(cfg: DPOConfig, mcfg: ModelConfig, held_out: list[Pair], ref, mesh, st_sh, fr_sh):
    """evaluate(state, frozen) -> eval_loss (the training loss), eval_reward_accuracy, eval_reward_margin over the
    held-out pairs. Their reference log-probs are computed here, once, from `ref`; then each evaluation is one
    jitted policy forward per batch (the training shardings, no donation, no dropout)."""
    K, S = budgets(held_out, cfg.max_length, cfg.packing)
    rows = pack_pairs(held_out, cfg.max_length, K, S, cfg.packing)
    b_sh, device_batches = eval_batches(rows, cfg.batch_size, mesh, fill={"pair_id": -1})
    batch_sh = {k: b_sh for k in BATCH_KEYS}
    _, ref_logps, _ = make_loss(cfg, mcfg)
    ref_fn = jax.jit(shd.in_mesh(ref_logps, mesh), in_shardings=(shd.tree_shardings(ref, mesh), batch_sh),
                     out_shardings=(b_sh, b_sh))
    for b in device_batches:
        b["ref_chosen"], b["ref_rejected"] = ref_fn(ref, b)
    kw = {"dtype": jnp_dtype(cfg.dtype), "attention": cfg.attention}
    scale = lora_mod.lora_scale(cfg.lora.rank, cfg.lora.alpha)

    def sums(trainable, frozen, mb):
        if cfg.lora.enabled:
            pc, pr, nc, nr = sequence_logps(frozen, mcfg, mb, lora=trainable, lora_scale=scale, **kw)
        else:
            pc, pr, nc, nr = sequence_logps(trainable, mcfg, mb, **kw)
        rc, rr, valid = mb["ref_chosen"], mb["ref_rejected"], mb["pair_valid"]
        margin = cfg.beta * ((pc - rc) - (pr - rr))
        return {"loss": jnp.sum(pair_losses(cfg, pc, pr, rc, rr, nc, nr) * valid), "nll": -jnp.sum(pc * valid),
                "chosen": jnp.sum(mb["comp_w"] * (mb["comp_seq"] % 2 == 0)), "pairs": jnp.sum(valid),
                "correct": jnp.sum((margin > 0) * valid), "margin": jnp.sum(margin * valid)}

    fn = jax.jit(shd.in_mesh(sums, mesh), in_shardings=(st_sh["trainable"], fr_sh, batch_sh),
                 out_shardings=shd.replicated(mesh))

    def evaluate(state, frozen):
        parts = jax.device_get([fn(state["trainable"], frozen, b) for b in device_batches])
        t = {k: sum(float(p[k]) for p in parts) for k in parts[0]}
        n = max(t["pairs"], 1.0)
        return {"eval_loss": t["loss"] / n + cfg.nll_weight * t["nll"] / max(t["chosen"], 1.0),
                "eval_reward_accuracy": t["correct"] / n, "eval_reward_margin": t["margin"] / n}

    return evaluate


# --- the run ---------------------------------------------------------------------------------------


def base_params(cfg: DPOConfig, loaded=None, log=print):
    """(loaded base, params DPO starts from, model spec, parent info): the SFT chain merged, or the base."""
    from persllm_jax.model.weights import load_model

    if not cfg.from_run:
        loaded = loaded or load_model(cfg.model)
        return loaded, loaded.params, cfg.model, {}
    chain = load_chain(cfg.from_run, None if cfg.from_step < 0 else cfg.from_step)
    params = merged_params(chain)
    parent = {"parent_run": str(Path(cfg.from_run).resolve()), "parent_step": chain.last.step, "stage": "dpo"}
    log(f"reference: {cfg.from_run} step {chain.last.step} merged into {chain.base_spec}")
    return chain.base, params, chain.base_spec, parent


def run(cfg: DPOConfig, run_dir: str | Path, *, loaded=None, tokenizer=None, devices=None, progress: bool = True,
        log=print) -> dict:
    """Train per `cfg` into `run_dir` (resuming from its latest good checkpoint). Returns a summary dict."""
    run_dir = Path(run_dir)
    report_to.check(cfg.report_to)  # a missing optional package fails here, before any work
    with run_folder(run_dir, cfg, [cfg.data, cfg.model, cfg.from_run]):
        return _train(cfg, run_dir, loaded=loaded, tokenizer=tokenizer, devices=devices, progress=progress, log=log)


def _train(cfg: DPOConfig, run_dir: Path, *, loaded=None, tokenizer=None, devices=None, progress: bool = True,
           log=print) -> dict:
    """The body of `run`, inside its checked run folder."""
    from persllm_jax.model.weights import load_tokenizer

    run_dir = Path(run_dir)
    distributed.initialize(cfg, log)  # multi-host (persllm_jax/distributed.py); once per process
    base, params, spec, parent = base_params(cfg, loaded, log)
    if cfg.from_run:
        cfg.model = spec
    mcfg = base.cfg
    tokenizer = tokenizer or load_tokenizer(spec)
    path = dpo_file(cfg.data)
    pairs, stats = load_pairs(tokenizer, path, cfg.max_length)
    log(f"data: {stats.pairs} pairs from {path}, {stats.truncated} truncated to max_length={cfg.max_length}, "
        f"{stats.dropped} dropped, {stats.tokens} tokens ({stats.completion_tokens} completion)")
    held_out = None
    if cfg.eval_every:
        eval_path = held_out_file(cfg, "dpo")
        if eval_path is not None:
            held_out, _ = load_pairs(tokenizer, eval_path, cfg.max_length)
        else:
            pairs, held_out = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
        log(f"eval: {len(held_out)} held-out pairs ({eval_path or f'eval_fraction={cfg.eval_fraction} of {path}'}), "
            f"every {cfg.eval_every} steps")

    mesh = shd.make_train_mesh(cfg.mesh, devices, cfg.batch_size)
    K, S = budgets(pairs, cfg.max_length, cfg.packing)
    rows_of_epoch = lambda e: epoch_rows(pairs, cfg.max_length, K, S, cfg.seed, e, cfg.shuffle, cfg.packing)  # noqa
    rows_per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(rows_of_epoch(0)["tokens"]) / rows_per_step))

    optimizer, schedule = sft.make_optimizer(cfg, total)
    state, frozen = sft.init_state(cfg, mcfg, params, optimizer, mesh)
    online = not cfg.precompute_ref
    if not cfg.lora.enabled:  # full fine-tuning: the reference is a frozen copy, or nothing once precomputed
        ref = shd.shard_tree(params, shd.tree_shardings(params, mesh))
        frozen = ref if online else {}
    else:
        ref = frozen
    n_index = max(p.index for p in pairs) + 1
    ref_c = ref_r = None
    if cfg.precompute_ref:
        ref_c, ref_r = precompute_ref(cfg, mcfg, ref, pairs, run_dir, mesh, K, S, n_index, log)
    evaluate = None
    if held_out:
        st_sh, fr_sh = sft.state_shardings(state, frozen, mesh)
        evaluate = make_evaluate(cfg, mcfg, held_out, ref, mesh, st_sh, fr_sh)
    del ref, params
    step = make_dpo_step(cfg, mcfg, optimizer, schedule, online)
    step_fn, _, _, b_sh = sft.compile_step(cfg, mcfg, optimizer, schedule, state, frozen, mesh, step=step,
                                         batch_keys=BATCH_KEYS)
    kind = "lora" if cfg.lora.enabled else "params"
    info = {"model": spec, "model_source": base.source, "model_config": base.hf_config, "kind": kind,
            "lora": sft.lora_info_of(cfg), "data": str(path), "data_stats": vars(stats), "total_steps": total,
            "mesh": dict(mesh.shape), **parent,
            "dpo": {"beta": cfg.beta, "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing,
                    "nll_weight": cfg.nll_weight, "precompute_ref": cfg.precompute_ref,
                    "completion_tokens_per_row": K, "pairs_per_row": S}}
    n_lora = lora_mod.lora_param_count(state["trainable"]) if cfg.lora.enabled else None
    fpt = dpo_flops_per_token(mcfg, cfg.max_length, n_lora, online)

    def stream(pos):
        for host, nxt in batches(rows_of_epoch, rows_per_step, pos):
            if ref_c is not None:
                ids = host["pair_id"]
                host["ref_chosen"] = np.where(ids >= 0, ref_c[np.maximum(ids, 0)], 0).astype(np.float32)
                host["ref_rejected"] = np.where(ids >= 0, ref_r[np.maximum(ids, 0)], 0).astype(np.float32)
            yield host, nxt

    out = train_loop(cfg, run_dir, state=state, frozen=frozen, step_fn=step_fn, b_sh=b_sh, stream=stream,
                       total=total, kind=kind, info=info, fpt=fpt, desc="dpo", progress=progress, log=log,
                       int_metrics=("trained_tokens", "pairs"), evaluate=evaluate)
    out.update(mesh=mesh, stats=stats, K=K, S=S)
    return out


__all__ = ["sequence_logps", "pair_losses", "make_loss", "make_dpo_step", "precompute_ref", "split_pairs", "make_evaluate",
           "ref_cache_key", "run"]
