"""`persllm chat`: [Analysis] hiding while streaming, stable deltas, history, and the real command driven
through a pseudo-terminal."""

import os
import pty
import select
import subprocess
import sys
import time

from persllm_jax.serve.chat import ChatSession
from persllm_jax.serve.engine import Completion, SamplingParams
from persllm_jax.serve.personas import DeltaText, StagePrompt, ThoughtFilter, split_thoughts
from talk_fixtures import ROOT, STAGES, env, persona_models  # noqa: F401 (fixture)

COT = "[Analysis] She would recall the engine. [Response] The Engine weaves algebra."


def _grow(text, step=3):
    return [text[:i] for i in range(step, len(text), step)] + [text]


def test_split_thoughts():
    assert split_thoughts(COT) == ("She would recall the engine.", "The Engine weaves algebra.")
    assert split_thoughts("plain answer") == (None, "plain answer")
    assert split_thoughts("[analysis] only thinking") == ("only thinking", "")
    assert split_thoughts("[Response] direct") == (None, "direct")


def test_thought_filter_streams_only_the_response():
    for show, want in ((False, "The Engine weaves algebra."), (True, COT)):
        f, d, out = ThoughtFilter(show), DeltaText(), ""
        for i, t in enumerate(_grow(COT)):
            vis = f.visible(t, final=i == len(_grow(COT)) - 1)
            out += d.update(vis)
        assert out == want
    f, d, out = ThoughtFilter(False), DeltaText(), ""
    for t in _grow("Hello, no tags here [Response] at all"):  # untagged output shows as it is
        out += d.update(f.visible(t))
    assert out == "Hello, no tags here [Response] at all"


def test_delta_text_holds_partial_characters_and_stop_prefixes():
    d = DeltaText(stops=("\n\nUser",))
    assert d.update("caf\ufffd") == "caf"
    assert d.update("café is") == "é is"
    assert d.update("café is good\n") == " good"  # "\n" could start the stop string
    assert d.update("café is good\n\nUs") == ""
    assert d.update("café is good", final=True) == ""  # the stop string was found and cut
    d2 = DeltaText(stops=("\n\nUser",))
    d2.update("a\n")
    assert d2.update("a\nb") == "\nb"


class FakeGen:
    """Streams a fixed answer in pieces; records the prompts it was given."""

    class cfg:
        max_position_embeddings = 60

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def encode_chat(self, messages):
        return [0] * sum(len(m["content"].split()) + 2 for m in messages)

    def stream(self, prompts, sp, chunk=None):
        self.prompts.append(prompts[0])
        for t in _grow(self.answer, 5):
            yield [Completion(t, [1] * len(t), "stop", len(prompts[0]))]


def test_session_hides_thoughts_keeps_them_in_history_and_trims_context():
    gen = FakeGen(COT)
    stages = [StagePrompt("ada", "early", STAGES["early"]), StagePrompt("ada", "late", STAGES["late"])]
    s = ChatSession(gen, stages, SamplingParams(max_new_tokens=10))
    s.set_stage("late")
    pieces = []
    s.ask("What is the engine?", pieces.append)
    assert "".join(pieces) == "The Engine weaves algebra." and len(pieces) >= 2
    assert s.history[-1]["content"] == COT  # the model sees its own analysis, as in training
    assert s.messages()[0] == {"role": "system", "content": STAGES["late"]}
    s.toggle_thoughts()
    pieces = []
    s.ask("Again?", pieces.append)
    assert "".join(pieces) == COT
    # older exchanges are dropped once the conversation outgrows the context (60 here)
    for _ in range(4):
        s.ask("one two three four five six", None)
    assert len(gen.prompts[-1]) + 10 <= 60 and len(s.history) == 12
    s.reset()
    assert s.history == [] and s.messages()[0]["content"] == STAGES["late"]


def _read_until(fd, needle, timeout=120, buf=None):
    buf = buf if buf is not None else bytearray()
    t0 = time.time()
    while needle.encode() not in buf:
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {needle!r}; got:\n{buf.decode(errors='replace')}")
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_in_a_pseudo_terminal(persona_models):
    run = persona_models["ada"]
    # the answer the chat should print: greedy, the run's adapter, the late stage's system prompt
    from persllm_jax.serve.personas import ModelPool

    gen, stages = ModelPool().run(run)
    session = ChatSession(gen, stages, SamplingParams(max_new_tokens=12))
    session.set_stage("late")
    expected = session.ask("Who are you?").text.strip()
    assert expected

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "persllm_jax", "chat", "--run", str(run), "--stage", "late",
                             "--max-new-tokens", "12"], stdin=slave, stdout=slave, stderr=slave, env=env(),
                            cwd=str(ROOT), close_fds=True)
    os.close(slave)
    try:
        out = _read_until(master, "you> ")
        assert b"stage late" in out
        os.write(master, b"Who are you?\n")
        out = _read_until(master, "you> ", buf=bytearray())
        text = out.decode(errors="replace").replace("\r", "")
        answer = text.split("ada_lovelace> ", 1)[1].rsplit("you> ", 1)[0].strip()
        assert answer == expected
        os.write(master, b"/reset\n")
        assert b"(conversation reset)" in _read_until(master, "you> ", buf=bytearray())
        os.write(master, b"Who are you?\n")  # same question on a fresh history: same greedy answer
        text = _read_until(master, "you> ", buf=bytearray()).decode(errors="replace").replace("\r", "")
        assert text.split("ada_lovelace> ", 1)[1].rsplit("you> ", 1)[0].strip() == expected
        os.write(master, b"/thoughts\n")
        assert b"(thoughts shown)" in _read_until(master, "you> ", buf=bytearray())
        os.write(master, b"/stage\n")
        assert b"early, late" in _read_until(master, "you> ", buf=bytearray())
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
