"""`report_to`: metrics.jsonl always; TensorBoard event files (read back with tensorboardX's own protos) holding
loss, lr and eval_loss; a W&B offline run folder; the optional packages imported only when enabled; a missing
one is a one-line error before any work; a resumed run's TensorBoard curve has each step once."""

import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

from chat_fixtures import corpus_with_test_split, tiny_model_dir
from persllm_jax.model.weights import load_model, load_tokenizer
from persllm_jax.train import report_to, sft
from persllm_jax.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = tiny_model_dir(root / "model")
    corpus = corpus_with_test_split(root, 12, 4)
    return model, corpus, load_model(str(model)), load_tokenizer(str(model))


def _cfg(model, corpus, *sets):
    base = ["max_length=64", "batch_size=2", "learning_rate=1e-3", "warmup_steps=0", "log_every=1", "lora.rank=4",
            "mesh.data=1", "shuffle=false", "peak_tflops=0.15"]
    return load_config(overrides=base + list(sets), base={"model": str(model), "data": str(corpus)})


def _train(tiny, run_dir, *sets):
    model, corpus, loaded, tok = tiny
    return sft.run(_cfg(model, corpus, *sets), run_dir, loaded=loaded, tokenizer=tok, devices=jax.devices()[:1],
                   progress=False, log=lambda s: None)


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file under `folder`, in file order: TFRecord framing (length, crc,
    data, crc) decoded with tensorboardX's Event proto, so the files are what TensorBoard itself reads. As
    TensorBoard does, a session START at step s (a resumed writer's purge_step) drops the events of steps >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in vals if s < ev.step] for tag, vals in out.items()}
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((ev.step, v.simple_value))
                elif v.tag.startswith("config"):
                    out.setdefault(v.tag, []).append((ev.step, v.tensor.string_val[0].decode()))
    return out


def test_tensorboard_events_hold_loss_lr_and_eval_loss(tiny, tmp_path):
    run_dir = tmp_path / "run"
    out = _train(tiny, run_dir, "steps=4", "eval_every=2", "report_to=[jsonl, tensorboard]")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True]
    ev = read_events(run_dir / "tensorboard")
    assert [s for s, _ in ev["loss"]] == [1, 2, 3, 4] and [s for s, _ in ev["lr"]] == [1, 2, 3, 4]
    assert [s for s, _ in ev["eval_loss"]] == [2, 4]
    assert ev["eval_loss"][1][1] == pytest.approx(rows[3]["eval_loss"], rel=1e-6)
    assert ev["loss"][0][1] == pytest.approx(rows[0]["loss"], rel=1e-6)
    config_text = [v for k, vals in ev.items() if k.startswith("config") for _, v in vals]
    assert len(config_text) == 1 and "eval_every: 2" in config_text[0]
    assert out["last"]["eval_loss"] == rows[3]["eval_loss"]


def test_tensorboard_resume_keeps_each_step_once(tiny, tmp_path, monkeypatch):
    from tensorboardX import event_file_writer

    # both runs within one second, as a quick resume: tensorboardX names event files by the second
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1796414847.0))
    run_dir = tmp_path / "run"
    sets = ("steps=4", "save_every=2", "report_to=[tensorboard]", "learning_rate=1e-2")
    _train(tiny, run_dir, *sets)
    first = {s: v for s, v in read_events(run_dir / "tensorboard")["loss"]}
    shutil.rmtree(run_dir / "checkpoints" / "4")  # as if killed after logging steps 3 and 4: resumes from step 2
    _train(tiny, run_dir, *sets)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # a new event file
    ev = read_events(run_dir / "tensorboard")
    assert [s for s, _ in ev["loss"]] == [1, 2, 3, 4]  # steps 3 and 4 of the first run purged, logged again
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert dict(ev["loss"]) == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6) == first
    assert len([k for k in ev if k.startswith("config")]) == 1  # the config is logged once per run, not per resume


def test_wandb_offline_run_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):  # nothing in ~
        monkeypatch.setenv(var, str(tmp_path / "wb-home" / var))
    (tmp_path / "wb").mkdir()
    run_dir = tmp_path / "run"
    _train(tiny, run_dir, "steps=2", "eval_every=2", "report_to=[wandb]")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tmp_path / "wb").rglob("*"))
    assert list(runs[0].glob("*.wandb")) and (run_dir / "metrics.jsonl").is_file()
    assert not (run_dir / "tensorboard").exists()


def test_missing_extra_is_one_line_before_training(tiny, tmp_path, monkeypatch):
    real = report_to.importlib.util.find_spec
    monkeypatch.setattr(report_to.importlib.util, "find_spec", lambda m: None if m == "tensorboardX" else real(m))
    with pytest.raises(report_to.ReportError, match=r"pip install 'persllm-jax\[tensorboard\]'") as e:
        _train(tiny, tmp_path / "run", "steps=1", "report_to=[tensorboard]")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_default_run_imports_no_backend(tiny, tmp_path):
    """Importing the trainer and training with the default `report_to` loads neither tensorboardX nor wandb."""
    model, corpus, _, _ = tiny
    code = f"""
import sys, jax
from persllm_jax.train import sft
from persllm_jax.train.config import load_config
cfg = load_config(overrides=["max_length=64", "batch_size=2", "steps=1", "lora.rank=4", "mesh.data=1",
                             "peak_tflops=0.15"], base={{"model": {str(model)!r}, "data": {str(corpus)!r}}})
sft.run(cfg, {str(tmp_path / 'run')!r}, devices=jax.devices()[:1], progress=False, log=lambda s: None)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboardX", "wandb", "tensorboard")))
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
