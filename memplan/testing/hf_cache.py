"""A Hugging Face cache laid out as ``huggingface_hub`` lays it out, for tests without a network.

``cache_repo(cache_dir, "org/name", folder)`` copies a saved model into
``models--org--name/blobs/<sha256>``, links each file from ``snapshots/<commit>/`` (relative
symlinks into ``blobs/``, as the hub does) and points ``refs/main`` at the commit, so
``huggingface_hub.snapshot_download(..., local_files_only=True)``, ``transformers`` and memplan
find it offline exactly as they find a real download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["cache_repo"]


def cache_repo(cache_dir: str | os.PathLike[str], repo_id: str, folder: str | os.PathLike[str], *,
               revision: str = "main") -> Path:  # fmt: skip
    """Put the files of ``folder`` in ``cache_dir`` as repo ``repo_id`` at ``revision``; return
    the snapshot folder."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() for p in files) + revision.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in files:
        blob = repo / "blobs" / _sha256(file)
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
