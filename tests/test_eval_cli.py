"""The judge path against a real local HTTP server returning fixed judgements, and `persllm eval` end to end on a
tiny model (offline): base + LoRA SFT run + chained DPO-style run side by side, results.json, report.md, PNGs."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from fake_openai import FakeOpenAI
from persllm_jax.eval import anti_induction, precision


def fixed_judge(messages) -> str:
    """Judgements decided by markers in the texts: opinion/chitchat/GARBLE in the question, SCORE=<d>/BAD in the
    answer (else "Score: 3"), "No," / "???" in the answer to judge for the refute question."""
    p = messages[-1]["content"]
    if "Reply with exactly one of" in p:
        q = p.split("[Question]", 1)[1].split("[Answer]", 1)[0]
        return ("Garbled." if "GARBLE" in q else "Attitude question" if "opinion" in q else
                "Neither" if "chitchat" in q else "Knowledge question")
    if "Give a score between 0 and 5" in p:
        a = p.split("[Response 1]", 1)[1].split("[Response 2]", 1)[0]
        m = re.search(r"SCORE=(\d)", a)
        return f"Score: {m.group(1)}" if m else "I cannot judge this." if "BAD" in a else "Score: 3"
    if "Reply with one word: YES or NO" in p:
        a = p.split("[Answer to judge]", 1)[1]
        return "unsure" if "???" in a else "YES" if "No," in a else "NO"
    return "?"


@pytest.fixture
def judge_server():
    fake = FakeOpenAI(answer=fixed_judge)
    url = fake.start()
    yield fake, url
    fake.stop()


def _item(i, question, answer, persona="ada", stage="early", type_="ordinary"):
    return {"key": f"k{i}", "id": f"i{i}", "name": "Ada", "question": question, "reference": "ref", "answer": answer,
            "persona": persona, "stage": stage, "type": type_}


def test_judge_against_local_server(judge_server, tmp_path, monkeypatch):
    fake, url = judge_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = precision.Judge("openai:fixed", url, tmp_path / "cache", {"retries": 1, "backoff_base": 0.01})
    items = [_item(0, "When did you meet Babbage?", "SCORE=5"), _item(1, "When was the engine built?", "SCORE=2", stage="late"),
             _item(2, "Your opinion of poetry?", "SCORE=4", type_="thought"), _item(3, "Your opinion of Byron?", "BAD"),
             _item(4, "GARBLE", "SCORE=5"), _item(5, "Some chitchat?", "SCORE=5", persona="darwin")]
    classes = precision.classify_items(judge, items)
    assert classes == {"i0": "knowledge", "i1": "knowledge", "i2": "attitude", "i3": "attitude", "i4": None, "i5": "neither"}
    recs = precision.score_answers(judge, items, classes)
    agg = precision.aggregate(recs)
    assert agg["knowledge"]["mean"] == pytest.approx(3.5) and agg["knowledge"]["n"] == 2
    assert agg["attitude"]["mean"] == pytest.approx(4.0) and agg["attitude"]["n"] == 1
    assert agg["overall"]["mean"] == pytest.approx(11 / 3)
    assert agg["overall"]["by_stage"] == {"ada/early": {"mean": pytest.approx(4.5), "n": 2}, "ada/late": {"mean": 2.0, "n": 1}}
    assert (agg["unparsable_class"], agg["unparsable_score"], agg["neither"]) == (1, 1, 1)
    assert judge.failed == 0
    replies = judge.ask({"a": anti_induction.REFUTE_PROMPT.format(name="Ada", question="q", reference="r", answer="No, never."),
                         "b": anti_induction.REFUTE_PROMPT.format(name="Ada", question="q", reference="r", answer="Yes indeed"),
                         "c": anti_induction.REFUTE_PROMPT.format(name="Ada", question="q", reference="r", answer="???")})
    assert {k: anti_induction.parse_yes_no(v) for k, v in replies.items()} == {"a": True, "b": False, "c": None}
    sent = len(fake.bodies)
    precision.classify_items(judge, items)  # answered from the on-disk cache
    assert len(fake.bodies) == sent
    judge.close()


def test_judge_failures_are_counted_not_fatal(tmp_path, monkeypatch):
    fake = FakeOpenAI(answer=fixed_judge, fault_rate=1.0)  # every first attempt fails; no retries allowed
    url = fake.start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        judge = precision.Judge("openai:fixed", url, tmp_path / "cache", {"retries": 0, "timeout": 0.5, "backoff_base": 0.01})
        classes = precision.classify_items(judge, [_item(0, "q1", "SCORE=5"), _item(1, "q2", "SCORE=5")])
        assert classes == {"i0": None, "i1": None} and judge.failed == 2
        assert precision.aggregate(precision.score_answers(judge, [_item(0, "q1", "SCORE=5")], classes))["unparsable_class"] == 1
    finally:
        fake.stop()


def test_bad_judge_spec(tmp_path):
    with pytest.raises(precision.EvalError, match="--judge nope"):
        precision.Judge("nope", None, tmp_path)


QUESTIONS = {"thought": "What is your opinion of poetry?", "error": "Why did you move to America in 1830?"}


def write_test_corpus(root, personas=("ada_lovelace", "charles_darwin")):
    rows = []
    for p in personas:
        name = p.replace("_", " ").title()
        for stage, label in (("early", "1834"), ("late", "1860")):
            for i, (t, q) in enumerate(QUESTIONS.items()):
                rows.append({"id": f"{p}/{stage}/{i}", "persona": p, "stage": stage, "type": t, "messages": [
                    {"role": "system", "content": f"You are {name}. Now it's {label}."}, {"role": "user", "content": q},
                    {"role": "assistant", "content": f"[Analysis] think. [Response] No, {name} says S4 in {label}."}]})
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for p in personas:
        for stage in ("early", "late"):
            d = root / "personas" / p / stage / "subjective"
            d.mkdir(parents=True)
            (d / "words.txt").write_text(f"I, {p}, write about engines and numbers.\n\nAnother thought of {stage} days.\n")
        (root / "personas" / p / "persona.yaml").write_text(
            f"name: {p}\ndescription: a test persona\nstages:\n  - id: early\n    label: '1834'\n    description: young\n"
            "  - id: late\n    label: '1860'\n    description: older\n")
    return root


def test_eval_command_end_to_end(tmp_path, judge_server, monkeypatch):
    from export_runs import random_adapter, write_run
    from persllm_jax.cli import main
    from persllm_jax.model.weights import load_model
    from talk_fixtures import make_model, make_run

    fake, url = judge_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("PERSLLM_XLA_CACHE", "0")
    model = make_model(tmp_path / "model")
    corpus = write_test_corpus(tmp_path / "corpus")
    sft = make_run(tmp_path / "sft", model, seed=1, corpus=corpus / "sft" / "test.jsonl")
    cfg = load_model(str(model)).cfg
    write_run(tmp_path / "dpo", model, random_adapter(cfg, 2, seed=5), rank=2, parent=str(sft))
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-4}) + "\n" for s in (1, 2, 3)))
    conf = tmp_path / "eval.yaml"
    conf.write_text("samples: 2\nmax_new_tokens: 6\nbatch_size: 16\nbigfive: {variants: [describe, reversed], max_items: 4, batch_size: 32}\n"
                    "judge: {retries: 1, backoff_base: 0.01}\n")
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["eval", "--model", str(model), "--run", f"SFT={sft}", "--run", f"SFT+DPO={tmp_path / 'dpo'}",
                                    "--data", str(corpus), "--out", str(out), "--judge", "openai:fixed", "--base-url", url,
                                    "--config", str(conf), "--personas", str(corpus / "personas")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for bar in ("eval SFT: answers", "eval SFT+DPO: Big Five", "eval judge"):  # progress on stderr
        assert bar in res.stderr, bar
    r = json.loads((out / "results.json").read_text())
    assert list(r["systems"]) == ["base+prompt", "SFT", "SFT+DPO"]
    for name, s in r["systems"].items():
        assert set(s["distinction"]["per_persona"]) == {"ada_lovelace", "charles_darwin"}
        assert s["distinction"]["per_persona"]["ada_lovelace"]["pairs"]["intra"] > 0
        bf = s["bigfive"]
        assert set(bf["profiles"]) == {"ada_lovelace", "charles_darwin"} and bf["variants"] == ["describe", "reversed"]
        for st in bf["profiles"].values():
            for prof in st.values():
                assert all(1 <= v <= 5 for v in prof.values())
        assert "early->late" in bf["dynamic"]["ada_lovelace"]
        # the tiny model's answers carry no SCORE= marker: every one is judged "Score: 3"
        pr = s["precision"]
        assert (pr["knowledge"]["n"], pr["attitude"]["n"], pr["overall"]["mean"]) == (4, 4, 3.0)  # sample 0 of 8 items
        assert s["anti_induction"]["judged"] == 4 and s["anti_induction"]["refute_rate"] is not None
        assert s["anti_induction"]["n_error"] == 8 and s["style"]["by_stage"]  # 4 error items x 2 samples
        lines = (out / f"answers_{name.replace('+', '_')}.jsonl").read_text().splitlines()
        assert len(lines) == 16
    # the base and the runs answer differently (adapters are applied), the runs from each other too
    texts = {n: [json.loads(x)["raw"] for x in (out / f"answers_{n.replace('+', '_')}.jsonl").read_text().splitlines()]
             for n in r["systems"]}
    assert texts["base+prompt"] != texts["SFT"] != texts["SFT+DPO"]
    md = (out / "report.md").read_text()
    assert "| metric | base+prompt | SFT | SFT+DPO |" in md and "## Distinction" in md
    for png in r["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"distinction.png", "precision.png", "training_curves.png", "bigfive_base_prompt.png"} <= set(r["plots"])
    from PIL import Image

    for png in r["plots"]:
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_eval_command_bad_input(tmp_path):
    from persllm_jax.cli import main

    res = CliRunner().invoke(main, ["eval", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no such corpus directory" in res.output
    res = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--data and --out are required" in res.output
    (tmp_path / "bad.yaml").write_text("nonsense_key: 1\n")
    corpus = write_test_corpus(tmp_path / "c")
    res = CliRunner().invoke(main, ["eval", "--data", str(corpus), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")])
    assert res.exit_code != 0 and "unknown config key 'nonsense_key'" in res.output


def test_option_logprobs_match_an_unpadded_forward(tmp_path):
    """Left-padded batched scoring of the Likert options equals a plain forward pass over each prompt alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from persllm_jax.model.decoder import forward
    from persllm_jax.eval.runner import option_logprobs_fn, option_token_ids
    from persllm_jax.serve.engine import Generator
    from persllm_jax.model.weights import load_model
    from talk_fixtures import make_model

    path = make_model(tmp_path / "m", seed=3)
    gen = Generator.load(str(path))
    convs = [[{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "Rate: I am bold. " * k}]
             for k in (1, 3, 6)]
    got = option_logprobs_fn(gen, batch_size=4)(convs)
    loaded = load_model(str(path))
    opt = option_token_ids(gen.tokenizer)
    assert len(opt) == 5
    for i, c in enumerate(convs):
        ids = jnp.asarray([gen.encode_chat(c)], jnp.int32)
        pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
        logits = forward(loaded.params, loaded.cfg, ids, pos, jnp.ones_like(ids))
        want = np.asarray(jax.nn.log_softmax(logits[0, -1]))[opt]
        np.testing.assert_allclose(got[i], want, atol=2e-4)
