"""`persllm reproduce` end to end on a tiny random model (offline, minutes): data build with the tiny model as the
local annotator -> LoRA SFT -> DPO (when this build has it) -> export merged + PEFT -> eval -> report; then the
stage bookkeeping: a rerun skips everything, an interrupted SFT resumes from its checkpoint without redoing the
data build, a changed setting redoes exactly the stages downstream of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from persllm_jax.pipeline import config as recipe
from persllm_jax.pipeline.stages import Pipeline

pytestmark = pytest.mark.slow  # minutes of CPU: `bash tools/test.sh -m "not slow"` skips it

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, model: Path) -> Path:
    personas = tmp / "personas"
    for p in ("ada_lovelace", "charles_darwin"):
        shutil.copytree(REPO / "data_gen" / "personas" / p, personas / p)
    cfg = {
        "model": str(model),
        "personas": "personas",  # relative to the config file
        "data": {"annotator": f"local:{model}", "config": {
            "inputs": {"per_stage": 2, "max_tokens": 12}, "responses": {"max_tokens": 16, "fewshot": 0,
                                                                        "require_response_tag": False},
            "retrieval": {"knowledge_words": 20, "style_words": 10}, "dpo": {"skip_top_k": 0},
            "split": {"test_fraction": 0.5}, "dedup": {"method": "none"}, "annotator": {"batch_size": 16}}},
        "sft": {"steps": 4, "batch_size": 8, "max_length": 128, "learning_rate": 1e-3, "warmup_steps": 1,
                "save_every": 2, "log_every": 1, "peak_tflops": 1.0, "lora": {"rank": 4, "alpha": 8}},
        "dpo": {"enabled": True, "steps": 2, "batch_size": 8, "max_length": 128, "save_every": 1, "log_every": 1,
                "peak_tflops": 1.0, "lora": {"rank": 2, "alpha": 4}},
        "export": {"formats": ["merged", "peft"]},
        "eval": {"config": {"samples": 2, "max_new_tokens": 6, "batch_size": 16, "style": {"enabled": False},
                            "bigfive": {"variants": ["describe", "reversed"], "max_items": 2, "batch_size": 32}}},
    }
    path = tmp / "tiny.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(config: Path, out: Path, *sets: str):
    """Run the command in-process; returns (stdout, stage log lines from stderr)."""
    from persllm_jax.cli import main

    args = ["reproduce", str(config), "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output[-3000:] + repr(res.exception)
    return res.stdout, res.stderr.splitlines()


def markers(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json") if ".started" not in p.name}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from talk_fixtures import make_model

    tmp = tmp_path_factory.mktemp("repro")
    model = make_model(tmp / "model", seed=2)
    config = tiny_config(tmp, model)
    out = tmp / "out"
    output, logs = invoke(config, out)
    return {"tmp": tmp, "model": model, "config": config, "out": out, "output": output, "logs": logs}


def test_reproduce_end_to_end(tiny):
    out, output = tiny["out"], tiny["output"]
    m = markers(out)
    expected = {"data", "sft", "dpo", "export", "eval", "report"}
    assert set(m) == expected
    # corpus: train/test/dpo rows as the marker says
    f = m["data"]["figures"]
    assert f["train"] >= 2 and f["test"] >= 2 and f["dpo_pairs"] >= 1 and f["requests_sent"] > 0
    assert len((out / "corpus" / "sft" / "test.jsonl").read_text().splitlines()) == f["test"]
    # SFT trained to its last step, with a checkpoint there
    assert m["sft"]["figures"]["steps"] == 4 and (out / "sft" / "checkpoints" / "4").is_dir()
    info = json.loads((out / "dpo" / "run.json").read_text())
    assert Path(info["parent_run"]).resolve() == (out / "sft").resolve()
    # exports: an HF model transformers can load and a PEFT adapter, both verified by the export itself
    merged, peft = out / "export" / "merged", out / "export" / "peft"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert (peft / "adapter_config.json").is_file() and (peft / "adapter_model.safetensors").is_file()
    assert m["export"]["figures"]["merged"]["max_logit_diff"] < 1e-3
    # eval: base with a persona prompt vs the trained model(s), side by side
    r = json.loads((out / "eval" / "results.json").read_text())
    systems = ["base+prompt", "SFT", "SFT+DPO"]
    assert list(r["systems"]) == systems
    assert r["systems"]["base+prompt"]["persona_prompt"] is True
    md = (out / "report.md").read_text()
    assert "| stage | status | time (s) | key figures | outputs |" in md
    assert "| metric | " + " | ".join(systems) + " |" in md
    # the summary table printed at the end names every stage and where its outputs are
    for stage in expected:
        assert any(line.startswith(stage) for line in output.splitlines()), output
    assert str(out / "export" / "merged") in output


def test_rerun_skips_every_stage(tiny):
    before = {k: v["finished"] for k, v in markers(tiny["out"]).items()}
    output, logs = invoke(tiny["config"], tiny["out"])
    assert all(k in before for k in markers(tiny["out"]))
    assert {k: v["finished"] for k, v in markers(tiny["out"]).items()} == before
    skipped = [ln.split("]")[0][1:] for ln in logs if ln.endswith("skipped")]
    assert set(skipped) == set(before) and "running" not in " ".join(logs)


def test_interrupted_sft_resumes_without_redoing_the_data_build(tiny):
    out = tiny["out"]
    data_before = markers(out)["data"]["finished"]
    corpus_before = (out / "corpus" / "sft" / "train.jsonl").read_bytes()
    # what a kill during SFT leaves: no done-marker, checkpoints only up to step 2 (metrics beyond it get trimmed)
    (out / "stages" / "sft.json").unlink()
    shutil.rmtree(out / "sft" / "checkpoints" / "4")
    output, logs = invoke(tiny["config"], out)
    text = "\n".join(logs)
    assert "[data] complete" in text and "[sft] resuming an interrupted run" in text
    assert "resumed from" in text and "step 2" in text
    m = markers(out)
    assert m["data"]["finished"] == data_before
    assert (out / "corpus" / "sft" / "train.jsonl").read_bytes() == corpus_before
    assert m["sft"]["figures"]["steps"] == 4 and (out / "sft" / "checkpoints" / "4").is_dir()
    # SFT's key did not change, so the stages after it were still valid: only SFT ran again
    assert [ln for ln in logs if ln.endswith("running")] == ["[sft] running"]


def test_changed_setting_redoes_downstream_only(tiny):
    out = tiny["out"]
    before = markers(out)
    output, logs = invoke(tiny["config"], out, "sft.steps=3")
    after = markers(out)
    ran = [ln.split("]")[0][1:] for ln in logs if ln.endswith("running")]
    assert ran == [s for s in recipe.STAGES if s in after and s != "data"]
    assert after["data"]["finished"] == before["data"]["finished"]
    assert after["sft"]["figures"]["steps"] == 3 and not (out / "sft" / "checkpoints" / "4").exists()


def test_bad_config_fails_before_running(tmp_path):
    from persllm_jax.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {learning_rat: 1.0}\n")
    res = CliRunner().invoke(main, ["reproduce", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "unknown config key 'learning_rat'" in res.output
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(main, ["reproduce", str(REPO / "configs" / "demo.yaml"), "--out", str(tmp_path / "o"),
                                    "--set", "data.config.split.test_fraction=2"])
    assert res.exit_code != 0 and "test_fraction" in res.output
    res = CliRunner().invoke(main, ["reproduce", str(REPO / "configs" / "demo.yaml"), "--set", "nonsense=1"])
    assert res.exit_code != 0 and "unknown config key 'nonsense'" in res.output


def test_missing_prerequisites_are_reported_together_before_running(tmp_path, monkeypatch):
    """A paper recipe on a machine without its model, general data or API key: one error naming all of them."""
    from persllm_jax.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    res = CliRunner().invoke(main, ["reproduce", str(REPO / "configs" / "paper_3b_gpu8.yaml"), "--out", "o"])
    assert res.exit_code != 0 and "4 thing(s) missing" in res.output
    for what in ("model 'models/Llama-3.2-3B-Instruct'", "general/ultrachat.jsonl", "data.annotator: openai:",
                 "eval.judge: openai:"):
        assert what in res.output
    assert not (tmp_path / "o").exists()
    # given the model and the data, and a server of one's own for both endpoints, nothing is missing
    (tmp_path / "general").mkdir()
    (tmp_path / "general" / "ultrachat.jsonl").write_text("")
    cfg = recipe.load(REPO / "configs" / "paper_3b_gpu8.yaml",
                 ["model=smollm2", "data.base_url=http://127.0.0.1:9/v1", "eval.base_url=http://127.0.0.1:9/v1"])
    assert recipe.preflight(cfg, tmp_path / "o") == []


def test_stage_keys_follow_settings_and_materials(tmp_path):
    """Edited persona materials change the data key and so every key downstream; bookkeeping keys do not."""
    shutil.copytree(REPO / "data_gen" / "personas" / "ada_lovelace", tmp_path / "p" / "ada_lovelace")

    def keys(*sets):
        cfg = recipe.load(REPO / "configs" / "demo.yaml", ["dpo.enabled=false", f"personas={tmp_path / 'p'}", *sets])
        pipe = Pipeline(cfg, tmp_path / "o")
        for s in ("data", "sft", "export", "eval"):
            pipe.keys[s] = pipe.stage_key(s)
        return pipe.keys

    k0 = keys()
    assert keys("sft.log_every=1") == k0  # logging does not change the model
    k1 = keys("sft.learning_rate=0.1")
    assert k1["data"] == k0["data"] and k1["sft"] != k0["sft"] and k1["export"] != k0["export"]
    k2 = keys("eval.config.samples=3")
    assert k2["sft"] == k0["sft"] and k2["eval"] != k0["eval"]
    f = tmp_path / "p" / "ada_lovelace" / "early" / "objective" / "life.txt"
    f.write_text(f.read_text() + "\n\nShe also kept bees.\n")
    k3 = keys()
    assert all(k3[s] != k0[s] for s in k0)
