"""Push an exported directory to the Hugging Face Hub (`create_repo`, then `upload_folder`, or
`upload_large_folder` for exports above LARGE_FOLDER_BYTES where huggingface_hub has it).

The token comes from `huggingface_hub.get_token()`: the `HF_TOKEN` environment variable, then the login store
that `hf auth login` writes (HF_HOME/token). It is handed to `huggingface_hub` in memory (sent as the
`Authorization: Bearer` header) and is never written to a file, printed, or put in an error message.
`HF_ENDPOINT` selects another hub (read at call time, so tests can point it at a local server).

Big folders: huggingface_hub < 1.0 has `upload_large_folder` (resumable, many commits); in later versions
`upload_folder` itself commits a large folder in batches and resumes (with hf_xet), and `upload_large_folder`
is gone, so `upload_folder` is used there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from persllm_jax.errors import PersllmError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
LARGE_FOLDER_BYTES = 5 * 10**9


class HubError(PersllmError, ValueError):
    pass


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError(f"--push-to-hub {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def hub_token() -> str:
    """The user's token as huggingface_hub finds it (HF_TOKEN, then the `hf auth login` store)."""
    from huggingface_hub import get_token

    token = (get_token() or "").strip()
    if not token:
        raise HubError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN "
                       "(or use --dry-run)")
    return token


token_from_env = hub_token  # the name this function had when it read only HF_TOKEN


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file the upload sends, sorted (dot-files, such as our marker, stay local)."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _redact(msg: str, token: str) -> str:
    return msg.replace(token, "***") if token else msg


def push(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
         endpoint: str | None = None, commit_message: str | None = None,
         large_folder_bytes: int = LARGE_FOLDER_BYTES) -> str:
    """Create the repo (if needed) and upload `folder`; returns the commit URL (or the repo URL after a
    multi-commit large-folder upload)."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    token = token or hub_token()
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="persllm-jax")
    plan = upload_plan(folder)
    patterns = [p for p, _ in plan]
    large = sum(n for _, n in plan) > large_folder_bytes and hasattr(api, "upload_large_folder")
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if large:
            api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                    allow_patterns=patterns)
            return str(url)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or "Upload persllm-jax export",
                                 allow_patterns=patterns)
    except Exception as e:  # HfHubHTTPError, connection errors, ...
        first = _redact(str(e).splitlines()[0] if str(e) else type(e).__name__, token)
        raise HubError(f"push to {repo_id} failed: {first}") from None
    return str(getattr(info, "commit_url", info))


__all__ = ["HubError", "LARGE_FOLDER_BYTES", "check_repo_id", "hub_token", "push", "token_from_env", "upload_plan"]
