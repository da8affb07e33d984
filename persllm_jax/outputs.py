"""Output folders that never cost the user data: the one place every command that writes a folder (export, data
build, eval, reproduce, train) checks where it writes and how it replaces.

- `check_output(out, inputs)`: OUT may not be, contain, or lie inside an input of the same command (the run and
  its parents, the corpus, the persona folders, the model): `--out RUN --overwrite` must never delete the run.
- `mark(folder, command)` writes `.persllm-output.json` into every folder we create; `replace_dir(tmp, out,
  overwrite)` only ever replaces a folder that carries that marker (or is empty), so `--overwrite` never deletes
  a folder someone else wrote.
- The replacement is written beside OUT and swapped in at the end (one `renameat2(RENAME_EXCHANGE)` on Linux,
  else two renames), so an overwrite interrupted at any point leaves the old output whole.
Imports only the standard library and the error base.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from pathlib import Path

from persllm_jax.errors import PersllmError

MARKER = ".persllm-output.json"


class OutputError(PersllmError, ValueError):
    """An output folder that would overwrite an input or a folder we did not write."""


def _resolved(p) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def check_output(out: str | Path, inputs, flag: str = "--out", inside_ok: bool = False) -> None:
    """Refuse an OUT that is, contains or lies inside one of `inputs` (paths; None entries are skipped).
    `inside_ok`: a command that never deletes OUT (training) may write inside an input folder."""
    o = _resolved(out)
    for raw in inputs:
        if raw is None or str(raw) in ("", "smollm2"):
            continue
        i = _resolved(raw)
        if o == i:
            why = "is"
        elif i.is_relative_to(o):
            why = "contains"
        elif o.is_relative_to(i) and not inside_ok:
            why = "lies inside"
        else:
            continue
        raise OutputError(f"{flag} {out} {why} the input {raw}: writing there would destroy it; choose another {flag}")


def is_ours(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def mark(folder: str | Path, command: str) -> None:
    """Record that `command` wrote `folder` (what lets a later `--overwrite` replace it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"written_by": f"persllm {command}",
                                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


def check_replaceable(out: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """An existing OUT may be replaced only with `overwrite`, and only if we wrote it (or it is empty)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a directory")
    if not overwrite:
        raise OutputError(f"{out} already exists (pass --overwrite to replace it)")
    if not is_ours(out) and any(out.iterdir()):
        raise OutputError(f"{out} was not written by persllm (no {MARKER}); --overwrite only replaces our own "
                          f"outputs: remove it yourself or choose another {flag}")


def temp_beside(out: str | Path) -> Path:
    """A fresh, empty folder next to OUT (same filesystem, so the final rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # ours from before, or a killed writer's: never published
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(stale)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, out: Path, overwrite: bool, command: str) -> None:
    """Publish the finished folder `tmp` as OUT: marked as ours, swapped in whole, the old OUT removed last."""
    tmp, out = Path(tmp), Path(out)
    mark(tmp, command)
    if not out.exists():
        os.replace(tmp, out)
        return
    check_replaceable(out, overwrite)
    if _exchange(tmp, out):  # OUT is now the new folder, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["MARKER", "OutputError", "check_output", "check_replaceable", "is_ours", "mark", "temp_beside",
           "replace_dir"]
