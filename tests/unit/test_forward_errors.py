"""Each forwarding failure counts under one kind (the `errors` of /stats and metrics):
by the exception's class where nats-py gives one, by the server's words where it gives
only a plain Error, never by a word in a URL."""

from __future__ import annotations

import ssl

import nats.errors
import pytest
from nats.js.errors import APIError

from auditd.forward.forwarder import ForwardError, error_kind
from auditd.forward.stream import StreamRefused


@pytest.mark.parametrize(("exc", "kind"), [
    (nats.errors.AuthorizationError(), "auth"),
    (nats.errors.Error("nats: 'Authorization Violation'"), "auth"),
    (nats.errors.Error("nats: 'Permissions Violation for Publish to \"x\"'"), "auth"),
    (ssl.SSLCertVerificationError("certificate verify failed"), "tls"),
    (nats.errors.SecureConnRequiredError(), "tls"),
    (nats.errors.TimeoutError(), "timeout"),
    (TimeoutError(), "timeout"),
    (APIError(description="stream not found"), "server"),
    (nats.errors.NoRespondersError(), "server"),
    (ConnectionRefusedError("connect to tls://10.0.0.1:4222 refused"), "connect"),
    (nats.errors.NoServersError(), "connect"),
    (nats.errors.UnexpectedEOF(), "connect"),
    (ForwardError("seq 4 is missing", "store"), "store"),
    (StreamRefused("deny_delete is off"), "stream"),
    (ValueError("something else"), "other"),
])
def test_each_failure_counts_under_its_kind(exc: BaseException, kind: str) -> None:
    assert error_kind(exc) == kind
