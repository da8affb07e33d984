"""Training data in every format TRL reads (persllm_jax.formats): each source and shape gives the same tokenized
rows as the conversational JSONL of the same content; standard (string) rows match TRL's own tokenization."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from data_gen.errors import DataGenError
from data_gen.mixing import load_general
from persllm_jax import formats
from persllm_jax.errors import InputError
from persllm_jax.model.weights import load_tokenizer
from persllm_jax.train import data, dpo_data

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SYS = {"role": "system", "content": "You are Hermione Granger."}
QA = [("What is your favourite spell?", "Wingardium Leviosa, of course!"), ("And Ron?", "Ron is... Ron."),
      ("Where is the library?", "Second floor, past the portrait.")]
CONV = [{"messages": [SYS, {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
WRONG = ["No idea.", "Who?", "Somewhere."]
PREF = [{"prompt": [SYS, {"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
         "rejected": [{"role": "assistant", "content": w}]} for (q, a), w in zip(QA, WRONG)]
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A fake Hugging Face home: HF_HOME in tmp_path, nothing else of the user's."""
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hub_snapshot(hf_home, repo, rows):
    """A dataset repo in the hub cache, laid out as `hf download --repo-type dataset` leaves it."""
    root = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (root / "snapshots" / SHA / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "snapshots" / SHA / "data" / "train-00000-of-00001.parquet")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    return root


# --- writers: the same rows in each source ------------------------------------------------------------------


def _json(tmp_path, rows, hf_home):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(rows, indent=1))
    return p


def _json_lines(tmp_path, rows, hf_home):
    return write_jsonl(tmp_path / "rows.json", rows)  # JSON Lines under a .json name, as datasets reads it


def _parquet(tmp_path, rows, hf_home):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    return tmp_path / "rows.parquet"


def _save_to_disk(tmp_path, rows, hf_home):
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def _dataset_dict(tmp_path, rows, hf_home):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])})
    d.save_to_disk(str(tmp_path / "dd"))
    return tmp_path / "dd"


def _hub_snapshot(tmp_path, rows, hf_home):
    hub_snapshot(hf_home, "org/name", rows)
    return "org/name"


def _hub_datasets_cache(tmp_path, rows, hf_home):
    """Only the `datasets` cache that load_dataset('org/name') leaves after an online run (no hub snapshot)."""
    root = hub_snapshot(hf_home, "org/name", rows)
    formats.read_source("org/name")  # prepares the arrow cache, named after the snapshot folder
    shutil.rmtree(root)
    cache = hf_home / "datasets" / "org___name"
    (hf_home / "datasets" / SHA).rename(cache)
    for f in cache.rglob("*.arrow"):
        f.rename(f.with_name(f.name.replace(SHA, "name")))  # an online load names the files after the dataset
    return "org/name:train"


SOURCES = [_json, _json_lines, _parquet, _save_to_disk, _dataset_dict, _hub_snapshot, _hub_datasets_cache]


def _pc(rows):
    """TRL's conversational prompt-completion form of the same conversations."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]


def _sharegpt(rows):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in r["messages"]]}
            for r in rows]


def _sft(tok, spec):
    ex, _ = data.load_examples(tok, data.corpus_file(spec), 256)
    return [(e.ids.tolist(), e.mask.tolist()) for e in ex]


@pytest.fixture
def sft_reference(tok, tmp_path):
    ref = _sft(tok, write_jsonl(tmp_path / "ref" / "sft" / "train.jsonl", CONV))
    assert _sft(tok, tmp_path / "ref") == ref  # the corpus folder layout, as before
    assert len(ref) == 3 and all(any(m) and not all(m) for _, m in ref)
    return ref


@pytest.mark.parametrize("source", SOURCES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("shape", [lambda r: r, _pc, _sharegpt], ids=["messages", "prompt_completion", "sharegpt"])
def test_sft_every_source_and_shape_matches_the_conversational_jsonl(tok, tmp_path, hf_home, sft_reference, source,
                                                                     shape):
    assert _sft(tok, source(tmp_path, shape(CONV), hf_home)) == sft_reference


def test_sft_jsonl_prompt_completion_and_sharegpt(tok, tmp_path, sft_reference):
    assert _sft(tok, write_jsonl(tmp_path / "pc.jsonl", _pc(CONV))) == sft_reference
    assert _sft(tok, write_jsonl(tmp_path / "sg.jsonl", _sharegpt(CONV))) == sft_reference


def test_prompt_completion_trains_only_the_completion(tok):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
             {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]
    ex = data.tokenize_row(tok, {"prompt": turns[:3], "completion": turns[3:]})
    assert tok.decode(ex.ids[ex.mask]) == "second<|im_end|>"
    ex = data.tokenize_row(tok, {"messages": turns})
    assert tok.decode(ex.ids[ex.mask]) == "first<|im_end|>second<|im_end|>"


def test_dataset_dict_split_and_hub_split(tok, tmp_path, hf_home):
    d = _dataset_dict(tmp_path, CONV, hf_home)
    assert len(_sft(tok, data.corpus_file(d, "test"))) == 1
    hub_snapshot(hf_home, "org/name", CONV)
    assert data.corpus_file("org/name", "test") == Path("org/name:test")
    with pytest.raises(InputError, match=r"org/name:test: no split 'test'"):
        data.load_examples(tok, data.corpus_file("org/name", "test"), 256)


# --- standard (string) rows: TRL's semantics, checked against TRL itself -------------------------------------


def _trl_stub(tok):
    return types.SimpleNamespace(_tokenizer=tok, completion_only_loss=True, chat_template=None)


def _trl_args(cls, tmp_path):
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True)


STD_PC = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Two plus two is", "completion": " four."}]
STD_TEXT = [{"text": "Hermione read every book in the library."}, {"text": "Ron ate.<|im_end|>"}]


def test_standard_sft_rows_match_trl(tok, tmp_path):
    pytest.importorskip("trl")
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    for rows, writer in ((STD_PC, _parquet), (STD_TEXT, lambda t, r, h: write_jsonl(t / "text.jsonl", r))):
        ours = _sft(tok, writer(tmp_path, rows, None))
        trl = SFTTrainer._prepare_dataset(_trl_stub(tok), datasets.Dataset.from_list(rows), tok,
                                          _trl_args(SFTConfig, tmp_path), False, None, "train")
        assert ours == [(r["input_ids"], [lab != -100 for lab in r["labels"]]) for r in trl]
    # what the standard form means: the plain text, no chat template, EOS once at the end
    ids, mask = _sft(tok, write_jsonl(tmp_path / "pc.jsonl", STD_PC))[0]
    assert tok.decode(ids) == "The sky is blue.<|im_end|>" and tok.decode(np.array(ids)[mask]) == " blue.<|im_end|>"


def _pairs(tok, spec):
    pairs, _ = dpo_data.load_pairs(tok, dpo_data.dpo_file(spec), 256)
    return [(p.prompt.tolist(), p.chosen.tolist(), p.rejected.tolist()) for p in pairs]


def test_standard_dpo_rows_match_trl(tok, tmp_path):
    pytest.importorskip("trl")
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    explicit = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five.<|im_end|>"}]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    for rows in (explicit, implicit):
        ours = _pairs(tok, write_jsonl(tmp_path / "p.jsonl", rows))
        trl = DPOTrainer._prepare_dataset(_trl_stub(tok), datasets.Dataset.from_list(rows), tok,
                                          _trl_args(DPOConfig, tmp_path), "train")
        assert ours == [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trl]
    assert tok.decode(ours[0][1]) == " blue.<|im_end|>"


# --- DPO: every source and shape against the explicit-prompt conversational JSONL -----------------------------


def _implicit(rows):
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]


def _string_answers(rows):
    return [{"prompt": r["prompt"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]}
            for r in rows]


@pytest.mark.parametrize("source", [_json, _parquet, _save_to_disk, _hub_snapshot], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("shape", [lambda r: r, _implicit, _string_answers], ids=["explicit", "implicit", "strings"])
def test_dpo_every_source_and_shape_matches_the_conversational_jsonl(tok, tmp_path, hf_home, source, shape):
    ref = _pairs(tok, write_jsonl(tmp_path / "ref" / "dpo" / "train.jsonl", PREF))
    assert _pairs(tok, tmp_path / "ref") == ref and len(ref) == 3
    assert _pairs(tok, write_jsonl(tmp_path / "jsonl.jsonl", shape(PREF))) == ref
    assert _pairs(tok, source(tmp_path, shape(PREF), hf_home)) == ref


# --- errors ---------------------------------------------------------------------------------------------------


def test_unknown_shapes_name_file_row_and_formats(tok, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", CONV[:1] + [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match=rf"^{f}:2: not a SFT row \(keys: answer, question\); accepted shapes: "
                                         r"\{\"messages\".*\{\"text\": str\}, \{\"prompt\", \"completion\"\}"):
        data.load_examples(tok, f, 256)
    p = _parquet(tmp_path, [STD_PC[0] | {"label": None, "chosen": " a", "rejected": " b"},
                            STD_PC[1] | {"label": True}], None)  # the missing columns read back as None
    with pytest.raises(InputError, match=rf"^{p}\[1\]: an unpaired preference \(KTO\) row .* accepted shapes: "
                                         r"\{\"prompt\", \"chosen\", \"rejected\"\}"):
        dpo_data.load_pairs(tok, p, 256)
    d = _save_to_disk(tmp_path, [{"chosen": "a b", "rejected": "a c", "x": 0}, {"x": 1}], None)
    with pytest.raises(InputError, match=rf"^{d}\[1\]: not a preference row \(keys: x\)"):
        dpo_data.load_pairs(tok, d, 256)
    with pytest.raises(InputError, match=r"prompt and completion must both be strings or both message lists"):
        data.tokenize_row(tok, {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "w")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=r"folder: a folder that is not a datasets save_to_disk folder"):
        formats.read_source(tmp_path / "folder")


def test_missing_hub_dataset_gives_the_download_command(tok, hf_home):
    assert data.corpus_file("org/absent") == Path("org/absent:train")
    with pytest.raises(InputError, match=r"^org/absent: dataset not in the local Hugging Face cache .*"
                                         r"hf download --repo-type dataset org/absent$"):
        data.load_examples(tok, data.corpus_file("org/absent"), 256)


def test_jsonl_and_json_need_no_datasets(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", CONV)
    (tmp_path / "b.json").write_text(json.dumps(CONV))
    code = ("import sys; from persllm_jax import formats; "
            f"assert len(formats.read_source({str(tmp_path / 'a.jsonl')!r})) == 3; "
            f"assert len(formats.read_source({str(tmp_path / 'b.json')!r})) == 3; "
            "assert not {'datasets', 'pyarrow', 'huggingface_hub'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- general-instruction mixing reads the same sources and shapes --------------------------------------------


def test_mixing_reads_every_source(tmp_path, hf_home):
    want = [r["messages"] for r in CONV]
    assert load_general(str(_parquet(tmp_path, _pc(CONV), hf_home)), None) == want
    assert load_general(_hub_snapshot(tmp_path, _sharegpt(CONV), hf_home), 2) == want[:2]
    assert load_general(str(_json(tmp_path, STD_PC, hf_home)), None)[0] == [
        {"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]
    with pytest.raises(DataGenError, match=r"rows.json\[0\]: a language-modeling text row has no turns to mix"):
        load_general(str(_json(tmp_path, STD_TEXT, hf_home)), None)
    with pytest.raises(DataGenError, match=r"mix.general: org/absent: dataset not in the local Hugging Face cache"):
        load_general("org/absent", None)
