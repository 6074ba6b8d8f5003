"""Helpers for testing with memplan: hollow checkpoints of real shapes, simulated devices."""

from memplan.testing.checkpoints import LLAMA_SHAPES, LlamaShape, write_llama_checkpoint

__all__ = ["LLAMA_SHAPES", "LlamaShape", "write_llama_checkpoint"]
