"""One logging setup for every ferry program (the CLI, the operator, the agent, the metadata
endpoint, the sim VM process)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int = logging.WARNING) -> None:
    """The root logger writes ``FORMAT`` lines to stderr at ``level``."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    root.setLevel(max(level, logging.DEBUG))


def for_server() -> None:
    """A long-running program says where it listens, when it is ready and what it does at
    INFO, even when the CLI's default level is WARNING (``-v`` still lowers it to DEBUG)."""
    configure(logging.getLogger().level or logging.WARNING)
    ferry = logging.getLogger("ferry")
    ferry.setLevel(min(ferry.getEffectiveLevel(), logging.INFO))
