"""Stacks of repeated blocks, found in tensor names: ``model.layers.3.`` is block 3 of the
decoder ``model.layers``; ``vision_tower.encoder.layers.0.`` block 0 of a vision tower. Each stack
gets the facts of its own part of config.json."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from memplan._safetensors import TensorEntry
from memplan.planner.config import fixed_tokens, read_architecture, section
from memplan.planner.model import LayerInfo, Role, Stack

__all__ = ["find_stacks"]

# A block is the first (outermost) numbered child of a stack container in a name: T5's
# ``decoder.block.3.layer.1.`` is block 3 of ``decoder.block``, not sub-layer 1 of block 3.
_BLOCK = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|block|layer))\.(\d+)\.")

# Towers and encoders say what they are in their module paths (``vision_tower``, ``model.encoder``);
# a stack that says nothing (``model.layers``, ``transformer.h``) is a decoder.
_ROLE_WORDS: tuple[tuple[tuple[str, ...], Role], ...] = (
    (("vision", "visual"), "vision"),
    (("audio",), "audio"),
    (("encoder",), "encoder"),
)

Entries = dict[str, tuple[TensorEntry, Path]]  # tensor name -> (its header entry, its file)


def find_stacks(
    entries: Entries, config: Mapping[str, Any], source: str
) -> tuple[tuple[Stack, ...], tuple[LayerInfo, ...]]:
    """Every stack of repeated blocks, and all their layers, stack after stack."""
    blocks = _blocks(entries)
    # Encoders and towers run before the decoder that reads them: streaming fetches in this order.
    prefixes = sorted(blocks, key=lambda prefix: (_role(prefix) == "decoder", prefix))
    stacks: list[Stack] = []
    layers: list[LayerInfo] = []
    for prefix in prefixes:
        members = _stack_layers(prefix, blocks[prefix], entries)
        stacks.append(_stack(prefix, len(layers), len(members), config, source))
        layers.extend(members)
    return tuple(stacks), tuple(layers)


def _blocks(names: Iterable[str]) -> dict[str, dict[int, list[str]]]:
    """stack prefix -> block number -> the names of its tensors, for every tensor inside a block."""
    found: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in names:
        match = _BLOCK.match(name)
        if match:
            found[match.group(1)][int(match.group(2))].append(name)
    return found


def _role(prefix: str) -> Role:
    """What a stack is, from its module path: towers and encoders say so in their names."""
    parts = prefix.lower().split(".")
    for words, role in _ROLE_WORDS:
        if any(word in part for part in parts for word in words):
            return role
    return "decoder"


def _stack_layers(prefix: str, blocks: dict[int, list[str]], entries: Entries) -> list[LayerInfo]:
    """A stack's blocks in order of their numbers. Numbers may skip: a stack can hold modules
    without parameters between its layers (Musicgen's), and whether a gap is a hole is the
    model's to say when it is built (a parameter the checkpoint lacks is an error there)."""
    layers = []
    for index in sorted(blocks):
        names = blocks[index]
        nbytes = sum(entries[name][0].nbytes for name in names)
        layers.append(LayerInfo(index, f"{prefix}.{index}", tuple(names), nbytes))
    return layers


def _image_model(prefix: str, config: Mapping[str, Any], source: str) -> bool:
    """Whether config.json describes an image model alone: image and patch sizes, and no text
    vocabulary anywhere (Fuyu keeps its vocabulary in ``text_config`` and its decoder under
    ``language_model``)."""
    if "language_model" in prefix or "vocab_size" in config or isinstance(config.get("text_config"), dict):
        return False
    return fixed_tokens(config, source) is not None


def _stack(prefix: str, start: int, count: int, config: Mapping[str, Any], source: str) -> Stack:
    role = _role(prefix)
    if role == "decoder" and _image_model(prefix, config, source):
        role = "vision"  # a path that says nothing, in an image model (ViT's ``layers``): no tokens to decode
    part = section(config, role)
    return Stack(
        prefix, role, start, count, read_architecture(part, source),
        tokens=None if role == "decoder" else fixed_tokens(part, source),
        cross_attention=role == "decoder" and bool(config.get("is_encoder_decoder")),
    )  # fmt: skip
