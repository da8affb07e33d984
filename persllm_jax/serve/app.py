"""OpenAI-compatible server: `/v1/models`, `/v1/chat/completions`, `/v1/completions` (JSON and SSE streaming),
`/metrics` (Prometheus).

One base model in memory, any number of persona adapters over it (the request's `model` picks one). Requests
are parsed and checked by `openai_api`, answered by `handlers` and queued to the scheduler (`continuous`, or the
previous `scheduler` with engine="static"), whose one thread owns the generation engine and streams every
decoded chunk back to the waiting handlers.

The HTTP side is Starlette on uvicorn (HTTP/1.1 keep-alive, chunked SSE, disconnect detection). `build_app`
takes extra routes, so web pages (a chat page, a rating page) can live in the same process and port.
"""

from __future__ import annotations

import dataclasses
import hmac
import socket
import sys
import threading
import time

from persllm_jax.serve.continuous import ContinuousScheduler
from persllm_jax.serve.engine import Generator, SamplingParams
from persllm_jax.serve.handlers import generate
from persllm_jax.serve.metrics import Metrics
from persllm_jax.serve.openai_api import ParsedRequest, RequestError, error_response
from persllm_jax.serve.scheduler import Scheduler


@dataclasses.dataclass
class ServedModel:
    """One model name the server answers to: a generator (the base, or an adapter over it) and an optional
    default system prompt (a persona stage's)."""

    name: str
    gen: Generator
    system: str | None = None  # prepended when a request has no system message
    description: str = ""


class ServerState:
    """What the request handlers share: the served models, the API key, the scheduler and the metrics.

    `engine`: "continuous" (a fixed pool of `max_batch` KV slots of `slot_tokens` each, requests join and leave at
    every chunk, adapters mixed in a batch; `serve.continuous`) or "static" (the previous engine: one model per
    batch, a batch runs to its end; `serve.scheduler`)."""

    def __init__(self, models: dict[str, ServedModel], *, api_key: str | None = None, max_batch: int = 32,
                 chunk: int | None = None, default_max_tokens: int = 512, batch_window: float = 0.03,
                 engine: str = "continuous", prefill_chunk: int = 256, slot_tokens: int | None = None,
                 max_adapters: int = 8):
        if not models:
            raise ValueError("no models to serve")
        self.models = models
        self.api_key = api_key or None
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.engine = engine
        self.metrics = Metrics()
        gens = {name: m.gen for name, m in models.items()}
        if engine == "continuous":
            self.scheduler = ContinuousScheduler(gens, n_slots=max_batch, chunk=chunk, prefill_chunk=prefill_chunk,
                                                 slot_tokens=slot_tokens, max_adapters=max_adapters)
        elif engine == "static":
            self.scheduler = Scheduler(gens, max_batch=max_batch, chunk=chunk, batch_window=batch_window)
        else:
            raise ValueError(f"engine must be 'continuous' or 'static'; got {engine!r}")

    def describe(self) -> str:
        """The memory plan printed at start: slots, tokens per slot and KV bytes per slot (continuous engine)."""
        if self.engine != "continuous":
            return f"engine static: batches of up to {self.scheduler.max_batch} rows of one model"
        lines = []
        for eng in self.scheduler.engines:
            names = [n for n, (e, _) in self.scheduler.route.items() if e is eng]
            per = eng.kv_bytes_per_slot()
            lines.append(f"engine continuous: {eng.n_slots} slots x {eng.slot_tokens} tokens, KV cache "
                         f"{per / 2**20:.2f} MiB per slot ({eng.n_slots * per / 2**20:.1f} MiB), "
                         f"{len(eng.bank.rows)} adapters (rank {eng.bank.rank}, {eng.bank.nbytes() / 2**20:.1f} MiB) "
                         f"for {', '.join(names)}")
        return "\n".join(lines)

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

    def context_limit(self, name: str) -> int:
        """The most prompt + completion tokens of one request: a slot's length (continuous) or the model's context."""
        if self.engine == "continuous":
            return self.scheduler.slot_tokens(name)
        return self.models[name].gen.cfg.max_position_embeddings

    def prepare(self, req: ParsedRequest) -> tuple[ServedModel, list[int], SamplingParams]:
        """(served model, prompt ids, sampling) of a one-prompt request, or a RequestError."""
        served, prompts, sp = self.prepare_all(req)
        return served, prompts[0], sp

    def prepare_all(self, req: ParsedRequest) -> tuple[ServedModel, list[list[int]], SamplingParams]:
        """(served model, prompt ids of each prompt, sampling), or a RequestError (unknown model, too long)."""
        served = self.models.get(req.model)
        if served is None:
            raise RequestError(404, f"The model '{req.model}' does not exist; served: {', '.join(self.models)}",
                               "model", "model_not_found")
        if req.logprobs is not None and self.engine != "continuous":
            raise RequestError(400, "logprobs need the continuous engine (persllm serve --engine continuous)",
                               "logprobs", "unsupported_parameter")
        if req.prompts:
            prompts, param = [served.gen.encode_raw(t) for t in req.prompts], "prompt"
        else:
            messages, param = req.messages, "messages"
            if served.system and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": served.system}] + messages
            try:
                prompts = [served.gen.encode_chat(messages)]
            except Exception as e:  # noqa: BLE001 - chat templates raise their own errors (e.g. role order)
                raise RequestError(400, f"messages do not fit the model's chat template: {e}", "messages",
                                   "invalid_value") from None
        ctx = self.context_limit(req.model)
        longest = max(len(ids) for ids in prompts)
        room = ctx - longest
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            want = req.max_tokens or 1
            raise RequestError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                    f"{longest + want} tokens ({longest} in the {param}, {want} in the "
                                    f"completion). Please reduce the length of the {param} or completion.",
                               param, "context_length_exceeded")
        max_new = req.max_tokens if req.max_tokens is not None else min(self.default_max_tokens, room)
        sp = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                            seed=req.seed, stop=req.stop)
        return served, prompts, sp


def build_app(state: ServerState, extra_routes=()):
    """The Starlette app. `extra_routes` (Starlette routes) are mounted beside the API, e.g. web pages."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse
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

    async def metrics(request):
        state.check_auth(request)
        return PlainTextResponse(state.metrics.render(state.scheduler),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat_completions(request):
        return await generate(state, request, "chat")

    async def completions(request):
        return await generate(state, request, "completion")

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
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
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


def run_server(app, sock: socket.socket, on_ready=None, log_level: str = "warning", access_log: bool = False) -> None:
    """Serve `app` on an already bound socket until SIGINT/SIGTERM; `access_log`: one line per request (stderr)."""
    import uvicorn

    if access_log and log_level == "warning":
        log_level = "info"  # uvicorn writes access lines at INFO
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_keep_alive=30,
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
