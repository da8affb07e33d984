"""`/metrics` in the Prometheus text exposition format (version 0.0.4): request and token counters, latency
histograms (time to first token, inter-token latency, end-to-end) observed by the HTTP handlers, and the
scheduler's queue depth, busy slots and batch occupancy read at scrape time. Thread-safe; no dependency."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += times
        self.sum += v * times
        self.n += times


class Metrics:
    """What the server exports; `observe_*` from the handlers, the scheduler's figures via `scheduler`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}  # (endpoint, model, status) -> count
        self.tokens: dict[tuple[str, str], int] = {}  # (model, prompt|completion) -> count
        self.hist = {name: _Histogram(LATENCY_BUCKETS) for name in
                     ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds")}

    def request(self, endpoint: str, model: str, status: int | str) -> None:
        with self.lock:
            key = (endpoint, model, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        with self.lock:
            for kind, n in (("prompt", prompt), ("completion", completion)):
                self.tokens[(model, kind)] = self.tokens.get((model, kind), 0) + n

    def observe(self, name: str, seconds: float, times: int = 1) -> None:
        with self.lock:
            self.hist[name].observe(seconds, times)

    def render(self, scheduler) -> str:
        out: list[str] = []

        def family(name, kind, help_):
            out.append(f"# HELP persllm_{name} {help_}")
            out.append(f"# TYPE persllm_{name} {kind}")

        def labels(**kw):
            return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in kw.items()) + "}"

        with self.lock:
            family("requests_total", "counter", "Finished requests by endpoint, model and HTTP status.")
            for (ep, model, status), n in sorted(self.requests.items()):
                out.append(f"persllm_requests_total{labels(endpoint=ep, model=model, status=status)} {n}")
            family("tokens_total", "counter", "Prompt and completion tokens of finished requests.")
            for (model, kind), n in sorted(self.tokens.items()):
                out.append(f"persllm_tokens_total{labels(model=model, kind=kind)} {n}")
            for name, h in self.hist.items():
                family(name, "histogram", name.replace("_", " ") + ".")
                cum = 0
                for b, c in zip(h.buckets, h.counts):
                    cum += c
                    out.append(f'persllm_{name}_bucket{{le="{b}"}} {cum}')
                out.append(f'persllm_{name}_bucket{{le="+Inf"}} {h.n}')
                out.append(f"persllm_{name}_sum {h.sum:.6f}")
                out.append(f"persllm_{name}_count {h.n}")
        g = scheduler_gauges(scheduler)
        for key, help_ in (("queue_depth", "Requests waiting for a slot."),
                           ("slots_busy", "KV slots (batch rows) held by requests."),
                           ("slots_total", "KV slots (the most rows decoded together)."),
                           ("batch_occupancy", "Mean busy rows per decode step over the slots, since start.")):
            family(key, "gauge", help_)
            out.append(f"persllm_{key} {g[key]}")
        family("cancelled_total", "counter", "Rows freed because their client went away.")
        out.append(f"persllm_cancelled_total {g['cancelled']}")
        return "\n".join(out) + "\n"


def scheduler_gauges(scheduler) -> dict:
    """Queue depth, busy and total slots, mean occupancy and cancellations of either scheduler."""
    st = scheduler.stats
    if hasattr(scheduler, "gauges"):  # the continuous engine
        g = scheduler.gauges()
        occ = st["row_steps"] / st["slot_steps"] if st["slot_steps"] else 0.0
        return {**g, "batch_occupancy": round(occ, 4), "cancelled": st["cancelled"]}
    # the static engine: a batch's rows over max_batch
    occ = st["rows"] / (st["batches"] * scheduler.max_batch) if st["batches"] else 0.0
    return {"queue_depth": len(scheduler.pending), "slots_busy": 0, "slots_total": scheduler.max_batch,
            "batch_occupancy": round(occ, 4), "cancelled": 0}


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["Metrics", "scheduler_gauges", "LATENCY_BUCKETS"]
