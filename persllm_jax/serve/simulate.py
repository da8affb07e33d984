"""`persllm simulate`: the paper's multi-agent case study. Agents take turns (round robin) in a scene; each
agent sees the conversation from its own side: the scene and the others' lines (`Name: text`) as user
messages, its own earlier lines as assistant messages, under its own persona system prompt."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

from persllm_jax.io import atomic_write_text, write_jsonl
from persllm_jax.serve.engine import Generator, SamplingParams
from persllm_jax.serve.personas import ModelPool, TalkError, find_stage, split_model_stage, split_thoughts


@dataclasses.dataclass
class Agent:
    name: str
    gen: Generator
    system: str | None
    model: str
    stage: str | None = None


def build_agents(pool: ModelPool, specs, base_spec: str | None = None) -> list[Agent]:
    agents: list[Agent] = []
    for text in specs:
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            raise TalkError(f"--agent {text!r}: expected NAME=MODEL_OR_RUN[:STAGE]")
        if any(a.name == name for a in agents):
            raise TalkError(f"--agent: two agents are named {name!r}")
        path, stage = split_model_stage(rest)
        if (Path(path) / "run.json").is_file():
            gen, stages = pool.run(path, base_spec)
        else:
            gen, stages = pool.base(path), []
        if stage:
            system = find_stage(stages, stage).system
        elif len(stages) == 1:
            system = stages[0].system
        else:
            system = None
        agents.append(Agent(name, gen, system, path, stage))
    return agents


def agent_view(agents: list[Agent], scene: str, transcript: list[dict], who: int, keep: int | None = None) -> list[dict]:
    """The chat messages agent `who` answers: its system prompt, the scene, the others' lines as user
    messages and its own as assistant messages. `keep` limits the history to the last `keep` turns."""
    me = agents[who]
    others = [a.name for i, a in enumerate(agents) if i != who]
    header = (f"[Scene] {scene}\nYou are {me.name}, in conversation with {', '.join(others)}. "
              f"Reply with your own next line only.")
    turns = transcript if keep is None else transcript[len(transcript) - keep:] if keep else []
    msgs = [{"role": "system", "content": me.system or f"You are {me.name}."}, {"role": "user", "content": header}]
    for t in turns:
        if t["agent"] == me.name:
            if msgs[-1]["role"] == "assistant":
                msgs[-1]["content"] += "\n" + t["text"]
            else:
                msgs.append({"role": "assistant", "content": t["text"]})
        else:
            line = f"{t['agent']}: {t['text']}"
            if msgs[-1]["role"] == "user":
                msgs[-1]["content"] += "\n" + line
            else:
                msgs.append({"role": "user", "content": line})
    if msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": "(your turn)"})
    elif not turns:
        msgs[-1]["content"] += "\nYou speak first."
    return msgs


def _spoken(raw: str, name: str) -> tuple[str | None, str]:
    analysis, response = split_thoughts(raw)
    text = response or (raw.strip() if not analysis else "")
    text = re.sub(rf"^\s*\**{re.escape(name)}\**\s*:\s*", "", text)  # a model that writes its own name tag
    return analysis, text.strip()


def run_scene(agents: list[Agent], scene: str, turns: int, sampling: SamplingParams, on_turn=None) -> list[dict]:
    transcript: list[dict] = []
    for t in range(turns):
        who = t % len(agents)
        me = agents[who]
        ctx = me.gen.cfg.max_position_embeddings
        keep = len(transcript)
        while True:  # drop the oldest turns until the view fits the context
            ids = me.gen.encode_chat(agent_view(agents, scene, transcript, who, keep))
            if len(ids) + sampling.max_new_tokens <= ctx or keep == 0:
                break
            keep -= 1
        if len(ids) + sampling.max_new_tokens > ctx:
            raise TalkError(f"the scene does not fit {me.name}'s context of {ctx} tokens")
        sp = dataclasses.replace(sampling, seed=sampling.seed + t)
        (c,) = me.gen.generate_ids([ids], sp)
        analysis, text = _spoken(c.text, me.name)
        turn = {"type": "turn", "turn": t, "agent": me.name, "text": text, "analysis": analysis, "raw": c.text,
                "finish_reason": c.finish_reason, "prompt_tokens": len(ids), "completion_tokens": len(c.token_ids),
                "history_turns": keep}
        transcript.append(turn)
        if on_turn:
            on_turn(turn)
    return transcript


def write_transcript(out: str | Path, scene: str, agents: list[Agent], transcript: list[dict]) -> tuple[Path, Path]:
    """OUT.jsonl (a scene row, then one row per turn) and OUT.md (the readable transcript)."""
    base = Path(out)
    if base.suffix in (".jsonl", ".md"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    jsonl, md = base.with_name(base.name + ".jsonl"), base.with_name(base.name + ".md")
    head = {"type": "scene", "scene": scene, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "agents": [{"name": a.name, "model": a.model, "stage": a.stage, "system": a.system} for a in agents]}
    write_jsonl(jsonl, [head, *transcript])
    lines = ["# Scene", "", scene, "", "## Participants", ""]
    for a in agents:
        lines.append(f"- **{a.name}**: {a.model}" + (f" (stage {a.stage})" if a.stage else "")
                     + (f" - system prompt: \"{a.system}\"" if a.system else ""))
    lines += ["", "## Transcript", ""]
    for t in transcript:
        lines += [f"**{t['agent']}:** {t['text'] or '(silence)'}", ""]
        if t["analysis"]:
            lines += ["<details><summary>analysis</summary>", "", t["analysis"], "", "</details>", ""]
    atomic_write_text(md, "\n".join(lines))
    return jsonl, md
