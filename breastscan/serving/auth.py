"""Optional API-key authentication of the service, for HTTP and gRPC alike.

Keys are random tokens (:func:`new_key`, 256 bits) a client sends as ``Authorization:
Bearer <key>`` or ``X-API-Key: <key>`` (HTTP header or gRPC metadata). The service never
stores a key: it stores each key's SHA-256 (``sha256:<hex>``, with a label naming the
client), in a file or an environment variable that the serving config names
(:class:`breastscan.serving.config.Auth`). A random 256-bit token needs no slow password
hash: a fast hash of it cannot be brute-forced, and comparing hashes in constant time
(:func:`hmac.compare_digest`) leaks nothing about a key.

What stays open without a key: the health probes (``/healthz``, ``/livez``, ``/readyz``,
gRPC ``grpc.health.v1.Health``), the web UI's static files (the page asks for the key
and sends it with every call) and the API description (``/docs.json`` and BentoML's
Swagger page at ``/`` with its ``/static_content/`` files, gRPC reflection). Everything
else -- every model endpoint, ``/models``, ``/metrics`` -- answers ``401`` (``{"error",
"code": "unauthorized"}``) or gRPC ``UNAUTHENTICATED``; a websocket is closed (HTTP 403).
The HTTP check is the service's edge (:class:`breastscan.serving.http.Edge`), the gRPC one
:func:`grpc_interceptor`; both read the key with :func:`presented_key`.

Keys file format, one key per line (``#`` comments)::

    sha256:<64 hex digits> <label>
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from breastscan.serving.answer import ERROR_CODE_KEY, ERRORS

log = logging.getLogger(__name__)

OPEN_HTTP_PATHS = ("/", "/healthz", "/livez", "/readyz", "/docs", "/docs.json", "/ui", "/favicon.ico")
"""HTTP paths answered without a key (exactly these, and what is under :data:`OPEN_HTTP_PREFIXES`)."""
OPEN_HTTP_PREFIXES = ("/ui/", "/static_content/")
"""Path prefixes answered without a key: the web UI's files and those of BentoML's Swagger page."""
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""gRPC methods answered without a key."""
API_KEY_HEADER = "x-api-key"
"""Header (and gRPC metadata key) carrying a key; ``Authorization: Bearer`` works too."""
UNAUTHORIZED_MESSAGE = ("this service needs an API key: send it as 'Authorization: Bearer <key>' or "
                        "'X-API-Key: <key>'")
_PREFIX = "sha256:"


def new_key() -> str:
    """A new random API key (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>``."""
    return _PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, where: str) -> dict[str, str]:
    """Read hashed keys (``sha256:<hex> [label]`` per line or comma-separated); hash -> label.

    Raises:
        ValueError: a line that is not a SHA-256 hash (e.g. a key pasted in clear).
    """
    keys: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        for entry in line.split("#", 1)[0].split(","):
            digest, *rest = entry.split(None, 1) or [""]
            if not digest:
                continue
            hexpart = digest[len(_PREFIX):]
            if digest[:len(_PREFIX)].lower() != _PREFIX or len(hexpart) != 64 or not _is_hex(hexpart):
                # The entry itself is never shown: it may be a key pasted in clear.
                raise ValueError(f"{where}: line {n}: an entry is not 'sha256:<64 hex digits> [label]' "
                                 "(store the hash of a key, never the key: `breastscan api-key add`)")
            keys[digest.lower()] = (rest[0].strip() if rest else "") or f"key-{hexpart[:8].lower()}"
    return keys


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


@dataclass(frozen=True)
class ApiKeys:
    """The hashes of the keys the service accepts, each with its client's label."""

    hashes: Mapping[str, str]

    @classmethod
    def load(cls, keys_file: str | Path | None, keys_env: str | None,
             env: Mapping[str, str] | None = None) -> ApiKeys:
        """Read the keys from a file and/or an environment variable (both may be given).

        A missing file is no key (the variable may hold them all, as in a container).

        Raises:
            ValueError: no key at all (authentication on with nobody let in is a mistake),
                or a malformed entry.
        """
        env = os.environ if env is None else env
        hashes: dict[str, str] = {}
        if keys_file and Path(keys_file).is_file():
            hashes.update(parse_keys(Path(keys_file).read_text(), str(keys_file)))
        if keys_env and env.get(keys_env):
            hashes.update(parse_keys(env[keys_env], f"${keys_env}"))
        if not hashes:
            raise ValueError(f"authentication is on but no API key is configured: no key in the file "
                             f"{keys_file} (`breastscan api-key add` creates it) nor in ${keys_env}")
        log.info("API keys required: %d accepted key(s)", len(hashes))
        return cls(hashes)

    def client(self, key: str | None) -> str | None:
        """The label of the client whose key this is, ``None`` for a missing or unknown key."""
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for stored, label in self.hashes.items():  # every entry compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = label
        return found


def presented_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key a request carries in ``X-API-Key`` or ``Authorization: Bearer`` (names lower-case)."""
    for name, value in headers:
        if name == API_KEY_HEADER:
            return value.strip()
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def is_open_path(path: str) -> bool:
    """Whether an HTTP path is answered without a key (see :data:`OPEN_HTTP_PATHS`)."""
    return path in OPEN_HTTP_PATHS or path.startswith(OPEN_HTTP_PREFIXES)


def grpc_interceptor(keys: ApiKeys) -> Any:
    """A gRPC server interceptor refusing calls without a valid key (``UNAUTHENTICATED``).

    Health checks and reflection (:data:`OPEN_GRPC_PREFIXES`) pass without one. The refusal
    carries the trailing metadata ``error-code: unauthorized``, as every refusal does.
    """
    import grpc

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.set_trailing_metadata(((ERROR_CODE_KEY, "unauthorized"),))
        context.abort(getattr(grpc.StatusCode, ERRORS["unauthorized"].grpc), UNAUTHORIZED_MESSAGE)

    class KeyInterceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
            if details.method.startswith(OPEN_GRPC_PREFIXES):
                return continuation(details)
            metadata = ((str(k).lower(), str(v)) for k, v in details.invocation_metadata or ())
            if keys.client(presented_key(metadata)) is not None:
                return continuation(details)
            log.info("unauthorized gRPC call to %s", details.method)
            handler = continuation(details)
            if handler is None:
                return None
            if handler.request_streaming or handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(lambda _it, ctx: refuse(None, ctx))
            # The request is never parsed: the refusal reads none of it.
            return grpc.unary_unary_rpc_method_handler(refuse,
                                                       response_serializer=handler.response_serializer)

    return KeyInterceptor()


def add_key(keys_file: Path, label: str) -> str:
    """Create a key, append its hash and ``label`` to ``keys_file``; the key.

    A new file is created with mode 0600 (an existing one keeps its mode). The key itself
    is returned once and stored nowhere: give it to the client.
    """
    if not label or any(c.isspace() or c in "#," for c in label):
        raise ValueError("the label must be one word (no spaces, '#' or ',')")
    key = new_key()
    keys_file = Path(keys_file)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(keys_file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+b") as out:
        size = out.seek(0, os.SEEK_END)
        # A hand-edited file may end without a newline: the new entry must not join its last line.
        lead = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        out.write(lead + f"{hash_key(key)} {label}\n".encode())
    return key
