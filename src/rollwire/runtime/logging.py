"""structlog set-up: console for people, JSON lines for machines (``--log-format json``)."""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVEL_ENV = "ROLLWIRE_LOG_LEVEL"  # child processes (the demo's trainer and workers) take the parent's level


def configure_logging(fmt: str = "console", level: str | None = None) -> None:
    """``level`` None: $ROLLWIRE_LOG_LEVEL, else info."""
    level = level or os.environ.get(LEVEL_ENV, "info")
    lvl = getattr(logging, level.upper(), logging.INFO)
    console = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    renderer: structlog.typing.Processor = structlog.processors.JSONRenderer() if fmt == "json" else console
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
