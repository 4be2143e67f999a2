"""nats-py connection options from `[forward]`: servers, credentials, TLS."""

from __future__ import annotations

import ssl
from typing import Any

from auditd.config import ForwardConfig


def connect_options(settings: ForwardConfig) -> dict[str, Any]:
    """The options every connection to the configured servers takes (the forwarder adds
    its callbacks and reconnect policy)."""
    options: dict[str, Any] = {"servers": settings.servers, "name": "auditd",
                               "connect_timeout": 2}
    if settings.credentials:
        options["user_credentials"] = settings.credentials
    if settings.nkey:
        options["nkeys_seed"] = settings.nkey
    if settings.user:
        options["user"], options["password"] = settings.user, settings.password
    if settings.token:
        options["token"] = settings.token
    if settings.tls_ca or settings.tls_cert or any(
            url.startswith("tls://") for url in settings.servers):
        context = ssl.create_default_context(cafile=settings.tls_ca or None)
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        options["tls"] = context
    return options
