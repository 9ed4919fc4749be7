"""Hub repo ids: what counts as one, and a local snapshot of only the files a conversion needs."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pylomin.converter.checkpoint import EXTRA_FILES
from pylomin.errors import PylominError

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
_TORCH = ["*.bin", "*.bin.index.json"]


def is_repo_id(src: str | os.PathLike[str]) -> bool:
    """A source that is not an existing path but looks like `org/name` (or a bare `name`) is a Hub repo id."""
    s = os.fspath(src)
    return not Path(s).exists() and bool(_REPO_ID.match(s)) and not s.endswith((".safetensors", ".bin", ".pt"))


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the Hugging Face cache) config, tokenizer and weights of one format only.

    Safetensors are preferred; `.bin` files are fetched only when the repo has no safetensors.
    With `HF_HUB_OFFLINE=1` only the Hugging Face cache is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    def fetch(patterns: list[str]) -> Path:
        try:
            # Top-level files only: no onnx/, no other frameworks' subfolders.
            path = snapshot_download(
                repo_id, revision=revision, allow_patterns=[*EXTRA_FILES, *patterns], ignore_patterns=["*/*"]
            )
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise PylominError(
                f"`{repo_id}` is not a local path, and as a Hub repo id (revision {revision or 'main'}) it was not "
                f"found: {str(e).splitlines()[0]}"
            ) from None
        except LocalEntryNotFoundError:
            raise PylominError(
                f"`{repo_id}` is not a local path, and as a Hub repo id it is not in the Hugging Face cache while the "
                "Hub cannot be reached (HF_HUB_OFFLINE=1 or no network); download it once with network access, or "
                "give a local folder"
            ) from None
        return Path(path)

    folder = fetch(_SAFETENSORS)
    if not any(folder.glob("*.safetensors")):
        folder = fetch(_TORCH)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise PylominError(f"`{repo_id}` has no safetensors or .bin weights at its top level ({folder})")
    return folder
