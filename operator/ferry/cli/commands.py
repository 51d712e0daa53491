"""Every click command of the `ferry` program, registered on the group in main.py."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []


def _add(module: str, *names: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    COMMANDS.extend(getattr(mod, name) for name in names)


_add("ferry.cli.server", "operator", "metadata", "dev")
_add("ferry.cli.agent_cmd", "agent", "agent_net")
_add("ferry.cli.user", "migrate", "watch", "complete", "cancel", "drain", "uncordon", "status", "explain", "report")
