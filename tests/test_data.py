"""Chat tokenization masks (SmolLM2 and Llama-3-style templates), packing, JSONL errors, data position."""

import json

import numpy as np
import pytest
from chat_fixtures import write_corpus

from persllm_jax.errors import InputError
from persllm_jax.model.weights import load_tokenizer
from persllm_jax.train import data

CONV = [
    {"role": "system", "content": "You are Hermione Granger."},
    {"role": "user", "content": "What is your favourite spell?"},
    {"role": "assistant", "content": "Wingardium Leviosa, of course! It's levi-O-sa."},
    {"role": "user", "content": "And Ron?"},
    {"role": "assistant", "content": "Ron is... Ron. Honestly!\n"},
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer("smollm2")


def _runs(mask):
    """Maximal runs of True as (start, end)."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def _assert_trained_exactly(tok, ex, eot, trim=False):
    answers = [m["content"].strip() if trim else m["content"] for m in CONV if m["role"] == "assistant"]
    runs = _runs(ex.mask)
    assert [tok.decode(ex.ids[a:b]) for a, b in runs] == [a + eot for a in answers]
    # nothing else is trained: every token outside the runs is template, system or user text
    assert ex.mask.sum() == sum(b - a for a, b in runs)
    assert int(np.sum(ex.ids[ex.mask] == tok.convert_tokens_to_ids(eot))) == len(answers)


def test_smollm2_template_mask(smol_tok):
    ex = data.tokenize_chat(smol_tok, CONV)
    _assert_trained_exactly(smol_tok, ex, "<|im_end|>")
    # the whole text still round-trips: the mask only selects, never alters
    assert smol_tok.decode(ex.ids) == smol_tok.apply_chat_template(CONV, tokenize=False)


def test_llama3_style_template_mask(smol_tok, tmp_path):
    smol_tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    ex = data.tokenize_chat(tok, CONV)
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text.startswith(tok.bos_token + "<|start_header_id|>system")
    _assert_trained_exactly(tok, ex, "<|eot_id|>", trim=True)
    # the assistant header is not trained, the token after each answer's eot is not trained
    hdr = tok.convert_tokens_to_ids("<|start_header_id|>")
    assert not ex.mask[ex.ids == hdr].any()


def test_packing_segments_positions_targets():
    mk = lambda n, first: data.Example(np.arange(first, first + n, dtype=np.int32), np.r_[np.zeros(2, bool), np.ones(n - 2, bool)])
    docs = [mk(5, 10), mk(4, 20), mk(6, 30), mk(3, 40)]
    rows = data.pack_rows(docs, 10)
    assert rows["tokens"].shape[1] == 10
    seg, pos, tgt, w = rows["segment_ids"], rows["positions"], rows["targets"], rows["weights"]
    assert len(seg) == 2  # best-fit decreasing: 6+4 | 5+3
    np.testing.assert_array_equal(seg[0], [1] * 6 + [2] * 4)
    np.testing.assert_array_equal(seg[1], [1] * 5 + [2] * 3 + [0, 0])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(rows["tokens"][1, :8], [10, 11, 12, 13, 14, 40, 41, 42])
    np.testing.assert_array_equal(tgt[1, :4], [11, 12, 13, 14])
    # the last token of a document predicts nothing (no crossing into the next document), padding has no weight
    assert w[1, 4] == 0 and w[1, 7] == 0 and w[1, 8] == 0 and w[0, 5] == 0
    np.testing.assert_array_equal(w[1, :5], [0, 1, 1, 1, 0])  # target t+1 weighted by mask[t+1]
    unpacked = data.pack_rows(docs, 10, packing=False)
    assert len(unpacked["tokens"]) == 4 and unpacked["weights"].sum() == rows["weights"].sum()


def test_truncation_counted(smol_tok, tmp_path):
    f = tmp_path / "c.jsonl"
    long = {"messages": [{"role": "user", "content": "hi " * 5}, {"role": "assistant", "content": "word " * 100}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    noroom = {"messages": [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok"}]}
    f.write_text("\n".join(json.dumps(r) for r in (long, short, noroom)) + "\n")
    ex, stats = data.load_examples(smol_tok, f, 64)
    assert (stats.conversations, stats.truncated, stats.dropped) == (3, 2, 1)
    assert len(ex) == 2 and max(len(e.ids) for e in ex) == 64


def test_jsonl_errors_name_file_and_line(smol_tok, tmp_path):
    f = tmp_path / "train.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    f.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(InputError, match=rf"{f}:3:2: invalid JSON"):
        data.read_rows(f)
    f.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(data.DataError, match=rf"{f}:2: conversation has no assistant turn"):
        data.load_examples(smol_tok, f, 64)
    f.write_text(json.dumps({"messages": [{"role": "wizard", "content": "a"}]}) + "\n")
    with pytest.raises(data.DataError, match=rf"{f}:1: messages\[0\] has unknown role 'wizard'"):
        data.load_examples(smol_tok, f, 64)
    f.write_text("\n\n")
    with pytest.raises(data.DataError, match="empty corpus"):
        data.read_rows(f)
    with pytest.raises(data.DataError, match="no such file"):
        data.corpus_file(tmp_path / "nowhere")


def test_data_position_resumes_the_same_stream(smol_tok, tmp_path):
    corpus = write_corpus(tmp_path, n=13, seed=3)
    ex, _ = data.load_examples(smol_tok, data.corpus_file(corpus), 96)
    full = [b for (b, _), _ in zip(data.batches(ex, 96, 3, seed=7), range(12))]  # crosses several epochs
    stream = data.batches(ex, 96, 3, seed=7)
    for _ in range(5):
        _, pos = next(stream)
    resumed = [b for (b, _), _ in zip(data.batches(ex, 96, 3, seed=7, start_row=pos), range(7))]
    assert pos == 15 and 36 > 2 * len(data.epoch_rows(ex, 96, 7, 0)["tokens"])  # the stream crosses epochs
    for a, b in zip(full[5:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # epochs are reshuffled: epoch 0 and epoch 1 differ
    e0, e1 = data.epoch_rows(ex, 96, 7, 0), data.epoch_rows(ex, 96, 7, 1)
    assert e0["tokens"].shape != e1["tokens"].shape or not np.array_equal(e0["tokens"], e1["tokens"])
