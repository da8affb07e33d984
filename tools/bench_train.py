"""Benchmark: our LoRA SFT vs TRL `SFTTrainer` + PEFT, same weights, data and LoRA settings, both on the CPU.

    python tools/bench_train.py [--n 48] [--batch-rows 4] [--trl-batch 8] [--trl-modes padded,grouped,packed]
                                [--dists long,short] [--skip-trl] [--hugepages]
    python tools/bench_train.py --dists long --skip-trl --remat   # ours only, one distribution, remat on

The DPO benchmark is its own script, tools/bench_dpo.py.

Model: SmolLM2-135M-Instruct (the embedded GGUF; transformers dequantizes the same file for TRL). LoRA r=16,
alpha=32, dropout 0, on all seven linear layers; AdamW, lr 1e-4, fp32. Data: a fixed set of persona-style
conversations (system + user + assistant with [Analysis]/[Response] CoT), one table row per length distribution
(DISTS): `long`, templated lengths spread over 96-1000 tokens in rows of max_length 1024 (persona conversations
run long), and the earlier `short`, 64-496 tokens in rows of 512. Loss on the assistant answer only on both sides
(TRL: prompt/completion format with completion_only_loss). Both run one epoch; the first step (compilation /
warm-up) is excluded from timing. Each side runs in its own subprocess; peak RSS = its ru_maxrss.

Metric: useful tokens per second = non-padding tokens of the conversations processed per second of
training. Ours packs conversations into rows of max_length with segment ids, --batch-rows of them per optimizer
step, --micro-rows per forward pass (default 1, as TRL's packed mode; activation memory scales with it, speed on
the CPU does not: 148 tok/s at 1 and at 4 rows per forward, measured). TRL runs in each of its ways of
batching (`--trl-modes`, each its own subprocess, the best one is the peer of the ratios):
    padded   its default: one conversation per row, padded to the longest in the batch of --trl-batch
    grouped  the same, with `train_sampling_strategy="group_by_length"` (batches of similar lengths, less padding)
    packed   `packing=True` (best-fit decreasing into rows of max_length, padding-free: position ids, which
             transformers' sdpa turns into a block-diagonal mask): one packed row per forward and --batch-rows
             accumulation steps, our tokens per optimizer step (a flattened batch of several rows would pay
             attention over all of them at once)

MFU = tokens/s x FLOPs/token / peak, peak = measured fp32 matmul FLOP/s (2048^3, jax, same machine).
FLOPs/token (LoRA, frozen base) = 4·N + 6·N_lora + 3·A with N = matmul weights of all layers + the vocabulary
projection, N_lora = adapter params, A = 4·L·H·hd·T (forward attention, T = max_length): see
train/sft.flops_per_token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu, when installed, would probe for a TPU

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PERSONAS = [("Hermione Granger", "1994"), ("Harry Potter", "1998"), ("Albus Dumbledore", "1996"),
            ("Ron Weasley", "1995")]
TOPICS = ["the library", "house-elves", "Quidditch", "the Triwizard Tournament", "Hogsmeade", "Professor Snape",
          "the Ministry", "Divination", "time-turners", "Azkaban", "Gryffindor common room", "the Burrow"]
PHRASES = ["Honestly, I think", "You have to understand that", "When I first read about it,", "It's not that simple;",
           "I remember clearly that", "Of course, the real question is whether", "Frankly,", "To be fair,",
           "What people forget is that", "I'd argue that"]
TRL_MODES = ("padded", "grouped", "packed")
DISTS = {"long": {"lo": 96, "hi": 1000, "max_length": 1024}, "short": {"lo": 64, "hi": 496, "max_length": 512}}
WORDS = ("magic rules friends study careful brave loyal history wand spell castle owl letter teacher exam rights "
         "fair wrong right always never perhaps certainly reason evidence book chapter night storm fire truth "
         "promise danger courage lesson mistake practice patience").split()


def n_tokens(tok, conv) -> int:
    return len(tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"])


def make_conversations(tok, n: int, seed: int = 0, lo: int = 64, hi: int = 496):
    """Single-turn persona conversations whose templated token length is spread uniformly over [lo, hi]."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, year = PERSONAS[i % len(PERSONAS)]
        topic = rng.choice(TOPICS)
        target = lo + (hi - lo) * i / max(n - 1, 1)
        msgs = [{"role": "system", "content": f"Now it's {year}. You are {name}. Stay in character."},
                {"role": "user", "content": f"What do you really think about {topic}?"}]
        words = [f"[Analysis] The user asks about {topic}; as {name} I answer from my own experience. [Response]"]
        while True:
            conv = msgs + [{"role": "assistant", "content": " ".join(words)}]
            n_tok = n_tokens(tok, conv)
            if n_tok >= target - 4:
                break
            s = rng.choice(PHRASES) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."
            words.append(s)
        out.append(conv)
    rng.shuffle(out)
    return out


HUGEPAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: malloc asks the kernel for transparent huge pages


def hugepages_env(environ) -> dict | None:
    """`environ` with glibc's malloc asking for transparent huge pages (other tunables kept), None if it does."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGEPAGES in tunables.split(":"):
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGEPAGES) if t))


def with_hugepages(wanted: bool) -> None:
    """--hugepages: run this whole benchmark again (peak timer and both sides) with malloc asking for transparent
    huge pages, for hosts whose page faults on fresh allocations cost either side time (a ratio means something
    only when both ran under one setting; `memory_setting()` prints it). 2026-12-04 on our 2-core host (kernel
    mode `madvise`) it moved both sides little: SFT long rows, ours 154-158 tok/s -> 156-164 (3 runs each, +2%),
    TRL packed 107.5 -> 108.7."""
    env = hugepages_env(os.environ) if wanted else None
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def memory_setting() -> str:
    """The kernel's transparent-huge-page mode and whether malloc asks for them (see with_hugepages)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "unknown"
    asked = hugepages_env(os.environ) is None
    return f"transparent huge pages: kernel mode {mode}, malloc {'asks for them' if asked else 'default'}"


def versions() -> str:
    """The libraries both sides ran with, printed with the figures: the peer's speed moves between environments
    (TRL packed ran 26% faster in a fresh one on 2026-12-04 than on -03, ours 5%)."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} absent"

    return ", ".join(one(n) for n in ("jax", "jaxlib", "torch", "transformers", "trl", "peft"))


def trl_modes(text: str, known: tuple[str, ...]) -> list[str]:
    """--trl-modes as a list, each one of `known` (else exit with the choices)."""
    modes = text.split(",")
    if not set(modes) <= set(known):
        sys.exit(f"--trl-modes: each one of {', '.join(known)}, got {text!r}")
    return modes


def run_ours(convs, args, tmp: Path):
    import jax

    from persllm_jax.model.weights import load_model, load_tokenizer
    from persllm_jax.train import sft
    from persllm_jax.train.config import load_config

    corpus = tmp / "corpus"
    (corpus / "sft").mkdir(parents=True, exist_ok=True)
    (corpus / "sft" / "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    micro = args.micro_rows or args.batch_rows
    sets = ["epochs=1", f"batch_size={micro}", f"grad_accum={args.batch_rows // micro}",
            f"max_length={DISTS[args.dist]['max_length']}", "learning_rate=1e-4", "warmup_steps=0",
            "lora.rank=16", "lora.alpha=32", "lora.dropout=0", "lora.targets=all-linear", "weight_decay=0",
            f"dtype={args.dtype}", "mesh.data=1", "log_every=100000", f"peak_tflops={args.peak / 1e12}",
            "shuffle=true", "seed=0"] + ([f"attention={args.attention}"] if args.attention != "auto" else []) \
        + (["remat=true"] if args.remat else [])
    cfg = load_config(overrides=sets, base={"model": "smollm2", "data": str(corpus)})
    loaded, tok = load_model("smollm2"), load_tokenizer("smollm2")
    t0 = time.perf_counter()
    out = sft.run(cfg, tmp / "run", loaded=loaded, tokenizer=tok, devices=jax.devices()[:1], progress=False,
                log=lambda s: print("  ours:", s))
    wall = time.perf_counter() - t0
    last = out["last"]
    return {"tokens_per_s": last["tokens_per_s"], "tokens_per_cpu_s": last["tokens_per_cpu_s"],
            "steps": out["steps"], "wall_s": wall,
            "flops_per_token": out["flops_per_token"], "final_loss": last["loss"],
            "tokens": out["stats"].tokens, "trained_tokens": out["stats"].trained_tokens}


def ours_fpt(max_length: int):
    from persllm_jax.model.decoder import linear_shapes
    from persllm_jax.model.weights import load_model
    from persllm_jax.train import sft

    cfg = load_model("smollm2").cfg
    n_lora = cfg.num_layers * 16 * sum(i + o for i, o in linear_shapes(cfg).values())
    return sft.flops_per_token(cfg, max_length, n_lora)


def torch_model_from_ours(spec: str = "smollm2"):
    """The same fp32 weights as ours, in a transformers model (a GGUF-loaded transformers model refuses training)."""
    import numpy as np
    import torch
    import transformers

    from persllm_jax.model.weights import load_model

    loaded = load_model(spec)
    hf = dict(loaded.hf_config)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    p = loaded.params
    state = {"model.embed_tokens.weight": p["embed_tokens"], "model.norm.weight": p["norm"]}
    if "lm_head" in p:
        state["lm_head.weight"] = np.asarray(p["lm_head"]["kernel"]).T
    for name, leaf in p["layers"].items():
        mod = ("self_attn." if name[0] in "qkvo" else "mlp.") + name if name.endswith("proj") else name
        for i in range(loaded.cfg.num_layers):
            if isinstance(leaf, dict):
                for k, v in leaf.items():
                    v = np.asarray(v[i])
                    state[f"model.layers.{i}.{mod}.{'weight' if k == 'kernel' else k}"] = v.T if k == "kernel" else v
            else:
                key = f"model.layers.{i}.self_attn.{name}.weight" if name in ("q_norm", "k_norm") else f"model.layers.{i}.{name}.weight"
                state[key] = np.asarray(leaf[i])
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def run_trl(convs, args, tmp: Path, mode: str = "padded"):
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from persllm_jax.model.weights import load_tokenizer

    torch.manual_seed(0)
    model = torch_model_from_ours()
    tok = load_tokenizer("smollm2")
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    packed = mode == "packed"
    accum = args.batch_rows if packed else 1
    cfg = SFTConfig(output_dir=str(tmp / "trl"), num_train_epochs=1,
                    per_device_train_batch_size=1 if packed else args.trl_batch, gradient_accumulation_steps=accum,
                    train_sampling_strategy="group_by_length" if mode == "grouped" else "random",
                    learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0,
                    weight_decay=0.0, max_grad_norm=1.0, logging_steps=100000, save_strategy="no", report_to=[],
                    max_length=DISTS[args.dist]["max_length"], packing=packed, completion_only_loss=True, use_cpu=True, bf16=False, fp16=False,
                    gradient_checkpointing=False,
                    seed=0, dataloader_num_workers=0, disable_tqdm=True)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    counts, times = [], []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainer.train_dataset  # noqa: B018  (dataset already tokenized by the trainer)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append((time.perf_counter(), time.process_time()))

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    steps = len(times)
    tokens = sum(counts[accum:accum * steps])  # steps 2..K (the collator is called in order, accum times a step)
    return {"tokens_per_s": tokens / (times[-1][0] - times[0][0]),
            "tokens_per_cpu_s": tokens / (times[-1][1] - times[0][1]), "steps": steps, "wall_s": wall,
            "final_loss": result.training_loss, "tokens": sum(counts[:accum * steps]), "mode": mode,
            "torch_threads": torch.get_num_threads()}


def run_side(args) -> dict:
    """One side in this process (the parent runs each side in its own subprocess: memory is per side)."""
    import resource

    from persllm_jax.model.weights import load_tokenizer

    d = DISTS[args.dist]
    convs = make_conversations(load_tokenizer("smollm2"), args.n, lo=d["lo"], hi=d["hi"])
    with tempfile.TemporaryDirectory() as d:
        res = run_ours(convs, args, Path(d)) if args.side == "ours" else run_trl(convs, args, Path(d), args.trl_mode)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="conversations (one epoch each side)")
    ap.add_argument("--batch-rows", type=int, default=4, help="our packed rows of max_length tokens per step")
    ap.add_argument("--micro-rows", type=int, default=1,
                    help="our rows per forward pass (batch_size), the rest of --batch-rows as accumulation steps "
                         "(grad_accum), as TRL's packed mode; 0 = all --batch-rows in one forward")
    ap.add_argument("--trl-batch", type=int, default=8, help="TRL conversations per step (padded, grouped)")
    ap.add_argument("--trl-modes", default="padded,grouped,packed",
                    help="TRL's ways of batching to run (padded, grouped, packed; see above); the best is the peer")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dists", default="long,short", help=f"length distributions, table rows ({', '.join(DISTS)})")
    ap.add_argument("--attention", default="auto", help="our attention implementation (config key `attention`)")
    ap.add_argument("--remat", action="store_true", help="ours with remat=true (recompute layers in the backward)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--dist", default="short", choices=list(DISTS), help=argparse.SUPPRESS)  # internal: the side's
    ap.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)  # internal
    ap.add_argument("--trl-mode", default="padded", choices=TRL_MODES, help=argparse.SUPPRESS)  # internal
    ap.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)  # internal: measured once
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--hugepages", action="store_true",
                    help="both sides (and the peak timer) with malloc asking for transparent huge pages")
    args = ap.parse_args()
    if args.micro_rows and args.batch_rows % args.micro_rows:
        sys.exit(f"--micro-rows {args.micro_rows} must divide --batch-rows {args.batch_rows}")
    if args.side:
        Path(args.json).write_text(json.dumps(run_side(args)))
        return

    with_hugepages(args.hugepages)
    import subprocess

    from persllm_jax.model.weights import load_tokenizer
    from persllm_jax.train.loop import measure_peak_flops

    args.peak = measure_peak_flops()
    tok = load_tokenizer("smollm2")
    print(f"measured matmul peak {args.peak / 1e9:.1f} GFLOP/s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; {memory_setting()}\n{versions()}", flush=True)
    res = {"peak_flops": args.peak}
    modes = trl_modes(args.trl_modes, TRL_MODES)
    sides = ([] if args.skip_ours else ["ours"]) + ([] if args.skip_trl else [f"trl:{m}" for m in modes])
    for dist in args.dists.split(","):
        d = DISTS[dist]
        lens = sorted(n_tokens(tok, c) for c in make_conversations(tok, args.n, lo=d["lo"], hi=d["hi"]))
        print(f"[{dist}] {len(lens)} conversations, templated lengths {lens[0]}..{lens[-1]} (median "
              f"{lens[len(lens) // 2]}), {sum(lens)} tokens, max_length {d['max_length']}", flush=True)
        r_d = res[dist] = {"lengths": [lens[0], lens[-1]], "fpt": ours_fpt(d["max_length"])}
        with tempfile.TemporaryDirectory() as tmp:
            for side in sides:
                out = Path(tmp) / f"{side}.json"
                who, _, mode = side.partition(":")
                argv = [sys.executable, __file__, "--side", who, "--trl-mode", mode or "padded",
                        "--json", str(out), "--peak", str(args.peak),
                        "--n", str(args.n), "--batch-rows", str(args.batch_rows),
                        "--micro-rows", str(args.micro_rows), "--trl-batch", str(args.trl_batch),
                        "--dtype", args.dtype, "--dist", dist, "--attention", args.attention] + (["--remat"] if args.remat else [])
                if subprocess.run(argv).returncode != 0:
                    if side == "ours":
                        sys.exit("ours failed (see above)")
                    print(f"  {side}: failed (see above); left out of the ratios", flush=True)
                    continue
                r_d[side] = r = json.loads(out.read_text())
                r["mfu"] = r["tokens_per_s"] * r_d["fpt"] / args.peak
                print(f"  {side}: " + json.dumps(r), flush=True)
        trl = [side for side in sides if side.startswith("trl") and side in r_d]
        if "ours" in r_d and trl:
            best = r_d["trl_best"] = max(trl, key=lambda side: r_d[side]["tokens_per_s"])
            r_d["ratio"] = r_d["ours"]["tokens_per_s"] / r_d[best]["tokens_per_s"]
            r_d["ratio_cpu"] = r_d["ours"]["tokens_per_cpu_s"] / r_d[best]["tokens_per_cpu_s"]
            r_d["rss_ratio"] = r_d["ours"]["peak_rss_mb"] / min(r_d[side]["peak_rss_mb"] for side in trl)
    print(f"\n{'data':8}{'side':12}{'tok/s':>9}{'tok/CPU-s':>11}{'MFU':>7}{'peak RSS MB':>13}{'loss':>8}"
          f"{'x TRL tok/s':>13}{'x TRL CPU-s':>13}{'RSS/TRL':>9}")
    for dist in args.dists.split(","):
        r_d = res[dist]
        for side in (side for side in sides if side in r_d):
            r = r_d[side]
            extra = (f"{r_d['ratio']:>13.2f}{r_d['ratio_cpu']:>13.2f}{r_d['rss_ratio']:>9.2f}"
                     if side == "ours" and "ratio" in r_d else "")
            print(f"{dist:8}{side + ('*' if side == r_d.get('trl_best') else ''):12}{r['tokens_per_s']:>9.1f}{r['tokens_per_cpu_s']:>11.1f}{100 * r['mfu']:>6.1f}%"
                  f"{r['peak_rss_mb']:>13.0f}{r['final_loss']:>8.4f}{extra}")
    print("x TRL: against TRL's fastest way of batching (*); RSS/TRL: against its smallest peak RSS")
    print("targets: >= 2x TRL useful tok/s, peak RSS <= TRL's; the CPU-second ratio is the one to trust on a shared "
          "machine")
    print("FLOPs/token = 4*N + 6*N_lora + 3*A; N = layer matmul weights + vocab projection, A = 4*L*H*hd*T "
          "(T = max_length); MFU = tokens/s * FLOPs/token / measured fp32 matmul peak")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "dpo":
        sys.exit("the DPO benchmark is its own script: python tools/bench_dpo.py [options]")
    else:
        main()
