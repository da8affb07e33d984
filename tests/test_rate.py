"""/rate's judgement store against a real `persllm serve` subprocess: 8 raters submitting 50 judgements each at
once lose none and store none twice, a SIGKILLed server keeps every acknowledged judgement, bad submissions get
clear 4xx; plus the prompt loader and the random A/B assignment."""

import http.client
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter

import pytest
from click.testing import CliRunner

from talk_fixtures import STAGES, ServeProcess, persona_models  # noqa: F401 (fixture)

KEY = "sk-rate-test"
PROMPTS = [{"id": f"p{i}", "system": STAGES["early"], "prompt": f"Question {i}: what do you think of engines?"}
           for i in range(4)]


class Client:
    """One keep-alive connection to the server (one per simulated rater)."""

    def __init__(self, url, key=KEY):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.key = key

    def call(self, path, body=None):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        self.conn.request("POST" if body is not None else "GET", path,
                          body=None if body is None else json.dumps(body), headers=headers)
        r = self.conn.getresponse()
        return r.status, json.loads(r.read() or b"null")


def judge(cl, rater, jid, item, choices=None):
    return cl.call("/web/api/rate/judgement", {
        "judgement_id": jid, "assignment_id": item["assignment_id"], "rater_id": rater,
        "choices": choices or {"fidelity": "A", "knowledge": "B", "style": "tie"}, "comment": f"{rater} {jid}"})


@pytest.fixture(scope="module")
def rated(persona_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rate")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    db = tmp / "ratings.sqlite"
    m = persona_models
    server = ServeProcess("--model", str(m["model"]), "--adapter", f"ada={m['ada']}:early", "--adapter",
                          f"darwin={m['darwin']}", "--api-key", KEY, "--chunk", "4", "--rate-prompts", str(prompts),
                          "--rate-db", str(db), "--rate-max-tokens", "8")
    with server as url:
        yield {"url": url, "db": db, "server": server}


def rows(db, sql="SELECT * FROM judgements"):
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def test_submissions_checked_and_retries_idempotent(rated):
    url = rated["url"]
    cl = Client(url)
    assert Client(url, key=None).call("/web/api/rate/next", {"rater_id": "x"})[0] == 401
    assert Client(url, key=None).call("/web/api/info") == (200, {"auth": True, "rate": True})
    code, item = cl.call("/web/api/rate/next", {"rater_id": "bob"})
    assert code == 200 and item["answer_a"] != item["answer_b"], item
    assert set(item) >= {"assignment_id", "prompt_id", "question", "answer_a", "answer_b", "context"}
    assert "model" not in json.dumps(sorted(item))  # blind: no model name in the item
    assert item["context"] == STAGES["early"]
    for bad in ({"fidelity": "A", "knowledge": "B"}, {"fidelity": "A", "knowledge": "B", "style": "C"}):
        code, err = judge(cl, "bob", "jbad", item, bad)
        assert code == 400 and "choices" in err["error"]["message"]
    assert cl.call("/web/api/rate/judgement", {"judgement_id": "j x!", "assignment_id": "a", "rater_id": "b",
                                                "choices": {}})[0] == 400
    assert judge(cl, "bob", "j-unknown", {"assignment_id": "nope"})[0] == 404
    assert judge(cl, "eve", "j-eve", item)[0] == 403  # the item was given to bob
    assert judge(cl, "bob", "j1", item) == (200, {"judgement_id": "j1", "stored": True, "duplicate": False})
    assert judge(cl, "bob", "j1", item) == (200, {"judgement_id": "j1", "stored": True, "duplicate": True})
    assert judge(cl, "bob", "j2", item)[0] == 409  # the same item judged again under a new id
    got = rows(rated["db"], "SELECT * FROM judgements WHERE rater_id='bob'")
    assert len(got) == 1 and got[0]["judgement_id"] == "j1" and got[0]["prompt_id"] == item["prompt_id"]
    # the shown answers are the cached answers of the recorded models, in the recorded order
    ans = {(r["prompt_id"], r["model"]): r["text"] for r in rows(rated["db"], "SELECT * FROM answers")}
    assert ans[(item["prompt_id"], got[0]["model_a"])].strip() == item["answer_a"]
    assert ans[(item["prompt_id"], got[0]["model_b"])].strip() == item["answer_b"]
    assert got[0]["order_shown"] == f"{got[0]['model_a']},{got[0]['model_b']}"


def test_8_raters_50_judgements_each_at_once(rated):
    url, db = rated["url"], rated["db"]
    before = len(rows(db))
    n_raters, per = 8, 50
    acked, errors, shown = {}, [], {}
    barrier = threading.Barrier(n_raters)

    def rater(r):
        name, cl = f"load{r}", Client(url)
        acked[name] = []
        try:
            barrier.wait()
            for k in range(per):
                code, item = cl.call("/web/api/rate/next", {"rater_id": name})
                assert code == 200, item
                assert item["judged_by_you"] == k  # counts judgements, past the 12 items (they come round again)
                jid = f"{name}-{k}"
                shown[jid] = (item["assignment_id"], item["prompt_id"], item["answer_a"], item["answer_b"])
                choice = random.Random(jid).choice(["A", "B", "tie"])
                code, out = judge(cl, name, jid, item, {"fidelity": choice, "knowledge": "A", "style": "B"})
                assert code == 200 and not out["duplicate"], out
                if k % 10 == 0:  # a client retry of the same submission is not stored twice
                    assert judge(cl, name, jid, item, {"fidelity": choice, "knowledge": "A", "style": "B"}) == \
                        (200, {"judgement_id": jid, "stored": True, "duplicate": True})
                acked[name].append(jid)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t0 = time.time()
    threads = [threading.Thread(target=rater, args=(r,)) for r in range(n_raters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    assert not errors, errors[:3]
    got = [r for r in rows(db) if r["rater_id"].startswith("load")]
    assert len(rows(db)) - before == n_raters * per == len(got) == 400
    ids = [r["judgement_id"] for r in got]
    assert len(set(ids)) == 400 and set(ids) == {j for v in acked.values() for j in v}
    assert Counter(r["rater_id"] for r in got) == {f"load{r}": per for r in range(n_raters)}
    assert len({r["assignment_id"] for r in got}) == 400
    # each row names the models of its assignment and the prompt the rater was shown
    assign = {a["assignment_id"]: a for a in rows(db, "SELECT * FROM assignments")}
    answers = {(a["prompt_id"], a["model"]): a["text"].strip() for a in rows(db, "SELECT * FROM answers")}
    for r in got:
        a = assign[r["assignment_id"]]
        assert (r["prompt_id"], r["model_a"], r["model_b"]) == (a["prompt_id"], a["model_a"], a["model_b"])
        aid, pid, text_a, text_b = shown[r["judgement_id"]]
        assert aid == r["assignment_id"] and pid == r["prompt_id"]
        assert (answers[(pid, r["model_a"])], answers[(pid, r["model_b"])]) == (text_a, text_b)
    pairs = Counter((r["model_a"], r["model_b"]) for r in got)
    assert len(pairs) == 6, pairs  # 3 models: every pair, in both orders
    assert len(rows(db, "SELECT * FROM answers")) <= len(PROMPTS) * 3  # one cached answer per (prompt, model)
    print(f"rate load: 400 judgements (+ 40 retries) from 8 raters in {elapsed:.1f}s; pairs shown {dict(pairs)}")


def test_killed_server_keeps_every_acknowledged_judgement(rated):
    """Raters keep submitting while the server is SIGKILLed; every judgement acknowledged with a 2xx is in the
    database afterwards. (Runs last in this module: it kills the module's server.)"""
    url, db, proc = rated["url"], rated["db"], rated["server"].proc
    acked, stop = [], threading.Event()
    lock = threading.Lock()

    def rater(r):
        name, cl = f"kill{r}", Client(url)
        for k in range(10_000):
            if stop.is_set():
                return
            try:
                code, item = cl.call("/web/api/rate/next", {"rater_id": name})
                code, out = judge(cl, name, f"{name}-{k}", item)
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                return  # the server is gone
            if code == 200:
                with lock:
                    acked.append(out["judgement_id"])

    threads = [threading.Thread(target=rater, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    t0 = time.time()
    while len(acked) < 60 and time.time() - t0 < 120:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    n_at_kill = len(acked)
    proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert n_at_kill >= 60
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in con.execute("SELECT judgement_id FROM judgements WHERE rater_id LIKE 'kill%'")}
    con.close()
    missing = set(acked) - stored
    assert not missing, sorted(missing)[:5]
    # items shown before the kill can still be judged once the database is opened again (a restarted server)
    from persllm_jax.serve.web.rate import RateStore

    open_items = rows(db, "SELECT a.assignment_id, a.rater_id FROM assignments a LEFT JOIN judgements j "
                          "ON a.assignment_id = j.assignment_id WHERE j.judgement_id IS NULL AND a.rater_id LIKE 'kill%'")
    if open_items:
        it = open_items[0]
        assert RateStore(db).record("after-kill", it["assignment_id"], it["rater_id"],
                                    {"fidelity": "A", "knowledge": "A", "style": "A"}, "")[0] == 200
    print(f"kill: {len(acked)} acknowledged judgements, all {len(stored)} stored rows survived SIGKILL")


# -- without a server --------------------------------------------------------------------------------


def test_load_prompts_corpus_and_jsonl(tmp_path):
    from persllm_jax.errors import InputError
    from persllm_jax.serve.web.rate import RateError, load_prompts

    corpus = tmp_path / "corpus"
    (corpus / "sft").mkdir(parents=True)
    row = {"id": "ada/early/0", "persona": "ada", "stage": "early", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "R"}]}
    (corpus / "sft" / "test.jsonl").write_text(json.dumps(row) + "\n")
    (p,) = load_prompts(corpus)
    assert p.id == "ada/early/0" and p.messages == ({"role": "system", "content": "S"}, {"role": "user", "content": "Q"})
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi", "system": "be ada"}\n\n{"id": "x", "prompt": "yo"}\n')
    a, b = load_prompts(f)
    assert a.id == "row1" and a.messages[0]["content"] == "be ada" and b.messages == ({"role": "user", "content": "yo"},)
    for text, msg in (('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', "duplicate prompt id"),
                      ('{"messages": [{"role": "system", "content": "s"}]}\n', "ending with a user message"),
                      ('{"question": "a"}\n', "needs 'messages' or 'prompt'"), ("", "no prompts")):
        f.write_text(text)
        with pytest.raises(RateError, match=msg):
            load_prompts(f)
    f.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2:2: invalid JSON"):  # the shared JSONL reader's error
        load_prompts(f)
    with pytest.raises(RateError, match="neither a JSONL file"):
        load_prompts(tmp_path / "missing")


def test_pick_item_random_pairs_orders_and_overlap():
    from persllm_jax.serve.web.rate import Prompt, pick_item

    prompts = [Prompt(f"p{i}", ({"role": "user", "content": str(i)},)) for i in range(5)]
    models = ["a", "b", "c"]
    rng = random.Random(0)
    shown = Counter(pick_item(prompts, models, set(), {}, 0.25, rng)[1:] for _ in range(6000))
    assert set(shown) == {(x, y) for x in models for y in models if x != y}
    assert all(abs(n / 6000 - 1 / 6) < 0.03 for n in shown.values()), shown  # uniform pairs, random order
    # an item another rater judged is offered (overlap 1), unless this rater judged it too
    item = ("p3", frozenset(("a", "c")))
    p, x, y = pick_item(prompts, models, set(), {item: 1}, 1.0, rng)
    assert (p.id, frozenset((x, y))) == item
    mine = {(q.id, frozenset(pr)) for q in prompts for pr in [("a", "b"), ("b", "c")]}
    for _ in range(50):  # avoids what this rater already judged while there is something else
        p, x, y = pick_item(prompts, models, mine | {item}, {item: 1}, 1.0, rng)
        assert frozenset((x, y)) == frozenset(("a", "c")) and p.id != "p3"


def test_serve_rate_options_fail_clearly(persona_models, tmp_path):
    from persllm_jax.cli import main

    base = ["serve", "--model", str(persona_models["model"]), "--port", "0"]
    r = CliRunner().invoke(main, base + ["--adapter", f"ada={persona_models['ada']}",
                                         "--rate-prompts", str(tmp_path / "nope.jsonl")])
    assert r.exit_code != 0 and "neither a JSONL file nor a corpus dir" in r.output
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    r = CliRunner().invoke(main, base + ["--rate-prompts", str(f)])
    assert r.exit_code != 0 and "at least two served models" in r.output
    r = CliRunner().invoke(main, base + ["--adapter", f"ada={persona_models['ada']}", "--rate-prompts", str(f),
                                         "--rate-models", "ada,zed"])
    assert r.exit_code != 0 and "not served: zed" in r.output
    r = CliRunner().invoke(main, base + ["--rate-db", str(tmp_path / "x.sqlite")])
    assert r.exit_code != 0 and "need --rate-prompts" in r.output
