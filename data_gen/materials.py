"""Persona folders: read and check persona.yaml, read the objective / subjective materials of each stage,
split them into paragraphs (blank-line separated) and chunks.

    <personas>/<name>/persona.yaml                    name, description, language, stages: [{id, label}]
    <personas>/<name>/<stage>/objective/*.{txt,md}     experiences and knowledge (facts)
    <personas>/<name>/<stage>/subjective/*.{txt,md}    the persona's own words (style, opinions)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from data_gen.errors import DataGenError
from persllm_jax.errors import InputError
from persllm_jax.io import read_yaml

KINDS = ("objective", "subjective")
UNSORTED = "unsorted"  # a stage folder of unsorted materials, sorted by the annotator (data_gen.classify)
SUFFIXES = (".txt", ".md")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def count_words(text: str) -> int:
    """Whitespace words, with each CJK character counted as a word (so budgets work for Chinese too)."""
    n_cjk = len(_CJK.findall(text))
    return len(_CJK.sub(" ", text).split()) + n_cjk


@dataclasses.dataclass(frozen=True)
class Stage:
    id: str
    label: str
    description: str = ""


@dataclasses.dataclass
class Persona:
    key: str  # folder name, used in ids
    name: str
    description: str
    language: str
    stages: list[Stage]
    path: Path

    def stage(self, sid: str) -> Stage:
        return next(s for s in self.stages if s.id == sid)


@dataclasses.dataclass(frozen=True)
class Chunk:
    id: str
    persona: str
    stage: str
    kind: str  # objective | subjective
    source: str  # file:line
    text: str


def _read_yaml(path: Path) -> dict:
    try:
        data = read_yaml(path)
    except InputError as e:
        raise DataGenError(str(e)) from None
    if not isinstance(data, dict):
        raise DataGenError(f"{path}: expected a mapping with keys name, stages (and description, language)")
    return data


def load_persona(folder: Path) -> Persona:
    folder = Path(folder)
    yml = folder / "persona.yaml"
    if not yml.is_file():
        raise DataGenError(f"{folder}: no persona.yaml (each folder under --personas must be a persona folder)")
    data = _read_yaml(yml)
    for key in ("name", "stages"):
        if key not in data or data[key] in (None, "", []):
            raise DataGenError(f"{yml}: missing key '{key}'")
    unknown = set(data) - {"name", "description", "language", "stages"}
    if unknown:
        raise DataGenError(f"{yml}: unknown key(s) {', '.join(sorted(unknown))}")
    if not isinstance(data["name"], str):
        raise DataGenError(f"{yml}: key 'name' must be a string")
    if not isinstance(data["stages"], list):
        raise DataGenError(f"{yml}: key 'stages' must be a list of {{id, label}}")
    stages = []
    for i, st in enumerate(data["stages"]):
        where = f"{yml}: stages[{i}]"
        if not isinstance(st, dict):
            raise DataGenError(f"{where} must be a mapping with keys id, label")
        for key in ("id", "label"):
            if st.get(key) in (None, ""):
                raise DataGenError(f"{where}: missing key '{key}'")
        extra = set(st) - {"id", "label", "description"}
        if extra:
            raise DataGenError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        sid = str(st["id"])
        if not _ID.match(sid):
            raise DataGenError(f"{where}: id {sid!r} must be letters, digits, '_', '-', '.'")
        if any(s.id == sid for s in stages):
            raise DataGenError(f"{where}: duplicate stage id {sid!r}")
        stages.append(Stage(sid, str(st["label"]), str(st.get("description") or "")))
    if not _ID.match(folder.name):
        raise DataGenError(f"{folder}: persona folder name must be letters, digits, '_', '-', '.'")
    ids = {s.id for s in stages}
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith(".") and sub.name not in ids:
            raise DataGenError(f"{sub}: unknown stage '{sub.name}' (stages in {yml.name}: {', '.join(s.id for s in stages)})")
    for s in stages:
        if (folder / s.id / UNSORTED).is_dir():
            continue
        for kind in KINDS:
            d = folder / s.id / kind
            if not d.is_dir():
                raise DataGenError(f"{d}: missing folder (stage '{s.id}' needs objective/ and subjective/, "
                                   f"or unsorted/ for the annotator to sort)")
    return Persona(folder.name, data["name"], str(data.get("description") or ""), str(data.get("language") or "en"),
                   stages, folder)


def load_personas(root: Path) -> list[Persona]:
    root = Path(root)
    if not root.is_dir():
        raise DataGenError(f"{root}: personas folder not found")
    if (root / "persona.yaml").is_file():
        return [load_persona(root)]
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))]
    if not folders:
        raise DataGenError(f"{root}: no persona folders")
    return [load_persona(p) for p in folders]


def _split_long(text: str, max_words: int) -> list[str]:
    if count_words(text) <= max_words:
        return [text]
    sentences = re.split(r"(?<=[.!?。！？])\s*", text)
    out, cur = [], []
    for s in sentences:
        if not s:
            continue
        if cur and count_words(" ".join(cur + [s])) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur.append(s)
    if cur:
        out.append(" ".join(cur))
    return out


def read_paragraphs(path: Path) -> list[tuple[int, str]]:
    """(first line number, paragraph) for each blank-line separated paragraph; markdown headings dropped."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataGenError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    out, cur, start = [], [], 0
    for i, line in enumerate(text.split("\n") + [""], 1):
        if line.strip():
            if not cur:
                start = i
            cur.append(line.strip())
        elif cur:
            para = " ".join(cur)
            if not (path.suffix == ".md" and all(x.startswith("#") for x in cur)):
                out.append((start, para))
            cur = []
    return out


def chunk_persona(p: Persona, max_words: int) -> list[Chunk]:
    """Chunks of every stage; those from unsorted/ have kind "unsorted" until the annotator sorts them."""
    chunks: list[Chunk] = []
    for s in p.stages:
        for kind in KINDS + (UNSORTED,):
            d = p.path / s.id / kind
            if not d.is_dir():
                continue  # load_persona checked that objective/ + subjective/ or unsorted/ exist
            files = [f for f in sorted(d.iterdir()) if f.is_file() and f.suffix in SUFFIXES and not f.name.startswith(".")]
            n = 0
            for f in files:
                paras = read_paragraphs(f)
                if not paras:
                    raise DataGenError(f"{f}: empty file (no paragraphs)")
                for line, para in paras:
                    for piece in _split_long(para, max_words):
                        chunks.append(Chunk(f"{p.key}/{s.id}/{kind[:3]}/{n:04d}", p.key, s.id, kind,
                                            f"{f.relative_to(p.path.parent)}:{line}", piece))
                        n += 1
            if n == 0:
                raise DataGenError(f"{d}: empty materials (no .txt or .md paragraphs)")
    return chunks
