"""`persllm serve` on 127.0.0.1 driven by the official `openai` client: completions, SSE streams, adapters,
auth, bad requests, a bounded load test, and data_gen's openai: backend against it."""

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from talk_fixtures import STAGES, ServeProcess, persona_models  # noqa: F401 (fixture)

KEY = "sk-test-persllm"
Q = [{"role": "user", "content": "Tell me about the Analytical Engine."}]
DEMO = Path(__file__).resolve().parents[1] / "data_gen" / "personas"


def write_peft_adapter(model_dir, out_dir) -> Path:
    """A LoRA adapter folder written by peft itself (random, non-zero B) for the tiny model."""
    import peft
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(3)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"],
                                                    init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


@pytest.fixture(scope="module")
def served(persona_models):
    model, ada, darwin, root = (persona_models[k] for k in ("model", "ada", "darwin", "root"))
    peft_dir = write_peft_adapter(model, root / "peft_adapter")
    server = ServeProcess("--model", str(model), "--adapter", f"ada={ada}:early", "--adapter", f"darwin={darwin}",
                          "--adapter", f"peftada={peft_dir}", "--api-key", KEY, "--chunk", "4",
                          "--default-max-tokens", "24", "--slot-tokens", "384")
    with server as url:
        yield {"url": url, "model": model, "root": root, "server": server,
               "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)}


def _metrics(url) -> dict[str, float]:
    """/metrics as {sample name with labels: value}."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _raw(url, path, body=None, key=KEY, method=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _ask(client, model="base", messages=Q, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=model, messages=messages, **kw)


def _stream_text(client, model="base", messages=Q, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    parts, finish, usage, roles = [], None, None, []
    for ch in client.chat.completions.create(model=model, messages=messages, stream=True,
                                             stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            finish = c.finish_reason or finish
    return parts, finish, usage, roles


def test_models_completion_and_stream(served):
    client = served["client"]
    assert sorted(m.id for m in client.models.list().data) == ["ada", "base", "darwin", "peftada"]
    # the memory plan is printed at start
    assert any("32 slots x 384 tokens" in line and "MiB per slot" in line for line in served["server"].lines)
    assert client.models.retrieve("ada").id == "ada"
    r = _ask(client)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == "base" and r.choices[0].message.role == "assistant"
    assert isinstance(text, str) and text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the server's greedy answer is the engine's greedy answer
    from persllm_jax.serve.engine import Generator, SamplingParams

    (direct,) = Generator.load(str(served["model"])).chat([Q], SamplingParams(max_new_tokens=16))
    assert direct.text == text
    parts, finish, usage, roles = _stream_text(client)
    assert len(parts) >= 2, parts  # really streamed in pieces
    assert "".join(parts) == text
    assert roles == ["assistant"] and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens


def test_adapters_differ_and_stage_system_prompt(served):
    client = served["client"]
    answers = {m: _ask(client, m, max_tokens=12).choices[0].message.content
               for m in ("base", "ada", "darwin", "peftada")}
    assert len(set(answers.values())) == 4, answers
    # ada=RUN:early prepends the stage's system prompt to requests that have none
    explicit = [{"role": "system", "content": STAGES["early"]}] + Q
    assert _ask(client, "ada", explicit, max_tokens=12).choices[0].message.content == answers["ada"]
    other = [{"role": "system", "content": STAGES["late"]}] + Q
    assert _ask(client, "ada", other, max_tokens=12).choices[0].message.content != answers["ada"]
    # streams of an adapter join to its answer too
    assert "".join(_stream_text(client, "darwin", max_tokens=12)[0]) == answers["darwin"]


def test_stop_and_seed(served):
    client = served["client"]
    full = _ask(client, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    r = _ask(client, max_tokens=24, stop=[stop, "never-there"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert "".join(_stream_text(client, max_tokens=24, stop=stop)[0]) == cut
    a = _ask(client, temperature=1.0, top_p=0.9, seed=5).choices[0].message.content
    b = _ask(client, temperature=1.0, top_p=0.9, seed=5).choices[0].message.content
    c = _ask(client, temperature=1.0, top_p=0.9, seed=6).choices[0].message.content
    assert a == b and a != c


def test_api_key_required(served):
    url = served["url"]
    for key in (None, "wrong"):
        code, body = _raw(url, "/v1/models", key=key)
        assert code == 401 and body["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            _ask(bad)
    assert _raw(url, "/health", key=None)[0] == 200


def test_bad_requests_get_4xx_and_server_keeps_serving(served):
    url, client = served["url"], served["client"]
    code, body = _raw(url, "/v1/chat/completions", b'{"model": "base", "messages": [')
    assert code == 400 and body["error"]["code"] == "invalid_json" and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, "nobody")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # prompt too long for the 512-token context
        _ask(client, messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, max_tokens=10_000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # fits the model's 512 tokens, not a 384-token slot
        _ask(client, max_tokens=360)
    assert e.value.body["code"] == "context_length_exceeded" and "384" in e.value.body["message"]
    bad_params = [{"temperature": 5}, {"top_p": -1}, {"max_tokens": 0}, {"stop": ["a", "b", "c", "d", "e"]},
                  {"seed": "x"}, {"n": 17}, {"temperature": "hot"}, {"top_logprobs": 3}]
    for extra in bad_params:
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, **extra)
        assert e.value.status_code == 400 and e.value.body["param"] == next(iter(extra)), extra
    for body in ({"model": "base"}, {"model": "base", "messages": []}, {"messages": Q},
                 {"model": "base", "messages": [{"role": "wizard", "content": "hi"}]},
                 {"model": "base", "messages": [{"role": "user", "content": 3}]}, [1, 2]):
        code, err = _raw(url, "/v1/chat/completions", body)
        assert code == 400 and err["error"]["message"], body
    # a streaming client that goes away mid-answer
    stream = client.chat.completions.create(model="base", messages=Q, max_tokens=60, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert _raw(url, "/v1/nothing")[0] == 404
    assert _raw(url, "/v1/chat/completions", method="GET")[0] == 405
    # still serving, and an answer is unchanged by the errors
    assert _ask(client).choices[0].message.content == _ask(client).choices[0].message.content


def test_n_logprobs_completions_and_unsupported_parameters(served):
    client = served["client"]
    # n: choice i samples with seed + i, so it equals a single request with that seed
    r = _ask(client, "ada", temperature=1.0, seed=11, n=3, max_tokens=10)
    singles = [_ask(client, "ada", temperature=1.0, seed=11 + i, max_tokens=10) for i in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    # logprobs: one entry per completion token, the alternatives sorted, the greedy token the most likely
    r = _ask(client, "darwin", logprobs=True, top_logprobs=3, max_tokens=8)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and abs(tops[0] - t.logprob) < 1e-5
    assert _ask(client, "darwin", max_tokens=8).choices[0].logprobs is None
    # /v1/completions: a text prompt, the legacy logprobs
    from persllm_jax.serve.engine import Generator, SamplingParams

    gen = Generator.load(str(served["model"]))
    (direct,) = gen.complete(["Once upon a time"], SamplingParams(max_new_tokens=8))
    c = client.completions.create(model="base", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    assert c.object == "text_completion" and c.choices[0].text == direct.text
    assert c.usage.prompt_tokens == len(gen.encode_raw("Once upon a time")) and c.usage.completion_tokens == 8
    assert len(c.choices[0].logprobs.tokens) == 8 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)
    parts, usage = [], None
    for ch in client.completions.create(model="base", prompt="Once upon a time", max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        parts += [x.text for x in ch.choices]
        usage = ch.usage or usage
    assert "".join(parts) == direct.text and usage.completion_tokens == 8
    # streaming chat with n=2 and include_usage: usage counts both choices
    texts, usage = {0: "", 1: ""}, None
    for ch in client.chat.completions.create(model="base", messages=Q, max_tokens=6, temperature=0.8, seed=2, n=2,
                                             stream=True, stream_options={"include_usage": True}):
        for x in ch.choices:
            texts[x.index] += x.delta.content or ""
        usage = ch.usage or usage
    assert usage.completion_tokens == 12 and texts[0] and texts[1]
    # what we do not implement is refused, not ignored
    for extra in ({"response_format": {"type": "json_object"}}, {"logit_bias": {"42": 5}},
                  {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                  {"extra_body": {"repetition_penalty": 1.2}}):
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, **extra)
        assert e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="x", echo=True, max_tokens=2)
    assert e.value.body["param"] == "echo"
    assert _ask(client, response_format={"type": "text"}).choices[0].message.content  # "off" values are fine


def test_disconnect_frees_the_slot(served):
    """A client that goes away mid-answer (non-streaming, then streaming) frees its slot: /metrics shows it."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(served["url"])
    before = _metrics(served["url"])["persllm_cancelled_total"]
    for stream in (False, True):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        body = json.dumps({"model": "ada", "messages": Q, "max_tokens": 300, "temperature": 0, "stream": stream})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                           "Authorization": f"Bearer {KEY}"})
        deadline = time.time() + 60
        while _metrics(served["url"])["persllm_slots_busy"] < 1:
            assert time.time() < deadline, "the request never took a slot"
            time.sleep(0.05)
        conn.sock.shutdown(2)
        conn.close()
        while _metrics(served["url"])["persllm_slots_busy"] > 0:
            assert time.time() < deadline, "the slot was not freed"
            time.sleep(0.05)
    m = _metrics(served["url"])
    assert m["persllm_cancelled_total"] == before + 2
    assert m['persllm_requests_total{endpoint="/v1/chat/completions",model="ada",status="499"}'] >= 2


def test_load_32_clients_x_5_requests(served):
    """32 concurrent clients, 5 requests each, greedy: every answer equals the one-at-a-time answer."""
    prompts = [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}] for i in range(8)]
    client = served["client"]
    models = ["base", "ada", "darwin"]
    expected = {(m, i): _ask(client, m, prompts[i], max_tokens=8).choices[0].message.content
                for m in models for i in range(len(prompts))}
    before = _raw(served["url"], "/v1/stats")[1]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one_client(c):
            got = []
            for r in range(5):
                m, i = models[(c + r) % 3], (c * 5 + r) % len(prompts)
                if (c + r) % 4 == 0:  # a quarter of the requests stream
                    stream = await aclient.chat.completions.create(model=m, messages=prompts[i], max_tokens=8,
                                                                   temperature=0, stream=True)
                    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
                else:
                    resp = await aclient.chat.completions.create(model=m, messages=prompts[i], max_tokens=8,
                                                                 temperature=0)
                    text = resp.choices[0].message.content
                got.append(((m, i), text))
            return got

        try:
            return await asyncio.gather(*(one_client(c) for c in range(32)))
        finally:
            await aclient.close()

    t0 = time.time()
    results = [x for per_client in asyncio.run(main()) for x in per_client]
    elapsed = time.time() - t0
    assert len(results) == 160
    wrong = [(k, t, expected[k]) for k, t in results if t != expected[k]]
    assert not wrong, wrong[:3]
    stats = _raw(served["url"], "/v1/stats")[1]
    assert stats["requests"] - before["requests"] == 160
    rows = (stats["row_steps"] - before["row_steps"]) / (stats["decode_steps"] - before["decode_steps"])
    assert rows > 4, stats  # really batched: rows per decode step
    m = _metrics(served["url"])
    assert m["persllm_queue_depth"] == 0 and m["persllm_slots_busy"] == 0
    print(f"load: 160 requests in {elapsed:.1f}s, {rows:.1f} rows per decode step")


def test_data_gen_openai_backend_against_server(served, tmp_path, monkeypatch):
    """A tiny data build whose annotator is the served `ada` adapter (data_gen's openai: backend)."""
    from data_gen.config import load_config
    from persllm_jax.io import read_jsonl
    from data_gen.pipeline import build

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tiny = ["inputs.per_stage=1", "inputs.max_tokens=12", "responses.max_tokens=12", "retrieval.knowledge_words=20",
            "retrieval.style_words=10", "responses.fewshot=0", "responses.require_response_tag=false",
            "dpo.cross_temporal=false", "dpo.skip_top_k=0", "split.test_fraction=0", "annotator.concurrency=8"]
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "ada_lovelace").symlink_to(DEMO / "ada_lovelace")
    m = build(str(personas), str(tmp_path / "corpus"), "openai:ada", load_config(None, tiny),
              base_url=served["url"] + "/v1", progress=False, echo=lambda s: None)
    assert m["annotator"]["backend"] == "openai" and m["requests"]["sent"] >= 4
    assert m["requests"].get("failed", 0) == 0
    assert m["totals"]["planned"] == m["totals"]["rejected"] + m["totals"]["sft_train"]
    rows = read_jsonl(tmp_path / "corpus" / "sft" / "train.jsonl")
    assert len(rows) == m["totals"]["sft_train"]


def test_eval_judge_against_server(served, tmp_path, monkeypatch):
    """`persllm eval --judge openai:NAME --base-url` asks the served model through data_gen's backend."""
    from persllm_jax.eval.precision import Judge

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = Judge("openai:darwin", served["url"] + "/v1", tmp_path / "judge_cache", {"max_tokens": 8})
    replies = judge.ask({"q1": "Score this answer from 0 to 5.", "q2": "Is this knowledge or attitude?"})
    judge.close()
    assert judge.failed == 0 and all(isinstance(v, str) for v in replies.values()) and set(replies) == {"q1", "q2"}
    direct = served["client"].chat.completions.create(model="darwin", temperature=0, max_tokens=8, seed=0, messages=[
        {"role": "user", "content": "Score this answer from 0 to 5."}]).choices[0].message.content
    assert replies["q1"] == direct


def test_ctrl_c_stops_the_server_cleanly(persona_models):
    """Ctrl-C (SIGINT) is how a user stops `persllm serve`: a graceful stop with exit status 0, not a traceback."""
    import signal

    server = ServeProcess("--model", str(persona_models["model"]))
    with server as url:
        assert _raw(url, "/health", key=None)[0] == 200
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0
        deadline = time.time() + 10
        while "persllm serve: stopped" not in "".join(server.lines) and time.time() < deadline:
            time.sleep(0.1)
    out = "".join(server.lines)
    assert "persllm serve: stopped" in out and "Traceback" not in out and "Aborted" not in out
