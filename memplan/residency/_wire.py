"""How a tensor becomes bytes and back, for the tiers that keep bytes rather than tensors.

Every dtype is stored as its raw bytes (a contiguous ``uint8`` view), so a round-trip is
bit-exact for floats, NaN payloads, bools and complex alike, and nothing is ever unpickled.
A blob is a valid safetensors file holding one ``U8`` tensor, ``data``; the tensor's real dtype,
shape, checksum and compression are in the header's ``__metadata__``.

The checksum guards against corruption (a torn write, a flipped bit, a truncated object), not
against someone who can write the blob: they could rewrite any checksum with it. So it is
XXH3-128 (``xxhash``), about 14 GB/s on one core here against SHA-256's 1.5, which had capped
reads of the disk tier at the speed of hashing. Content identity, where a collision would hand
one entry another's data, stays SHA-256 (``_groups.digest_of``). Blobs written as v1 carry a
SHA-256 and are still read and checked with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memplan._dtypes import torch_dtype_named, torch_name
from memplan.errors import MissingDependency, TierError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "Compression",
    "TensorMeta",
    "blob_header",
    "checksum",
    "decode",
    "encode",
    "from_raw",
    "hasher",
    "parse_blob",
    "payload_size",
    "raw_bytes",
    "same_dtype_view",
    "validate_key",
]

FORMAT = "memplan.tensor.v2"
_V1 = "memplan.tensor.v1"  # checksum: SHA-256 under the "sha256" key
CHECKSUM = "xxh3_128"
MAX_KEY_CHARS = 160  # base64 of the key must stay a legal file name (255 bytes)
HEADER_ROOM = 1024  # a blob's header, with its metadata, stays below this


def validate_key(tier: str, key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise TierError(tier, str(key), f"keys are non-empty strings of at most {MAX_KEY_CHARS} chars")
    return key


@dataclass(frozen=True)
class TensorMeta:
    """What a stored tensor's bytes mean."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: str
    compression: str = "none"
    algorithm: str = CHECKSUM

    def to_metadata(self, key: str) -> dict[str, str]:
        return {
            "format": FORMAT,
            "key": key,
            "dtype": self.dtype,
            "shape": json.dumps(list(self.shape)),
            "nbytes": str(self.nbytes),
            "checksum": f"{self.algorithm}:{self.checksum}",
            "compression": self.compression,
        }

    @classmethod
    def from_metadata(cls, tier: str, key: str, metadata: dict[str, str]) -> TensorMeta:
        try:
            if metadata["format"] not in (FORMAT, _V1) or metadata["key"] != key:
                raise ValueError(f"written as {metadata['format']!r} for key {metadata['key']!r}")
            shape = tuple(int(d) for d in json.loads(metadata["shape"]))
            if metadata["format"] == _V1:
                algorithm, digest = "sha256", metadata["sha256"]
            else:
                algorithm, _, digest = metadata["checksum"].partition(":")
                hasher(algorithm)  # refuses an algorithm this version cannot check
            return cls(
                metadata["dtype"], shape, int(metadata["nbytes"]), digest, metadata["compression"], algorithm
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise TierError(tier, key, f"not a memplan tensor blob: {exc}") from None


def hasher(algorithm: str = CHECKSUM) -> Any:
    """A fresh ``hashlib``-style object (``update``, ``hexdigest``) for ``algorithm``."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == CHECKSUM:
        import xxhash

        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def checksum(raw: torch.Tensor, algorithm: str = CHECKSUM) -> str:
    digest = hasher(algorithm)
    digest.update(raw.numpy().data)
    return str(digest.hexdigest())


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat ``uint8`` tensor on its own device; a view when contiguous."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def same_dtype_view(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``raw`` (a copy of ``like``'s bytes) seen with ``like``'s dtype and shape.

    Copies go through bytes because torch has no copy kernel for some dtypes (int1..int7,
    bits*), and a byte copy is bit-exact for all of them.
    """
    return raw.view(like.dtype).reshape(like.shape)


def dtype_named(tier: str, key: str, name: str) -> torch.dtype:
    """The torch dtype a blob's metadata names (by its torch attribute name: any torch dtype)."""
    dtype = torch_dtype_named(name)
    if dtype is None:
        raise TierError(tier, key, f"unknown dtype {name!r}")
    return dtype


def dtype_name(tier: str, key: str, tensor: torch.Tensor) -> str:
    import torch

    if tensor.is_quantized or tensor.layout != torch.strided:
        raise TierError(tier, key, f"cannot store a {tensor.layout} {tensor.dtype} tensor")
    return torch_name(tensor.dtype)


def from_raw(tier: str, key: str, meta: TensorMeta, raw: torch.Tensor) -> torch.Tensor:
    """The tensor ``meta`` describes, as a view of the ``uint8`` tensor ``raw``."""
    if raw.numel() != meta.nbytes or math.prod(meta.shape) * _itemsize(tier, key, meta) != meta.nbytes:
        raise TierError(tier, key, f"{raw.numel()} bytes do not hold a {meta.dtype} tensor of {meta.shape}")
    return raw.view(dtype_named(tier, key, meta.dtype)).reshape(meta.shape)


def _itemsize(tier: str, key: str, meta: TensorMeta) -> int:
    import torch

    return int(torch.empty((), dtype=dtype_named(tier, key, meta.dtype)).element_size())


class Compression:
    """zstd at ``level``, or nothing; imported only when a tier asks for it."""

    def __init__(self, kind: str = "none", level: int = 3) -> None:
        if kind not in ("none", "zstd"):
            raise TierError("compression", None, f"unknown compression {kind!r}; use 'none' or 'zstd'")
        self.kind = kind
        self.level = level
        if kind == "zstd":
            try:
                import zstandard
            except ImportError:
                raise MissingDependency("zstandard", "compress", "zstd compression") from None
            self._zstd = zstandard

    def compress(self, raw: torch.Tensor) -> bytes | torch.Tensor:
        if self.kind == "none":
            return raw
        return bytes(self._zstd.ZstdCompressor(level=self.level).compress(raw.numpy().data))

    def decompress(self, tier: str, key: str, meta: TensorMeta, payload: Any) -> torch.Tensor:
        import torch

        out = torch.empty(meta.nbytes, dtype=torch.uint8)
        if isinstance(payload, torch.Tensor):
            payload = payload.numpy().data
        try:
            with self._zstd.ZstdDecompressor().stream_reader(payload) as reader:
                filled = _read_fully(reader, out.numpy().data)
        except Exception as exc:  # zstd.ZstdError has no stable public base class
            raise TierError(tier, key, f"corrupt compressed data: {exc}") from None
        if filled != meta.nbytes:
            raise TierError(tier, key, f"compressed data holds {filled} bytes, expected {meta.nbytes}")
        return out


def _as_tensor(payload: bytes | memoryview) -> torch.Tensor:
    import torch

    if not len(payload):
        return torch.empty(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def _read_fully(reader: Any, out: memoryview) -> int:
    filled = 0
    while filled < len(out):
        n = reader.readinto(out[filled:])
        if not n:
            break
        filled += n
    return filled


def encode(tier: str, key: str, tensor: torch.Tensor, codec: Compression) -> tuple[TensorMeta, Any]:
    """``tensor``'s metadata and payload (its raw bytes, compressed if ``codec`` says so)."""
    name = dtype_name(tier, key, tensor)
    raw = raw_bytes(tensor).cpu()
    meta = TensorMeta(name, tuple(tensor.shape), raw.numel(), checksum(raw), codec.kind)
    return meta, codec.compress(raw)


def decode(tier: str, key: str, meta: TensorMeta, payload: Any, *, digest: str | None = None) -> torch.Tensor:
    """The tensor back from its payload, after checking its checksum (``digest``: the payload's,
    taken with ``meta.algorithm`` while it was read, so an uncompressed payload is not walked a
    second time)."""
    if meta.compression == "none" and digest is not None:
        if digest != meta.checksum:
            raise TierError(tier, key, "checksum mismatch: the stored bytes are corrupt")
        return from_raw(tier, key, meta, payload)
    if meta.compression == "zstd":
        raw = Compression("zstd").decompress(tier, key, meta, payload)
    elif meta.compression == "none":
        raw = payload if not isinstance(payload, bytes | memoryview) else _as_tensor(payload)
    else:
        raise TierError(tier, key, f"stored with unknown compression {meta.compression!r}")
    if raw.numel() != meta.nbytes or checksum(raw, meta.algorithm) != meta.checksum:
        raise TierError(tier, key, "checksum mismatch: the stored bytes are corrupt")
    return from_raw(tier, key, meta, raw)


def payload_size(payload: Any) -> int:
    return len(payload) if isinstance(payload, bytes) else int(payload.numel())


def blob_header(key: str, meta: TensorMeta, payload_bytes: int) -> bytes:
    """The safetensors header (length prefix included) of a blob holding ``payload_bytes``."""
    header = {
        "__metadata__": meta.to_metadata(key),
        "data": {"dtype": "U8", "shape": [payload_bytes], "data_offsets": [0, payload_bytes]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data buffer to 8 bytes
    return struct.pack("<Q", len(text)) + text


def parse_blob(tier: str, key: str, blob: bytes) -> tuple[TensorMeta, memoryview]:
    """The metadata and payload of a whole blob held in memory (a remote object)."""
    if len(blob) < 8:
        raise TierError(tier, key, f"blob is {len(blob)} bytes, shorter than its header length")
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8 : 8 + n])
        begin, end = header["data"]["data_offsets"]
        metadata = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TierError(tier, key, f"blob header is not valid: {exc}") from None
    if 8 + n + end != len(blob) or begin != 0:
        raise TierError(tier, key, f"blob is {len(blob)} bytes, its header describes {8 + n + end}")
    return TensorMeta.from_metadata(tier, key, metadata), memoryview(blob)[8 + n :]
