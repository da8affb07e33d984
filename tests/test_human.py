"""`persllm eval human` on hand-built judgement sets with known win rates, Bradley-Terry order and agreement.
The sets are written through the real rating store (persllm_jax/web/rate.py), shown orders mixed."""

import itertools
import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from persllm_jax.eval import human
from persllm_jax.serve.web.rate import RateStore

WIN = {"first": "W", "second": "L", "tie": "T"}


def add(store, rater, prompt, winner, loser, result, criteria=("fidelity",), swap=False, n=[0]):
    """One judgement of `winner` vs `loser` with `result` in W (winner won) / L / T on the given criteria (ties on
    the others); `swap` shows the loser as A."""
    a, b = (loser, winner) if swap else (winner, loser)
    pick = {"W": "B" if swap else "A", "L": "A" if swap else "B", "T": "tie"}[result]
    choices = {c: (pick if c in criteria else "tie") for c in ("fidelity", "knowledge", "style")}
    aid = store.new_assignment(rater, prompt, a, b)
    n[0] += 1
    status, _ = store.record(f"j{n[0]}", aid, rater, choices, "")
    assert status == 200


@pytest.fixture
def known(tmp_path):
    """a beats b 6-2 (2 ties), b beats c 7-1 (2 ties), a beats c 9-1 on fidelity; knowledge is the reverse; style
    is all ties. Every other judgement is shown in the swapped order."""
    store = RateStore(tmp_path / "r.sqlite")
    k = itertools.count()
    for (w, l), (wins, losses, ties) in {("a", "b"): (6, 2, 2), ("b", "c"): (7, 1, 2), ("a", "c"): (9, 1, 0)}.items():
        for res in ["W"] * wins + ["L"] * losses + ["T"] * ties:
            i = next(k)
            add(store, f"r{i % 3}", f"p{i}", w, l, res, swap=i % 2 == 1)
            # knowledge: the same counts with winner and loser exchanged
            add(store, f"r{i % 3}", f"q{i}", l, w, res, criteria=("knowledge",), swap=i % 2 == 0)
    return tmp_path / "r.sqlite"


def test_win_rates_and_bradley_terry_order(known):
    rows = human.load_judgements(known)
    assert len(rows) == 60
    wr = human.win_rates(rows)
    fid = wr["fidelity"]
    # judgements of the knowledge set are ties on fidelity, so each fidelity pair holds 20 rows: 10 + 10 ties
    assert fid["a vs b"]["wins"] == 6 and fid["a vs b"]["losses"] == 2 and fid["a vs b"]["ties"] == 12
    assert fid["a vs b"]["win_rate"] == pytest.approx((6 + 12 / 2) / 20)
    assert fid["b vs c"]["win_rate"] == pytest.approx((7 + 12 / 2) / 20)
    assert fid["a vs c"]["win_rate"] == pytest.approx((9 + 10 / 2) / 20)
    kn = wr["knowledge"]
    assert kn["a vs b"]["win_rate"] == pytest.approx(1 - fid["a vs b"]["win_rate"])
    assert all(v["win_rate"] == 0.5 and v["ties"] == v["n"] for v in wr["style"].values())
    for v in fid.values():
        lo, hi = v["ci"]
        assert lo < v["win_rate"] < hi and 0 <= lo and hi <= 1
    bt = {c: human.bradley_terry(rows, c) for c in human.CRITERIA}
    assert bt["fidelity"]["a"] > bt["fidelity"]["b"] > bt["fidelity"]["c"]
    assert bt["knowledge"]["c"] > bt["knowledge"]["b"] > bt["knowledge"]["a"]
    assert all(abs(v) < 1e-9 for v in bt["style"].values())
    assert sum(bt["fidelity"].values()) == pytest.approx(0, abs=1e-9)


def test_win_rate_only_counts_the_models_not_the_side(tmp_path):
    """x always wins, shown as A half of the time and as B the other half: a win rate of 1, not 0.5."""
    store = RateStore(tmp_path / "r.sqlite")
    for i in range(8):
        add(store, "r", f"p{i}", "x", "y", "W", criteria=("fidelity", "knowledge", "style"), swap=i % 2 == 0)
    wr = human.win_rates(human.load_judgements(tmp_path / "r.sqlite"))
    assert all(wr[c]["x vs y"]["win_rate"] == 1.0 and wr[c]["x vs y"]["ci"] == [1.0, 1.0] for c in human.CRITERIA)


def test_bootstrap_interval_narrows_with_data_and_is_seeded():
    def rows(n_win, n_loss):
        return [{"model_a": "x", "model_b": "y", "fidelity": "A", "knowledge": "A", "style": "A"}] * n_win + \
               [{"model_a": "y", "model_b": "x", "fidelity": "A", "knowledge": "A", "style": "A"}] * n_loss

    small = human.win_rates(rows(7, 3))["fidelity"]["x vs y"]
    big = human.win_rates(rows(700, 300))["fidelity"]["x vs y"]
    assert small["win_rate"] == big["win_rate"] == pytest.approx(0.7)
    assert (big["ci"][1] - big["ci"][0]) < (small["ci"][1] - small["ci"][0]) / 5
    # the normal approximation of a proportion's 95% interval: ±1.96·sqrt(.21/1000) ≈ ±0.028
    assert big["ci"][0] == pytest.approx(0.7 - 0.0284, abs=0.006) and big["ci"][1] == pytest.approx(0.7 + 0.0284, abs=0.006)
    assert human.win_rates(rows(7, 3), seed=3) == human.win_rates(rows(7, 3), seed=3)


def test_bradley_terry_recovers_known_strengths_and_is_the_mle():
    """Judgements sampled from known strengths: the fit recovers them and maximises the likelihood."""
    from scipy.optimize import minimize

    rng = random.Random(0)
    true = {"m0": 1.0, "m1": 0.3, "m2": -0.2, "m3": -1.1}
    rows = []
    for _ in range(4000):
        x, y = rng.sample(sorted(true), 2)
        p = 1 / (1 + np.exp(true[y] - true[x]))
        rows.append({"model_a": x, "model_b": y, "fidelity": "A" if rng.random() < p else "B"})
    fit = human.bradley_terry(rows, "fidelity", prior=0.0)
    for m in true:
        assert fit[m] == pytest.approx(true[m], abs=0.12), (fit, true)
    assert sorted(fit, key=fit.get) == sorted(true, key=true.get)
    models = sorted(true)
    idx = {m: i for i, m in enumerate(models)}
    W = np.zeros((4, 4))
    for r in rows:
        i, j = idx[r["model_a"]], idx[r["model_b"]]
        (W.__setitem__((i, j), W[i, j] + 1) if r["fidelity"] == "A" else W.__setitem__((j, i), W[j, i] + 1))

    def nll(t):
        d = t[:, None] - t[None, :]
        return -(W * (d - np.logaddexp(0, d))).sum()

    opt = minimize(nll, np.zeros(4), method="BFGS").x
    opt -= opt.mean()
    assert np.allclose([fit[m] for m in models], opt, atol=1e-4)


def test_a_model_that_never_wins_stays_finite():
    rows = [{"model_a": "x", "model_b": "y", "fidelity": "A"}] * 5
    bt = human.bradley_terry(rows, "fidelity")
    assert np.isfinite(list(bt.values())).all() and bt["x"] > bt["y"]


def test_agreement_cohen_kappa_by_hand(tmp_path):
    """Two raters on four items; r2 always sees the pair in the other order. Outcomes (first model of the sorted
    pair): r1 = first, first, second, tie; r2 = first, second, second, tie: po = 3/4, pe = 5/16, kappa = 7/11."""
    store = RateStore(tmp_path / "r.sqlite")
    r1, r2 = ["W", "W", "L", "T"], ["W", "L", "L", "T"]
    for i, (a, b) in enumerate(zip(r1, r2)):
        add(store, "r1", f"p{i}", "m1", "m2", a, swap=False)
        add(store, "r2", f"p{i}", "m1", "m2", b, swap=True)
    add(store, "r3", "p9", "m1", "m2", "W")  # judged by one rater only: not an agreement item
    ag = human.agreement(human.load_judgements(tmp_path / "r.sqlite"))
    assert ag["items"] == 4 and ag["raters"] == 2
    assert ag["fidelity"]["pairs"] == 4 and ag["fidelity"]["percent_agreement"] == 0.75
    assert ag["fidelity"]["kappa"] == pytest.approx(7 / 11)
    assert ag["style"]["kappa"] is None and ag["style"]["percent_agreement"] == 1.0  # all ties: chance agreement 1
    assert human.cohen_kappa([("first", "second"), ("second", "first")]) == pytest.approx(-1.0)


def test_cli_writes_json_markdown_plot_and_report_section(known, tmp_path):
    from PIL import Image

    from persllm_jax.cli import main
    from persllm_jax.eval import report

    out = tmp_path / "eval"
    out.mkdir()
    # an eval output directory: the human section joins its report
    results = {"data": "corpus", "n_test_items": 0, "settings": {"samples": 1}, "judge": None,
               "systems": {"base": {"distinction": {"average": {"intra": 1.0, "stage": 1.0, "inter": 1.0,
                                                                "intra_minus_stage": 0.0}, "per_persona": {}}}}}
    results["plots"] = report.write(results, out)
    (out / "results.json").write_text(json.dumps(results))
    assert "Human evaluation" not in (out / "report.md").read_text()
    r = CliRunner().invoke(main, ["eval", "human", "--db", str(known), "--out", str(out), "--bootstrap", "500"])
    assert r.exit_code == 0, r.output
    h = json.loads((out / "human.json").read_text())
    assert h["n_judgements"] == 60 and h["models"] == ["a", "b", "c"] and h["raters"] == 3
    assert h["win_rates"]["fidelity"]["a vs c"]["win_rate"] == pytest.approx(0.7)
    md = (out / "report.md").read_text()
    assert "## Human evaluation" in md and "| persona fidelity | a vs c | 20 | 9 / 1 / 10 | 0.70" in md
    assert "human.png" in json.loads((out / "results.json").read_text())["plots"]
    img = np.asarray(Image.open(out / "human.png").convert("RGB"))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    r = CliRunner().invoke(main, ["eval", "human", "--db", str(tmp_path / "none.sqlite"), "--out", str(out)])
    assert r.exit_code != 0 and "no such file" in r.output
    empty = tmp_path / "empty.sqlite"
    RateStore(empty)
    r = CliRunner().invoke(main, ["eval", "human", "--db", str(empty), "--out", str(out)])
    assert r.exit_code != 0 and "no judgements" in r.output
