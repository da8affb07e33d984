"""Models by Hub id from a fake Hugging Face cache in tmp_path (written by hand to huggingface_hub's cache layout:
models--org--name/{blobs, refs, snapshots/<commit>}, files linked to blobs): `--model org/name` trains, exports
(merged + PEFT) and records the id, never the snapshot path; `@revision` picks another snapshot; a local path
wins; a missing id is one line with the `hf download` command."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from chat_fixtures import tiny_model_dir, write_corpus
from click.testing import CliRunner

from persllm_jax import runs
from persllm_jax.cli import main
from persllm_jax.model.weights import WeightsError, load_model, resolve_model_path

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40


def cache_model(cache: Path, repo_id: str, src: Path, commit: str, refs=("main",)) -> Path:
    """Add `src`'s files as snapshot `commit` of `repo_id` to the hub cache `cache`; returns the snapshot dir."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubmodels")
    m1 = tiny_model_dir(root / "m1")
    (m1 / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a tiny model\n")
    m2 = tiny_model_dir(root / "m2", hidden_size=32, intermediate_size=64, num_attention_heads=4)
    cache = root / "hf" / "hub"
    snap1 = cache_model(cache, "acme/tiny", m1, COMMIT_1)
    snap2 = cache_model(cache, "acme/tiny", m2, COMMIT_2, refs=("v2",))
    corpus = write_corpus(root / "corpus", n=8, seed=2)
    (corpus / "manifest.json").write_text(json.dumps({"personas": {"harry": {
        "name": "Harry Potter", "language": "de", "stages": [{"id": "y1", "label": "first year"}]}}}))
    return {"root": root, "cache": cache, "snap1": snap1, "snap2": snap2, "corpus": corpus}


@pytest.fixture(autouse=True)
def _cache_env(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_ids_resolve_through_the_cache(hub, tmp_path, monkeypatch):
    assert resolve_model_path("acme/tiny") == str(hub["snap1"])
    assert resolve_model_path("acme/tiny@v2") == str(hub["snap2"])  # a ref name
    assert resolve_model_path(f"acme/tiny@{COMMIT_1}") == str(hub["snap1"])  # a commit hash
    assert load_model("acme/tiny@v2").cfg.hidden_size == 32 and load_model("acme/tiny").cfg.hidden_size == 64
    # HF_HOME is honoured when HF_HUB_CACHE is unset (HF_HOME/hub)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub["cache"].parent))
    assert resolve_model_path("acme/tiny") == str(hub["snap1"])
    # a local folder of the same name wins over the id
    local = tiny_model_dir(tmp_path / "acme" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("acme/tiny") == "acme/tiny" and Path("acme/tiny").resolve() == local.resolve()


def test_missing_id_or_revision_is_one_line_with_the_download_command(hub, tmp_path):
    with pytest.raises(WeightsError, match=r"not in the Hugging Face cache .*hf download acme/other$"):
        resolve_model_path("acme/other")
    with pytest.raises(WeightsError, match=r"hf download acme/tiny --revision nope$"):
        resolve_model_path("acme/tiny@nope")
    res = _cli("train", "sft", "--model", "acme/missing", "--data", hub["corpus"], "--out", tmp_path / "r",
               "--no-progress")
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "hf download acme/missing" in lines[0], res.output
    assert "Traceback" not in res.output


def test_train_and_export_by_id_record_the_id(hub, tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    res = _cli("train", "sft", "--model", "acme/tiny", "--data", hub["corpus"], "--out", run, "--no-progress",
               "--set", "steps=2", "--set", "batch_size=8", "--set", "max_length=64", "--set", "lora.rank=4",
               "--set", "mesh.data=-1", "--set", "peak_tflops=0.15", "--set", "warmup_steps=0")
    assert res.exit_code == 0, res.output
    info = json.loads((run / "run.json").read_text())
    assert info["model"] == "acme/tiny"  # what the user gave; model_source is where it was found
    assert Path(info["model_source"]).resolve() == hub["snap1"].resolve()
    assert runs.load_chain(run).base_spec == "acme/tiny"  # so a DPO run --from it records the id too

    res = _cli("export", "--run", run, "--out", tmp_path / "peft", "--format", "peft", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "serve with vLLM: --enable-lora --max-lora-rank 8" in res.output  # r=4 -> vLLM's smallest, 8
    acfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "acme/tiny" and acfg["r"] == 4 and acfg["revision"] is None
    card = ModelCard.load(tmp_path / "peft" / "README.md")
    assert card.data.base_model == "acme/tiny" and card.data.license == "mit" and card.data.language == "de"
    assert card.data.library_name == "peft"

    res = _cli("export", "--run", run, "--out", tmp_path / "merged", "--no-progress")
    assert res.exit_code == 0, res.output
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.base_model == "acme/tiny" and card.data.library_name == "transformers"
    cache = str(hub["cache"])
    for f in ("README.md", "config.json"):
        assert cache not in (tmp_path / "merged" / f).read_text(), f  # no snapshot path anywhere
    assert cache not in (tmp_path / "peft" / "adapter_config.json").read_text()


def test_revision_is_kept_in_the_adapter_config(hub, tmp_path):
    from export_runs import random_adapter, write_run

    base = load_model("acme/tiny@v2")
    run = write_run(tmp_path / "run", "acme/tiny@v2", random_adapter(base.cfg, 2, seed=1), alpha=4.0)
    res = _cli("export", "--run", run, "--out", tmp_path / "peft", "--format", "peft", "--no-progress")
    assert res.exit_code == 0, res.output
    acfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "acme/tiny" and acfg["revision"] == "v2"
    assert json.loads((run / "run.json").read_text())["model"] == "acme/tiny@v2"
