"""Throughput of `persllm serve` with batching vs one request at a time.

Starts the server in this process on 127.0.0.1 (a free port) twice, over the same loaded model: with
`--max-batch N` (concurrent requests decoded together) and with `--max-batch 1` (one at a time). Each run:
CLIENTS concurrent clients (the official async `openai` client over HTTP) send REQUESTS chat completions
each, greedy, `max_tokens` MAX_TOKENS, EOS ignored. Every batch bucket is compiled first, so timings
exclude compilation. Prints completion tokens/s and requests/s for both and their ratio.

    python tools/bench_serve.py                       # embedded SmolLM2-135M, 32 clients x 2 requests
    python tools/bench_serve.py --model DIR --clients 32 --requests 5 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persllm_jax.io import DTYPE_NAMES, jnp_dtype  # noqa: E402 (after the path insert)


async def _round(url, model, clients, requests, max_tokens, prompts):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    tokens = 0

    async def one(c):
        nonlocal tokens
        for r in range(requests):
            msgs = [{"role": "user", "content": prompts[(c * requests + r) % len(prompts)]}]
            resp = await client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                        temperature=0)
            tokens += resp.usage.completion_tokens

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        return time.perf_counter() - t0, tokens
    finally:
        await client.close()


def measure(gen, max_batch, clients, requests, max_tokens, chunk, prompts):
    """Throughput of one server setting; the server runs in a thread of this process."""
    from persllm_jax.serve.app import BackgroundServer, ServedModel, ServerState
    from persllm_jax.serve.engine import SamplingParams

    # warm-up: compile every batch bucket (powers of two up to max_batch) the timed round may meet
    b = 1
    while True:
        gen.chat([[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(b)],
                 SamplingParams(max_new_tokens=max_tokens))
        if b >= max_batch:
            break
        b = min(2 * b, max_batch)
    state = ServerState({"m": ServedModel("m", gen)}, max_batch=max_batch, chunk=chunk, batch_window=0.3)
    with BackgroundServer(state) as url:
        asyncio.run(_round(url, "m", 1, 1, max_tokens, prompts))  # the HTTP path once
        before = dict(state.scheduler.stats)
        secs, tokens = asyncio.run(_round(url, "m", clients, requests, max_tokens, prompts))
        st = state.scheduler.stats
        batches = st["batches"] - before["batches"]
    n = clients * requests
    return {"max_batch": max_batch, "requests": n, "seconds": round(secs, 2), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / secs, 1), "requests_per_s": round(n / secs, 2), "batches": batches,
            "mean_batch_rows": round(n / max(batches, 1), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--single-requests", type=int, default=None,
                    help="requests for the one-at-a-time run (default: clients x requests; its throughput per "
                         "request does not depend on the count, so fewer keep the run short)")
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import jax

    from persllm_jax.cli import _enable_compilation_cache

    _enable_compilation_cache()  # compiled programs persist across runs (PERSLLM_CACHE)

    from persllm_jax.serve.engine import Generator

    gen = Generator.load(args.model, dtype=jnp_dtype(args.dtype), chunk=args.chunk)
    gen.eos_token_ids = ()  # every request decodes exactly max_tokens: equal work in both modes
    prompts = [f"Question {i}: describe a {w} in two sentences." for i, w in
               enumerate(["steam engine", "loom", "telescope", "barometer", "compass", "printing press", "clock",
                          "microscope"])]
    print(f"model {args.model} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {args.clients} clients x "
          f"{args.requests} requests, {args.max_tokens} tokens each", flush=True)
    batched = measure(gen, args.max_batch, args.clients, args.requests, args.max_tokens, args.chunk, prompts)
    print("batched:       ", json.dumps(batched), flush=True)
    n_single = args.single_requests or args.clients * args.requests
    single = measure(gen, 1, n_single, 1, args.max_tokens, args.chunk, prompts)
    print("one at a time: ", json.dumps(single), flush=True)
    ratio = batched["tokens_per_s"] / single["tokens_per_s"]
    print(f"throughput ratio (batched / one at a time): {ratio:.1f}x (target >= 4x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": jax.devices()[0].device_kind,
                                               "batched": batched, "single": single, "ratio": ratio}, indent=1))
    return ratio


if __name__ == "__main__":
    main()
