"""Push an exported directory to the Hugging Face hub (`create_repo` + `upload_folder`).

The token comes from the `HF_TOKEN` environment variable only. It is handed to `huggingface_hub` in memory
(which sends it as the `Authorization: Bearer` header) and is never written to a file, printed, or put in an
error message. `HF_ENDPOINT` selects another hub (read at call time, so tests can point it at a local server).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from persllm_jax.errors import PersllmError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(PersllmError, ValueError):
    pass


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError(f"--push-to-hub {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def token_from_env() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise HubError("--push-to-hub needs a token in the HF_TOKEN environment variable (or use --dry-run)")
    return token


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file `upload_folder` would send, sorted."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _redact(msg: str, token: str) -> str:
    return msg.replace(token, "***") if token else msg


def push(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
         endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Create the repo (if needed) and upload `folder` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    token = token or token_from_env()
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="persllm-jax")
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or "Upload persllm-jax export",
                                 allow_patterns=[p for p, _ in upload_plan(folder)])
    except Exception as e:  # HfHubHTTPError, connection errors, ...
        first = _redact(str(e).splitlines()[0] if str(e) else type(e).__name__, token)
        raise HubError(f"push to {repo_id} failed: {first}") from None
    return str(getattr(info, "commit_url", info))


__all__ = ["HubError", "check_repo_id", "push", "token_from_env", "upload_plan"]
