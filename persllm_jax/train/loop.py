"""The training loop shared by SFT and DPO: resume from the latest checkpoint, write config.yaml and run.json,
run the jitted step over the data stream, log metrics (tokens/s, MFU; held-out `eval_*` every `eval_every`
steps and at the end) to metrics.jsonl and the `report_to` backends (report_to.py), save checkpoints; on
SIGTERM (preemption.py) checkpoint the step reached and raise `Preempted`.

The step itself is a pure function `step_fn(state, frozen, batch) -> (state, metrics)` built by sft.py or
dpo.py; gradient accumulation happens inside it (a scan over micro-batches that sums and normalises once).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.io import read_jsonl, write_jsonl
from persllm_jax.outputs import MARKER, OutputError, check_output
from persllm_jax.runs import checkpoint_steps, write_run
from persllm_jax.settings import ConfigError, read_file
from persllm_jax.train import checkpoint, distributed, preemption
from persllm_jax.train.report_to import Reporters
from persllm_jax.train import sharding as shd
from persllm_jax.train.config import TrainConfig, save_config


def measure_peak_flops(dim: int = 2048, reps: int = 5, trials: int = 3, dtype=jnp.float32, device=None) -> float:
    """Achieved FLOP/s of a dim^3 matmul in `dtype` (fp32 accumulation) on `device` (default: local device 0),
    the machine's practical peak: the best of `trials` timings of `reps` matmuls, as one timing on a shared host
    can land on a busy moment (102 vs 160-170 GFLOP/s measured on the same 2 cores)."""
    x = jax.device_put(jnp.ones((dim, dim), dtype) * 0.5, device or jax.local_devices()[0])
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(dtype))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            y = f(x)
        y.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * dim ** 3 * reps / best


def peak_flops(cfg: TrainConfig) -> float:
    n = jax.device_count()
    if jax.devices()[0].platform == "cpu":
        n = 1  # emulated CPU devices share the same cores
    return (cfg.peak_tflops * 1e12 if cfg.peak_tflops > 0 else measure_peak_flops()) * n


def _trim_metrics(path: Path, upto: int) -> None:
    """Drop the rows logged after the checkpoint a resumed run starts from (they will be logged again)."""
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path, torn_tail=True) if r.get("step", 0) <= upto])


def eval_batches(rows: dict, batch_size: int, mesh, fill: dict | None = None):
    """(sharding, device batches): held-out host rows [N, ...] cut into batches of `batch_size` rows (no accum
    axis), placed once; the last batch is padded with rows of `fill` values (default 0 = no weight)."""
    b_sh = shd.batch_sharding(mesh, leading=0)
    n = len(next(iter(rows.values())))
    pad, fill = -n % batch_size, fill or {}
    rows = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], fill.get(k, 0), v.dtype)]) for k, v in rows.items()}
    local = shd.process_rows(b_sh, batch_size, axis=0, ndim=2)
    return b_sh, [shd.put_batch({k: v[i:i + batch_size][local] for k, v in rows.items()}, b_sh, batch_size, axis=0)
                  for i in range(0, n + pad, batch_size)]


def held_out_file(cfg, section: str) -> Path | None:
    """The file `eval_every` reads: `eval_data` (a file, or a corpus dir's <section>/test.jsonl), else the training
    corpus' <section>/test.jsonl when it has one; None when neither."""
    from persllm_jax.train.data import corpus_file

    if cfg.eval_data:
        return corpus_file(cfg.eval_data, "test", section)
    test = Path(cfg.data) / section / "test.jsonl"
    return test if Path(cfg.data).is_dir() and test.is_file() else None


# settings a checkpoint's shapes depend on: resuming under other values cannot work
RESUME_KEYS = ("model", "lora.enabled", "lora.rank", "lora.targets")


def resume_conflicts(saved: dict, cfg) -> list[str]:
    """The RESUME_KEYS whose value in RUN_DIR/config.yaml (`saved`) differs from `cfg`'s, as 'key: old -> new'."""
    out = []
    for key in RESUME_KEYS:
        old, new = saved, cfg
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
            new = getattr(new, part, None)
        if old is not None and old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


@contextlib.contextmanager
def run_folder(run_dir: Path, cfg, inputs):
    """The run's folder, checked before any work: never one of the run's `inputs` (its data, model, parent
    run) nor a folder holding one, never a non-empty folder that is not a run, never resumed under settings its checkpoints cannot take.
    Created here, and removed again when the run fails before it wrote its first checkpoint."""
    check_output(run_dir, inputs, inside_ok=True)  # training never deletes a run that existed before it
    existed = run_dir.exists()
    if existed and any(run_dir.iterdir()) and not any((run_dir / n).exists() for n in ("run.json", "checkpoints",
                                                                                      MARKER)):
        raise OutputError(f"--out {run_dir} is not empty and not a run directory; choose another --out")
    saved = run_dir / "config.yaml"
    if saved.is_file() and checkpoint_steps(run_dir):
        conflicts = resume_conflicts(read_file(saved), cfg)
        if conflicts:
            raise ConfigError(f"{run_dir} holds checkpoints trained with other settings ({'; '.join(conflicts)}): "
                              f"resume with the run's own settings, or give a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if not existed and not checkpoint_steps(run_dir):  # nothing of value written: leave no empty run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def train_loop(cfg: TrainConfig, run_dir: Path, *, state, frozen, step_fn, b_sh, stream, total: int, kind: str,
               info: dict, fpt: float, desc: str, progress: bool = True, log=print, int_metrics=("trained_tokens",),
               evaluate=None):
    """The loop shared by SFT and DPO: resume, config.yaml + run.json, metrics, progress bar, checkpoints.

    `step_fn(state, frozen, batch) -> (state, metrics)`; `stream(data_pos)` yields (host rows [accum*B, ...],
    next data_pos). Every metric the step returns is logged (floats; `int_metrics` as ints). `evaluate(state,
    frozen) -> {"eval_loss": ...}` (a pure function of the weights, so a resumed run logs what an uninterrupted
    one would) runs every `cfg.eval_every` steps and at the end; its figures join that step's row.
    """
    # closed on every exit, so no run leaves orbax's threads and open files behind it in this process
    with checkpoint.manager(run_dir, cfg.keep_checkpoints) as mgr:
        host_memory = jax.devices()[0].platform == "cpu"  # device buffers are host memory: no copy protects a save
        start, data_pos = 0, 0
        restored = checkpoint.restore_latest_good(mgr, run_dir, state["trainable"], state["opt_state"],
                                                  {"step": state["step"], "rng": state["rng"]}, kind, log)
        if restored is not None:
            latest, (trainable, opt_state, tstate, meta) = restored
            state = {"step": tstate["step"], "trainable": trainable, "opt_state": opt_state, "rng": tstate["rng"]}
            start, data_pos = int(meta["step"]), int(meta["data_position"])
            log(f"resumed from {run_dir / 'checkpoints' / str(latest)} (step {start}, data position {data_pos})")
        metrics_path = run_dir / "metrics.jsonl"
        main = distributed.is_main()
        if main:  # multi-host: run files and metrics from process 0 (checkpoints from all)
            save_config(cfg, run_dir / "config.yaml")
            write_run(run_dir, {**info, "checkpoints": "checkpoints/<step>/{" + kind + ",opt_state,train_state,meta}"})
            _trim_metrics(metrics_path, start)
        peak = peak_flops(cfg)
        local = shd.process_rows(b_sh, cfg.batch_size)  # this process's rows of each micro-batch
        stream = stream(data_pos)

        reporters = Reporters(run_dir, cfg, start) if main else None
        stack = contextlib.ExitStack()
        if reporters is not None:
            stack.enter_context(reporters)
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        t_last, c_last, tok_since, last = time.perf_counter(), time.process_time(), 0, {}
        done, stop = start, False
        with stack, preemption.watch(log) as preempt:
            for step in range(start, total):
                host, data_pos = next(stream)
                tok_since += int((host["segment_ids"] > 0).sum())  # every process holds the whole global batch
                host = {k: v.reshape(cfg.grad_accum, cfg.batch_size, *v.shape[1:])[:, local] for k, v in host.items()}
                state, m = step_fn(state, frozen, shd.put_batch(host, b_sh, cfg.batch_size))
                if step == start:  # the first step includes compilation: keep it out of tokens/s
                    jax.block_until_ready(m)
                    t_last, c_last, tok_since = time.perf_counter(), time.process_time(), 0
                done = step + 1
                eval_now = evaluate is not None and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == total)
                if done % cfg.log_every == 0 or done == total or eval_now:
                    m = jax.device_get(m)
                    now, cpu = time.perf_counter(), time.process_time()
                    tps = tok_since / max(now - t_last, 1e-9) if tok_since else float("nan")
                    # per CPU-second of this process: the figure that stays comparable on a shared, busy machine
                    tpc = tok_since / max(cpu - c_last, 1e-9) if tok_since else float("nan")
                    last = {"step": done, "loss": float(m["loss"]), "lr": float(m["lr"]), "tokens_per_s": tps,
                            "tokens_per_cpu_s": tpc, "mfu": tps * fpt / peak}
                    last.update({k: int(v) if k in int_metrics else float(v) for k, v in m.items() if k not in last})
                    last["data_position"] = data_pos
                    if eval_now:
                        last.update({k: float(v) for k, v in evaluate(state, frozen).items()})
                    if reporters is not None:
                        reporters.log(done, last)
                    if bar is not None:
                        extra = {"eval_loss": f"{last['eval_loss']:.4f}"} if "eval_loss" in last else {}
                        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:.0f}", mfu=f"{100 * last['mfu']:.1f}%",
                                        **extra)
                    t_last, c_last, tok_since = time.perf_counter(), time.process_time(), 0
                if bar is not None:
                    bar.update(1)
                stop = done < total and preempt.stop(done, mgr)  # SIGTERM (or orbax's multi-host signal) during this step
                if (cfg.save_every and done % cfg.save_every == 0) or done == total or stop:
                    checkpoint.save(mgr, done, state["trainable"], state["opt_state"],
                                    {"step": state["step"], "rng": state["rng"]},
                                    {"step": done, "data_position": data_pos, "kind": kind}, kind)
                    if host_memory:  # the next step donates these buffers, which on CPU are the ones the save reads
                        mgr.wait_until_finished()
                if stop:
                    break
        if bar is not None:
            bar.close()
        if stop:
            raise preemption.Preempted(done, total, run_dir)
        return {"steps": total, "last": last, "state": state, "frozen": frozen, "flops_per_token": fpt,
                "peak_flops": peak}


__all__ = ["train_loop", "eval_batches", "held_out_file", "run_folder", "resume_conflicts", "RESUME_KEYS", "measure_peak_flops", "peak_flops"]
