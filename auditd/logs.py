"""structlog setup: JSON lines when not on a TTY, console rendering on one."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class RecurringFault:
    """A fault a loop retries: logged once per distinct error, and once when it clears.

    A maintenance pass or checkpoint that fails the same way every half second must not
    write a line each time, and its recovery must be said exactly once.
    """

    def __init__(self, logger: structlog.typing.FilteringBoundLogger, failed: str,
                 recovered: str, level: str = "error") -> None:
        self._log = logger
        self._failed, self._recovered, self._level = failed, recovered, level
        self.error = ""  # the last failure's message; empty while all is well

    def failed(self, exc: BaseException) -> None:
        if str(exc) != self.error:
            getattr(self._log, self._level)(self._failed, error=str(exc))
        self.error = str(exc)

    def succeeded(self) -> None:
        if self.error:
            self._log.info(self._recovered)
            self.error = ""
