"""Point-in-time probes and their scoring, on known answers: the offline builder on the demo personas (>= 20 per
persona over the four kinds, each traceable to its paragraph), file:line errors for bad probe files, the TimeChara
importer, judge-free scores of 1.0 / 0.0 for scorers (a fake one at the function boundary, and a tiny model trained
a few steps) that prefer the consistent / the inconsistent answers, a fixed-judgement server's accuracy with
unparsable replies counted, and premise calibration falling for a persona that refuses every premise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_gen import probes
from data_gen.errors import DataGenError
from data_gen.materials import load_personas, read_paragraphs
from data_gen.timechara import load_any, read_timechara
from fake_openai import FakeOpenAI
from persllm_jax.eval import timeline

DEMO = Path(__file__).resolve().parents[1] / "data_gen" / "personas"


@pytest.fixture(scope="module")
def demo_probes():
    return probes.build_probes(str(DEMO))[0]


def test_offline_builder_on_demo_personas(demo_probes):
    by = probes.summary(demo_probes)
    assert set(by) == {"ada_lovelace", "charles_darwin", "marie_curie"}
    for persona, kinds in by.items():
        assert sum(kinds.values()) >= 20, (persona, kinds)
        assert set(probes.TIME_KINDS) <= set(kinds), (persona, kinds)
    personas = {p.key: p for p in load_personas(DEMO)}
    for r in demo_probes:
        assert probes.check_probe(r) == []
        src = r["source"]
        paras = read_paragraphs(DEMO / src["file"])
        assert paras[src["paragraph"]] == (src["line"], src["text"]), r["id"]  # the paragraph, at that line
        assert src["sentence"] in src["text"] and src["sentence"] in r["question"]
        assert src["file"].split("/")[:3] == [r["persona"], r["fact_stage"], "objective"]
        order = [s.id for s in personas[r["persona"]].stages]
        later = order.index(r["fact_stage"]) > order.index(r["stage"])
        assert later == (r["kind"] == "future")
    future = next(r for r in demo_probes if r["kind"] == "future")
    assert future["source"]["sentence"] in future["inconsistent"][0]  # the leaking answer recounts the fact
    assert len({r["id"] for r in demo_probes}) == len(demo_probes)


def test_probes_cli_writes_a_readable_file(tmp_path):
    from click.testing import CliRunner

    from persllm_jax.cli.data import data

    out = tmp_path / "probes.jsonl"
    res = CliRunner().invoke(data, ["probes", "--personas", str(DEMO), "--out", str(out), "--max-per-cell", "2",
                                    "--max-future-per-cell", "4"])
    assert res.exit_code == 0, res.output
    rows = probes.read_probes(out)
    assert "ada_lovelace:" in res.output and len(rows) == sum(1 for _ in out.open())
    assert max(sum(1 for r in rows if (r["persona"], r["kind"], r["stage"], r["fact_stage"]) == c)
               for c in {(r["persona"], r["kind"], r["stage"], r["fact_stage"]) for r in rows}) <= 4


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_probe_files_name_file_and_line(tmp_path, demo_probes):
    good = demo_probes[:2]
    cases = [
        ([good[0], "{not json", good[1]], r"bad\.jsonl:2:\d+: invalid JSON"),
        ([good[0], good[1], {k: v for k, v in good[0].items() if k != "consistent"} | {"id": "x"}],
         r"bad\.jsonl:3: missing key 'consistent'"),
        ([good[0], {**good[1], "kind": "sideways"}], r"bad\.jsonl:2: kind 'sideways' is not one of"),
        ([good[0], {**good[1], "inconsistent": []}], r"bad\.jsonl:2: key 'inconsistent' must hold"),
        ([good[0], "", {**good[0]}], r"bad\.jsonl:3: duplicate id .* \(first on line 1\)"),
    ]
    for rows, pattern in cases:
        with pytest.raises(DataGenError, match=pattern):
            probes.read_probes(_write(tmp_path / "bad.jsonl", rows))
    with pytest.raises(DataGenError, match="no probes"):
        probes.read_probes(_write(tmp_path / "bad.jsonl", []))


TIMECHARA_ROWS = [
    {"series": "harry_potter", "data_type": "future", "question_generation": "fact_structured",
     "event_summary": "Harry fights the dragon in the first task.", "question": "Tell me your feelings when you fought the dragon.",
     "question_period": "Book4-chapter20", "fake_method": "-", "participants": ["Harry Potter"],
     "character": "Hermione Granger", "character_period": "1st-year / on Christmas",
     "temporal_label": "Future: Hermione should not be aware of the first task.", "spatial_label": "-",
     "gold_response": "A dragon? I have no idea what you mean."},
    {"series": "harry_potter", "data_type": "past-absence", "question_generation": "fact_structured",
     "event_summary": "Harry meets Hagrid in the hut.", "question": "Describe your experience when Harry met Hagrid.",
     "question_period": "Book1-chapter4", "fake_method": "-", "participants": ["Harry Potter", "Hagrid"],
     "character": "Hermione Granger", "character_period": "7th-year",
     "temporal_label": "Past: Hermione may know of it.", "spatial_label": "Absence: Hermione was not there."},
]


def test_timechara_importer(tmp_path):
    as_list = tmp_path / "tc.json"
    as_list.write_text(json.dumps(TIMECHARA_ROWS, indent=2))
    as_lines = _write(tmp_path / "tc.jsonl", TIMECHARA_ROWS)
    for f in (as_list, as_lines):
        rows, fmt = load_any(f)
        assert fmt == "timechara" and [r["kind"] for r in rows] == ["future", "past-absence"]
        fut, absent = rows
        assert fut["persona"] == "Hermione Granger" and fut["stage"] == "1st-year / on Christmas"
        assert fut["fact_stage"] == "Book4-chapter20" and "spatial" not in fut
        assert fut["consistent"] == probes.DONT_KNOW and "dragon" in fut["inconsistent"][0]
        assert fut["fact"].startswith("Future:") and fut["reference"].startswith("A dragon")
        assert absent["spatial"] == "Absence: Hermione was not there." and absent["consistent"] == probes.NOT_THERE
        assert fut["system"] == "You are Hermione Granger. Now it's 1st-year / on Christmas."
        assert all(probes.check_probe(r) == [] for r in rows)
    bad = _write(tmp_path / "bad.jsonl", [TIMECHARA_ROWS[0], {**TIMECHARA_ROWS[1], "data_type": "someday"}])
    with pytest.raises(DataGenError, match=r"bad\.jsonl:2: data_type 'someday'"):
        read_timechara(bad)


def _by_question(rows):
    return {tuple(m["content"] for m in timeline.conversation(p, {})): p for p in rows}


def fake_scorer(prefer: str, rows):
    """Scores an answer 0 when it is the preferred one for its probe, -5 otherwise."""
    q = _by_question(rows)

    def fn(convs, answers):
        out = []
        for c, a in zip(convs, answers):
            p = q[tuple(m["content"] for m in c)]
            want = {"consistent": a == p["consistent"], "inconsistent": a in p["inconsistent"],
                    "no": a.startswith("No"), "yes": a.startswith("Yes")}[prefer]
            out.append(0.0 if want else -5.0)
        return np.array(out)
    return fn


def _convs(rows):
    return [timeline.conversation(p, {}) for p in rows]


def test_fake_scorer_known_answers(demo_probes):
    order = {p.key: [s.id for s in p.stages] for p in load_personas(DEMO)}
    good = timeline.summarise(timeline.score_free(fake_scorer("consistent", demo_probes), demo_probes, _convs(demo_probes)), order)
    bad = timeline.summarise(timeline.score_free(fake_scorer("inconsistent", demo_probes), demo_probes, _convs(demo_probes)), order)
    for k in probes.TIME_KINDS:
        assert good["per_kind"][k]["accuracy"] == 1.0 and bad["per_kind"][k]["accuracy"] == 0.0
        assert good["per_kind"][k]["ci95"] == [1.0, 1.0]
    assert good["overall"]["n"] == len(demo_probes)
    cells = good["leakage"]["cells"]
    assert good["leakage"]["stages"] == ["early", "late"]
    assert cells["early"]["late"]["claims"] == 0.0 and cells["early"]["early"]["claims"] == 1.0
    assert cells["late"]["early"]["claims"] == 1.0 and cells["late"]["late"]["claims"] == 1.0
    assert bad["leakage"]["cells"]["early"]["late"]["claims"] == 1.0  # the leaking model claims the future
    assert bad["leakage"]["per_persona"]["ada_lovelace"]["cells"]["late"]["early"]["claims"] == 0.0
    assert good["contrasts"]["future"]["accuracy"] == 1.0 and bad["contrasts"]["future"]["accuracy"] == 0.0
    assert good["contrasts"]["presence"]["accuracy"] == 1.0 and bad["contrasts"]["presence"]["accuracy"] == 0.0
    assert good["contrasts"]["future"]["n"] > 0 and good["contrasts"]["presence"]["n"] > 0


def test_contrasts_cancel_an_answer_template_prior(demo_probes):
    """A scorer that likes some answer texts whatever the stage (a copied fact, "No, I was not there") decides
    every per-kind accuracy by the templates alone; the stage contrasts see through it: 0.5, the stage ignored."""
    def prior(convs, answers):
        return [(1.0 if a.startswith(("Yes, I know", "No, I was not")) else 0.0) + 0.01 * len(a) for a in answers]

    order = {p.key: [s.id for s in p.stages] for p in load_personas(DEMO)}
    res = timeline.summarise(timeline.score_free(prior, demo_probes, _convs(demo_probes)), order)
    assert res["per_kind"]["future"]["accuracy"] == 0.0 and res["per_kind"]["past-only"]["accuracy"] == 1.0
    assert res["per_kind"]["past-absence"]["accuracy"] == 1.0 and res["per_kind"]["past-presence"]["accuracy"] == 0.0
    assert res["contrasts"]["future"]["accuracy"] == 0.5 and res["contrasts"]["presence"]["accuracy"] == 0.5
    # the eval's per-cell cap keeps the pairs: one probe per cell, and every persona's future probe has its
    # past-only twin (same question, asked at the fact's stage)
    capped = timeline._capped(demo_probes, 1)
    futures = [r for r in capped if r["kind"] == "future"]
    assert futures and len(capped) < len(demo_probes)
    assert all(any(o["kind"] == "past-only" and o["persona"] == f["persona"] and o["question"] == f["question"]
                   for o in capped) for f in futures)


def _premise_probes():
    personas = {p.key: p for p in load_personas(DEMO)}
    errors = [{"id": f"ada/early/{i}", "persona": "ada_lovelace", "stage": "early", "question": q, "seed": None}
              for i, q in enumerate(["Why did you sail to America in 1830?", "How was your wedding to Babbage?"])]
    return probes.controls_for(personas, errors)


def test_controls_are_matched_true_premises():
    rows = _premise_probes()
    assert [r["kind"] for r in rows] == ["error", "control"] * 2
    err, ctl = rows[2], rows[3]
    assert ctl["error_id"] == err["error_id"] == "ada/early/1" and ctl["stage"] == "early"
    assert ctl["consistent"] == probes.ACCEPT and err["consistent"] == probes.REFUSE
    assert "Babbage" in ctl["question"] and ctl["source"]["file"].startswith("ada_lovelace/early/objective/")


def test_over_refusal_falls_for_a_persona_that_refuses_every_premise():
    rows = _premise_probes()
    calibrated = timeline.summarise(timeline.score_free(fake_scorer("consistent", rows), rows, _convs(rows)))["premise"]
    refuser = timeline.summarise(timeline.score_free(fake_scorer("no", rows), rows, _convs(rows)))["premise"]
    believer = timeline.summarise(timeline.score_free(fake_scorer("yes", rows), rows, _convs(rows)))["premise"]
    assert calibrated == {"refute_rate": 1.0, "n_error": 2, "over_refusal_rate": 0.0, "n_control": 2, "calibration": 1.0}
    assert (refuser["refute_rate"], refuser["over_refusal_rate"], refuser["calibration"]) == (1.0, 1.0, 0.5)
    assert (believer["refute_rate"], believer["over_refusal_rate"], believer["calibration"]) == (0.0, 0.0, 0.5)


def test_parse_judgement():
    assert timeline.parse_judgement("The answer reveals the future.\nScore:\n0") == 0
    assert timeline.parse_judgement("Fine.\n1") == 1
    assert timeline.parse_judgement("reasoning 1 then\nfinal: 0") == 0
    assert timeline.parse_judgement("YES") == 1
    assert timeline.parse_judgement("I cannot tell.") is None and timeline.parse_judgement("") is None and timeline.parse_judgement(None) is None
    assert timeline.parse_judgement("score 0.5") is None


def fixed_judgement(messages) -> str:
    """0/1 decided by a marker in the answer to judge; GARBLE -> an unparsable reply; SPATIAL0 -> the spatial fact
    fails."""
    p = messages[-1]["content"]
    answer = p.split("[Interview]", 1)[1].split("[Fact]", 1)[0]
    if "GARBLE" in answer:
        return "Hmm, hard to say."
    if "SPATIAL0" in answer and "took part" in p.split("[Fact]", 1)[1]:
        return "They claim otherwise.\n0"
    return "Reasoning step by step.\n" + ("1" if "GOOD" in answer else "0")


def test_fixed_judgement_server_gives_the_told_accuracy(tmp_path, monkeypatch, demo_probes):
    from persllm_jax.eval.precision import Judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    fut = [p for p in demo_probes if p["kind"] == "future"][:4]
    pres = [p for p in demo_probes if p["kind"] == "past-presence"][:3]
    chosen = fut + pres
    answers = ["GOOD", "GOOD", "BAD", "GARBLE", "GOOD", "GOOD SPATIAL0", "BAD"]
    with FakeOpenAI(answer=fixed_judgement) as fake:
        judge = Judge("openai:fixed", fake.url, tmp_path / "cache", {"retries": 1, "backoff_base": 0.01, "max_tokens": 64})
        recs = timeline.judge_answers(judge, "sys", chosen, answers)
        sent = len(fake.bodies)
        assert sent == 4 + 2 * 3  # presence probes are judged on the spatial and the temporal fact
        timeline.judge_answers(judge, "sys", chosen, answers)
        assert len(fake.bodies) == sent  # cached
        judge.close()
    s = timeline.summarise(recs, key="consistent")
    assert [r["consistent"] for r in recs] == [1, 1, 0, None, 1, 0, 0]
    assert s["per_kind"]["future"] == {"accuracy": pytest.approx(2 / 3), "n": 3, "ci95": s["per_kind"]["future"]["ci95"]}
    assert s["per_kind"]["past-presence"]["accuracy"] == pytest.approx(1 / 3)
    assert sum(r["unparsable"] for r in recs) == 1 and not any(r["failed"] for r in recs)


def _train_to_prefer(gen, convs, targets, steps=60, lr=3e-3):
    """A few full-parameter Adam steps on -log p(target | conversation) (answer tokens only)."""
    import jax
    import jax.numpy as jnp
    import optax

    from persllm_jax.model.decoder import forward

    seqs, masks = [], []
    for c, t in zip(convs, targets):
        p = gen.encode_chat(c)
        a = gen.tokenizer(t, add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    L = max(map(len, seqs))
    toks = jnp.asarray([s + [0] * (L - len(s)) for s in seqs], jnp.int32)
    mask = jnp.asarray([m + [0] * (L - len(m)) for m in masks], jnp.float32)
    seg = jnp.asarray([[1] * len(s) + [0] * (L - len(s)) for s in seqs], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), toks.shape)
    params = {**gen.params, "layers": jax.tree.map(lambda *x: jnp.stack(x), *gen.params["layers"])}

    def loss(params):
        logits = forward(params, gen.cfg, toks, pos, seg)
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        tok = jnp.take_along_axis(lp, toks[:, 1:, None], -1)[..., 0]
        return -(tok * mask[:, 1:]).sum() / mask.sum()

    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        val, g = jax.value_and_grad(loss)(params)
        upd, state = opt.update(g, state)
        return optax.apply_updates(params, upd), state, val

    for _ in range(steps):
        params, state, val = step(params, state)
    from persllm_jax.serve.engine import Generator

    return Generator(gen.cfg, params, gen.tokenizer), float(val)


@pytest.mark.slow
def test_tiny_model_trained_to_prefer_consistent_or_leaking_answers(tmp_path, demo_probes):
    """The real scorer (generation engine likelihoods) on a tiny model trained a few steps: 1.0 when trained on
    the consistent answers, 0.0 when trained on the inconsistent (leaking) ones."""
    from persllm_jax.serve.engine import Generator
    from talk_fixtures import make_model

    chosen = [[p for p in demo_probes if p["kind"] == k][i] for k in probes.TIME_KINDS for i in (0, 7)]
    gen = Generator.load(str(make_model(tmp_path / "m", seed=2)))
    convs = _convs(chosen)
    for target, want in (("consistent", 1.0), ("inconsistent", 0.0)):
        answers = [p["consistent"] if target == "consistent" else p["inconsistent"][0] for p in chosen]
        trained, final_loss = _train_to_prefer(gen, convs, answers, steps=40, lr=1e-2)
        s = timeline.summarise(timeline.score_free(timeline.free_scorer(trained, batch_size=4), chosen, convs))
        assert s["overall"]["accuracy"] == want, (target, s["per_kind"])
        assert {k: s["per_kind"][k]["accuracy"] for k in probes.TIME_KINDS} == {k: want for k in probes.TIME_KINDS}


def test_eval_reports_point_in_time_section(tmp_path, monkeypatch, demo_probes):
    """`persllm eval --probes` on a tiny model with a fixed-judgement server: judge-free and judged results per
    kind, the leakage matrix, the report section and its plot."""
    from click.testing import CliRunner

    from persllm_jax.cli import main
    from talk_fixtures import make_model
    from test_eval_cli import write_test_corpus

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    corpus = write_test_corpus(tmp_path / "corpus", personas=("ada_lovelace",))
    chosen = [p for k in probes.TIME_KINDS for p in demo_probes if p["kind"] == k and p["persona"] == "ada_lovelace"][::9]
    pf = _write(tmp_path / "probes.jsonl", chosen)
    conf = tmp_path / "eval.yaml"
    conf.write_text("samples: 1\nmax_new_tokens: 4\nbigfive: {enabled: false}\nstyle: {enabled: false}\n"
                    "judge: {retries: 1, backoff_base: 0.01}\ntimeline: {max_new_tokens: 4, bootstrap: 200}\n")
    model = make_model(tmp_path / "model")
    with FakeOpenAI(answer=fixed_judgement) as fake:
        res = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(corpus), "--out", str(tmp_path / "ev"),
                                        "--config", str(conf), "--probes", str(pf), "--judge", "openai:fixed",
                                        "--base-url", fake.url])
    assert res.exit_code == 0, res.output + repr(res.exception)
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["timeline"]["sources"][0]["n"] == len(chosen) and r["timeline"]["sources"][0]["format"] == "persllm-probes"
    tl = r["systems"]["base+prompt"]["timeline"]
    assert sum(v["n"] for v in tl["free"]["per_kind"].values()) == len(chosen)
    assert set(tl["free"]["per_kind"]) == set(probes.TIME_KINDS)
    assert tl["judged"]["overall"]["accuracy"] == 0.0  # the tiny model never says GOOD: every verdict is 0
    assert tl["judged"]["unparsable"] == 0 and tl["judged"]["overall"]["n"] == len(chosen)
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "## Point-in-time consistency" in md and "| asked \\ fact | early | late |" in md
    assert "timeline.png" in r["plots"] and (tmp_path / "ev" / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_with_a_bad_probe_file_fails_fast_naming_file_and_line(tmp_path, demo_probes):
    """A bad --probes file is a one-line error naming file:line, raised before any model loads (the model path
    here does not exist) and before anything is written."""
    from click.testing import CliRunner

    from persllm_jax.cli import main
    from test_eval_cli import write_test_corpus

    corpus = write_test_corpus(tmp_path / "corpus", personas=("ada_lovelace",))
    bad = _write(tmp_path / "probes.jsonl", [demo_probes[0], {**demo_probes[1], "kind": "sideways"}])
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(corpus),
                                    "--out", str(tmp_path / "ev"), "--probes", str(bad)])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit)  # a clean exit, no traceback
    assert f"{bad}:2: kind 'sideways' is not one of" in res.output
    assert not (tmp_path / "ev" / "results.json").exists()
