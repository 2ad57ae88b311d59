"""Optional API-key authentication: ``Authorization: Bearer <key>`` on every route but the public ones.

Keys never travel in the application's arguments (a Serve config is visible to anyone who can read
the cluster's dashboard or the RayService): :class:`AuthSettings` names *where* the ingress replica
reads them when it starts, an environment variable (on Kubernetes, filled from a Secret with
``valueFrom.secretKeyRef``) and / or a file (a Secret mounted as a volume). Several keys may be
given at once (comma, whitespace or newline separated) so that keys can be rotated without downtime.

Authentication is on when a key source holds at least one key, or when :attr:`AuthSettings.required`
is set: then a missing or empty source fails the ingress at start (fail closed) instead of serving
without authentication.

The check is constant-time (SHA-256 digests compared with :func:`hmac.compare_digest` against every
key), the key is never echoed in an error or written to a log, and ``/health`` (and anything in
:attr:`AuthSettings.public_paths`) stays open so that load balancers and Kubernetes probes need no
key. Refusals are 401 in OpenAI's error format with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from zipvl_ray.api.errors import error_payload

logger = logging.getLogger(__name__)

#: The default environment variable holding the accepted keys.
DEFAULT_API_KEYS_ENV = "ZIPVL_API_KEYS"
#: Keys are separated by commas or any whitespace (one per line in a mounted Secret).
_KEY_SEPARATORS = re.compile(r"[\s,]+")
#: A key is 8-512 printable ASCII characters without spaces or commas.
_KEY_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]{8,512}")
_ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class AuthSettings(BaseModel):
    """Where the ingress reads its API keys (the keys themselves never appear here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys_env: str | None = Field(
        DEFAULT_API_KEYS_ENV,
        description=(
            "Environment variable of the ingress replicas holding the accepted API keys (comma or "
            "whitespace separated); on Kubernetes fill it from a Secret. Unset or empty: no keys from there."
        ),
    )
    api_keys_file: str | None = Field(
        None,
        description="File holding accepted API keys, one per line (a Secret mounted as a volume).",
    )
    required: bool = Field(
        False,
        description=(
            "Refuse to start the ingress when no key is found (fail closed). When false, authentication is "
            "on exactly when a key source holds keys."
        ),
    )
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health"],
        description="Paths served without a key (exact matches): health probes.",
    )

    @field_validator("api_keys_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME_PATTERN.fullmatch(value):
            raise ValueError(f"api_keys_env must be an environment variable name, got {value[:60]!r}")
        return value

    @field_validator("public_paths")
    @classmethod
    def _check_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"public paths start with '/', got {path[:60]!r}")
        return paths

    def load_keys(self, environ: Mapping[str, str] | None = None) -> frozenset[str]:
        """The accepted keys from the configured sources (empty: authentication off).

        Parameters
        ----------
        environ : mapping, optional
            Where to read the environment variable (``os.environ`` by default).

        Raises
        ------
        ValueError
            A source holds something that is not a key, the file cannot be read, or ``required`` is
            set and no key was found. Messages name the source, never a key.
        """
        environ = os.environ if environ is None else environ
        keys: set[str] = set()
        if self.api_keys_env:
            keys |= parse_keys(environ.get(self.api_keys_env, ""), source=f"${self.api_keys_env}")
        if self.api_keys_file:
            try:
                text = Path(self.api_keys_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(
                    f"cannot read the API key file {self.api_keys_file!r}: {type(exc).__name__}"
                ) from None
            keys |= parse_keys(text, source=self.api_keys_file)
        if self.required and not keys:
            sources = [s for s in (self.api_keys_env and f"${self.api_keys_env}", self.api_keys_file) if s]
            raise ValueError(
                f"authentication is required but no API key was found in {' or '.join(sources) or 'any source'}"
            )
        return frozenset(keys)


def parse_keys(text: str, *, source: str) -> set[str]:
    """Split ``text`` into keys; a malformed entry fails (naming its position, not its value)."""
    keys = set()
    for position, key in enumerate(k for k in _KEY_SEPARATORS.split(text.strip()) if k):
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(
                f"API key #{position + 1} in {source} is malformed: keys are 8-512 printable ASCII characters "
                "without spaces or commas"
            )
        keys.add(key)
    return keys


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("latin-1") if isinstance(key, str) else key).digest()


class APIKeyMiddleware:
    """Require ``Authorization: Bearer <key>`` with one of ``keys`` on every HTTP path but ``public_paths``.

    A plain ASGI middleware: streams and disconnects pass through untouched. Paths are compared
    without the application's ``root_path`` (a Serve route prefix).
    """

    def __init__(self, app, keys: Collection[str], public_paths: Collection[str] = ("/health",)):
        if not keys:
            raise ValueError("APIKeyMiddleware needs at least one key")
        self.app = app
        self._digests = tuple(_digest(k) for k in keys)
        self.public_paths = frozenset(public_paths)

    def _accepts(self, presented: bytes) -> bool:
        digest = _digest(presented)
        accepted = False
        for known in self._digests:  # compare with every key: the time does not tell which matched
            accepted |= hmac.compare_digest(digest, known)
        return accepted

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _route_path(scope) in self.public_paths:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers") or []:
            if name.lower() == b"authorization":
                header = value
                break
        if header is None:
            await _refuse(
                send, "missing API key: send the header 'Authorization: Bearer <key>'", "missing_api_key"
            )
            return
        scheme, _, presented = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            await _refuse(
                send,
                "malformed Authorization header: expected 'Bearer <key>'",
                "invalid_authorization_header",
            )
            return
        if not self._accepts(presented.strip()):
            await _refuse(send, "invalid API key", "invalid_api_key")
            return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    path = scope.get("path", "") or ""
    root = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


async def _refuse(send, message: str, code: str) -> None:
    response = JSONResponse(
        status_code=401,
        content=error_payload(message, type="authentication_error", code=code),
        headers={"WWW-Authenticate": 'Bearer realm="zipvl-ray"'},
    )
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}


__all__ = ["DEFAULT_API_KEYS_ENV", "APIKeyMiddleware", "AuthSettings", "parse_keys"]
