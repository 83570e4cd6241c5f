"""DICOM TLS (PS3.15 Annex B, the BCP 195 profile): SSL contexts for the SCP and for destinations.

A shared leaf: the SCP's listener and every outgoing association (C-STORE, Storage
Commitment, the commitment follow-up) build their contexts here, so they follow one
policy: TLS 1.2 or newer, Python's default cipher suites, certificates checked.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from service.config import DestinationTls, ScpTlsSettings
from service.errors import ConfigError


def _load(what: str, action: object, *args: object) -> None:
    try:
        action(*args)  # type: ignore[operator]
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc


class _LazyHandshakeContext(ssl.SSLContext):
    """Wraps accepted sockets without handshaking yet.

    pynetdicom wraps each accepted socket in its accept loop; with the default the TLS
    handshake would run there too, and one client that connects and says nothing would stall
    every other connection for the network timeout. Deferred, OpenSSL completes the handshake
    on the first read, in that association's own thread.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(settings: ScpTlsSettings, *, lazy_handshake: bool = False) -> ssl.SSLContext:
    """The SCP's TLS context: our certificate, and client certificates checked against ca_file."""
    context = (_LazyHandshakeContext if lazy_handshake else ssl.SSLContext)(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("scp.tls.cert_file/key_file", context.load_cert_chain, str(settings.cert_file), str(settings.key_file))
    if settings.ca_file is not None:
        _load("scp.tls.ca_file", context.load_verify_locations, str(settings.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: DestinationTls, host: str) -> tuple[ssl.SSLContext, str]:
    """The context and server name for an association to a TLS destination."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.verify:
        if tls.ca_file is not None:
            _load("destination tls.ca_file", context.load_verify_locations, str(tls.ca_file))
        else:
            context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        _load("destination tls.cert_file/key_file", context.load_cert_chain, str(tls.cert_file),
              str(tls.key_file) if tls.key_file is not None else None)
    return context, tls.server_name or host


def tls_args(destination: object) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a destination (None: plain TCP)."""
    tls: DestinationTls = getattr(destination, "tls", DestinationTls())
    if not tls.enabled:
        return None
    return client_context(tls, str(getattr(destination, "host", "")))
