"""The export's model card as the Hub reads it (huggingface_hub.ModelCard.load round-trips base_model, license,
language, tags, datasets, model-index), and the push against a fake HfApi with the token from a fake
`hf auth login` store: that token is used, and appears in no file written and no output."""

import json
from pathlib import Path

import pytest
from chat_fixtures import tiny_model_dir, write_corpus
from click.testing import CliRunner
from export_runs import random_adapter, write_run

from persllm_jax import runs
from persllm_jax.cli import main
from persllm_jax.export import hub, model_card
from persllm_jax.model.weights import load_model

TOKEN = "hf_STOREDtoken0123456789secretABC"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model = tiny_model_dir(root / "model")
    (model / "README.md").write_text("---\nlicense: llama3.2\ntags: [base]\n---\n# base\n")
    corpus = write_corpus(root / "corpus", n=4, seed=1)
    (corpus / "manifest.json").write_text(json.dumps({"personas": {
        "harry": {"name": "Harry Potter", "language": "en", "stages": [{"id": "y1", "label": "first year"}]},
        "heidi": {"name": "Heidi", "language": "de", "stages": [{"id": "k", "label": "Kind"}]}}}))
    ad = random_adapter(load_model(str(model)).cfg, 2, seed=3)
    run = write_run(root / "run", model, ad, alpha=4.0, data=str(corpus / "sft" / "train.jsonl"))
    ev = root / "eval"
    ev.mkdir()
    systems = {"base": {"kind": "base", "distinction": {"average": {"inter": 0.5}}},
               "SFT": {"kind": "run", "run_dir": str(run), "distinction": {"average": {"inter": 0.25, "intra": 0.4}},
                       "anti_induction": {"break_rate_all": 0.1, "refute_rate": None}}}
    (ev / "results.json").write_text(json.dumps({"systems": systems, "timings_s": {"all": 3.0}}))
    return {"root": root, "model": model, "run": run, "eval": ev}


@pytest.fixture
def login_store(tmp_path, monkeypatch):
    """HF_HOME in tmp_path with the token file `hf auth login` writes; no HF_TOKEN in the environment."""
    import huggingface_hub.constants as c

    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "token").write_text(TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(home / "token"))  # huggingface_hub reads HF_HOME at import
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def fake_api(monkeypatch):
    """HfApi's create_repo / upload_folder / upload_large_folder record their calls (and the token used)."""
    from huggingface_hub import HfApi

    calls = []

    def recorder(name, result):
        def method(self, *args, **kw):
            calls.append({"method": name, "token": self.token, "args": args, "kw": kw,
                          "files": sorted(p.name for p in Path(kw.get("folder_path", ".")).iterdir())
                          if "folder_path" in kw else None})
            return result
        return method

    commit = type("CommitInfo", (), {"commit_url": "https://hub.test/acme/harry/commit/1"})()
    monkeypatch.setattr(HfApi, "create_repo", recorder("create_repo", "https://hub.test/acme/harry"))
    monkeypatch.setattr(HfApi, "upload_folder", recorder("upload_folder", commit))
    return calls, recorder


def test_card_round_trips_through_modelcard_load(run, tmp_path, login_store, fake_api):
    from huggingface_hub import ModelCard

    calls, _ = fake_api
    res = CliRunner().invoke(main, ["export", "--run", str(run["run"]), "--out", str(tmp_path / "out"),
                                    "--eval", str(run["eval"]), "--push-to-hub", "acme/harry", "--no-progress"])
    assert res.exit_code == 0, res.output
    card = ModelCard.load(tmp_path / "out" / "README.md")
    d = card.data
    assert d.license == "llama3.2" and d.language == ["en", "de"] and d.library_name == "transformers"
    assert d.base_model is None  # a local base without a Hub id: no base_model (its path stays in the body)
    assert {"persllm", "persona", "sft", "lora"} <= set(d.tags)
    assert d.model_name == "acme/harry"
    got = {r.metric_type: r.metric_value for r in d.eval_results}
    assert got == {"bleu_inter": 0.25, "bleu_intra": 0.4, "break_rate": 0.1}  # this run's system, not the base's
    assert all(r.task_type == "text-generation" and r.dataset_name == "corpus" for r in d.eval_results)
    assert "model-index" in d.to_dict()
    assert 'from_pretrained("acme/harry")' in card.text and "THIS_REPO" not in card.content
    # the push: create_repo then upload_folder, with the stored token, the card already naming the repo
    assert [c["method"] for c in calls] == ["create_repo", "upload_folder"]
    assert all(c["token"] == TOKEN for c in calls)
    assert "README.md" in calls[1]["files"] and "pushed to acme/harry" in res.output
    assert TOKEN not in res.output
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.parent != login_store:
            assert TOKEN.encode() not in p.read_bytes(), p


def test_card_for_a_hub_base_and_hub_dataset(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # the id is not cached: the local source loads
    ad = random_adapter(load_model(str(run["model"])).cfg, 2, seed=4)
    r = write_run(tmp_path / "r", run["model"], ad, data="acme/persona-corpus",
                  extra={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    chain = runs.load_chain(r)
    data = model_card.card_data(chain, "peft", ["SFT"], None, {}, "t")
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.datasets == ["acme/persona-corpus"]
    assert data.language == "en" and data.library_name == "peft" and data.eval_results is None


def test_no_token_anywhere_is_one_line_naming_hf_auth_login(run, tmp_path, login_store):
    (login_store / "token").unlink()
    res = CliRunner().invoke(main, ["export", "--run", str(run["run"]), "--out", str(tmp_path / "o"),
                                    "--push-to-hub", "acme/x"])
    assert res.exit_code == 1 and "hf auth login" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()  # checked before the export work


def test_big_exports_use_upload_large_folder_where_it_exists(tmp_path, login_store, fake_api, monkeypatch):
    from huggingface_hub import HfApi

    calls, recorder = fake_api
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.safetensors").write_bytes(b"0" * 100)
    hub.push(tmp_path / "x", "acme/big", large_folder_bytes=10)  # huggingface_hub >= 1: upload_folder batches
    monkeypatch.setattr(HfApi, "upload_large_folder", recorder("upload_large_folder", None), raising=False)
    hub.push(tmp_path / "x", "acme/big", large_folder_bytes=10)
    hub.push(tmp_path / "x", "acme/big", large_folder_bytes=1000)
    assert [c["method"] for c in calls] == ["create_repo", "upload_folder", "create_repo", "upload_large_folder",
                                            "create_repo", "upload_folder"]
    assert calls[3]["kw"]["allow_patterns"] == ["model.safetensors"] and all(c["token"] == TOKEN for c in calls)


def test_vllm_rank_is_the_smallest_accepted_value_at_least_r():
    from persllm_jax.export.peft import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 6 + 4, 33, 300)] == [8, 8, 16, 16, 64, 320]
