"""The OpenAI request formats (`/v1/chat/completions`, `/v1/completions`): parsing and checking a request body,
and the error responses. A parameter we do not implement is a 400 naming it, never silently ignored.

Everything a client can get wrong is a `RequestError` with the HTTP status and the OpenAI-style error body
(`message`, `type`, `param`, `code`), so OpenAI clients show it as they would show OpenAI's own.
"""

from __future__ import annotations

import dataclasses
import os

from persllm_jax.errors import PersllmError

MAX_STOP = 4
MAX_N = 16  # choices per request (each takes a slot)
MAX_TOP_LOGPROBS = 20  # chat's limit (the legacy completions endpoint allows 5)

# accepted and without effect on the answer (bookkeeping fields clients send)
HARMLESS = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n",
             "stop", "stream", "stream_options", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs",
             "response_format", "logit_bias", "tool_choice", "modalities"} | HARMLESS
COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
                   "stream_options", "frequency_penalty", "presence_penalty", "logprobs", "echo", "best_of",
                   "logit_bias"} | HARMLESS


class RequestError(PersllmError):
    """A client error: HTTP status plus an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
    """A checked chat-completions request (`max_tokens` None: as much as the context allows, up to the default)."""

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
    n: int = 1
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives
    prompts: tuple[str, ...] = ()  # /v1/completions: the text prompts (messages is then empty)


def _unsupported(body: dict, known: set[str]) -> None:
    """A 400 for every parameter we do not implement (values that mean "off" are fine)."""
    off = {"response_format": lambda v: v == {"type": "text"}, "logit_bias": lambda v: v == {},
           "tool_choice": lambda v: v == "none", "modalities": lambda v: v == ["text"], "echo": lambda v: v is False,
           "tools": lambda v: v == [], "functions": lambda v: v == [],
           "best_of": lambda v: v in (1, body.get("n") or 1)}
    for key, value in body.items():
        if value is None or (key in off and off[key](value)):
            continue
        if key not in known or key in off:
            what = {"response_format": "structured output (response_format) is",
                    "logit_bias": "logit_bias is", "tools": "tools / function calling are",
                    "functions": "tools / function calling are", "tool_choice": "tools / function calling are"}
            raise RequestError(400, f"{what.get(key, repr(key) + ' is')} not supported by this server", key,
                               "unsupported_parameter")


def _common(body: dict, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required (a name from /v1/models)", "model", "missing_required_parameter")
    _unsupported(body, known)
    n = _int(body, "n", 1) or 1
    if n > MAX_N:
        raise RequestError(400, f"'n' must be at most {MAX_N}; got {n}", "n", "invalid_value")
    return {"model": model, "n": n}


def parse_completion_request(body) -> ParsedRequest:
    """A `/v1/completions` body (text prompt, legacy integer `logprobs`), or a RequestError."""
    common = _common(body, COMPLETION_KEYS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise RequestError(400, "'prompt' must be a string or a non-empty array of strings", "prompt",
                           "invalid_value")
    if any(not p for p in prompts):
        raise RequestError(400, "'prompt' must not be empty", "prompt", "invalid_value")
    lp = _int(body, "logprobs", 0)
    if lp is not None and lp > 5:
        raise RequestError(400, f"'logprobs' must be in [0, 5]; got {lp}", "logprobs", "invalid_value")
    req = _sampling(body, common["model"], [], common["n"])
    return dataclasses.replace(req, prompts=prompts, logprobs=lp)


def parse_chat_request(body) -> ParsedRequest:
    """The request of a decoded JSON body, or a RequestError naming the first bad field."""
    common = _common(body, CHAT_KEYS)
    req = _sampling(body, common["model"], _messages(body), common["n"])
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(400, "'logprobs' must be a boolean", "logprobs", "invalid_type")
    top = _int(body, "top_logprobs", 0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise RequestError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}]; got {top}", "top_logprobs",
                           "invalid_value")
    if top is not None and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return dataclasses.replace(req, logprobs=(top or 0) if logprobs else None)


def _sampling(body: dict, model: str, messages: list[dict], n: int) -> ParsedRequest:
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 0) or 0  # extension (extra_body)
    seed = _int(body, "seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
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
    if top_p == 0.0:
        temperature = 0.0  # an empty nucleus means the single most likely token
    return ParsedRequest(model, messages, max_tokens, temperature, top_p, top_k, seed % (1 << 32), stops, stream,
                         bool(opts.get("include_usage")), n)


def error_response(err: RequestError):
    """The JSON response of a RequestError (401s also name the auth scheme)."""
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


__all__ = ["MAX_STOP", "MAX_N", "RequestError", "ParsedRequest", "parse_chat_request",
           "parse_completion_request", "error_response"]
