"""OpenAI-compatible server: `/v1/models`, `/v1/chat/completions` (JSON and SSE streaming).

One base model in memory, any number of persona adapters over it (the request's `model` picks one). Requests
are parsed and checked by `openai_api` and queued to the `scheduler`, whose one thread owns the generation
engine, batches concurrent requests for the same model and streams every decoded chunk back to the waiting
handlers.

The HTTP side is Starlette on uvicorn (HTTP/1.1 keep-alive, chunked SSE, disconnect detection). `build_app`
takes extra routes, so web pages (a chat page, a rating page) can live in the same process and port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import socket
import sys
import threading
import time
import uuid

from persllm_jax.serve.engine import Generator, SamplingParams
from persllm_jax.serve.openai_api import ParsedRequest, RequestError, error_response, parse_chat_request
from persllm_jax.serve.personas import DeltaText
from persllm_jax.serve.scheduler import Job, Scheduler


@dataclasses.dataclass
class ServedModel:
    """One model name the server answers to: a generator (the base, or an adapter over it) and an optional
    default system prompt (a persona stage's)."""

    name: str
    gen: Generator
    system: str | None = None  # prepended when a request has no system message
    description: str = ""


class ServerState:
    """What the request handlers share: the served models, the API key and the scheduler."""

    def __init__(self, models: dict[str, ServedModel], *, api_key: str | None = None, max_batch: int = 32,
                 chunk: int | None = None, default_max_tokens: int = 512, batch_window: float = 0.03):
        if not models:
            raise ValueError("no models to serve")
        self.models = models
        self.api_key = api_key or None
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.scheduler = Scheduler({name: m.gen for name, m in models.items()}, max_batch=max_batch, chunk=chunk,
                                   batch_window=batch_window)

    def check_auth(self, request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", None,
                               "invalid_api_key", "authentication_error")

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "persllm"}

    def prepare(self, req: ParsedRequest) -> tuple[ServedModel, list[int], SamplingParams]:
        """(served model, prompt ids, sampling) of a request, or a RequestError (unknown model, too long)."""
        served = self.models.get(req.model)
        if served is None:
            raise RequestError(404, f"The model '{req.model}' does not exist; served: {', '.join(self.models)}",
                               "model", "model_not_found")
        messages = req.messages
        if served.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": served.system}] + messages
        try:
            ids = served.gen.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - chat templates raise their own errors (e.g. role order)
            raise RequestError(400, f"messages do not fit the model's chat template: {e}", "messages",
                               "invalid_value") from None
        ctx = served.gen.cfg.max_position_embeddings
        room = ctx - len(ids)
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            want = req.max_tokens or 1
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                    f"{len(ids) + want} tokens ({len(ids)} in the messages, {want} in the "
                                    f"completion). Please reduce the length of the messages or completion.",
                               "messages", "context_length_exceeded")
        max_new = req.max_tokens if req.max_tokens is not None else min(self.default_max_tokens, room)
        sp = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                            seed=req.seed, stop=req.stop)
        return served, ids, sp


def build_app(state: ServerState, extra_routes=()):
    """The Starlette app. `extra_routes` (Starlette routes) are mounted beside the API, e.g. web pages."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        state.check_auth(request)
        return JSONResponse({"object": "list", "data": [state.model_card(n) for n in state.models]})

    async def model(request):
        state.check_auth(request)
        name = request.path_params["name"]
        if name not in state.models:
            raise RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return JSONResponse(state.model_card(name))

    async def health(request):
        return JSONResponse({"status": "ok", "models": list(state.models)})

    async def stats(request):
        state.check_auth(request)
        return JSONResponse({**state.scheduler.stats, "pending": len(state.scheduler.pending)})

    async def chat_completions(request):
        state.check_auth(request)
        try:
            raw = await request.body()
        except ClientDisconnect:
            return JSONResponse({}, status_code=400)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"We could not parse the JSON body of your request ({e})", None,
                               "invalid_json") from None
        req = parse_chat_request(body)
        _, ids, sp = state.prepare(req)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def post(kind, payload):
            try:
                loop.call_soon_threadsafe(q.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown)
                job.cancelled = True

        job = Job(req.model, ids, sp, post)
        state.scheduler.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        fingerprint = f"persllm-{req.model}"

        if not req.stream:
            try:
                while True:
                    kind, payload = await q.get()
                    if kind == "error":
                        raise RequestError(500, payload, None, "generation_failed", "server_error")
                    if kind == "done":
                        break
            finally:
                job.cancelled = True
            c = payload
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "system_fingerprint": fingerprint,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(c.token_ids),
                          "total_tokens": len(ids) + len(c.token_ids)},
            })

        def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                   "system_fingerprint": fingerprint,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
            if req.include_usage:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            deltas = DeltaText(sp.stop)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await q.get()
                    if kind == "error":
                        err = RequestError(500, payload, None, "generation_failed", "server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        return
                    d = deltas.update(payload.text, final=kind == "done")
                    if d:
                        yield chunk({"content": d})
                    if kind == "done":
                        yield chunk({}, payload.finish_reason)
                        if req.include_usage:
                            n = len(payload.token_ids)
                            yield chunk({}, usage={"prompt_tokens": len(ids), "completion_tokens": n,
                                                   "total_tokens": len(ids) + n}, choices=False)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled = True  # a client that went away frees its row

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def on_request_error(request, exc: RequestError):
        return error_response(exc)

    async def on_http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return error_response(RequestError(exc.status_code, str(exc.detail), None, code))

    async def on_error(request, exc: Exception):
        print(f"persllm serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error_response(RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error",
                                            "server_error"))

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        *extra_routes,
    ]
    return Starlette(routes=routes, exception_handlers={RequestError: on_request_error, HTTPException: on_http_error,
                                                        Exception: on_error},
                     max_body_size=16 * 1024 * 1024)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app, sock: socket.socket, on_ready=None, log_level: str = "warning") -> None:
    """Serve `app` on an already bound socket until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)
    if on_ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            on_ready()

        server.startup = startup
    server.run(sockets=[sock])


class BackgroundServer:
    """A server in a thread of this process (tests and benchmarks): `with BackgroundServer(state) as url:`."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, extra_routes=()):
        import uvicorn

        self.state = state
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(state, extra_routes), log_level="warning",
                                                    access_log=False, lifespan="off", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.scheduler.close()
        self.sock.close()


__all__ = ["ServedModel", "ServerState", "build_app", "bind", "run_server", "BackgroundServer"]
