"""Prompt templates (Jinja2 files, overridable per run) and parsing of the annotator's answers.

Shipped templates live in data_gen/templates/<language>/; a run's `templates.dir` holds files with the
same names that replace them one by one, so a persona in another language works once its templates
exist (either shipped or given)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from data_gen.errors import DataGenError
from data_gen.materials import count_words

SHIPPED = Path(__file__).parent / "templates"
NAMES = ("input_ordinary.j2", "input_thought.j2", "input_error.j2", "input_user.j2", "response_system.j2",
         "response_user.j2", "sft_system.j2", "fewshot.yaml")
OPTIONAL = ("classify.j2",)  # needed only when a stage has an unsorted/ folder


class Templates:
    def __init__(self, language: str, override_dir: str | None = None):
        self.language = language
        self.env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
        self.sources: dict[str, str] = {}
        self.paths: dict[str, str] = {}
        shipped = SHIPPED / language
        for name in NAMES + OPTIONAL:
            path = None
            if override_dir and (Path(override_dir) / name).is_file():
                path = Path(override_dir) / name
            elif (shipped / name).is_file():
                path = shipped / name
            if path is None and name in OPTIONAL:
                continue
            if path is None:
                where = f"{override_dir} or " if override_dir else ""
                raise DataGenError(f"no template {name} for language '{language}' (looked in {where}{shipped}); "
                                   f"give a folder of templates with --set templates.dir=DIR")
            try:
                self.sources[name] = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataGenError(f"{path}: not valid UTF-8") from None
            self.paths[name] = str(path)
        self.compiled = {}
        for name in self.sources:
            if name.endswith(".j2"):
                try:
                    self.compiled[name] = self.env.from_string(self.sources[name])
                except TemplateError as e:
                    line = getattr(e, "lineno", None)
                    raise DataGenError(f"{self.paths[name]}{f':{line}' if line else ''}: template error ({e})") from None
        try:
            fs = yaml.safe_load(self.sources["fewshot.yaml"]) or {}
            self.examples = list(fs.get("examples") or [])
            self.examples_persona = str(fs.get("persona") or "")
            for i, ex in enumerate(self.examples):
                if not all(isinstance(ex.get(k), str) for k in ("input", "analysis", "response")):
                    raise DataGenError(f"{self.paths['fewshot.yaml']}: examples[{i}] needs input, analysis, response")
        except (yaml.YAMLError, AttributeError) as e:
            raise DataGenError(f"{self.paths['fewshot.yaml']}: invalid few-shot file ({e})") from None

    def render(self, template: str, **kw) -> str:
        if template not in self.compiled:
            raise DataGenError(f"no template {template} for language '{self.language}'; "
                               f"give one with --set templates.dir=DIR")
        try:
            return self.compiled[template].render(**kw).strip()
        except TemplateError as e:
            raise DataGenError(f"{self.paths[template]}: cannot render ({e})") from None


# -- parsing --------------------------------------------------------------------------------------

_LEAD = re.compile(r"^\s*(?:\[?(?:question|input|q|opinion|thought|paragraph)\]?\s*[:：]?\s*|\d+[.)]\s+|[-*]\s+)",
                   re.IGNORECASE)
_TAG_A = re.compile(r"\[\s*analysis\s*\]", re.IGNORECASE)
_TAG_R = re.compile(r"\[\s*response\s*\]", re.IGNORECASE)


def _clean(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return text


def parse_input(text: str, type_: str, max_words: int) -> tuple[str | None, str | None]:
    """The generated input, or (None, reason): empty, too_long."""
    text = (text or "").strip()
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return None, "empty"
    if type_ == "thought":
        out = " ".join(_LEAD.sub("", ln, count=1) for ln in lines)
    else:
        # the first line that looks like a question; otherwise the first line
        first = next((ln for ln in lines if ln.rstrip().endswith(("?", "？"))), lines[0])
        out = _LEAD.sub("", first, count=1)
    out = _clean(out)
    if not out:
        return None, "empty"
    if count_words(out) > max_words:
        return None, "too_long"
    return out, None


def parse_response(text: str, cfg: dict) -> tuple[tuple[str, str] | None, str | None]:
    """((analysis, response), None) or (None, reason): no_response_tag, empty, refusal, too_long."""
    text = (text or "").replace("\r", "").strip()
    if not text:
        return None, "empty"
    m = list(_TAG_R.finditer(text))
    if m:
        head, resp = text[: m[0].start()], text[m[0].end():]
        resp = _TAG_R.sub(" ", resp)
        a = _TAG_A.search(head)
        analysis = head[a.end():] if a else head
    elif cfg["require_response_tag"]:
        return None, "no_response_tag"
    else:
        analysis, resp = "", _TAG_A.sub("", text)
    analysis = " ".join(analysis.split())
    resp = " ".join(resp.split())  # the paper removes newlines from outputs
    if not resp:
        return None, "empty"
    low = resp.lower()
    if any(re.search(p, low) for p in cfg["refusal_patterns"]):
        return None, "refusal"
    if count_words(resp) > cfg["max_words"]:
        return None, "too_long"
    return (analysis, resp), None


def format_cot(analysis: str, response: str) -> str:
    return f"[Analysis] {analysis} [Response] {response}" if analysis else f"[Response] {response}"
