"""TLS for both listeners: one certificate and key, and for mutual TLS the CA that signs client certificates.

Everything is read and checked at start-up (the files exist, are PEM, the key matches the certificate),
so a mistake stops the server with a message naming the option instead of failing at the first
handshake. Each listener gets an :class:`ssl.SSLContext` (TLS 1.2 or newer; ALPN ``http/1.1`` for
HTTP, ``h2`` for gRPC, whose TLS the port's front ends: ``server.grpc_front``). With a client CA both
listeners require a client certificate it signed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from onnxserve.errors import ConfigError
from onnxserve.server.settings import ServerSettings


@dataclass(frozen=True)
class ServerTls:
    """The checked TLS material of a server: a context for each listener."""

    context: ssl.SSLContext  # HTTP's (ALPN http/1.1)
    grpc_context: ssl.SSLContext  # the gRPC port's front's (ALPN h2)
    mutual: bool  # whether clients must present a certificate signed by the client CA

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ServerTls | None:
        """The TLS material ``settings`` names (None: plain text); ConfigError names the option at fault."""
        cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        if cert is None and key is None:
            if ca is not None:
                raise ConfigError(
                    "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS plus client certificates)"
                )
            return None
        if cert is None:
            raise ConfigError("--tls-key needs --tls-cert (the server's PEM certificate chain)")
        if key is None:
            raise ConfigError("--tls-cert needs --tls-key (the certificate's PEM private key)")
        _read(cert, "--tls-cert")
        _read(key, "--tls-key")
        if ca is not None:
            _read(ca, "--tls-client-ca")
        return cls(
            context=_context(cert, key, ca, "http/1.1"),  # the HTTP listener's only protocol
            grpc_context=_context(cert, key, ca, "h2"),  # gRPC is HTTP/2, always
            mutual=ca is not None,
        )


def _context(cert: Path, key: Path, ca: Path | None, protocol: str) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer) for the checked files, offering ``protocol`` by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([protocol])
    try:
        # a password callback that answers nothing: an encrypted key fails here instead of prompting
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        raise ConfigError(
            f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate chain and its unencrypted "
            f"private key ({e.reason or e})"
        ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise ConfigError(f"--tls-client-ca {ca}: not a PEM CA certificate bundle ({e.reason or e})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _read(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read the file: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{option} {path}: not a PEM file (no '-----BEGIN' line)")
    return data
