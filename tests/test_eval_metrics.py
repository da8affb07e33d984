"""Eval metrics on hand-built cases with known answers: BLEU distinction, Big Five scoring with a fixed scorer
(reverse keying, reversed scale variants), consistency / dynamics / distance, character breaks, judge parsing,
precision averages, style similarity with a toy embedder, corpus checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from persllm_jax.errors import InputError
from persllm_jax.eval import EvalError, anti_induction, bigfive, distinction, precision, style
from persllm_jax.eval.corpus import load_test, persona_stages, response_part


def _ans(persona, stage, item, text, sample=0):
    return {"persona": persona, "stage": stage, "item": item, "sample": sample, "text": text}


A = "the quick brown fox jumps over the lazy dog near the river bank today"
B = "seven purple elephants calculate integrals while singing opera loudly tonight"


def test_bleu_identical_and_disjoint():
    assert distinction.bleu(A, A) == pytest.approx(100.0)
    assert distinction.bleu(A, B) == pytest.approx(0.0, abs=1e-6)
    assert distinction.bleu("", A) == 0.0


def test_distinction_table_known_values():
    # persona p: every answer identical within a stage, disjoint across stages; persona q disjoint from p
    ans = [_ans("p", "early", i, A) for i in range(2)] + [_ans("p", "late", i, B) for i in range(2)]
    ans += [_ans("q", "early", i, "zebra xylophone quartz " * 3) for i in range(2)]
    d = distinction.distinction(ans)
    p = d["per_persona"]["p"]
    assert p["intra"] == pytest.approx(100.0)
    assert p["stage"] == pytest.approx(0.0, abs=1e-6)
    assert p["inter"] == pytest.approx(0.0, abs=1e-6)
    assert p["pairs"] == {"intra": 4, "stage": 8, "inter": 8}
    q = d["per_persona"]["q"]
    assert q["stage"] is None  # one stage only
    assert d["average"]["intra"] == pytest.approx(100.0)
    assert d["average"]["intra_minus_stage"] == pytest.approx(100.0)


def test_distinction_never_pairs_an_answer_with_itself():
    d = distinction.distinction([_ans("p", "s", 0, A)])
    assert d["per_persona"]["p"]["intra"] is None and d["average"]["intra"] is None


def test_distinction_pair_cap_is_seeded():
    ans = [_ans("p", "s", i, f"{A} {i}") for i in range(30)]
    a = distinction.distinction(ans, max_pairs=20, seed=3)
    b = distinction.distinction(ans, max_pairs=20, seed=3)
    assert a == b and a["per_persona"]["p"]["pairs"]["intra"] == 20


ITEMS = [{"trait": "T1", "key": 1, "text": "Am bold."}, {"trait": "T1", "key": -1, "text": "Am shy."},
         {"trait": "T2", "key": 1, "text": "Like order."}]


def _fixed(answer_of):
    """A scorer that puts all mass on option `answer_of(messages)` (1..5)."""
    def fn(convs):
        out = np.full((len(convs), 5), -50.0)
        for i, m in enumerate(convs):
            out[i, answer_of(m) - 1] = 0.0
        return out
    return fn


def test_expected_answer():
    assert bigfive.expected_answer(np.array([[-99.0, -99, -99, -99, 0]]))[0] == pytest.approx(5)
    assert bigfive.expected_answer(np.zeros((1, 5)))[0] == pytest.approx(3)
    assert bigfive.expected_answer(np.array([[0.0, -99, -99, -99, 0]]))[0] == pytest.approx(3)


def test_questionnaire_reverse_keying_and_reversed_scale():
    doc = {"items": ITEMS, "traits": ["T1", "T2"]}
    personas = {"p": {"name": "P", "stages": {"early": "1800", "late": "1850"}}}

    def answer(m):  # agrees fully (5) with every statement, whatever the numbering of the scale
        return 1 if "1 = very accurate" in m[1]["content"] else 5

    r = bigfive.administer(_fixed(answer), personas, doc, variants=["describe", "reversed"])
    for st in ("early", "late"):
        # T1: "bold" agreed (5) and "shy" agreed (reverse keyed -> 1): mean 3; T2 agreed: 5
        assert r["profiles"]["p"][st] == {"T1": pytest.approx(3.0), "T2": pytest.approx(5.0)}
        assert r["consistency"]["p"][st]["mean_std"] == pytest.approx(0.0)
    assert r["dynamic"]["p"]["early->late"]["l2"] == pytest.approx(0.0)


def test_questionnaire_consistency_dynamics_distance():
    doc = {"items": ITEMS, "traits": ["T1", "T2"]}
    personas = {"p": {"name": "P", "stages": {"early": "1800", "late": "1850"}},
                "q": {"name": "Q", "stages": {"early": "1800"}}}

    def answer(m):
        sys_, user = m[0]["content"], m[1]["content"]
        if "You are Q" in sys_:
            return 1
        if "1850" in sys_:
            return 4 if "bold" in user or "order" in user else 2  # late: T1 (4 + 6-2)/2 = 4, T2 = 4
        # early: the "rate" variant answers 5 to everything, "describe" answers 1 -> spread across variants
        return 5 if "Rate the statement" in user else 1

    r = bigfive.administer(_fixed(answer), personas, doc, variants=["describe", "rate"])
    early = r["scores"]["p"]["early"]
    assert early["rate"] == {"T1": 3.0, "T2": 5.0} and early["describe"] == {"T1": 3.0, "T2": 1.0}
    assert r["consistency"]["p"]["early"]["per_trait_std"] == {"T1": pytest.approx(0.0), "T2": pytest.approx(2.0)}
    assert r["profiles"]["p"]["late"] == {"T1": pytest.approx(4.0), "T2": pytest.approx(4.0)}
    d = r["dynamic"]["p"]["early->late"]
    assert d["per_trait"] == {"T1": pytest.approx(1.0), "T2": pytest.approx(1.0)}
    assert d["l2"] == pytest.approx(np.sqrt(2))
    # q answers 1 everywhere: T1 = (1 + 5)/2 = 3, T2 = 1; p stage-mean: T1 (3+4)/2 = 3.5, T2 (3+4)/2 = 3.5
    assert r["distance"]["p|q"] == pytest.approx(np.hypot(0.5, 2.5))


def test_ipip50_item_file():
    doc = bigfive.load_items()
    assert len(doc["items"]) == 50 and len(doc["traits"]) == 5
    for t in doc["traits"]:
        its = [it for it in doc["items"] if it["trait"] == t]
        assert len(its) == 10
    keys = {t: sum(it["key"] == -1 for it in doc["items"] if it["trait"] == t) for t in doc["traits"]}
    assert keys == {"Extraversion": 5, "Agreeableness": 4, "Conscientiousness": 4, "Emotional Stability": 8,
                    "Intellect/Imagination": 3}
    assert bigfive.first_person("Am the life of the party.") == "I am the life of the party."
    assert bigfive.first_person("Don't talk a lot.") == "I don't talk a lot."


def test_bad_items_and_variants(tmp_path):
    f = tmp_path / "items.json"
    f.write_text(json.dumps({"items": [{"trait": "X", "key": 2, "text": "y"}]}))
    with pytest.raises(EvalError, match="key"):
        bigfive.load_items(str(f))
    with pytest.raises(EvalError, match="unknown"):
        bigfive.pick_variants(["nope"])
    with pytest.raises(EvalError, match="shape"):
        bigfive.administer(lambda c: np.zeros((len(c), 4)), {"p": {"name": "P", "stages": {"s": "1"}}},
                           {"items": ITEMS, "traits": ["T1", "T2"]})


def test_character_breaks():
    assert anti_induction.breaks_character("As an AI language model, I cannot have opinions.")
    assert anti_induction.breaks_character("I’m an assistant created to help.")
    assert anti_induction.breaks_character("I'm just a virtual assistant")
    assert anti_induction.breaks_character("That's because I'm a machine, and my mother was")
    assert not anti_induction.breaks_character("I am a mathematician, and the machine is my passion.")
    assert not anti_induction.breaks_character("No, that is wrong: I studied in France, not in America.")
    assert not anti_induction.breaks_character("My engine is an analytical model of thought.")
    assert anti_induction.break_rate(["As an AI, no.", "Nonsense, sir."]) == 0.5
    assert anti_induction.break_rate([]) is None


def test_judge_reply_parsing():
    assert precision.parse_class("Knowledge question") == "knowledge"
    assert precision.parse_class("This is an 'Attitude question'.") == "attitude"
    assert precision.parse_class("Neither.") == "neither"
    assert precision.parse_class("banana") is None and precision.parse_class(None) is None
    assert precision.parse_score("Score: 4") == 4
    assert precision.parse_score("I'd give it 3/5.") == 3
    assert precision.parse_score("**2**") == 2
    assert precision.parse_score("Score: 7") is None
    assert precision.parse_score("no idea") is None
    assert anti_induction.parse_yes_no("YES, it corrects it") is True
    assert anti_induction.parse_yes_no("No.") is False
    assert anti_induction.parse_yes_no("maybe") is None


def test_precision_weighted_averages():
    recs = [{"key": str(i), "id": str(i), "persona": p, "stage": s, "type": t, "class": c, "score": sc, "unparsable": u}
            for i, (p, s, t, c, sc, u) in enumerate([
                ("a", "early", "ordinary", "knowledge", 5, False), ("a", "early", "ordinary", "knowledge", 3, False),
                ("a", "late", "thought", "attitude", 2, False), ("b", "early", "error", "knowledge", 1, False),
                ("b", "early", "thought", "attitude", None, True), ("b", "late", "ordinary", "neither", None, False),
                ("b", "late", "ordinary", None, None, False)])]
    agg = precision.aggregate(recs)
    assert agg["knowledge"]["mean"] == pytest.approx(3.0) and agg["knowledge"]["n"] == 3
    assert agg["attitude"]["mean"] == pytest.approx(2.0) and agg["attitude"]["n"] == 1
    assert agg["overall"]["mean"] == pytest.approx(11 / 4)  # weighted by item count, not the mean of 3 and 2
    assert agg["overall"]["by_persona"]["a"]["mean"] == pytest.approx(10 / 3)
    assert agg["overall"]["by_stage"]["b/early"]["mean"] == pytest.approx(1.0)
    assert agg["knowledge"]["by_type"]["ordinary"]["mean"] == pytest.approx(4.0)
    assert (agg["unparsable_class"], agg["unparsable_score"], agg["neither"]) == (1, 1, 1)


def test_style_similarity_with_toy_embedder():
    vocab = ["engine", "numbers", "beetle", "finch", "radium"]

    def embed(texts):
        v = np.array([[t.lower().count(w) for w in vocab] for t in texts], np.float64) + 1e-9
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    words = {"ada": {"early": ["The engine weaves numbers."]}, "darwin": {"early": ["A beetle and a finch."]}}
    ans = [{"persona": "ada", "stage": "early", "text": "engine numbers"},
           {"persona": "darwin", "stage": "early", "text": "engine numbers"}]
    s = style.similarity(ans, words, embed)
    assert s["by_stage"]["ada/early"]["own"] == pytest.approx(1.0)
    assert s["by_stage"]["ada/early"]["own_minus_other"] == pytest.approx(1.0)
    assert s["by_stage"]["darwin/early"]["own_minus_other"] == pytest.approx(-1.0)
    with pytest.raises(EvalError):
        style.similarity(ans, {}, embed)


def test_persona_words_reads_subjective(tmp_path):
    d = tmp_path / "ada" / "early" / "subjective"
    d.mkdir(parents=True)
    (d / "a.txt").write_text("One.\n\nTwo.\n")
    (tmp_path / "ada" / "early" / "objective").mkdir()
    (tmp_path / "ada" / "early" / "objective" / "x.txt").write_text("fact")
    assert style.persona_words(tmp_path, "ada") == {"early": ["One.", "Two."]}


def test_corpus_checks(tmp_path):
    with pytest.raises(EvalError, match="no such corpus"):
        load_test(tmp_path / "nope")
    (tmp_path / "sft").mkdir()
    with pytest.raises(EvalError, match="test.jsonl"):
        load_test(tmp_path)
    f = tmp_path / "sft" / "test.jsonl"
    f.write_text("{bad\n")
    with pytest.raises(InputError, match=r"test\.jsonl:1:2: invalid JSON"):  # the shared JSONL reader's error
        load_test(tmp_path)
    f.write_text(json.dumps({"persona": "p", "stage": "s", "messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(EvalError, match="reference"):
        load_test(tmp_path)
    row = {"id": "p/s/1", "persona": "p", "stage": "s", "type": "error", "messages": [
        {"role": "system", "content": "You are Pat. Now it's 1900."}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "[Analysis] hmm [Response] No, that's wrong."}]}
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "g", "type": "general"}) + "\n")
    rows = load_test(tmp_path)
    assert [r["id"] for r in rows] == ["p/s/1"]
    assert persona_stages(rows) == {"p": {"name": "p", "stages": {"s": "1900"}}}
    assert response_part(rows[0]["messages"][-1]["content"]) == "No, that's wrong."


def _results(name, text):
    ans = [_ans("p", s, i, f"{text} {s} {i}", k) for s in ("early", "late") for i in range(2) for k in range(2)]
    return {"data": "c", "n_test_items": 4, "settings": {"samples": 2}, "personas": {"p": {"name": "P", "stages": {}}},
            "judge": None, "notes": {}, "systems": {name: {"kind": "run", "run_dir": None, "distinction": distinction.distinction(ans),
                                                          "anti_induction": {"n_error": 0, "break_rate_all": 0.0}}}}


def test_compare_merges_separate_evaluations(tmp_path):
    from persllm_jax.eval.evaluate import compare

    for name, text in (("base", A), ("sft", B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(name, text)))
    r = compare([str(tmp_path / "base"), str(tmp_path / "sft")], str(tmp_path / "both"), log=lambda m: None)
    assert list(r["systems"]) == ["base", "sft"]
    md = (tmp_path / "both" / "report.md").read_text()
    assert "| metric | base | sft |" in md
    assert (tmp_path / "both" / "distinction.png").read_bytes()[:4] == b"\x89PNG"
    other = _results("x", A)
    other["settings"] = {"samples": 3}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps(other))
    with pytest.raises(EvalError, match="settings differs"):
        compare([str(tmp_path / "base"), str(tmp_path / "x")], str(tmp_path / "o"))
    with pytest.raises(EvalError, match="appears twice"):
        compare([str(tmp_path / "base"), str(tmp_path / "base")], str(tmp_path / "o"))
    with pytest.raises(EvalError, match="no results.json"):
        compare([str(tmp_path)], str(tmp_path / "o"))
