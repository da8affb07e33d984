"""Accelerator check: parity of our trainer on the chip against the CPU, then SFT and DPO step timings of a
~1B Llama-shaped model (random weights, bf16), as tokens/s and MFU against the chip's measured matmul peak.

    python tools/device_check.py                # on a GPU/TPU host (see tools/device_check.sh)
    python tools/device_check.py --cpu-smoke    # tiny shapes on the CPU: checks the script itself

Parity (fp32, matmul precision "highest"): the forward logits, one LoRA SFT step and one LoRA DPO step run on
the accelerator and on the host CPU from the same weights and batch; loss and updated adapter must agree.
Timing: the real train steps (train/sft.compile_step, train/dpo.make_dpo_step) on a 1-device mesh, bf16 compute, bf16
frozen base, LoRA on all linear layers, full rows of packed documents (every token trained). MFU counts model
FLOPs (train/sft.flops_per_token, dpo.dpo_flops_per_token) against a bf16 matmul measured on the same chip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (dry run of this script)")
    ap.add_argument("--shape", default="llama-1b", help="named model shape (persllm_jax.model.shapes.SHAPES)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row")
    ap.add_argument("--batch", type=int, default=2,
                    help="rows per step (persllm plan, llama-1b on h100-80g without remat: 2 x 2048 needs ~61 GiB, "
                         "8 x 2048 ~215 GiB: the attention scores of every layer are kept for the backward pass)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after one compile step)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--remat", action="store_true", help="recompute layers in the backward pass")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.seq, args.batch, args.steps, args.lora_rank = 64, 2, 2, 4
    return args


TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0)


def train_cfg(args, **over):
    from persllm_jax.train.config import load_config

    sets = [f"batch_size={args.batch}", f"max_length={args.seq}", f"lora.rank={args.lora_rank}",
            f"lora.alpha={2 * args.lora_rank}", "learning_rate=1e-3", "warmup_steps=0", "mesh.data=1",
            f"remat={str(args.remat).lower()}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(overrides=sets)


def dpo_cfg(args, **over):
    from persllm_jax.train.config import DPOConfig, load_config

    sets = [f"batch_size={args.batch}", f"max_length={args.seq}", f"lora.rank={args.lora_rank}",
            f"lora.alpha={2 * args.lora_rank}", "learning_rate=1e-3", "warmup_steps=0", "mesh.data=1",
            f"remat={str(args.remat).lower()}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(DPOConfig, overrides=sets)


def sft_batch(rng, V: int, B: int, T: int, docs_per_row: int = 2):
    """Full rows of packed random documents: every slot a token, every target trained except document ends."""
    import numpy as np

    tokens = rng.integers(3, V, size=(B, T), dtype=np.int32)
    seg = np.repeat(np.arange(1, docs_per_row + 1), -(-T // docs_per_row))[:T]
    starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
    pos = np.arange(T) - starts[seg - 1]
    targets = np.roll(tokens, -1, axis=1)
    last = np.r_[np.diff(seg) != 0, True]
    weights = np.where(last, 0.0, 1.0).astype(np.float32)
    return {"tokens": tokens, "targets": targets.astype(np.int32), "weights": np.broadcast_to(weights, (B, T)).copy(),
            "positions": np.broadcast_to(pos, (B, T)).astype(np.int32).copy(),
            "segment_ids": np.broadcast_to(seg, (B, T)).astype(np.int32).copy()}


def dpo_batch(rng, V: int, B: int, T: int):
    """Rows of packed random pairs (prompt T/8, chosen and rejected 3T/16 each: two pairs fill a row)."""
    import numpy as np

    from persllm_jax.train import dpo_data

    p, c = T // 8, (3 * T) // 16
    pairs = [dpo_data.Pair(rng.integers(3, V, p, dtype=np.int32), rng.integers(3, V, c, dtype=np.int32),
                           rng.integers(3, V, c, dtype=np.int32), i) for i in range(2 * B)]
    K, S = dpo_data.budgets(pairs, T, True)
    rows = dpo_data.pack_pairs(pairs, T, K, S)
    assert len(rows["tokens"]) == B, len(rows["tokens"])
    return rows


def _max_diff(a, b) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _sft_step(cfg, mcfg, params, batch, device, nudge: float = 0.0):
    """One SFT step on a 1-device mesh of `device`; returns (loss, trainable, metrics, jitted, state, frozen)."""
    import jax

    from persllm_jax.train import sft
    from persllm_jax.train import sharding as shd

    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device])
    opt, sched = sft.make_optimizer(cfg, 100)
    state, frozen = sft.init_state(cfg, mcfg, params, opt, mesh)
    if nudge:  # non-zero B, so the step's gradient reaches every adapter factor
        state["trainable"] = shd.shard_tree(jax.tree_util.tree_map(lambda x: x + nudge, state["trainable"]),
                                            shd.tree_shardings(state["trainable"], mesh))
    step, _, _, b_sh = sft.compile_step(cfg, mcfg, opt, sched, state, frozen, mesh)
    b = shd.put_batch({k: v[None] for k, v in batch.items()}, b_sh)
    state, m = step(state, frozen, b)
    return step, state, frozen, b, m


def _dpo_step(cfg, mcfg, params, batch, device, nudge: float = 0.0):
    import jax

    from persllm_jax.train import dpo, sft
    from persllm_jax.train import sharding as shd

    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device])
    opt, sched = sft.make_optimizer(cfg, 100)
    state, frozen = sft.init_state(cfg, mcfg, params, opt, mesh)
    if nudge:
        state["trainable"] = shd.shard_tree(jax.tree_util.tree_map(lambda x: x + nudge, state["trainable"]),
                                            shd.tree_shardings(state["trainable"], mesh))
    fn = dpo.make_dpo_step(cfg, mcfg, opt, sched, online_ref=True)
    step, _, _, b_sh = sft.compile_step(cfg, mcfg, opt, sched, state, frozen, mesh, step=fn, batch_keys=tuple(batch))
    b = shd.put_batch({k: v[None] for k, v in batch.items()}, b_sh)
    state, m = step(state, frozen, b)
    return step, state, frozen, b, m


def parity(args, accel, cpu, have_dpo: bool) -> dict:
    """fp32 on the accelerator vs the host CPU: forward logits, one SFT step, one DPO step (same inputs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persllm_jax.model.config import from_hf_dict
    from persllm_jax.model.decoder import forward, init_params

    mcfg = from_hf_dict(TINY, "tiny")
    params = jax.device_get(init_params(mcfg, jax.random.PRNGKey(1), jnp.float32, std=0.1))
    rng = np.random.default_rng(0)
    out = {}
    with jax.default_matmul_precision("highest"):
        b = sft_batch(rng, mcfg.vocab_size, 4, 64)
        fwd = jax.jit(lambda p, b: forward(p, mcfg, b["tokens"], b["positions"], b["segment_ids"]))
        logits = [np.asarray(fwd(jax.device_put(params, d), jax.device_put(b, d))) for d in (accel, cpu)]
        out["forward_max_abs_diff"] = _max_diff(logits[0], logits[1])
        cfg = train_cfg(args, batch_size=4, max_length=64, **{"lora.rank": 4, "lora.alpha": 8, "remat": "false"})
        res = [_sft_step(cfg, mcfg, params, b, d, nudge=0.01) for d in (accel, cpu)]
        out["sft_loss"] = [float(r[4]["loss"]) for r in res]
        out["sft_loss_diff"] = abs(out["sft_loss"][0] - out["sft_loss"][1])
        out["sft_lora_max_abs_diff"] = _max_diff(jax.device_get(res[0][1]["trainable"]),
                                                 jax.device_get(res[1][1]["trainable"]))
        if have_dpo:
            db = dpo_batch(rng, mcfg.vocab_size, 4, 64)
            dcfg = dpo_cfg(args, batch_size=4, max_length=64, **{"lora.rank": 4, "lora.alpha": 8, "remat": "false"})
            res = [_dpo_step(dcfg, mcfg, params, db, d, nudge=0.01) for d in (accel, cpu)]
            out["dpo_loss"] = [float(r[4]["loss"]) for r in res]
            out["dpo_loss_diff"] = abs(out["dpo_loss"][0] - out["dpo_loss"][1])
            out["dpo_lora_max_abs_diff"] = _max_diff(jax.device_get(res[0][1]["trainable"]),
                                                     jax.device_get(res[1][1]["trainable"]))
    tol = 2e-4
    out["ok"] = all(out.get(k, 0.0) <= tol for k in ("forward_max_abs_diff", "sft_loss_diff", "sft_lora_max_abs_diff",
                                                      "dpo_loss_diff", "dpo_lora_max_abs_diff"))
    out["tolerance"] = tol
    return out


def time_steps(step, state, frozen, batch, n: int) -> tuple[float, object]:
    import jax

    state, m = step(state, frozen, batch)  # compiled already; one more warm-up
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(n):
        state, m = step(state, frozen, batch)
    jax.block_until_ready((state, m))
    return (time.perf_counter() - t) / n, m


def timing(args, accel, peak: float, have_dpo: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persllm_jax.model import lora as lora_mod
    from persllm_jax.model.config import from_hf_dict
    from persllm_jax.model.decoder import init_params
    from persllm_jax.model.shapes import SHAPES
    from persllm_jax.train import dpo, sft

    hf = TINY if args.cpu_smoke else SHAPES[args.shape]
    mcfg = from_hf_dict(hf, args.shape)
    params = jax.jit(lambda k: init_params(mcfg, k, jnp.bfloat16),
                     out_shardings=jax.sharding.SingleDeviceSharding(accel))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    out = {"shape": "tiny" if args.cpu_smoke else args.shape, "params": mcfg.num_params(), "seq": args.seq,
           "batch": args.batch, "lora_rank": args.lora_rank, "remat": args.remat, "compute": "bfloat16",
           "base_weights": "bfloat16"}

    cfg = train_cfg(args, dtype="bfloat16")
    b = sft_batch(rng, mcfg.vocab_size, args.batch, args.seq)
    t0 = time.perf_counter()
    step, state, frozen, batch, m = _sft_step(cfg, mcfg, params, b, accel)
    jax.block_until_ready(m)
    out["sft_compile_s"] = time.perf_counter() - t0
    dt, m = time_steps(step, state, frozen, batch, args.steps)
    n_lora = lora_mod.lora_param_count(state["trainable"])
    tokens = int((b["segment_ids"] > 0).sum())
    fpt = sft.flops_per_token(mcfg, args.seq, n_lora)
    out["sft"] = {"step_s": dt, "tokens_per_s": tokens / dt, "mfu": tokens / dt * fpt / peak,
                  "loss": float(m["loss"]), "flops_per_token": fpt, "lora_params": n_lora}
    del step, state, frozen, batch

    if have_dpo:
        dcfg = dpo_cfg(args, dtype="bfloat16")
        db = dpo_batch(rng, mcfg.vocab_size, args.batch, args.seq)
        t0 = time.perf_counter()
        step, state, frozen, batch, m = _dpo_step(dcfg, mcfg, params, db, accel)
        jax.block_until_ready(m)
        out["dpo_compile_s"] = time.perf_counter() - t0
        dt, m = time_steps(step, state, frozen, batch, args.steps)
        tokens = int((db["segment_ids"] > 0).sum())  # prompt + chosen + rejected, prompt once
        fpt = dpo.dpo_flops_per_token(mcfg, args.seq, n_lora, online_ref=True)
        out["dpo"] = {"step_s": dt, "tokens_per_s": tokens / dt, "mfu": tokens / dt * fpt / peak,
                      "loss": float(m["loss"]), "flops_per_token": fpt}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    from persllm_jax.train.loop import measure_peak_flops

    have_dpo = not args.skip_dpo
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    res = {"platform": accel.platform, "device_kind": accel.device_kind, "devices": jax.device_count(),
           "jax": jax.__version__, "cpu_smoke": args.cpu_smoke}
    print(f"device: {jax.device_count()} x {accel.device_kind} ({accel.platform}), jax {jax.__version__}", flush=True)
    if accel.platform == "cpu" and not args.cpu_smoke:
        print("no accelerator found (pass --cpu-smoke for a dry run on the CPU)", file=sys.stderr)
        return 2
    n = 512 if args.cpu_smoke else 8192
    res["peak_flops"] = measure_peak_flops(n, reps=10, dtype=jnp.bfloat16, device=accel)  # bf16, fp32 accumulation
    print(f"peak: bf16 matmul {n}^3 {res['peak_flops'] / 1e12:.3g} TFLOP/s (measured)", flush=True)
    if not args.skip_parity:
        res["parity"] = p = parity(args, accel, cpu, have_dpo)
        print(f"parity vs CPU (fp32): forward max|diff| {p['forward_max_abs_diff']:.2e}, SFT loss diff "
              f"{p['sft_loss_diff']:.2e} lora {p['sft_lora_max_abs_diff']:.2e}"
              + (f", DPO loss diff {p['dpo_loss_diff']:.2e} lora {p['dpo_lora_max_abs_diff']:.2e}" if have_dpo else "")
              + f" -> {'OK' if p['ok'] else 'MISMATCH'} (tol {p['tolerance']:g})", flush=True)
    res["timing"] = t = timing(args, accel, res["peak_flops"], have_dpo)
    print(f"model: {t['shape']} ({t['params'] / 1e9:.2f}B params, random), bf16, LoRA r={t['lora_rank']} all-linear, "
          f"batch {t['batch']} x {t['seq']}, remat {'on' if t['remat'] else 'off'}", flush=True)
    for kind in ("sft", "dpo"):
        if kind in t:
            r = t[kind]
            print(f"{kind.upper()} LoRA: {r['tokens_per_s']:,.0f} tokens/s, {1e3 * r['step_s']:.1f} ms/step, "
                  f"MFU {100 * r['mfu']:.1f}% (compile {t[kind + '_compile_s']:.1f} s, loss {r['loss']:.3f})",
                  flush=True)
    if not have_dpo:
        print("DPO: skipped (--skip-dpo)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    ok = res.get("parity", {}).get("ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
