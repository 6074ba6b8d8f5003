"""``remote``: tensors as objects under any fsspec URL (``s3://bucket/prefix`` through s3fs).

Each call has connect and read timeouts (``timeout_s``; a server that accepts and never answers
fails the call instead of blocking it) and is retried with exponential backoff on transient
errors (connection, timeout, 5xx); after the last try, and at once for any other error, it
raises :class:`~memplan.RemoteTierError` and nothing in the tier changed, so the caller's data
stays where it was. The retries sleep under no lock of the tier's. Credentials are never
logged: messages name the URL without its user part and have every secret of
``storage_options`` masked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from memplan.errors import MissingDependency, RemoteTierError
from memplan.gpu import Device
from memplan.residency import _wire
from memplan.residency.tiers.base import Tier
from memplan.residency.tiers.disk import key_from_name, name_for_key
from memplan.units import parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["RemoteTier", "redact_url"]

log = logging.getLogger(__name__)
T = TypeVar("T")
UNBOUNDED = 2**62


def _split_credentials(url: str) -> tuple[str, str, str]:
    """``scheme://user:password@rest`` as (``scheme://rest``, user, password).

    Split by hand, at the last ``@``: a cloud secret may hold ``/`` or ``+``, which a URL parser
    takes for the start of the path, and the secret would then leak into a bucket name.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url, "", ""
    userinfo, _, host = rest.rpartition("@")
    user, _, password = userinfo.partition(":")
    return f"{scheme}://{host}", urllib.parse.unquote(user), urllib.parse.unquote(password)


def redact_url(url: str) -> str:
    """``url`` without a ``user:password@`` part."""
    bare, user, password = _split_credentials(url)
    if not (user or password):
        return url
    scheme, _, host = bare.partition("://")
    return f"{scheme}://***@{host}"


_SECRET_NAMES = ("key", "secret", "token", "password", "credential", "session")


def _secrets(options: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for name, value in options.items():
        if isinstance(value, dict):
            found += _secrets(value)
        elif isinstance(value, str) and value and any(s in name.lower() for s in _SECRET_NAMES):
            found.append(value)
    return found


def _transient_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import botocore.exceptions

        kinds += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(kinds)


# What a retry cannot fix: a bad request, a missing object, no permission (s3fs maps S3's
# error codes to these errnos; InternalError, SlowDown and ServiceUnavailable map to EIO/EBUSY).
_PERMANENT_ERRNOS = frozenset(
    {errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOENT, errno.ENOSYS, errno.ENAMETOOLONG, errno.EISDIR}
)


def _permanent(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS


def _with_timeouts(url: str, options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Connect and read timeouts, so a server that accepts and never answers fails a call in
    ``timeout_s`` instead of blocking it for good; the tier's own retries are the only ones."""
    if not url.startswith(("s3://", "s3a://")):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", timeout_s)
    config.setdefault("read_timeout", timeout_s)
    config.setdefault("retries", {"max_attempts": 1})
    return {**options, "config_kwargs": config}


class RemoteTier(Tier):
    """Objects under ``url``; ``storage_options`` go to fsspec (e.g. ``endpoint_url``, ``key``)."""

    kind = "remote"
    durable = True
    latency_s = 0.05

    def __init__(
        self,
        url: str,
        capacity: int | str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        compression: str = "none",
        retries: int = 4,
        backoff_s: float = 0.1,
        timeout_s: float = 30.0,
        bandwidth: float = 100e6,
        name: str | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise RemoteTierError(name or self.kind, None, f"timeout_s must be > 0, not {timeout_s}")
        cap = parse_size(capacity) if capacity is not None else UNBOUNDED
        super().__init__(device=Device("remote"), capacity=cap, bandwidth=bandwidth, name=name)
        self.url = redact_url(url)
        options = dict(storage_options or {})
        bare, user, password = _split_credentials(url)
        self._secret_values = _secrets(options) + [s for s in (password, user) if s]
        if bare.startswith(("s3://", "s3a://")) and (user or password):
            url = bare  # s3fs reads no credentials from a URL: they would become the bucket's name
            options.setdefault("key", user)
            options.setdefault("secret", password)
        self.codec = _wire.Compression(compression)
        self.timeout_s = timeout_s
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self._transient = _transient_errors()
        self.fs, self.root = self._connect(url, _with_timeouts(url, options, timeout_s))
        self._retry("create the prefix", None, lambda: self._call("makedirs", 0, self.root, exist_ok=True))
        self.recovered = self._recover()

    def _connect(self, url: str, options: dict[str, Any]) -> tuple[Any, str]:
        try:
            import fsspec
        except ImportError:
            raise MissingDependency("fsspec", "remote", "the remote tier") from None
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise MissingDependency(exc.name or "s3fs", "remote", f"the remote tier for {self.url}") from None
        except (ValueError, TypeError) as exc:
            raise RemoteTierError(self.name, None, f"cannot open {self.url}: {self._scrub(exc)}") from None
        if isinstance(getattr(fs, "retries", None), int):
            fs.retries = 1  # s3fs retries timeouts 5 times on its own; ours are the only retries
        return fs, str(root).rstrip("/")

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secret_values:
            text = text.replace(secret, "***")
        return text

    def _retry(self, what: str, key: str | None, op: Callable[[], T]) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return op()
            except Exception as exc:
                if _permanent(exc) or not isinstance(exc, self._transient):
                    raise RemoteTierError(
                        self.name, key, f"cannot {what} at {self.url}: {self._scrub(exc)}"
                    ) from None
                last = self._scrub(exc)
                log.warning("%s: %s failed (try %d of %d): %s", self.url, what, attempt, self.retries, last)
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
        raise RemoteTierError(
            self.name, key, f"cannot {what} at {self.url} after {self.retries} tries: {last}"
        )

    def _call(self, method: str, nbytes: int, *args: Any, **kwargs: Any) -> Any:
        """``fs.method(*args)`` within a deadline: the client's read timeout does not bound every
        stage of a request (a PUT to a server that accepts and never answers hung for minutes),
        so async filesystems (s3fs) run the call with a deadline of their own, which raises
        ``TimeoutError`` (retried like any timeout). It allows ``nbytes`` at 1 MB/s on top of
        four timeouts, so a large transfer on a slow link is not cut short."""
        if not getattr(self.fs, "async_impl", False):
            return getattr(self.fs, method)(*args, **kwargs)
        from fsspec.asyn import sync

        deadline = 4 * self.timeout_s + nbytes / 1e6
        return sync(self.fs.loop, getattr(self.fs, f"_{method}"), *args, timeout=deadline, **kwargs)

    def _object(self, key: str) -> str:
        return f"{self.root}/{name_for_key(key)}"

    def _recover(self) -> int:
        listing = self._retry("list", None, lambda: self._call("find", 0, self.root, detail=True))
        adopted = 0
        for path, info in listing.items():
            key = key_from_name(str(path).rsplit("/", 1)[-1])
            if key is not None and info.get("type", "file") == "file":
                self._adopt(key, None, int(info.get("size", 0)), int(info.get("size", 0)))
                adopted += 1
        return adopted

    def footprint(self, nbytes: int) -> int:
        return nbytes + _wire.HEADER_ROOM

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        meta, payload = _wire.encode(self.name, key, tensor, self.codec)
        body = payload if isinstance(payload, bytes) else payload.numpy().tobytes()
        blob = _wire.blob_header(key, meta, len(body)) + body
        self._check_room(key, len(blob), room)
        self._retry("write", key, lambda: self._call("pipe_file", len(blob), self._object(key), blob))
        return None, len(blob)

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        size = self.size_of(key)
        blob = self._retry("read", key, lambda: self._call("cat_file", size, self._object(key)))
        meta, payload = _wire.parse_blob(self.name, key, bytes(blob))
        return _wire.decode(self.name, key, meta, payload)

    def _discard(self, key: str, handle: Any) -> None:
        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):  # already gone: dropped either way
                self._call("rm_file", 0, self._object(key))

        self._retry("delete", key, remove)
