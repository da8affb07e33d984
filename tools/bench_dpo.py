"""Benchmark: our DPO vs TRL `DPOTrainer` + PEFT, same weights, pairs and LoRA settings, both on the CPU, one run.

    python tools/bench_dpo.py [--n 32] [--rows 1] [--accum 2] [--trl-batch 4] [--trl-modes padded,grouped]
                              [--precompute] [--skip-trl] [--hugepages]
    python tools/bench_dpo.py --long [...]   # long pairs (documents up to ~1500 tokens), rows of 2048

Model: SmolLM2-135M-Instruct (the embedded GGUF; TRL gets the same fp32 weights as a transformers model through
bench_train.torch_model_from_ours). LoRA r=16, alpha=32, dropout 0, all seven linear layers; AdamW lr 5e-5; sigmoid
loss, beta 0.1; reference = the base with the adapter off on both sides (online, unless --precompute, which turns on
our `precompute_ref` and TRL's `precompute_ref_log_probs` alike); fp32 (TRL's bf16 autocast default turned off).
Data: persona-style pairs (system prompt with persona, year and material; user question; chosen and rejected
[Analysis]/[Response] answers), prompts of ~60-300 tokens and answers of ~20-250 tokens (`--long`: prompts of
~100-600 and answers of ~60-500 tokens, max_length 2048), tokenised identically on both sides (TRL's
prompt/completion split).

Each side runs in its own subprocess for one epoch; the first step (compilation / warm-up) is left out of timing.
    useful tokens/s = Σ over timed steps of (prompt + chosen + rejected tokens of each pair, the prompt once,
                      no padding) / time of those steps
    peak memory     = ru_maxrss of that subprocess (resident set high-water mark: weights, activations, runtime)
    MFU (ours)      = tokens/s x FLOPs/token / peak FLOP/s (measured fp32 matmul); FLOPs/token = 4N + 6N_lora + 3A
                      (+ 2N + A for the online reference forward), N = matmul weights incl. the vocabulary
                      projection, A = 4·L·H·hd·T, T = max_length (dpo.dpo_flops_per_token).
Ours packs whole [prompt | chosen | rejected] documents into rows of `max_length`, the prompt computed once for
both answers, and projects only completion positions onto the vocabulary; TRL pads [chosen; rejected] batches,
in each of its ways of batching (`--trl-modes`, each its own subprocess; the fastest is the peer of the ratio):
    padded   its default: pairs in random order, each batch padded to its longest
    grouped  `train_sampling_strategy="group_by_length"` on the padded pair length (prompt + longer answer), so a
             batch holds pairs of similar length (TRL 1.16's DPO `padding_free` is disabled, it says, after a
             refactor, so there is no packed mode)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu, when installed, would probe for a TPU

from bench_train import (PERSONAS, PHRASES, TARGETS, TOPICS, WORDS, memory_setting, trl_modes,  # noqa: E402
                         versions, with_hugepages)

TRL_MODES = ("padded", "grouped")
MATERIALS = ["Letters from that year mention {t} often.", "In the diary: '{t} again today, and nobody listens.'",
             "A newspaper clipping about {t} is pinned above the desk.", "Notes from class on {t}, underlined twice."]


def _answer(rng: random.Random, name: str, topic: str, n_sent: int) -> str:
    text = [f"[Analysis] The question is about {topic}; {name} would answer from experience. [Response]"]
    for _ in range(n_sent):
        text.append(rng.choice(PHRASES) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".")
    return " ".join(text)


def make_pairs(n: int, seed: int = 0, long: bool = False) -> list[dict]:
    """Persona-style DPO rows (design note format) with prompt and answer lengths spread out."""
    rng = random.Random(seed)
    n_mat, n_sent = ((4, 30), (4, 24)) if long else ((1, 14), (1, 12))
    rows = []
    for i in range(n):
        name, year = PERSONAS[i % len(PERSONAS)]
        other, other_year = PERSONAS[(i + 1) % len(PERSONAS)]
        topic = rng.choice(TOPICS)
        material = " ".join(rng.choice(MATERIALS).format(t=rng.choice(TOPICS)) for _ in range(rng.randint(*n_mat)))
        prompt = [{"role": "system", "content": f"Now it's {year}. You are {name}. Stay in character. {material}"},
                  {"role": "user", "content": f"What do you really think about {topic}?"}]
        rows.append({"id": f"b{i}", "persona": name, "stage": year, "source": "cross_persona", "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": _answer(rng, name, topic, rng.randint(*n_sent))}],
                     "rejected": [{"role": "assistant", "content": _answer(rng, other, topic, rng.randint(*n_sent))}]})
    return rows


def side_ours(args, tmp: Path) -> dict:
    import jax

    from persllm_jax.model.weights import load_model, load_tokenizer
    from persllm_jax.train import dpo
    from persllm_jax.train.config import DPOConfig, load_config

    sets = ["epochs=1", f"batch_size={args.rows}", f"grad_accum={args.accum}", f"max_length={args.max_length}", "learning_rate=5e-5",
            "warmup_steps=0", "lora.rank=16", "lora.alpha=32", "lora.dropout=0", "lora.targets=all-linear",
            "weight_decay=0", "beta=0.1", "loss_type=sigmoid", f"precompute_ref={str(args.precompute).lower()}",
            "mesh.data=1", "log_every=100000", f"peak_tflops={args.peak / 1e12}", "shuffle=true", "seed=0",
            "dtype=float32"]
    cfg = load_config(DPOConfig, overrides=sets, base={"model": "smollm2", "data": str(tmp / "corpus")})
    loaded, tok = load_model("smollm2"), load_tokenizer("smollm2")
    t0 = time.perf_counter()
    out = dpo.run(cfg, tmp / "run", loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
                log=lambda s: print("  ours:", s, file=sys.stderr))
    last = out["last"]
    return {"tokens_per_s": last["tokens_per_s"], "steps": out["steps"], "wall_s": time.perf_counter() - t0,
            "final_loss": last["loss"], "reward_accuracy": last["reward_accuracy"], "mfu": last["mfu"],
            "flops_per_token": out["flops_per_token"], "useful_tokens_epoch": out["stats"].tokens,
            "pairs_per_row": out["S"], "completion_slots_per_row": out["K"]}


def side_trl(args, tmp: Path) -> dict:
    import torch
    import transformers
    from bench_train import torch_model_from_ours
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from persllm_jax.model.weights import load_tokenizer

    torch.manual_seed(0)
    rows = [json.loads(ln) for ln in (tmp / "corpus" / "dpo" / "train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    cfg = DPOConfig(output_dir=str(tmp / "trl"), num_train_epochs=1, per_device_train_batch_size=args.trl_batch,
                    gradient_accumulation_steps=1, length_column_name="length",
                    remove_unused_columns=args.trl_mode != "grouped",  # the sampler reads the "length" column
                    train_sampling_strategy="group_by_length" if args.trl_mode == "grouped" else "random",
                    learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, logging_steps=100000, save_strategy="no", report_to=[],
                    max_length=args.max_length, beta=0.1, loss_type=["sigmoid"], use_cpu=True, bf16=False,
                    fp16=False, gradient_checkpointing=False, precompute_ref_log_probs=args.precompute, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=torch_model_from_ours(), args=cfg, train_dataset=ds,
                         processing_class=load_tokenizer("smollm2"), peft_config=peft_cfg)
    if args.trl_mode == "grouped":  # the length a pair is padded to: its prompt and its longer answer
        trainer.train_dataset = trainer.train_dataset.map(
            lambda f: {"length": len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"]))})
    counts, times = [], []
    collate = trainer.data_collator

    def counting(features):
        counts.append(sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features))
        return collate(features)

    trainer.data_collator = counting

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    result = trainer.train()
    steps = len(times)
    counts = counts[-steps:]  # a precompute pass also goes through the collator first
    return {"tokens_per_s": sum(counts[1:steps]) / (times[-1] - times[0]), "steps": steps,
            "wall_s": time.perf_counter() - t0, "final_loss": result.training_loss,
            "useful_tokens_epoch": sum(counts), "torch_threads": torch.get_num_threads(), "mode": args.trl_mode}


def _child(args):
    import resource

    tmp = Path(args.tmp)
    out = side_ours(args, tmp) if args.side == "ours" else side_trl(args, tmp)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(out))


def _spawn(side: str, args, tmp: Path) -> dict | None:
    who, _, mode = side.partition(":")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", who, "--tmp", str(tmp), "--n", str(args.n),
           "--rows", str(args.rows), "--accum", str(args.accum), "--trl-batch", str(args.trl_batch), "--max-length", str(args.max_length),
           "--peak", str(args.peak), "--trl-mode", mode or "padded"] + (["--precompute"] if args.precompute else []) + (["--long"] if args.long else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        if side == "ours":
            sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        print(f"{side} failed (exit {proc.returncode}), left out of the ratio:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="pairs (one epoch each side)")
    ap.add_argument("--rows", type=int, default=1, help="our packed rows per micro-step")
    ap.add_argument("--accum", type=int, default=2, help="our micro-steps per optimizer step")
    ap.add_argument("--trl-batch", type=int, default=4, help="TRL pairs per step")
    ap.add_argument("--max-length", type=int, default=0, help="row length (ours) / max sequence length (TRL); "
                    "default 768, 2048 with --long")
    ap.add_argument("--long", action="store_true", help="long pairs (persona material and answers run long)")
    ap.add_argument("--precompute", action="store_true", help="reference log-probs precomputed on both sides")
    ap.add_argument("--trl-modes", default="padded,grouped", help="TRL's ways of batching to run (see above)")
    ap.add_argument("--trl-mode", default="padded", choices=TRL_MODES, help=argparse.SUPPRESS)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s for MFU (0 = measure a matmul)")
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--hugepages", action="store_true",
                    help="both sides (and the peak timer) with malloc asking for transparent huge pages")
    args = ap.parse_args()
    args.max_length = args.max_length or (2048 if args.long else 768)
    if args.side:
        return _child(args)
    modes = [] if args.skip_trl else trl_modes(args.trl_modes, TRL_MODES)  # checked before any work
    with_hugepages(args.hugepages)
    if not args.peak:
        from persllm_jax.train.loop import measure_peak_flops

        args.peak = measure_peak_flops()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as d:
        tmp = Path(d)
        (tmp / "corpus" / "dpo").mkdir(parents=True)
        rows = make_pairs(args.n, long=args.long)
        (tmp / "corpus" / "dpo" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"SmolLM2-135M, LoRA r=16 all-linear, {args.n} pairs, fp32, CPU ({os.cpu_count()} cores), reference "
              f"{'precomputed' if args.precompute else 'online'}; peak fp32 matmul {args.peak / 1e9:.1f} GFLOP/s; "
              f"{memory_setting()}\n{versions()}")
        ours = _spawn("ours", args, tmp)
        print("ours:", json.dumps(ours))
        trls = {}
        for mode in modes:
            r = _spawn(f"trl:{mode}", args, tmp)
            if r is not None:
                trls[mode] = r
                print(f"trl {mode}: ", json.dumps(r))
    best = max(trls, key=lambda m: trls[m]["tokens_per_s"]) if trls else None
    print(f"\n{'':14}{'tokens/s':>10}{'peak RSS MiB':>14}{'steps':>7}{'wall s':>8}")
    for name, r in (("ours", ours), *((f"TRL {m}" + ("*" if m == best else ""), trls[m]) for m in trls)):
        print(f"{name:14}{r['tokens_per_s']:>10.1f}{r['peak_rss_mib']:>14.0f}{r['steps']:>7}{r['wall_s']:>8.1f}")
    print(f"ours MFU {100 * ours['mfu']:.2f}% ({ours['flops_per_token'] / 1e6:.0f} MFLOP/token)")
    if trls:
        for m, trl in trls.items():
            assert ours["useful_tokens_epoch"] == trl["useful_tokens_epoch"], f"TRL {m} tokenised differently"
        trl, low = trls[best], min(r["peak_rss_mib"] for r in trls.values())
        print(f"throughput ratio ours/TRL {best} (its fastest) = {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x "
              f"(target >= 1.5x); peak memory ours/TRL's smallest = {ours['peak_rss_mib'] / low:.2f}")


if __name__ == "__main__":
    main()
