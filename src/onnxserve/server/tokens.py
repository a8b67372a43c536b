"""Bearer tokens and their scopes: the token file's format, and looking a presented token up in constant time.

A token file holds one token a line, followed by its scopes (comma-separated); blank lines and
``#`` comments are ignored::

    3q2-7w_Yk1bT0m-Vd4Lx9sPz8cRf  infer           # the application
    Zx81-pQ0vRy7sLm2Tn4bWc6dHe3f  infer,control   # the operator
    Pm5tQw2Er7yUi9oPa1sDf3gHj6kL  metrics         # Prometheus

``ONNXSERVE_AUTH_TOKENS`` holds the same entries, separated by newlines or ``;``.

Tokens are RFC 6750 ``b64token``s (letters, digits, ``-._~+/``, then ``=`` padding) of at least
:data:`MIN_TOKEN_LENGTH` characters. Only SHA-256 digests of the tokens are kept; a presented token's
digest is compared with every one of them by :func:`hmac.compare_digest`, without stopping at a match,
so the comparisons cost the same whichever token (or how much of one) matched. Error messages name
the line of a bad entry, never the token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from onnxserve.errors import ConfigError

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750's ``b64token``: what may follow ``Bearer`` in an Authorization header."""


class Scope(enum.Enum):
    """What a token may do (see "Authentication and TLS" in docs/security.md for the endpoints of each)."""

    INFER = "infer"  # inference, metadata, model readiness and configuration, statistics
    CONTROL = "control"  # the model repository: index, load, unload
    METRICS = "metrics"  # GET /metrics


SCOPE_NAMES = ", ".join(s.value for s in Scope)


@dataclass(frozen=True)
class TokenTable:
    """The accepted tokens (as SHA-256 digests) and the scopes of each."""

    entries: tuple[tuple[bytes, frozenset[Scope]], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ConfigError("no tokens given")

    def scopes_of(self, presented: str) -> frozenset[Scope] | None:
        """The scopes of ``presented``, or None if it is no accepted token; constant time in the token."""
        found = self.lookup(presented)
        return found[1] if found is not None else None

    def lookup(self, presented: str) -> tuple[int, frozenset[Scope]] | None:
        """The entry ``presented`` matches (its position, counted from 0, and its scopes), or None;
        constant time in the token. The position identifies the client that holds the token."""
        digest = _digest(presented)
        found: tuple[int, frozenset[Scope]] | None = None
        for position, (known, scopes) in enumerate(self.entries):
            if hmac.compare_digest(digest, known):
                found = position, scopes
        return found

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def parse(cls, text: str, source: str, unit: str = "line") -> TokenTable:
        """Read token lines; ``source`` and ``unit`` ("line N") say where an error is."""
        entries: list[tuple[bytes, frozenset[Scope]]] = []
        seen: dict[bytes, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}: {unit} {number}"
            fields = line.split()
            if len(fields) != 2:
                raise ConfigError(
                    f"{where}: expected 'TOKEN SCOPES' (scopes comma-separated from {SCOPE_NAMES}), "
                    f"found {len(fields)} field(s)"
                )
            token, scope_list = fields
            _check_token(token, where)
            digest = _digest(token)
            if digest in seen:
                raise ConfigError(f"{where}: the same token as {unit} {seen[digest]}; give each token once")
            seen[digest] = number
            entries.append((digest, _parse_scopes(scope_list, where)))
        if not entries:
            raise ConfigError(f"{source}: no tokens (expected lines of 'TOKEN SCOPES')")
        return cls(tuple(entries))

    @classmethod
    def read(cls, path: Path, option: str = "--auth-tokens") -> TokenTable:
        """Read a token file; errors name ``option`` and the file. Warns if others may read the file."""
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(f"{option} {path}: cannot read the token file: {reason}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)
        return cls.parse(text, f"{option} {path}")

    @classmethod
    def from_environment(cls, text: str, variable: str = "ONNXSERVE_AUTH_TOKENS") -> TokenTable:
        """Entries of the token file's form, separated by newlines or ``;``."""
        return cls.parse(text.replace(";", "\n"), variable, unit="entry")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _check_token(token: str, where: str) -> None:
    if not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(f"{where}: a token may hold only letters, digits and -._~+/ (then '=' padding)")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: the token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def _parse_scopes(text: str, where: str) -> frozenset[Scope]:
    scopes: set[Scope] = set()
    for name in text.split(","):
        try:
            scopes.add(Scope(name))
        except ValueError:
            raise ConfigError(f"{where}: unknown scope {name!r}; scopes are {SCOPE_NAMES}") from None
    return frozenset(scopes)
