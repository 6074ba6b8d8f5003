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


def rewrite_in_place_keeping_mtime(folder: Path, other: Path) -> None:
    """Each shard of ``folder`` overwritten in place with ``other``'s shard of the same name (same
    inode, same size, other bytes), its mtime put back as ``os.utime`` lets any writer do."""
    import os

    for shard in folder.glob("*.safetensors"):
        before = shard.stat()
        with shard.open("r+b") as f:  # follows a link: a Hugging Face snapshot's lands in its blob
            f.write((other / shard.name).read_bytes())
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = shard.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino, before.st_size, before.st_mtime_ns
        )  # fmt: skip


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


# bitsandbytes runs a 4-bit layer on the CPU one of two ways. Where the CPU has AVX512-BF16, the
# first forward repacks the weight for a native kernel (``Linear4bit.support_avx512bf16_for_cpu``,
# set from ``has_avx512bf16()`` when the layer is built); elsewhere the generic path dequantizes.
BNB_CPU_PATHS = ["generic", "avx512-bf16"]


@pytest.fixture(params=BNB_CPU_PATHS)
def bnb_cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each 4-bit test runs on both CPU paths: the generic one on any CPU (the layers built in
    the test are told the CPU lacks the feature), the repacked one where the CPU has it."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    if request.param == "generic":
        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    elif not bitsandbytes.functional.has_avx512bf16():
        pytest.skip(
            "bitsandbytes' repacked 4-bit CPU kernel is native code for CPUs with AVX512-BF16, which "
            "this one lacks; test_4bit_layers_left_to_repack_are_the_ones_bitsandbytes_can_repack "
            "checks the repacking itself here"
        )
    return str(request.param)


def generic_where_bnb_cannot_repack(model: object) -> object:
    """transformers+bitsandbytes as it would run if it kept the 4-bit layers bitsandbytes cannot
    repack (inputs that are no whole number of quantization blocks, outputs that are no whole
    number of 32-row blocks) on the generic path, as memplan does: unfixed, their first forward
    fails on an AVX512-BF16 CPU. A restatement of bitsandbytes' own limits, not memplan's code."""
    import bitsandbytes as bnb

    for module in model.modules():  # type: ignore[attr-defined]
        if isinstance(module, bnb.nn.Linear4bit):
            rows, inputs = module.weight.quant_state.shape
            if inputs % module.weight.quant_state.blocksize or rows % 32:
                module.support_avx512bf16_for_cpu = False
    return model
