"""Annotator backends behind one interface: an OpenAI-compatible endpoint (the official `openai` async
client) and our own JAX generation engine. Both answer through an on-disk response cache keyed by a
hash of the request, so a rerun sends no request that was already answered.

The API key is read from OPENAI_API_KEY, handed to the client, and never stored: it is not part of the
cache key, the cache entries, the identity written to the manifest, or any error message."""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from data_gen.errors import DataGenError
from persllm_jax.io import atomic_write_text


@dataclasses.dataclass(frozen=True)
class Request:
    key: str  # the pipeline's item key (not part of the cache key)
    messages: tuple  # tuple of {"role", "content"} dicts
    max_tokens: int
    temperature: float
    top_p: float
    seed: int

    def body(self) -> dict:
        return {"messages": list(self.messages), "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}


@dataclasses.dataclass
class Result:
    text: str | None
    error: str | None = None  # reason when the request failed after all retries
    cached: bool = False


OnResult = Callable[[Request, Result], "list[Request] | None"]


class ResponseCache:
    """One JSON file per answered request under DIR/ab/<sha256>.json, written atomically."""

    def __init__(self, root: Path, namespace: dict):
        self.root = Path(root)
        self.namespace = namespace  # e.g. {"model": ...}; never holds secrets

    def key(self, req: Request) -> str:
        blob = json.dumps({"ns": self.namespace, **req.body()}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, k: str) -> Path:
        return self.root / k[:2] / f"{k}.json"

    def get(self, req: Request) -> str | None:
        p = self._path(self.key(req))
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))["text"]
        except (ValueError, KeyError):
            return None  # a damaged entry is asked again

    def put(self, req: Request, text: str) -> None:
        entry = {"ns": self.namespace, "request": req.body(), "text": text}
        atomic_write_text(self._path(self.key(req)), json.dumps(entry, ensure_ascii=False))


class Backend(abc.ABC):
    identity: dict
    cache: ResponseCache

    def __init__(self):
        self.stats: Counter = Counter()
        self.last_error: dict[str, str] = {}  # endpoint -> why its last failed attempt failed (no key in it)

    def run(self, requests: list[Request], on_result: OnResult) -> None:
        """Answer every request, calling on_result(request, result) as each one is done (cache hits
        first). on_result may return follow-up requests, which are answered in the same run, so a
        pipeline of steps keeps the annotator busy instead of waiting for each step's slowest item."""
        todo = self._uncached(requests, on_result)
        if todo:
            self._run(todo, on_result)

    def _uncached(self, requests, on_result: OnResult) -> list[Request]:
        queue, todo = collections.deque(requests or ()), []
        while queue:
            r = queue.popleft()
            text = self.cache.get(r)
            if text is None:
                todo.append(r)
            else:
                self.stats["cache_hits"] += 1
                queue.extend(on_result(r, Result(text, cached=True)) or ())
        return todo

    @abc.abstractmethod
    def _run(self, requests: list[Request], on_result: OnResult) -> None:
        """Answer the uncached requests (each backend's own transport)."""

    def close(self) -> None:
        pass


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class OpenAIBackend(Backend):
    def __init__(self, model: str, base_url: str | None, cfg: dict, cache_dir: Path):
        super().__init__()
        try:
            import openai  # noqa: F401
        except ImportError:
            raise DataGenError("the openai: annotator needs the openai package (pip install openai)") from None
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._key = os.environ.get("OPENAI_API_KEY") or ""
        if not self._key and not self.base_url:
            raise DataGenError("openai annotator: set OPENAI_API_KEY (and OPENAI_BASE_URL or --base-url for "
                               "another OpenAI-compatible endpoint)")
        self.cfg = cfg
        self.identity = {"backend": "openai", "model": model,
                         "base_url": _redact_url(self.base_url) if self.base_url else "https://api.openai.com/v1"}
        self.cache = ResponseCache(cache_dir, {"model": model})

    def _scrub(self, msg: str) -> str:
        return msg.replace(self._key, "***") if self._key else msg

    def _why(self, e: Exception) -> str:
        """One line saying why a request failed: connection refused / timeout / HTTP status and body."""
        import openai

        if isinstance(e, openai.APITimeoutError):
            return f"timeout after {float(self.cfg['timeout']):g} s"
        if isinstance(e, openai.APIStatusError):
            body = getattr(e, "body", None)
            detail = body.get("message") if isinstance(body, dict) else (body or getattr(e, "message", ""))
            return f"HTTP {e.status_code}: {self._scrub(str(detail))[:200]}"
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        text = str(cause)
        if isinstance(cause, ConnectionRefusedError) or "refused" in text.lower():
            return "connection refused"
        return self._scrub(text.splitlines()[0] if text.strip() else type(cause).__name__)[:200]

    def _run(self, requests, on_result):
        asyncio.run(self._run_async(requests, on_result))

    async def _run_async(self, requests, on_result):
        import openai

        client = openai.AsyncOpenAI(api_key=self._key or "no-key", base_url=self.base_url, max_retries=0,
                                    timeout=float(self.cfg["timeout"]))
        sem = asyncio.Semaphore(int(self.cfg["concurrency"]))
        fatal: list[str] = []
        url = self.identity["base_url"]

        def failed(e: Exception) -> str:
            why = self._why(e)
            self.last_error[url] = why
            return why

        async def one(req: Request) -> tuple[Request, Result]:
            retries = int(self.cfg["retries"])
            last, retry_after = "unknown", 0.0
            for attempt in range(retries + 1):
                if fatal:
                    return req, Result(None, "aborted")
                if attempt:
                    self.stats[f"retry_{last}"] += 1
                    cap = min(float(self.cfg["backoff_max"]), float(self.cfg["backoff_base"]) * 2 ** (attempt - 1))
                    # exponential backoff with full jitter, but never sooner than a 429's Retry-After
                    await asyncio.sleep(max(random.uniform(0, cap), min(retry_after, float(self.cfg["backoff_max"]))))
                    retry_after = 0.0
                try:
                    async with sem:
                        if fatal:  # the stop came while this request waited for a slot: do not send it
                            return req, Result(None, "aborted")
                        self.stats["sent"] += 1
                        resp = await client.chat.completions.create(
                            model=self.model, messages=list(req.messages), max_tokens=req.max_tokens,
                            temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                            timeout=float(self.cfg["timeout"]))
                    text = resp.choices[0].message.content
                    if not isinstance(text, str):
                        raise TypeError("no message content")
                except openai.RateLimitError as e:
                    failed(e)
                    last = "429"
                    try:
                        retry_after = float(e.response.headers.get("retry-after") or 0)
                    except (TypeError, ValueError, AttributeError):
                        retry_after = 0.0
                    continue
                except openai.APITimeoutError as e:
                    failed(e)
                    last = "timeout"
                    continue
                except openai.APIConnectionError as e:
                    last = "connection"
                    if failed(e) == "connection refused" and attempt >= 1 and not self.stats["ok"]:
                        # refused twice and nothing ever answered: no server there; stop instead of retrying all
                        fatal.append(f"annotator endpoint {url}: connection refused on every attempt (is the "
                                     f"server running? check --base-url / OPENAI_BASE_URL)")
                        return req, Result(None, "connection_refused")
                    continue
                except openai.APIStatusError as e:
                    code = e.status_code
                    why = failed(e)
                    if code >= 500 or code in (408, 409):
                        last = str(code) if code < 600 else "5xx"
                        continue
                    if code in (401, 403, 404):
                        fatal.append(f"annotator endpoint {url} answered {code} ({why[len(f'HTTP {code}: '):]}); "
                                     f"check the model name and OPENAI_API_KEY")
                        return req, Result(None, f"http_{code}")
                    return req, Result(None, f"http_{code}")
                except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, IndexError,
                        KeyError) as e:
                    self.last_error[url] = f"malformed reply ({type(e).__name__})"
                    last = "malformed"
                    continue
                self.stats["ok"] += 1
                self.cache.put(req, text)
                return req, Result(text)
            self.stats["failed"] += 1
            return req, Result(None, f"gave_up_after_{retries + 1}_attempts_{last}")

        try:
            pending = {asyncio.ensure_future(one(r)) for r in requests}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: f.result()[0].key):
                    req, res = fut.result()
                    for more in self._uncached(on_result(req, res), on_result):
                        pending.add(asyncio.ensure_future(one(more)))
        finally:
            await client.close()
        if fatal:
            raise DataGenError(fatal[0])


class LocalBackend(Backend):
    """Our JAX generation engine; the model loads on the first uncached request (a full-cache rerun never
    loads it)."""

    def __init__(self, spec: str, cfg: dict, cache_dir: Path):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        ident = {"backend": "local", "model": spec}
        fp = spec
        if spec != "smollm2":
            p = Path(spec)
            if not p.exists():
                raise DataGenError(f"local annotator: {spec}: no such model folder or .gguf file")
            ident["model"] = p.name
            # the cache namespace fingerprints the weights, so two models with the same folder name differ
            files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".gguf", ".json"))
            fp = hashlib.sha256(json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                                            for f in files]).encode()).hexdigest()[:16]
            ident["fingerprint"] = fp
        self.identity = ident
        self.cache = ResponseCache(cache_dir, {"model": f"local:{ident['model']}", "weights": fp})
        self.gen = None

    def _run(self, requests, on_result):
        from persllm_jax.serve.engine import Generator, SamplingParams

        if self.gen is None:
            t = time.perf_counter()
            self.gen = Generator.load(self.spec)
            self.stats["load_seconds"] = round(time.perf_counter() - t, 2)
        bs = int(self.cfg["batch_size"])
        queue = list(requests)
        while queue:
            queue.sort(key=lambda r: sum(len(m["content"]) for m in r.messages))  # similar lengths batch well
            batch, queue = queue[:bs], queue[bs:]
            sp = [SamplingParams(max_new_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                 seed=r.seed) for r in batch]
            outs = self.gen.chat([list(r.messages) for r in batch], sp)
            self.stats["sent"] += len(batch)
            for r, c in zip(batch, outs):
                self.cache.put(r, c.text)
                queue += self._uncached(on_result(r, Result(c.text)), on_result)


def make_backend(spec: str, base_url: str | None, cfg: dict, cache_dir: Path) -> Backend:
    if spec.startswith("openai:") and spec[len("openai:"):]:
        return OpenAIBackend(spec[len("openai:"):], base_url, cfg, cache_dir)
    if spec.startswith("local:") and spec[len("local:"):]:
        return LocalBackend(spec[len("local:"):], cfg, cache_dir)
    raise DataGenError(f"--annotator {spec}: expected openai:MODEL or local:PATH (local:smollm2 = embedded model)")
