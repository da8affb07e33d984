"""Nothing lost, every fault one clear line: output folders that are inputs or not ours are refused, an
interrupted overwrite leaves the old output whole, an unreachable annotator says why and stops early, a damaged
checkpoint is skipped on resume, a changed run config is named, unreadable inputs name file:line:column, and a
run that fails before its first step leaves no folder behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from chat_fixtures import tiny_model_dir, write_corpus
from click.testing import CliRunner
from export_runs import random_adapter, write_run
from fake_openai import FakeOpenAI

from persllm_jax.cli import main
from persllm_jax.model.weights import WeightsError, load_model
from persllm_jax.outputs import MARKER
from persllm_jax.settings import ConfigError
from persllm_jax.train import checkpoint, sft
from persllm_jax.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data_gen" / "personas"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    return lines[0]


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# --- export: output safety ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """An SFT run and a DPO run on top of it, over a tiny model, all under one folder."""
    root = tmp_path_factory.mktemp("chain")
    model = tiny_model_dir(root / "model")
    cfg = load_model(str(model)).cfg
    sft_run = write_run(root / "runs" / "sft", model, random_adapter(cfg, 4, seed=1), step=3)
    dpo_run = write_run(root / "runs" / "dpo", model, random_adapter(cfg, 2, seed=2), step=2, parent=sft_run,
                        parent_step=3)
    return root, model, sft_run, dpo_run


@pytest.mark.parametrize("target,why", [("dpo", "is the input"), ("sft", "is the input"),
                                        ("runs", "contains the input"), ("model", "is the input"),
                                        ("inside", "lies inside the input")])
def test_export_never_writes_over_its_inputs(chain, target, why):
    root, model, sft_run, dpo_run = chain
    out = {"dpo": dpo_run, "sft": sft_run, "runs": root / "runs", "model": model,
           "inside": dpo_run / "checkpoints" / "export"}[target]
    before = {p: tree(p) for p in (root / "runs", model)}
    line = error_line(cli("export", "--run", dpo_run, "--out", out, "--overwrite"))
    assert why in line and "choose another --out" in line
    assert {p: tree(p) for p in (root / "runs", model)} == before  # nothing deleted, nothing added


def test_overwrite_replaces_only_our_own_exports(chain, tmp_path):
    _, _, sft_run, _ = chain
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    line = error_line(cli("export", "--run", sft_run, "--out", foreign, "--overwrite"))
    assert "not written by persllm" in line and (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8 not ours"
    out = tmp_path / "export"
    assert cli("export", "--run", sft_run, "--out", out).exit_code == 0 and (out / MARKER).is_file()
    assert "already exists" in error_line(cli("export", "--run", sft_run, "--out", out))
    res = cli("export", "--run", sft_run, "--out", out, "--overwrite", "--format", "peft")
    assert res.exit_code == 0, res.output
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()  # replaced whole


KILL_WHILE_WRITING = """
import os, signal, sys
from persllm_jax.cli import main
from persllm_jax.export import hf_state
real = hf_state.save_tokenizer
def save_then_die(spec, out_dir):
    real(spec, out_dir)
    os.kill(os.getpid(), signal.SIGKILL)  # the new export is half made: written, not yet verified or swapped in
hf_state.save_tokenizer = save_then_die
sys.argv = ["persllm"] + sys.argv[1:]
main()
"""


def test_an_overwrite_killed_midway_leaves_the_old_export_loadable(chain, tmp_path):
    _, _, sft_run, dpo_run = chain
    out = tmp_path / "export"
    assert cli("export", "--run", sft_run, "--out", out).exit_code == 0
    before = tree(out)
    old = load_model(str(out))
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, "export", "--run", str(dpo_run), "--out",
                           str(out), "--overwrite"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert tree(out) == before  # the old export, file for file
    again = load_model(str(out))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(old.params),
                                                     jax.tree_util.tree_leaves(again.params)))
    assert list(tmp_path.glob(".export.tmp-*"))  # the killed writer's staging folder, never published
    assert cli("export", "--run", sft_run, "--out", out, "--overwrite").exit_code == 0
    assert not list(tmp_path.glob(".export.tmp-*"))  # the next write clears what a dead writer left


# --- the annotator: failures that say why ----------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def data_cli(*args, env_extra=None):
    env = dict(os.environ, OPENAI_API_KEY="sk-test-not-a-real-key", PYTHONPATH=str(REPO), **(env_extra or {}))
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.run([sys.executable, "-m", "persllm_jax", "data", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def test_unreachable_annotator_stops_early_and_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    out = tmp_path / "corpus"
    t0 = time.monotonic()
    proc = data_cli("build", "--no-progress", "--personas", DEMO, "--out", out, "--annotator", "openai:x",
                    "--base-url", url)
    elapsed = time.monotonic() - t0
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0, err
    assert "connection refused" in err and f"127.0.0.1:{url.split(':')[2]}" in err
    # six retries with backoff per item would take minutes; the fatal stop comes after the second refusal
    assert elapsed < 60, elapsed
    check = data_cli("check", out)
    assert check.returncode != 0 and "missing" in check.stderr


def test_http_401_stops_the_build_at_once(tmp_path):
    with FakeOpenAI(reject_auth=True) as srv:
        proc = data_cli("build", "--no-progress", "--personas", DEMO, "--out", tmp_path / "c", "--annotator",
                        "openai:fake", "--base-url", srv.url)
        sent = len(srv.log)
    assert proc.returncode == 2 and "answered 401" in proc.stderr
    assert 1 <= sent <= 8  # the requests already in flight (annotator.concurrency), not a retry storm


def test_data_check_fails_an_incomplete_or_empty_corpus(tmp_path):
    corpus = tmp_path / "c"
    for name in ("sft/train.jsonl", "sft/test.jsonl", "dpo/train.jsonl"):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text("")
    proc = data_cli("check", corpus)
    assert proc.returncode == 1 and "no training rows" in proc.stderr
    (corpus / "manifest.json").write_text(json.dumps({
        "complete": False, "rejected_by_reason": {"responses:annotator_failed": 3}, "totals": {"sft_train": 0},
        "annotator_errors": {"http://127.0.0.1:9/v1": "connection refused"}}))
    proc = data_cli("check", corpus)
    assert proc.returncode == 1 and "3 annotator requests failed" in proc.stderr
    assert "last error from http://127.0.0.1:9/v1: connection refused" in proc.stderr


# --- training: checkpoints, config conflicts, unreadable inputs ------------------------------------------


SETS = ["steps=6", "save_every=2", "keep_checkpoints=3", "max_length=64", "batch_size=2", "learning_rate=1e-2",
        "warmup_steps=0", "log_every=1", "lora.rank=4", "lora.alpha=8", "mesh.data=1", "peak_tflops=0.1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model_dir(root / "model"), write_corpus(root / "corpus", n=12)


def train(model, corpus, run_dir, *extra, log=None):
    cfg = load_config(overrides=[f"model={model}", f"data={corpus}", *SETS, *extra])
    return sft.run(cfg, run_dir, devices=jax.devices()[:1], progress=False, log=log or (lambda s: None))


def test_a_damaged_latest_checkpoint_is_skipped_on_resume(tiny, tmp_path):
    model, corpus = tiny
    train(model, corpus, tmp_path / "full")
    train(model, corpus, tmp_path / "damaged")
    biggest = max((p for p in (tmp_path / "damaged" / "checkpoints" / "6").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    logs = []
    train(model, corpus, tmp_path / "damaged", log=logs.append)
    warnings = [ln for ln in logs if ln.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 6 cannot be restored" in warnings[0], logs
    assert any("resumed from" in ln and "(step 4," in ln for ln in logs), logs
    assert (tmp_path / "damaged" / "damaged_checkpoints" / "6").is_dir()  # moved aside, not deleted
    a, _ = checkpoint.load_trained(tmp_path / "full")
    b, _ = checkpoint.load_trained(tmp_path / "damaged")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_resuming_with_a_changed_lora_rank_names_the_conflict(tiny, tmp_path):
    model, corpus = tiny
    run = tmp_path / "run"
    train(model, corpus, run, "steps=2")
    with pytest.raises(ConfigError) as e:
        train(model, corpus, run, "steps=4", "lora.rank=8")
    msg = str(e.value)
    assert "\n" not in msg and "lora.rank: 4 -> 8" in msg and "new --out" in msg
    res = cli("train", "sft", "--out", run, "--set", "lora.rank=8", "--set", "steps=4")
    assert "lora.rank: 4 -> 8" in error_line(res)


def test_unreadable_inputs_name_file_line_and_column_and_leave_no_run_folder(tiny, tmp_path):
    model, corpus = tiny
    bad = tmp_path / "bad.jsonl"
    good = (corpus / "sft" / "train.jsonl").read_text().splitlines()[0]
    bad.write_bytes(good.encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    line = error_line(cli("train", "sft", "--model", model, "--data", bad, "--out", tmp_path / "r1"))
    assert f"{bad}:2:" in line and "not valid UTF-8" in line
    assert not (tmp_path / "r1").exists()

    broken = tiny_model_dir(tmp_path / "broken")
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    with pytest.raises(WeightsError, match="model.safetensors: not a readable safetensors file"):
        load_model(str(broken))
    line = error_line(cli("train", "sft", "--model", broken, "--data", corpus, "--out", tmp_path / "r2"))
    assert "model.safetensors" in line and "truncated" in line
    assert not (tmp_path / "r2").exists()


def test_a_run_folder_is_never_an_input_nor_a_stranger(tiny, tmp_path):
    model, corpus = tiny
    with pytest.raises(Exception, match="contains the input"):
        train(model, corpus, corpus.parent)
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    line = error_line(cli("train", "sft", "--model", model, "--data", corpus, "--out", stranger))
    assert "not a run directory" in line and (stranger / "todo.txt").read_text() == "keep me"


def test_a_truncated_gguf_file_is_one_line_naming_it(tmp_path):
    from persllm_jax.model.weights import embedded_model_path

    src = Path(embedded_model_path())
    cut = tmp_path / "model.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(4096))  # the header and part of the metadata
    with pytest.raises(WeightsError, match=rf"{cut}: not a readable GGUF file .*truncated"):
        load_model(str(cut))
