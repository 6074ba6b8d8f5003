"""Fixtures the loader tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.loaders.test_load import transformers_logits


@pytest.fixture(scope="module")
def want(tiny_llama: Path) -> torch.Tensor:
    """transformers' own logits for the tiny Llama: what every memplan load must reproduce."""
    return transformers_logits(tiny_llama)
