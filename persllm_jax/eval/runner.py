"""The models under evaluation ("systems"): the base model with a persona prompt, and trained runs (LoRA SFT, or a
DPO run whose `from` parent is merged into the base first). Batched, seeded answer generation and the option
log-probabilities the Big Five scorer needs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from persllm_jax.eval import EvalError
from persllm_jax.eval.corpus import prompt_of, response_part
from persllm_jax.io import read_yaml
from persllm_jax.runs import load_chain, merged_params, parent_of, read_run


@dataclasses.dataclass
class System:
    name: str
    gen: object  # persllm_jax.serve.engine.Generator
    kind: str  # "base" | "run"
    source: str
    run_dir: str | None = None
    persona_prompt: bool = False  # base: the system message is enriched from persona.yaml


def persona_descriptions(personas_dir: str | Path | None) -> dict[str, dict]:
    """{persona folder: {"description", "stages": {id: description}}} from PERSONAS_DIR/*/persona.yaml."""
    out: dict[str, dict] = {}
    if not personas_dir or not Path(personas_dir).is_dir():
        return out
    for f in sorted(Path(personas_dir).glob("*/persona.yaml")):
        doc = read_yaml(f, "persona file") or {}
        if not isinstance(doc, dict):
            raise EvalError(f"{f}: a persona file must be a YAML mapping")
        out[f.parent.name] = {"description": doc.get("description") or "",
                              "stages": {str(s.get("id")): s.get("description") or "" for s in doc.get("stages") or []}}
    return out


def persona_system(base_msg: str, persona: str, stage: str, desc: dict[str, dict]) -> str:
    """The base model's persona prompt: the corpus system message plus who the persona is at this stage."""
    d = desc.get(persona)
    if not d:
        return base_msg
    extra = [x for x in (d["description"], d["stages"].get(stage, "")) if x]
    text = base_msg
    if extra:
        text += " You are " + "; at this time, ".join(extra) + "."
    return text + " Stay in character: answer in the first person, in your own voice, and never say you are an AI."


def load_systems(model: str | None, runs: list[str], names: list[str] | None = None, with_base: bool = True,
                 log=None) -> list[System]:
    """The base (unless `with_base` is False) and every run as a System; `model` None: the first run's base."""
    from persllm_jax.serve.personas import ModelPool

    log = log or (lambda m: print(m, file=sys.stderr))
    pool = ModelPool(log=log)
    systems: list[System] = []
    if model is None and runs:  # the base of the first run (a DPO run: its SFT parent's base)
        d, seen = Path(runs[0]), set()
        info = read_run(d)
        while not info.get("model") and d.resolve() not in seen:
            seen.add(d.resolve())
            d, _ = parent_of(info, d)
            if d is None:
                break
            info = read_run(d)
        model = info.get("model")
    if with_base:
        systems.append(System("base+prompt", pool.base(model), "base", model or "smollm2", persona_prompt=True))
    for i, run in enumerate(runs):
        name = (names[i] if names and i < len(names) and names[i] else None) or Path(run).name
        parent, _ = parent_of(read_run(run), Path(run))
        gen = _chain_generator(run, pool, model) if parent is not None else pool.run(run, base_spec=model)[0]
        systems.append(System(name, gen, "run", str(run), run_dir=str(run)))
    seen = set()
    for s in systems:
        if s.name in seen:
            raise EvalError(f"two systems are named {s.name!r}; name runs with NAME=RUN_DIR")
        seen.add(s.name)
    return systems


def _chain_generator(run, pool, model):
    """A DPO (or other chained) run: parents merged into the base, the last stage's adapter on top."""
    from persllm_jax.serve.engine import Generator

    chain = load_chain(run)
    base = pool.base(model or chain.base_spec)
    last = chain.last
    if last.kind == "lora":
        params = merged_params(chain, upto=len(chain.stages) - 1)
        return Generator(base.cfg, params, base.tokenizer, lora=last.weights, lora_scale=last.scale,
                         eos_token_ids=base.eos_token_ids, chunk=base.chunk)
    return Generator(base.cfg, merged_params(chain), base.tokenizer, eos_token_ids=base.eos_token_ids, chunk=base.chunk)


def generate_answers(system: System, rows: list[dict], samples: int, sampling: dict, batch_size: int,
                     desc: dict | None = None, progress=None) -> list[dict]:
    """`samples` answers per test row (seeded: sample k uses seed + k, so reruns match)."""
    from persllm_jax.serve.engine import SamplingParams

    jobs = []
    for r in rows:
        msgs = prompt_of(r)
        if system.persona_prompt and desc:
            msgs = [{**m, "content": persona_system(m["content"], r["persona"], r["stage"], desc)} if m["role"] == "system"
                    else m for m in msgs]
        for k in range(samples):
            jobs.append((r, k, msgs))
    out = []
    order = sorted(range(len(jobs)), key=lambda j: sum(len(m["content"]) for m in jobs[j][2]))
    for b in range(0, len(order), batch_size):
        batch = [jobs[j] for j in order[b:b + batch_size]]
        sp = [SamplingParams(max_new_tokens=int(sampling["max_new_tokens"]), temperature=float(sampling["temperature"]),
                             top_p=float(sampling["top_p"]), top_k=int(sampling.get("top_k", 0)),
                             seed=int(sampling["seed"]) + k) for _, k, _ in batch]
        comps = system.gen.chat([m for _, _, m in batch], sp)
        for (r, k, _), c in zip(batch, comps):
            out.append({"key": f"{system.name}::{r['id']}::{k}", "id": r["id"], "persona": r["persona"],
                        "stage": r["stage"], "type": r["type"], "sample": k, "item": r["id"],
                        "raw": c.text, "text": response_part(c.text), "finish_reason": c.finish_reason})
        if progress:
            progress(len(batch))
    out.sort(key=lambda a: (a["id"], a["sample"]))
    return out


def option_token_ids(tokenizer) -> list[int]:
    ids = []
    for k in range(1, 6):
        toks = tokenizer(str(k), add_special_tokens=False)["input_ids"]
        if not toks:
            raise EvalError(f"the tokenizer has no token for option {k}")
        ids.append(toks[0])
    if len(set(ids)) != 5:
        raise EvalError("the tokenizer maps the options 1-5 to overlapping first tokens; cannot score Likert options")
    return ids


def option_logprobs_fn(gen, batch_size: int = 16, progress=None):
    """fn(list of message lists) -> [N, 5] log-probabilities of the digits 1..5 as the first answer token."""
    from persllm_jax.serve.scoring import next_token_logprobs

    options = option_token_ids(gen.tokenizer)
    return lambda conversations: next_token_logprobs(gen, [gen.encode_chat(m) for m in conversations], options,
                                                     batch_size, progress)
