"""Shared by `chat`, `serve` and `simulate`: load a base model or a trained run (LoRA adapters share one base),
find a run's persona stages and the system prompt it was trained with, split `[Analysis] ... [Response] ...`
outputs, and turn growing completion texts into stable streaming deltas."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from persllm_jax.errors import InputError, PersllmError
from persllm_jax.io import iter_jsonl
from persllm_jax.runs import load_stages, read_run, stacked_adapter


class TalkError(PersllmError, ValueError):
    """A user-facing problem with a model, run directory, stage or persona (printed without a traceback)."""


# -- persona stages ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StagePrompt:
    persona: str | None  # corpus persona key (folder name) or None
    stage: str  # stage id
    system: str  # the system message the corpus (and so the model) used for this persona and stage


def corpus_stages(corpus: str | Path, max_rows: int = 200_000) -> list[StagePrompt]:
    """Every (persona, stage) of an SFT corpus file with the system message its rows carry, in corpus order
    (the first `max_rows` rows). A line that is not a JSON object is an InputError naming file:line:column."""
    path = Path(corpus)
    if path.is_dir():
        path = path / "sft" / "train.jsonl"
    if not path.is_file():
        raise TalkError(f"{corpus}: corpus file not found (the run's data); cannot look up persona stages")
    seen: dict[tuple, StagePrompt] = {}
    for i, (_, row) in enumerate(iter_jsonl(path)):
        if i >= max_rows:
            break
        stage, msgs = row.get("stage"), row.get("messages") or []
        if not stage or not isinstance(msgs, list) or not msgs or not isinstance(msgs[0], dict) \
                or msgs[0].get("role") != "system":
            continue
        key = (row.get("persona"), stage)
        if key not in seen:
            seen[key] = StagePrompt(row.get("persona"), str(stage), str(msgs[0].get("content", "")))
    return list(seen.values())


def persona_stages(persona_dir: str | Path) -> list[StagePrompt]:
    """Stages of a data_gen persona folder (persona.yaml), with the SFT system prompt data_gen writes."""
    from data_gen.errors import DataGenError
    from data_gen.materials import load_persona
    from data_gen.prompts import Templates

    try:
        p = load_persona(Path(persona_dir))
        tpl = Templates(p.language)
        return [StagePrompt(p.key, s.id, tpl.render("sft_system.j2", name=p.name, description=p.description,
                                                      label=s.label, stage_description=s.description))
                for s in p.stages]
    except DataGenError as e:
        raise TalkError(str(e)) from None


def find_stage(stages: list[StagePrompt], wanted: str) -> StagePrompt:
    """`wanted` is a stage id, or persona/stage when several personas share stage ids."""
    if not stages:
        raise TalkError(f"no persona stages known (give --run with a persona corpus, or --persona DIR); "
                        f"cannot select stage {wanted!r}")
    if "/" in wanted:
        p, s = wanted.split("/", 1)
        hits = [x for x in stages if x.persona == p and x.stage == s]
    else:
        hits = [x for x in stages if x.stage == wanted]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(stage_name(x, stages) for x in stages)
    if not hits:
        raise TalkError(f"unknown stage {wanted!r}; known: {names}")
    raise TalkError(f"stage {wanted!r} is ambiguous (several personas); use persona/stage: {names}")


def stage_name(x: StagePrompt, stages: list[StagePrompt]) -> str:
    personas = {s.persona for s in stages}
    return f"{x.persona}/{x.stage}" if len(personas) > 1 and x.persona else x.stage


# -- models and runs --------------------------------------------------------------------------------


class ModelPool:
    """Loads each base model once; trained runs become adapters over the shared base."""

    def __init__(self, dtype=None, chunk: int = 16, log=None):
        import jax.numpy as jnp

        self.dtype = dtype or jnp.float32
        self.chunk = chunk
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.bases: dict[str, tuple] = {}  # spec -> (Generator, hf_config)

    def base(self, spec: str | None):
        from persllm_jax.model.config import ModelConfigError
        from persllm_jax.model.weights import WeightsError, load_model, load_tokenizer
        from persllm_jax.serve.engine import Generator

        key = spec or "smollm2"
        if key not in self.bases:
            try:
                # weights stored in the serving dtype (a bfloat16 server holds half the bytes of a float32
                # copy): the decoder casts every weight to it before use, so only the embedding rows entering
                # the fp32 residual stream round, and not at all for checkpoints released in bfloat16
                loaded = load_model(key, self.dtype)
                tok = load_tokenizer(key)
            except (WeightsError, ModelConfigError, OSError) as e:
                raise TalkError(f"cannot load model {key}: {e}") from None
            if getattr(tok, "chat_template", None) is None:
                raise TalkError(f"{key}: the tokenizer has no chat template; chat needs an instruction-tuned model")
            gen = Generator(loaded.cfg, loaded.params, tok, dtype=self.dtype, chunk=self.chunk)
            self.bases[key] = (gen, loaded.hf_config)
        return self.bases[key][0]

    def run(self, run_dir: str | Path, base_spec: str | None = None, step: int | None = None):
        """(Generator, stages) for a trained run: its adapter over `base_spec` (default: the run's model)."""
        from persllm_jax.serve.engine import Generator

        info = read_run(run_dir)
        spec = base_spec or info.get("model")
        if not spec:
            raise TalkError(f"{run_dir}/run.json names no base model; give --model")
        base = self.base(spec)
        key = spec or "smollm2"
        trained_cfg, served_cfg = info.get("model_config"), self.bases[key][1]
        if trained_cfg and served_cfg and _arch(trained_cfg) != _arch(served_cfg):
            raise TalkError(f"{run_dir} was trained on {info.get('model')} whose architecture differs from "
                            f"the base model {spec}")
        if base_spec and info.get("model") and base_spec != info.get("model"):
            self.log(f"note: {run_dir} was trained on {info.get('model')}; using it over {base_spec} "
                     f"(same architecture)")
        _, _, chain = load_stages(run_dir, step)  # the run and its parents (a DPO run over its SFT run), root first
        # weights after the last full fine-tuning stage (else the shared base), then the LoRA stages after it
        # stacked into one adapter, so any number of chained adapters still shares the base in memory
        full = [i for i, st in enumerate(chain) if st.kind != "lora"]
        adapters = chain[full[-1] + 1:] if full else chain
        if full:
            base = Generator(base.cfg, chain[full[-1]].weights, base.tokenizer, dtype=self.dtype,
                             eos_token_ids=base.eos_token_ids, chunk=self.chunk)
        gen = base
        if adapters:
            weights, rank, alpha, _ = stacked_adapter(adapters, base.cfg)
            gen = base.with_adapter(weights, alpha / rank if len(adapters) > 1 else adapters[0].scale)
        stages: list[StagePrompt] = []
        if info.get("data"):
            try:
                stages = corpus_stages(info["data"])
            except (TalkError, InputError) as e:  # serving works without them; only stage names are lost
                self.log(f"note: {e}")
        return gen, stages


    def peft(self, adapter_dir: str | Path, base_spec: str | None = None):
        """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) over the shared base."""
        from persllm_jax.serve.adapters import load_peft_adapter

        base = self.base(base_spec)
        lora, scale = load_peft_adapter(adapter_dir, base.cfg)
        return base.with_adapter(lora, scale)


def _arch(hf_config: dict) -> tuple:
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    return tuple(hf_config.get(k) for k in keys)


def split_model_stage(text: str) -> tuple[str, str | None]:
    """`PATH[:STAGE]`: the stage suffix, unless the whole text is an existing path."""
    if Path(text).exists() or ":" not in text:
        return text, None
    path, stage = text.rsplit(":", 1)
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", stage):
        return text, None
    return path, stage


# -- [Analysis] / [Response] --------------------------------------------------------------------------

_TAG_A = re.compile(r"\[\s*analysis\s*\]", re.IGNORECASE)
_TAG_R = re.compile(r"\[\s*response\s*\]", re.IGNORECASE)
_A_LITERAL = "[analysis]"


def split_thoughts(text: str) -> tuple[str | None, str]:
    """(analysis or None, response) of a `[Analysis] ... [Response] ...` output; other text is all response."""
    m = _TAG_R.search(text)
    if m:
        head = text[: m.start()]
        a = _TAG_A.search(head)
        analysis = (head[a.end():] if a else head).strip()
        return (analysis or None), text[m.end():].strip()
    a = _TAG_A.match(text.lstrip())
    if a:
        return text.lstrip()[a.end():].strip() or None, ""
    return None, text.strip()


class ThoughtFilter:
    """The visible part of a growing output. With thoughts hidden, an output that starts with `[Analysis]`
    shows nothing until `[Response]`, then only what follows it; an output without tags shows as is.
    Visible text only ever grows, so it can be streamed."""

    def __init__(self, show_thoughts: bool = False):
        self.show = show_thoughts
        self.mode: str | None = None  # "raw" | "cot"

    def visible(self, text: str, final: bool = False) -> str:
        if self.show:
            return text
        if self.mode is None:
            s = text.lstrip().lower()
            if _TAG_A.match(text.lstrip()) or s.startswith("[response]"):
                self.mode = "cot"
            elif (s and not _A_LITERAL.startswith(s[: len(_A_LITERAL)]) and not "[response]".startswith(s[:10])) \
                    or len(s) > 24 or final:
                self.mode = "raw"
            else:
                return ""  # could still become a tag
        if self.mode == "raw":
            return text
        m = _TAG_R.search(text)
        if m:
            return text[m.end():].lstrip()
        return ""


# -- streaming deltas ------------------------------------------------------------------------------


class DeltaText:
    """Turns the growing text of one completion into deltas that never need taking back: the tail is held
    while it is an incomplete UTF-8 character or could be the start of a stop string."""

    def __init__(self, stops=()):
        self.stops = tuple(s for s in stops if s)
        self.sent = ""

    def ready(self, text: str, final: bool) -> str:
        if final:
            return text
        text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]

    def update(self, text: str, final: bool = False) -> str:
        ready = self.ready(text, final)
        if not ready.startswith(self.sent):
            # the decoded text changed behind what was already sent (a tokenizer that rewrites earlier text);
            # send only what follows the common prefix's end, never the sent part again
            if len(ready) <= len(self.sent):
                return ""
            delta = ready[len(self.sent):]
            self.sent = ready
            return delta
        delta = ready[len(self.sent):]
        self.sent = ready
        return delta
