"""Helpers for testing with memplan: hollow checkpoints of real shapes, a Hugging Face cache
without a network, simulated devices."""

from memplan.testing.checkpoints import LLAMA_SHAPES, LlamaShape, write_llama_checkpoint
from memplan.testing.hf_cache import cache_repo

__all__ = ["LLAMA_SHAPES", "LlamaShape", "cache_repo", "write_llama_checkpoint"]
