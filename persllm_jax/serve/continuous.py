"""The continuous-batching scheduler: one thread, a fixed pool of KV slots, requests joining and leaving at
every chunk boundary, rows of different adapters in one batch.

Each loop: take waiting jobs into free slots (oldest first), drop cancelled rows, run one prefill chunk for every
row still reading its prompt (`prefill_chunk` tokens each, so a long prompt is read over several loops while the
others keep decoding), then one decode call of up to `chunk` tokens over every row that has read its prompt.
Finished rows are answered and free their slot at once. Served models over different base weights (another
base, a full fine-tune) each get their own `SlotEngine`; the adapters over one base share its `AdapterBank`.
Same interface as `scheduler.Scheduler` (`submit`, `close`, `stats`, `pending`).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import deque

import numpy as np

from persllm_jax.serve.adapters import AdapterBank
from persllm_jax.serve.engine import Completion, Generator, _stop_cut, _streamable
from persllm_jax.serve.scheduler import Job, enqueue, stop
from persllm_jax.serve.slots import SlotEngine


@dataclasses.dataclass
class _Row:
    job: Job
    eng: SlotEngine
    slot: int
    adapter: int
    fed: int = 0  # prompt tokens already in the cache
    ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    text: str = ""
    finish: str | None = None

    @property
    def reading(self) -> bool:
        return self.fed < len(self.job.prompt)


class ContinuousScheduler:
    """`generators`: {served model name: Generator}; generators sharing base weights (`with_adapter`) share slots."""

    def __init__(self, generators: dict[str, Generator], n_slots: int = 32, chunk: int | None = None,
                 prefill_chunk: int = 256, slot_tokens: int | None = None, max_adapters: int = 8):
        self.chunk, self.prefill_chunk = int(chunk or 16), int(prefill_chunk)
        groups: dict[int, list[tuple[str, Generator]]] = {}
        for name, gen in generators.items():
            groups.setdefault(id(gen.params["layers"]), []).append((name, gen))
        self.engines: list[SlotEngine] = []
        self.route: dict[str, tuple[SlotEngine, int]] = {}
        for members in groups.values():
            adapters = {id(g.lora): (id(g.lora), g.lora, g.lora_scale) for _, g in members if g.lora is not None}
            base = members[0][1]
            bank = AdapterBank(base.cfg, list(adapters.values()), max_adapters)
            eng = SlotEngine(base, bank, n_slots, slot_tokens)
            self.engines.append(eng)
            for name, g in members:
                self.route[name] = (eng, bank.index(None if g.lora is None else id(g.lora)))
        self.rows: dict[int, dict[int, _Row]] = {id(e): {} for e in self.engines}  # engine -> slot -> row
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stats = {"requests": 0, "tokens": 0, "cancelled": 0, "decode_calls": 0, "decode_steps": 0,
                      "row_steps": 0, "slot_steps": 0, "prefill_calls": 0, "prefill_tokens": 0, "busy_s": 0.0}
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="persllm-slots", daemon=True)
        self.thread.start()

    # -- the interface the HTTP side uses --------------------------------------------------------------

    def slot_tokens(self, model: str) -> int:
        return self.route[model][0].slot_tokens

    def submit(self, job: Job) -> None:
        eng = self.route[job.model][0]
        if len(job.prompt) + job.sampling.max_new_tokens > eng.slot_tokens:
            raise ValueError(f"prompt + max_new_tokens exceeds a slot's {eng.slot_tokens} tokens")
        enqueue(self, job)

    def close(self) -> None:
        stop(self)

    def gauges(self) -> dict:
        busy = sum(len(r) for r in self.rows.values())
        return {"queue_depth": len(self.pending), "slots_busy": busy,
                "slots_total": sum(e.n_slots for e in self.engines)}

    # -- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self._busy() and not self.closed:
                    self.cond.wait()
                if self.closed:
                    break
                self._admit()
            t0 = time.perf_counter()
            for eng in self.engines:
                rows = self.rows[id(eng)]
                for slot in [s for s, r in rows.items() if r.job.cancelled]:
                    del rows[slot]
                    self.stats["cancelled"] += 1
                if rows:
                    try:
                        self._step(eng, rows)
                    except Exception as e:  # noqa: BLE001 - one bad step must not stop the server
                        print(f"persllm serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr)
                        for row in rows.values():
                            row.job.post("error", f"generation failed: {type(e).__name__}: {e}")
                        rows.clear()
            self.stats["busy_s"] += time.perf_counter() - t0
        for rows in self.rows.values():  # shutting down: nobody is left waiting forever
            for row in rows.values():
                row.job.post("error", "server is shutting down")
        for job in self.pending:
            job.post("error", "server is shutting down")

    def _busy(self) -> bool:
        return any(self.rows[id(e)] for e in self.engines)

    def _admit(self) -> None:
        """Waiting jobs into free slots, oldest first (a job whose base has no free slot waits; others pass it)."""
        left = deque()
        while self.pending:
            job = self.pending.popleft()
            if job.cancelled:
                continue
            eng, adapter = self.route[job.model]
            rows = self.rows[id(eng)]
            if len(rows) >= eng.n_slots:
                left.append(job)
                continue
            slot = next(s for s in range(eng.n_slots) if s not in rows)
            rows[slot] = _Row(job, eng, slot, adapter)
            self.stats["requests"] += 1
        self.pending = left

    def _step(self, eng: SlotEngine, rows: dict[int, _Row]) -> None:
        reading = [r for r in rows.values() if r.reading]
        if reading:
            parts = [(r.slot, r.job.prompt[r.fed: r.fed + self.prefill_chunk], r.fed, r.adapter) for r in reading]
            eng.prefill(parts, self.prefill_chunk)
            for r, p in zip(reading, parts):
                r.fed += len(p[1])
            self.stats["prefill_calls"] += 1
            self.stats["prefill_tokens"] += sum(len(p[1]) for p in parts)
        decoding = [r for r in rows.values() if not r.reading]
        if not decoding:
            return
        N = eng.n_slots
        pos, steps, remaining, adapter = (np.zeros(N, np.int64) for _ in range(4))
        seeds, temperature, top_k, top_p = np.zeros(N, np.uint32), np.zeros(N), np.zeros(N, np.int32), np.ones(N)
        for r in decoding:
            s, sp = r.slot, r.job.sampling
            pos[s], steps[s], remaining[s], adapter[s] = len(r.job.prompt) + len(r.ids), len(r.ids), \
                sp.max_new_tokens - len(r.ids), r.adapter
            seeds[s], temperature[s], top_k[s], top_p[s] = sp.seed, sp.temperature, sp.top_k, sp.top_p
        want_lp = any(r.job.logprobs is not None for r in decoding)
        out = eng.decode(pos, steps, remaining, adapter, seeds, temperature, top_k, top_p, self.chunk, want_lp)
        made = int(np.sum(out.token[:, :out.n] >= 0))
        self.stats["decode_calls"] += 1
        self.stats["decode_steps"] += out.n
        self.stats["row_steps"] += made
        self.stats["slot_steps"] += out.n * N
        for r in decoding:
            self._consume(r, out)
            if r.finish:
                del rows[r.slot]

    def _consume(self, r: _Row, out) -> None:
        """A row's new tokens: EOS, the token limit and stop strings end it; post the delta or the answer."""
        job, eos, tok = r.job, r.eng.gen.eos_token_ids, r.eng.gen.tokenizer
        before = len(r.ids)
        for t in range(out.n):
            token = int(out.token[r.slot, t])
            if token < 0:
                break
            if token in eos:
                r.finish = "stop"
                break
            r.ids.append(token)
            if job.logprobs is not None:
                k = job.logprobs
                r.logprobs.append((token, float(out.logprob[r.slot, t]), out.top_id[r.slot, t, :k].tolist(),
                                   out.top_logprob[r.slot, t, :k].tolist()))
            if len(r.ids) >= job.sampling.max_new_tokens:
                r.finish = "length"
                break
        self.stats["tokens"] += len(r.ids) - before
        if tok is not None:
            r.text = tok.decode(r.ids, skip_special_tokens=True)
            cut = _stop_cut(r.text, job.sampling.stop)
            if cut is not None:
                r.text, r.finish = r.text[:cut], "stop"
        text = r.text if r.finish else _streamable(r.text, job.sampling.stop)
        comp = Completion(text, list(r.ids), r.finish or "length", len(job.prompt),
                          list(r.logprobs) if job.logprobs is not None else None)
        if r.finish:
            job.post("done", comp)
        elif len(r.ids) > before:
            job.post("delta", comp)


__all__ = ["ContinuousScheduler"]
