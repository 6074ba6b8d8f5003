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


def _parse_correction(value: object) -> Correction | None:
    """The correction ``value`` holds, or None if a hand edit or a bad write damaged it: a NaN or
    out-of-bounds ratio would make every later estimate of the model wrong (even negative)."""
    if not isinstance(value, dict):
        return None
    ratio, samples = value.get("ratio"), value.get("samples")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        return None
    if not _RATIO_BOUNDS[0] <= ratio <= _RATIO_BOUNDS[1]:  # also false for NaN
        return None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        return None
    return Correction(float(ratio), samples)


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
    def from_json(cls, text: str, *, source: str = "corrections") -> Corrections:
        """The valid entries of ``text``; what is damaged is left out with one warning."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable %s: not valid JSON (%s)", source, exc)
            return cls()
        raw = data.get("corrections") if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            log.warning("ignoring unreadable %s: it holds no corrections object", source)
            return cls()
        parsed = {key: _parse_correction(value) for key, value in raw.items()}
        bad = [key for key, correction in parsed.items() if correction is None]
        if bad:
            log.warning(
                "ignoring %d damaged entries in %s (%s): each needs a ratio from %s to %s and samples >= 1",
                len(bad), source, ", ".join(bad), *_RATIO_BOUNDS,
            )  # fmt: skip
        return cls({key: c for key, c in parsed.items() if c is not None})

    @classmethod
    def load(cls, path: Path | None = None) -> Corrections:
        path = path or default_corrections_path()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable corrections file %s: %s", path, exc)
            return cls()
        return cls.from_json(text, source=f"corrections file {path}")

    def save(self, path: Path | None = None) -> None:
        """Write atomically (a temp file in the same directory, then a rename), so a reader or a
        second writer never sees half a file. Best effort: a cache that cannot be written (read-only,
        full) costs only the learning, with one warning per path, never the load that measured it."""
        path = path or default_corrections_path()
        try:
            _write_atomically(path, self.to_json())
        except OSError as exc:
            if path not in _UNSAVED:
                _UNSAVED.add(path)
                log.warning("cannot save memplan's learned corrections to %s: %s", path, exc)


_UNSAVED: set[Path] = set()  # paths already warned about: a server's every load would repeat it


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corrections-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
