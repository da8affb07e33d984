"""Benchmark: the data_gen annotator against a local OpenAI-compatible server with a fixed latency per
request, at concurrency 1 vs N.

    python tools/bench_data_gen.py [--items 200] [--latency 0.2] [--concurrency 16] [--json FILE]

Two measurements, each with a fresh response cache:
  backend  -- `items` chat requests through OpenAIBackend (the real `openai` async client, real HTTP);
  build    -- `persllm data build` over the demo personas sized to about `items` requests
              (inputs + responses; cross-temporal DPO off), end to end.
The server is tests/fake_openai.py on 127.0.0.1 (no faults)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_openai import FakeOpenAI  # noqa: E402

from data_gen.backends import OpenAIBackend, Request  # noqa: E402
from data_gen.config import load_config  # noqa: E402
from data_gen.pipeline import build  # noqa: E402


def bench_backend(url: str, n: int, concurrency: int) -> float:
    cfg = dict(load_config()["annotator"], concurrency=concurrency)
    with tempfile.TemporaryDirectory() as cache:
        b = OpenAIBackend("bench", url, cfg, Path(cache))
        reqs = [Request(f"k{i}", ({"role": "system", "content": "raise 1 question"},
                                  {"role": "user", "content": f"paragraph {i} about comets and tides"}), 64, 0.7, 0.95, i)
                for i in range(n)]
        got = []
        t = time.perf_counter()
        b.run(reqs, lambda r, res: got.append(res))
        dt = time.perf_counter() - t
        assert len(got) == n and all(g.text for g in got)
    return dt


def bench_build(url: str, n: int, concurrency: int) -> tuple[float, int]:
    per_stage = max(1, n // 12)  # 3 personas x 2 stages x (input + response)
    cfg = load_config(None, [f"annotator.concurrency={concurrency}", f"inputs.per_stage={per_stage}",
                             "dpo.cross_temporal=false"])
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        m = build(str(REPO / "data_gen" / "personas"), out, "openai:bench", cfg, base_url=url, progress=False,
                  echo=lambda s: None)
        return time.perf_counter() - t, m["requests"]["sent"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-build", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    res = {"items": a.items, "latency_s": a.latency, "concurrency": a.concurrency}
    with FakeOpenAI(latency=a.latency) as srv:
        for c in (1, a.concurrency):
            res[f"backend_c{c}_s"] = round(bench_backend(srv.url, a.items, c), 2)
            print(f"backend  concurrency {c:>3}: {a.items} requests in {res[f'backend_c{c}_s']:.2f} s", flush=True)
        res["backend_speedup"] = round(res["backend_c1_s"] / res[f"backend_c{a.concurrency}_s"], 1)
        if not a.skip_build:
            for c in (1, a.concurrency):
                dt, sent = bench_build(srv.url, a.items, c)
                res[f"build_c{c}_s"], res["build_requests"] = round(dt, 2), sent
                print(f"build    concurrency {c:>3}: {sent} requests in {dt:.2f} s", flush=True)
            res["build_speedup"] = round(res["build_c1_s"] / res[f"build_c{a.concurrency}_s"], 1)
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    target = 10
    print(f"backend speedup {res['backend_speedup']}x (target >= {target}x)"
          + (f", build speedup {res['build_speedup']}x" if "build_speedup" in res else ""))


if __name__ == "__main__":
    main()
