"""data_gen pieces: config, persona folders and their errors, retrieval, templates, parsing, dedup/split,
mixing, the response cache."""

import json
import random
import shutil
from pathlib import Path

import pytest

from data_gen.annotate import allocate
from data_gen.backends import Request, ResponseCache
from data_gen.config import load_config
from data_gen.errors import DataGenError
from data_gen.materials import chunk_persona, count_words, load_personas
from data_gen.mixing import load_general, mix
from data_gen.prompts import Templates, parse_input, parse_response
from data_gen.retrieval import BM25, Index, similarity
from data_gen.split import dedup, split

DEMO = Path(__file__).resolve().parents[1] / "data_gen" / "personas"


def make_persona(root: Path, key="p", stages=("early", "late"), n=3, yaml_text=None):
    d = root / key
    for s in stages:
        for kind in ("objective", "subjective"):
            (d / s / kind).mkdir(parents=True, exist_ok=True)
            (d / s / kind / "a.txt").write_text(
                "\n\n".join(f"{key} {s} {kind} paragraph {i} about lamps and tides." for i in range(n)), encoding="utf-8")
    stage_yaml = "".join(f"  - {{id: {s}, label: '{1800 + i}'}}\n" for i, s in enumerate(stages))
    (d / "persona.yaml").write_text(yaml_text or f"name: P {key}\nstages:\n{stage_yaml}", encoding="utf-8")
    return d


# -- config ---------------------------------------------------------------------------------------

def test_config_sets_and_unknown_keys(tmp_path):
    cfg = load_config(None, ["inputs.per_stage=3", "dpo.skip_top_k=1", "inputs.mix={ordinary: 1}"])
    assert cfg["inputs"]["per_stage"] == 3 and cfg["dpo"]["skip_top_k"] == 1
    assert cfg["inputs"]["mix"] == {"ordinary": 1}
    with pytest.raises(DataGenError, match="unknown config key 'inputs.per_stag'"):
        load_config(None, ["inputs.per_stag=3"])
    f = tmp_path / "c.yaml"
    f.write_text("inputs:\n  per_stage: 2\n retrieval: x\n")
    with pytest.raises(DataGenError, match=r"c.yaml:3: invalid YAML"):
        load_config(f)
    f.write_text("inputs:\n  mix: {ordinary: 1, bogus: 1}\n")
    with pytest.raises(DataGenError, match="unknown input types"):
        load_config(f)


# -- persona folders ------------------------------------------------------------------------------

def test_demo_personas_meet_the_spec():
    personas = load_personas(DEMO)
    assert len(personas) >= 3
    for p in personas:
        assert len(p.stages) >= 2
        chunks = chunk_persona(p, 220)
        for s in p.stages:
            n = [c for c in chunks if c.stage == s.id]
            assert len(n) >= 15, (p.key, s.id, len(n))
            assert {c.kind for c in n} == {"objective", "subjective"}


def test_chunk_ids_sources_and_long_paragraph_split(tmp_path):
    d = make_persona(tmp_path)
    long = " ".join(f"Sentence number {i} is here." for i in range(60))
    (d / "early" / "objective" / "b.md").write_text(f"# Heading\n\n{long}\n\nshort one\n", encoding="utf-8")
    (p,) = load_personas(tmp_path)
    chunks = chunk_persona(p, 50)
    obj = [c for c in chunks if c.stage == "early" and c.kind == "objective"]
    assert [c.id for c in obj] == [f"p/early/obj/{i:04d}" for i in range(len(obj))]
    assert all(count_words(c.text) <= 50 for c in obj)
    assert not any(c.text.startswith("#") for c in obj)
    assert obj[-1].source == "p/early/objective/b.md:5" and obj[-1].text == "short one"


@pytest.mark.parametrize("case,match", [
    ("no_yaml", r"p: no persona.yaml"),
    ("unknown_stage", r"p/middle: unknown stage 'middle' \(stages in persona.yaml: early, late\)"),
    ("missing_stage_folder", r"p/late/subjective: missing folder"),
    ("empty_materials", r"p/early/objective: empty materials"),
    ("empty_file", r"p/early/objective/a.txt: empty file"),
    ("non_utf8", r"p/late/subjective/a.txt:4: not valid UTF-8"),
    ("bad_yaml", r"p/persona.yaml:3: invalid YAML"),
    ("missing_key", r"p/persona.yaml: missing key 'stages'"),
    ("missing_label", r"p/persona.yaml: stages\[1\]: missing key 'label'"),
])
def test_bad_persona_folders_name_the_path(tmp_path, case, match):
    d = make_persona(tmp_path)
    if case == "no_yaml":
        (d / "persona.yaml").unlink()
    elif case == "unknown_stage":
        (d / "middle" / "objective").mkdir(parents=True)
    elif case == "missing_stage_folder":
        shutil.rmtree(d / "late" / "subjective")
    elif case == "empty_materials":
        (d / "early" / "objective" / "a.txt").unlink()
    elif case == "empty_file":
        (d / "early" / "objective" / "a.txt").write_text("\n\n  \n")
    elif case == "non_utf8":
        (d / "late" / "subjective" / "a.txt").write_bytes(b"fine\n\nline two\n\xff\xfe bad\n")
    elif case == "bad_yaml":
        (d / "persona.yaml").write_text("name: x\nstages: [\n  - : :\n")
    elif case == "missing_key":
        (d / "persona.yaml").write_text("name: x\n")
    elif case == "missing_label":
        (d / "persona.yaml").write_text("name: x\nstages:\n  - {id: early, label: a}\n  - {id: late}\n")
    with pytest.raises(DataGenError, match=match):
        for p in load_personas(tmp_path):
            chunk_persona(p, 220)


# -- retrieval ------------------------------------------------------------------------------------

def test_bm25_ranks_the_matching_paragraph_first():
    docs = ["The cat sat on the mat.", "Radium glows faintly in the dark shed.", "Tides follow the moon."]
    bm = BM25(docs)
    assert int(bm.scores("why does radium glow in the shed").argmax()) == 1
    assert bm.scores("nothing matches here").max() == 0


def test_context_budget_seed_first_and_no_repeats():
    texts = [f"word{i} " * 10 + "radium" for i in range(10)]
    idx = Index(texts, load_config()["retrieval"])
    ctx = idx.context("radium", 25, seed=texts[3])
    parts = ctx.split(" ... ")
    assert parts[0] == texts[3] and len(parts) == 3 and len(set(parts)) == 3  # grows until >= 25 words
    assert idx.context("radium", 0) == ""


def test_similarity_tfidf():
    s = similarity(["what is radium", "tell me about the sea"], ["What is radium?", "the sea, tell me about"], "tfidf")
    assert s[0, 0] > 0.99 and s[1, 1] < 0.95 and s[0, 1] < 0.2


# -- templates and parsing --------------------------------------------------------------------------

def test_templates_render_and_language_override(tmp_path):
    t = Templates("en")
    text = t.render("response_system.j2", name="Ada", label="1834", knowledge="K", style="S", type="error",
                    examples=t.examples[:2], examples_persona=t.examples_persona, description="", stage_description="")
    assert text.startswith("Now it's 1834.") and "[Analysis]" in text and "misleading" in text
    assert text.count("Input:") == 2 and len(t.examples) == 5
    with pytest.raises(DataGenError, match="no template input_ordinary.j2 for language 'fr'"):
        Templates("fr")
    (tmp_path / "sft_system.j2").write_text("Tu es {{ name }}. Nous sommes en {{ label }}.")
    t2 = Templates("en", str(tmp_path))
    assert t2.render("sft_system.j2", name="Marie", label="1899") == "Tu es Marie. Nous sommes en 1899."
    (tmp_path / "sft_system.j2").write_text("{{ name }")
    with pytest.raises(DataGenError, match="sft_system.j2:1: template error"):
        Templates("en", str(tmp_path))


def test_parse_input():
    assert parse_input("Question: What is a comet?\nExplanation: because", "ordinary", 50) == ("What is a comet?", None)
    assert parse_input('"Why tides?"', "error", 50) == ("Why tides?", None)
    assert parse_input("  \n ", "thought", 50) == (None, "empty")
    assert parse_input("I think\nthat stars are lamps.", "thought", 50) == ("I think that stars are lamps.", None)
    assert parse_input("word " * 60, "ordinary", 50) == (None, "too_long")


def test_parse_response_reasons():
    cfg = load_config()["responses"]
    assert parse_response("[Analysis] a b\n[Response] c\nd", cfg) == (("a b", "c d"), None)
    assert parse_response("[analysis]x[RESPONSE] y", cfg) == (("x", "y"), None)
    assert parse_response("just text", cfg) == (None, "no_response_tag")
    assert parse_response("", cfg) == (None, "empty")
    assert parse_response("[Analysis] x [Response]  ", cfg) == (None, "empty")
    assert parse_response("[Response] As an AI language model I cannot.", cfg) == (None, "refusal")
    assert parse_response("[Response] " + "w " * 500, cfg) == (None, "too_long")
    lenient = dict(cfg, require_response_tag=False)
    assert parse_response("just text", lenient) == (("", "just text"), None)


def test_allocate_follows_the_mix():
    types = allocate(20, {"ordinary": 0.5, "thought": 0.25, "error": 0.25}, random.Random(0))
    assert sorted(types) == sorted(["ordinary"] * 10 + ["thought"] * 5 + ["error"] * 5)
    assert sorted(allocate(3, {"ordinary": 1, "error": 1}, random.Random(0))).count("thought") == 0


# -- dedup and split --------------------------------------------------------------------------------

def test_dedup_threshold_and_split_80_20():
    cfg = load_config()
    rows = [{"id": f"p/early/{i:04d}", "persona": "p", "stage": "early", "input": f"question {i} about item{i}"}
            for i in range(20)]
    rows.append({"id": "p/late/0000", "persona": "p", "stage": "late", "input": "Question 3 about item3?"})
    rows.append({"id": "q/late/0000", "persona": "q", "stage": "late", "input": "question 3 about item3"})
    kept, dropped = dedup(rows, cfg)
    assert [d["id"] for d in dropped] == ["p/late/0000"] and dropped[0]["duplicate_of"] == "p/early/0003"
    assert len(kept) == 21  # another persona's identical question is not a duplicate
    none, _ = dedup(rows, load_config(None, ["dedup.threshold=1.01"]))
    assert len(none) == 22
    train, test = split(kept, cfg)
    early_test = [r for r in test if r["persona"] == "p" and r["stage"] == "early"]
    assert len(early_test) == 4 and len([r for r in train if r["stage"] == "early"]) == 16
    assert split(kept, cfg) == (train, test)


# -- mixing ---------------------------------------------------------------------------------------

def test_mix_general_jsonl_and_datasets_dir(tmp_path):
    f = tmp_path / "general.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"data": ["q", "a"]}, {"instruction": "do", "input": "x", "output": "done"},
            {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "g"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [m[-1]["content"] for m in load_general(str(f), None)] == ["hello", "a", "done", "g"]
    cfg = load_config(None, [f"mix.general={f}", "mix.repeat=3"])
    persona = [{"id": f"p/{i}", "persona": "p", "stage": "s", "type": "ordinary", "messages": []} for i in range(2)]
    out, n = mix(persona, load_general(str(f), None), cfg)
    assert n == 4 and len(out) == 10 and len({r["id"] for r in out}) == 10
    assert sorted(r["id"] for r in out if r["persona"] == "p")[:3] == ["p/0", "p/0#r1", "p/0#r2"]
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]).save_to_disk(str(d))
    assert [m[1]["content"] for m in load_general(str(d), 1)] == ["r1"]
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\nnot json\n')
    with pytest.raises(DataGenError, match="bad.jsonl:1"):
        load_general(str(tmp_path / "bad.jsonl"), None)


def test_cache_key_ignores_item_key_and_holds_no_secret(tmp_path):
    c = ResponseCache(tmp_path, {"model": "m"})
    a = Request("k1", ({"role": "user", "content": "x"},), 10, 0.5, 1.0, 3)
    b = Request("k2", ({"role": "user", "content": "x"},), 10, 0.5, 1.0, 3)
    assert c.key(a) == c.key(b) and c.key(a) != c.key(Request("k1", a.messages, 10, 0.5, 1.0, 4))
    c.put(a, "answer")
    assert c.get(b) == "answer"


def test_openai_backend_endpoint_and_key_from_environment(tmp_path, monkeypatch):
    from data_gen.backends import make_backend

    cfg = load_config()["annotator"]
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(DataGenError, match="set OPENAI_API_KEY"):
        make_backend("openai:gpt-x", None, cfg, tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:pw@127.0.0.1:8000/v1?token=t")
    b = make_backend("openai:gpt-x", None, cfg, tmp_path)
    assert b.identity == {"backend": "openai", "model": "gpt-x", "base_url": "http://127.0.0.1:8000/v1"}
    assert make_backend("openai:gpt-x", "http://127.0.0.1:9/v1", cfg, tmp_path).base_url == "http://127.0.0.1:9/v1"
    assert "sk-abc" not in json.dumps(b.identity) + json.dumps(b.cache.namespace)
    with pytest.raises(DataGenError, match="no such model folder"):
        make_backend("local:/nope/model.gguf", None, cfg, tmp_path)


def test_local_backend_cache_namespace_fingerprints_the_weights(tmp_path):
    from data_gen.backends import make_backend

    cfg = load_config()["annotator"]
    for d, size in (("a", 10), ("b", 20)):
        m = tmp_path / d / "export"
        m.mkdir(parents=True)
        (m / "config.json").write_text("{}")
        (m / "model.safetensors").write_bytes(b"0" * size)
    a = make_backend(f"local:{tmp_path / 'a' / 'export'}", None, cfg, tmp_path / "cache")
    b = make_backend(f"local:{tmp_path / 'b' / 'export'}", None, cfg, tmp_path / "cache")
    assert a.identity["model"] == b.identity["model"] == "export"
    assert a.cache.namespace != b.cache.namespace and a.gen is None  # nothing loaded yet


def test_jsonl_torn_tail_is_dropped_and_cut_before_appending(tmp_path):
    from persllm_jax.io import Appender, read_jsonl, write_jsonl

    f = tmp_path / "w.jsonl"
    write_jsonl(f, [{"a": 1}, {"a": 2}])
    with open(f, "ab") as fh:
        fh.write(b'{"a": 3, "b": "tor')  # a writer killed mid-line
    assert read_jsonl(f, torn_tail=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match="w.jsonl:3:15: invalid JSON"):  # a torn tail is an error unless asked for
        read_jsonl(f)
    with Appender(f) as ap:
        ap.write({"a": 4})
    assert read_jsonl(f) == [{"a": 1}, {"a": 2}, {"a": 4}]
    f.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="w.jsonl:2:1: invalid JSON"):
        read_jsonl(f, torn_tail=True)  # only the last line may be torn
