"""Models named by Hugging Face Hub id (`ORG/NAME[@REVISION]`), found in the local Hugging Face cache only.

The cache is the one `hf download` fills: HF_HUB_CACHE, else HF_HOME/hub (default ~/.cache/huggingface/hub),
read from the environment at call time. Nothing is downloaded here; a missing id is one line naming the
`hf download` command that fetches it. `weights.resolve_model_path` is the one caller.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from persllm_jax.errors import PersllmError


class WeightsError(PersllmError, ValueError):
    pass


HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})(?:@([\w./-]{1,200}))?$")


def parse_hub_id(spec: str | None) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` names a Hub model (`ORG/NAME[@REV]`) and no local path of that name
    exists (a local path always wins); else None."""
    if not spec or Path(spec).expanduser().exists():
        return None
    m = HUB_ID.match(spec)
    if not m or ".." in spec or m.group(2).endswith((".git", ".")):
        return None
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_snapshot(repo_id: str, revision: str | None, spec: str) -> Path:
    """The cached snapshot folder of a Hub model, offline (`local_files_only`): no network, no download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as e:
        why = "is incomplete in" if type(e).__name__ == "IncompleteSnapshotError" else "no such local path and not in"
        raise WeightsError(f"model {spec!r}: {why} the Hugging Face cache ({cache}); fetch it with: {fetch}") from None
    except HFValidationError as e:
        raise WeightsError(f"model {spec!r}: not a valid Hub id ({str(e).splitlines()[0]})") from None


__all__ = ["WeightsError", "parse_hub_id", "hub_cache_dir", "hub_snapshot"]
