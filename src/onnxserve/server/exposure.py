"""What guards the listeners: bearer tokens (or none) and TLS (or plain text), read from the settings at start-up.

Both listeners bind ``settings.host`` (127.0.0.1 unless told otherwise). Binding anything else is the
operator's explicit choice, and the server says so in the log when that leaves the ports open
(no tokens) or sends tokens in clear text (no TLS).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

from onnxserve.errors import ConfigError
from onnxserve.server.browser_guard import host_name, is_loopback_name
from onnxserve.server.settings import TOKENS_VARIABLE, ServerSettings
from onnxserve.server.tls import ServerTls
from onnxserve.server.tokens import TokenTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exposure:
    """The server's bearer tokens (None: every endpoint is open) and TLS material (None: plain text)."""

    tokens: TokenTable | None = None
    tls: ServerTls | None = None
    hosts: Callable[[str], bool] | None = None  # the Host names the HTTP port answers (None: any; browser_guard)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Exposure:
        """Read and check the token file (or inline tokens) and the TLS files; ConfigError names the option."""
        if settings.auth_tokens_file is not None and settings.auth_tokens is not None:
            raise ConfigError(f"give tokens in --auth-tokens FILE or in {TOKENS_VARIABLE}, not both")
        tokens = None
        if settings.auth_tokens_file is not None:
            tokens = TokenTable.read(settings.auth_tokens_file)
        elif settings.auth_tokens is not None:
            tokens = TokenTable.from_environment(settings.auth_tokens, TOKENS_VARIABLE)
        return cls(tokens, ServerTls.from_settings(settings), answered_hosts(settings))

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    def describe(self) -> str:
        """One line for the start-up log: what guards the ports."""
        auth = "open (no tokens)" if self.tokens is None else f"bearer tokens ({len(self.tokens)})"
        tls = "plain text" if self.tls is None else ("mutual TLS" if self.tls.mutual else "TLS")
        return f"{auth}, {tls}"

    def warn_if_exposed(self, address: str) -> None:
        """Log a warning when listening beyond loopback leaves the ports open or tokens in clear text."""
        if _is_loopback(address):
            return
        if self.tokens is None:
            log.warning(
                "listening on %s, reachable from other machines, without authentication: anyone who reaches "
                "the ports can run inference and read model metadata; give --auth-tokens FILE (or %s)",
                address,
                TOKENS_VARIABLE,
            )
        elif self.tls is None:
            log.warning(
                "listening on %s, reachable from other machines, without TLS: bearer tokens cross the network "
                "in clear text; give --tls-cert and --tls-key",
                address,
            )


def answered_hosts(settings: ServerSettings) -> Callable[[str], bool] | None:
    """Whether the HTTP port answers a ``Host`` name (``server.browser_guard``): the names of
    ``--allowed-hosts`` (``*``: any), else loopback names when it listens on loopback without a proxy
    declared (``--forwarded-allow-ips``: a proxy in front passes its clients' host names on), else any
    (None)."""
    entries = [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    if "*" in entries:
        return None
    given = {host_name(h) for h in entries}
    if given:
        return lambda name: name in given
    if settings.forwarded_allow_ips.strip():
        return None
    if _is_loopback(settings.host) or settings.host.strip().lower() == "localhost":  # (0.0.0.0 is every address)
        return is_loopback_name
    return None


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback
