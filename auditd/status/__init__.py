"""The status socket: health, stats, metrics, the dead-letter store and admin actions.

The daemon implements `StatusSource` and runs one `StatusServer`.
"""

from auditd.config import parse_listen
from auditd.status.server import StatusServer
from auditd.status.source import ActionRefused, Gauges, StatusSource, admin_actor

__all__ = ["ActionRefused", "Gauges", "StatusServer", "StatusSource", "admin_actor",
           "parse_listen"]
