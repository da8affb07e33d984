"""`persllm serve` under mixed-persona Poisson load: the continuous engine vs the static one vs one at a time.

One process, one loaded base model with ADAPTERS random rank-8 LoRA adapters (every projection) over it, served as
`base`, `p0`, `p1`, ...; the server runs in a thread on 127.0.0.1. REQUESTS streaming chat completions (the
official async `openai` client, `stream_options.include_usage`) arrive as a Poisson process at RATE requests/s,
each for a random model (adapters and base alike) with a random `max_tokens` from MAX_TOKENS, greedy, EOS
ignored (equal work for every engine). The same arrivals are replayed against:

  continuous  `--engine continuous --max-batch SLOTS` (slots, joins at every chunk, adapters mixed in a batch)
  static      `--engine static --max-batch SLOTS` (the previous engine: one model per batch, runs to its end)
  one at a time  `--engine static --max-batch 1`, SINGLE requests sent back to back (no queueing)

Reported per engine: completion tokens/s over the whole run (first arrival to last token), time to first token
and end-to-end latency p50 / p95 (client side), mean batch occupancy (continuous: busy rows per decode step over
the slots; static: mean rows per batch over max_batch) and KV-cache bytes. Every program is compiled before the
timed runs.

    python tools/bench_serve.py                              # embedded SmolLM2-135M, 128 requests at 8/s
    python tools/bench_serve.py --requests 256 --rate 16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persllm_jax.io import DTYPE_NAMES, jnp_dtype  # noqa: E402 (after the path insert)

WORDS = ["steam engine", "loom", "telescope", "barometer", "compass", "printing press", "clock", "microscope"]


def workload(n, rate, models, lengths, seed):
    """[(arrival offset s, model, prompt, max_tokens)]: Poisson arrivals, models and lengths uniform."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choice(models), f"Question {i}: describe a {rng.choice(WORDS)} in two sentences.",
                    rng.choice(lengths)))
    return out


async def _replay(url, work, back_to_back=False):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    results = []

    async def one(at, model, prompt, max_tokens):
        if not back_to_back:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        start, first, tokens = time.perf_counter(), None, 0
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for ch in stream:
            if first is None and ch.choices and ch.choices[0].delta.content:
                first = time.perf_counter()
            if ch.usage:
                tokens = ch.usage.completion_tokens
        end = time.perf_counter()
        results.append({"ttft": (first or end) - start, "e2e": end - start, "tokens": tokens, "end": end})

    try:
        if back_to_back:
            for w in work:
                await one(*w)
        else:
            await asyncio.gather(*(one(*w) for w in work))
    finally:
        await client.close()
    return t0, results


def _pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def measure(models, engine, slots, chunk, work, slot_tokens, back_to_back=False):
    from persllm_jax.serve.app import BackgroundServer, ServerState

    state = ServerState(models, max_batch=slots, chunk=chunk, engine=engine, slot_tokens=slot_tokens,
                        batch_window=0.03)
    warm_up(state, work)
    with BackgroundServer(state) as url:
        asyncio.run(_replay(url, work[:1], back_to_back=True))  # the HTTP path once
        before = dict(state.scheduler.stats)
        t0, res = asyncio.run(_replay(url, work, back_to_back))
        st = state.scheduler.stats
    secs = max(r["end"] for r in res) - t0
    tokens = sum(r["tokens"] for r in res)
    if engine == "continuous":
        occ = (st["row_steps"] - before["row_steps"]) / max(1, st["slot_steps"] - before["slot_steps"])
        eng = state.scheduler.engines[0]
        kv = eng.kv_bytes_per_slot() * eng.n_slots
    else:
        batches = st["batches"] - before["batches"]
        occ = (st["rows"] - before["rows"]) / max(1, batches) / slots
        gen = next(iter(models.values())).gen
        c = gen.cfg
        kv = slots * 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * (64 + 128)  # one full batch, P + new
    return {"engine": engine if slots > 1 else "one at a time", "slots": slots, "requests": len(res),
            "seconds": round(secs, 1), "completion_tokens": tokens, "tokens_per_s": round(tokens / secs, 1),
            "ttft_p50": _pct([r["ttft"] for r in res], 0.5), "ttft_p95": _pct([r["ttft"] for r in res], 0.95),
            "e2e_p50": _pct([r["e2e"] for r in res], 0.5), "e2e_p95": _pct([r["e2e"] for r in res], 0.95),
            "mean_occupancy": round(occ, 3), "kv_cache_MiB": round(kv / 2**20, 1)}


def warm_up(state, work):
    """Compile every program the timed run may meet (so timings exclude compilation)."""
    from persllm_jax.serve.engine import SamplingParams

    from persllm_jax.serve.engine import _prompt_bucket

    gen = next(iter(state.models.values())).gen
    by_bucket = {}  # one prompt of each length bucket
    for w in work:
        ids = gen.encode_chat([{"role": "user", "content": w[2]}])
        by_bucket.setdefault(_prompt_bucket(len(ids)), (ids, w[2]))
    longest = max(len(ids) for ids, _ in by_bucket.values())
    max_new = max(w[3] for w in work)
    if state.engine == "continuous":
        import numpy as np

        for eng in state.scheduler.engines:
            N = eng.n_slots
            for prompt, _ in by_bucket.values():
                b = 1
                while True:
                    eng.prefill([(s, prompt, 0, 0) for s in range(min(b, N))], state.scheduler.prefill_chunk)
                    if b >= N:
                        break
                    b *= 2
            z = np.zeros(N, np.int64)
            for end in range(longest, longest + max_new + 128, 64):
                pos = np.full(N, max(0, end - state.scheduler.chunk))
                eng.decode(pos, z, np.full(N, 1), z, z.astype(np.uint32), np.zeros(N), z.astype(np.int32),
                           np.ones(N), state.scheduler.chunk, False)
        return
    # the static engine compiles per (batch bucket, prompt bucket, cache capacity); programs are shared by
    # every adapter (same tree structure), so the base and one adapter cover them; one token keeps the capacity
    for m in list(state.models.values())[:2]:
        for _, text in by_bucket.values():
            b = 1
            while True:
                m.gen.chat([[{"role": "user", "content": text}]] * b, SamplingParams(max_new_tokens=1))
                if b >= state.scheduler.max_batch:
                    break
                b = min(2 * b, state.scheduler.max_batch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--max-tokens", default="16,32,64", help="completion lengths drawn uniformly")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--slot-tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--single", type=int, default=12, help="requests of the one-at-a-time run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import jax

    from persllm_jax.cli import _enable_compilation_cache

    _enable_compilation_cache()  # compiled programs persist across runs (PERSLLM_CACHE)

    from persllm_jax.model.lora import init_lora
    from persllm_jax.serve.app import ServedModel
    from persllm_jax.serve.engine import Generator

    base = Generator.load(args.model, dtype=jnp_dtype(args.dtype), chunk=args.chunk)
    base.eos_token_ids = ()  # every request decodes exactly max_tokens: equal work for every engine
    models = {"base": ServedModel("base", base)}
    for i in range(args.adapters):
        lora = init_lora(base.cfg, jax.random.key(i), 8, "all-linear")
        lora = {n: {"a": f["a"], "b": 0.02 * jax.random.normal(jax.random.key(100 + i), f["b"].shape)}
                for n, f in lora.items()}
        gen = base.with_adapter(lora, 2.0)
        gen.eos_token_ids = ()  # with_adapter adds the tokenizer's EOS back
        models[f"p{i}"] = ServedModel(f"p{i}", gen)
    lengths = [int(x) for x in args.max_tokens.split(",")]
    work = workload(args.requests, args.rate, list(models), lengths, args.seed)
    print(f"model {args.model} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.adapters} "
          f"adapters + base, {args.requests} requests, Poisson {args.rate}/s, max_tokens in {lengths}, "
          f"{args.slots} slots, chunk {args.chunk}", flush=True)
    rows = []
    for engine in ("continuous", "static"):
        rows.append(measure(models, engine, args.slots, args.chunk, work, args.slot_tokens))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(measure(models, "static", 1, args.chunk, work[:args.single], args.slot_tokens, back_to_back=True))
    print(json.dumps(rows[-1]), flush=True)
    cont, static, single = rows
    ratio = cont["tokens_per_s"] / static["tokens_per_s"]
    print(f"throughput continuous / static: {ratio:.2f}x (target >= 2x), / one at a time: "
          f"{cont['tokens_per_s'] / single['tokens_per_s']:.1f}x; e2e p95 {cont['e2e_p95']}s vs {static['e2e_p95']}s; "
          f"mean occupancy {cont['mean_occupancy']:.0%} of {args.slots} slots (target >= 80%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": jax.devices()[0].device_kind,
                                               "results": rows, "ratio": ratio}, indent=1))
    return ratio


if __name__ == "__main__":
    main()
