"""Shared fixtures: small real checkpoints written the way users' checkpoints are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def save_tiny_llama(
    path: Path,
    *,
    tie: bool = False,
    max_shard_size: str = "200KB",
    layers: int = 4,
    intermediate: int = 160,
    seed: int = 0,
) -> Path:
    """A random-init transformers Llama saved with save_pretrained (safetensors, sharded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=tie, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("models") / "tiny-llama-single", tie=True, max_shard_size="50MB"
    )


@pytest.fixture(scope="session")
def hollow_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memplan.testing import LLAMA_SHAPES, write_llama_checkpoint

    return write_llama_checkpoint(tmp_path_factory.mktemp("models") / "llama-70b", LLAMA_SHAPES["70b"])


@pytest.fixture(autouse=True)
def _private_corrections(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads on this machine record measured peaks; keep them out of the user's cache."""
    monkeypatch.setenv("MEMPLAN_CORRECTIONS", str(tmp_path_factory.mktemp("cache") / "corrections.json"))
    # Quantized loads keep their weights in the spill folder: each test gets its own, empty.
    monkeypatch.setenv("MEMPLAN_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))


def run_threads(worker: Callable[[int], object], count: int, timeout_s: float) -> list[BaseException]:
    """Run ``worker(0)`` .. ``worker(count - 1)`` at once; assert none is still running after
    ``timeout_s`` (a deadlock); return what they raised."""
    import threading

    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish"
    return errors


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


S3_KEY, S3_SECRET = "AKIAMEMPLANTESTKEY01", "memplan-test-secret-do-not-log"
S3_BUCKETS = ("conformance", "residency")


@pytest.fixture(scope="session")
def s3_endpoint() -> object:
    """A real S3 API (moto's server) on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
    )  # fmt: skip
    for bucket in S3_BUCKETS:
        client.create_bucket(Bucket=bucket)
    yield endpoint
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """fsspec storage options for the loopback S3 server; nothing reaches AWS."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    return {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A family of tests/compat/families.py (2 + 2 layers, hidden 32) saved once per session."""
    from tests.compat.families import FAMILIES, save_family

    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            family = next(f for f in FAMILIES if f.name == name)
            saved[name] = save_family(family, tmp_path_factory.mktemp("families") / name)
        return saved[name]

    return get
