"""Progress bars on stderr for the long phases: `persllm eval` (answers, Big Five; off with --no-progress) and
the annotator's probe requests (`persllm data probes`)."""

from pathlib import Path

from click.testing import CliRunner

from data_gen import probes
from data_gen.backends import Result
from persllm_jax.cli import main
from talk_fixtures import make_model
from test_eval_cli import write_test_corpus

DEMO = Path(__file__).resolve().parents[1] / "data_gen" / "personas"


class FakeAnnotator:
    """A data_gen backend that answers every probe request with a well-formed tagged probe."""

    identity = {"model": "fake"}

    def __init__(self):
        self.n = 0

    def run(self, reqs, done):
        for r in reqs:
            self.n += 1
            done(r, Result(f"[question] q {r.key}? [consistent] yes {r.key} [inconsistent] no {r.key}"))

    def close(self):
        pass


def test_annotator_probes_show_a_bar_over_requests(capsys):
    backend = FakeAnnotator()
    rows, rejected = probes.build_probes(DEMO, "annotator", backend, max_per_cell=1, max_future_per_cell=1,
                                         progress=True)
    err = capsys.readouterr().err
    assert rows and not rejected and "probes" in err and f"{backend.n}/{backend.n}" in err
    probes.build_probes(DEMO, "annotator", FakeAnnotator(), max_per_cell=1, max_future_per_cell=1)
    assert capsys.readouterr().err == ""  # the library default: silent


def test_eval_bars_and_no_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSLLM_XLA_CACHE", "0")
    model = make_model(tmp_path / "model")
    corpus = write_test_corpus(tmp_path / "corpus")
    args = ["eval", "--model", str(model), "--data", str(corpus), "--personas", str(corpus / "personas"),
            "--set", "samples=1", "--set", "max_new_tokens=2", "--set", "style.enabled=false",
            "--set", "timeline.enabled=false", "--set", "bigfive.max_items=2", "--set", "bigfive.variants=[describe]"]
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "on")])
    assert res.exit_code == 0, res.output
    assert "eval base+prompt: answers" in res.stderr and "8/8" in res.stderr  # 8 test items x 1 sample
    assert "eval base+prompt: Big Five" in res.stderr
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "off"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "answers:" not in res.stderr and "Big Five:" not in res.stderr and "eval: wrote" in res.stderr
