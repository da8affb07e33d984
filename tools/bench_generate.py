"""Decode throughput: our JAX engine vs `transformers.generate` on SmolLM2-135M-Instruct (CPU by default).

Both engines get the same chat prompts, fp32 weights dequantized from the same GGUF, greedy decoding and
exactly N new tokens (EOS ignored), and both are warmed up once before timing. tokens/s counts generated
tokens only (batch x new tokens / wall time of the whole generate call, prefill included).

    python tools/bench_generate.py [--new-tokens 128] [--batches 1,8] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

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


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_ours(prompts_ids, batch, new_tokens, repeats, dtype):
    import jax.numpy as jnp

    from persllm_jax.generate import Generator, SamplingParams
    from persllm_jax.weights import load_model

    loaded = load_model("smollm2")
    gen = Generator(loaded.cfg, loaded.params, dtype=getattr(jnp, dtype))
    gen.eos_token_ids = ()  # exactly new_tokens per row
    prompts = prompts_ids[:batch]
    sp = SamplingParams(max_new_tokens=new_tokens)
    run = lambda: gen.generate_ids(prompts, sp)
    out = run()  # compile
    assert all(len(c.token_ids) == new_tokens for c in out)
    return batch * new_tokens / _timed(run, repeats), out


def bench_transformers(prompts_ids, batch, new_tokens, repeats, pad_id):
    import torch
    from transformers import AutoModelForCausalLM

    from persllm_jax.weights import embedded_model_path

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    prompts = prompts_ids[:batch]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)

    out = run()
    assert out.shape[1] - P == new_tokens
    return batch * new_tokens / _timed(run, repeats), [row[P:].tolist() for row in out]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from persllm_jax.weights import load_tokenizer

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
        ours, ours_out = bench_ours(prompts_ids, batch, args.new_tokens, args.repeats, args.dtype)
        theirs, their_out = bench_transformers(prompts_ids, batch, args.new_tokens, args.repeats, pad_id)
        same = sum(a.token_ids[:32] == b[:32] for a, b in zip(ours_out, their_out))
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
