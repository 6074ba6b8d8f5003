"""Where a model comes from: a folder, one weights file, or a Hugging Face repo id.

``resolve`` turns any of them into a local path that :func:`~memplan.planner.inspect` reads;
nothing downstream cares where the files came from. A repo id is looked up in the local Hugging
Face cache first (``HF_HUB_CACHE``, else ``HF_HOME``/hub, read at call time), and downloaded
only when it is absent and ``HF_HUB_OFFLINE`` is not set, fetching only what a load needs
(weights of one format, their index, the JSON configs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from memplan.errors import CheckpointError, MissingDependency, ModelNotFound

__all__ = ["ModelNotFound", "hub_cache_dir", "looks_like_repo_id", "resolve"]

# "name" or "org/name", as the Hub spells them; a path that exists always wins.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_CONFIGS = ["*.json"]
_FORMATS = (["*.safetensors"], ["*.bin"])


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve(model: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A local folder or file for ``model``: the path itself when it exists, else the snapshot
    of repo id ``model`` (at ``revision``) in the Hugging Face cache, downloaded if allowed."""
    path = Path(model)
    if path.exists():
        return path
    text = str(model)
    if not looks_like_repo_id(text):
        raise CheckpointError(text, "does not exist")
    return _snapshot(text, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise MissingDependency("huggingface_hub", "hf", f"loading {repo_id!r} by repo id") from None
    cache = hub_cache_dir()
    cached = _cached_snapshot(huggingface_hub, repo_id, revision, cache)
    if cached is not None:
        return cached
    hint = f"run `huggingface-cli download {repo_id}`" + (
        " or set HF_HUB_OFFLINE=0" if _offline() else " on a machine with network access"
    )
    at = f" at revision {revision!r}" if revision else ""
    if _offline():
        raise ModelNotFound(
            repo_id, f"not in the Hugging Face cache at {cache}{at} (HF_HUB_OFFLINE is set); {hint}"
        )
    last: Exception | None = None
    for weights in _FORMATS:  # safetensors when the repo has them, else .bin
        try:
            folder = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, cache_dir=cache, allow_patterns=_CONFIGS + weights
                )
            )
        except (OSError, ValueError, HFValidationError) as exc:
            last = exc
            break
        if _has_weights(folder):
            return folder
    reason = f"{type(last).__name__}: {last}" if last else "the repo has no .safetensors or .bin weights"
    raise ModelNotFound(
        repo_id, f"not in the Hugging Face cache at {cache} and cannot be downloaded ({reason}); {hint}"
    )


def _cached_snapshot(hub: object, repo_id: str, revision: str | None, cache: Path) -> Path | None:
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(
            hub.snapshot_download(  # type: ignore[attr-defined]
                repo_id, revision=revision, cache_dir=cache, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return folder if _has_weights(folder) else None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
