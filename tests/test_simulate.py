"""`persllm simulate`: agents take turns in a scene, each seeing the conversation from its own side."""

import json

from click.testing import CliRunner

from persllm_jax.cli import main
from persllm_jax.serve.simulate import Agent, agent_view
from talk_fixtures import STAGES, persona_models  # noqa: F401 (fixture)

SCENE = "A dinner at Babbage's house in 1844; they discuss machines and nature."


def test_each_agent_sees_its_own_side():
    agents = [Agent("Ada", None, STAGES["late"], "m"), Agent("Darwin", None, None, "m"), Agent("Mary", None, None, "m")]
    tr = [{"agent": "Ada", "text": "a1"}, {"agent": "Darwin", "text": "d1"}, {"agent": "Mary", "text": "m1"},
          {"agent": "Ada", "text": "a2"}]
    first = agent_view(agents, SCENE, [], 0)
    assert first[0] == {"role": "system", "content": STAGES["late"]}
    assert first[1]["role"] == "user" and SCENE in first[1]["content"] and "speak first" in first[1]["content"]
    ada = agent_view(agents, SCENE, tr, 0)
    assert [m["role"] for m in ada] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert ada[2]["content"] == "a1" and ada[3]["content"] == "Darwin: d1\nMary: m1" and ada[4]["content"] == "a2"
    darwin = agent_view(agents, SCENE, tr, 1)
    assert darwin[0]["content"] == "You are Darwin."
    assert [m["role"] for m in darwin] == ["system", "user", "assistant", "user"]
    assert darwin[1]["content"].endswith("Ada: a1") and darwin[2]["content"] == "d1"
    assert darwin[3]["content"] == "Mary: m1\nAda: a2"
    # a shortened history keeps the scene
    short = agent_view(agents, SCENE, tr, 1, keep=1)
    assert SCENE in short[1]["content"] and short[1]["content"].endswith("Ada: a2")


def test_simulate_two_agents_writes_transcript(persona_models, tmp_path):
    ada, model = persona_models["ada"], persona_models["model"]
    out = tmp_path / "scene"
    res = CliRunner().invoke(main, ["simulate", "--agent", f"Ada={ada}:late", "--agent", f"Darwin={model}",
                                    "--scene", SCENE, "--turns", "4", "--max-new-tokens", "8", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "scene.jsonl").read_text().splitlines()]
    head, turns = rows[0], rows[1:]
    assert head["type"] == "scene" and head["scene"] == SCENE
    assert [a["name"] for a in head["agents"]] == ["Ada", "Darwin"] and head["agents"][0]["system"] == STAGES["late"]
    assert [t["agent"] for t in turns] == ["Ada", "Darwin", "Ada", "Darwin"]
    assert [t["turn"] for t in turns] == [0, 1, 2, 3]
    assert all(t["completion_tokens"] > 0 and isinstance(t["text"], str) for t in turns)
    assert turns[3]["prompt_tokens"] > turns[1]["prompt_tokens"]  # later turns see the conversation so far
    md = (tmp_path / "scene.md").read_text()
    assert SCENE in md and md.index("**Ada:**") < md.index("**Darwin:**")
    assert md.count("**Ada:**") == 2 and md.count("**Darwin:**") == 2
    bad = CliRunner().invoke(main, ["simulate", "--agent", f"Ada={ada}:nosuch", "--agent", f"Darwin={model}",
                                    "--scene", SCENE, "--turns", "1"])
    assert bad.exit_code != 0 and "unknown stage 'nosuch'" in bad.output
