"""Web pages served by `persllm serve` in the same process and port: `/` persona chat and `/rate` blind pairwise
human evaluation. The pages are static files shipped in this package (no CDN); they talk to the OpenAI-compatible
API and to a small JSON API under `/web/api/` that needs the same bearer key as the API when `--api-key` is set.

Owns the pages, their JSON API (`web_routes`) and the rating store (`rate`). May import what `serve` may
(errors, io, settings, runs, model/) and the rest of `serve`; never train/, export/, eval/, pipeline/, cli/.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from persllm_jax.serve.web.rate import (CRITERIA, RateConfig, RateError, RateStore, answer_seed, check_id, load_prompts,
                                        parse_judgement, pick_item)

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # everything comes from this server: a page that asked for a CDN asset would fail visibly
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Rating:
    """The `/rate` setup bound to a running server: prompts, compared models, the database."""

    def __init__(self, cfg: RateConfig, served: list[str]):
        self.cfg = cfg
        models = list(cfg.models) or list(served)
        unknown = [m for m in models if m not in served]
        if unknown:
            raise RateError(f"--rate-models: not served: {', '.join(unknown)} (served: {', '.join(served)})")
        if len(set(models)) < 2:
            raise RateError("/rate compares models pairwise: it needs at least two served models")
        self.models = list(dict.fromkeys(models))
        self.prompts = load_prompts(cfg.prompts)
        self.by_id = {p.id: p for p in self.prompts}
        self.store = RateStore(cfg.db)
        self.store.save_prompts(self.prompts)
        self.rng = random.SystemRandom()
        self.locks: dict[tuple, asyncio.Lock] = {}


def web_routes(state, stages: dict | None = None, rate: RateConfig | None = None) -> list:
    """Starlette routes for the pages and their JSON API. `state`: the server's `app.ServerState`; `stages`:
    {model name: [personas.StagePrompt]}; `rate`: the rating setup (None: /rate says it is not configured)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from persllm_jax.serve.openai_api import ParsedRequest, RequestError
    from persllm_jax.serve.personas import split_thoughts, stage_name
    from persllm_jax.serve.scheduler import Job

    stages = stages or {}
    rating = Rating(rate, list(state.models)) if rate else None

    def page(name):
        async def handler(request):
            return FileResponse(STATIC / name, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
        return handler

    async def favicon(request):
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def info(request):
        # public: lets the pages ask for a key before their first call instead of drawing a 401
        return JSONResponse({"auth": bool(state.api_key), "rate": rating is not None})

    async def personas(request):
        state.check_auth(request)
        out = []
        for name, served in state.models.items():
            st = stages.get(name) or []
            default = next((stage_name(s, st) for s in st if served.system and s.system == served.system), None)
            out.append({"name": name, "default_stage": default,
                        "stages": [{"id": stage_name(s, st), "system": s.system} for s in st]})
        return JSONResponse({"personas": out, "rate": rating is not None})

    async def body_of(request):
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"invalid JSON body ({e})", None, "invalid_json") from None

    def need_rating():
        if rating is None:
            raise RequestError(404, "rating is not configured: start persllm serve with --rate-prompts and --rate-db",
                               None, "rate_not_configured")
        return rating

    async def generate(model: str, messages: list[dict], seed: int) -> str:
        cfg = rating.cfg
        req = ParsedRequest(model, messages, cfg.max_tokens, cfg.temperature, cfg.top_p, 0, seed, (), False, False)
        _, ids, sp = state.prepare(req)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def post(kind, payload):
            if kind in ("done", "error"):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((kind, payload)))

        job = Job(model, ids, sp, post)
        state.scheduler.submit(job)
        kind, payload = await done
        if kind == "error":
            raise RequestError(500, payload, None, "generation_failed", "server_error")
        return payload.text

    async def cached_answer(prompt, model: str) -> str:
        """The answer of `model` to `prompt`, generated once and kept in the database."""
        key = (prompt.id, model)
        lock = rating.locks.setdefault(key, asyncio.Lock())
        async with lock:
            text = await run_in_threadpool(rating.store.answer, prompt.id, model)
            if text is None:
                text = await generate(model, [dict(m) for m in prompt.messages], answer_seed(prompt.id, model))
                text = await run_in_threadpool(rating.store.put_answer, prompt.id, model, text)
        return text

    async def rate_config(request):
        state.check_auth(request)
        r = need_rating()
        return JSONResponse({"criteria": list(CRITERIA), "prompts": len(r.prompts), "models": len(r.models)})

    async def rate_next(request):
        state.check_auth(request)
        r = need_rating()
        body = await body_of(request)
        try:
            rater = check_id((body or {}).get("rater_id") if isinstance(body, dict) else None, "rater_id")
        except RateError as e:
            raise RequestError(400, str(e), "rater_id", "invalid_value") from None
        mine, others, n_mine = await run_in_threadpool(r.store.judged_items, rater)
        prompt, model_a, model_b = pick_item(r.prompts, r.models, mine, others, r.cfg.overlap, r.rng)
        text_a, text_b = await asyncio.gather(cached_answer(prompt, model_a), cached_answer(prompt, model_b))
        aid = await run_in_threadpool(r.store.new_assignment, rater, prompt.id, model_a, model_b)
        msgs = list(prompt.messages)
        context = "\n\n".join(m["content"] for m in msgs[:-1] if m["role"] == "system")
        history = [m for m in msgs[:-1] if m["role"] != "system"]
        return JSONResponse({"assignment_id": aid, "prompt_id": prompt.id, "context": context, "history": history,
                             "question": msgs[-1]["content"], "answer_a": split_thoughts(text_a)[1] or text_a.strip(),
                             "answer_b": split_thoughts(text_b)[1] or text_b.strip(),
                             "judged_by_you": n_mine})

    async def rate_judgement(request):
        state.check_auth(request)
        r = need_rating()
        try:
            jid, aid, rater, choices, comment = parse_judgement(await body_of(request))
        except RateError as e:
            raise RequestError(400, str(e), None, "invalid_value") from None
        status, out = await run_in_threadpool(r.store.record, jid, aid, rater, choices, comment)
        if status != 200:
            raise RequestError(status, out["error"], None, {404: "unknown_item", 403: "wrong_rater",
                                                            409: "already_judged"}[status])
        return JSONResponse(out)

    return [
        Route("/", page("index.html"), methods=["GET"]),
        Route("/rate", page("rate.html"), methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/web/api/info", info, methods=["GET"]),
        Route("/web/api/personas", personas, methods=["GET"]),
        Route("/web/api/rate/config", rate_config, methods=["GET"]),
        Route("/web/api/rate/next", rate_next, methods=["POST"]),
        Route("/web/api/rate/judgement", rate_judgement, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]


__all__ = ["web_routes", "RateConfig", "RateError", "STATIC"]
