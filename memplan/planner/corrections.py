"""Learned corrections: measured peaks from earlier loads scale the next estimate.

The loaders record ``(model fingerprint, strategy, device kind) -> measured / estimated``; the
planner multiplies its next estimate for the same key by that ratio. Ratios are smoothed and
clamped, so one odd measurement cannot make a model look twice its size. The file is small JSON
under the user's cache dir, written atomically; a damaged file is ignored, not fatal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Correction", "Corrections", "default_corrections_path"]

log = logging.getLogger(__name__)
_SMOOTHING = 0.5
_RATIO_BOUNDS = (0.5, 3.0)


def default_corrections_path() -> Path:
    configured = os.environ.get("MEMPLAN_CORRECTIONS")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("memplan") / "corrections.json"


@dataclass(frozen=True)
class Correction:
    ratio: float
    samples: int


class Corrections:
    """Ratios of measured to estimated peaks, by model, strategy and device kind."""

    def __init__(self, entries: dict[str, Correction] | None = None) -> None:
        self.entries: dict[str, Correction] = dict(entries or {})

    @staticmethod
    def key(fingerprint: str, strategy: str, device_kind: str) -> str:
        return f"{fingerprint}/{strategy}/{device_kind}"

    def factor(self, fingerprint: str, strategy: str, device_kind: str) -> float:
        found = self.entries.get(self.key(fingerprint, strategy, device_kind))
        return found.ratio if found else 1.0

    def record(
        self, fingerprint: str, strategy: str, device_kind: str, estimated: int, measured: int
    ) -> float:
        """Fold one measurement in; returns the new ratio. ``estimated`` is before correction."""
        if estimated <= 0 or measured <= 0:
            return self.factor(fingerprint, strategy, device_kind)
        key = self.key(fingerprint, strategy, device_kind)
        observed = min(max(measured / estimated, _RATIO_BOUNDS[0]), _RATIO_BOUNDS[1])
        old = self.entries.get(key)
        ratio = observed if old is None else old.ratio + _SMOOTHING * (observed - old.ratio)
        self.entries[key] = Correction(ratio, (old.samples if old else 0) + 1)
        return ratio

    def to_json(self) -> str:
        data = {k: {"ratio": c.ratio, "samples": c.samples} for k, c in sorted(self.entries.items())}
        return json.dumps({"version": 1, "corrections": data}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Corrections:
        data = json.loads(text)["corrections"]
        return cls({k: Correction(float(v["ratio"]), int(v["samples"])) for k, v in data.items()})

    @classmethod
    def load(cls, path: Path | None = None) -> Corrections:
        path = path or default_corrections_path()
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable corrections file %s: %s", path, exc)
            return cls()

    def save(self, path: Path | None = None) -> None:
        path = path or default_corrections_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corrections-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
