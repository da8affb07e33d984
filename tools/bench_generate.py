"""Decode throughput: our JAX engine vs `transformers.generate` on SmolLM2-135M-Instruct (CPU by default).

Both engines get the same chat prompts, fp32 weights dequantized from the same GGUF, greedy decoding and
exactly N new tokens (EOS ignored); both are warmed up once, then timed runs alternate between them (median
of repeats) so that load from other processes hits both alike. tokens/s counts generated tokens only
(batch x new tokens / wall time of the whole generate call, prefill included).

    python tools/bench_generate.py [--new-tokens 128] [--batches 1,8] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from persllm_jax.io import DTYPE_NAMES, jnp_dtype

PROMPTS = [
    "Who wrote Hamlet?",
    "Explain in two sentences why the sky is blue.",
    "What is your favourite book, and why?",
    "Give me three tips for learning a new language.",
    "Describe the city of Paris to someone who has never been there.",
    "What did Charles Darwin study on the Beagle voyage?",
    "Write a haiku about autumn leaves.",
    "How do vaccines train the immune system?",
]


def make_ours(prompts_ids, batch, new_tokens, dtype):
    """A zero-argument run of our engine on the first `batch` prompts (compiled by a first call)."""
    from persllm_jax.model.weights import load_model
    from persllm_jax.serve.engine import Generator, SamplingParams

    loaded = load_model("smollm2")
    gen = Generator(loaded.cfg, loaded.params, dtype=jnp_dtype(dtype))
    gen.eos_token_ids = ()  # exactly new_tokens per row
    sp = SamplingParams(max_new_tokens=new_tokens)
    run = lambda: [c.token_ids for c in gen.generate_ids(prompts_ids[:batch], sp)]
    assert all(len(ids) == new_tokens for ids in run())
    return run


def make_transformers(prompts_ids, batch, new_tokens, pad_id):
    import torch
    from transformers import AutoModelForCausalLM

    from persllm_jax.model.weights import embedded_model_path

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    prompts = prompts_ids[:batch]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        return [row[P:].tolist() for row in out]

    assert all(len(r) == new_tokens for r in run())
    return run


def timed_interleaved(runs: dict, repeats: int) -> dict:
    """Median wall time of each run, alternating between them so load changes hit both alike."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="our compute dtype")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from persllm_jax.model.weights import load_tokenizer

    tok = load_tokenizer("smollm2")
    prompts_ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for p in PROMPTS]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    import jax

    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, torch threads {torch.get_num_threads()}, "
          f"new tokens {args.new_tokens}, our dtype {args.dtype}", file=sys.stderr)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        runs = {"ours": make_ours(prompts_ids, batch, args.new_tokens, args.dtype),
                "transformers": make_transformers(prompts_ids, batch, args.new_tokens, pad_id)}
        same = sum(a[:32] == b[:32] for a, b in zip(runs["ours"](), runs["transformers"]()))
        t = timed_interleaved(runs, args.repeats)
        ours, theirs = batch * args.new_tokens / t["ours"], batch * args.new_tokens / t["transformers"]
        rows.append({"batch": batch, "ours_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                     "ratio": round(ours / theirs, 2), "rows_same_first_32_tokens": f"{same}/{batch}"})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| batch | ours tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ours_tok_s']} | {r['transformers_tok_s']} | {r['ratio']}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
