"""Tiny chat tokenizers and corpora for trainer tests (offline, built in tmp_path)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

WORDS = ("i you he she we they am is are was the a an of to in on and but not yes no what who why how when where "
         "wand magic school friend book owl castle spell potion dark lord harry hermione ron house cup game "
         "fly broom read write think know like love hate good bad old new early late year now then always never "
         "system user assistant").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def save_word_tokenizer(path, template: str = CHATML):
    """A WordLevel tokenizer (vocab < 128) with a chat template, saved as tokenizer.json in `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + list(".,!?"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return fast


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS[:-3]) for _ in range(n)) + "."


def write_corpus(root, n: int = 24, seed: int = 0, lengths=(3, 14), turns=(1, 2)) -> Path:
    """CORPUS_DIR with sft/train.jsonl of `n` random conversations; assistant answers follow a fixed rule
    (the answer repeats the question's words in reverse) so a tiny model can learn them."""
    rng = random.Random(seed)
    root = Path(root)
    (root / "sft").mkdir(parents=True, exist_ok=True)
    with (root / "sft" / "train.jsonl").open("w") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": "you are harry ."}]
            for _ in range(rng.randint(*turns)):
                q = [rng.choice(WORDS[:-3]) for _ in range(rng.randint(*lengths))]
                msgs.append({"role": "user", "content": " ".join(q) + " ?"})
                msgs.append({"role": "assistant", "content": " ".join(reversed(q)) + " ."})
            f.write(json.dumps({"id": f"c{i}", "persona": "harry", "messages": msgs}) + "\n")
    return root


def tiny_model_dir(path, arch: str = "llama", template: str = CHATML, **overrides) -> Path:
    """A tiny random HF model plus the word tokenizer in one directory (what `persllm train sft --model` takes)."""
    from tiny import save_tiny

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
              num_hidden_layers=2, initializer_range=0.1)
    kw.update(overrides)
    save_tiny(arch, path, **kw)
    save_word_tokenizer(path, template)
    return Path(path)


def corpus_with_test_split(root, n: int, n_test: int):
    """A corpus of `n` training conversations whose sft/test.jsonl holds `n_test` others (held-out eval)."""
    import shutil

    corpus = write_corpus(root / "corpus", n=n, seed=1)
    held = write_corpus(root / "held", n=n_test, seed=2)
    shutil.copy(held / "sft" / "train.jsonl", corpus / "sft" / "test.jsonl")
    return corpus
