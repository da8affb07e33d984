"""The one thread that runs every generation of a server, batching concurrent requests for the same model.

It takes the model of the oldest waiting job, batches up to `max_batch` waiting jobs for that model (each row
with its own sampling settings and seed, so an answer does not depend on its batch mates) and streams every
decoded chunk back through each job's `post` callback. Rows that finish early are answered at once; a cancelled
job (a client that went away) frees its row.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from persllm_jax.serve.engine import Generator, SamplingParams


@dataclasses.dataclass
class Job:
    model: str  # a served model name
    prompt: list[int]
    sampling: SamplingParams
    post: Callable  # post(kind, payload): "delta"/"done" with a Completion, "error" with a message
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k most likely alternatives


def enqueue(scheduler, job: Job) -> None:
    """Queue `job` for a scheduler's worker thread (both engines: `cond`, `closed`, `pending`, `thread`)."""
    with scheduler.cond:
        if scheduler.closed:
            raise RuntimeError("server is shutting down")
        scheduler.pending.append(job)
        scheduler.cond.notify()


def stop(scheduler) -> None:
    """Tell a scheduler's worker thread to finish and wait for it."""
    with scheduler.cond:
        scheduler.closed = True
        scheduler.cond.notify()
    scheduler.thread.join(timeout=30)


class Scheduler:
    """One thread runs every generation; concurrent jobs for the same model are batched.

    `generators`: {served model name: Generator}."""

    def __init__(self, generators: dict[str, Generator], max_batch: int = 32, chunk: int | None = None,
                 batch_window: float = 0.03):
        self.generators = generators
        self.max_batch, self.chunk, self.batch_window = max(1, int(max_batch)), chunk, batch_window
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "tokens": 0, "busy_s": 0.0}
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="persllm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        enqueue(self, job)

    def close(self) -> None:
        stop(self)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
        # Requests that arrive together share the batch: wait while more keep coming (a pause of `quiet`
        # ends it, a sixth of the window), at most `batch_window` seconds, and not once a full batch is waiting.
        deadline, quiet = time.perf_counter() + self.batch_window, self.batch_window / 6
        n = len(self.pending)
        while n < self.max_batch and time.perf_counter() < deadline:
            time.sleep(quiet)
            if len(self.pending) == n:
                break
            n = len(self.pending)
        with self.cond:
            while self.pending and self.pending[0].cancelled:
                self.pending.popleft()
            if not self.pending:
                return []
            model = self.pending[0].model
            batch, rest = [], deque()
            while self.pending:
                job = self.pending.popleft()
                if job.cancelled:
                    continue
                (batch if job.model == model and len(batch) < self.max_batch else rest).append(job)
            self.pending = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        gen = self.generators[batch[0].model]
        t0 = time.perf_counter()
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
        finished = [False] * len(batch)
        last = None
        try:
            for comps in gen.stream([j.prompt for j in batch], [j.sampling for j in batch], chunk=self.chunk):
                last = comps
                for i, (job, c) in enumerate(zip(batch, comps)):
                    if finished[i]:
                        continue
                    if c.finish_reason == "stop" or len(c.token_ids) >= job.sampling.max_new_tokens:
                        finished[i] = True
                        job.post("done", c)
                    else:
                        job.post("delta", c)
                if all(job.cancelled or f for job, f in zip(batch, finished)):
                    break
            if last is not None:
                for i, (job, c) in enumerate(zip(batch, last)):
                    if not finished[i]:
                        job.post("done", c)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
            print(f"persllm serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr)
            for i, job in enumerate(batch):
                if not finished[i]:
                    job.post("error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            self.stats["tokens"] += sum(len(c.token_ids) for c in last or [])
            self.stats["busy_s"] += time.perf_counter() - t0


__all__ = ["Job", "Scheduler"]
