"""`persllm chat`: an interactive terminal chat with a persona, answers streamed as they are decoded.

The persona models answer as `[Analysis] ... [Response] ...` (the paper's chain of thought); the analysis is
hidden unless `/thoughts` (or `--thoughts`) shows it. The whole answer, analysis included, stays in the
history the model sees, as in its training conversations."""

from __future__ import annotations

import sys

from persllm_jax.serve.engine import Completion, Generator, SamplingParams
from persllm_jax.serve.personas import (DeltaText, StagePrompt, TalkError, ThoughtFilter, find_stage, split_thoughts,
                                        stage_name)

HELP = """commands:
  /reset          forget the conversation (keeps the stage)
  /stage          list the persona stages;  /stage ID  switch to one (the conversation goes on)
  /thoughts       show or hide the [Analysis] part of answers
  /system TEXT    use your own system prompt;  /system  shows the current one
  /help           this text
  /quit           leave (or Ctrl-D)"""


class ChatSession:
    def __init__(self, gen: Generator, stages: list[StagePrompt], sampling: SamplingParams, *,
                 system: str | None = None, show_thoughts: bool = False, chunk: int | None = None):
        self.gen, self.stages, self.sampling = gen, stages, sampling
        self.system, self.stage, self.persona = system, None, None
        self.show_thoughts, self.chunk = show_thoughts, chunk
        self.history: list[dict] = []
        self.turns = 0

    # -- state ------------------------------------------------------------------------------------

    def stage_names(self) -> list[str]:
        return [stage_name(s, self.stages) for s in self.stages]

    def set_stage(self, wanted: str) -> StagePrompt:
        st = find_stage(self.stages, wanted)
        self.stage, self.system, self.persona = stage_name(st, self.stages), st.system, st.persona
        return st

    def reset(self) -> None:
        self.history = []

    def toggle_thoughts(self) -> bool:
        self.show_thoughts = not self.show_thoughts
        return self.show_thoughts

    def messages(self, user: str | None = None, drop: int = 0) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        extra = [{"role": "user", "content": user}] if user is not None else []
        return sys_msg + self.history[2 * drop:] + extra

    # -- one turn ---------------------------------------------------------------------------------

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt, dropping the oldest exchanges if the conversation no longer fits the context."""
        ctx = self.gen.cfg.max_position_embeddings
        for drop in range(len(self.history) // 2 + 1):
            ids = self.gen.encode_chat(self.messages(user, drop))
            if len(ids) + self.sampling.max_new_tokens <= ctx:
                return ids
        raise TalkError(f"the message is too long: {len(ids)} tokens plus {self.sampling.max_new_tokens} to "
                        f"generate exceed the model's context of {ctx}")

    def ask(self, user: str, write=None) -> Completion:
        """Answer `user`, calling write(delta) with each new piece of visible text; the exchange joins the
        history. Returns the completion (its text keeps the analysis)."""
        ids = self.prompt_ids(user)
        sp = SamplingParams(**{**self.sampling.__dict__, "seed": self.sampling.seed + self.turns})
        view, deltas = ThoughtFilter(self.show_thoughts), DeltaText(sp.stop)
        final = None
        for (final,) in self.gen.stream([ids], sp, chunk=self.chunk):
            d = deltas.update(view.visible(final.text))
            if d and write:
                write(d)
        d = deltas.update(view.visible(final.text, final=True), final=True)
        if d and write:
            write(d)
        analysis, response = split_thoughts(final.text)
        if write and not self.show_thoughts and analysis and not response:
            write("(the answer has only an [Analysis] part; /thoughts shows it)")
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": final.text.strip()}]
        self.turns += 1
        return final


def repl(session: ChatSession, out=None) -> None:
    out = out or sys.stdout
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass

    def say(text: str = "", end: str = "\n"):
        out.write(text + end)
        out.flush()

    stage = f", stage {session.stage}" if session.stage else ""
    say(f"persllm chat{stage}; thoughts {'shown' if session.show_thoughts else 'hidden'}. "
        f"/help for commands, Ctrl-D to quit.")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            say()
            return
        except KeyboardInterrupt:
            say()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return
            if cmd == "/help":
                say(HELP)
            elif cmd == "/reset":
                session.reset()
                say("(conversation reset)")
            elif cmd == "/thoughts":
                say(f"(thoughts {'shown' if session.toggle_thoughts() else 'hidden'})")
            elif cmd == "/stage":
                if not arg:
                    names = session.stage_names()
                    say(f"(stages: {', '.join(names) if names else 'none known'}; current: {session.stage or '-'})")
                else:
                    try:
                        session.set_stage(arg)
                        say(f"(stage {session.stage}: {session.system})")
                    except TalkError as e:
                        say(f"({e})")
            elif cmd == "/system":
                if arg:
                    session.system, session.stage, session.persona = arg, None, None
                say(f"(system prompt: {session.system or 'none'})")
            else:
                say(f"(unknown command {cmd}; /help lists them)")
            continue
        say(f"{session.persona or 'model'}> ", end="")
        try:
            session.ask(line, write=lambda d: say(d, end=""))
        except TalkError as e:
            say(f"({e})", end="")
        except KeyboardInterrupt:
            say(" (interrupted)", end="")
        say()
