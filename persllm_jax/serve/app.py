"""OpenAI-compatible server: `/v1/models`, `/v1/chat/completions` (JSON and SSE streaming).

One base model in memory, any number of persona adapters over it (the request's `model` picks one).
Requests are queued to one scheduler thread that owns the generation engine: it takes the adapter of the
oldest waiting request, batches up to `max_batch` waiting requests for that adapter (each row with its own
sampling settings and seed, so an answer does not depend on its batch mates) and streams every decoded
chunk back to the waiting handlers. Rows that finish early are answered at once.

The HTTP side is Starlette on uvicorn (HTTP/1.1 keep-alive, chunked SSE, disconnect detection). `build_app`
takes extra routes, so web pages (a chat page, a rating page) can live in the same process and port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque

from persllm_jax.serve.engine import Generator, SamplingParams
from persllm_jax.serve.personas import DeltaText

MAX_STOP = 4


class RequestError(Exception):
    """A client error: HTTP status plus an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Persona:
    """One servable model name: a generator (base or adapter) and an optional default system prompt."""

    name: str
    gen: Generator
    system: str | None = None  # prepended when a request has no system message
    description: str = ""


# -- scheduler ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    model: str
    prompt: list[int]
    sampling: SamplingParams
    post: callable  # post(kind, payload): "delta"/"done" with a Completion, "error" with a message
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


class Scheduler:
    """One thread runs every generation; concurrent jobs for the same model are batched."""

    def __init__(self, personas: dict[str, Persona], max_batch: int = 32, chunk: int | None = None,
                 batch_window: float = 0.03):
        self.personas = personas
        self.max_batch, self.chunk, self.batch_window = max(1, int(max_batch)), chunk, batch_window
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "tokens": 0, "busy_s": 0.0}
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="persllm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise RuntimeError("server is shutting down")
            self.pending.append(job)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

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
                j = self.pending.popleft()
                if j.cancelled:
                    continue
                (batch if j.model == model and len(batch) < self.max_batch else rest).append(j)
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
        gen = self.personas[batch[0].model].gen
        t0 = time.perf_counter()
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch))
        finished = [False] * len(batch)
        last = None
        try:
            for comps in gen.stream([j.prompt for j in batch], [j.sampling for j in batch], chunk=self.chunk):
                last = comps
                for i, (j, c) in enumerate(zip(batch, comps)):
                    if finished[i]:
                        continue
                    if c.finish_reason == "stop" or len(c.token_ids) >= j.sampling.max_new_tokens:
                        finished[i] = True
                        j.post("done", c)
                    else:
                        j.post("delta", c)
                if all(j.cancelled or f for j, f in zip(batch, finished)):
                    break
            if last is not None:
                for i, (j, c) in enumerate(zip(batch, last)):
                    if not finished[i]:
                        j.post("done", c)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
            print(f"persllm serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr)
            for i, j in enumerate(batch):
                if not finished[i]:
                    j.post("error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            self.stats["tokens"] += sum(len(c.token_ids) for c in last or [])
            self.stats["busy_s"] += time.perf_counter() - t0


# -- request parsing ---------------------------------------------------------------------------------


def _number(body: dict, key: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise RequestError(400, f"'{key}' must be a number", key, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        bound = f"({lo}" if lo_open else f"[{lo}"
        raise RequestError(400, f"'{key}' must be in {bound}, {hi}]; got {v}", key, "invalid_value")
    return float(v)


def _int(body: dict, key: str, lo: int | None = None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise RequestError(400, f"'{key}' must be an integer", key, "invalid_type")
    if lo is not None and v < lo:
        raise RequestError(400, f"'{key}' must be >= {lo}; got {v}", key, "invalid_value")
    return v


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty array", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}].role must be system, developer, user or assistant; got {role!r}",
                               f"messages[{i}].role", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(400, f"messages[{i}].content: only text parts are supported",
                                       f"messages[{i}].content", "invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string", f"messages[{i}].content",
                               "invalid_type")
        out.append({"role": role, "content": content})
    return out


@dataclasses.dataclass
class ParsedRequest:
    model: str
    messages: list[dict]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_chat_request(body) -> ParsedRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required (a name from /v1/models)", "model", "missing_required_parameter")
    messages = _messages(body)
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 0) or 0  # extension (extra_body)
    seed = _int(body, "seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise RequestError(400, "only n=1 is supported", "n", "unsupported_value")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = tuple(stop)
    else:
        raise RequestError(400, f"'stop' must be a string or an array of at most {MAX_STOP} strings", "stop",
                           "invalid_value")
    if any(s == "" for s in stops):
        raise RequestError(400, "'stop' strings must not be empty", "stop", "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise RequestError(400, f"'{key}' is not supported (use 0)", key, "unsupported_parameter")
    if body.get("logprobs"):
        raise RequestError(400, "'logprobs' is not supported", "logprobs", "unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise RequestError(400, "tools / function calling are not supported", "tools", "unsupported_parameter")
    if top_p == 0.0:
        temperature = 0.0  # an empty nucleus means the single most likely token
    return ParsedRequest(model, messages, max_tokens, temperature, top_p, top_k, seed % (1 << 32), stops, stream,
                         bool(opts.get("include_usage")))


# -- the app -----------------------------------------------------------------------------------------


class ServerState:
    def __init__(self, personas: dict[str, Persona], *, api_key: str | None = None, max_batch: int = 32,
                 chunk: int | None = None, default_max_tokens: int = 512, batch_window: float = 0.03):
        if not personas:
            raise ValueError("no models to serve")
        self.personas = personas
        self.api_key = api_key or None
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.scheduler = Scheduler(personas, max_batch=max_batch, chunk=chunk, batch_window=batch_window)

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

    def prepare(self, req: ParsedRequest) -> tuple[Persona, list[int], SamplingParams]:
        persona = self.personas.get(req.model)
        if persona is None:
            raise RequestError(404, f"The model '{req.model}' does not exist; served: {', '.join(self.personas)}",
                               "model", "model_not_found")
        messages = req.messages
        if persona.system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": persona.system}] + messages
        try:
            ids = persona.gen.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - chat templates raise their own errors (e.g. role order)
            raise RequestError(400, f"messages do not fit the model's chat template: {e}", "messages",
                               "invalid_value") from None
        ctx = persona.gen.cfg.max_position_embeddings
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
        return persona, ids, sp


def _error_response(err: RequestError):
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def build_app(state: ServerState, extra_routes=()):
    """The Starlette app. `extra_routes` (Starlette routes) are mounted beside the API, e.g. web pages."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        state.check_auth(request)
        return JSONResponse({"object": "list", "data": [state.model_card(n) for n in state.personas]})

    async def model(request):
        state.check_auth(request)
        name = request.path_params["name"]
        if name not in state.personas:
            raise RequestError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return JSONResponse(state.model_card(name))

    async def health(request):
        return JSONResponse({"status": "ok", "models": list(state.personas)})

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
        persona, ids, sp = state.prepare(req)
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
        return _error_response(exc)

    async def on_http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return _error_response(RequestError(exc.status_code, str(exc.detail), None, code))

    async def on_error(request, exc: Exception):
        print(f"persllm serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error_response(RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error",
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


__all__ = ["RequestError", "Persona", "Scheduler", "ServerState", "build_app", "bind", "run_server",
           "BackgroundServer", "parse_chat_request"]
