"""JSON round-trips for memplan's config and result dataclasses, driven by their type hints.

Configs and results (``Plan``, strategies, ``Workload``, ``Policy``) are frozen dataclasses;
this turns them into plain JSON values and back, so none of them hand-writes ``from_dict``.
Unions of dataclasses are tagged with the class's ``kind`` field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

from memplan.gpu.device import Device, Inventory

__all__ = ["decode", "encode"]


def encode(value: Any) -> Any:
    """A JSON-ready value: dataclasses become dicts, devices and paths strings, tuples lists."""
    if isinstance(value, Device | Path):
        return str(value)
    if isinstance(value, Inventory):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def decode(hint: Any, data: Any) -> Any:
    """The value of type ``hint`` that :func:`encode` turned into ``data``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return data
    if origin in (Union, types.UnionType):
        return _decode_union(typing.get_args(hint), data)
    if origin is typing.Literal:
        if data not in typing.get_args(hint):
            raise ValueError(f"{data!r} is not one of {typing.get_args(hint)}")
        return data
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in data)
        return tuple(decode(a, v) for a, v in zip(args, data, strict=True))
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        return {decode(key_hint, k): decode(value_hint, v) for k, v in data.items()}
    return _decode_plain(hint, data)


def _decode_plain(hint: Any, data: Any) -> Any:
    if hint is Device:
        return Device.parse(data)
    if hint is Path:
        return Path(data)
    if hint is Inventory:
        return Inventory.from_dict(data)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, data)
    if hint is float and isinstance(data, int):
        return float(data)
    if hint in (int, float, str, bool) and not isinstance(data, hint):
        raise ValueError(f"expected {hint.__name__}, got {data!r}")
    return data


def _decode_union(options: tuple[Any, ...], data: Any) -> Any:
    if data is None and type(None) in options:
        return None
    classes = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
    if classes and isinstance(data, dict) and "kind" in data:
        for cls in classes:
            kinds = typing.get_args(typing.get_type_hints(cls).get("kind"))
            if data["kind"] in kinds:
                return _decode_dataclass(cls, data)
    for option in options:
        if option is type(None):
            continue
        try:
            return decode(option, data)
        except (ValueError, TypeError, KeyError):
            continue
    raise ValueError(f"{data!r} matches none of {options}")


def _decode_dataclass(cls: Any, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: decode(hints[f.name], data[f.name])
        for f in dataclasses.fields(cls)
        if f.init and f.name in data
    }
    return cls(**kwargs)
