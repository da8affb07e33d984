"""The generation endpoints (`/v1/chat/completions`, `/v1/completions`): one request becomes `n` jobs per prompt
(choice i samples with seed + i), answered whole or streamed as SSE; a client that goes away cancels its rows
(they free their slots at the next chunk), streaming or not; latencies and tokens go to the metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

from persllm_jax.serve.openai_api import RequestError, parse_chat_request, parse_completion_request
from persllm_jax.serve.personas import DeltaText
from persllm_jax.serve.responses import Responder, usage
from persllm_jax.serve.scheduler import Job

ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


class _Timing:
    """Time to first token, inter-token latency (a chunk's gap spread over its tokens) and end-to-end latency."""

    def __init__(self, metrics, n: int):
        self.metrics, self.t0 = metrics, time.perf_counter()
        self.seen, self.last = [0] * n, [None] * n

    def update(self, idx: int, tokens: int, t: float) -> None:
        k = tokens - self.seen[idx]
        if k <= 0:
            return
        if self.last[idx] is None:
            self.metrics.observe("time_to_first_token_seconds", t - self.t0)
        else:
            self.metrics.observe("inter_token_latency_seconds", (t - self.last[idx]) / k, k)
        self.seen[idx], self.last[idx] = tokens, t

    def done(self) -> None:
        self.metrics.observe("e2e_request_latency_seconds", time.perf_counter() - self.t0)


async def _disconnected(request) -> None:
    """Returns when the client goes away (the body is read by then, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def generate(state, request, kind: str):
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse

    state.check_auth(request)
    endpoint = ENDPOINTS[kind]
    try:
        raw = await request.body()
    except ClientDisconnect:
        return Response(status_code=499)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"We could not parse the JSON body of your request ({e})", None,
                           "invalid_json") from None
    label = body.get("model") if isinstance(body, dict) and body.get("model") in state.models else "unknown"
    try:
        req = parse_chat_request(body) if kind == "chat" else parse_completion_request(body)
        served, prompts, sp = state.prepare_all(req)
    except RequestError as e:
        state.metrics.request(endpoint, label, e.status)
        raise

    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    jobs: list[Job] = []

    def poster(idx):
        def post(kind_, payload):
            try:
                loop.call_soon_threadsafe(q.put_nowait, (idx, kind_, payload, time.perf_counter()))
            except RuntimeError:  # the event loop is gone (shutdown)
                for j in jobs:
                    j.cancelled = True
        return post

    for p, ids in enumerate(prompts):
        for i in range(req.n):
            choice_sp = dataclasses.replace(sp, seed=(sp.seed + i) % (1 << 32))
            jobs.append(Job(req.model, ids, choice_sp, poster(p * req.n + i), logprobs=req.logprobs))
    try:
        for job in jobs:
            state.scheduler.submit(job)
    except RuntimeError as e:  # shutting down
        for job in jobs:
            job.cancelled = True
        state.metrics.request(endpoint, label, 503)
        raise RequestError(503, str(e), None, "server_shutting_down", "server_error") from None
    prompt_tokens = sum(len(ids) for ids in prompts)
    timing = _Timing(state.metrics, len(jobs))
    out = Responder(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()),
                    req.model, served.gen.tokenizer, req.include_usage)

    def finish(status, comps):
        for job in jobs:
            job.cancelled = True  # rows still running (an error, a disconnect) free their slots
        state.metrics.request(endpoint, label, status)
        if comps is not None:
            state.metrics.add_tokens(req.model, prompt_tokens, sum(len(c.token_ids) for c in comps if c))
        timing.done()

    async def next_event(watch):
        """The next posted event, or None once the client has gone away."""
        get = asyncio.ensure_future(q.get())
        done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return None

    if not req.stream:
        comps, left = [None] * len(jobs), len(jobs)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            while left:
                ev = await next_event(watch)
                if ev is None:
                    finish(499, comps)
                    return Response(status_code=499)
                idx, what, payload, t = ev
                if what == "error":
                    finish(500, comps)
                    raise RequestError(500, payload, None, "generation_failed", "server_error")
                timing.update(idx, len(payload.token_ids), t)
                if what == "done":
                    comps[idx], left = payload, left - 1
        finally:
            watch.cancel()
        finish(200, comps)
        return JSONResponse(out.whole(comps, prompt_tokens))

    async def events():
        deltas = [DeltaText(sp.stop) for _ in jobs]
        sent_lp = [0] * len(jobs)  # logprob entries already sent, per choice
        offsets = [0] * len(jobs)
        finals, left = [None] * len(jobs), len(jobs)
        watch = asyncio.ensure_future(_disconnected(request))
        status = 499
        try:
            if kind == "chat":
                for i in range(len(jobs)):
                    yield out.chunk(i, role=True)
            while left:
                ev = await next_event(watch)
                if ev is None:
                    return
                idx, what, payload, t = ev
                if what == "error":
                    status = 500
                    err = RequestError(500, payload, None, "generation_failed", "server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                timing.update(idx, len(payload.token_ids), t)
                d = deltas[idx].update(payload.text, final=what == "done")
                lp = None
                if payload.logprobs is not None and len(payload.logprobs) > sent_lp[idx]:
                    lp, sent_lp[idx] = payload.logprobs[sent_lp[idx]:], len(payload.logprobs)
                if d or lp:
                    yield out.chunk(idx, d, logprobs=lp, offset=offsets[idx])
                    offsets[idx] += len(d)
                if what == "done":
                    finals[idx], left = payload, left - 1
                    yield out.chunk(idx, finish=payload.finish_reason)
            if req.include_usage:
                yield out.chunk(None, usage_=usage(prompt_tokens, sum(len(c.token_ids) for c in finals)))
            yield "data: [DONE]\n\n"
            status = 200
        finally:
            watch.cancel()
            finish(status, finals)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["generate", "ENDPOINTS"]
