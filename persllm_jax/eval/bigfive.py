"""A Big Five questionnaire (IPIP 50-item markers, public domain; `ipip50.json`) administered in persona, with the
stage's time label in the system message, and scored offline from the model's likelihood of each Likert option:
the answer to an item is the expected option under the model's distribution over the five option digits at the
first answer token. Reverse-keyed items score 6 - answer; a variant that numbers the scale backwards maps its
option k to 6 - k first. Several prompt variants give:
- consistency: the spread (standard deviation) of each trait score across variants, per persona and stage;
- dynamic development: the change of each trait between the stages of a persona;
- distinction: the Euclidean distance between the trait profiles of personas (same stage, or stage-averaged).
"""

from __future__ import annotations

import itertools
import json
from importlib import resources

import numpy as np

from persllm_jax.eval import EvalError
from persllm_jax.io import read_json

SCALE = "1 = very inaccurate, 2 = moderately inaccurate, 3 = neither accurate nor inaccurate, 4 = moderately accurate, 5 = very accurate"
SCALE_REVERSED = "1 = very accurate, 2 = moderately accurate, 3 = neither accurate nor inaccurate, 4 = moderately inaccurate, 5 = very inaccurate"

# (name, user message template, reversed numbering)
VARIANTS = [
    ("describe", 'How accurately does this statement describe you?\n"{item}"\nAnswer with a single number: ' + SCALE + ".", False),
    ("rate", 'Rate the statement "{item}" as a description of yourself, from 1 (very inaccurate) to 5 (very accurate). '
             "Reply with the number only.", False),
    ("reversed", 'Statement: "{item}"\nHow well does it describe you? Answer with a single number: ' + SCALE_REVERSED + ".", True),
    ("agree", 'Do you agree with this about yourself: "{item}"? Answer with one digit from 1 (strongly disagree) to '
              "5 (strongly agree).", False),
]


def load_items(path: str | None = None) -> dict:
    if path:
        doc = read_json(path, "Big Five items file")
    else:
        doc = json.loads(resources.files(__package__).joinpath("ipip50.json").read_text(encoding="utf-8"))
    items = doc.get("items") if isinstance(doc, dict) else None
    if not items or not all({"trait", "key", "text"} <= set(it) and it["key"] in (1, -1) for it in items):
        raise EvalError(f"{path or 'ipip50.json'}: expected items with trait, key (+1/-1) and text")
    doc.setdefault("traits", list(dict.fromkeys(it["trait"] for it in items)))
    return doc


def first_person(text: str) -> str:
    """IPIP items omit the subject ("Am the life of the party."); the prompts use "I am the life of the party."."""
    t = text.strip()
    return t if t.lower().startswith("i ") else "I " + t[0].lower() + t[1:]


def pick_variants(names: list[str] | int | None) -> list[tuple]:
    if names is None:
        return VARIANTS
    if isinstance(names, int):
        if not 1 <= names <= len(VARIANTS):
            raise EvalError(f"bigfive.variants: 1..{len(VARIANTS)}")
        return VARIANTS[:names]
    known = {v[0]: v for v in VARIANTS}
    bad = [n for n in names if n not in known]
    if bad:
        raise EvalError(f"bigfive.variants: unknown {bad}; known: {list(known)}")
    return [known[n] for n in names]


def build_prompts(personas: dict[str, dict], items: list[dict], variants: list[tuple], system_fn=None) -> list[dict]:
    """One prompt per (persona, stage, variant, item): {"persona","stage","variant","item","messages"}."""
    system_fn = system_fn or (lambda p, stage, name, label: f"You are {name}. Now it's {label}.")
    out = []
    for p, info in personas.items():
        for stage, label in info["stages"].items():
            for vname, tmpl, _ in variants:
                for i, it in enumerate(items):
                    msgs = [{"role": "system", "content": system_fn(p, stage, info["name"], label)},
                            {"role": "user", "content": tmpl.format(item=first_person(it["text"]))}]
                    out.append({"persona": p, "stage": stage, "variant": vname, "item": i, "messages": msgs})
    return out


def expected_answer(option_logprobs: np.ndarray) -> np.ndarray:
    """[N, 5] log-probabilities (any normalisation) of options 1..5 -> expected option in [1, 5]."""
    lp = np.asarray(option_logprobs, np.float64)
    p = np.exp(lp - lp.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ np.arange(1, 6)


def score(prompts: list[dict], answers: np.ndarray, items: list[dict], variants: list[tuple], traits: list[str]) -> dict:
    """Trait scores (1-5) per persona/stage/variant from raw answers (option numbers as the prompt numbered them)."""
    rev = {v[0]: v[2] for v in variants}
    acc: dict = {}
    for pr, a in zip(prompts, answers):
        it = items[pr["item"]]
        a = 6 - a if rev[pr["variant"]] else a  # option number -> agreement 1..5
        s = a if it["key"] == 1 else 6 - a  # reverse keying
        acc.setdefault((pr["persona"], pr["stage"], pr["variant"]), {}).setdefault(it["trait"], []).append(float(s))
    out: dict = {}
    for (p, s, v), by_trait in acc.items():
        out.setdefault(p, {}).setdefault(s, {})[v] = {t: float(np.mean(by_trait[t])) for t in traits if t in by_trait}
    return out


def summarise(scores: dict, traits: list[str]) -> dict:
    """Means over variants, consistency (std across variants), dynamic development, persona distances."""
    profiles, consistency = {}, {}
    for p, stages in scores.items():
        for s, by_var in stages.items():
            mat = np.array([[by_var[v][t] for t in traits] for v in by_var])
            profiles.setdefault(p, {})[s] = dict(zip(traits, mat.mean(axis=0).tolist()))
            sd = mat.std(axis=0) if len(mat) > 1 else np.zeros(len(traits))
            consistency.setdefault(p, {})[s] = {"per_trait_std": dict(zip(traits, sd.tolist())), "mean_std": float(sd.mean())}
    dynamic = {}
    for p, st in profiles.items():
        names = sorted(st)
        for a, b in itertools.combinations(names, 2):
            d = {t: st[b][t] - st[a][t] for t in traits}
            dynamic.setdefault(p, {})[f"{a}->{b}"] = {"per_trait": d, "l2": float(np.linalg.norm(list(d.values())))}
    vec = lambda p, s=None: np.array([np.mean([profiles[p][x][t] for x in ([s] if s else profiles[p])]) for t in traits])  # noqa: E731
    names = sorted(profiles)
    pairs = {f"{a}|{b}": float(np.linalg.norm(vec(a) - vec(b))) for a, b in itertools.combinations(names, 2)}
    all_cons = [c["mean_std"] for st in consistency.values() for c in st.values()]
    all_dyn = [d["l2"] for st in dynamic.values() for d in st.values()]
    return {"profiles": profiles, "consistency": consistency, "dynamic": dynamic, "distance": pairs,
            "summary": {"consistency_mean_std": float(np.mean(all_cons)) if all_cons else None,
                        "dynamic_mean_l2": float(np.mean(all_dyn)) if all_dyn else None,
                        "distinction_mean_l2": float(np.mean(list(pairs.values()))) if pairs else None}}


def administer(option_logprobs_fn, personas: dict, doc: dict | None = None, variants=None, system_fn=None,
               max_items: int | None = None) -> dict:
    """Run the questionnaire: option_logprobs_fn(list of message lists) -> [N, 5] option log-probabilities."""
    doc = doc or load_items()
    items = doc["items"][:max_items] if max_items else doc["items"]
    variants = pick_variants(variants)
    traits = [t for t in doc["traits"] if any(it["trait"] == t for it in items)]
    prompts = build_prompts(personas, items, variants, system_fn)
    lp = np.asarray(option_logprobs_fn([pr["messages"] for pr in prompts]))
    if lp.shape != (len(prompts), 5):
        raise EvalError(f"option scorer returned shape {lp.shape}, expected {(len(prompts), 5)}")
    raw = score(prompts, expected_answer(lp), items, variants, traits)
    return {"traits": traits, "variants": [v[0] for v in variants], "n_items": len(items), "scores": raw,
            **summarise(raw, traits)}
